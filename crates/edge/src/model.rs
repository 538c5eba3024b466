//! The device's view of a model bundle: the input pipeline, the encoder g_a
//! and the entropy coder, read from `model.toml` and `weights.safetensors`
//! without libtorch (the rest of the bundle, the server's part, is skipped).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use frankensplit_codec::{CdfTables, EntropyBottleneck, LatentShape, ModelFingerprint, Payload};
use frankensplit_preprocess::Preprocess;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::encoder::{Encoder, EncoderSpec, Workspace};
use crate::int8::{BlockRanges, QuantizedEncoder, QuantizedWorkspace};

/// Where `frankensplit-edge calibrate` writes a bundle's int8 calibration by default.
pub const CALIBRATION_FILE: &str = "int8-calibration.json";

/// The ranges the int8 encoder quantizes with, observed on a few images;
/// tied to one model's weights by their fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Int8Calibration {
    /// The weights it was made for.
    pub fingerprint: String,
    /// Images it saw.
    pub images: usize,
    /// Per block of g_a.
    pub blocks: Vec<BlockRanges>,
}

impl Int8Calibration {
    /// Reads a calibration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not an int8 calibration", path.display()))
    }

    /// Writes it as JSON (through a temporary file).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::write_atomically(path, serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// The bundle layout this crate reads (`frankensplit_models::bundle::BUNDLE_FORMAT`).
pub const BUNDLE_FORMAT: u32 = 1;

/// The fields of `model.toml` the device needs; the others are ignored.
#[derive(Deserialize)]
struct ManifestView {
    format: u32,
    fingerprint: String,
    architecture: ArchitectureView,
    preprocess: Preprocess,
}

#[derive(Deserialize)]
struct ArchitectureView {
    compressor: EncoderSpec,
}

/// A bundle's device side.
#[derive(Debug)]
pub struct EdgeModel {
    /// Directory it was read from.
    pub dir: PathBuf,
    /// Identity carried by payloads.
    pub fingerprint: ModelFingerprint,
    /// Input pipeline.
    pub preprocess: Preprocess,
    /// g_a, with its blocks folded where that is cheaper.
    pub encoder: Encoder,
    /// Threads g_a may use (1 by default).
    pub threads: usize,
    /// g_a's shape, from the manifest.
    pub spec: EncoderSpec,
    coder: EntropyBottleneck,
    /// g_a's buffers, reused by every image.
    workspace: Mutex<Workspace>,
    /// g_a in int8 with its buffers, when chosen ([`EdgeModel::use_int8`]).
    int8: Option<(QuantizedEncoder, Mutex<QuantizedWorkspace>)>,
}

