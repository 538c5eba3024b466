//! Building a bundle from the reference's checkpoints: a torchdistill
//! checkpoint (`.pt`/`.pth`/`.ckpt`, the state dict under `model`) or a
//! safetensors file with the original key names, plus, when the checkpoint
//! lacks the backbone tail, timm weights for the backbone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use frankensplit_checkpoint::{Checkpoint, DType, NamedTensor};

/// What a checkpoint may make its reader allocate.
pub use frankensplit_checkpoint::Limits as CheckpointLimits;
use frankensplit_codec::{CdfTables, LikelihoodFormula, ModelFingerprint};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::backbone::Backbone;
use crate::bundle::{write_bundle, Architecture, BundleContents, TableSource};
use crate::compressor::Compressor;
use crate::error::{Error, Result};
use crate::weights::{is_derived_buffer, load_into, select};

/// What to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The reference checkpoint.
    pub checkpoint: PathBuf,
    /// timm weights of the whole backbone: needed when the checkpoint has no
    /// `backbone.*`, and the source of the backbone head (the stages before
    /// the split, which reference checkpoints drop).
    pub backbone_weights: Option<PathBuf>,
    /// Leave the backbone head out even when its weights are at hand: a
    /// smaller bundle that cannot classify whole images.
    pub tail_only: bool,
    /// The networks; the reference's main configuration by default.
    pub architecture: Architecture,
    /// pmf formula for rebuilding tables; by default `SignFlipped` for
    /// checkpoints with CompressAI ≤ 1.2.6 parameter names (the reference pins
    /// 1.2.2), `Direct` otherwise.
    pub likelihood_formula: Option<LikelihoodFormula>,
    /// Class names.
    pub labels: Vec<String>,
    /// What the checkpoint (an untrusted file) may make the reader allocate.
    pub checkpoint_limits: frankensplit_checkpoint::Limits,
    /// Replace the output even when it is not a bundle directory.
    pub force: bool,
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Fingerprint of the new bundle.
    pub fingerprint: ModelFingerprint,
    /// Whether the tables came from the checkpoint or were rebuilt.
    pub tables: TableSource,
    /// Formula recorded for the tables.
    pub likelihood_formula: LikelihoodFormula,
    /// Tensors read from the checkpoint.
    pub tensors_read: usize,
    /// Whether the bundle holds the backbone head (image classification).
    pub backbone_head: bool,
}

fn same_values(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.to_kind(Kind::Double).equal(&b.to_kind(Kind::Double))
}

/// Reads every tensor of a checkpoint file: safetensors by extension,
/// otherwise a `torch.save` zip whose state dict sits under `model` (or at
/// the root), read within `limits`.
pub fn read_state_dict(path: &Path, limits: frankensplit_checkpoint::Limits) -> Result<BTreeMap<String, Tensor>> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Ok(Tensor::read_safetensors(path)?.into_iter().collect());
    }
    let ckpt = Checkpoint::open_with(path, limits).map_err(|e| Error::Invalid(e.to_string()))?;
    let tensors = match ckpt.root().get("model") {
        Some(_) => ckpt.tensors_under(&["model"]),
        None => ckpt.tensors_under(&[]),
    }
    .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    tensors
        .into_iter()
        .map(|t| Ok((t.name.clone(), to_tensor(&t)?)))
        .collect()
}

fn to_tensor(t: &NamedTensor) -> Result<Tensor> {
    let kind = match t.dtype {
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    };
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(&t.data, &shape, kind)?)
}

/// Splits a reference state dict into compressor and backbone parts (our
/// names), checking the duplicated `reconstruction_layer.*` against the
/// decoder's copy and refusing anything else.
fn partition(state: BTreeMap<String, Tensor>) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, Tensor>)> {
    let mut compressor = Vec::new();
    let mut backbone = Vec::new();
    let mut recon = BTreeMap::new();
    let mut stray = Vec::new();
    for (key, t) in state {
        if let Some(k) = key.strip_prefix("compression_module.") {
            compressor.push((k.to_string(), t));
        } else if let Some(k) = key.strip_prefix("backbone.") {
            backbone.push((k.to_string(), t));
        } else if let Some(k) = key.strip_prefix("reconstruction_layer.") {
            recon.insert(k.to_string(), t);
        } else if !is_derived_buffer(&key) {
            stray.push(key);
        }
    }
    if !stray.is_empty() {
        return Err(Error::WeightMismatch(format!(
            "  keys outside compression_module., backbone. and reconstruction_layer. ({}): {}\n",
            stray.len(),
            stray.join(", ")
        )));
    }
    let compressor = select(compressor, "", None);
    for (k, t) in &recon {
        if is_derived_buffer(k) {
            continue;
        }
        let twin = compressor.get(&format!("g_s.final_layer.{k}"));
        if !twin.is_some_and(|c| same_values(c, t)) {
            return Err(Error::WeightMismatch(format!(
                "  reconstruction_layer.{k} differs from compression_module.g_s.final_layer.{k}\n"
            )));
        }
    }
    Ok((compressor, select(backbone, "", None)))
}

