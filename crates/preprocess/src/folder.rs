//! ImageFolder datasets (`root/<class>/<image>`, torchvision's layout): listing
//! the class folders and their images, without reading any image. Training
//! and evaluation both take their images this way.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// File extensions read as images.
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// An ImageFolder dataset: `root/<class>/<image>`, classes in name order
/// (torchvision's `ImageFolder` numbering).
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The dataset root.
    pub root: PathBuf,
    /// Class names; a sample's label indexes this list.
    pub classes: Vec<String>,
    /// `(path, label)` in class order, then file-name order.
    pub samples: Vec<(PathBuf, i64)>,
}

impl ImageFolder {
    /// Lists `root`: every sub-directory is a class, every JPEG/PNG/WebP file in it a sample.
    pub fn open(root: &Path) -> Result<Self> {
        let io = |path: &Path, e: std::io::Error| Error::Folder(format!("{}: {e}", path.display()));
        let mut classes: Vec<String> = std::fs::read_dir(root)
            .map_err(|e| io(root, e))?
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        let mut samples = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| io(&dir, e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            files.sort();
            samples.extend(files.into_iter().map(|p| (p, label as i64)));
        }
        if samples.is_empty() {
            return Err(Error::Folder(format!(
                "{} holds no images in class folders (expected {}/<class>/<image>.jpg|png|webp)",
                root.display(),
                root.display()
            )));
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            samples,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples (never true for an opened folder).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// A sample's path relative to the root, for mirroring the tree elsewhere.
    pub fn relative(&self, index: usize) -> &Path {
        let path = &self.samples[index].0;
        path.strip_prefix(&self.root).unwrap_or(path)
    }
}
