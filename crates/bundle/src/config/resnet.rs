//! ResNet as timm builds it (`timm.models.resnet.ResNet` with its default
//! stem, no anti-aliasing, no squeeze-excitation, cardinality 1), with timm's
//! presets of that shape as one table.

use serde::{Deserialize, Serialize};

use super::{check_drop_path_rate, check_size, check_stages, table_names};
use crate::error::Result;

/// Output channels of the stem convolution: timm's plain stem is 64 wide
/// whatever the stages' widths (its `stem_width` only sizes deep stems).
pub const RESNET_STEM_WIDTH: i64 = 64;

/// The residual block a ResNet stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResNetBlock {
    /// Two 3×3 convolutions (timm's `BasicBlock`, expansion 1).
    Basic,
    /// 1×1, strided 3×3, 1×1 convolutions (timm's `Bottleneck`, expansion 4).
    Bottleneck,
}

impl ResNetBlock {
    /// Output channels per `planes` (timm's `expansion`).
    pub fn expansion(self) -> i64 {
        match self {
            Self::Basic => 1,
            Self::Bottleneck => 4,
        }
    }
}

/// Architecture of a ResNet: stem (7×7 stride-2 convolution, max-pool), then
/// stages `layer1…layerN`, each halving the grid but the first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Input side in pixels (square).
    pub img_size: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Classes of the head.
    pub num_classes: i64,
    /// The block every stage stacks.
    pub block: ResNetBlock,
    /// Blocks per stage (timm's `layers`).
    pub layers: Vec<i64>,
    /// Planes per stage (timm's `channels`); a stage outputs
    /// `planes × expansion` channels.
    pub channels: Vec<i64>,
    /// Stochastic depth at the last block, growing linearly from 0 over all blocks.
    pub drop_path_rate: f64,
}

/// timm's 224-pixel, 1000-class ResNet presets, by timm's names.
const RESNET_PRESETS: [(&str, (ResNetBlock, [i64; 4])); 5] = [
    ("resnet18", (ResNetBlock::Basic, [2, 2, 2, 2])),
    ("resnet26", (ResNetBlock::Bottleneck, [2, 2, 2, 2])),
    ("resnet34", (ResNetBlock::Basic, [3, 4, 6, 3])),
    ("resnet50", (ResNetBlock::Bottleneck, [3, 4, 6, 3])),
    ("resnet101", (ResNetBlock::Bottleneck, [3, 4, 23, 3])),
];

impl ResNetConfig {
    /// Names accepted by [`ResNetConfig::preset`].
    pub const PRESETS: [&'static str; RESNET_PRESETS.len()] = table_names(&RESNET_PRESETS);

    /// The preset called `name` (timm's model name).
    pub fn preset(name: &str) -> Option<Self> {
        let (_, (block, layers)) = RESNET_PRESETS.iter().find(|p| p.0 == name)?;
        Some(Self {
            img_size: 224,
            in_chans: 3,
            num_classes: 1000,
            block: *block,
            layers: layers.to_vec(),
            channels: vec![64, 128, 256, 512],
            drop_path_rate: 0.0,
        })
    }

    /// Number of stages.
    pub fn num_stages(&self) -> usize {
        self.layers.len()
    }

    /// Channels stage `i` outputs.
    pub fn stage_channels(&self, i: usize) -> i64 {
        self.channels[i] * self.block.expansion()
    }

    /// Grid side at the output of stage `i` (the stem divides by 4, every
    /// later stage by 2).
    pub fn stage_resolution(&self, i: usize) -> i64 {
        (self.img_size / 4) >> i
    }

    /// Shape `(channels, side)` of what stage `i` receives: the output of
    /// `layer{i}` (timm's names count from 1), or the stem's for `i = 0`.
    pub fn stage_input_shape(&self, i: usize) -> (i64, i64) {
        match i {
            0 => (RESNET_STEM_WIDTH, self.img_size / 4),
            _ => (self.stage_channels(i - 1), self.stage_resolution(i - 1)),
        }
    }

    /// Channels the head's classifier reads.
    pub fn num_features(&self) -> i64 {
        self.stage_channels(self.num_stages() - 1)
    }

    /// Kernels of the stages from `first` on and the classifier (no norms
    /// or biases), a lower bound on what a weights file for them holds.
    pub fn min_parameters(&self, first: usize) -> f64 {
        let stem = if first == 0 {
            (self.in_chans * RESNET_STEM_WIDTH * 49) as f64
        } else {
            0.0
        };
        let stages: f64 = (first..self.num_stages())
            .map(|i| {
                let planes = self.channels[i] as f64;
                let out = self.stage_channels(i) as f64;
                let block = |inputs: f64| match self.block {
                    ResNetBlock::Basic => 9.0 * inputs * planes + 9.0 * planes * planes,
                    ResNetBlock::Bottleneck => inputs * planes + 9.0 * planes * planes + planes * out,
                };
                let inputs = self.stage_input_shape(i).0 as f64;
                let downsample = if i > 0 || inputs != out { inputs * out } else { 0.0 };
                block(inputs) + downsample + (self.layers[i] - 1) as f64 * block(out)
            })
            .sum();
        stem + stages + (self.num_features() * self.num_classes) as f64
    }

    /// Checks that the per-stage lists agree and every size is positive,
    /// bounded and leaves a grid of at least one cell after the last stage.
    pub fn validate(&self) -> Result<()> {
        for (what, value) in [
            ("backbone.img_size", self.img_size),
            ("backbone.in_chans", self.in_chans),
            ("backbone.num_classes", self.num_classes),
        ] {
            check_size(what, value)?;
        }
        let stride = 4i64 << self.layers.len().clamp(1, 8).saturating_sub(1);
        check_stages(
            "resnet",
            ("layers", &self.layers),
            &self.channels,
            self.img_size,
            stride,
        )?;
        check_drop_path_rate(self.drop_path_rate)
    }
}
