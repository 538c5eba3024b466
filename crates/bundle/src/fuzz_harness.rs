//! The bundle reader's fuzzing entry point, shared by the `cargo fuzz`
//! target and the test that replays the committed corpus.

use std::path::Path;

use frankensplit_codec::ModelFingerprint;
use safetensors::SafeTensors;

use crate::Manifest;

/// Latents up to this many values are coded both ways; larger shapes
/// (allowed by the bounds) would make each run slow, not reach new code.
const MAX_ROUND_TRIP: usize = 1 << 16;

/// Feeds `data` to everything a bundle's files go through: a 2-byte length,
/// then that many bytes of `model.toml` and the rest as
/// `weights.safetensors`. The manifest is parsed and validated (further
/// backbones included), the weights' size checked against the
/// architectures, the encoder side fingerprinted, the tables and medians
/// read, the payload codec built and, for small latents, a payload coded
/// and decoded.
/// The fingerprint check is skipped: it would stop nearly every input before
/// the deep code. Any panic, hang or unbounded allocation is a bug.
/// Returns whether a payload went both ways (the seeds must get there).
pub fn open_untrusted(data: &[u8]) -> bool {
    let Some((length, rest)) = data.split_first_chunk::<2>() else {
        return false;
    };
    let split = usize::from(u16::from_le_bytes(*length)).min(rest.len());
    let (text, weights) = rest.split_at(split);
    let Ok(manifest) = Manifest::parse(&String::from_utf8_lossy(text), "fuzz") else {
        return false;
    };
    if manifest
        .check_weights_size(weights.len() as u64, Path::new("fuzz"))
        .is_err()
    {
        return false;
    }
    let Ok(tensors) = SafeTensors::deserialize(weights) else {
        return false;
    };
    let fingerprint = if manifest.format >= 2 {
        crate::encoder_fingerprint(&tensors)
    } else {
        ModelFingerprint::of_parts([weights])
    };
    let Ok(codec) = manifest.payload_codec(&tensors, fingerprint) else {
        return false;
    };
    let shape = codec.shape;
    if shape.len() > MAX_ROUND_TRIP {
        return false;
    }
    let latent: Vec<f32> = (0..shape.len()).map(|i| (i % 7) as f32 - 3.0).collect();
    let Ok(payload) = codec.compress(&latent) else {
        return false;
    };
    let decoded = codec.decompress(&payload).expect("a payload the codec wrote decodes");
    assert_eq!(decoded.len(), latent.len());
    true
}
