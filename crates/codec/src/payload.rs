//! One model's payloads, both ways: a latent becomes the container of
//! `docs/format.md` (the CompressAI string framed with the model's
//! fingerprint and the latent's shape), and a container becomes the
//! dequantised latent again, refused when another model or another shape
//! made it. Like CompressAI's entropy models, which offer `compress()` and
//! `decompress()` on one object, the edge, the training code's bundles and
//! the server all go through this one type.

use crate::container::{ModelFingerprint, Payload};
use crate::error::{CodecError, Result};
use crate::factorized::EntropyBottleneck;
use crate::{DecodeLimits, LatentShape};

/// Compresses latents to payloads and decompresses payloads to latents for
/// one model; cheap to clone and thread-safe.
#[derive(Debug, Clone)]
pub struct PayloadCodec {
    /// The model's identity, written into every payload and required of every payload read.
    pub fingerprint: ModelFingerprint,
    /// The latent shape of one image.
    pub shape: LatentShape,
    coder: EntropyBottleneck,
    limits: DecodeLimits,
}

impl PayloadCodec {
    /// The payload codec of the model `fingerprint`, whose latents have `shape`
    /// and are coded by `coder`.
    pub fn new(fingerprint: ModelFingerprint, shape: LatentShape, coder: EntropyBottleneck) -> Result<Self> {
        if coder.channels() != shape.channels as usize {
            return Err(CodecError::ShapeMismatch(format!(
                "the entropy model has {} channels, the latent {shape}",
                coder.channels()
            )));
        }
        Ok(Self {
            fingerprint,
            shape,
            coder,
            limits: DecodeLimits::default(),
        })
    }

    /// The entropy model (tables and per-channel medians).
    pub fn coder(&self) -> &EntropyBottleneck {
        &self.coder
    }

    /// One latent (CHW, `shape` exactly) → payload.
    pub fn compress(&self, latent: &[f32]) -> Result<Vec<u8>> {
        let string = self.coder.compress(latent, self.shape)?;
        Ok(Payload {
            fingerprint: self.fingerprint,
            shape: self.shape,
            string: &string,
        }
        .to_bytes())
    }

    /// Payload → the dequantised latent (CHW). Payloads of other models and
    /// of other latent shapes are refused before anything is decoded.
    pub fn decompress(&self, payload: &[u8]) -> Result<Vec<f32>> {
        let parsed = self.parse(payload)?;
        self.coder.decompress(parsed.string, self.shape, self.limits)
    }

    /// A raw CompressAI string (what `EntropyBottleneck.compress` returns,
    /// without our container) → the dequantised latent, at this model's
    /// latent shape. Nothing in a raw string says which model made it: a
    /// string of another model decodes to nonsense or fails as malformed.
    pub fn decompress_raw(&self, string: &[u8]) -> Result<Vec<f32>> {
        self.coder.decompress(string, self.shape, self.limits)
    }

    /// Payload → the latent's integer symbols (CHW, before the medians are
    /// added back), as CompressAI's `quantize(..., "symbols")` gives them.
    pub fn decompress_symbols(&self, payload: &[u8]) -> Result<Vec<i32>> {
        let parsed = self.parse(payload)?;
        self.coder.decompress_symbols(parsed.string, self.shape, self.limits)
    }

    /// Parses a payload and checks that this model, at this shape, made it.
    pub fn parse<'a>(&self, payload: &'a [u8]) -> Result<Payload<'a>> {
        let parsed = Payload::parse_for(payload, self.fingerprint)?;
        if parsed.shape != self.shape {
            return Err(CodecError::LatentShapeMismatch {
                declared: parsed.shape.to_string(),
                expected: self.shape.to_string(),
            });
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdf::CdfTables;

    /// Two channels with a few symbols of distinct probabilities each.
    fn codec(fingerprint: u32) -> PayloadCodec {
        let row = [0u32, 20_000, 50_000, 65_000, 65_536];
        let cdf: Vec<i32> = row.iter().chain(row.iter()).map(|&v| v as i32).collect();
        let tables = CdfTables::from_compressai(&cdf, row.len(), &[5, 5], &[-2, -2]).unwrap();
        let coder = EntropyBottleneck::from_tables(tables, vec![0.25, -0.5]).unwrap();
        PayloadCodec::new(ModelFingerprint(fingerprint), LatentShape::new(2, 2, 3), coder).unwrap()
    }

    #[test]
    fn a_raw_string_decompresses_as_the_payload_that_frames_it() {
        let codec = codec(7);
        let latent = [0.3, 1.2, -0.9, 0.25, 5.0, -1.6, -0.5, 0.6, -2.4, 1.4, -0.4, 9.0];
        let payload = codec.compress(&latent).unwrap();
        let string = codec.parse(&payload).unwrap().string.to_vec();
        assert_eq!(
            codec.decompress_raw(&string).unwrap(),
            codec.decompress(&payload).unwrap()
        );
        assert!(codec.decompress_raw(&string[..string.len() / 2]).is_err());
    }

    #[test]
    fn a_payload_decompresses_to_the_rounded_latent_around_the_medians() {
        let codec = codec(7);
        let latent = [0.3, 1.2, -0.9, 0.25, 5.0, -1.6, -0.5, 0.6, -2.4, 1.4, -0.4, 9.0];
        let payload = codec.compress(&latent).unwrap();
        let decoded = codec.decompress(&payload).unwrap();
        let medians = [0.25f32, -0.5];
        for (i, (&y, &d)) in latent.iter().zip(&decoded).enumerate() {
            let m = medians[i / 6];
            assert_eq!(d, (y - m).round() + m, "value {i}");
        }
        assert_eq!(
            codec.decompress_symbols(&payload).unwrap(),
            latent
                .iter()
                .enumerate()
                .map(|(i, &y)| (y - medians[i / 6]).round() as i32)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn another_models_payload_is_refused() {
        let payload = codec(7).compress(&[0.0; 12]).unwrap();
        let err = codec(8).decompress(&payload).unwrap_err();
        assert!(matches!(err, CodecError::FingerprintMismatch { .. }), "{err}");
    }

    #[test]
    fn a_payload_of_another_shape_is_refused_before_decoding() {
        let codec = codec(7);
        let string = codec.coder().compress(&[0.0; 8], LatentShape::new(2, 2, 2)).unwrap();
        let payload = Payload {
            fingerprint: codec.fingerprint,
            shape: LatentShape::new(2, 2, 2),
            string: &string,
        }
        .to_bytes();
        let err = codec.decompress(&payload).unwrap_err();
        assert!(matches!(err, CodecError::LatentShapeMismatch { .. }), "{err}");
    }

    #[test]
    fn a_latent_of_the_wrong_length_is_refused() {
        assert!(codec(7).compress(&[0.0; 11]).is_err());
    }

    #[test]
    fn tables_for_another_channel_count_are_refused() {
        let base = codec(7);
        let err = PayloadCodec::new(base.fingerprint, LatentShape::new(3, 2, 3), base.coder.clone()).unwrap_err();
        assert!(matches!(err, CodecError::ShapeMismatch(_)), "{err}");
    }
}
