//! With the `cuda` feature, link libtorch_cuda even though no symbol of it is
//! referenced, so that libtorch registers its CUDA backend at load time.
//! Its own dependencies (cuBLAS, cuDNN, …) are resolved when it runs, where
//! the GPU's libraries are, which lets the binary build on machines without them.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed,--allow-shlib-undefined");
        println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
    }
}
