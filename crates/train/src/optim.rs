//! Adam with PyTorch's update rule and defaults (β = (0.9, 0.999), ε = 1e-8,
//! no weight decay), or AdamW's decoupled weight decay on the matrices and
//! kernels (timm leaves biases and norms undecayed), written out so that its state can be checkpointed and
//! restored exactly (tch's optimiser keeps its state inside libtorch).
//!
//! The moments of all parameters live in two flat buffers and one step
//! updates them with a handful of whole-buffer operations, then each
//! parameter with one: launching a dozen small kernels per parameter tensor
//! is what made a per-tensor loop slow on a GPU.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

/// The optimiser and its moments.
#[derive(Debug)]
pub struct Adam {
    names: Vec<String>,
    params: Vec<Tensor>,
    /// Where each parameter sits in the flat buffers.
    spans: Vec<(i64, i64)>,
    first: Tensor,
    second: Tensor,
    /// Steps taken.
    pub step: i64,
    /// Learning rate of the next step.
    pub lr: f64,
    /// Decoupled weight decay (AdamW): each step first scales the decayed
    /// parameters by `1 − lr · weight_decay`.
    pub weight_decay: f64,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl Adam {
    /// Optimises `params` (name → variable) at learning rate `lr`.
    pub fn new(params: BTreeMap<String, Tensor>, lr: f64) -> Self {
        let mut spans = Vec::with_capacity(params.len());
        let mut offset = 0;
        for p in params.values() {
            let n = p.numel() as i64;
            spans.push((offset, n));
            offset += n;
        }
        let device = params.values().next().map_or(tch::Device::Cpu, Tensor::device);
        let zeros = || Tensor::zeros([offset], (Kind::Float, device));
        let (names, params) = params.into_iter().unzip();
        Self {
            names,
            params,
            spans,
            first: zeros(),
            second: zeros(),
            step: 0,
            lr,
            weight_decay: 0.0,
        }
    }

    /// The optimised variables, in the order of the flat buffers.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The first and second moments, flat (for making every rank's the same).
    pub fn moments(&self) -> [&Tensor; 2] {
        [&self.first, &self.second]
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    /// One update from the accumulated gradients. Variables without a
    /// gradient are left alone with their moments, as PyTorch does.
    pub fn step(&mut self) {
        self.step += 1;
        let correction1 = 1.0 - BETA1.powi(self.step as i32);
        let correction2 = (1.0 - BETA2.powi(self.step as i32)).sqrt();
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        tch::no_grad(|| {
            if self.weight_decay > 0.0 {
                let keep = 1.0 - self.lr * self.weight_decay;
                for (p, g) in self.params.iter().zip(&grads) {
                    if g.defined() && p.dim() >= 2 {
                        let _ = p.shallow_clone().g_mul_scalar_(keep);
                    }
                }
            }
            if grads.iter().all(Tensor::defined) {
                let flat: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).reshape([-1])).collect();
                let g = Tensor::cat(&flat, 0);
                let update = moments_update(&self.first, &self.second, &g, self.lr, correction1, correction2);
                for (p, &(start, n)) in self.params.iter().zip(&self.spans) {
                    let delta = update.narrow(0, start, n).view(p.size().as_slice()).to_kind(p.kind());
                    let _ = p.shallow_clone().g_sub_(&delta);
                }
            } else {
                for ((p, g), &(start, n)) in self.params.iter().zip(&grads).zip(&self.spans) {
                    if !g.defined() {
                        continue;
                    }
                    let (m, v) = (self.first.narrow(0, start, n), self.second.narrow(0, start, n));
                    let g = g.to_kind(Kind::Float).reshape([-1]);
                    let update = moments_update(&m, &v, &g, self.lr, correction1, correction2);
                    let _ = p
                        .shallow_clone()
                        .g_sub_(&update.view(p.size().as_slice()).to_kind(p.kind()));
                }
            }
        });
    }

    /// The moments as named tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for (prefix, buffer) in [("m.", &self.first), ("v.", &self.second)] {
            for ((name, p), &(start, n)) in self.names.iter().zip(&self.params).zip(&self.spans) {
                out.push((
                    format!("{prefix}{name}"),
                    buffer.narrow(0, start, n).view(p.size().as_slice()).copy(),
                ));
            }
        }
        out
    }

    /// Restores moments written by [`Adam::state`]; every variable must have both.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: i64) -> Result<(), String> {
        for (prefix, buffer) in [("m.", &self.first), ("v.", &self.second)] {
            for ((name, p), &(start, n)) in self.names.iter().zip(&self.params).zip(&self.spans) {
                let saved = state
                    .get(&format!("{prefix}{name}"))
                    .ok_or_else(|| format!("the checkpoint lacks the optimiser state of {name}"))?;
                if saved.size() != p.size() {
                    return Err(format!("optimiser state of {name} has shape {:?}", saved.size()));
                }
                let mut slot = buffer.narrow(0, start, n);
                tch::no_grad(|| slot.copy_(&saved.to_kind(Kind::Float).reshape([-1])));
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Updates the moments `m`, `v` in place from the gradient `g` and returns
/// the parameter decrement `lr · m̂ / (√v̂ + ε)` (PyTorch's formulation).
fn moments_update(m: &Tensor, v: &Tensor, g: &Tensor, lr: f64, correction1: f64, correction2: f64) -> Tensor {
    let (mut m, mut v) = (m.shallow_clone(), v.shallow_clone());
    let _ = m.g_mul_scalar_(BETA1);
    let _ = m.g_add_(&(g * (1.0 - BETA1)));
    let _ = v.g_mul_scalar_(BETA2);
    let _ = v.g_add_(&(g * g * (1.0 - BETA2)));
    let denom = v.sqrt() / correction2 + EPS;
    m / denom * (lr / correction1)
}
