//! The device's file handling: going through a list of images without
//! stopping at the first bad one, naming each image's payload file, and
//! writing files so that a crash never leaves a half-written one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Runs `each` on every image, reporting failures on stderr and going on;
/// fails at the end if any image failed.
pub fn for_each_image(images: &[PathBuf], mut each: impl FnMut(&Path) -> Result<()>) -> Result<()> {
    let mut failures = 0;
    for path in images {
        if let Err(e) = each(path) {
            failures += 1;
            eprintln!("{}: {e:#}", path.display());
        }
    }
    if failures > 0 {
        bail!("{failures} of {} images failed", images.len());
    }
    Ok(())
}

/// Where `encode` writes each image's payload: under `output`, at the
/// image's path relative to the deepest directory holding all the images
/// (`a/cat.jpg` and `b/cat.jpg` give `a/cat.fsp` and `b/cat.fsp`; images of
/// one directory give `cat.fsp`), with `.fsp` for the extension, or appended
/// to the whole name where two images would share a name (`cat.jpg.fsp`,
/// `cat.png.fsp`). An image that cannot be found gets its error.
pub fn payload_targets(images: &[PathBuf], output: &Path) -> Vec<Result<PathBuf, String>> {
    let resolved: Vec<Result<PathBuf, String>> = images
        .iter()
        .map(|p| std::fs::canonicalize(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
        .collect();
    let mut common: Option<PathBuf> = None;
    for path in resolved.iter().flatten() {
        let parent = path.parent().unwrap_or(Path::new("/"));
        common = Some(match common {
            None => parent.to_path_buf(),
            Some(c) => c
                .components()
                .zip(parent.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    let common = common.unwrap_or_default();
    let relative = |path: &Path| -> PathBuf { path.strip_prefix(&common).unwrap_or(path).to_path_buf() };
    let with_stem = |rel: &Path| rel.with_extension("fsp");
    let mut seen = std::collections::HashMap::<PathBuf, usize>::new();
    for path in resolved.iter().flatten() {
        *seen.entry(with_stem(&relative(path))).or_default() += 1;
    }
    resolved
        .into_iter()
        .map(|path| {
            let rel = relative(&path?);
            let name = if seen[&with_stem(&rel)] > 1 {
                let mut whole = rel.clone().into_os_string();
                whole.push(".fsp");
                PathBuf::from(whole)
            } else {
                with_stem(&rel)
            };
            Ok(output.join(name))
        })
        .collect()
}

/// Writes `bytes` to a flushed sibling, then renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    frankensplit_fsio::write_file(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod payload_names {
    use super::*;

    #[test]
    fn images_of_the_same_name_keep_their_own_payloads() {
        let root = std::env::temp_dir().join(format!("fs-edge-names-{}", std::process::id()));
        for file in ["a/cat.jpg", "b/cat.jpg", "b/dog.jpg", "b/dog.png"] {
            std::fs::create_dir_all(root.join(file).parent().unwrap()).unwrap();
            std::fs::write(root.join(file), b"").unwrap();
        }
        let images: Vec<PathBuf> = ["a/cat.jpg", "b/cat.jpg", "b/dog.jpg", "b/dog.png", "b/missing.jpg"]
            .iter()
            .map(|f| root.join(f))
            .collect();
        let out = Path::new("out");
        let targets = payload_targets(&images, out);
        let names: Vec<_> = targets[..4].iter().map(|t| t.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                out.join("a/cat.fsp"),
                out.join("b/cat.fsp"),
                out.join("b/dog.jpg.fsp"),
                out.join("b/dog.png.fsp")
            ]
        );
        assert!(targets[4].as_ref().unwrap_err().contains("missing.jpg"));
        // Images of one directory land directly in the output.
        let one = payload_targets(&images[1..2], out);
        assert_eq!(one[0].as_ref().unwrap(), &out.join("cat.fsp"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
