//! Adam with PyTorch's update rule and defaults (β = (0.9, 0.999), ε = 1e-8,
//! no weight decay), written out so that its state can be checkpointed and
//! restored exactly (tch's optimiser keeps its state inside libtorch).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

/// The optimiser and its moments, keyed by variable name.
#[derive(Debug)]
pub struct Adam {
    params: BTreeMap<String, Tensor>,
    first: BTreeMap<String, Tensor>,
    second: BTreeMap<String, Tensor>,
    /// Steps taken.
    pub step: i64,
    /// Learning rate of the next step.
    pub lr: f64,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl Adam {
    /// Optimises `params` (name → variable) at learning rate `lr`.
    pub fn new(params: BTreeMap<String, Tensor>, lr: f64) -> Self {
        let zeros = |p: &Tensor| p.zeros_like().detach();
        let first = params.iter().map(|(k, p)| (k.clone(), zeros(p))).collect();
        let second = params.iter().map(|(k, p)| (k.clone(), zeros(p))).collect();
        Self {
            params,
            first,
            second,
            step: 0,
            lr,
        }
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        for p in self.params.values_mut() {
            p.zero_grad();
        }
    }

    /// One update from the accumulated gradients (variables without a
    /// gradient are left alone, as PyTorch does).
    pub fn step(&mut self) {
        self.step += 1;
        let correction1 = 1.0 - BETA1.powi(self.step as i32);
        let correction2 = (1.0 - BETA2.powi(self.step as i32)).sqrt();
        tch::no_grad(|| {
            for (name, p) in &self.params {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let m = &self.first[name];
                let v = &self.second[name];
                m.shallow_clone().copy_(&(m * BETA1 + &grad * (1.0 - BETA1)));
                v.shallow_clone().copy_(&(v * BETA2 + &grad * &grad * (1.0 - BETA2)));
                let denom = v.sqrt() / correction2 + EPS;
                let update = m / denom * (self.lr / correction1);
                p.shallow_clone().copy_(&(p - update));
            }
        });
    }

    /// The moments as named tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.first.len());
        for (name, t) in &self.first {
            out.push((format!("m.{name}"), t.to_kind(Kind::Float)));
        }
        for (name, t) in &self.second {
            out.push((format!("v.{name}"), t.to_kind(Kind::Float)));
        }
        out
    }

    /// Restores moments written by [`Adam::state`]; every variable must have both.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: i64) -> Result<(), String> {
        for (prefix, moments) in [("m.", &mut self.first), ("v.", &mut self.second)] {
            for (name, t) in moments.iter_mut() {
                let saved = state
                    .get(&format!("{prefix}{name}"))
                    .ok_or_else(|| format!("the checkpoint lacks the optimiser state of {name}"))?;
                if saved.size() != t.size() {
                    return Err(format!("optimiser state of {name} has shape {:?}", saved.size()));
                }
                tch::no_grad(|| t.copy_(saved));
            }
        }
        self.step = step;
        Ok(())
    }
}
