//! Model bundles: a directory users pass around with everything the split
//! pipeline needs, `model.toml` (architecture, preprocessing, entropy-table
//! provenance, fingerprint, optional labels) and `weights.safetensors`
//! (compressor, backbone tail, and the entropy coder's CDF tables). A bundle
//! may also hold the backbone's first stages (`backbone_head`), which lets a
//! server classify whole images: the image-offloading baseline.
//!
//! A bundle may serve further backbones from the same payloads: each a
//! decoder and a tail in front of the one edge encoder ([`merge_bundles`]
//! assembles them). Payloads carry the encoder side's fingerprint, so they
//! identify the encoder and tables that produced them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use frankensplit_bundle::{encoder_fingerprint, names, MoreBackbone, VerifiedBundle};
pub use frankensplit_bundle::{Architecture, Manifest, TableSource, BUNDLE_FILES, BUNDLE_FORMAT};
use frankensplit_codec::{CdfTables, LatentShape, LikelihoodFormula, ModelFingerprint, PayloadCodec};
use frankensplit_preprocess::Preprocess;
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

use crate::backbone::Backbone;
use crate::compressor::{Compressor, Decoder};
use crate::device::Precision;
use crate::error::{Error, Result};
use crate::weights::load_into;

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
    pub backbone: Backbone,
    /// The backbone before the split (stages `..split_stage`), when the bundle has it.
    pub backbone_head: Option<Backbone>,
    /// The bundle's payloads both ways (fingerprint, latent shape, entropy coder).
    pub payload: PayloadCodec,
    /// The number format of the server-side networks (decoder and backbone);
    /// f32 unless [`Bundle::set_precision`] changed it.
    pub precision: Precision,
    /// The further backbones, in the manifest's order.
    pub more: Vec<ServedBackbone>,
}

