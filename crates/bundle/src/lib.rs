//! A FrankenSplit model on disk, without libtorch: the directory users pass
//! around, holding `model.toml` (the [`Manifest`]: format version,
//! architecture, input pipeline, entropy-table provenance, fingerprint,
//! labels) and `weights.safetensors` (the compressor, the backbone and the
//! entropy coder's CDF tables, under the prefixes of [`names`]).
//!
//! This crate is the one owner of that contract: the libtorch networks
//! (`frankensplit-models`), the device (`frankensplit-edge`), training and
//! the CLI read and write bundles through it. The fingerprint is derived from
//! the weights file, so payloads carry the identity of the exact weights and
//! tables that produced them, and a bundle whose weights do not match its
//! manifest is refused.

pub mod config;
mod error;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod tables;

use std::path::{Path, PathBuf};

use frankensplit_codec::{LikelihoodFormula, ModelFingerprint, PayloadCodec};
use frankensplit_preprocess::Preprocess;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

pub use config::{
    Architecture, BackboneConfig, CompressorConfig, ConvNextConfig, DecoderBlueprint, Features, ResNetBlock,
    ResNetConfig, SwinConfig,
};
pub use error::{Error, Result};

/// Version of the bundle layout this build writes and reads.
pub const BUNDLE_FORMAT: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "model.toml";
/// The weights' file name.
pub const WEIGHTS: &str = "weights.safetensors";
/// The files a bundle directory holds: all a directory may hold for
/// [`write`] to replace it without `force`.
pub const BUNDLE_FILES: [&str; 2] = [MANIFEST, WEIGHTS];

/// Tensor names in `weights.safetensors`, in one place (the reference's
/// module paths below each prefix).
pub mod names {
    /// Prefix of the compressor's tensors (`g_a`, `entropy_bottleneck`, `g_s`).
    pub const COMPRESSOR: &str = "compressor.";
    /// Prefix of the backbone's tensors (the tail, and the head when the bundle has it).
    pub const BACKBONE: &str = "backbone.";
    /// Prefix of the entropy coder's tables.
    pub const TABLES: &str = "entropy_tables.";
    /// Prefix of the edge encoder's tensors.
    pub const ENCODER: &str = "compressor.g_a.";
    /// The entropy bottleneck's quantiles `[C, 1, 3]`.
    pub const QUANTILES: &str = "compressor.entropy_bottleneck.quantiles";
    /// CompressAI's `_quantized_cdf` `[C, width]`.
    pub const QUANTIZED_CDF: &str = "entropy_tables.quantized_cdf";
    /// CompressAI's `_cdf_length` `[C]`.
    pub const CDF_LENGTH: &str = "entropy_tables.cdf_length";
    /// CompressAI's `_offset` `[C]`.
    pub const OFFSET: &str = "entropy_tables.offset";
}

/// Where the entropy tables came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableSource {
    /// Copied from the checkpoint's `_quantized_cdf` / `_cdf_length` / `_offset`.
    Checkpoint,
    /// Rebuilt from the density parameters as CompressAI's `update()` does.
    Recomputed,
}

/// `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Bundle layout version.
    pub format: u32,
    /// Fingerprint of `weights.safetensors`, as 8 hex digits.
    pub fingerprint: String,
    /// The networks.
    pub architecture: Architecture,
    /// Input pipeline.
    pub preprocess: Preprocess,
    /// pmf formula the tables follow (the CompressAI version they match).
    pub likelihood_formula: LikelihoodFormula,
    /// Provenance of the tables.
    pub tables: TableSource,
    /// Whether the weights include the backbone before the split
    /// (`patch_embed` and stages `0..split_stage`), so that whole images can
    /// be classified too.
    #[serde(default)]
    pub backbone_head: bool,
    /// Class names, index order, when known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Free-form provenance (source checkpoint, command).
    #[serde(default)]
    pub source: String,
}

/// Manifests larger than this are refused unread: a real one is a few KB.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

