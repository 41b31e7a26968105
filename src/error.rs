//! Error classes and exit codes.
//!
//! Every error a user can see carries a class that decides the exit code: user errors (bad recipe,
//! bad model folder, bad flag) exit 2, environment errors (disk, network, missing tool) exit 3,
//! internal errors (bugs) exit 1. Code builds errors with [`user`], [`env`] or plain `anyhow!`
//! (internal), and adds context with `anyhow::Context` as usual; the class survives context.

use std::fmt;

/// What kind of failure this is; decides the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The user asked for something wrong: fix the input. Exit 2.
    User,
    /// The machine or the network failed us: fix the environment. Exit 3.
    Environment,
    /// A bug in mlcb. Exit 1.
    Internal,
}

impl ErrorClass {
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorClass::User => 2,
            ErrorClass::Environment => 3,
            ErrorClass::Internal => 1,
        }
    }
}

/// An error with a class. Wrapped in `anyhow::Error`; find it again with [`class_of`].
#[derive(Debug)]
pub struct ClassifiedError {
    pub class: ErrorClass,
    pub message: String,
}

impl fmt::Display for ClassifiedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClassifiedError {}

/// A user error: the input is wrong. The message says what, where, and what to do.
pub fn user(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ClassifiedError {
        class: ErrorClass::User,
        message: message.into(),
    })
}

/// An environment error: disk full, network down, tool missing.
pub fn env(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ClassifiedError {
        class: ErrorClass::Environment,
        message: message.into(),
    })
}

/// The class of an error chain: the first classified error in it, else an I/O error counts as
/// environment, else internal.
pub fn class_of(err: &anyhow::Error) -> ErrorClass {
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<ClassifiedError>() {
            return c.class;
        }
    }
    for cause in err.chain() {
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return ErrorClass::Environment;
        }
    }
    ErrorClass::Internal
}

/// Whether an error chain comes from a full disk (`ENOSPC`) or an exhausted quota (`EDQUOT`).
/// Libraries that format the I/O error into their own message (sled, safetensors) are recognised
/// by the OS error text, since their chain no longer holds the `std::io::Error`.
pub fn is_no_space(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
                || io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::QuotaExceeded
            {
                return true;
            }
        }
        let text = cause.to_string();
        text.contains("No space left on device")
            || text.contains(&format!("os error {}", libc::ENOSPC))
            || text.contains("Disk quota exceeded")
    })
}

/// A full-disk failure as an environment error a user can act on: it names the folder whose disk
/// is full (`place`, described by `what`, e.g. "the cache folder"), says what to do, and keeps
/// the original failure (with the file being written) as detail. Other errors pass unchanged.
pub fn explain_no_space(
    err: anyhow::Error,
    what: &str,
    place: &std::path::Path,
    flag: &str,
) -> anyhow::Error {
    if !is_no_space(&err) || already_explained(&err) {
        return err;
    }
    env(format!(
        "{NO_SPACE} {what} {}: free some space there (or use {flag} to \
         put it on a disk with more room) and run the build again; work already finished is kept \
         (detail: {err:#})",
        place.display()
    ))
}

/// An inner layer (the cache index) already named the full disk: keep its message.
fn already_explained(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<ClassifiedError>()
            .is_some_and(|c| c.message.starts_with(NO_SPACE))
    })
}

const NO_SPACE: &str = "no space left on the disk holding";

/// `bail!` for user errors.
#[macro_export]
macro_rules! user_bail {
    ($($arg:tt)*) => { return Err($crate::error::user(format!($($arg)*))) };
}

/// `bail!` for environment errors.
#[macro_export]
macro_rules! env_bail {
    ($($arg:tt)*) => { return Err($crate::error::env(format!($($arg)*))) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn class_survives_context() {
        let e: anyhow::Result<()> = Err(user("bad key"));
        let e = e.context("while reading recipe").unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert_eq!(class_of(&e).exit_code(), 2);
    }

    #[test]
    fn full_disk_is_explained_with_the_folder() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = anyhow::Error::new(full).context("writing /c/tmp/1-x.tmp");
        assert!(is_no_space(&e));
        let e = explain_no_space(
            e,
            "the cache folder",
            std::path::Path::new("/c"),
            "--cache-dir",
        );
        assert_eq!(class_of(&e), ErrorClass::Environment);
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("no space left on the disk holding the cache folder /c: free"),
            "{msg}"
        );
        assert!(
            msg.contains("--cache-dir") && msg.contains("/c/tmp/1-x.tmp"),
            "{msg}"
        );
        // A library that formatted the I/O error into its own text is recognised too.
        let sled_like = anyhow::anyhow!("IO error: No space left on device (os error 28)");
        assert!(is_no_space(&sled_like));
        // Anything else passes through unchanged.
        let other = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(!is_no_space(&other));
        let other = explain_no_space(other, "x", std::path::Path::new("/"), "--y");
        assert!(!format!("{other:#}").contains("no space"));
        // Explained once only, by the innermost layer that knows the folder.
        let full = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let inner = explain_no_space(full, "the cache index", std::path::Path::new("/c/i"), "--c");
        let outer = explain_no_space(
            inner.context("x"),
            "the cache folder",
            std::path::Path::new("/c"),
            "--c",
        );
        let msg = format!("{outer:#}");
        assert_eq!(msg.matches("no space left on the disk").count(), 1, "{msg}");
        assert!(msg.contains("the cache index /c/i"), "{msg}");
    }

    #[test]
    fn io_errors_are_environment() {
        let e = anyhow::Error::new(std::io::Error::other("disk full")).context("writing blob");
        assert_eq!(class_of(&e), ErrorClass::Environment);
        assert_eq!(class_of(&anyhow::anyhow!("bug")), ErrorClass::Internal);
    }
}
