//! ConvNeXt (v1) with timm's module names (`stem.{0,1}`,
//! `stages.{i}.downsample.{0,1}`, `stages.{i}.blocks.{j}.{conv_dw,norm,
//! mlp.fc1,mlp.fc2,gamma}`, `head.{norm,fc}`), buildable for a range of
//! stages so the head and tail of a split run separately. The architecture
//! is [`ConvNextConfig`] (frankensplit-bundle), presets named as timm names
//! them. The MLP is linear on channels-last tokens; timm's `conv_mlp`
//! checkpoints store the same weights as 1×1 kernels, which
//! [`crate::weights::select`] reshapes.

use std::ops::Range;

use tch::nn::{self, ModuleT};
use tch::Tensor;

pub use frankensplit_bundle::ConvNextConfig;

use crate::layers::{drop_path, drop_path_rates};

/// timm's ConvNeXt normalises with ε = 1e-6 everywhere.
fn layer_norm(p: nn::Path, channels: i64) -> nn::LayerNorm {
    let config = nn::LayerNormConfig {
        eps: 1e-6,
        ..Default::default()
    };
    nn::layer_norm(p, vec![channels], config)
}

/// timm's `LayerNorm2d`: a layer norm over the channels of `(B, C, H, W)`.
fn layer_norm_2d(x: &Tensor, norm: &nn::LayerNorm) -> Tensor {
    x.permute([0, 2, 3, 1]).apply(norm).permute([0, 3, 1, 2])
}

/// One block: depthwise 7×7, layer norm, MLP, layer scale, residual.
#[derive(Debug)]
struct Block {
    conv_dw: nn::Conv2D,
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    gamma: Tensor,
    drop_path: f64,
}

impl Block {
    fn new(p: &nn::Path, dim: i64, hidden: i64, drop_path: f64, ls_init_value: f64) -> Self {
        let dw = nn::ConvConfig {
            padding: 3,
            groups: dim,
            ..Default::default()
        };
        Self {
            conv_dw: nn::conv2d(p / "conv_dw", dim, dim, 7, dw),
            norm: layer_norm(p / "norm", dim),
            fc1: nn::linear(p / "mlp" / "fc1", dim, hidden, Default::default()),
            fc2: nn::linear(p / "mlp" / "fc2", hidden, dim, Default::default()),
            gamma: p.var("gamma", &[dim], nn::Init::Const(ls_init_value)),
            drop_path,
        }
    }
}

impl ModuleT for Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x
            .apply(&self.conv_dw)
            .permute([0, 2, 3, 1])
            .apply(&self.norm)
            .apply(&self.fc1)
            .gelu("none")
            .apply(&self.fc2)
            * &self.gamma;
        drop_path(y.permute([0, 3, 1, 2]), self.drop_path, train) + x
    }
}

/// One stage: an optional downsampling (layer norm, 2×2 stride-2
/// convolution), then its blocks.
#[derive(Debug)]
struct Stage {
    downsample: Option<(nn::LayerNorm, nn::Conv2D)>,
    blocks: Vec<Block>,
}

/// A ConvNeXt, or the part of it from stage `stages.start` to `stages.end - 1`.
///
/// With `stages.start == 0` it starts from the image (the patch stem);
/// otherwise from the feature map of [`ConvNextConfig::stage_input_shape`].
/// With `stages.end == num_stages` it ends with global average pooling,
/// `head.norm` and `head.fc` (logits); otherwise with the feature map after
/// stage `end - 1`.
#[derive(Debug)]
pub struct ConvNext {
    config: ConvNextConfig,
    stages: Range<usize>,
    stem: Option<(nn::Conv2D, nn::LayerNorm)>,
    layers: Vec<Stage>,
    head: Option<(nn::LayerNorm, nn::Linear)>,
}

impl ConvNext {
    /// Registers the modules of `stages` under `p` with timm's names.
    pub fn new(p: &nn::Path, config: &ConvNextConfig, stages: Range<usize>) -> Self {
        let n = config.num_stages();
        assert!(
            stages.start < stages.end && stages.end <= n,
            "stage range {stages:?} outside 0..{n}"
        );
        let total: i64 = config.depths.iter().sum();
        let rates = drop_path_rates(config.drop_path_rate, total as usize);
        let stem = (stages.start == 0).then(|| {
            let patch = nn::ConvConfig {
                stride: config.patch_size,
                ..Default::default()
            };
            (
                nn::conv2d(
                    p / "stem" / 0,
                    config.in_chans,
                    config.dims[0],
                    config.patch_size,
                    patch,
                ),
                layer_norm(p / "stem" / 1, config.dims[0]),
            )
        });
        let layers = stages
            .clone()
            .map(|i| {
                let sp = p / "stages" / i as i64;
                let dim = config.dims[i];
                let downsample = (i > 0).then(|| {
                    let ds = &sp / "downsample";
                    let strided = nn::ConvConfig {
                        stride: 2,
                        ..Default::default()
                    };
                    (
                        layer_norm(&ds / 0, config.dims[i - 1]),
                        nn::conv2d(&ds / 1, config.dims[i - 1], dim, 2, strided),
                    )
                });
                let first = config.depths[..i].iter().sum::<i64>() as usize;
                let blocks = (0..config.depths[i] as usize)
                    .map(|j| {
                        Block::new(
                            &(&sp / "blocks" / j as i64),
                            dim,
                            config.mlp_hidden(i),
                            rates[first + j],
                            config.ls_init_value,
                        )
                    })
                    .collect();
                Stage { downsample, blocks }
            })
            .collect();
        let head = (stages.end == n).then(|| {
            let features = config.num_features();
            (
                layer_norm(p / "head" / "norm", features),
                nn::linear(p / "head" / "fc", features, config.num_classes, Default::default()),
            )
        });
        Self {
            config: config.clone(),
            stages,
            stem,
            layers,
            head,
        }
    }

    /// The architecture.
    pub fn config(&self) -> &ConvNextConfig {
        &self.config
    }

    /// The stages this instance holds.
    pub fn stages(&self) -> Range<usize> {
        self.stages.clone()
    }

    /// The feature map `(B, C, H, W)` after the last stage held.
    pub fn forward_features_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_probed(x, train).0
    }

    /// [`ConvNext::forward_features_t`] plus every held stage's output, in
    /// order: the layers an XGradCAM map of a ConvNeXt reads.
    pub fn forward_probed(&self, x: &Tensor, train: bool) -> (Tensor, Vec<Tensor>) {
        let mut x = match &self.stem {
            Some((conv, norm)) => layer_norm_2d(&x.apply(conv), norm),
            None => x.shallow_clone(),
        };
        let mut probes = Vec::with_capacity(self.layers.len());
        for stage in &self.layers {
            if let Some((norm, conv)) = &stage.downsample {
                x = layer_norm_2d(&x, norm).apply(conv);
            }
            for block in &stage.blocks {
                x = block.forward_t(&x, train);
            }
            probes.push(x.shallow_clone());
        }
        (x, probes)
    }

    /// Logits from features of [`ConvNext::forward_features_t`] (global
    /// average pool, `head.norm`, `head.fc`) when this instance holds the
    /// last stage; otherwise the features.
    pub fn classify_features(&self, features: &Tensor) -> Tensor {
        match &self.head {
            Some((norm, fc)) => features
                .mean_dim([2, 3].as_slice(), false, features.kind())
                .apply(norm)
                .apply(fc),
            None => features.shallow_clone(),
        }
    }
}

impl ModuleT for ConvNext {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.classify_features(&self.forward_features_t(x, train))
    }
}
