//! The HTTP contract between FrankenSplit devices and servers, stated once:
//! the routes, how several payloads share one request body, the answer and
//! error types, and the OpenAPI description ([`openapi::document`]),
//! whose schemas are generated from those types. The server serialises
//! these types and the client deserialises them; neither indexes JSON by
//! hand. No HTTP library here: both sides bring their own.

pub mod openapi;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Classify one payload, or several framed ([`FRAMED_PAYLOADS`]).
pub const CLASSIFY: &str = "/v1/classify";
/// Classify a whole image with the whole backbone (the offloading baseline).
pub const CLASSIFY_IMAGE: &str = "/v1/classify-image";
/// Liveness.
pub const HEALTH: &str = "/healthz";
/// Prometheus metrics.
pub const METRICS: &str = "/metrics";
/// The OpenAPI description.
pub const OPENAPI: &str = "/openapi.json";

/// Content type of one payload (the container of `docs/format.md`).
pub const PAYLOAD: &str = "application/octet-stream";
/// Content type of a body holding several payloads, each preceded by its
/// length as a little-endian `u32`.
pub const FRAMED_PAYLOADS: &str = "application/vnd.frankensplit.payloads";
/// Content type of one raw CompressAI string (the bytes
/// `EntropyBottleneck.compress` returns, without our container), for
/// PyTorch edges: the server's bundle implies the latent shape and cannot
/// check which model made the string.
pub const RAW_STRING: &str = "application/x-compressai-string";
/// Content type of a body holding several raw CompressAI strings, framed as
/// [`FRAMED_PAYLOADS`] are.
pub const FRAMED_RAW_STRINGS: &str = "application/x-compressai-strings";

/// What a [`CLASSIFY`] body holds, by its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifyBody {
    /// One payload ([`PAYLOAD`], and any type not named below).
    Payload,
    /// Framed payloads ([`FRAMED_PAYLOADS`]).
    FramedPayloads,
    /// One raw CompressAI string ([`RAW_STRING`]).
    RawString,
    /// Framed raw CompressAI strings ([`FRAMED_RAW_STRINGS`]).
    FramedRawStrings,
}

impl ClassifyBody {
    /// The body kind of a `Content-Type` value (its parameters ignored).
    pub fn from_content_type(value: Option<&[u8]>) -> Self {
        let essence = value
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
        match essence.as_deref() {
            Some(FRAMED_PAYLOADS) => Self::FramedPayloads,
            Some(RAW_STRING) => Self::RawString,
            Some(FRAMED_RAW_STRINGS) => Self::FramedRawStrings,
            _ => Self::Payload,
        }
    }

    /// The body holds length-prefixed frames.
    pub fn framed(self) -> bool {
        matches!(self, Self::FramedPayloads | Self::FramedRawStrings)
    }

    /// The body holds raw CompressAI strings rather than payloads.
    pub fn raw(self) -> bool {
        matches!(self, Self::RawString | Self::FramedRawStrings)
    }

    /// The content type that announces this kind of body.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Payload => PAYLOAD,
            Self::FramedPayloads => FRAMED_PAYLOADS,
            Self::RawString => RAW_STRING,
            Self::FramedRawStrings => FRAMED_RAW_STRINGS,
        }
    }
}

/// Most payloads one framed request may carry.
pub const MAX_FRAMES: usize = 256;

/// One class of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Prediction {
    /// Class index.
    pub class: usize,
    /// Class name, when the bundle has labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Softmax probability.
    pub probability: f64,
    /// The logit.
    pub logit: f32,
}

/// Where the server's time went, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Timings {
    /// Entropy decoding, or image decoding and preprocessing.
    pub decode: f64,
    /// Waiting for the inference thread.
    pub queue: f64,
    /// The decoder and the backbone tail (or the whole backbone), per batch.
    pub inference: f64,
    /// From the request's arrival to the answer.
    pub total: f64,
}

/// The answer for one payload or image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClassifyResponse {
    /// Fingerprint of the model that answered.
    pub model: String,
    /// The backbone whose classes `top_k` holds (absent from servers older
    /// than multi-backbone bundles).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backbone: String,
    /// Bytes of the payload or image this answer is for.
    pub input_bytes: usize,
    /// The most probable classes, most probable first.
    pub top_k: Vec<Prediction>,
    /// With `?backbone=all`: every backbone's classes, in the bundle's
    /// order (the first is `top_k`'s).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backbones: Vec<BackboneAnswer>,
    /// Inputs in the inference batch this one ran in.
    pub batch_size: usize,
    /// Server-side timings.
    pub timings_ms: Timings,
}

/// One backbone's classes in an answer for all backbones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackboneAnswer {
    /// The backbone's name.
    pub backbone: String,
    /// Its most probable classes, most probable first.
    pub top_k: Vec<Prediction>,
}

/// Query of [`CLASSIFY`]: which backbone classifies the restored features.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClassifyOptions {
    /// A backbone the bundle serves, or `all` for every one; the bundle's
    /// first backbone when absent.
    #[serde(default)]
    pub backbone: Option<String>,
}

/// The `backbone` value that asks for every backbone.
pub const ALL_BACKBONES: &str = "all";

/// The answer to a framed request: one answer per payload, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FramedResponse {
    /// The answers.
    pub results: Vec<ClassifyResponse>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// What went wrong and what to fix.
    pub error: String,
}

