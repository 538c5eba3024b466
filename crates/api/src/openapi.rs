//! The OpenAPI 3.1 description of the HTTP API, served at `/openapi.json`.
//! The schemas of the answers are generated from the types of this crate
//! (JSON Schema 2020-12, OpenAPI 3.1's dialect), so the description cannot
//! drift from what the server sends.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use crate::{
    ClassifyResponse, ErrorBody, FramedResponse, CLASSIFY, CLASSIFY_IMAGE, FRAMED_PAYLOADS, FRAMED_RAW_STRINGS, HEALTH,
    MAX_FRAMES, METRICS, OPENAPI, PAYLOAD, RAW_STRING,
};

/// Schemas of the contract's types, keyed by name, with references between
/// them pointing into `#/components/schemas`.
struct Schemas {
    generator: schemars::SchemaGenerator,
}

impl Schemas {
    fn new() -> Self {
        let settings = SchemaSettings::draft2020_12().with(|s| {
            s.definitions_path = "#/components/schemas".into();
            s.meta_schema = None;
        });
        Self {
            generator: settings.into_generator(),
        }
    }

    /// A reference to `T`'s schema, which [`Schemas::components`] will hold.
    fn reference<T: JsonSchema>(&mut self) -> Value {
        let name = T::schema_name();
        let schema = self.generator.root_schema_for::<T>();
        self.generator
            .definitions_mut()
            .insert(name.to_string(), schema.to_value());
        json!({"$ref": format!("#/components/schemas/{name}")})
    }

    fn components(mut self) -> Map<String, Value> {
        self.generator.take_definitions(true)
    }
}

