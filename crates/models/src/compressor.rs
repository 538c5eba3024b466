//! FrankenSplit's compressor: the edge encoder `g_a`, the entropy bottleneck,
//! and the server-side decoder `g_s`, built from its backbone family's
//! [`DecoderBlueprint`]: for transformers the reference's (a residual block,
//! a Swin stage with a shortcut, a residual block, and the `SwinReconLayer`
//! that produces the backbone's 14×14×384 tokens), for CNNs the same outline
//! with convolutional blocks, restoring a feature map. Module names follow
//! the reference state dict under `compression_module.`.

use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use crate::entropy_bottleneck::EntropyBottleneck;
use crate::layers::{detokenize, drop_path_rates, tokenize, Activation, ResidualBlockWithStride};
pub use frankensplit_bundle::config::DecoderBlueprint;
pub use frankensplit_bundle::CompressorConfig;

use crate::swin::{BlockSpec, PatchMerging, SwinBlock};

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
        let spec = BlockSpec::for_decoder(config, config.recon_dim, config.recon_heads);
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

/// The server-side decoder of the Swin blueprint (`SynthesisNetworkSwinTransform`).
#[derive(Debug)]
pub struct SwinDecoder {
    deconv_embed: ResidualBlockWithStride,
    blocks: Vec<SwinBlock>,
    conv: ResidualBlockWithStride,
    final_layer: SwinReconLayer,
    side: i64,
}

impl SwinDecoder {
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
                BlockSpec::for_decoder(config, config.decoder_dim, config.decoder_heads),
                depth,
                &rates,
            ),
            conv: rb(&stage / "conv", config.decoder_dim, config.recon_dim),
            final_layer: SwinReconLayer::new(&(p / "final_layer"), config),
            side: config.latent_size(),
        }
    }
}

