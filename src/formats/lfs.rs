//! Git LFS pointer detection.
//!
//! Cloning a Hugging Face repository without `git lfs` leaves ~130-byte text stubs where the
//! weights should be. Every reader checks for them first so the user gets the fix, not a
//! "bad header" error.

use anyhow::Result;
use std::io::Read;
use std::path::Path;

/// How every Git LFS pointer file starts.
pub const LFS_POINTER_PREFIX: &[u8] = b"version https://git-lfs.github.com/spec/v1";

/// Whether `head` (the first bytes of a file) is a Git LFS pointer.
pub fn is_lfs_pointer(head: &[u8]) -> bool {
    head.starts_with(LFS_POINTER_PREFIX)
}

/// A user error if the file at `path` is a Git LFS pointer. I/O errors are left to the reader
/// that opens the file next (they name the file there).
pub fn check_not_lfs_pointer(path: &Path) -> Result<()> {
    let mut head = [0u8; LFS_POINTER_PREFIX.len()];
    let Ok(mut f) = std::fs::File::open(path) else {
        return Ok(());
    };
    let mut filled = 0;
    while filled < head.len() {
        match f.read(&mut head[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    if is_lfs_pointer(&head[..filled]) {
        return Err(lfs_pointer_error(path));
    }
    Ok(())
}

/// The error for a file that is an LFS pointer.
pub fn lfs_pointer_error(path: &Path) -> anyhow::Error {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::error::user(format!(
        "{} is a Git LFS pointer, not the weights: run `git lfs install && git lfs pull` in {}",
        path.display(),
        dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};

    #[test]
    fn pointer_is_a_user_error_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        std::fs::write(
            &p,
            "version https://git-lfs.github.com/spec/v1\noid sha256:abcd\nsize 123\n",
        )
        .unwrap();
        let e = check_not_lfs_pointer(&p).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        let msg = e.to_string();
        assert!(
            msg.contains("model.safetensors is a Git LFS pointer"),
            "{msg}"
        );
        assert!(msg.contains("git lfs install && git lfs pull"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    #[test]
    fn real_files_and_short_files_pass() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        std::fs::write(&p, b"PK\x03\x04 not a pointer").unwrap();
        check_not_lfs_pointer(&p).unwrap();
        std::fs::write(&p, b"vers").unwrap();
        check_not_lfs_pointer(&p).unwrap();
        assert!(!is_lfs_pointer(b"version https://git-lfs"));
    }
}
