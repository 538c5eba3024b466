//! How every command writes what the user asked for, so that a crash or a
//! kill at any moment leaves the old contents or the new, never neither:
//!
//! * files: written to a hidden sibling, flushed to disk (`fsync`), renamed
//!   over the target, and the directory entry flushed ([`write_file`]);
//! * directories (model bundles, packed models): staged in a hidden sibling
//!   ([`Staging`]), flushed file by file, then exchanged with the old
//!   directory in one `renameat2(RENAME_EXCHANGE)` on Linux before the old
//!   one is deleted ([`Staging::commit`]);
//! * and nothing is replaced that the command did not write: a directory
//!   holding anything but the files a command writes is refused unless the
//!   caller says `force` ([`check_replaceable`]).
//!
//! [`npy`] writes NumPy arrays that way, for commands whose output scripts read.

pub mod npy;

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The directory holding `path` (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A hidden sibling name for `path` unique to this process and attempt.
fn sibling(path: &Path, what: &str) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no file", path.display())))?;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(parent_of(path).join(format!(".{}.{what}-{}-{n}", name.to_string_lossy(), std::process::id())))
}

/// Flushes a directory's entries (new names, renames) to disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically and durably: a sibling, `fsync`,
/// rename over `path`, `fsync` of the directory. Parents are created.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let parent = parent_of(path);
    std::fs::create_dir_all(parent)?;
    let tmp = sibling(path, "tmp")?;
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(parent)
}

/// Puts `written`, a finished sibling of `path` (what a library wrote to a
/// path of our choosing), in place of `path` durably: `fsync`, rename,
/// `fsync` of the directory.
pub fn commit_file(written: &Path, path: &Path) -> io::Result<()> {
    File::open(written)?.sync_all()?;
    std::fs::rename(written, path)?;
    sync_dir(parent_of(path))
}

/// Whether `dir` may be replaced by a command that writes the files named
/// in `ours`: it is absent, or an empty directory, or holds only those
/// names; anything else (a user's own directory, a file) needs `force`.
/// The error says what is in the way and how to proceed.
pub fn check_replaceable(dir: &Path, ours: &[&str], force: bool) -> Result<(), String> {
    if force {
        return Ok(());
    }
    let metadata = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {}: {e}", dir.display())),
    };
    if !metadata.is_dir() {
        return Err(format!(
            "{} exists and is not a directory; choose another output or pass --force to replace it",
            dir.display()
        ));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let name = entry.file_name();
        if !ours.iter().any(|o| name.as_os_str() == *o) {
            return Err(format!(
                "{} holds {:?}, which this command does not write: it is not replaced; choose another output or pass --force",
                dir.display(),
                name
            ));
        }
    }
    Ok(())
}

/// A directory being built beside its final place; [`Staging::commit`]
/// puts it there atomically, dropping it uncommitted removes it.
pub struct Staging {
    staged: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staging {
    /// Creates an empty hidden sibling of `target` (parents included).
    pub fn new(target: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(parent_of(target))?;
        let staged = sibling(target, "staging")?;
        std::fs::create_dir(&staged)?;
        Ok(Self {
            staged,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write the directory's files.
    pub fn path(&self) -> &Path {
        &self.staged
    }

    /// Flushes every file of the staged directory, then puts it at the
    /// target: exchanged with the old directory in one step where there is
    /// one (Linux), renamed into place where there is none; the old
    /// contents are deleted only afterwards.
    pub fn commit(mut self) -> io::Result<()> {
        sync_tree(&self.staged)?;
        let parent = parent_of(&self.target).to_path_buf();
        let exists = std::fs::symlink_metadata(&self.target).is_ok();
        if exists {
            replace_existing(&self.staged, &self.target)?;
            self.committed = true;
            sync_dir(&parent)?;
            // The old contents now sit at the staging name.
            if std::fs::symlink_metadata(&self.staged).is_ok_and(|m| m.is_dir()) {
                std::fs::remove_dir_all(&self.staged)?;
            } else {
                std::fs::remove_file(&self.staged)?;
            }
        } else {
            std::fs::rename(&self.staged, &self.target)?;
            self.committed = true;
            sync_dir(&parent)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staged);
        }
    }
}

/// Swaps `staged` and `target` in one step: afterwards `target` is the new
/// directory and `staged` the old one.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn replace_existing(staged: &Path, target: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, staged, CWD, target, RenameFlags::EXCHANGE).map_err(io::Error::from)
}

/// Without an atomic exchange: the old directory is moved aside first, so a
/// crash between the two renames leaves it whole under the aside name.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn replace_existing(staged: &Path, target: &Path) -> io::Result<()> {
    let aside = sibling(target, "old")?;
    std::fs::rename(target, &aside)?;
    std::fs::rename(staged, target)?;
    std::fs::rename(&aside, staged)
}

/// `fsync` of every regular file under `dir` and of every directory.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_no_sibling_stays() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("sub/out.json");
        write_file(&path, b"old").unwrap();
        write_file(&path, b"new contents").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        let names: Vec<_> = std::fs::read_dir(root.path().join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_staged_directory_replaces_the_old_one_and_the_old_one_goes() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("bundle");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("model.toml"), "old").unwrap();
        let staging = Staging::new(&target).unwrap();
        std::fs::write(staging.path().join("model.toml"), "new").unwrap();
        // Until the commit, the old directory is untouched.
        assert_eq!(std::fs::read_to_string(target.join("model.toml")).unwrap(), "old");
        staging.commit().unwrap();
        assert_eq!(std::fs::read_to_string(target.join("model.toml")).unwrap(), "new");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_uncommitted_staging_leaves_the_old_directory_alone() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("bundle");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("model.toml"), "old").unwrap();
        {
            let staging = Staging::new(&target).unwrap();
            std::fs::write(staging.path().join("model.toml"), "half").unwrap();
        }
        assert_eq!(std::fs::read_to_string(target.join("model.toml")).unwrap(), "old");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn only_directories_of_our_own_files_are_replaceable() {
        let root = tempfile::tempdir().unwrap();
        let ours = ["model.toml", "weights.safetensors"];
        let dir = root.path().join("out");
        assert!(check_replaceable(&dir, &ours, false).is_ok(), "absent");
        std::fs::create_dir(&dir).unwrap();
        assert!(check_replaceable(&dir, &ours, false).is_ok(), "empty");
        std::fs::write(dir.join("model.toml"), "").unwrap();
        assert!(check_replaceable(&dir, &ours, false).is_ok(), "a bundle");
        std::fs::write(dir.join("thesis.tex"), "").unwrap();
        let err = check_replaceable(&dir, &ours, false).unwrap_err();
        assert!(err.contains("thesis.tex") && err.contains("--force"), "{err}");
        assert!(check_replaceable(&dir, &ours, true).is_ok(), "forced");
        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(check_replaceable(&file, &ours, false).is_err(), "a file");
    }
}
