//! The edge side of FrankenSplit: what runs on the device. Images are
//! decoded and preprocessed, the encoder g_a runs, and the latent is
//! entropy-coded into a payload (docs/format.md). This crate and its binary
//! `frankensplit-edge` carry no tensor framework (g_a runs on our own
//! convolution kernels: [`encoder`], [`conv`], [`kernel`]; in 8-bit
//! integers after calibration: [`int8`]), and no server or training code.
//! HTTP comes only with the `client` feature ([`client`]: `frankensplit-edge
//! send`), which talks to a server in the types of `frankensplit-api`.

pub mod bench;
pub mod calibration;
#[cfg(feature = "client")]
pub mod client;
pub mod commands;
pub mod conv;
pub mod encoder;
pub mod inspect;
pub mod int8;
pub mod io;
pub mod kernel;
pub mod model;
mod pool;
pub mod tensor;
pub mod units;

pub use calibration::{load_calibration, Int8Calibration, CALIBRATION_FILE};
pub use commands::{run_calibrate, run_encode, CalibrateArgs, EncodeArgs};
pub use inspect::{run_inspect, InspectArgs};
pub use io::{for_each_image, payload_targets, write_atomically};
pub use model::{bpp, encode_image, EdgeModel};

/// Deterministic values in [-0.5, 0.5) for the kernels' tests (a small LCG:
/// no dependency, the same on every machine).
#[cfg(test)]
fn test_values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}
