//! The training losses: the teacher's cross-entropy and the compressor's
//! distortion (saliency-weighted in stage 2) plus λ times its bits, with the
//! values a step reports.

use frankensplit_models::{Backbone, Compressor};
use tch::nn::{Module, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::state::Models;

/// Runs `f` under autocast (mixed precision) when `enabled`.
pub(crate) fn autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if enabled {
        tch::autocast(true, f)
    } else {
        f()
    }
}

/// Loss values of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepTerms {
    /// The loss.
    pub loss: f64,
    /// The distortion term (compressor stages).
    pub distortion: Option<f64>,
    /// Σ bits of the batch (compressor stages).
    pub bits: Option<f64>,
}

impl StepTerms {
    /// The values of `[loss, distortion, bits]` (a compressor's; a teacher's
    /// loss alone when `compressor` is false), read from a tensor of three.
    pub(crate) fn read(terms: &Tensor, compressor: bool) -> Self {
        let host = Vec::<f64>::try_from(terms.to_kind(Kind::Double).to_device(Device::Cpu).reshape([-1]))
            .unwrap_or_else(|_| vec![f64::NAN; 3]);
        Self {
            loss: host[0],
            distortion: compressor.then_some(host[1]),
            bits: compressor.then_some(host[2]),
        }
    }
}

/// The loss of a compressor step, with its terms.
pub struct CompressorLoss {
    /// What to back-propagate.
    pub loss_tensor: Tensor,
    /// `[loss, distortion, bits]` (`f64`, detached), where the step computed
    /// them: reading them is a synchronisation on a GPU, so a run sums them
    /// there and reads the sums when it logs.
    pub terms: Tensor,
}

impl CompressorLoss {
    /// The loss and its terms on the host (a synchronisation on a GPU).
    pub fn values(&self) -> StepTerms {
        StepTerms::read(&self.terms, true)
    }
}

/// The compressor's training loss on a batch: the teacher's features `h`
/// after stage `split − 1` (no gradient), the student's `h̃` through the
/// noisy bottleneck, distortion `Σ(h − h̃)²` — or with a saliency map
/// `(B, 1, H, W)`, `Σ(d + d⊙s)/2` with `s` nearest-resized to the token
/// grid or feature map — plus `λ · Σ −log₂ p(ỹ)`. `noise` fixes the latent noise
/// (drawn from torch's generator when `None`).
pub fn compressor_loss(
    compressor: &Compressor,
    teacher_head: &Backbone,
    x: &Tensor,
    lmbda: f64,
    saliency: Option<&Tensor>,
    noise: Option<&Tensor>,
) -> CompressorLoss {
    let target = tch::no_grad(|| teacher_head.forward_t(x, false));
    let out = match noise {
        Some(noise) => compressor.forward_noisy(x, noise),
        None => compressor.forward_t(x, true),
    };
    let d = (&out.features - &target).square();
    let distortion = match saliency {
        None => d.sum(Kind::Float),
        Some(maps) => {
            // Tokens `(B, L, C)` on a square grid, or a map `(B, C, H, W)`.
            let s = match d.size()[..] {
                [batch, tokens, _] => {
                    let side = (tokens as f64).sqrt().round() as i64;
                    maps.upsample_nearest2d([side, side], None, None)
                        .view([batch, tokens, 1])
                }
                _ => maps.upsample_nearest2d([d.size()[2], d.size()[3]], None, None),
            };
            ((&d + &d * s).sum(Kind::Float)) / 2.0
        }
    };
    let bits = out.likelihoods.log2().sum(Kind::Float).neg();
    let loss = &distortion + &bits * lmbda;
    let terms = Tensor::stack(&[&loss, &distortion, &bits], 0)
        .detach()
        .to_kind(Kind::Double);
    CompressorLoss {
        loss_tensor: loss,
        terms,
    }
}

/// A teacher step's loss: the cross-entropy of the whole backbone's logits
/// (computed under autocast when `amp`, the loss itself in `f32`). A frozen
/// head runs in evaluation mode and without a graph.
pub(crate) fn teacher_step(
    models: &Models,
    x: &Tensor,
    labels: &Tensor,
    label_smoothing: f64,
    freeze_head: bool,
    amp: bool,
) -> Tensor {
    let logits = autocast(amp, || {
        let features = if freeze_head {
            tch::no_grad(|| models.head.forward_t(x, false))
        } else {
            models.head.forward_t(x, true)
        };
        models.tail.forward_t(&features, true)
    });
    logits
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Mean, -100, label_smoothing)
}

/// A `decoder` stage's loss: the teacher's features `h` against the
/// decoder's `h̃` from the dequantised latent `ŷ = round(y − median) +
/// median` of the frozen encoder and prior (what the server decodes),
/// `Σ(h − h̃)²`; the bits are reported, not trained (the rate is fixed).
pub fn decoder_loss(compressor: &Compressor, teacher_head: &Backbone, x: &Tensor) -> CompressorLoss {
    let target = tch::no_grad(|| teacher_head.forward_t(x, false));
    let (y_hat, likelihoods) = tch::no_grad(|| {
        let y = compressor.g_a.forward(x);
        compressor.entropy_bottleneck.forward_t(&y, false)
    });
    let features = compressor.g_s.forward_t(&y_hat, true);
    let distortion = (&features - &target).square().sum(Kind::Float);
    let bits = likelihoods.log2().sum(Kind::Float).neg();
    let terms = Tensor::stack(&[&distortion, &distortion, &bits], 0)
        .detach()
        .to_kind(Kind::Double);
    CompressorLoss {
        loss_tensor: distortion,
        terms,
    }
}

/// [`decoder_loss`] on the run's models, under autocast when `amp`.
pub(crate) fn decoder_step(models: &Models, x: &Tensor, amp: bool) -> CompressorLoss {
    autocast(amp, || decoder_loss(&models.compressor, &models.head, x))
}

/// A compressor step's loss on the run's models (the latent noise drawn
/// when `noise` is `None`), under autocast when `amp`.
pub(crate) fn compressor_step(
    models: &Models,
    x: &Tensor,
    lmbda: f64,
    saliency: Option<&Tensor>,
    noise: Option<&Tensor>,
    amp: bool,
) -> CompressorLoss {
    autocast(amp, || {
        compressor_loss(&models.compressor, &models.head, x, lmbda, saliency, noise)
    })
}
