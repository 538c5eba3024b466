//! A FrankenSplit model on disk, without libtorch: the directory users pass
//! around, holding `model.toml` (the [`Manifest`]: format version,
//! architecture, input pipeline, entropy-table provenance, fingerprint,
//! labels) and `weights.safetensors` (the compressor, the backbone and the
//! entropy coder's CDF tables, under the prefixes of [`names`]).
//!
//! This crate is the one owner of that contract: the libtorch networks
//! (`frankensplit-models`), the device (`frankensplit-edge`), training and
//! the CLI read and write bundles through it. The fingerprint payloads carry
//! is derived from the encoder side of the weights (g_a, the prior and the
//! tables: everything a payload's bytes depend on), so bundles that share an
//! edge encoder accept each other's payloads whatever decoders and backbones
//! they hold; the whole weights file has its own fingerprint in the
//! manifest, and a bundle whose weights do not match it is refused. Format 1
//! bundles, whose one fingerprint covered the whole file, are still read.

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

/// Version of the bundle layout this build writes.
pub const BUNDLE_FORMAT: u32 = 2;

/// The versions this build reads: 1 (one fingerprint, of the whole weights
/// file, which payloads carry) and 2 (payloads carry the encoder side's).
pub const READABLE_FORMATS: [u32; 2] = [1, 2];
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
    /// Prefix of the server's decoder `g_s`.
    pub const DECODER: &str = "compressor.g_s.";
    /// Prefix of the entropy bottleneck's parameters (the factorized prior).
    pub const PRIOR: &str = "compressor.entropy_bottleneck.";
    /// The entropy bottleneck's quantiles `[C, 1, 3]`.
    pub const QUANTILES: &str = "compressor.entropy_bottleneck.quantiles";
    /// CompressAI's `_quantized_cdf` `[C, width]`.
    pub const QUANTIZED_CDF: &str = "entropy_tables.quantized_cdf";
    /// CompressAI's `_cdf_length` `[C]`.
    pub const CDF_LENGTH: &str = "entropy_tables.cdf_length";
    /// CompressAI's `_offset` `[C]`.
    pub const OFFSET: &str = "entropy_tables.offset";

    /// Prefix of a further backbone's tensors: below it, its decoder under
    /// [`COMPRESSOR`]`g_s.` and its tail under [`BACKBONE`], as the first
    /// backbone's are at the root.
    pub fn more(name: &str) -> String {
        format!("backbones.{name}.")
    }
}

/// Most further backbones one bundle may hold.
pub const MAX_MORE_BACKBONES: usize = 16;

