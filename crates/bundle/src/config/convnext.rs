//! ConvNeXt (v1) as timm builds it (`timm.models.convnext.ConvNeXt` with
//! its patch stem and layer scale), with timm's presets as one table.

use serde::{Deserialize, Serialize};

use super::{check_drop_path_rate, check_size, check_stages, table_names};
use crate::error::{Error, Result};

/// Architecture of a ConvNeXt: a patch stem, then stages of depthwise-7×7
/// blocks, each stage after the first starting with a 2×2 stride-2
/// downsampling convolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvNextConfig {
    /// Input side in pixels (square).
    pub img_size: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Classes of the head.
    pub num_classes: i64,
    /// Patch side of the stem.
    pub patch_size: i64,
    /// Blocks per stage.
    pub depths: Vec<i64>,
    /// Channels per stage.
    pub dims: Vec<i64>,
    /// MLP expansion.
    pub mlp_ratio: f64,
    /// Whether timm stores the MLP as 1×1 convolutions (`conv_mlp`, the
    /// atto…nano presets) rather than linear layers. The same function
    /// either way; it only decides the shape of timm's weights.
    pub conv_mlp: bool,
    /// Stochastic depth at the last block, growing linearly from 0 over all blocks.
    pub drop_path_rate: f64,
    /// Initial value of every block's layer scale `gamma` (timm's
    /// `ls_init_value`, 1e-6): it only matters for training from scratch.
    #[serde(default = "default_ls_init_value")]
    pub ls_init_value: f64,
}

fn default_ls_init_value() -> f64 {
    1e-6
}

/// A preset's depths, widths and `conv_mlp`.
type ConvNextShape = ([i64; 4], [i64; 4], bool);

/// timm's 224-pixel, 1000-class ConvNeXt presets, by timm's names.
const CONVNEXT_PRESETS: [(&str, ConvNextShape); 7] = [
    ("convnext_atto", ([2, 2, 6, 2], [40, 80, 160, 320], true)),
    ("convnext_femto", ([2, 2, 6, 2], [48, 96, 192, 384], true)),
    ("convnext_pico", ([2, 2, 6, 2], [64, 128, 256, 512], true)),
    ("convnext_nano", ([2, 2, 8, 2], [80, 160, 320, 640], true)),
    ("convnext_tiny", ([3, 3, 9, 3], [96, 192, 384, 768], false)),
    ("convnext_small", ([3, 3, 27, 3], [96, 192, 384, 768], false)),
    ("convnext_base", ([3, 3, 27, 3], [128, 256, 512, 1024], false)),
];

impl ConvNextConfig {
    /// Names accepted by [`ConvNextConfig::preset`].
    pub const PRESETS: [&'static str; CONVNEXT_PRESETS.len()] = table_names(&CONVNEXT_PRESETS);

    /// The preset called `name` (timm's model name).
    pub fn preset(name: &str) -> Option<Self> {
        let (_, (depths, dims, conv_mlp)) = CONVNEXT_PRESETS.iter().find(|p| p.0 == name)?;
        Some(Self {
            img_size: 224,
            in_chans: 3,
            num_classes: 1000,
            patch_size: 4,
            depths: depths.to_vec(),
            dims: dims.to_vec(),
            mlp_ratio: 4.0,
            conv_mlp: *conv_mlp,
            drop_path_rate: 0.0,
            ls_init_value: default_ls_init_value(),
        })
    }

    /// Number of stages.
    pub fn num_stages(&self) -> usize {
        self.depths.len()
    }

    /// Grid side at the output of stage `i`.
    pub fn stage_resolution(&self, i: usize) -> i64 {
        (self.img_size / self.patch_size) >> i
    }

    /// Shape `(channels, side)` of what stage `i` receives: the output of
    /// `stages.{i-1}` (stage `i` downsamples it first), or the stem's for `i = 0`.
    pub fn stage_input_shape(&self, i: usize) -> (i64, i64) {
        match i {
            0 => (self.dims[0], self.stage_resolution(0)),
            _ => (self.dims[i - 1], self.stage_resolution(i - 1)),
        }
    }

    /// Channels the head's classifier reads.
    pub fn num_features(&self) -> i64 {
        self.dims[self.num_stages() - 1]
    }

    /// Hidden width of a stage's MLP.
    pub fn mlp_hidden(&self, i: usize) -> i64 {
        (self.mlp_ratio * self.dims[i] as f64) as i64
    }

    /// Weights of the stages from `first` on and the classifier (MLPs,
    /// depthwise and downsampling kernels), a lower bound on what a weights
    /// file for them holds.
    pub fn min_parameters(&self, first: usize) -> f64 {
        let stem = if first == 0 {
            (self.in_chans * self.dims[0] * self.patch_size * self.patch_size) as f64
        } else {
            0.0
        };
        let stages: f64 = (first..self.num_stages())
            .map(|i| {
                let dim = self.dims[i] as f64;
                let downsample = if i > 0 {
                    4.0 * self.dims[i - 1] as f64 * dim
                } else {
                    0.0
                };
                let block = 49.0 * dim + 2.0 * dim * self.mlp_hidden(i) as f64;
                downsample + self.depths[i] as f64 * block
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
            ("backbone.patch_size", self.patch_size),
        ] {
            check_size(what, value)?;
        }
        if !(self.mlp_ratio > 0.0 && self.mlp_ratio <= 64.0) {
            return Err(Error::Invalid(format!(
                "backbone.mlp_ratio is {}; it must lie in (0, 64]",
                self.mlp_ratio
            )));
        }
        let stride = self.patch_size << self.depths.len().clamp(1, 8).saturating_sub(1);
        check_stages("convnext", ("depths", &self.depths), &self.dims, self.img_size, stride)?;
        check_drop_path_rate(self.drop_path_rate)?;
        if !(self.ls_init_value.is_finite() && self.ls_init_value > 0.0) {
            return Err(Error::Invalid(format!(
                "backbone.ls_init_value is {}; it must be positive",
                self.ls_init_value
            )));
        }
        Ok(())
    }
}
