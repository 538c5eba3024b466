//! Mapping checkpoint tensors onto our modules, in one place: CompressAI's two
//! parameter namings, timm's two Swin stage layouts, timm's two ConvNeXt MLP
//! shapes, and the buffers that are derived from the architecture (or read
//! by no forward pass here) rather than loaded.

use std::collections::{BTreeMap, BTreeSet};

use tch::nn::VarStore;
use tch::Tensor;

use crate::error::{Error, Result};

/// Where a Swin checkpoint keeps its patch merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwinLayout {
    /// timm ≤ 0.8: `layers.{i}.downsample` ends stage `i` (our layout).
    EndOfStage,
    /// timm ≥ 0.9: `layers.{i}.downsample` starts stage `i`; the head is `head.fc`.
    StartOfStage,
}

impl SwinLayout {
    /// Tells the layouts apart by the last stage present: it never has a
    /// downsample at its end, but does at its start (stage 0 aside).
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        let mut stages = BTreeSet::new();
        let mut with_downsample = BTreeSet::new();
        for key in keys {
            if let Some(stage) = stage_index(key) {
                stages.insert(stage);
                if key.contains(".downsample.") {
                    with_downsample.insert(stage);
                }
            }
        }
        match stages.last() {
            Some(last) if with_downsample.contains(last) => Self::StartOfStage,
            _ => Self::EndOfStage,
        }
    }
}

fn stage_index(key: &str) -> Option<usize> {
    let rest = key.split("layers.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// Buffers that the architecture determines, or that nothing here reads
/// (batch norms' `num_batches_tracked`: the momentum is fixed), and that
/// loading therefore skips.
pub fn is_derived_buffer(key: &str) -> bool {
    const DERIVED: [&str; 8] = [
        "num_batches_tracked",
        "relative_position_index",
        "attn_mask",
        "entropy_bottleneck.target",
        "likelihood_lower_bound.bound",
        "_offset",
        "_quantized_cdf",
        "_cdf_length",
    ];
    DERIVED.iter().any(|d| key.ends_with(d))
}

/// Our name for a checkpoint key: CompressAI ≤ 1.2.6's `_matrix{i}`, `_bias{i}`
/// and `_factor{i}` become `matrices.{i}`, `biases.{i}`, `factors.{i}`; in the
/// timm ≥ 0.9 layout `layers.{i}.downsample` becomes `layers.{i-1}.downsample`
/// and `head.fc` becomes `head`.
pub fn normalize_key(key: &str, layout: SwinLayout) -> String {
    let mut key = key.to_string();
    for (old, new) in [
        ("._matrix", ".matrices."),
        ("._bias", ".biases."),
        ("._factor", ".factors."),
    ] {
        if let Some(pos) = key.find(old) {
            let digits = &key[pos + old.len()..];
            if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
                key = format!("{}{new}{digits}", &key[..pos]);
            }
        }
    }
    if layout == SwinLayout::StartOfStage {
        if let (Some(stage), true) = (stage_index(&key), key.contains(".downsample.")) {
            if stage > 0 {
                key = key.replacen(
                    &format!("layers.{stage}.downsample."),
                    &format!("layers.{}.downsample.", stage - 1),
                    1,
                );
            }
        }
        if let Some(rest) = key.strip_prefix("head.fc.") {
            key = format!("head.{rest}");
        }
    }
    key
}

/// Our shape for a checkpoint tensor: timm's `conv_mlp` ConvNeXts (the
/// atto…nano presets) keep each block's MLP as 1×1 convolutions,
/// `mlp.fc{1,2}.weight` of shape `(O, I, 1, 1)`; ours are the same weights
/// as linear layers, `(O, I)`.
fn normalize_shape(key: &str, t: Tensor) -> Tensor {
    let size = t.size();
    let is_mlp = key.ends_with(".mlp.fc1.weight") || key.ends_with(".mlp.fc2.weight");
    if is_mlp && size.len() == 4 && size[2] == 1 && size[3] == 1 {
        t.reshape([size[0], size[1]])
    } else {
        t
    }
}

/// Copies `tensors` (already under our names) into the variables of `vs`.
/// Every variable must be present with its exact shape and every tensor must
/// be used, derived buffers aside; otherwise nothing is copied and the error
/// lists all missing, unexpected and mis-shaped keys at once.
pub fn load_into(vs: &mut VarStore, tensors: BTreeMap<String, Tensor>) -> Result<()> {
    load_into_where(vs, tensors, |_| true)
}

/// [`load_into`] for the variables of `vs` whose names `wanted` accepts;
/// the others keep their values.
pub fn load_into_where(
    vs: &mut VarStore,
    tensors: BTreeMap<String, Tensor>,
    wanted: impl Fn(&str) -> bool,
) -> Result<()> {
    let mut vars = vs.variables();
    vars.retain(|name, _| wanted(name));
    let mut missing = Vec::new();
    let mut wrong_shape = Vec::new();
    for (name, var) in &vars {
        match tensors.get(name) {
            None => missing.push(name.clone()),
            Some(t) if t.size() != var.size() => {
                wrong_shape.push(format!("{name}: checkpoint {:?}, model {:?}", t.size(), var.size()))
            }
            Some(_) => {}
        }
    }
    let unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !vars.contains_key(*k) && !is_derived_buffer(k))
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() || !wrong_shape.is_empty() {
        let mut report = String::new();
        let mut section = |title: &str, items: Vec<String>| {
            if !items.is_empty() {
                report.push_str(&format!("  {title} ({}):\n", items.len()));
                for item in items {
                    report.push_str(&format!("    {item}\n"));
                }
            }
        };
        missing.sort();
        section("missing from the checkpoint", missing);
        section("not in the model", unexpected.into_iter().cloned().collect());
        section("wrong shape", wrong_shape);
        return Err(Error::WeightMismatch(report));
    }
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let source = &tensors[&name];
            var.copy_(&source.to_kind(var.kind()).to_device(var.device()));
        }
    });
    Ok(())
}