impl Manifest {
    /// Parses and validates a manifest's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| Error::Invalid(format!("{origin}: {e}")))?;
        if manifest.format != BUNDLE_FORMAT {
            return Err(Error::Invalid(format!(
                "bundle format {} is not supported (this build reads {BUNDLE_FORMAT})",
                manifest.format
            )));
        }
        manifest.architecture.validate()?;
        Ok(manifest)
    }

    /// Reads and validates a bundle's `model.toml` without loading weights.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let not_a_bundle =
            |e: String| Error::Invalid(format!("{} is not a model bundle ({MANIFEST}: {e})", dir.display()));
        let size = std::fs::metadata(&path).map_err(|e| not_a_bundle(e.to_string()))?.len();
        if size > MAX_MANIFEST_BYTES {
            return Err(not_a_bundle(format!(
                "{size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have"
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| not_a_bundle(e.to_string()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Refuses a weights file of `size` bytes at `path` that is too small to
    /// hold the networks the architecture declares (see
    /// [`Architecture::min_parameters`]), before anything of their size is read or built.
    pub fn check_weights_size(&self, size: u64, path: &Path) -> Result<()> {
        let needed = 4.0 * self.architecture.min_parameters(self.backbone_head);
        if (size as f64) < needed {
            return Err(Error::Invalid(format!(
                "{} has {size} bytes, but the architecture in {MANIFEST} needs at least {needed:.0}: the manifest does not describe these weights",
                path.display()
            )));
        }
        Ok(())
    }

    /// The payload codec of the model whose weights are `tensors` and whose
    /// identity is `fingerprint`: the latent shape, the entropy tables and
    /// the medians.
    pub fn payload_codec(&self, tensors: &SafeTensors<'_>, fingerprint: ModelFingerprint) -> Result<PayloadCodec> {
        let shape = self.architecture.latent_shape();
        let coder = tables::entropy_coder(tensors, shape.channels as usize)?;
        Ok(PayloadCodec::new(fingerprint, shape, coder)?)
    }

    /// The manifest as `model.toml` holds it.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Invalid(format!("cannot write the manifest: {e}")))
    }
}

/// A bundle whose weights matched its manifest's fingerprint when read.
#[derive(Debug)]
pub struct VerifiedBundle {
    /// Directory it was read from.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The bytes of `weights.safetensors`.
    pub weights: Vec<u8>,
    /// Identity carried by payloads.
    pub fingerprint: ModelFingerprint,
}

impl VerifiedBundle {
    /// Reads a bundle directory: the manifest, validated, and the weights,
    /// checked against the manifest's fingerprint.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let path = dir.join(WEIGHTS);
        let size = std::fs::metadata(&path).map_err(|e| Error::read(&path, e))?.len();
        manifest.check_weights_size(size, &path)?;
        let weights = std::fs::read(&path).map_err(|e| Error::read(&path, e))?;
        let fingerprint = ModelFingerprint::of_parts([weights.as_slice()]);
        if fingerprint.to_string() != manifest.fingerprint {
            return Err(Error::Invalid(format!(
                "{} does not match its manifest (fingerprint {fingerprint}, manifest says {}): the bundle was modified or damaged",
                path.display(),
                manifest.fingerprint
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            weights,
            fingerprint,
        })
    }

    /// The weights' tensors (views into [`VerifiedBundle::weights`]).
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.weights)
            .map_err(|e| Error::Invalid(format!("{} is corrupt: {e}", self.dir.join(WEIGHTS).display())))
    }

    /// The bundle's payload codec: its fingerprint, its latent shape and its
    /// entropy coder.
    pub fn payload_codec(&self) -> Result<PayloadCodec> {
        self.manifest.payload_codec(&self.tensors()?, self.fingerprint)
    }
}

/// Writes a bundle into `dir`: `write_weights` writes `weights.safetensors`
/// into the directory it is given, the manifest gets the weights'
/// fingerprint, and the whole directory is staged in a sibling, flushed,
/// then swapped with the old one in one step, so a crash leaves the old
/// bundle or the new. A `dir` holding anything but a bundle's files is
/// refused unless `force`. `manifest.fingerprint` is replaced.
pub fn write<E: std::fmt::Display>(
    dir: &Path,
    mut manifest: Manifest,
    force: bool,
    write_weights: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> Result<ModelFingerprint> {
    manifest.architecture.validate()?;
    frankensplit_fsio::check_replaceable(dir, &BUNDLE_FILES, force).map_err(Error::Invalid)?;
    let staging = frankensplit_fsio::Staging::new(dir).map_err(|e| Error::write(dir, e))?;
    let tmp = staging.path().to_path_buf();
    let weights_path = tmp.join(WEIGHTS);
    write_weights(&weights_path).map_err(|e| Error::Invalid(format!("cannot write the weights: {e}")))?;
    let bytes = std::fs::read(&weights_path).map_err(|e| Error::read(&weights_path, e))?;
    let fingerprint = ModelFingerprint::of_parts([bytes.as_slice()]);
    manifest.format = BUNDLE_FORMAT;
    manifest.fingerprint = fingerprint.to_string();
    let manifest_path = tmp.join(MANIFEST);
    std::fs::write(&manifest_path, manifest.to_toml()?).map_err(|e| Error::write(&manifest_path, e))?;
    staging.commit().map_err(|e| Error::write(dir, e))?;
    Ok(fingerprint)
}
