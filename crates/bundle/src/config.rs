//! The architecture a bundle declares, as plain serde types the networks are
//! built from (candle's `Config` discipline): the compressor, the Swin
//! backbone with timm's presets as one table, and where the two meet. Both
//! the libtorch networks (`frankensplit-models`) and the device's encoder
//! (`frankensplit-edge`) read these; neither keeps a copy.

use frankensplit_codec::LatentShape;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod convnext;
mod resnet;

pub use convnext::ConvNextConfig;
pub use resnet::{ResNetBlock, ResNetConfig, RESNET_STEM_WIDTH};

/// The networks of a split model and where they meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// The compressor (edge encoder, entropy bottleneck, decoder).
    pub compressor: CompressorConfig,
    /// The backbone whose tail classifies the restored features.
    pub backbone: BackboneConfig,
    /// First backbone stage run on the server (timm 0.8's `split_idx`): the
    /// decoder restores the output of stage `split_stage - 1`.
    pub split_stage: usize,
}

impl Default for Architecture {
    /// The reference's main configuration: the full-size compressor in front
    /// of `swin_s3_base_224`, injected after `layers.1`.
    fn default() -> Self {
        Self {
            compressor: CompressorConfig::default(),
            backbone: BackboneConfig::Swin(SwinConfig::swin_s3_base_224()),
            split_stage: 2,
        }
    }
}

impl Architecture {
    /// Reads an architecture file (`[compressor]`, `[backbone]`, `split_stage`) and validates it.
    pub fn from_toml(text: &str) -> Result<Self> {
        let arch: Self = toml::from_str(text).map_err(|e| Error::Invalid(format!("invalid architecture: {e}")))?;
        arch.validate()?;
        Ok(arch)
    }

    /// Checks that the decoder's output fits the backbone at the split point,
    /// and that every size is one the networks can be built with.
    pub fn validate(&self) -> Result<()> {
        self.compressor.validate()?;
        self.backbone.validate()?;
        let stages = self.backbone.num_stages();
        if self.split_stage == 0 || self.split_stage >= stages {
            return Err(Error::Invalid(format!(
                "split_stage {} must lie in 1..{stages}",
                self.split_stage
            )));
        }
        let latent = self.compressor.latent_size();
        let target = self.backbone.split_features(self.split_stage);
        let fits = match (self.blueprint(), target) {
            (DecoderBlueprint::Swin, Features::Tokens { tokens, dim }) => {
                self.compressor.target_dim == dim && (latent / 2) * (latent / 2) == tokens
            }
            (DecoderBlueprint::Conv { side: restored }, Features::Map { channels, side }) => {
                self.compressor.target_dim == channels && restored == side
            }
            _ => false,
        };
        if !fits {
            return Err(Error::Invalid(format!(
                "the {} decoder of a {}×{} latent produces {}, but backbone stage {} expects {target}",
                self.blueprint().name(),
                latent,
                latent,
                self.blueprint().output(latent, self.compressor.target_dim),
                self.split_stage
            )));
        }
        if self.compressor.input_size != self.backbone.img_size() {
            return Err(Error::Invalid(format!(
                "compressor input {} differs from backbone input {}",
                self.compressor.input_size,
                self.backbone.img_size()
            )));
        }
        Ok(())
    }

    /// The decoder blueprint of this backbone's family at this split: a
    /// Conv-Swin hybrid for transformers, convolutional restoration for
    /// CNNs (to the feature map's side, or the latent's when the split
    /// point's side is none a convolutional decoder reaches).
    pub fn blueprint(&self) -> DecoderBlueprint {
        let latent = self.compressor.latent_size();
        match self.backbone.split_features(self.split_stage) {
            Features::Tokens { .. } => DecoderBlueprint::Swin,
            Features::Map { side, .. } if [latent / 2, latent, 2 * latent].contains(&side) => {
                DecoderBlueprint::Conv { side }
            }
            Features::Map { .. } => DecoderBlueprint::Conv { side: latent },
        }
    }

    /// Shape of the latent for one image.
    pub fn latent_shape(&self) -> LatentShape {
        self.compressor.latent_shape()
    }

