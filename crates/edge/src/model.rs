//! The device's view of a model bundle: the input pipeline, the encoder g_a
//! and the payload codec, read through `frankensplit-bundle` without
//! libtorch (the rest of the bundle, the server's part, is skipped).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use anyhow::{bail, Result};
use frankensplit_bundle::{names, tables, CompressorConfig, VerifiedBundle};
use frankensplit_codec::{EntropyBottleneck, LatentShape, ModelFingerprint, PayloadCodec};
use frankensplit_preprocess::{Preprocess, RgbImage};

use crate::calibration::Int8Calibration;
use crate::encoder::{Encoder, Workspace};
use crate::int8::{QuantizedEncoder, QuantizedWorkspace};

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
    /// The compressor's architecture, from the manifest (g_a's shape).
    pub config: CompressorConfig,
    payload: PayloadCodec,
    /// g_a's buffers, reused by every image.
    workspace: Mutex<Workspace>,
    /// g_a in int8 with its buffers, when chosen ([`EdgeModel::use_int8`]).
    int8: Option<(QuantizedEncoder, Mutex<QuantizedWorkspace>)>,
}

impl EdgeModel {
    /// Reads a bundle directory, checking the weights against the manifest's
    /// fingerprint and the encoder's shapes against the architecture.
    pub fn open(dir: &Path) -> Result<Self> {
        let verified = VerifiedBundle::open(dir)?;
        let tensors = verified.tensors()?;
        let payload = verified.manifest.payload_codec(&tensors, verified.fingerprint)?;
        let config = verified.manifest.architecture.compressor.clone();
        let input_size = config.input_size as usize;
        let mut encoder = Encoder::from_torch(&config, |name| {
            Ok(tables::floats(&tensors, &format!("{}{name}", names::ENCODER))?)
        })?;
        encoder.prepare(input_size);
        let workspace = Mutex::new(encoder.workspace(input_size));
        Ok(Self {
            dir: dir.to_path_buf(),
            fingerprint: verified.fingerprint,
            preprocess: verified.manifest.preprocess.clone(),
            encoder,
            threads: 1,
            config,
            payload,
            workspace,
            int8: None,
        })
    }

    /// Ranges of g_a's tensors on `images` (preprocessed, `3 × S × S`) for the int8 encoder.
    pub fn calibrate(&self, images: &[Vec<f32>]) -> Result<Int8Calibration> {
        Ok(Int8Calibration {
            fingerprint: self.fingerprint.to_string(),
            images: images.len(),
            blocks: QuantizedEncoder::calibrate(&self.encoder, images, self.input_size(), self.threads)?,
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
        let workspace = Mutex::new(quantized.workspace(self.input_size()));
        self.int8 = Some((quantized, workspace));
        Ok(())
    }

    /// Whether g_a runs in int8.
    pub fn is_int8(&self) -> bool {
        self.int8.is_some()
    }

    /// Shape of one image's latent.
    pub fn latent_shape(&self) -> LatentShape {
        self.payload.shape
    }

    /// The entropy coder (tables and per-channel medians).
    pub fn coder(&self) -> &EntropyBottleneck {
        self.payload.coder()
    }

    /// The model's payloads both ways.
    pub fn payload_codec(&self) -> &PayloadCodec {
        &self.payload
    }

    /// Side of the (square) input the encoder takes.
    pub fn input_size(&self) -> usize {
        self.config.input_size as usize
    }

    /// Runs g_a on one preprocessed `3 × S × S` image: the CHW latent.
    pub fn encode_latent(&self, image_chw: &[f32]) -> Result<Vec<f32>> {
        if let Some((quantized, workspace)) = &self.int8 {
            let mut workspace = workspace.lock().unwrap_or_else(PoisonError::into_inner);
            return Ok(quantized.run(&mut workspace, image_chw, self.threads)?.0);
        }
        let mut workspace = self.workspace.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.encoder.fits(&workspace) {
            *workspace = self.encoder.workspace(self.input_size());
        }
        Ok(self.encoder.run(&mut workspace, image_chw, self.threads)?.0)
    }

    /// Image (preprocessed) → payload: g_a, rounding against the medians,
    /// rANS, and the container with this model's fingerprint.
    pub fn compress(&self, image_chw: &[f32]) -> Result<Vec<u8>> {
        Ok(self.payload.compress(&self.encode_latent(image_chw)?)?)
    }
}

/// Preprocesses and encodes one image: the payload and the edge compute time.
pub fn encode_image(model: &EdgeModel, path: &Path) -> Result<(Vec<u8>, f64)> {
    let image = RgbImage::open(path)?;
    let start = Instant::now();
    let input = model.preprocess.apply(&image)?;
    let payload = model.compress(&input)?;
    Ok((payload, start.elapsed().as_secs_f64() * 1e3))
}

/// Bits per pixel of the model's input crop for a payload of `bytes`.
pub fn bpp(model: &EdgeModel, bytes: usize) -> f64 {
    let crop = f64::from(model.preprocess.crop);
    bytes as f64 * 8.0 / (crop * crop)
}
