//! `--device` and `--precision` of the commands that run the server-side
//! networks (`serve`, `eval`, `classify`, `latency`): the parsing and its
//! messages are `frankensplit_models::device`'s; this opens a bundle there.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use frankensplit_models::device::{device_name, parse_device, Precision};
use frankensplit_models::Bundle;
use tch::Device;

#[derive(Args, Clone, Copy, Debug)]
pub struct Placement {
    /// Where the server side (decoder g_s and backbone) runs: cpu, cuda
    /// (= cuda:0) or cuda:N. CUDA needs a build with `--features cuda` and a
    /// GPU; entropy decoding stays on CPU threads.
    #[arg(long, default_value = "cpu", value_parser = parse_device, value_name = "DEVICE")]
    pub device: Device,
    /// Number format of the decoder and backbone: f32, bf16 (CPU or CUDA) or
    /// f16 (CUDA only). Their weights and activations are cast (as
    /// `module.to(dtype)`); the edge encoder stays f32, logits are reported as f32.
    #[arg(long, default_value = "f32", value_parser = str::parse::<Precision>, value_name = "PRECISION")]
    pub precision: Precision,
}

impl Placement {
    /// Opens the bundle at `dir` on the device, in the precision.
    pub fn open(&self, dir: &Path) -> Result<Bundle> {
        self.precision.check(self.device).map_err(anyhow::Error::msg)?;
        let mut bundle =
            Bundle::open(dir, self.device).with_context(|| format!("cannot load model {}", dir.display()))?;
        bundle.set_precision(self.precision)?;
        Ok(bundle)
    }

    /// `cpu, f32`, for messages.
    pub fn describe(&self) -> String {
        format!("{}, {}", device_name(self.device), self.precision)
    }

    /// For commands that also run the edge encoder: when the networks are on
    /// a GPU, the bundle again on the CPU (its g_a in f32, as a device runs
    /// it); on the CPU, `None`: the bundle's own g_a is already that.
    pub fn open_edge(&self, dir: &Path) -> Result<Option<Bundle>> {
        if self.device == Device::Cpu {
            return Ok(None);
        }
        let bundle = Bundle::open(dir, Device::Cpu).with_context(|| format!("cannot load model {}", dir.display()))?;
        Ok(Some(bundle))
    }
}
