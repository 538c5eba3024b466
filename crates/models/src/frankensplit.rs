//! FrankenSplit's compressor: the edge encoder `g_a`, the entropy bottleneck,
//! and the server-side decoder `g_s` (a residual block, a Swin stage with a
//! shortcut, a residual block, and the `SwinReconLayer` that produces the
//! backbone's 14×14×384 tokens). Module names follow the reference state dict
//! under `compression_module.`.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use crate::entropy_bottleneck::EntropyBottleneck;
use crate::layers::{detokenize, drop_path_rates, tokenize, Activation, ResidualBlockWithStride};
use crate::swin::{BlockSpec, PatchMerging, SwinBlock};

/// Architecture of the compressor; the default is the reference's
/// (`QuantizableSimpleAnalysisNetwork2` + `SynthesisNetworkSwinTransform` +
/// `SwinReconLayer` for a 224×224 input).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressorConfig {
    /// Input side in pixels (square).
    pub input_size: i64,
    /// Encoder widths: `3 → hidden[0] → hidden[1] → latent`.
    pub encoder_hidden: [i64; 2],
    /// Latent channels (48).
    pub latent_channels: i64,
    /// Activation between each residual block's convolutions (the release has none).
    pub act_after_conv1: bool,
    /// Width of the decoder's Swin stage (96).
    pub decoder_dim: i64,
    /// Heads of the decoder's Swin stage (3).
    pub decoder_heads: i64,
    /// Blocks of the decoder's Swin stage (2).
    pub decoder_depth: usize,
    /// Stochastic depth of the decoder stage's last block (0.05).
    pub decoder_drop_path: f64,
    /// Width the reconstruction layer works at (192).
    pub recon_dim: i64,
    /// Heads of the reconstruction layer (4).
    pub recon_heads: i64,
    /// Blocks of the reconstruction layer (2).
    pub recon_depth: usize,
    /// Output token width: the backbone's width at the injection point (384).
    pub target_dim: i64,
    /// Attention window in the decoder (7).
    pub window: i64,
}

impl Default for CompressorConfig {
    fn default() -> Self {
        Self {
            input_size: 224,
            encoder_hidden: [48, 64],
            latent_channels: 48,
            act_after_conv1: false,
            decoder_dim: 96,
            decoder_heads: 3,
            decoder_depth: 2,
            decoder_drop_path: 0.05,
            recon_dim: 192,
            recon_heads: 4,
            recon_depth: 2,
            target_dim: 384,
            window: 7,
        }
    }
}

impl CompressorConfig {
    /// Side of the latent grid (input / 8).
    pub fn latent_size(&self) -> i64 {
        self.input_size / 8
    }

    /// How the decoder's Swin blocks of width `dim` are laid out (the grid is the latent's).
    pub fn block(&self, dim: i64, num_heads: i64) -> BlockSpec {
        let side = self.latent_size();
        BlockSpec {
            dim,
            resolution: (side, side),
            num_heads,
            window: self.window,
            shift: 0,
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_path: 0.0,
        }
    }
}

/// The edge encoder `g_a`: three stride-2 residual blocks with ReLU.
#[derive(Debug)]
pub struct Encoder {
    blocks: [ResidualBlockWithStride; 3],
}

impl Encoder {
    /// Registers `rb1`, `rb2`, `rb3` under `p`.
    pub fn new(p: &nn::Path, config: &CompressorConfig) -> Self {
        let [h1, h2] = config.encoder_hidden;
        let rb = |name: &str, i, o| {
            ResidualBlockWithStride::new(&(p / name), i, o, 2, Activation::Relu, config.act_after_conv1)
        };
        Self {
            blocks: [
                rb("rb1", 3, h1),
                rb("rb2", h1, h2),
                rb("rb3", h2, config.latent_channels),
            ],
        }
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.blocks.iter().fold(x.shallow_clone(), |x, block| block.forward(&x))
    }
}

/// `SwinReconLayer`: Swin blocks at the latent grid, patch merging to the
/// target width, and a final LayerNorm; tokens out `(B, (side/2)², target)`.
#[derive(Debug)]
pub struct SwinReconLayer {
    blocks: Vec<SwinBlock>,
    sample: PatchMerging,
    norm: nn::LayerNorm,
}

