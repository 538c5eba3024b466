//! With the `nccl` feature, compiles the C++ bridge to c10d (TCPStore and
//! ProcessGroupNCCL, src/distributed/c10d.cpp) against libtorch's headers
//! and the CUDA and NCCL headers scripts/setup-nccl.sh installs, and links
//! libtorch's CUDA libraries.

use std::env;
use std::path::PathBuf;

fn required(name: &str, fix: &str) -> PathBuf {
    match env::var_os(name) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!("the `nccl` feature needs {name}: {fix}"),
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_NCCL").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/distributed/c10d.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=FRANKENSPLIT_CUDA");
    let torch = required("LIBTORCH", "source scripts/setup-libtorch.sh");
    let cuda = required(
        "FRANKENSPLIT_CUDA",
        "source scripts/setup-nccl.sh (after setup-libtorch.sh)",
    );
    for header in [
        "nccl/include/nccl.h",
        "cu13/include/cusparse.h",
        "cu13/include/crt/host_config.h",
    ] {
        if !cuda.join(header).exists() {
            panic!(
                "{} is missing: FRANKENSPLIT_CUDA must be the `nvidia` folder scripts/setup-nccl.sh installs",
                cuda.join(header).display()
            );
        }
    }
    cc::Build::new()
        .cpp(true)
        .file("src/distributed/c10d.cpp")
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_NCCL", None)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(cuda.join("cu13/include"))
        .include(cuda.join("cu13/include/cccl"))
        .include(cuda.join("nccl/include"))
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-interference-size")
        .compile("frankensplit_c10d");
    println!("cargo:rustc-link-search=native={}", torch.join("lib").display());
    for lib in ["torch_cuda", "c10_cuda", "torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