/// Query options of [`CLASSIFY_IMAGE`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ImageOptions {
    /// The image is already the model's centre crop (e.g. 224×224): only
    /// normalise it. Otherwise it is resized and centre-cropped as the
    /// bundle's preprocessing says.
    #[serde(default)]
    pub cropped: bool,
}

/// Frames payloads into one [`FRAMED_PAYLOADS`] body. Fails beyond
/// [`MAX_FRAMES`] payloads or for a payload over `u32::MAX` bytes.
pub fn frame<P: AsRef<[u8]>>(payloads: &[P]) -> Result<Vec<u8>, String> {
    if payloads.is_empty() || payloads.len() > MAX_FRAMES {
        return Err(format!(
            "a framed request carries 1 to {MAX_FRAMES} payloads, not {}",
            payloads.len()
        ));
    }
    let mut body = Vec::with_capacity(payloads.iter().map(|p| 4 + p.as_ref().len()).sum());
    for (i, payload) in payloads.iter().enumerate() {
        let payload = payload.as_ref();
        let len = u32::try_from(payload.len()).map_err(|_| format!("payload {i} is larger than 4 GiB"))?;
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(payload);
    }
    Ok(body)
}

/// Splits a [`FRAMED_PAYLOADS`] body into its payloads (views into `body`).
pub fn frames(body: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut rest = body;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if out.len() == MAX_FRAMES {
            return Err(format!("more than {MAX_FRAMES} payloads in one request"));
        }
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or("framed body ends inside a length prefix")?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(format!(
                "payload {} declares {len} bytes, {} remain",
                out.len(),
                tail.len()
            ));
        }
        out.push(&tail[..len]);
        rest = &tail[len..];
    }
    if out.is_empty() {
        return Err("framed body holds no payload".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_payloads_come_back_in_order() {
        let payloads: [&[u8]; 3] = [b"first", b"", b"the third one"];
        let body = frame(&payloads).unwrap();
        assert_eq!(body.len(), 12 + 5 + 13);
        assert_eq!(&body[..4], &5u32.to_le_bytes());
        assert_eq!(frames(&body).unwrap(), payloads.to_vec());
    }

    #[test]
    fn a_body_kind_is_read_from_the_content_type_essence() {
        let kind = |v: &str| ClassifyBody::from_content_type(Some(v.as_bytes()));
        assert_eq!(kind("application/x-compressai-string"), ClassifyBody::RawString);
        assert_eq!(
            kind("Application/X-CompressAI-Strings; charset=binary"),
            ClassifyBody::FramedRawStrings
        );
        assert_eq!(
            kind("application/vnd.frankensplit.payloads"),
            ClassifyBody::FramedPayloads
        );
        assert_eq!(kind("application/vnd.frankensplit.payloadsX"), ClassifyBody::Payload);
        assert_eq!(kind("application/octet-stream"), ClassifyBody::Payload);
        assert_eq!(ClassifyBody::from_content_type(None), ClassifyBody::Payload);
        assert_eq!(
            ClassifyBody::from_content_type(Some(&[0xff, 0xfe])),
            ClassifyBody::Payload
        );
        for body in [
            ClassifyBody::Payload,
            ClassifyBody::FramedPayloads,
            ClassifyBody::RawString,
            ClassifyBody::FramedRawStrings,
        ] {
            assert_eq!(kind(body.content_type()), body);
        }
        assert!(ClassifyBody::FramedRawStrings.raw() && ClassifyBody::FramedRawStrings.framed());
        assert!(!ClassifyBody::RawString.framed() && !ClassifyBody::FramedPayloads.raw());
    }

    #[test]
    fn malformed_framing_is_refused_with_a_reason() {
        assert!(frames(b"").unwrap_err().contains("no payload"));
        assert!(frames(&[1, 0]).unwrap_err().contains("length prefix"));
        assert!(frames(&[9, 0, 0, 0, 1])
            .unwrap_err()
            .contains("declares 9 bytes, 1 remain"));
        let too_many = vec![0u8; 4 * (MAX_FRAMES + 1)];
        assert!(frames(&too_many).unwrap_err().contains("more than 256"));
        assert!(frame::<&[u8]>(&[]).is_err());
        assert!(frame(&vec![b"x"; MAX_FRAMES + 1]).is_err());
    }

    #[test]
    fn an_answer_reads_back_as_the_server_wrote_it() {
        let top = Prediction {
            class: 3,
            label: None,
            probability: 0.75,
            logit: 2.5,
        };
        let answer = ClassifyResponse {
            model: "0a1b2c3d".into(),
            backbone: "swin".into(),
            input_bytes: 310,
            top_k: vec![top.clone()],
            backbones: vec![BackboneAnswer {
                backbone: "resnet".into(),
                top_k: vec![top],
            }],
            batch_size: 4,
            timings_ms: Timings {
                decode: 0.5,
                queue: 1.0,
                inference: 3.0,
                total: 4.75,
            },
        };
        let text = serde_json::to_string(&answer).unwrap();
        assert!(!text.contains("label"), "absent labels are left out: {text}");
        assert_eq!(serde_json::from_str::<ClassifyResponse>(&text).unwrap(), answer);
        // An answer of a server older than several backbones still reads.
        let old = text.replace(r#""backbone":"swin","#, "");
        let old = &old[..old.find(r#","backbones""#).unwrap()];
        let old = format!("{old}{}", &text[text.find(r#","batch_size""#).unwrap()..]);
        let read: ClassifyResponse = serde_json::from_str(&old).unwrap();
        assert!(read.backbone.is_empty() && read.backbones.is_empty());
    }
}
