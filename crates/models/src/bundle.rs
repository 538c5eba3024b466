//! Model bundles: a directory users pass around with everything the split
//! pipeline needs, `model.toml` (architecture, preprocessing, entropy-table
//! provenance, fingerprint, optional labels) and `weights.safetensors`
//! (compressor, backbone tail, and the entropy coder's CDF tables). A bundle
//! may also hold the backbone's first stages (`backbone_head`), which lets a
//! server classify whole images: the image-offloading baseline.
//!
//! The fingerprint is derived from the weights file, so payloads carry the
//! identity of the exact weights and tables that produced them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use frankensplit_codec::{
    CdfTables, EntropyBottleneck as EntropyCoder, LatentShape, LikelihoodFormula, ModelFingerprint,
};
use frankensplit_preprocess::Preprocess;
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::frankensplit::{Compressor, CompressorConfig};
use crate::swin::{SwinConfig, SwinTransformer};
use crate::weights::load_into;

/// Version of the bundle layout this build writes and reads.
pub const BUNDLE_FORMAT: u32 = 1;
const MANIFEST: &str = "model.toml";
const WEIGHTS: &str = "weights.safetensors";

/// The networks of a split model and where they meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// The compressor (edge encoder, entropy bottleneck, decoder).
    pub compressor: CompressorConfig,
    /// The backbone whose tail classifies the restored features.
    pub backbone: SwinConfig,
    /// First backbone stage run on the server (timm 0.8's `split_idx`): the
    /// decoder restores the output of `layers[split_stage - 1]`.
    pub split_stage: usize,
}

impl Default for Architecture {
    /// The reference's main configuration: the full-size compressor in front
    /// of `swin_s3_base_224`, injected after `layers.1`.
    fn default() -> Self {
        Self {
            compressor: CompressorConfig::default(),
            backbone: SwinConfig::swin_s3_base_224(),
            split_stage: 2,
        }
    }
}

impl Architecture {
    /// Reads an architecture file (`[compressor]`, `[backbone]`, `split_stage`) and validates it.
    pub fn from_toml(text: &str) -> Result<Self> {
        let arch: Self = toml::from_str(text).map_err(|e| Error::Invalid(format!("invalid architecture: {e}")))?;
        arch.validate()?;
        Ok(arch)
    }

    /// Checks that the decoder's output fits the backbone at the split point.
    pub fn validate(&self) -> Result<()> {
        let stages = self.backbone.num_stages();
        if self.split_stage == 0 || self.split_stage >= stages {
            return Err(Error::Invalid(format!(
                "split_stage {} must lie in 1..{stages}",
                self.split_stage
            )));
        }
        let (tokens, dim) = self.backbone.stage_input_shape(self.split_stage);
        let side = self.compressor.latent_size() / 2;
        if self.compressor.target_dim != dim || side * side != tokens {
            return Err(Error::Invalid(format!(
                "the decoder produces {}×{} tokens of width {}, but backbone stage {} expects {tokens} tokens of width {dim}",
                side, side, self.compressor.target_dim, self.split_stage
            )));
        }
        if self.compressor.input_size != self.backbone.img_size {
            return Err(Error::Invalid(format!(
                "compressor input {} differs from backbone input {}",
                self.compressor.input_size, self.backbone.img_size
            )));
        }
        Ok(())
    }