impl EdgeModel {
    /// Reads a bundle directory, checking the weights against the manifest's
    /// fingerprint and the encoder's shapes against the architecture.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest_path = dir.join("model.toml");
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("{} is not a model bundle", dir.display()))?;
        let manifest: ManifestView =
            toml::from_str(&text).with_context(|| format!("invalid {}", manifest_path.display()))?;
        if manifest.format != BUNDLE_FORMAT {
            bail!(
                "bundle format {} is not supported (this build reads {BUNDLE_FORMAT})",
                manifest.format
            );
        }
        let weights_path = dir.join("weights.safetensors");
        let bytes = std::fs::read(&weights_path).with_context(|| format!("cannot read {}", weights_path.display()))?;
        let fingerprint = ModelFingerprint::of_parts([bytes.as_slice()]);
        if fingerprint.to_string() != manifest.fingerprint {
            bail!(
                "{} does not match its manifest (fingerprint {fingerprint}, manifest says {}): the bundle was modified or damaged",
                weights_path.display(),
                manifest.fingerprint
            );
        }
        let tensors =
            SafeTensors::deserialize(&bytes).with_context(|| format!("{} is corrupt", weights_path.display()))?;
        let arch = &manifest.architecture.compressor;
        let mut encoder = Encoder::from_torch(arch, |name| floats(&tensors, &format!("compressor.g_a.{name}")))?;
        encoder.prepare(arch.input_size);
        let (quantiles, quantile_shape) = floats(&tensors, "compressor.entropy_bottleneck.quantiles")?;
        if quantile_shape != [arch.latent_channels, 1, 3] {
            bail!("entropy bottleneck quantiles have shape {quantile_shape:?}");
        }
        let medians: Vec<f32> = quantiles.chunks_exact(3).map(|q| q[1]).collect();
        let (cdf, cdf_shape) = ints(&tensors, "entropy_tables.quantized_cdf")?;
        let (lengths, _) = ints(&tensors, "entropy_tables.cdf_length")?;
        let (offsets, _) = ints(&tensors, "entropy_tables.offset")?;
        let width = cdf_shape.last().copied().unwrap_or(0);
        let tables = CdfTables::from_compressai(&cdf, width, &lengths, &offsets)?;
        let coder = EntropyBottleneck::from_tables(tables, medians)?;
        let workspace = Mutex::new(encoder.workspace(arch.input_size));
        Ok(Self {
            dir: dir.to_path_buf(),
            fingerprint,
            preprocess: manifest.preprocess,
            encoder,
            threads: 1,
            spec: arch.clone(),
            coder,
            workspace,
            int8: None,
        })
    }

    /// Ranges of g_a's tensors on `images` (preprocessed, `3 × S × S`) for the int8 encoder.
    pub fn calibrate(&self, images: &[Vec<f32>]) -> Result<Int8Calibration> {
        Ok(Int8Calibration {
            fingerprint: self.fingerprint.to_string(),
            images: images.len(),
            blocks: QuantizedEncoder::calibrate(&self.encoder, images, self.spec.input_size, self.threads)?,
        })
    }

    /// Runs g_a in int8 from now on, quantized with `calibration`, which
    /// must have been made for this model's weights.
    pub fn use_int8(&mut self, calibration: &Int8Calibration) -> Result<()> {
        if calibration.fingerprint != self.fingerprint.to_string() {
            bail!(
                "the int8 calibration was made for model {}, this is {}: calibrate again for this model",
                calibration.fingerprint,
                self.fingerprint
            );
        }
        let quantized = QuantizedEncoder::new(&self.encoder, &calibration.blocks)?;
        let workspace = Mutex::new(quantized.workspace(self.spec.input_size));
        self.int8 = Some((quantized, workspace));
        Ok(())
    }

    /// Whether g_a runs in int8.
    pub fn is_int8(&self) -> bool {
        self.int8.is_some()
    }

    /// Shape of one image's latent.
    pub fn latent_shape(&self) -> LatentShape {
        let side = (self.spec.input_size / 8) as u32;
        LatentShape::new(self.spec.latent_channels as u32, side, side)
    }

    /// The entropy coder (tables and per-channel medians).
    pub fn coder(&self) -> &EntropyBottleneck {
        &self.coder
    }

    /// Side of the (square) input the encoder takes.
    pub fn input_size(&self) -> usize {
        self.spec.input_size
    }

    /// Runs g_a on one preprocessed `3 × S × S` image: the CHW latent.
    pub fn encode_latent(&self, image_chw: &[f32]) -> Result<Vec<f32>> {
        if let Some((quantized, workspace)) = &self.int8 {
            let mut workspace = workspace.lock().unwrap_or_else(PoisonError::into_inner);
            return Ok(quantized.run(&mut workspace, image_chw, self.threads)?.0);
        }
        let mut workspace = self.workspace.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.encoder.fits(&workspace) {
            *workspace = self.encoder.workspace(self.spec.input_size);
        }
        Ok(self.encoder.run(&mut workspace, image_chw, self.threads)?.0)
    }

    /// Image (preprocessed) → payload: g_a, rounding against the medians,
    /// rANS, and the container with this model's fingerprint.
    pub fn compress(&self, image_chw: &[f32]) -> Result<Vec<u8>> {
        let latent = self.encode_latent(image_chw)?;
        let shape = self.latent_shape();
        let string = self.coder.compress(&latent, shape)?;
        Ok(Payload {
            fingerprint: self.fingerprint,
            shape,
            string: &string,
        }
        .to_bytes())
    }
}

fn view<'a>(tensors: &'a SafeTensors<'a>, name: &str, dtype: Dtype) -> Result<TensorView<'a>> {
    let view = tensors
        .tensor(name)
        .with_context(|| format!("the bundle lacks {name}"))?;
    if view.dtype() != dtype {
        bail!("{name} is {:?}, expected {dtype:?}", view.dtype());
    }
    Ok(view)
}

/// A 4-byte little-endian tensor's values and shape.
fn read<T>(
    tensors: &SafeTensors<'_>,
    name: &str,
    dtype: Dtype,
    from_bytes: fn([u8; 4]) -> T,
) -> Result<(Vec<T>, Vec<usize>)> {
    let view = view(tensors, name, dtype)?;
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| from_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((values, view.shape().to_vec()))
}

fn floats(tensors: &SafeTensors<'_>, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    read(tensors, name, Dtype::F32, f32::from_le_bytes)
}

fn ints(tensors: &SafeTensors<'_>, name: &str) -> Result<(Vec<i32>, Vec<usize>)> {
    read(tensors, name, Dtype::I32, i32::from_le_bytes)
}
