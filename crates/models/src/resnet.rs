//! ResNet with timm's module names (`conv1`, `bn1`, `layer{i}.{j}.conv1`,
//! `layer{i}.{j}.downsample.{0,1}`, `fc`), buildable for a range of stages
//! so the head and tail of a split run separately. The architecture is
//! [`ResNetConfig`] (frankensplit-bundle), presets named as timm names them.

use std::ops::Range;

use tch::nn::{self, ModuleT};
use tch::Tensor;

pub use frankensplit_bundle::config::{ResNetBlock, ResNetConfig, RESNET_STEM_WIDTH};

use crate::layers::{drop_path, drop_path_rates};

fn conv(p: nn::Path, inputs: i64, outputs: i64, kernel: i64, stride: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding: kernel / 2,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(p, inputs, outputs, kernel, config)
}

fn batch_norm(p: nn::Path, channels: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, channels, Default::default())
}

/// One residual block (timm's `BasicBlock` or `Bottleneck`; the stride sits
/// on the first 3×3 convolution, as in torchvision's V1.5).
#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
    drop_path: f64,
}

impl Block {
    fn new(p: &nn::Path, kind: ResNetBlock, inputs: i64, planes: i64, stride: i64, drop_path: f64) -> Self {
        let outputs = planes * kind.expansion();
        let shapes: Vec<(i64, i64, i64, i64)> = match kind {
            ResNetBlock::Basic => vec![(inputs, planes, 3, stride), (planes, outputs, 3, 1)],
            ResNetBlock::Bottleneck => vec![
                (inputs, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, outputs, 1, 1),
            ],
        };
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(k, (i, o, kernel, s))| {
                (
                    conv(p / format!("conv{}", k + 1), i, o, kernel, s),
                    batch_norm(p / format!("bn{}", k + 1), o),
                )
            })
            .collect();
        let downsample = (stride != 1 || inputs != outputs).then(|| {
            let dp = p / "downsample";
            (conv(&dp / 0, inputs, outputs, 1, stride), batch_norm(&dp / 1, outputs))
        });
        Self {
            convs,
            downsample,
            drop_path,
        }
    }
}

impl ModuleT for Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut y = x.shallow_clone();
        for (k, (conv, bn)) in self.convs.iter().enumerate() {
            y = y.apply(conv).apply_t(bn, train);
            if k < last {
                y = y.relu();
            }
        }
        let shortcut = match &self.downsample {
            Some((conv, bn)) => x.apply(conv).apply_t(bn, train),
            None => x.shallow_clone(),
        };
        (drop_path(y, self.drop_path, train) + shortcut).relu()
    }
}

/// A ResNet, or the part of it from stage `stages.start` to `stages.end - 1`.
///
/// With `stages.start == 0` it starts from the image (the stem: `conv1`,
/// `bn1`, ReLU, 3×3 max-pool); otherwise from the feature map of
/// [`ResNetConfig::stage_input_shape`]. With `stages.end == num_stages` it
/// ends with global average pooling and `fc` (logits); otherwise with the
/// feature map after stage `end - 1`.
#[derive(Debug)]
pub struct ResNet {
    config: ResNetConfig,
    stages: Range<usize>,
    stem: Option<(nn::Conv2D, nn::BatchNorm)>,
    layers: Vec<Vec<Block>>,
    fc: Option<nn::Linear>,
}

impl ResNet {
    /// Registers the modules of `stages` under `p` with timm's names.
    pub fn new(p: &nn::Path, config: &ResNetConfig, stages: Range<usize>) -> Self {
        let n = config.num_stages();
        assert!(
            stages.start < stages.end && stages.end <= n,
            "stage range {stages:?} outside 0..{n}"
        );
        let total: i64 = config.layers.iter().sum();
        let rates = drop_path_rates(config.drop_path_rate, total as usize);
        let stem = (stages.start == 0).then(|| {
            let config_conv = nn::ConvConfig {
                stride: 2,
                padding: 3,
                bias: false,
                ..Default::default()
            };
            (
                nn::conv2d(p / "conv1", config.in_chans, RESNET_STEM_WIDTH, 7, config_conv),
                batch_norm(p / "bn1", RESNET_STEM_WIDTH),
            )
        });
        let layers = stages
            .clone()
            .map(|i| {
                let lp = p / format!("layer{}", i + 1);
                let first = config.layers[..i].iter().sum::<i64>() as usize;
                let mut inputs = config.stage_input_shape(i).0;
                (0..config.layers[i] as usize)
                    .map(|j| {
                        let stride = if i > 0 && j == 0 { 2 } else { 1 };
                        let block = Block::new(
                            &(&lp / j as i64),
                            config.block,
                            inputs,
                            config.channels[i],
                            stride,
                            rates[first + j],
                        );
                        inputs = config.stage_channels(i);
                        block
                    })
                    .collect()
            })
            .collect();
        let fc = (stages.end == n)
            .then(|| nn::linear(p / "fc", config.num_features(), config.num_classes, Default::default()));
        Self {
            config: config.clone(),
            stages,
            stem,
            layers,
            fc,
        }
    }

    /// The architecture.
    pub fn config(&self) -> &ResNetConfig {
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

    /// [`ResNet::forward_features_t`] plus every held stage's output, in
    /// order: the layers an XGradCAM map of a ResNet reads.
    pub fn forward_probed(&self, x: &Tensor, train: bool) -> (Tensor, Vec<Tensor>) {
        let mut x = match &self.stem {
            Some((conv, bn)) => {
                x.apply(conv)
                    .apply_t(bn, train)
                    .relu()
                    .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
            }
            None => x.shallow_clone(),
        };
        let mut probes = Vec::with_capacity(self.layers.len());
        for stage in &self.layers {
            for block in stage {
                x = block.forward_t(&x, train);
            }
            probes.push(x.shallow_clone());
        }
        (x, probes)
    }

    /// Logits from features of [`ResNet::forward_features_t`] (global
    /// average pool, `fc`) when this instance holds the last stage;
    /// otherwise the features.
    pub fn classify_features(&self, features: &Tensor) -> Tensor {
        match &self.fc {
            Some(fc) => features.mean_dim([2, 3].as_slice(), false, features.kind()).apply(fc),
            None => features.shallow_clone(),
        }
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.classify_features(&self.forward_features_t(x, train))
    }
}