    /// Shape of the latent for one image.
    pub fn latent_shape(&self) -> LatentShape {
        let side = self.compressor.latent_size() as u32;
        LatentShape::new(self.compressor.latent_channels as u32, side, side)
    }
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

impl Manifest {
    /// Reads and validates a bundle's `model.toml` without loading weights.
    pub fn read(dir: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(dir.join(MANIFEST))
            .map_err(|e| Error::Invalid(format!("{} is not a model bundle ({MANIFEST}: {e})", dir.display())))?;
        let manifest: Manifest =
            toml::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", dir.join(MANIFEST).display())))?;
        if manifest.format != BUNDLE_FORMAT {
            return Err(Error::Invalid(format!(
                "bundle format {} is not supported (this build reads {BUNDLE_FORMAT})",
                manifest.format
            )));
        }
        manifest.architecture.validate()?;
        Ok(manifest)
    }
}

/// A loaded bundle: models on a device plus the entropy coder.
#[derive(Debug)]
pub struct Bundle {
    /// Directory it was read from.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Identity carried by payloads.
    pub fingerprint: ModelFingerprint,
    /// Variables of [`Bundle::compressor`].
    pub compressor_vars: nn::VarStore,
    /// The compressor.
    pub compressor: Compressor,
    /// Variables of [`Bundle::backbone`].
    pub backbone_vars: nn::VarStore,
    /// The backbone tail (stages `split_stage..`).
    pub backbone: SwinTransformer,
    /// The backbone before the split (stages `..split_stage`), when the bundle has it.
    pub backbone_head: Option<SwinTransformer>,
    /// The entropy coder with the bundle's tables.
    pub coder: EntropyCoder,
}

/// Checks and entropy-decodes payloads for one model; cheap to clone and
/// thread-safe, unlike the networks.
#[derive(Debug, Clone)]
pub struct PayloadDecoder {
    /// The model's fingerprint; payloads of other models are refused.
    pub fingerprint: ModelFingerprint,
    /// The latent shape every payload must declare.
    pub shape: LatentShape,
    coder: EntropyCoder,
}

impl PayloadDecoder {
    /// Parses `payload`, refuses other models' payloads and other shapes,
    /// and decodes the dequantised latent (CHW).
    pub fn decode(&self, payload: &[u8]) -> Result<Vec<f32>> {
        decode_payload(&self.coder, self.fingerprint, self.shape, payload)
    }
}

/// Checks a payload against a model's fingerprint and latent shape and
/// entropy-decodes it.
fn decode_payload(
    coder: &EntropyCoder,
    fingerprint: ModelFingerprint,
    shape: LatentShape,
    payload: &[u8],
) -> Result<Vec<f32>> {
    let parsed = frankensplit_codec::Payload::parse_for(payload, fingerprint)?;
    if parsed.shape != shape {
        return Err(Error::Invalid(format!(
            "payload declares a {} latent, this model uses {shape}",
            parsed.shape
        )));
    }
    Ok(coder.decompress(parsed.string, parsed.shape, frankensplit_codec::DecodeLimits::default())?)
}

/// Everything [`write_bundle`] stores.
pub struct BundleContents<'a> {
    /// Architecture.
    pub architecture: &'a Architecture,
    /// Compressor variables (names as `Compressor::new` registers them).
    pub compressor_vars: &'a nn::VarStore,
    /// Backbone variables: the tail, and the head when `backbone_head`.
    pub backbone_vars: &'a nn::VarStore,
    /// Whether `backbone_vars` holds the head too.
    pub backbone_head: bool,
    /// Entropy tables.
    pub tables: &'a CdfTables,
    /// pmf formula of the tables.
    pub likelihood_formula: LikelihoodFormula,
    /// Their provenance.
    pub table_source: TableSource,
    /// Class names, possibly empty.
    pub labels: Vec<String>,
    /// Provenance text.
    pub source: String,
}

/// The files a bundle directory holds: all a directory may hold for
/// [`write_bundle`] to replace it without `force`.
pub const BUNDLE_FILES: [&str; 2] = [MANIFEST, WEIGHTS];