/// A further backbone of a bundle: its decoder and tail.
#[derive(Debug)]
pub struct ServedBackbone {
    /// Its name and architecture.
    pub spec: MoreBackbone,
    /// Variables of both networks (`compressor.g_s.…`, `backbone.…`).
    pub vars: nn::VarStore,
    /// Its decoder.
    pub decoder: Decoder,
    /// Its tail (stages from its split on).
    pub tail: Backbone,
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

/// Writes a bundle into `dir` (see [`frankensplit_bundle::write`]: staged,
/// then swapped in one step; a `dir` holding anything but a bundle's files
/// is refused unless `force`).
pub fn write_bundle(dir: &Path, contents: BundleContents<'_>, force: bool) -> Result<ModelFingerprint> {
    let mut named: BTreeMap<String, Tensor> = BTreeMap::new();
    for (prefix, vs) in [
        (names::COMPRESSOR, contents.compressor_vars),
        (names::BACKBONE, contents.backbone_vars),
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
        names::QUANTIZED_CDF.into(),
        Tensor::from_slice(&cdf).view([rows, width as i64]),
    );
    named.insert(names::CDF_LENGTH.into(), Tensor::from_slice(&lengths));
    named.insert(names::OFFSET.into(), Tensor::from_slice(&offsets));
    let manifest = Manifest {
        format: BUNDLE_FORMAT,
        fingerprint: String::new(),
        weights_fingerprint: None,
        backbone_name: None,
        more_backbones: Vec::new(),
        architecture: contents.architecture.clone(),
        preprocess: Preprocess::for_input(contents.architecture.compressor.input_size as u32),
        likelihood_formula: contents.likelihood_formula,
        tables: contents.table_source,
        backbone_head: contents.backbone_head,
        labels: contents.labels,
        source: contents.source,
    };
    let list: Vec<(String, Tensor)> = named.into_iter().collect();
    Ok(frankensplit_bundle::write(dir, manifest, force, |path| {
        Tensor::write_safetensors(&list, path)
    })?)
}

impl Bundle {
    /// Reads a bundle directory onto `device`, checking the fingerprint and
    /// that every weight fits the declared architecture.
    pub fn open(dir: &Path, device: Device) -> Result<Self> {
        let verified = VerifiedBundle::open(dir)?;
        let views = verified.tensors()?;
        let payload = verified.manifest.payload_codec(&views, verified.fingerprint)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in views.tensors() {
            tensors.insert(name, Tensor::try_from(view)?);
        }
        let take_prefix = |tensors: &mut BTreeMap<String, Tensor>, prefix: &str| -> BTreeMap<String, Tensor> {
            let keys: Vec<String> = tensors.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
            keys.into_iter()
                .map(|k| (k[prefix.len()..].to_string(), tensors.remove(&k).expect("key listed")))
                .collect()
        };
        let VerifiedBundle {
            manifest, fingerprint, ..
        } = verified;
        let arch = &manifest.architecture;
        let mut compressor_vars = nn::VarStore::new(device);
        let compressor = Compressor::new(&compressor_vars.root(), &arch.compressor, arch.blueprint());
        load_into(&mut compressor_vars, take_prefix(&mut tensors, names::COMPRESSOR))?;
        let mut backbone_vars = nn::VarStore::new(device);
        let backbone = Backbone::new(
            &backbone_vars.root(),
            &arch.backbone,
            arch.split_stage..arch.backbone.num_stages(),
        );
        let backbone_head = manifest
            .backbone_head
            .then(|| Backbone::new(&backbone_vars.root(), &arch.backbone, 0..arch.split_stage));
        load_into(&mut backbone_vars, take_prefix(&mut tensors, names::BACKBONE))?;
        let mut more = Vec::with_capacity(manifest.more_backbones.len());
        for spec in &manifest.more_backbones {
            let arch = &spec.architecture;
            let mut vars = nn::VarStore::new(device);
            let root = vars.root();
            let decoder = Decoder::new(
                &(&root / names::COMPRESSOR.trim_end_matches('.') / "g_s"),
                &arch.compressor,
                arch.blueprint(),
            );
            let tail = Backbone::new(
                &(&root / names::BACKBONE.trim_end_matches('.')),
                &arch.backbone,
                arch.split_stage..arch.backbone.num_stages(),
            );
            load_into(&mut vars, take_prefix(&mut tensors, &names::more(&spec.name)))?;
            more.push(ServedBackbone {
                spec: spec.clone(),
                vars,
                decoder,
                tail,
            });
        }
        // The tables were read by the payload codec.
        take_prefix(&mut tensors, names::TABLES);
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
            payload,
            precision: Precision::F32,
            more,
        })
    }

    /// The names of the backbones this bundle serves, the first first.
    pub fn backbone_names(&self) -> Vec<String> {
        self.manifest.backbone_names()
    }

    /// The index of the backbone called `name`, with an error that lists
    /// the names when there is none.
    pub fn backbone_index(&self, name: &str) -> Result<usize> {
        let names = self.backbone_names();
        names.iter().position(|n| n == name).ok_or_else(|| {
            Error::Invalid(format!(
                "this bundle serves no backbone {name:?}; it serves {}",
                names.join(", ")
            ))
        })
    }

    /// [`Bundle::restore_features`] by backbone `index`'s decoder.
    pub fn restore_features_for<L: AsRef<[f32]>>(&self, index: usize, latents: &[L]) -> Result<Tensor> {
        let y_hat = self.latent_batch(latents)?;
        let decoder = match index {
            0 => &self.compressor.g_s,
            i => &self.more_backbone(i)?.decoder,
        };
        Ok(tch::no_grad(|| decoder.forward_t(&y_hat, false)))
    }

    /// [`Bundle::classify_features`] by backbone `index`'s tail.
    pub fn classify_features_for(&self, index: usize, features: &Tensor) -> Result<Tensor> {
        let tail = match index {
            0 => &self.backbone,
            i => &self.more_backbone(i)?.tail,
        };
        Ok(tch::no_grad(|| tail.forward_t(features, false)))
    }

    fn more_backbone(&self, index: usize) -> Result<&ServedBackbone> {
        self.more
            .get(index.wrapping_sub(1))
            .ok_or_else(|| Error::Invalid(format!("backbone {index} of a bundle serving {}", self.more.len() + 1)))
    }

    /// The device the networks are on.
    pub fn device(&self) -> Device {
        self.compressor_vars.device()
    }

    /// Casts the server-side networks, the decoder `g_s` and the backbone
    /// (tail and head), to `precision`'s number format, weights and
    /// activations (as `module.to(dtype)` in PyTorch); their inputs are cast
    /// on the way in and the logits come out in that format. The edge
    /// encoder `g_a` stays in f32. A bundle in reduced precision cannot go
    /// back (the bits are gone): reopen it instead. f16 needs CUDA.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if precision == self.precision {
            return Ok(());
        }
        if self.precision != Precision::F32 {
            return Err(Error::Invalid(format!(
                "bundle {} is already in {}; reopen it for {precision}",
                self.dir.display(),
                self.precision
            )));
        }
        precision.check(self.device()).map_err(Error::Invalid)?;
        let kind = precision.kind();
        self.compressor_vars.root().sub("g_s").set_kind(kind);
        self.backbone_vars.set_kind(kind);
        for more in &mut self.more {
            more.vars.set_kind(kind);
        }
        self.precision = precision;
        Ok(())
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
        Ok(self.payload.compress(&self.encode_latent(image_chw)?)?)
    }

    /// Server side: payload → restored features (`(1, tokens, width)` for
    /// Swin, `(1, C, H, W)` for a CNN).
    pub fn decompress(&self, payload: &[u8]) -> Result<Tensor> {
        self.decompress_for(0, payload)
    }

    /// [`Bundle::decompress`] by backbone `index`'s decoder.
    pub fn decompress_for(&self, index: usize, payload: &[u8]) -> Result<Tensor> {
        let latent = self.payload.decompress(payload)?;
        self.restore_features_for(index, &[latent])
    }

    /// Runs the decoder on a batch of dequantised latents (CHW each):
    /// restored features (`(B, tokens, width)` for Swin, `(B, C, H, W)` for a CNN).
    pub fn restore_features(&self, latents: &[Vec<f32>]) -> Result<Tensor> {
        self.restore_features_for(0, latents)
    }

    /// Dequantised latents (CHW each) as one batch on the device, in the
    /// server's precision.
    fn latent_batch<L: AsRef<[f32]>>(&self, latents: &[L]) -> Result<Tensor> {
        let shape = self.latent_shape();
        if let Some(bad) = latents.iter().find(|l| l.as_ref().len() != shape.len()) {
            return Err(Error::Invalid(format!(
                "latent of {} values, expected {shape}",
                bad.as_ref().len()
            )));
        }
        let side = i64::from(shape.height);
        let flat: Vec<f32> = latents.iter().flat_map(|l| l.as_ref().iter().copied()).collect();
        Ok(Tensor::from_slice(&flat)
            .view([latents.len() as i64, i64::from(shape.channels), side, side])
            .to_device(self.device())
            .to_kind(self.precision.kind()))
    }

    /// Server side: restored features → logits `(B, classes)`, on the
    /// bundle's device in its precision.
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
        let size = self.manifest.architecture.backbone.img_size();
        if let Some(bad) = images_chw.iter().find(|i| i.len() as i64 != 3 * size * size) {
            return Err(Error::Invalid(format!(
                "expected 3×{size}×{size} inputs, got {} values",
                bad.len()
            )));
        }
        let x = Tensor::from_slice(&images_chw.concat())
            .view([images_chw.len() as i64, 3, size, size])
            .to_device(self.backbone_vars.device())
            .to_kind(self.precision.kind());
        Ok(tch::no_grad(|| {
            self.backbone.forward_t(&head.forward_t(&x, false), false)
        }))
    }
}