/// Tensors of a safetensors file, or of the entries of one under `prefix`
/// (with the prefix removed), normalised for `layout`.
pub fn read_safetensors(
    path: &std::path::Path,
    prefix: &str,
    layout: Option<SwinLayout>,
) -> Result<BTreeMap<String, Tensor>> {
    let tensors = Tensor::read_safetensors(path)?;
    Ok(select(tensors, prefix, layout))
}

/// Keeps the entries under `prefix`, strips it, and normalises names and
/// shapes; the Swin layout is detected from the keys when not given.
pub fn select(
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    prefix: &str,
    layout: Option<SwinLayout>,
) -> BTreeMap<String, Tensor> {
    let selected: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix(prefix).map(|k| (k.to_string(), t)))
        .collect();
    let layout = layout.unwrap_or_else(|| SwinLayout::detect(selected.iter().map(|(k, _)| k.as_str())));
    selected
        .into_iter()
        .map(|(k, t)| {
            let t = normalize_shape(&k, t);
            (normalize_key(&k, layout), t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressai_legacy_names_are_renamed() {
        let l = SwinLayout::EndOfStage;
        assert_eq!(
            normalize_key("entropy_bottleneck._matrix3", l),
            "entropy_bottleneck.matrices.3"
        );
        assert_eq!(
            normalize_key("entropy_bottleneck._bias0", l),
            "entropy_bottleneck.biases.0"
        );
        assert_eq!(
            normalize_key("entropy_bottleneck._factor2", l),
            "entropy_bottleneck.factors.2"
        );
        assert_eq!(
            normalize_key("entropy_bottleneck._offset", l),
            "entropy_bottleneck._offset"
        );
        assert_eq!(normalize_key("g_a.rb1.conv1.weight", l), "g_a.rb1.conv1.weight");
    }

    #[test]
    fn timm09_layout_moves_downsamples_back_one_stage() {
        let keys = [
            "layers.2.downsample.norm.weight",
            "layers.2.blocks.0.norm1.weight",
            "layers.3.downsample.reduction.weight",
            "head.fc.weight",
        ];
        let layout = SwinLayout::detect(keys);
        assert_eq!(layout, SwinLayout::StartOfStage);
        assert_eq!(normalize_key(keys[2], layout), "layers.2.downsample.reduction.weight");
        assert_eq!(normalize_key(keys[0], layout), "layers.1.downsample.norm.weight");
        assert_eq!(normalize_key(keys[3], layout), "head.weight");
        let old = [
            "layers.2.downsample.norm.weight",
            "layers.3.blocks.0.norm1.weight",
            "head.weight",
        ];
        assert_eq!(SwinLayout::detect(old), SwinLayout::EndOfStage);
    }
}