/// Writes a bundle into `dir`: staged in a sibling, flushed, then swapped
/// with the old directory in one step, so a crash leaves the old bundle or
/// the new. A `dir` holding anything but a bundle's files is refused unless
/// `force`.
pub fn write_bundle(dir: &Path, contents: BundleContents<'_>, force: bool) -> Result<ModelFingerprint> {
    contents.architecture.validate()?;
    frankensplit_fsio::check_replaceable(dir, &BUNDLE_FILES, force).map_err(Error::Invalid)?;
    let mut named: BTreeMap<String, Tensor> = BTreeMap::new();
    for (prefix, vs) in [
        ("compressor.", contents.compressor_vars),
        ("backbone.", contents.backbone_vars),
    ] {
        for (name, t) in vs.variables() {
            named.insert(
                format!("{prefix}{name}"),
                t.detach().to_device(Device::Cpu).contiguous(),
            );
        }
    }
    let (cdf, width, lengths, offsets) = contents.tables.to_compressai();
    let rows = lengths.len() as i64;
    named.insert(
        "entropy_tables.quantized_cdf".into(),
        Tensor::from_slice(&cdf).view([rows, width as i64]),
    );
    named.insert("entropy_tables.cdf_length".into(), Tensor::from_slice(&lengths));
    named.insert("entropy_tables.offset".into(), Tensor::from_slice(&offsets));

    let staging = frankensplit_fsio::Staging::new(dir).map_err(|e| io_error(dir, e))?;
    let tmp = staging.path().to_path_buf();
    let result = (|| -> Result<ModelFingerprint> {
        let list: Vec<(String, Tensor)> = named.into_iter().collect();
        Tensor::write_safetensors(&list, tmp.join(WEIGHTS))?;
        let bytes = std::fs::read(tmp.join(WEIGHTS)).map_err(|e| io_error(&tmp.join(WEIGHTS), e))?;
        let fingerprint = ModelFingerprint::of_parts([bytes.as_slice()]);
        let manifest = Manifest {
            format: BUNDLE_FORMAT,
            fingerprint: fingerprint.to_string(),
            architecture: contents.architecture.clone(),
            preprocess: Preprocess::for_input(contents.architecture.compressor.input_size as u32),
            likelihood_formula: contents.likelihood_formula,
            tables: contents.table_source,
            backbone_head: contents.backbone_head,
            labels: contents.labels,
            source: contents.source,
        };
        let text =
            toml::to_string_pretty(&manifest).map_err(|e| Error::Invalid(format!("cannot write the manifest: {e}")))?;
        std::fs::write(tmp.join(MANIFEST), text).map_err(|e| io_error(&tmp.join(MANIFEST), e))?;
        Ok(fingerprint)
    })();
    let fingerprint = result?;
    staging.commit().map_err(|e| io_error(dir, e))?;
    Ok(fingerprint)
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Invalid(format!("{}: {e}", path.display()))
}