    /// A lower bound on the parameters the networks of this architecture
    /// hold (weight matrices and kernels only: no biases, norms or tables),
    /// the backbone's head included when `backbone_head`. A weights file
    /// smaller than this many `f32` cannot be theirs, which lets a reader
    /// refuse a hostile manifest before building anything of its size.
    pub fn min_parameters(&self, backbone_head: bool) -> f64 {
        let first = if backbone_head { 0 } else { self.split_stage };
        self.backbone.min_parameters(first) + self.compressor.min_parameters(self.blueprint())
    }
}

/// What a backbone hands its stage `i`: Swin's tokens or a CNN's feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Features {
    /// `(B, tokens, dim)`.
    Tokens {
        /// Tokens per image (a square grid).
        tokens: i64,
        /// Width.
        dim: i64,
    },
    /// `(B, channels, side, side)`.
    Map {
        /// Channels.
        channels: i64,
        /// Grid side.
        side: i64,
    },
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tokens { tokens, dim } => write!(f, "{tokens} tokens of width {dim}"),
            Self::Map { channels, side } => write!(f, "a {channels}×{side}×{side} feature map"),
        }
    }
}

/// How the server's decoder is built for a backbone family: the blueprint
/// and the shape of the features it restores decide its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderBlueprint {
    /// The reference's `SynthesisNetworkSwinTransform`: residual block, a
    /// Swin stage with a shortcut, residual block, `SwinReconLayer` (Swin
    /// blocks and patch merging): tokens on half the latent's grid.
    Swin,
    /// Convolutional restoration (the reference's `ResNetReconLayer` idea):
    /// residual convolution blocks, then a resampling convolution to the
    /// feature map of side `side` (half, equal to or twice the latent's).
    Conv {
        /// Side of the restored feature map.
        side: i64,
    },
}

impl DecoderBlueprint {
    fn name(self) -> &'static str {
        match self {
            Self::Swin => "Conv-Swin",
            Self::Conv { .. } => "convolutional",
        }
    }

    fn output(self, latent: i64, channels: i64) -> Features {
        match self {
            Self::Swin => Features::Tokens {
                tokens: (latent / 2) * (latent / 2),
                dim: channels,
            },
            Self::Conv { side } => Features::Map { channels, side },
        }
    }
}

/// A backbone of one of the families the project builds as timm does.
///
/// In TOML the family is the `family` key (`"swin"`, `"resnet"`,
/// `"convnext"`) beside the family's own fields; without it the table is a
/// Swin, as every bundle and run file before the other families were.
#[derive(Debug, Clone, PartialEq)]
pub enum BackboneConfig {
    /// Swin / Swin-S3.
    Swin(SwinConfig),
    /// ResNet.
    ResNet(ResNetConfig),
    /// ConvNeXt.
    ConvNext(ConvNextConfig),
}