impl SwinReconLayer {
    /// Registers `blocks.{i}`, `sample` and `norm` under `p`.
    pub fn new(p: &nn::Path, config: &CompressorConfig) -> Self {
        let side = config.latent_size();
        let spec = config.block(config.recon_dim, config.recon_heads);
        Self {
            blocks: SwinBlock::stage(&(p / "blocks"), spec, config.recon_depth, &[]),
            sample: PatchMerging::new(&(p / "sample"), (side, side), config.recon_dim, config.target_dim),
            norm: nn::layer_norm(
                p / "norm",
                vec![config.target_dim],
                nn::LayerNormConfig {
                    eps: 1e-5,
                    ..Default::default()
                },
            ),
        }
    }
}

impl ModuleT for SwinReconLayer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = self
            .blocks
            .iter()
            .fold(tokenize(x), |x, block| block.forward_t(&x, train));
        self.sample.forward(&x).apply(&self.norm)
    }
}

/// The server-side decoder `g_s` (`SynthesisNetworkSwinTransform`).
#[derive(Debug)]
pub struct Decoder {
    deconv_embed: ResidualBlockWithStride,
    blocks: Vec<SwinBlock>,
    conv: ResidualBlockWithStride,
    final_layer: SwinReconLayer,
    side: i64,
}

impl Decoder {
    /// Registers `deconv_embed.0`, `hybrid_stages.0.{blocks,conv}` and `final_layer` under `p`.
    pub fn new(p: &nn::Path, config: &CompressorConfig) -> Self {
        let rb = |path: nn::Path, i, o| {
            ResidualBlockWithStride::new(&path, i, o, 1, Activation::LeakyRelu, config.act_after_conv1)
        };
        let stage = p / "hybrid_stages" / 0;
        let depth = config.decoder_depth;
        let rates = drop_path_rates(config.decoder_drop_path, depth);
        Self {
            deconv_embed: rb(p / "deconv_embed" / 0, config.latent_channels, config.decoder_dim),
            blocks: SwinBlock::stage(
                &(&stage / "blocks"),
                config.block(config.decoder_dim, config.decoder_heads),
                depth,
                &rates,
            ),
            conv: rb(&stage / "conv", config.decoder_dim, config.recon_dim),
            final_layer: SwinReconLayer::new(&(p / "final_layer"), config),
            side: config.latent_size(),
        }
    }
}

impl ModuleT for Decoder {
    fn forward_t(&self, y: &Tensor, train: bool) -> Tensor {
        let x = self.deconv_embed.forward(y);
        let tokens = self
            .blocks
            .iter()
            .fold(tokenize(&x), |t, block| block.forward_t(&t, train));
        let x = detokenize(&tokens, self.side, self.side) + x;
        self.final_layer.forward_t(&self.conv.forward(&x), train)
    }
}

/// Output of the compressor's training-time forward pass.
#[derive(Debug)]
pub struct CompressorOutput {
    /// Restored backbone features `h̃`, `(B, 196, 384)` at 224².
    pub features: Tensor,
    /// Latent likelihoods `p(ŷ)`, `(B, 48, 28, 28)`.
    pub likelihoods: Tensor,
}

/// The whole compression module: `g_a`, `entropy_bottleneck`, `g_s`.
#[derive(Debug)]
pub struct Compressor {
    config: CompressorConfig,
    /// Edge encoder.
    pub g_a: Encoder,
    /// Factorized prior.
    pub entropy_bottleneck: EntropyBottleneck,
    /// Server decoder.
    pub g_s: Decoder,
}

impl Compressor {
    /// Registers `g_a`, `entropy_bottleneck` and `g_s` under `p`.
    pub fn new(p: &nn::Path, config: &CompressorConfig) -> Self {
        Self {
            config: config.clone(),
            g_a: Encoder::new(&(p / "g_a"), config),
            entropy_bottleneck: EntropyBottleneck::new(&(p / "entropy_bottleneck"), config.latent_channels),
            g_s: Decoder::new(&(p / "g_s"), config),
        }
    }

    /// The architecture.
    pub fn config(&self) -> &CompressorConfig {
        &self.config
    }

    /// Encoder, noisy (training) or rounded latent, decoder.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> CompressorOutput {
        let y = self.g_a.forward(x);
        let (y_hat, likelihoods) = self.entropy_bottleneck.forward_t(&y, train);
        CompressorOutput {
            features: self.g_s.forward_t(&y_hat, train),
            likelihoods,
        }
    }

    /// The training pass with given latent noise `(B, C, H, W)` in [−½, ½).
    pub fn forward_noisy(&self, x: &Tensor, noise: &Tensor) -> CompressorOutput {
        let y = self.g_a.forward(x);
        let (y_hat, likelihoods) = self.entropy_bottleneck.forward_noisy(&y, noise);
        CompressorOutput {
            features: self.g_s.forward_t(&y_hat, true),
            likelihoods,
        }
    }
}