/// The API description.
pub fn document() -> Value {
    let mut schemas = Schemas::new();
    let answer = schemas.reference::<ClassifyResponse>();
    let framed = schemas.reference::<FramedResponse>();
    let error = schemas.reference::<ErrorBody>();
    let error_response =
        |description: &str| json!({"description": description, "content": {"application/json": {"schema": error}}});
    let unauthorized = error_response("Missing or wrong bearer token (servers started with --auth-token-file)");
    let busy = json!({"description": "The inputs or bytes in flight are at the server's bounds (retry after the Retry-After seconds), or it is shutting down",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": error}}});
    let mut paths = Map::new();
    paths.insert(CLASSIFY.into(), json!({
        "post": {
            "summary": "Classify one payload or raw CompressAI string, or several framed in one body",
            "parameters": [{"name": "backbone", "in": "query", "required": false, "schema": {"type": "string"},
                "description": "Which of the bundle's backbones classifies the restored features (its name, as /v1/classify answers name it), or `all` for every one in one answer (`backbones`); the bundle's first when absent."}],
            "requestBody": {
                "required": true,
                "content": {
                    PAYLOAD: {"schema": {"type": "string", "format": "binary"},
                        "description": "A FrankenSplit payload: 1 byte magic/version, 4-byte model fingerprint, LEB128 latent shape, CompressAI rANS string."},
                    FRAMED_PAYLOADS: {"schema": {"type": "string", "format": "binary"},
                        "description": format!("Up to {MAX_FRAMES} payloads, each preceded by its length as a little-endian u32; the answer is a FramedResponse, in the same order.")},
                    RAW_STRING: {"schema": {"type": "string", "format": "binary"},
                        "description": "One raw CompressAI string, the bytes EntropyBottleneck.compress returns for one image (a PyTorch edge's), without our container: the served bundle's latent shape is implied, and since a raw string names no model, a string of another model is not refused with 409 but decodes to other features or fails with 400."},
                    FRAMED_RAW_STRINGS: {"schema": {"type": "string", "format": "binary"},
                        "description": format!("Up to {MAX_FRAMES} raw CompressAI strings, framed as payloads are; the answer is a FramedResponse, in the same order.")}
                }
            },
            "responses": {
                "200": {"description": "Top classes and server-side timings: a ClassifyResponse for one payload, a FramedResponse for a framed body",
                        "content": {"application/json": {"schema": {"oneOf": [answer, framed]}}}},
                "400": error_response("Malformed payload (bad header, truncated or corrupt string, wrong latent shape), or a backbone the bundle does not serve"),
                "409": error_response("Payload produced by another model (fingerprint mismatch)"),
                "401": unauthorized.clone(),
                "413": error_response("Body larger than the server's limit, or more payloads than it ever admits at once"),
                "503": busy,
                "504": error_response("The request exceeded the server's timeout")
            }
        }
    }));
    paths.insert(CLASSIFY_IMAGE.into(), json!({
        "post": {
            "summary": "Classify a whole image with the whole backbone: the image-offloading baseline",
            "parameters": [{"name": "cropped", "in": "query", "required": false, "schema": {"type": "boolean", "default": false},
                "description": "The image is already the model's centre crop (e.g. 224×224): only normalise it. Otherwise it is resized and centre-cropped as the bundle's preprocessing says."}],
            "requestBody": {
                "required": true,
                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}, "description": "JPEG, PNG or WebP (the format is detected from the bytes)."}}
            },
            "responses": {
                "200": {"description": "Top classes and server-side timings", "content": {"application/json": {"schema": answer}}},
                "400": error_response("Not a decodable JPEG/PNG/WebP image, or a cropped image of the wrong size"),
                "401": unauthorized.clone(),
                "413": error_response("Body larger than the server's limit, or an image whose decoded size or resize exceeds the pixel limit (checked from its header)"),
                "501": error_response("The model bundle holds only the backbone after the split"),
                "503": busy,
                "504": error_response("The request exceeded the server's timeout")
            }
        }
    }));
    paths.insert(HEALTH.into(), json!({"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "The server is up", "content": {"text/plain": {}}}}}}));
    paths.insert(METRICS.into(), json!({"get": {"summary": "Prometheus metrics (OpenMetrics text)", "responses": {"200": {"description": "Requests by endpoint and status, queue depth, batch sizes, latency histograms, inputs abandoned after timeouts"}, "401": unauthorized}}}));
    paths.insert(OPENAPI.into(), json!({"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI 3.1 JSON"}}}}));
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "FrankenSplit inference server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Split inference: edge devices send entropy-coded latents (docs/format.md); the server restores the backbone's features and classifies."
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "Required when the server runs with --auth-token-file (then also over TLS: --tls-cert, --tls-key); /healthz and /openapi.json stay open."}}
        },
        "security": [{"bearer": []}]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `value`.
    fn references(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r.clone());
                }
                map.values().for_each(|v| references(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| references(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves_within_the_document() {
        let doc = document();
        let mut refs = Vec::new();
        references(&doc, &mut refs);
        assert!(refs.len() >= 4, "{refs:?}");
        for r in refs {
            let pointer = r.strip_prefix('#').expect("local reference");
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }

    #[test]
    fn the_answer_schema_lists_the_fields_the_server_sends() {
        let doc = document();
        let answer = &doc["components"]["schemas"]["ClassifyResponse"];
        let required: Vec<&str> = answer["required"]
            .as_array()
            .expect("required fields")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let sent = serde_json::to_value(ClassifyResponse {
            model: String::new(),
            backbone: String::new(),
            input_bytes: 0,
            top_k: Vec::new(),
            backbones: Vec::new(),
            batch_size: 0,
            timings_ms: crate::Timings {
                decode: 0.0,
                queue: 0.0,
                inference: 0.0,
                total: 0.0,
            },
        })
        .unwrap();
        let mut fields: Vec<&str> = sent.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        let mut required_sorted = required.clone();
        required_sorted.sort_unstable();
        assert_eq!(required_sorted, fields);
        assert!(doc["paths"][CLASSIFY]["post"]["responses"]["409"].is_object());
    }
}
