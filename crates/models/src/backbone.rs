//! A backbone of any family the project builds, behind one interface: what
//! the bundle, training and saliency code call without knowing the family.

use std::collections::BTreeSet;
use std::ops::Range;

use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

pub use frankensplit_bundle::config::{BackboneConfig, Features};

use crate::convnext::ConvNext;
use crate::resnet::ResNet;
use crate::swin::SwinTransformer;

/// A backbone, or the stages of it in a range (see each family's `new`).
#[derive(Debug)]
pub enum Backbone {
    /// Swin / Swin-S3: tokens `(B, L, C)` between stages.
    Swin(SwinTransformer),
    /// ResNet: feature maps `(B, C, H, W)` between stages.
    ResNet(ResNet),
    /// ConvNeXt: feature maps `(B, C, H, W)` between stages.
    ConvNext(ConvNext),
}

impl Backbone {
    /// Registers the modules of `stages` under `p` with timm's names.
    pub fn new(p: &nn::Path, config: &BackboneConfig, stages: Range<usize>) -> Self {
        match config {
            BackboneConfig::Swin(c) => Self::Swin(SwinTransformer::new(p, c, stages)),
            BackboneConfig::ResNet(c) => Self::ResNet(ResNet::new(p, c, stages)),
            BackboneConfig::ConvNext(c) => Self::ConvNext(ConvNext::new(p, c, stages)),
        }
    }

    /// Names of the variables of the stages before `split` (the part of a
    /// backbone that a compressor stands in for), as [`Backbone::new`]
    /// registers them.
    pub fn head_names(config: &BackboneConfig, split: usize) -> BTreeSet<String> {
        let vs = nn::VarStore::new(Device::Cpu);
        tch::no_grad(|| drop(Self::new(&vs.root(), config, 0..split)));
        vs.variables().into_keys().collect()
    }

    /// The stages this instance holds.
    pub fn stages(&self) -> Range<usize> {
        match self {
            Self::Swin(m) => m.stages(),
            Self::ResNet(m) => m.stages(),
            Self::ConvNext(m) => m.stages(),
        }
    }

    /// The features after the last stage held (before pooling and the
    /// classifier when it holds them).
    pub fn forward_features_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Self::Swin(m) => m.forward_features_t(x, train),
            Self::ResNet(m) => m.forward_features_t(x, train),
            Self::ConvNext(m) => m.forward_features_t(x, train),
        }
    }

    /// [`Backbone::forward_features_t`] plus one activation per held stage,
    /// the layers XGradCAM reads: Swin's last `norm1` tokens `(B, L, C)`,
    /// a CNN's stage output `(B, C, H, W)`.
    pub fn forward_probed(&self, x: &Tensor, train: bool) -> (Tensor, Vec<Tensor>) {
        match self {
            Self::Swin(m) => m.forward_probed(x, train),
            Self::ResNet(m) => m.forward_probed(x, train),
            Self::ConvNext(m) => m.forward_probed(x, train),
        }
    }

    /// Logits from [`Backbone::forward_features_t`]'s output when this
    /// instance holds the last stage; otherwise the features.
    pub fn classify_features(&self, features: &Tensor) -> Tensor {
        match self {
            Self::Swin(m) => m.classify_features(features),
            Self::ResNet(m) => m.classify_features(features),
            Self::ConvNext(m) => m.classify_features(features),
        }
    }
}

impl ModuleT for Backbone {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.classify_features(&self.forward_features_t(x, train))
    }
}
