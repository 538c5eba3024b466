//! int8 calibration: the value ranges of g_a's tensors on a few images,
//! which the int8 encoder quantizes with, stored beside a bundle and tied
//! to its weights by their fingerprint.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::int8::BlockRanges;

/// Where `frankensplit-edge calibrate` writes a bundle's int8 calibration by default.
pub const CALIBRATION_FILE: &str = "int8-calibration.json";

/// The ranges the int8 encoder quantizes with, observed on a few images;
/// tied to one model's weights by their fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Int8Calibration {
    /// The weights it was made for.
    pub fingerprint: String,
    /// Images it saw.
    pub images: usize,
    /// Per block of g_a.
    pub blocks: Vec<BlockRanges>,
}

impl Int8Calibration {
    /// Reads a calibration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not an int8 calibration", path.display()))
    }

    /// Writes it as JSON (through a temporary file).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_atomically(path, serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// Reads the int8 calibration at `file`, or the bundle's default one,
/// saying how to make it when there is none.
pub fn load_calibration(model: &Path, file: Option<&Path>) -> Result<Int8Calibration> {
    let path = file.map_or_else(|| model.join(CALIBRATION_FILE), Path::to_path_buf);
    if !path.exists() {
        bail!(
            "no int8 calibration at {}: run `frankensplit-edge calibrate --model {} IMAGES…` first (a few dozen images like those to encode)",
            path.display(),
            model.display()
        );
    }
    Int8Calibration::load(&path)
}