/// A backbone a bundle serves besides its first: its own decoder and tail
/// in front of the bundle's edge encoder (weights under [`names::more`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoreBackbone {
    /// The name requests choose it by.
    pub name: String,
    /// Its architecture; the compressor's encoder fields are the bundle's.
    pub architecture: Architecture,
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
    /// The identity payloads carry, as 8 hex digits: the fingerprint of the
    /// encoder side ([`encoder_fingerprint`]); in format 1, of the whole
    /// `weights.safetensors`.
    pub fingerprint: String,
    /// Format 2: the fingerprint of the whole `weights.safetensors`, which
    /// must match it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_fingerprint: Option<String>,
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
    /// Class names, index order, when known (shared by every backbone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The name requests choose the first backbone by; its family's name
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_name: Option<String>,
    /// Further backbones served from the same payloads (format 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_backbones: Vec<MoreBackbone>,
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
        if !READABLE_FORMATS.contains(&manifest.format) {
            return Err(Error::Invalid(format!(
                "bundle format {} is not supported (this build reads {READABLE_FORMATS:?})",
                manifest.format
            )));
        }
        if manifest.format >= 2 && manifest.weights_fingerprint.is_none() {
            return Err(Error::Invalid(format!(
                "{origin}: a format {} manifest must give weights_fingerprint",
                manifest.format
            )));
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the architectures, and that further backbones share the first
    /// one's encoder and have distinct, plain names.
    pub fn validate(&self) -> Result<()> {
        self.architecture.validate()?;
        if self.more_backbones.len() > MAX_MORE_BACKBONES {
            return Err(Error::Invalid(format!(
                "{} further backbones; a bundle holds at most {MAX_MORE_BACKBONES}",
                self.more_backbones.len()
            )));
        }
        if self.format < 2 && !self.more_backbones.is_empty() {
            return Err(Error::Invalid("further backbones need bundle format 2".into()));
        }
        let names = self.backbone_names();
        for (i, name) in names.iter().enumerate() {
            let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
            if name.is_empty() || name.len() > 64 || !name.chars().all(plain) {
                return Err(Error::Invalid(format!(
                    "backbone name {name:?}: use 1 to 64 of a-z, 0-9, _ and -"
                )));
            }
            if names[..i].contains(name) {
                return Err(Error::Invalid(format!("two backbones are named {name:?}")));
            }
        }
        for more in &self.more_backbones {
            more.architecture.validate()?;
            if !more.architecture.compressor.same_encoder(&self.architecture.compressor) {
                return Err(Error::Invalid(format!(
                    "backbone {:?} declares another edge encoder than the bundle's: one bundle serves one encoder's payloads",
                    more.name
                )));
            }
        }
        Ok(())
    }

    /// The backbones' names, the first backbone's first: what requests
    /// choose between.
    pub fn backbone_names(&self) -> Vec<String> {
        let first = self
            .backbone_name
            .clone()
            .unwrap_or_else(|| self.architecture.backbone.family().to_string());
        std::iter::once(first)
            .chain(self.more_backbones.iter().map(|m| m.name.clone()))
            .collect()
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
        let encoder = self.architecture.compressor.encoder_min_parameters();
        let more: f64 = self
            .more_backbones
            .iter()
            .map(|m| m.architecture.min_parameters(false) - encoder)
            .sum();
        let needed = 4.0 * (self.architecture.min_parameters(self.backbone_head) + more);
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

/// Whether a tensor belongs to the encoder side: what the device runs and
/// what the bytes of a payload depend on.
pub fn is_encoder_side(name: &str) -> bool {
    name.starts_with(names::ENCODER) || name.starts_with(names::PRIOR) || name.starts_with(names::TABLES)
}

/// The identity of the encoder side of `tensors` (g_a, the entropy
/// bottleneck's parameters, the CDF tables): each such tensor's name,
/// dtype, shape and bytes, in name order. Decoders and backbones do not
/// enter it, so a bundle that adds or retrains them keeps it, and the
/// payloads of its encoder stay valid.
pub fn encoder_fingerprint(tensors: &SafeTensors<'_>) -> ModelFingerprint {
    let mut encoder: Vec<_> = tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| is_encoder_side(name))
        .collect();
    encoder.sort_by(|a, b| a.0.cmp(&b.0));
    let mut parts: Vec<Vec<u8>> = Vec::with_capacity(4 * encoder.len());
    for (name, view) in encoder {
        parts.push(name.into_bytes());
        parts.push(format!("{:?}", view.dtype()).into_bytes());
        parts.push(view.shape().iter().flat_map(|d| (*d as u64).to_le_bytes()).collect());
        parts.push(view.data().to_vec());
    }
    ModelFingerprint::of_parts(parts.iter().map(Vec::as_slice))
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
        let whole = ModelFingerprint::of_parts([weights.as_slice()]);
        // Format 1's one fingerprint is the file's; format 2 has its own field.
        let expected = match &manifest.weights_fingerprint {
            Some(whole) if manifest.format >= 2 => whole,
            _ => &manifest.fingerprint,
        };
        if &whole.to_string() != expected {
            return Err(Error::Invalid(format!(
                "{} does not match its manifest (fingerprint {whole}, manifest says {expected}): the bundle was modified or damaged",
                path.display(),
            )));
        }
        let mut bundle = Self {
            dir: dir.to_path_buf(),
            manifest,
            weights,
            fingerprint: whole,
        };
        if bundle.manifest.format >= 2 {
            bundle.fingerprint = encoder_fingerprint(&bundle.tensors()?);
            if bundle.fingerprint.to_string() != bundle.manifest.fingerprint {
                return Err(Error::Invalid(format!(
                    "the encoder side of {} has fingerprint {}, but its manifest says {}: the manifest was edited",
                    path.display(),
                    bundle.fingerprint,
                    bundle.manifest.fingerprint
                )));
            }
        }
        Ok(bundle)
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
    manifest.format = BUNDLE_FORMAT;
    manifest.validate()?;
    frankensplit_fsio::check_replaceable(dir, &BUNDLE_FILES, force).map_err(Error::Invalid)?;
    let staging = frankensplit_fsio::Staging::new(dir).map_err(|e| Error::write(dir, e))?;
    let tmp = staging.path().to_path_buf();
    let weights_path = tmp.join(WEIGHTS);
    write_weights(&weights_path).map_err(|e| Error::Invalid(format!("cannot write the weights: {e}")))?;
    let bytes = std::fs::read(&weights_path).map_err(|e| Error::read(&weights_path, e))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Invalid(format!("the weights just written are not safetensors: {e}")))?;
    let fingerprint = encoder_fingerprint(&tensors);
    manifest.fingerprint = fingerprint.to_string();
    manifest.weights_fingerprint = Some(ModelFingerprint::of_parts([bytes.as_slice()]).to_string());
    let manifest_path = tmp.join(MANIFEST);
    std::fs::write(&manifest_path, manifest.to_toml()?).map_err(|e| Error::write(&manifest_path, e))?;
    staging.commit().map_err(|e| Error::write(dir, e))?;
    Ok(fingerprint)
}