impl BackboneConfig {
    /// Every preset name of every family.
    pub fn preset_names() -> Vec<&'static str> {
        let mut names = SwinConfig::PRESETS.to_vec();
        names.extend(ResNetConfig::PRESETS);
        names.extend(ConvNextConfig::PRESETS);
        names
    }

    /// The preset called `name` (timm's model name), of whichever family.
    pub fn preset(name: &str) -> Option<Self> {
        SwinConfig::preset(name)
            .map(Self::Swin)
            .or_else(|| ResNetConfig::preset(name).map(Self::ResNet))
            .or_else(|| ConvNextConfig::preset(name).map(Self::ConvNext))
    }

    /// The family's name as the `family` key spells it.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Swin(_) => "swin",
            Self::ResNet(_) => "resnet",
            Self::ConvNext(_) => "convnext",
        }
    }

    /// The Swin configuration, when the backbone is one.
    pub fn as_swin(&self) -> Option<&SwinConfig> {
        match self {
            Self::Swin(config) => Some(config),
            _ => None,
        }
    }

    /// Input side in pixels.
    pub fn img_size(&self) -> i64 {
        match self {
            Self::Swin(c) => c.img_size,
            Self::ResNet(c) => c.img_size,
            Self::ConvNext(c) => c.img_size,
        }
    }

    /// Sets the input side.
    pub fn set_img_size(&mut self, size: i64) {
        match self {
            Self::Swin(c) => c.img_size = size,
            Self::ResNet(c) => c.img_size = size,
            Self::ConvNext(c) => c.img_size = size,
        }
    }

    /// Classes of the head.
    pub fn num_classes(&self) -> i64 {
        match self {
            Self::Swin(c) => c.num_classes,
            Self::ResNet(c) => c.num_classes,
            Self::ConvNext(c) => c.num_classes,
        }
    }

    /// Number of stages.
    pub fn num_stages(&self) -> usize {
        match self {
            Self::Swin(c) => c.num_stages(),
            Self::ResNet(c) => c.num_stages(),
            Self::ConvNext(c) => c.num_stages(),
        }
    }

    /// What stage `i` receives: the features a decoder must restore for a
    /// split there (timm 0.8's `layers[i - 1]` output for Swin, `layer{i}`'s
    /// for ResNet, `stages.{i-1}`'s for ConvNeXt).
    pub fn split_features(&self, i: usize) -> Features {
        match self {
            Self::Swin(c) => {
                let (tokens, dim) = c.stage_input_shape(i);
                Features::Tokens { tokens, dim }
            }
            Self::ResNet(c) => {
                let (channels, side) = c.stage_input_shape(i);
                Features::Map { channels, side }
            }
            Self::ConvNext(c) => {
                let (channels, side) = c.stage_input_shape(i);
                Features::Map { channels, side }
            }
        }
    }

    /// Kernels and matrices of the stages from `first` on and the
    /// classifier: a lower bound on their weights.
    pub fn min_parameters(&self, first: usize) -> f64 {
        match self {
            Self::Swin(c) => (first..c.num_stages())
                .map(|i| c.depths[i] as f64 * swin_block_weights(c.stage_dim(i) as f64, c.mlp_ratio))
                .sum(),
            Self::ResNet(c) => c.min_parameters(first),
            Self::ConvNext(c) => c.min_parameters(first),
        }
    }

    /// Checks the family's configuration.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Swin(c) => c.validate(),
            Self::ResNet(c) => c.validate(),
            Self::ConvNext(c) => c.validate(),
        }
    }
}

/// A family's fields after its `family` key.
#[derive(Serialize)]
struct Tagged<'a, T> {
    family: &'static str,
    #[serde(flatten)]
    config: &'a T,
}

impl Serialize for BackboneConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let family = self.family();
        match self {
            Self::Swin(config) => Tagged { family, config }.serialize(serializer),
            Self::ResNet(config) => Tagged { family, config }.serialize(serializer),
            Self::ConvNext(config) => Tagged { family, config }.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for BackboneConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut table = toml::Table::deserialize(deserializer)?;
        let family = match table.remove("family") {
            None => "swin".to_string(),
            Some(toml::Value::String(family)) => family,
            Some(other) => return Err(D::Error::custom(format!("family must be a string, not {other}"))),
        };
        let value = toml::Value::Table(table);
        match family.as_str() {
            "swin" => value.try_into().map(Self::Swin),
            "resnet" => value.try_into().map(Self::ResNet),
            "convnext" => value.try_into().map(Self::ConvNext),
            other => {
                return Err(D::Error::custom(format!(
                    "unknown backbone family {other:?}; families: swin, resnet, convnext"
                )))
            }
        }
        .map_err(|e| D::Error::custom(format!("{family} backbone: {}", e.message())))
    }
}

/// Weights of one Swin block of width `dim`: qkv and proj (4·dim²) and the
/// MLP (2·ratio·dim²).
fn swin_block_weights(dim: f64, mlp_ratio: f64) -> f64 {
    (4.0 + 2.0 * mlp_ratio) * dim * dim
}

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

/// Widths and sides above this are refused: no real model comes near, and
/// products of them stay far from overflowing.
const MAX_SIZE: i64 = 1 << 16;

/// Most blocks a stage may declare (Swin-S3-B's deepest has 30).
const MAX_DEPTH: usize = 256;

/// Most values one of g_a's tensors may hold for one image (1 GiB of `f32`;
/// the reference's largest is 112² × 48 ≈ 0.6 M).
pub const MAX_ACTIVATION_VALUES: u64 = 1 << 28;

