//! What a run keeps between steps and on disk: the models it trains, where
//! it stands ([`Progress`]), and the files it writes in its output
//! directory — checkpoints (weights, optimiser state and progress, replaced
//! atomically so a kill never leaves a torn one), the trained teacher and
//! the compressor bundle — and how a checkpoint is read back.

use std::collections::BTreeMap;
use std::path::Path;

use frankensplit_bundle::names::{BACKBONE, COMPRESSOR, ENCODER, PRIOR};
use frankensplit_codec::LikelihoodFormula;
use frankensplit_models::bundle::{write_bundle, BundleContents, TableSource};
use frankensplit_models::weights::{load_into, load_into_where, select};
use frankensplit_models::{Architecture, Backbone, Compressor};
use serde::{Deserialize, Serialize};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Tensor};

use crate::config::{RunConfig, StageConfig};
use crate::optim::Adam;
use crate::{Error, Result};

/// Where a run stands; saved inside every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Stage index.
    pub stage: usize,
    /// Epoch within the stage.
    pub epoch: usize,
    /// Next batch within the epoch.
    pub batch: usize,
    /// Steps taken in the whole run.
    pub global_step: u64,
    /// Optimiser steps in this stage.
    pub optimizer_step: i64,
    /// Best validation top-1 of a compressor stage so far.
    pub best_top1: Option<f64>,
    /// Best validation top-1 of the teacher so far.
    pub best_teacher_top1: Option<f64>,
}

// The files of a run's output directory.
/// The latest checkpoint.
pub(crate) const CHECKPOINT: &str = "checkpoint.safetensors";
/// The metrics log.
pub(crate) const METRICS: &str = "metrics.jsonl";
/// The kept teacher's weights.
pub(crate) const TEACHER: &str = "teacher.safetensors";
/// The kept compressor bundle (a directory).
pub(crate) const BUNDLE: &str = "bundle";

/// The compressor and the teacher backbone (split into the head the
/// compressor stands in for and the tail that classifies), with their weights.
pub(crate) struct Models {
    pub(crate) arch: Architecture,
    pub(crate) compressor_vars: VarStore,
    pub(crate) compressor: Compressor,
    pub(crate) backbone_vars: VarStore,
    pub(crate) head: Backbone,
    pub(crate) tail: Backbone,
}

impl Models {
    pub(crate) fn new(arch: &Architecture, device: Device) -> Self {
        let compressor_vars = VarStore::new(device);
        let compressor = Compressor::new(&compressor_vars.root(), &arch.compressor, arch.blueprint());
        let backbone_vars = VarStore::new(device);
        let n = arch.backbone.num_stages();
        let head = Backbone::new(&backbone_vars.root(), &arch.backbone, 0..arch.split_stage);
        let tail = Backbone::new(&backbone_vars.root(), &arch.backbone, arch.split_stage..n);
        Self {
            arch: arch.clone(),
            compressor_vars,
            compressor,
            backbone_vars,
            head,
            tail,
        }
    }

    pub(crate) fn named(vs: &VarStore) -> BTreeMap<String, Tensor> {
        vs.variables().into_iter().collect()
    }

    pub(crate) fn set_backbone_trainable(&mut self, trainable: bool) {
        if trainable {
            self.backbone_vars.unfreeze();
        } else {
            self.backbone_vars.freeze();
        }
    }

    /// The backbone's variables that belong to the head: the stem and the
    /// stages before the split.
    pub(crate) fn head_variables(&self) -> BTreeMap<String, Tensor> {
        let names = Backbone::head_names(&self.arch.backbone, self.arch.split_stage);
        Self::named(&self.backbone_vars)
            .into_iter()
            .filter(|(name, _)| names.contains(name))
            .collect()
    }

    pub(crate) fn logits(&self, x: &Tensor, train: bool) -> Tensor {
        self.tail.forward_t(&self.head.forward_t(x, train), train)
    }

    /// Loads the teacher's weights into the backbone: timm names, or a
    /// bundle's weights file (`backbone.` prefix); what the backbone lacks is ignored.
    pub(crate) fn load_teacher(&mut self, weights: &Path) -> Result<()> {
        let tensors = frankensplit_models::convert::read_state_dict(weights, Default::default())?;
        let prefix = if tensors.keys().any(|k| k.starts_with(BACKBONE)) {
            BACKBONE
        } else {
            ""
        };
        let mut selected = select(tensors, prefix, None);
        selected.retain(|k, _| self.backbone_vars.variables().contains_key(k));
        load_into(&mut self.backbone_vars, selected)?;
        Ok(())
    }

