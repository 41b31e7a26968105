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
    fn io_errors_are_environment() {
        let e = anyhow::Error::new(std::io::Error::other("disk full")).context("writing blob");
        assert_eq!(class_of(&e), ErrorClass::Environment);
        assert_eq!(class_of(&anyhow::anyhow!("bug")), ErrorClass::Internal);
    }
}