/// Converts a reference checkpoint into a bundle at `out`.
pub fn convert(options: &ConvertOptions, out: &Path) -> Result<ConvertReport> {
    let arch = &options.architecture;
    arch.validate()?;
    let state = read_state_dict(&options.checkpoint, options.checkpoint_limits)?;
    let tensors_read = state.len();
    let legacy_names = state.keys().any(|k| k.contains("entropy_bottleneck._matrix"));
    let (mut compressor_tensors, mut backbone_tensors) = partition(state)?;

    match &options.backbone_weights {
        Some(path) => {
            // The checkpoint's tail is what the compressor was trained
            // against; the file must be the same backbone, or the head and
            // tail of the image path would come from different models.
            let mut differing = Vec::new();
            for (key, t) in select(read_state_dict(path, options.checkpoint_limits)?, "", None) {
                match backbone_tensors.get(&key) {
                    Some(ours) if !same_values(ours, &t) => differing.push(key),
                    Some(_) => {}
                    None => {
                        backbone_tensors.insert(key, t);
                    }
                }
            }
            if !differing.is_empty() {
                return Err(Error::WeightMismatch(format!(
                    "  {} holds a different backbone than {} ({} tensors differ, e.g. {})\n",
                    path.display(),
                    options.checkpoint.display(),
                    differing.len(),
                    differing[0]
                )));
            }
        }
        None if backbone_tensors.is_empty() => {
            return Err(Error::Invalid(format!(
                "{} has no backbone.* weights; pass the backbone's timm weights (--backbone-weights)",
                options.checkpoint.display()
            )))
        }
        None => {}
    }
    let split = arch.split_stage;
    let head_names = Backbone::head_names(&arch.backbone, split);
    let backbone_head = !options.tail_only && head_names.iter().all(|k| backbone_tensors.contains_key(k));
    if !backbone_head {
        backbone_tensors.retain(|k, _| !head_names.contains(k));
    }

    let formula = options.likelihood_formula.unwrap_or(if legacy_names {
        LikelihoodFormula::SignFlipped
    } else {
        LikelihoodFormula::Direct
    });
    let stored = ["_quantized_cdf", "_cdf_length", "_offset"].map(|n| {
        compressor_tensors
            .remove(&format!("entropy_bottleneck.{n}"))
            .filter(|t| t.numel() > 0)
    });

    let mut compressor_vars = VarStore::new(Device::Cpu);
    let compressor = Compressor::new(&compressor_vars.root(), &arch.compressor, arch.blueprint());
    load_into(&mut compressor_vars, compressor_tensors)?;
    let mut backbone_vars = VarStore::new(Device::Cpu);
    let _backbone = Backbone::new(&backbone_vars.root(), &arch.backbone, split..arch.backbone.num_stages());
    let _head = backbone_head.then(|| Backbone::new(&backbone_vars.root(), &arch.backbone, 0..split));
    load_into(&mut backbone_vars, backbone_tensors)?;

    let (tables, source) = match stored {
        [Some(cdf), Some(lengths), Some(offsets)] => {
            let ints = |t: &Tensor| -> Result<Vec<i32>> { Ok(Vec::<i32>::try_from(t.to_kind(Kind::Int).view([-1]))?) };
            let width = *cdf.size().last().unwrap_or(&0) as usize;
            (
                CdfTables::from_compressai(&ints(&cdf)?, width, &ints(&lengths)?, &ints(&offsets)?)?,
                TableSource::Checkpoint,
            )
        }
        _ => (
            compressor.entropy_bottleneck.density()?.build_tables(formula)?,
            TableSource::Recomputed,
        ),
    };
    if tables.num_rows() as i64 != arch.compressor.latent_channels {
        return Err(Error::Invalid(format!(
            "entropy tables have {} rows for {} latent channels",
            tables.num_rows(),
            arch.compressor.latent_channels
        )));
    }

    let fingerprint = write_bundle(
        out,
        BundleContents {
            architecture: arch,
            compressor_vars: &compressor_vars,
            backbone_vars: &backbone_vars,
            backbone_head,
            tables: &tables,
            likelihood_formula: formula,
            table_source: source.clone(),
            labels: options.labels.clone(),
            source: format!("converted from {}", options.checkpoint.display()),
        },
        options.force,
    )?;
    Ok(ConvertReport {
        fingerprint,
        tables: source,
        likelihood_formula: formula,
        tensors_read,
        backbone_head,
    })
}