impl Bundle {
    /// Reads a bundle directory onto `device`, checking the fingerprint and
    /// that every weight fits the declared architecture.
    pub fn open(dir: &Path, device: Device) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let weights_path = dir.join(WEIGHTS);
        let bytes = std::fs::read(&weights_path).map_err(|e| io_error(&weights_path, e))?;
        let fingerprint = ModelFingerprint::of_parts([bytes.as_slice()]);
        if fingerprint.to_string() != manifest.fingerprint {
            return Err(Error::Invalid(format!(
                "{} does not match its manifest (fingerprint {fingerprint}, manifest says {}): the bundle was modified or damaged",
                weights_path.display(),
                manifest.fingerprint
            )));
        }
        let mut tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&weights_path)?.into_iter().collect();
        let take_prefix = |tensors: &mut BTreeMap<String, Tensor>, prefix: &str| -> BTreeMap<String, Tensor> {
            let keys: Vec<String> = tensors.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
            keys.into_iter()
                .map(|k| (k[prefix.len()..].to_string(), tensors.remove(&k).expect("key listed")))
                .collect()
        };
        let arch = &manifest.architecture;
        let mut compressor_vars = nn::VarStore::new(device);
        let compressor = Compressor::new(&compressor_vars.root(), &arch.compressor);
        load_into(&mut compressor_vars, take_prefix(&mut tensors, "compressor."))?;
        let mut backbone_vars = nn::VarStore::new(device);
        let backbone = SwinTransformer::new(
            &backbone_vars.root(),
            &arch.backbone,
            arch.split_stage..arch.backbone.num_stages(),
        );
        let backbone_head = manifest
            .backbone_head
            .then(|| SwinTransformer::new(&backbone_vars.root(), &arch.backbone, 0..arch.split_stage));
        load_into(&mut backbone_vars, take_prefix(&mut tensors, "backbone."))?;
        let tables = take_prefix(&mut tensors, "entropy_tables.");
        let get = |name: &str| -> Result<Vec<i32>> {
            let t = tables
                .get(name)
                .ok_or_else(|| Error::Invalid(format!("bundle lacks entropy_tables.{name}")))?;
            Ok(Vec::<i32>::try_from(t.to_kind(Kind::Int).view([-1]))?)
        };
        let cdf_tensor = tables
            .get("quantized_cdf")
            .ok_or_else(|| Error::Invalid("bundle lacks entropy_tables.quantized_cdf".into()))?;
        let width = *cdf_tensor.size().last().unwrap_or(&0) as usize;
        let cdf_tables =
            CdfTables::from_compressai(&get("quantized_cdf")?, width, &get("cdf_length")?, &get("offset")?)?;
        let medians: Vec<f32> = Vec::<f32>::try_from(compressor.entropy_bottleneck.medians().to_device(Device::Cpu))?;
        let coder = EntropyCoder::from_tables(cdf_tables, medians)?;
        if !tensors.is_empty() {
            return Err(Error::WeightMismatch(format!(
                "  unexpected tensors: {:?}\n",
                tensors.keys().collect::<Vec<_>>()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            fingerprint,
            compressor_vars,
            compressor,
            backbone_vars,
            backbone,
            backbone_head,
            coder,
        })
    }

    /// The latent shape of one image.
    pub fn latent_shape(&self) -> LatentShape {
        self.manifest.architecture.latent_shape()
    }

    /// Runs the edge encoder on one preprocessed `3 × S × S` image and returns the latent (CHW).
    pub fn encode_latent(&self, image_chw: &[f32]) -> Result<Vec<f32>> {
        let size = self.manifest.architecture.compressor.input_size;
        if image_chw.len() as i64 != 3 * size * size {
            return Err(Error::Invalid(format!(
                "expected a 3×{size}×{size} input, got {} values",
                image_chw.len()
            )));
        }
        let x = Tensor::from_slice(image_chw)
            .view([1, 3, size, size])
            .to_device(self.compressor_vars.device());
        let y = tch::no_grad(|| nn::Module::forward(&self.compressor.g_a, &x));
        Ok(Vec::<f32>::try_from(y.to_device(Device::Cpu).view([-1]))?)
    }

    /// Edge side: image → payload (container with this bundle's fingerprint).
    pub fn compress(&self, image_chw: &[f32]) -> Result<Vec<u8>> {
        let latent = self.encode_latent(image_chw)?;
        let shape = self.latent_shape();
        let string = self.coder.compress(&latent, shape)?;
        Ok(frankensplit_codec::Payload {
            fingerprint: self.fingerprint,
            shape,
            string: &string,
        }
        .to_bytes())
    }

    /// The payload-decoding half of the server, free of libtorch so it can
    /// run on any thread.
    pub fn payload_decoder(&self) -> PayloadDecoder {
        PayloadDecoder {
            fingerprint: self.fingerprint,
            shape: self.latent_shape(),
            coder: self.coder.clone(),
        }
    }

    /// Server side: payload → restored features `(1, tokens, width)`.
    pub fn decompress(&self, payload: &[u8]) -> Result<Tensor> {
        let latent = decode_payload(&self.coder, self.fingerprint, self.latent_shape(), payload)?;
        self.restore_features(&[latent])
    }

    /// Runs the decoder on a batch of dequantised latents (CHW each):
    /// restored features `(B, tokens, width)`.
    pub fn restore_features(&self, latents: &[Vec<f32>]) -> Result<Tensor> {
        let shape = self.latent_shape();
        if let Some(bad) = latents.iter().find(|l| l.len() != shape.len()) {
            return Err(Error::Invalid(format!(
                "latent of {} values, expected {shape}",
                bad.len()
            )));
        }
        let side = i64::from(shape.height);
        let flat: Vec<f32> = latents.concat();
        let y_hat = Tensor::from_slice(&flat)
            .view([latents.len() as i64, i64::from(shape.channels), side, side])
            .to_device(self.compressor_vars.device());
        Ok(tch::no_grad(|| self.compressor.g_s.forward_t(&y_hat, false)))
    }

    /// Server side: restored features → logits `(B, classes)`.
    pub fn classify_features(&self, features: &Tensor) -> Tensor {
        tch::no_grad(|| self.backbone.forward_t(features, false))
    }

    /// The image-offloading path: a batch of preprocessed `3 × S × S` images
    /// (CHW each) through the whole backbone → logits `(B, classes)`. Fails
    /// when the bundle has no backbone head.
    pub fn classify_images(&self, images_chw: &[Vec<f32>]) -> Result<Tensor> {
        let head = self.backbone_head.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "bundle {} holds only the backbone after the split; convert it with the whole backbone's weights to classify images",
                self.dir.display()
            ))
        })?;
        let size = self.manifest.architecture.backbone.img_size;
        if let Some(bad) = images_chw.iter().find(|i| i.len() as i64 != 3 * size * size) {
            return Err(Error::Invalid(format!(
                "expected 3×{size}×{size} inputs, got {} values",
                bad.len()
            )));
        }
        let x = Tensor::from_slice(&images_chw.concat())
            .view([images_chw.len() as i64, 3, size, size])
            .to_device(self.backbone_vars.device());
        Ok(tch::no_grad(|| {
            self.backbone.forward_t(&head.forward_t(&x, false), false)
        }))
    }
}