impl ModuleT for SwinDecoder {
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

/// The server-side decoder of the convolutional blueprint: the Swin
/// decoder's outline with residual convolution blocks (LeakyReLU between
/// their convolutions) in place of Swin blocks, ending in a resampling
/// convolution to the target's channels and grid: 3×3 stride 2 to half the
/// latent's side, 1×1 to the same side, 2×2 transposed stride 2 to twice it.
///
/// Nothing normalises its activations (the Swin blueprint has layer norms),
/// so it starts as Fixup and timm's `zero_init_last` start residual
/// networks: the last convolution of every residual block and the
/// resampling convolution at zero, the blocks as identities and the output
/// at zero. Drawn at random, six unnormalised residual blocks started with
/// outputs of RMS 35 against ResNet features of RMS 0.5, and training spent
/// its steps shrinking them without learning the features.
#[derive(Debug)]
pub struct ConvDecoder {
    deconv_embed: ResidualBlockWithStride,
    blocks: Vec<ResidualBlockWithStride>,
    conv: ResidualBlockWithStride,
    recon_blocks: Vec<ResidualBlockWithStride>,
    sample: Resample,
}

#[derive(Debug)]
enum Resample {
    Conv(nn::Conv2D),
    Transposed(nn::ConvTranspose2D),
}

impl ConvDecoder {
    /// Registers `deconv_embed.0`, `hybrid_stages.0.{blocks,conv}` and
    /// `final_layer.{blocks,sample}` under `p`, restoring `side × side` maps.
    pub fn new(p: &nn::Path, config: &CompressorConfig, side: i64) -> Self {
        let rb = |path: nn::Path, i, o, inner_act| {
            ResidualBlockWithStride::new(&path, i, o, 1, Activation::LeakyRelu, inner_act)
        };
        let stage = p / "hybrid_stages" / 0;
        let final_layer = p / "final_layer";
        let (dim, recon) = (config.decoder_dim, config.recon_dim);
        let latent = config.latent_size();
        let sample_path = &final_layer / "sample";
        let sample = if side == 2 * latent {
            let up = nn::ConvTransposeConfig {
                stride: 2,
                ..Default::default()
            };
            Resample::Transposed(nn::conv_transpose2d(sample_path, recon, config.target_dim, 2, up))
        } else {
            let (kernel, stride) = if side == latent { (1, 1) } else { (3, 2) };
            let down = nn::ConvConfig {
                stride,
                padding: kernel / 2,
                ..Default::default()
            };
            Resample::Conv(nn::conv2d(sample_path, recon, config.target_dim, kernel, down))
        };
        let decoder = Self {
            deconv_embed: rb(
                p / "deconv_embed" / 0,
                config.latent_channels,
                dim,
                config.act_after_conv1,
            ),
            blocks: (0..config.decoder_depth)
                .map(|i| rb(&stage / "blocks" / i as i64, dim, dim, true))
                .collect(),
            conv: rb(&stage / "conv", dim, recon, config.act_after_conv1),
            recon_blocks: (0..config.recon_depth)
                .map(|i| rb(&final_layer / "blocks" / i as i64, recon, recon, true))
                .collect(),
            sample,
        };
        for block in decoder.blocks.iter().chain(&decoder.recon_blocks) {
            block.zero_init_last();
        }
        let (ws, bs) = match &decoder.sample {
            Resample::Conv(conv) => (&conv.ws, &conv.bs),
            Resample::Transposed(conv) => (&conv.ws, &conv.bs),
        };
        tch::no_grad(|| {
            let _ = ws.shallow_clone().zero_();
            if let Some(bias) = bs {
                let _ = bias.shallow_clone().zero_();
            }
        });
        decoder
    }
}

impl Module for ConvDecoder {
    fn forward(&self, y: &Tensor) -> Tensor {
        let x = self.deconv_embed.forward(y);
        let x = self.blocks.iter().fold(x.shallow_clone(), |h, block| block.forward(&h)) + x;
        let x = self.conv.forward(&x);
        let x = self.recon_blocks.iter().fold(x, |h, block| block.forward(&h));
        match &self.sample {
            Resample::Conv(conv) => x.apply(conv),
            Resample::Transposed(conv) => x.apply(conv),
        }
    }
}

/// The server-side decoder `g_s`, as its blueprint builds it.
#[derive(Debug)]
pub enum Decoder {
    /// Tokens `(B, L, C)` for a transformer backbone.
    Swin(SwinDecoder),
    /// A feature map `(B, C, H, W)` for a CNN backbone.
    Conv(ConvDecoder),
}

impl Decoder {
    /// Registers the blueprint's modules under `p`.
    pub fn new(p: &nn::Path, config: &CompressorConfig, blueprint: DecoderBlueprint) -> Self {
        match blueprint {
            DecoderBlueprint::Swin => Self::Swin(SwinDecoder::new(p, config)),
            DecoderBlueprint::Conv { side } => Self::Conv(ConvDecoder::new(p, config, side)),
        }
    }
}

impl ModuleT for Decoder {
    fn forward_t(&self, y: &Tensor, train: bool) -> Tensor {
        match self {
            Self::Swin(decoder) => decoder.forward_t(y, train),
            Self::Conv(decoder) => decoder.forward(y),
        }
    }
}

/// Output of the compressor's training-time forward pass.
#[derive(Debug)]
pub struct CompressorOutput {
    /// Restored backbone features `h̃`: tokens `(B, 196, 384)` for
    /// Swin-S3 at 224², a feature map for a CNN.
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
    /// Registers `g_a`, `entropy_bottleneck` and `g_s` (built from
    /// `blueprint`, an architecture's [`Architecture::blueprint`]) under `p`.
    ///
    /// [`Architecture::blueprint`]: frankensplit_bundle::Architecture::blueprint
    pub fn new(p: &nn::Path, config: &CompressorConfig, blueprint: DecoderBlueprint) -> Self {
        Self {
            config: config.clone(),
            g_a: Encoder::new(&(p / "g_a"), config),
            entropy_bottleneck: EntropyBottleneck::new(&(p / "entropy_bottleneck"), config.latent_channels),
            g_s: Decoder::new(&(p / "g_s"), config, blueprint),
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
