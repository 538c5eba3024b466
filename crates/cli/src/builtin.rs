//! The committed built-in models (`models/demo/`), built into the binary so
//! that `--model demo` works anywhere without a download: the compressors
//! of the scenes benchmark at five rates (configs/scenes/, docs/results.md).
//!
//! The bundles share one teacher, so `models/demo/` stores its backbone
//! once (`backbone.safetensors`) and per λ the manifest and the rest of the
//! weights (`l<λ>/model.toml`, `l<λ>/compressor.safetensors`). Both halves
//! are safetensors written by the same serialiser as the bundle's own file,
//! which orders tensors canonically, so merging them gives back the trained
//! bundle byte for byte and its fingerprint still holds. `pack-models`
//! (`commands/pack_models.rs`) writes that layout.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use frankensplit_bundle::{MANIFEST, WEIGHTS};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

/// The packed layout's shared teacher file.
pub const BACKBONE_FILE: &str = "backbone.safetensors";

const SHARED_BACKBONE: &[u8] = include_bytes!("../../../models/demo/backbone.safetensors");

/// Name, manifest and compressor weights of each built-in bundle, from `models/demo/l<λ>/`.
macro_rules! built_in {
    ($($lmbda:literal),+) => {
        [$((
            concat!("demo-l", $lmbda),
            include_str!(concat!("../../../models/demo/l", $lmbda, "/model.toml")),
            include_bytes!(concat!("../../../models/demo/l", $lmbda, "/compressor.safetensors")).as_slice(),
        )),+]
    };
}

const MODELS: [(&str, &str, &[u8]); 5] = built_in!("0.04", "0.16", "0.64", "2.56", "10.24");

/// What `demo` names: the middle rate.
const DEFAULT: &str = "demo-l0.64";

/// The built-in models' names, lowest λ (highest rate) first.
pub fn names() -> Vec<&'static str> {
    MODELS.iter().map(|(name, ..)| *name).collect()
}

/// clap's parser of `--model`: see [`model_path`].
pub fn parse_model(value: &str) -> std::result::Result<PathBuf, String> {
    model_path(Path::new(value)).map_err(|e| format!("{e:#}"))
}

/// What a `--model` argument names: a bundle directory as it is, or a
/// built-in demo bundle (`demo`, `demo-l0.025`, …), unpacked into the cache
/// once per content.
pub fn model_path(model: &Path) -> Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    let name = match model.to_str() {
        Some("demo") => DEFAULT,
        Some(other) => other,
        None => "",
    };
    let Some((name, manifest, compressor)) = MODELS.iter().find(|(n, ..)| *n == name) else {
        let names: Vec<&str> = MODELS.iter().map(|(n, ..)| *n).collect();
        bail!(
            "no model bundle at {}: give a bundle directory (from `convert` or `train`) or a built-in model: demo, {}",
            model.display(),
            names.join(", ")
        );
    };
    // Named by content (the manifest holds the weights' fingerprint), so
    // that a newer binary's models never meet an older copy.
    let dir = cache_dir()
        .join("models")
        .join(format!("{:016x}", fnv1a(manifest.as_bytes())))
        .join(name);
    if dir.join(MANIFEST).exists() {
        return Ok(dir);
    }
    let weights = merge(SHARED_BACKBONE, compressor).with_context(|| format!("built-in model {name}"))?;
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    std::fs::write(tmp.join(WEIGHTS), weights)?;
    std::fs::write(tmp.join(MANIFEST), manifest)?;
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process may have unpacked it first.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join(MANIFEST).exists() {
            return Err(e).with_context(|| format!("cannot unpack {name} into {}", dir.display()));
        }
    }
    Ok(dir)
}

/// One safetensors file holding the tensors of both.
pub fn merge(backbone: &[u8], compressor: &[u8]) -> Result<Vec<u8>> {
    let backbone = SafeTensors::deserialize(backbone)?;
    let compressor = SafeTensors::deserialize(compressor)?;
    let tensors: Vec<(String, TensorView)> = backbone.tensors().into_iter().chain(compressor.tensors()).collect();
    Ok(safetensors::serialize(tensors, &None)?)
}

/// `$FRANKENSPLIT_CACHE`, else the user's cache directory, as the setup script picks it.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FRANKENSPLIT_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("frankensplit");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/frankensplit"),
        None => std::env::temp_dir().join("frankensplit"),
    }
}

/// 64-bit FNV-1a: names the unpacked copy after its content.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
