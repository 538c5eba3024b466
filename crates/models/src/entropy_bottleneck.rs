//! CompressAI's `EntropyBottleneck` as a trainable module: the per-channel
//! monotone density, noisy or rounded latents with their likelihoods, and the
//! auxiliary quantile loss. The codec crate builds the coding tables from the
//! same parameters ([`EntropyBottleneck::density`]).

use frankensplit_codec::{FactorizedDensity, ParamTensor};
use tch::nn;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Likelihood floor (CompressAI's `likelihood_bound`).
pub const LIKELIHOOD_BOUND: f64 = 1e-9;
/// Probability mass left outside the quantiles (`tail_mass`).
pub const TAIL_MASS: f64 = 1e-9;

/// The factorized prior of a `channels`-channel latent.
#[derive(Debug)]
pub struct EntropyBottleneck {
    channels: i64,
    matrices: Vec<Tensor>,
    biases: Vec<Tensor>,
    factors: Vec<Tensor>,
    quantiles: Tensor,
    target: Tensor,
}

impl EntropyBottleneck {
    /// Registers `matrices.{i}`, `biases.{i}`, `factors.{i}` and `quantiles`
    /// under `p` (CompressAI ≥ 1.2.7 names), initialised as CompressAI does
    /// with `filters = (3, 3, 3, 3)` and `init_scale = 10`.
    pub fn new(p: &nn::Path, channels: i64) -> Self {
        let filters = [1i64, 3, 3, 3, 3, 1];
        let init_scale: f64 = 10.0;
        let scale = init_scale.powf(1.0 / (filters.len() - 1) as f64);
        let layers = filters.len() - 1;
        let mut matrices = Vec::with_capacity(layers);
        let mut biases = Vec::with_capacity(layers);
        let mut factors = Vec::with_capacity(layers - 1);
        for i in 0..layers {
            let init = (1.0 / scale / filters[i + 1] as f64).exp_m1().ln();
            let name = i.to_string();
            let (out, inp) = (filters[i + 1], filters[i]);
            matrices.push((p / "matrices").var(&name, &[channels, out, inp], nn::Init::Const(init)));
            biases.push((p / "biases").var(&name, &[channels, out, 1], nn::Init::Uniform { lo: -0.5, up: 0.5 }));
            if i + 1 < layers {
                factors.push((p / "factors").var(&name, &[channels, out, 1], nn::Init::Const(0.0)));
            }
        }
        let mut quantiles = p.var("quantiles", &[channels, 1, 3], nn::Init::Const(0.0));
        tch::no_grad(|| {
            let init = Tensor::from_slice(&[-init_scale as f32, 0.0, init_scale as f32]).to_device(p.device());
            quantiles.copy_(&init.view([1, 1, 3]).expand([channels, 1, 3], false));
        });
        let t = (2.0 / TAIL_MASS - 1.0).ln() as f32;
        let target = Tensor::from_slice(&[-t, 0.0, t]).to_device(p.device());
        Self {
            channels,
            matrices,
            biases,
            factors,
            quantiles,
            target,
        }
    }

    /// Number of channels.
    pub fn channels(&self) -> i64 {
        self.channels
    }

    /// `quantiles[:, 0, 1]`, the per-channel medians, shape `(C,)`.
    pub fn medians(&self) -> Tensor {
        self.quantiles.select(1, 0).select(1, 1)
    }

    /// The cumulative logits of `inputs` `(C, 1, N)`; with `stop_gradient`
    /// the density parameters receive no gradient (the aux loss trains only
    /// the quantiles).
    pub fn logits_cumulative(&self, inputs: &Tensor, stop_gradient: bool) -> Tensor {
        let detach = |t: &Tensor| if stop_gradient { t.detach() } else { t.shallow_clone() };
        let mut logits = inputs.shallow_clone();
        for i in 0..self.matrices.len() {
            logits = detach(&self.matrices[i]).softplus().matmul(&logits) + detach(&self.biases[i]);
            if let Some(factor) = self.factors.get(i) {
                logits = &logits + detach(factor).tanh() * logits.tanh();
            }
        }
        logits
    }

    /// `sigmoid(l(x + ½)) − sigmoid(l(x − ½))` (CompressAI ≥ 1.2.5).
    pub fn likelihood(&self, inputs: &Tensor) -> Tensor {
        let lower = self.logits_cumulative(&(inputs - 0.5), false);
        let upper = self.logits_cumulative(&(inputs + 0.5), false);
        upper.sigmoid() - lower.sigmoid()
    }

    /// `(ŷ, p(ŷ))` for a latent `(B, C, H, W)`: in training `ŷ = y + U(−½, ½)`,
    /// otherwise `ŷ = round(y − median) + median`. Likelihoods are floored at
    /// 1e-9 with CompressAI's `LowerBound` gradient, which lets the gradient of
    /// a rate loss through below the floor as well.
    pub fn forward_t(&self, y: &Tensor, train: bool) -> (Tensor, Tensor) {
        if train {
            self.forward_noisy(y, &(Tensor::rand_like(y) - 0.5))
        } else {
            self.forward_quantized(y, None)
        }
    }

    /// The training path with given uniform noise (same shape as `y`), for
    /// reproducing a step exactly: `ŷ = y + noise`.
    pub fn forward_noisy(&self, y: &Tensor, noise: &Tensor) -> (Tensor, Tensor) {
        self.forward_quantized(y, Some(noise))
    }

    fn forward_quantized(&self, y: &Tensor, noise: Option<&Tensor>) -> (Tensor, Tensor) {
        let size = y.size();
        let c = size[1];
        let values = y.transpose(0, 1).contiguous().view([c, 1, -1]);
        let medians = self.medians().detach().view([c, 1, 1]);
        let outputs = match noise {
            Some(noise) => &values + noise.transpose(0, 1).contiguous().view([c, 1, -1]),
            None => (&values - &medians).round() + &medians,
        };
        let likelihood = self.likelihood(&outputs);
        let floored = lower_bound(&likelihood, LIKELIHOOD_BOUND);
        let mut permuted = size.clone();
        permuted.swap(0, 1);
        let restore = |t: Tensor| t.view(permuted.as_slice()).transpose(0, 1).contiguous();
        (restore(outputs), restore(floored))
    }

    /// CompressAI's `loss()`: `Σ |l(quantiles) − target|`, training the quantiles only.
    pub fn aux_loss(&self) -> Tensor {
        (self.logits_cumulative(&self.quantiles, true) - &self.target)
            .abs()
            .sum(Kind::Float)
    }

    /// The density as the codec crate's parameter set, to build coding tables.
    pub fn density(&self) -> Result<FactorizedDensity> {
        let param = |t: &Tensor| -> Result<ParamTensor> {
            let t = t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
            let shape = t.size().iter().map(|&d| d as usize).collect();
            let data = Vec::<f32>::try_from(t.view([-1])).map_err(Error::from)?;
            Ok(ParamTensor { shape, data })
        };
        let matrices = self.matrices.iter().map(param).collect::<Result<Vec<_>>>()?;
        let biases = self.biases.iter().map(param).collect::<Result<Vec<_>>>()?;
        let factors = self.factors.iter().map(param).collect::<Result<Vec<_>>>()?;
        let quantiles = param(&self.quantiles)?.data;
        Ok(FactorizedDensity::new(
            self.channels as usize,
            matrices,
            biases,
            factors,
            quantiles,
        )?)
    }
}

/// `max(x, bound)` whose gradient passes unchanged, which equals CompressAI's
/// `LowerBound` whenever the incoming gradient is negative, as it always is
/// for a rate term `−log p`.
fn lower_bound(x: &Tensor, bound: f64) -> Tensor {
    x.clamp_min(bound).detach() + x - x.detach()
}
