//! The OpenAPI 3.1 description of the HTTP API, served at `/openapi.json`.

use serde_json::{json, Value};

/// The API description.
pub fn document() -> Value {
    let error = json!({"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}});
    let error_response =
        |description: &str| json!({"description": description, "content": {"application/json": {"schema": error}}});
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
                        "200": {"description": "Top classes and server-side timings", "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["model", "top_k", "batch_size", "timings_ms"],
                            "properties": {
                                "model": {"type": "string", "description": "Fingerprint of the model that answered"},
                                "top_k": {"type": "array", "items": {"type": "object", "required": ["class", "probability", "logit"], "properties": {
                                    "class": {"type": "integer"}, "label": {"type": "string"}, "probability": {"type": "number"}, "logit": {"type": "number"}}}},
                                "batch_size": {"type": "integer", "description": "Requests in the inference batch this one ran in"},
                                "timings_ms": {"type": "object", "properties": {
                                    "decode": {"type": "number"}, "queue": {"type": "number"}, "inference": {"type": "number"}, "total": {"type": "number"}}}
                            }}}}},
                        "400": error_response("Malformed payload (bad header, truncated or corrupt string, wrong latent shape)"),
                        "409": error_response("Payload produced by another model (fingerprint mismatch)"),
                        "413": {"description": "Body larger than the server's limit"},
                        "503": {"description": "Inference queue full (retry after the Retry-After seconds) or shutting down",
                                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                                "content": {"application/json": {"schema": error}}},
                        "504": error_response("The request exceeded the server's timeout")
                    }
                }
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "The server is up", "content": {"text/plain": {}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (OpenMetrics text)", "responses": {"200": {"description": "Requests by endpoint and status, queue depth, batch sizes, latency histograms"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1 JSON"}}}}
        }
    })
}
