//! The OpenAPI 3.1 description of the HTTP API, served at `/openapi.json`.

use serde_json::{json, Value};

/// The API description.
pub fn document() -> Value {
    let error = json!({"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}});
    let error_response =
        |description: &str| json!({"description": description, "content": {"application/json": {"schema": error}}});
    let prediction = json!({
        "type": "object",
        "required": ["model", "input_bytes", "top_k", "batch_size", "timings_ms"],
        "properties": {
            "model": {"type": "string", "description": "Fingerprint of the model that answered"},
            "input_bytes": {"type": "integer", "description": "Size of the payload or image this answer is for"},
            "top_k": {"type": "array", "items": {"type": "object", "required": ["class", "probability", "logit"], "properties": {
                "class": {"type": "integer"}, "label": {"type": "string"}, "probability": {"type": "number"}, "logit": {"type": "number"}}}},
            "batch_size": {"type": "integer", "description": "Requests in the inference batch this one ran in"},
            "timings_ms": {"type": "object", "properties": {
                "decode": {"type": "number", "description": "Entropy decoding, or image decoding and preprocessing"},
                "queue": {"type": "number"}, "inference": {"type": "number"}, "total": {"type": "number"}}}
        }
    });
    let unauthorized = error_response("Missing or wrong bearer token (servers started with --auth-token-file)");
    let busy = json!({"description": "The inputs or bytes in flight are at the server's bounds (retry after the Retry-After seconds), or it is shutting down",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": error}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "FrankenSplit inference server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Split inference: edge devices send entropy-coded latents (docs/format.md); the server restores the backbone's features and classifies."
        },
        "paths": {
            "/v1/classify": {
                "post": {
                    "summary": "Classify one payload",
                    "requestBody": {
                        "required": true,
                        "content": {
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                "description": "A FrankenSplit payload: 1 byte magic/version, 4-byte model fingerprint, LEB128 latent shape, CompressAI rANS string."},
                            "application/vnd.frankensplit.payloads": {"schema": {"type": "string", "format": "binary"},
                                "description": "Up to 256 payloads, each preceded by its length as a little-endian u32; the answer is {\"results\": [...]} in the same order."}
                        }
                    },
                    "responses": {
                        "200": {"description": "Top classes and server-side timings; a framed request gets {\"results\": [...]}",
                                "content": {"application/json": {"schema": prediction}}},
                        "400": error_response("Malformed payload (bad header, truncated or corrupt string, wrong latent shape)"),
                        "409": error_response("Payload produced by another model (fingerprint mismatch)"),
                        "401": unauthorized.clone(),
                        "413": error_response("Body larger than the server's limit, or more payloads than it ever admits at once"),
                        "503": busy,
                        "504": error_response("The request exceeded the server's timeout")
                    }
                }
            },
            "/v1/classify-image": {
                "post": {
                    "summary": "Classify a whole image with the whole backbone: the image-offloading baseline",
                    "parameters": [{"name": "cropped", "in": "query", "required": false, "schema": {"type": "boolean", "default": false},
                        "description": "The image is already the model's centre crop (e.g. 224×224): only normalise it. Otherwise it is resized and centre-cropped as the bundle's preprocessing says."}],
                    "requestBody": {
                        "required": true,
                        "content": {"image/*": {"schema": {"type": "string", "format": "binary"}, "description": "JPEG, PNG or WebP (the format is detected from the bytes)."}}
                    },
                    "responses": {
                        "200": {"description": "Top classes and server-side timings", "content": {"application/json": {"schema": prediction}}},
                        "400": error_response("Not a decodable JPEG/PNG/WebP image, or a cropped image of the wrong size"),
                        "401": unauthorized.clone(),
                        "413": error_response("Body larger than the server's limit, or an image whose decoded size or resize exceeds the pixel limit (checked from its header)"),
                        "501": error_response("The model bundle holds only the backbone after the split"),
                        "503": busy,
                        "504": error_response("The request exceeded the server's timeout")
                    }
                }
            },
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "The server is up", "content": {"text/plain": {}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (OpenMetrics text)", "responses": {"200": {"description": "Requests by endpoint and status, queue depth, batch sizes, latency histograms, inputs abandoned after timeouts"}, "401": unauthorized}}},
            "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI 3.1 JSON"}}}}
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
            "description": "Required when the server runs with --auth-token-file (then also over TLS: --tls-cert, --tls-key); /healthz and /openapi.json stay open."}}},
        "security": [{"bearer": []}]
    })
}
