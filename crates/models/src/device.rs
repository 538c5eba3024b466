//! Where and in what precision the networks run: the one parser of device
//! names (`cpu`, `cuda`, `cuda:N`) every command shares, and the server-side
//! [`Precision`] (f32, bf16, f16).

use std::fmt;
use std::str::FromStr;

use tch::{Device, Kind};

/// The forms [`parse_device`] accepts, for messages.
pub const DEVICE_FORMS: &str = "cpu, cuda (= cuda:0) or cuda:N";

/// What to do when CUDA is missing, for messages.
const CUDA_HINT: &str = "this build of frankensplit or this machine has no CUDA: \
scripts/setup-libtorch.sh installs the CUDA-enabled libtorch of PyPI's torch wheel; \
build with `cargo build --release -p frankensplit-cli --features cuda` (which links libtorch_cuda) \
and run on a machine with an NVIDIA GPU and its driver";

/// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`, checking that libtorch
/// sees CUDA and that device N exists. The error says what to pass or what
/// is missing; it is a `String` so that clap can use this as a value parser.
pub fn parse_device(text: &str) -> Result<Device, String> {
    let cuda = |index: usize| check_cuda(index, tch::Cuda::is_available(), tch::Cuda::device_count());
    match text.trim() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => cuda(index),
            _ => Err(format!("unknown device {text:?}: expected {DEVICE_FORMS}")),
        },
    }
}

/// `cuda:index` when CUDA is `available` with `count` devices.
fn check_cuda(index: usize, available: bool, count: i64) -> Result<Device, String> {
    if !available {
        return Err(format!("cuda:{index} was asked for, but {CUDA_HINT}"));
    }
    if index as i64 >= count {
        let known = match count {
            1 => "cuda:0".to_string(),
            n => format!("cuda:0 … cuda:{}", n - 1),
        };
        return Err(format!(
            "cuda:{index} does not exist: libtorch sees {count} CUDA device{} ({known})",
            if count == 1 { "" } else { "s" }
        ));
    }
    Ok(Device::Cuda(index))
}

/// `cpu` or `cuda:N`, the form [`parse_device`] reads.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The number format of the server-side networks (the decoder `g_s` and
/// the backbone): their weights and activations are cast to it, as
/// `module.to(dtype)` does in PyTorch. The edge encoder always stays in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// 32-bit floats, the reference's precision.
    #[default]
    F32,
    /// bfloat16 (f32's range, 8 bits of mantissa): CPU or CUDA.
    Bf16,
    /// IEEE half (5 bits of exponent, 11 of mantissa): CUDA only.
    F16,
}

impl Precision {
    /// The accepted names, for messages.
    pub const NAMES: &'static str = "f32, bf16 or f16";

    /// The tensor kind of this precision.
    pub fn kind(self) -> Kind {
        match self {
            Self::F32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
            Self::F16 => Kind::Half,
        }
    }

    /// Whether the networks can run in this precision on `device`: f16 needs
    /// CUDA (libtorch's CPU kernels cover half precision only in part and
    /// slowly; bf16 is the CPU's reduced precision).
    pub fn check(self, device: Device) -> Result<(), String> {
        if self == Self::F16 && !device.is_cuda() {
            return Err(format!(
                "--precision f16 needs a CUDA device, not {}: use bf16 on the CPU (or f32)",
                device_name(device)
            ));
        }
        Ok(())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            _ => Err(format!("unknown precision {text:?}: expected {}", Self::NAMES)),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert_eq!(device_name(Device::Cpu), "cpu");
        assert_eq!(device_name(Device::Cuda(3)), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA:0:1", ""] {
            let e = parse_device(bad).unwrap_err();
            assert!(e.contains("cpu, cuda (= cuda:0) or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn cuda_checks() {
        assert_eq!(check_cuda(0, true, 1), Ok(Device::Cuda(0)));
        assert_eq!(check_cuda(1, true, 2), Ok(Device::Cuda(1)));
        let e = check_cuda(1, true, 1).unwrap_err();
        assert!(
            e.contains("cuda:1 does not exist") && e.contains("1 CUDA device (cuda:0)"),
            "{e}"
        );
        let e = check_cuda(4, true, 2).unwrap_err();
        assert!(e.contains("2 CUDA devices (cuda:0 … cuda:1)"), "{e}");
        let e = check_cuda(0, false, 0).unwrap_err();
        assert!(e.contains("no CUDA") && e.contains("--features cuda"), "{e}");
    }

    /// What this machine has: without CUDA, `cuda` and `cuda:N` are refused
    /// with the message saying how to get it; with it, `cuda` is device 0.
    #[test]
    fn cuda_on_this_machine() {
        if tch::Cuda::is_available() {
            assert_eq!(parse_device("cuda"), Ok(Device::Cuda(0)));
            let count = tch::Cuda::device_count() as usize;
            assert!(parse_device(&format!("cuda:{count}"))
                .unwrap_err()
                .contains("does not exist"));
        } else {
            for text in ["cuda", "cuda:0", "cuda:1"] {
                let e = parse_device(text).unwrap_err();
                assert!(e.contains("no CUDA") && e.contains("setup-libtorch.sh"), "{text}: {e}");
            }
        }
    }

    #[test]
    fn precisions() {
        assert_eq!("bf16".parse(), Ok(Precision::Bf16));
        assert_eq!("FP16".parse(), Ok(Precision::F16));
        assert_eq!("f32".parse(), Ok(Precision::F32));
        assert!("f8".parse::<Precision>().unwrap_err().contains("f32, bf16 or f16"));
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        assert!(Precision::Bf16.check(Device::Cpu).is_ok());
        assert!(Precision::F16.check(Device::Cuda(0)).is_ok());
        assert!(Precision::F16
            .check(Device::Cpu)
            .unwrap_err()
            .contains("use bf16 on the CPU"));
    }
}