/// Checks a CNN family's per-stage lists: `depths` (blocks per stage,
/// named `what` in errors) and `widths` agree in length (1 to 8 stages),
/// every entry is a size, no depth exceeds [`MAX_DEPTH`], and `img_size`
/// is a multiple of the network's `stride` so every stage has a grid.
fn check_stages(
    family: &str,
    (what, depths): (&str, &[i64]),
    widths: &[i64],
    img_size: i64,
    stride: i64,
) -> Result<()> {
    let stages = depths.len();
    if stages == 0 || stages > 8 || widths.len() != stages {
        return Err(Error::Invalid(format!(
            "{family} has {stages} stage depths and {} widths: give 1 to 8 stages, one of each per stage",
            widths.len()
        )));
    }
    for (i, (&depth, &width)) in depths.iter().zip(widths).enumerate() {
        check_size(&format!("backbone.{what}[{i}]"), depth)?;
        if depth > MAX_DEPTH as i64 {
            return Err(Error::Invalid(format!(
                "backbone.{what}[{i}] is {depth}; at most {MAX_DEPTH}"
            )));
        }
        check_size(&format!("backbone width of stage {i}"), width)?;
    }
    if img_size % stride != 0 {
        return Err(Error::Invalid(format!(
            "backbone.img_size {img_size} must be a multiple of {stride} (the stem's stride and a factor 2 per stage after the first)"
        )));
    }
    Ok(())
}

/// Checks a stochastic-depth rate.
fn check_drop_path_rate(rate: f64) -> Result<()> {
    if (0.0..1.0).contains(&rate) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "backbone.drop_path_rate is {rate}; it must lie in [0, 1)"
        )))
    }
}

/// The names of a preset table of `(timm name, parameters)` rows.
const fn table_names<T, const N: usize>(table: &[(&'static str, T); N]) -> [&'static str; N] {
    let mut names = [""; N];
    let mut i = 0;
    while i < N {
        names[i] = table[i].0;
        i += 1;
    }
    names
}

fn check_size(what: &str, value: i64) -> Result<()> {
    if (1..=MAX_SIZE).contains(&value) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} is {value}; it must lie in 1..={MAX_SIZE}"
        )))
    }
}

impl CompressorConfig {
    /// Whether `other` has this configuration's edge encoder and latent:
    /// the fields payloads depend on.
    pub fn same_encoder(&self, other: &Self) -> bool {
        self.input_size == other.input_size
            && self.encoder_hidden == other.encoder_hidden
            && self.latent_channels == other.latent_channels
            && self.act_after_conv1 == other.act_after_conv1
    }

    /// Side of the latent grid (input / 8).
    pub fn latent_size(&self) -> i64 {
        self.input_size / 8
    }

    /// Shape of one image's latent.
    pub fn latent_shape(&self) -> LatentShape {
        let side = self.latent_size() as u32;
        LatentShape::new(self.latent_channels as u32, side, side)
    }

    /// A lower bound on the compressor's parameters: g_a's kernels and the
    /// decoder's blocks as `blueprint` builds them (see
    /// [`Architecture::min_parameters`]).
    pub fn min_parameters(&self, blueprint: DecoderBlueprint) -> f64 {
        self.encoder_min_parameters() + self.decoder_min_parameters(blueprint)
    }

    /// g_a's kernels.
    pub fn encoder_min_parameters(&self) -> f64 {
        let [h1, h2] = self.encoder_hidden.map(|w| w as f64);
        let widths = [3.0, h1, h2, self.latent_channels as f64];
        widths
            .windows(2)
            .map(|w| 9.0 * w[0] * w[1] + 9.0 * w[1] * w[1] + w[0] * w[1])
            .sum()
    }

    /// The decoder's blocks as `blueprint` builds them.
    pub fn decoder_min_parameters(&self, blueprint: DecoderBlueprint) -> f64 {
        let block = |dim: i64| match blueprint {
            DecoderBlueprint::Swin => swin_block_weights(dim as f64, 4.0),
            DecoderBlueprint::Conv { .. } => 18.0 * (dim * dim) as f64,
        };
        self.decoder_depth as f64 * block(self.decoder_dim) + self.recon_depth as f64 * block(self.recon_dim)
    }