/// Writes into `out` one bundle that serves the backbones of all `parts`
/// (name, bundle directory) from one encoder's payloads: the first part
/// whole, under the first name; of every further part, its decoder and its
/// backbone's tail under [`names::more`]. The parts must share the encoder
/// side (g_a, prior and tables: the same encoder fingerprint), as bundles
/// whose decoders were trained by `decoder` stages against one encoder do,
/// and each must serve a single backbone. Labels, where given, must agree.
/// `out` is written as [`frankensplit_bundle::write`] writes (staged,
/// swapped in; a directory holding anything else refused unless `force`).
pub fn merge_bundles(out: &Path, parts: &[(String, PathBuf)], force: bool) -> Result<ModelFingerprint> {
    let Some((first_name, first_dir)) = parts.first() else {
        return Err(Error::Invalid("merging needs at least one bundle".into()));
    };
    let bundles = parts
        .iter()
        .map(|(_, dir)| VerifiedBundle::open(dir).map_err(Error::from))
        .collect::<Result<Vec<_>>>()?;
    let views = bundles
        .iter()
        .map(|b| b.tensors().map_err(Error::from))
        .collect::<Result<Vec<_>>>()?;
    let encoder = encoder_fingerprint(&views[0]);
    let mut manifest = bundles[0].manifest.clone();
    for ((name, dir), (bundle, tensors)) in parts.iter().zip(bundles.iter().zip(&views)) {
        let theirs = encoder_fingerprint(tensors);
        if theirs != encoder {
            return Err(Error::Invalid(format!(
                "{} has another edge encoder (fingerprint {theirs}) than {} ({encoder}): one bundle serves one encoder's payloads; train its decoder with a `decoder` stage from {}",
                dir.display(),
                first_dir.display(),
                first_dir.display()
            )));
        }
        if !bundle.manifest.more_backbones.is_empty() {
            return Err(Error::Invalid(format!(
                "{} ({name}) already serves several backbones; merge the single-backbone bundles",
                dir.display()
            )));
        }
        if !bundle.manifest.labels.is_empty() {
            if manifest.labels.is_empty() {
                manifest.labels = bundle.manifest.labels.clone();
            } else if manifest.labels != bundle.manifest.labels {
                return Err(Error::Invalid(format!(
                    "{} ({name}) labels its classes otherwise than the bundles before it",
                    dir.display()
                )));
            }
        }
    }
    let mut selected: Vec<(String, safetensors::tensor::TensorView<'_>)> = views[0].tensors();
    for ((name, _), (bundle, tensors)) in parts.iter().zip(bundles.iter().zip(&views)).skip(1) {
        let arch = &bundle.manifest.architecture;
        let head = Backbone::head_names(&arch.backbone, arch.split_stage);
        for (key, view) in tensors.tensors() {
            let tail = key.strip_prefix(names::BACKBONE).is_some_and(|k| !head.contains(k));
            if key.starts_with(names::DECODER) || tail {
                selected.push((format!("{}{key}", names::more(name)), view));
            }
        }
        manifest.more_backbones.push(MoreBackbone {
            name: name.clone(),
            architecture: arch.clone(),
        });
    }
    manifest.backbone_name = Some(first_name.clone());
    manifest.source = format!(
        "merged by frankensplit merge from {}",
        parts
            .iter()
            .map(|(name, dir)| format!("{name}={}", dir.display()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(frankensplit_bundle::write(out, manifest, force, |path| {
        safetensors::serialize_to_file(selected, &None, path)
    })?)
}