    /// Loads the compressor's weights from a bundle directory or a file
    /// whose tensors carry the `compressor.` prefix (a bundle's weights, a
    /// built-in model's compressor file, a run's checkpoint); every variable
    /// must be there with its shape. With `encoder_only`, only the edge
    /// encoder and the prior (`encoder_weights`); the decoder keeps its draw.
    pub(crate) fn load_compressor(&mut self, path: &Path, encoder_only: bool) -> Result<()> {
        let key = if encoder_only {
            "encoder_weights"
        } else {
            "compressor_weights"
        };
        let file = if path.is_dir() {
            path.join(frankensplit_bundle::WEIGHTS)
        } else {
            path.to_path_buf()
        };
        let tensors = frankensplit_models::convert::read_state_dict(&file, Default::default())
            .map_err(|e| Error::Config(format!("{key} {}: {e}", file.display())))?;
        let mut selected = select(tensors, COMPRESSOR, None);
        if selected.is_empty() {
            return Err(Error::Config(format!(
                "{key} {}: no `{COMPRESSOR}` tensors (a bundle's weights or a run's checkpoint has them)",
                file.display()
            )));
        }
        let encoder_side = [&ENCODER[COMPRESSOR.len()..], &PRIOR[COMPRESSOR.len()..]];
        let wanted = |name: &str| !encoder_only || encoder_side.iter().any(|p| name.starts_with(p));
        selected.retain(|name, _| wanted(name));
        load_into_where(&mut self.compressor_vars, selected, wanted)
            .map_err(|e| Error::Config(format!("{key} {} do not fit [compressor]:\n{e}", file.display())))
    }
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    frankensplit_fsio::write_file(path, bytes).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// Writes the checkpoint to a temporary file and renames it into place, so
/// that a kill at any moment leaves the previous checkpoint or the new one.
pub(crate) fn write_checkpoint(path: &Path, models: &Models, optimizer: &Adam, progress: &Progress) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (prefix, vs) in [(COMPRESSOR, &models.compressor_vars), (BACKBONE, &models.backbone_vars)] {
        for (name, t) in vs.variables() {
            tensors.push((format!("{prefix}{name}"), t.detach().to_device(Device::Cpu)));
        }
    }
    for (name, t) in optimizer.state() {
        tensors.push((format!("adam.{name}"), t.to_device(Device::Cpu)));
    }
    let state = serde_json::to_vec(progress).map_err(|e| Error::Data(e.to_string()))?;
    tensors.push(("progress".into(), Tensor::from_slice(&state)));
    write_safetensors_atomically(path, &tensors)
}

/// Writes tensors to a temporary file and renames it over `path`.
fn write_safetensors_atomically(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    Tensor::write_safetensors(tensors, &tmp)?;
    frankensplit_fsio::commit_file(&tmp, path).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// Reads a checkpoint: the run's progress and every tensor.
pub fn read_checkpoint(path: &Path) -> Result<(Progress, BTreeMap<String, Tensor>)> {
    if !path.exists() {
        return Err(Error::Config(format!(
            "{} does not exist: nothing to resume (start without --resume)",
            path.display()
        )));
    }
    let mut tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
    let state = tensors
        .remove("progress")
        .ok_or_else(|| Error::Data(format!("{} is not a training checkpoint", path.display())))?;
    let bytes = Vec::<u8>::try_from(&state)?;
    let progress = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Data(format!("{}: damaged progress record: {e}", path.display())))?;
    Ok((progress, tensors))
}

/// Reads the checkpoint at `path` into `models`; returns the run's progress
/// and the optimiser's saved state.
pub(crate) fn load_checkpoint(path: &Path, models: &mut Models) -> Result<(Progress, BTreeMap<String, Tensor>)> {
    let (progress, tensors) = read_checkpoint(path)?;
    let take = |prefix: &str| -> BTreeMap<String, Tensor> {
        tensors
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.to_string(), t.shallow_clone())))
            .collect()
    };
    load_into(&mut models.compressor_vars, take(COMPRESSOR))?;
    load_into(&mut models.backbone_vars, take(BACKBONE))?;
    Ok((progress, take("adam.")))
}

/// Writes the backbone's weights, the trained teacher.
pub(crate) fn write_teacher(path: &Path, models: &Models) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = models
        .backbone_vars
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.detach().to_device(Device::Cpu)))
        .collect();
    write_safetensors_atomically(path, &tensors)
}

/// The trained compressor with the teacher as a servable bundle (tables
/// rebuilt from the learned density, whole backbone included).
pub(crate) fn write_run_bundle(
    dir: &Path,
    models: &Models,
    classes: &[String],
    config: &RunConfig,
    stage: &StageConfig,
) -> Result<()> {
    let formula = LikelihoodFormula::Direct;
    let tables = models.compressor.entropy_bottleneck.density()?.build_tables(formula)?;
    write_bundle(
        dir,
        BundleContents {
            architecture: &models.arch,
            compressor_vars: &models.compressor_vars,
            backbone_vars: &models.backbone_vars,
            backbone_head: true,
            tables: &tables,
            likelihood_formula: formula,
            table_source: TableSource::Recomputed,
            labels: classes.to_vec(),
            source: format!(
                "trained by frankensplit train (seed {}, λ {}, kept after a {:?} stage)",
                config.seed, stage.lmbda, stage.kind
            ),
        },
        false,
    )?;
    Ok(())
}