    /// Checks that every width and side is positive and bounded, that the
    /// input is a multiple of g_a's stride (8), and that g_a's activations
    /// for one image stay within [`MAX_ACTIVATION_VALUES`] per tensor.
    pub fn validate(&self) -> Result<()> {
        check_size("compressor.input_size", self.input_size)?;
        if self.input_size % 8 != 0 {
            return Err(Error::Invalid(format!(
                "compressor.input_size {} is not a multiple of 8 (g_a's stride)",
                self.input_size
            )));
        }
        for (what, value) in [
            ("compressor.encoder_hidden[0]", self.encoder_hidden[0]),
            ("compressor.encoder_hidden[1]", self.encoder_hidden[1]),
            ("compressor.latent_channels", self.latent_channels),
            ("compressor.decoder_dim", self.decoder_dim),
            ("compressor.decoder_heads", self.decoder_heads),
            ("compressor.recon_dim", self.recon_dim),
            ("compressor.recon_heads", self.recon_heads),
            ("compressor.target_dim", self.target_dim),
            ("compressor.window", self.window),
        ] {
            check_size(what, value)?;
        }
        for (what, value) in [
            ("compressor.decoder_depth", self.decoder_depth),
            ("compressor.recon_depth", self.recon_depth),
        ] {
            if value > MAX_DEPTH {
                return Err(Error::Invalid(format!("{what} is {value}; at most {MAX_DEPTH}")));
            }
        }
        let side = self.input_size as u64;
        let [h1, h2] = self.encoder_hidden.map(|w| w as u64);
        for (stride, channels) in [(1, 3), (2, h1), (4, h2), (8, self.latent_channels as u64)] {
            let values = (side / stride).pow(2) * channels;
            if values > MAX_ACTIVATION_VALUES {
                return Err(Error::Invalid(format!(
                    "g_a's tensor of {channels} channels at {0}×{0} holds {values} values for one image, more than the {MAX_ACTIVATION_VALUES} allowed",
                    side / stride
                )));
            }
        }
        Ok(())
    }
}

/// Architecture of a Swin Transformer, named after timm's presets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwinConfig {
    /// Input side in pixels (square).
    pub img_size: i64,
    /// Patch side of the stem.
    pub patch_size: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Classes of the head.
    pub num_classes: i64,
    /// Width of the first stage; doubles per stage.
    pub embed_dim: i64,
    /// Blocks per stage.
    pub depths: Vec<i64>,
    /// Attention heads per stage.
    pub num_heads: Vec<i64>,
    /// Attention window per stage (Swin-S3 varies it).
    pub window_sizes: Vec<i64>,
    /// MLP expansion.
    pub mlp_ratio: f64,
    /// Whether `qkv` has a bias.
    pub qkv_bias: bool,
    /// Stochastic depth at the last block, growing linearly from 0.
    pub drop_path_rate: f64,
}

/// One of timm's 224-pixel, 1000-class Swin presets.
struct SwinPreset {
    name: &'static str,
    embed_dim: i64,
    depths: [i64; 4],
    num_heads: [i64; 4],
    window_sizes: [i64; 4],
}

/// timm's Swin-S3 (AutoFormerV2) and Swin v1 presets, by timm's names.
const SWIN_PRESETS: [SwinPreset; 6] = [
    SwinPreset {
        name: "swin_s3_tiny_224",
        embed_dim: 96,
        depths: [2, 2, 6, 2],
        num_heads: [3, 6, 12, 24],
        window_sizes: [7, 7, 14, 7],
    },
    SwinPreset {
        name: "swin_s3_small_224",
        embed_dim: 96,
        depths: [2, 2, 18, 2],
        num_heads: [3, 6, 12, 24],
        window_sizes: [14, 14, 14, 7],
    },
    SwinPreset {
        name: "swin_s3_base_224",
        embed_dim: 96,
        depths: [2, 2, 30, 2],
        num_heads: [3, 6, 12, 24],
        window_sizes: [7, 7, 14, 7],
    },
    SwinPreset {
        name: "swin_tiny_patch4_window7_224",
        embed_dim: 96,
        depths: [2, 2, 6, 2],
        num_heads: [3, 6, 12, 24],
        window_sizes: [7; 4],
    },
    SwinPreset {
        name: "swin_small_patch4_window7_224",
        embed_dim: 96,
        depths: [2, 2, 18, 2],
        num_heads: [3, 6, 12, 24],
        window_sizes: [7; 4],
    },
    SwinPreset {
        name: "swin_base_patch4_window7_224",
        embed_dim: 128,
        depths: [2, 2, 18, 2],
        num_heads: [4, 8, 16, 32],
        window_sizes: [7; 4],
    },
];

const fn preset_names<const N: usize>(table: &[SwinPreset; N]) -> [&'static str; N] {
    let mut names = [""; N];
    let mut i = 0;
    while i < N {
        names[i] = table[i].name;
        i += 1;
    }
    names
}

