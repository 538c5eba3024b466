//! Building blocks shared by the compressor and the backbones: FrankenSplit's
//! residual block, stochastic depth, and token/grid conversions.

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::Tensor;

/// Nonlinearity of a residual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `ReLU` (the encoder's blocks).
    Relu,
    /// `LeakyReLU(0.01)` (the decoder's blocks).
    LeakyRelu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Self::Relu => x.relu(),
            Self::LeakyRelu => x.leaky_relu(),
        }
    }
}

/// FrankenSplit's `ResidualBlockWithStride`: `act(conv2(act1(conv1(x)))) + skip(x)`
/// with 3×3 convolutions (the first strided) and a 1×1 strided skip when the
/// shape changes.
///
/// The released code builds `act1` as an identity (an `isinstance` check on
/// a class), so there is no nonlinearity between the two convolutions;
/// `act_after_conv1 = false` reproduces that and is what its checkpoints need.
/// The author's later repositories apply the activation there too.
#[derive(Debug)]
pub struct ResidualBlockWithStride {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    skip: Option<nn::Conv2D>,
    activation: Activation,
    act_after_conv1: bool,
}

impl ResidualBlockWithStride {
    /// Registers `conv1`, `conv2` and (when `stride != 1` or the channels change) `skip` under `p`.
    pub fn new(
        p: &nn::Path,
        in_ch: i64,
        out_ch: i64,
        stride: i64,
        activation: Activation,
        act_after_conv1: bool,
    ) -> Self {
        let conv = |name: &str, i: i64, o: i64, k: i64, s: i64| {
            let config = nn::ConvConfig {
                stride: s,
                padding: k / 2,
                ..Default::default()
            };
            nn::conv2d(p / name, i, o, k, config)
        };
        Self {
            conv1: conv("conv1", in_ch, out_ch, 3, stride),
            conv2: conv("conv2", out_ch, out_ch, 3, 1),
            skip: (stride != 1 || in_ch != out_ch).then(|| conv("skip", in_ch, out_ch, 1, stride)),
            activation,
            act_after_conv1,
        }
    }
}

impl ResidualBlockWithStride {
    /// Zeroes the second convolution, so that the block starts as its skip
    /// (the identity when the shape is kept): a stack of such blocks without
    /// normalisation then starts with bounded activations.
    pub fn zero_init_last(&self) {
        tch::no_grad(|| {
            let _ = self.conv2.ws.shallow_clone().zero_();
            if let Some(bias) = &self.conv2.bs {
                let _ = bias.shallow_clone().zero_();
            }
        });
    }
}

impl nn::Module for ResidualBlockWithStride {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut out = x.apply(&self.conv1);
        if self.act_after_conv1 {
            out = self.activation.apply(&out);
        }
        let out = self.activation.apply(&out.apply(&self.conv2));
        match &self.skip {
            Some(skip) => out + x.apply(skip),
            None => out + x,
        }
    }
}

/// Stochastic depth (timm's `drop_path`): in training, zeroes a sample's
/// residual branch with probability `rate` and rescales the survivors.
pub fn drop_path(x: Tensor, rate: f64, train: bool) -> Tensor {
    if !train || rate <= 0.0 {
        return x;
    }
    let keep = 1.0 - rate;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    let mask = Tensor::empty(&shape, (x.kind(), x.device())).bernoulli_float_(keep) / keep;
    x * mask
}

/// timm's stochastic-depth schedule: `count` rates rising linearly from 0 to `max`.
pub fn drop_path_rates(max: f64, count: usize) -> Vec<f64> {
    (0..count)
        .map(|i| {
            if count > 1 {
                max * i as f64 / (count - 1) as f64
            } else {
                0.0
            }
        })
        .collect()
}

/// `(B, C, H, W)` → `(B, H·W, C)`, row-major tokens.
pub fn tokenize(x: &Tensor) -> Tensor {
    x.flatten(2, -1).transpose(1, 2)
}

/// `(B, H·W, C)` → `(B, C, H, W)`.
pub fn detokenize(x: &Tensor, height: i64, width: i64) -> Tensor {
    let size = x.size();
    x.transpose(1, 2).reshape([size[0], size[2], height, width])
}
