//! Records the resolved tract-onnx version (from Cargo.lock) for the JSON report.
use std::{env, fs, path::Path};

fn main() {
    let lock = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = fs::read_to_string(&lock).unwrap_or_default();
    let mut version = "unknown".to_string();
    let mut in_tract = false;
    for line in text.lines() {
        if line.starts_with("[[package]]") {
            in_tract = false;
        } else if line.trim() == "name = \"tract-onnx\"" {
            in_tract = true;
        } else if in_tract {
            if let Some(v) = line.trim().strip_prefix("version = \"") {
                version = v.trim_end_matches('"').to_string();
                break;
            }
        }
    }
    println!("cargo:rustc-env=TRACT_ONNX_VERSION={version}");
}