impl SwinConfig {
    /// Names accepted by [`SwinConfig::preset`].
    pub const PRESETS: [&'static str; SWIN_PRESETS.len()] = preset_names(&SWIN_PRESETS);

    /// The preset called `name` (timm's model name).
    pub fn preset(name: &str) -> Option<Self> {
        let preset = SWIN_PRESETS.iter().find(|p| p.name == name)?;
        Some(Self {
            img_size: 224,
            patch_size: 4,
            in_chans: 3,
            num_classes: 1000,
            embed_dim: preset.embed_dim,
            depths: preset.depths.to_vec(),
            num_heads: preset.num_heads.to_vec(),
            window_sizes: preset.window_sizes.to_vec(),
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_path_rate: 0.1,
        })
    }

    /// timm `swin_s3_base_224`, FrankenSplit's backbone.
    pub fn swin_s3_base_224() -> Self {
        Self::preset("swin_s3_base_224").expect("a preset of the table")
    }

    /// Number of stages.
    pub fn num_stages(&self) -> usize {
        self.depths.len()
    }

    /// Width of stage `i`.
    pub fn stage_dim(&self, i: usize) -> i64 {
        self.embed_dim << i
    }

    /// Grid side at the input of stage `i`.
    pub fn stage_resolution(&self, i: usize) -> i64 {
        (self.img_size / self.patch_size) >> i
    }

    /// Shape `(tokens, channels)` of what stage `i` receives: the output of
    /// timm 0.8's `layers[i - 1]` (FrankenSplit's injection point for `i = 2`).
    pub fn stage_input_shape(&self, i: usize) -> (i64, i64) {
        let side = self.stage_resolution(i);
        (side * side, self.stage_dim(i))
    }

    /// Checks that the per-stage lists agree and every size is positive and bounded.
    pub fn validate(&self) -> Result<()> {
        let stages = self.depths.len();
        if stages == 0 || stages > 8 || self.num_heads.len() != stages || self.window_sizes.len() != stages {
            return Err(Error::Invalid(format!(
                "backbone has {stages} depths, {} head counts and {} window sizes: give 1 to 8 stages, one of each per stage",
                self.num_heads.len(),
                self.window_sizes.len()
            )));
        }
        for (what, value) in [
            ("backbone.img_size", self.img_size),
            ("backbone.patch_size", self.patch_size),
            ("backbone.in_chans", self.in_chans),
            ("backbone.num_classes", self.num_classes),
            ("backbone.embed_dim", self.embed_dim),
        ] {
            check_size(what, value)?;
        }
        if !(self.mlp_ratio > 0.0 && self.mlp_ratio <= 64.0) {
            return Err(Error::Invalid(format!(
                "backbone.mlp_ratio is {}; it must lie in (0, 64]",
                self.mlp_ratio
            )));
        }
        for i in 0..stages {
            check_size("backbone.depths[i]", self.depths[i])?;
            if self.depths[i] > MAX_DEPTH as i64 {
                return Err(Error::Invalid(format!(
                    "backbone.depths[{i}] is {}; at most {MAX_DEPTH}",
                    self.depths[i]
                )));
            }
            check_size("backbone.num_heads[i]", self.num_heads[i])?;
            check_size("backbone.window_sizes[i]", self.window_sizes[i])?;
        }
        if self.embed_dim.checked_shl(stages as u32).is_none_or(|w| w > MAX_SIZE) {
            return Err(Error::Invalid(format!(
                "backbone.embed_dim {} doubled over {stages} stages exceeds {MAX_SIZE}",
                self.embed_dim
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_name_builds_its_preset() {
        for name in SwinConfig::PRESETS {
            let config = SwinConfig::preset(name).unwrap();
            config.validate().unwrap();
        }
        assert!(SwinConfig::preset("swin_huge").is_none());
    }

    #[test]
    fn every_cnn_preset_builds_timms_shapes() {
        for name in ResNetConfig::PRESETS {
            ResNetConfig::preset(name).unwrap().validate().unwrap();
        }
        for name in ConvNextConfig::PRESETS {
            ConvNextConfig::preset(name).unwrap().validate().unwrap();
        }
        // timm: resnet50's layer2 outputs 512 × 28 × 28 and it classifies 2048
        // features; convnext_tiny's stages.1 outputs 192 × 28 × 28.
        let resnet50 = ResNetConfig::preset("resnet50").unwrap();
        assert_eq!(resnet50.stage_input_shape(2), (512, 28));
        assert_eq!(resnet50.num_features(), 2048);
        assert_eq!(ResNetConfig::preset("resnet18").unwrap().num_features(), 512);
        let tiny = ConvNextConfig::preset("convnext_tiny").unwrap();
        assert_eq!(tiny.stage_input_shape(2), (192, 28));
        assert_eq!(tiny.mlp_hidden(3), 3072);
        assert!(ResNetConfig::preset("resnet51").is_none() && ConvNextConfig::preset("convnext").is_none());
    }

    #[test]
    fn the_cnn_parameter_bounds_stay_below_timms_counts() {
        // timm's parameter counts: resnet50 25.56 M, resnet18 11.69 M,
        // convnext_tiny 28.59 M, convnext_atto 3.70 M (3,695,520).
        for (bound, count) in [
            (ResNetConfig::preset("resnet50").unwrap().min_parameters(0), 25.56e6),
            (ResNetConfig::preset("resnet18").unwrap().min_parameters(0), 11.69e6),
            (
                ConvNextConfig::preset("convnext_tiny").unwrap().min_parameters(0),
                28.59e6,
            ),
            (
                ConvNextConfig::preset("convnext_atto").unwrap().min_parameters(0),
                3.6955e6,
            ),
        ] {
            assert!(bound > 0.6 * count && bound <= count, "{bound} against {count}");
        }
    }

    #[test]
    fn cnn_sizes_no_network_can_have_are_refused() {
        let mut resnet = ResNetConfig::preset("resnet50").unwrap();
        resnet.img_size = 100;
        assert!(resnet.validate().unwrap_err().to_string().contains("multiple of 32"));
        let mut resnet = ResNetConfig::preset("resnet18").unwrap();
        resnet.channels.pop();
        assert!(resnet.validate().is_err());
        let mut convnext = ConvNextConfig::preset("convnext_tiny").unwrap();
        convnext.depths[2] = 100_000;
        assert!(convnext.validate().is_err());
        let mut convnext = ConvNextConfig::preset("convnext_tiny").unwrap();
        convnext.patch_size = 0;
        assert!(convnext.validate().is_err());
    }

    #[test]
    fn the_default_architecture_is_the_papers() {
        let arch = Architecture::default();
        arch.validate().unwrap();
        assert_eq!(arch.latent_shape(), LatentShape::new(48, 28, 28));
        assert_eq!(
            arch.backbone.split_features(2),
            Features::Tokens { tokens: 196, dim: 384 }
        );
        assert_eq!(arch.blueprint(), DecoderBlueprint::Swin);
    }

    /// The reference compressor in front of a CNN preset, its decoder
    /// widened to the split point's channels.
    fn cnn_architecture(name: &str) -> Architecture {
        let backbone = BackboneConfig::preset(name).unwrap();
        let Features::Map { channels, .. } = backbone.split_features(2) else {
            panic!("{name} is a CNN");
        };
        Architecture {
            compressor: CompressorConfig {
                target_dim: channels,
                ..CompressorConfig::default()
            },
            backbone,
            split_stage: 2,
        }
    }

    #[test]
    fn cnn_backbones_get_the_convolutional_blueprint_at_their_split_grid() {
        for name in ["resnet50", "resnet18", "convnext_tiny", "convnext_atto"] {
            let arch = cnn_architecture(name);
            arch.validate().unwrap();
            // Stride 8 at 224 pixels: the latent's own 28×28 grid.
            assert_eq!(arch.blueprint(), DecoderBlueprint::Conv { side: 28 }, "{name}");
        }
        // Split after layer1 (56×56): twice the latent's side, still reachable.
        let mut arch = cnn_architecture("resnet50");
        arch.split_stage = 1;
        arch.compressor.target_dim = 256;
        arch.validate().unwrap();
        assert_eq!(arch.blueprint(), DecoderBlueprint::Conv { side: 56 });
        // Split after layer3 (14×14): half of it.
        arch.split_stage = 3;
        arch.compressor.target_dim = 1024;
        arch.validate().unwrap();
        assert_eq!(arch.blueprint(), DecoderBlueprint::Conv { side: 14 });
        // At 256 pixels a fifth stage's input (8×8) is a quarter of the
        // latent's side (32), which no blueprint reaches.
        if let BackboneConfig::ResNet(resnet) = &mut arch.backbone {
            resnet.layers.push(2);
            resnet.channels.push(1024);
        }
        arch.backbone.set_img_size(256);
        arch.compressor.input_size = 256;
        arch.split_stage = 4;
        arch.compressor.target_dim = 2048;
        let message = arch.validate().unwrap_err().to_string();
        assert!(message.contains("expects a 2048×8×8 feature map"), "{message}");
    }

    #[test]
    fn backbone_tables_name_their_family_and_old_ones_are_swin() {
        for name in ["swin_s3_tiny_224", "resnet50", "convnext_atto"] {
            let arch = if name.starts_with("swin") {
                Architecture {
                    backbone: BackboneConfig::preset(name).unwrap(),
                    compressor: CompressorConfig::default(),
                    split_stage: 2,
                }
            } else {
                cnn_architecture(name)
            };
            let text = toml::to_string(&arch).unwrap();
            assert!(
                text.contains(&format!("family = \"{}\"", arch.backbone.family())),
                "{text}"
            );
            assert_eq!(Architecture::from_toml(&text).unwrap(), arch);
        }
        let old = toml::to_string(&Architecture::default())
            .unwrap()
            .replace("family = \"swin\"\n", "");
        assert!(!old.contains("family"));
        assert_eq!(Architecture::from_toml(&old).unwrap(), Architecture::default());
        let unknown = old.replace("[backbone]\n", "[backbone]\nfamily = \"vgg\"\n");
        let message = Architecture::from_toml(&unknown).unwrap_err().to_string();
        assert!(message.contains("unknown backbone family \"vgg\""), "{message}");
        let wrong_field = toml::to_string(&cnn_architecture("resnet18"))
            .unwrap()
            .replace("block = \"basic\"", "block = \"dense\"");
        let message = Architecture::from_toml(&wrong_field).unwrap_err().to_string();
        assert!(
            message.contains("resnet backbone") && message.contains("dense"),
            "{message}"
        );
    }

    #[test]
    fn a_decoder_that_does_not_fit_the_split_point_is_refused() {
        let mut arch = Architecture::default();
        arch.compressor.target_dim = 192;
        assert!(arch
            .validate()
            .unwrap_err()
            .to_string()
            .contains("expects 196 tokens of width 384"));
        let arch = Architecture {
            split_stage: 4,
            ..Architecture::default()
        };
        assert!(arch.validate().is_err());
    }

    #[test]
    fn sizes_no_network_can_have_are_refused() {
        let mut arch = Architecture::default();
        arch.compressor.latent_channels = 0;
        assert!(arch.validate().unwrap_err().to_string().contains("latent_channels"));
        let mut arch = Architecture::default();
        arch.compressor.input_size = 230;
        assert!(arch.validate().unwrap_err().to_string().contains("multiple of 8"));
        let swin = |change: fn(&mut SwinConfig)| {
            let mut config = SwinConfig::swin_s3_base_224();
            change(&mut config);
            Architecture {
                backbone: BackboneConfig::Swin(config),
                ..Architecture::default()
            }
        };
        assert!(swin(|c| c.window_sizes.truncate(3)).validate().is_err());
        assert!(swin(|c| c.embed_dim = i64::MAX).validate().is_err());
        let mut arch = Architecture::default();
        arch.compressor.input_size = 65_536;
        assert!(arch
            .validate()
            .unwrap_err()
            .to_string()
            .contains("values for one image"));
        assert!(swin(|c| c.depths[3] = 100_000).validate().is_err());
    }

    #[test]
    fn the_parameter_bound_stays_below_the_reference_counts() {
        // The reference compressor holds 2,203,598 parameters (g_a 141,696);
        // the bound counts kernels and matrices only.
        let compressor = CompressorConfig::default().min_parameters(DecoderBlueprint::Swin);
        assert!(compressor > 1.0e6 && compressor <= 2_203_598.0, "{compressor}");
        // timm's swin_s3_base_224 holds 71.1 M parameters.
        let arch = Architecture::default();
        let whole = arch.min_parameters(true) - compressor;
        assert!(whole > 60e6 && whole <= 71.1e6, "{whole}");
        assert!(arch.min_parameters(false) < arch.min_parameters(true));
    }
}
