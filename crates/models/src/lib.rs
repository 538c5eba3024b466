//! FrankenSplit's networks on libtorch (through `tch`), with the reference's
//! module and parameter names so PyTorch checkpoints load as they are:
//!
//! * [`compressor`]: the compressor (edge encoder `g_a`, entropy
//!   bottleneck, Conv-Swin decoder `g_s` with its `SwinReconLayer`);
//! * [`swin`]: Swin / Swin-S3 backbones with per-stage windows, buildable for
//!   a range of stages so the head and tail of a split run separately;
//! * [`resnet`] and [`convnext`]: the convolutional families, as timm builds
//!   them and splittable the same way; [`backbone`]: any of the three behind
//!   one interface;
//! * [`entropy_bottleneck`]: CompressAI's factorized prior as a trainable
//!   module, whose parameters the codec crate turns into coding tables;
//! * [`device`]: the device names every command accepts (`cpu`, `cuda`,
//!   `cuda:N`) and the server-side [`Precision`] (f32, bf16, f16);
//! * [`layers`]: the residual block and token helpers they share;
//! * [`weights`]: checkpoint key mapping (CompressAI and timm namings and shapes);
//! * [`convert`] and [`bundle`]: reference checkpoints in, model bundles out
//!   (the bundle's contract itself, manifest and configs, is
//!   `frankensplit-bundle`'s; its types are re-exported here);
//! * [`onnx`]: a bundle's encoder, decoder and backbone tail as ONNX graphs
//!   for other runtimes.
//!
//! The edge path does not need this crate: the codec crate codes latents on
//! its own.

pub mod backbone;
pub mod bundle;
pub mod compressor;
pub mod convert;
pub mod convnext;
pub mod device;
pub mod entropy_bottleneck;
pub mod error;
pub mod layers;
pub mod onnx;
pub mod resnet;
pub mod swin;
pub mod weights;

pub use backbone::{Backbone, BackboneConfig};
pub use bundle::{Architecture, Bundle, Manifest};
pub use compressor::{Compressor, CompressorConfig, DecoderBlueprint};
pub use convnext::{ConvNext, ConvNextConfig};
pub use device::{parse_device, Precision};
pub use error::{Error, Result};
pub use frankensplit_codec::PayloadCodec;
pub use resnet::{ResNet, ResNetConfig};
pub use swin::{SwinConfig, SwinTransformer};
