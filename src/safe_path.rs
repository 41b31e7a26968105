//! Names that come from files (tensor and record names, ndarray-cache `dataPath`, tokenizer file
//! names, manifest entries, model names) become paths under the model, cache and dist folders.
//! These checks make sure such a name can never point outside its folder: no absolute paths, no
//! `..`, no empty or `.` components, no NUL or backslash (a Windows separator in disguise).

use anyhow::Result;
use std::path::{Component, Path};

/// `value` is a relative path of normal components (`a/b.bin`), safe to join under a folder.
/// `what` names the value for the error message ("tokenizer file name", "dataPath" …).
pub fn check_relative(value: &str, what: &str) -> Result<()> {
    if let Some(reason) = relative_problem(value) {
        crate::user_bail!("{what} {value:?} is not allowed: {reason}; it must be a relative path inside its folder (no `..`, no leading `/`)");
    }
    Ok(())
}

/// `value` is one plain file or folder name (no separator at all).
pub fn check_file_name(value: &str, what: &str) -> Result<()> {
    check_relative(value, what)?;
    if value.contains('/') {
        crate::user_bail!("{what} {value:?} is not allowed: it must be a single name without `/`");
    }
    Ok(())
}

fn relative_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        return Some("it is empty");
    }
    if value.contains('\0') {
        return Some("it contains a NUL byte");
    }
    if value.contains('\\') {
        return Some("it contains a backslash");
    }
    if value.starts_with('/') {
        return Some("it is an absolute path");
    }
    for c in Path::new(value).components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return Some("it contains `..`"),
            Component::RootDir | Component::Prefix(_) => return Some("it is an absolute path"),
            Component::CurDir => return Some("it contains `.`"),
        }
    }
    // `Path::components` drops inner `.` and repeated `/`; refuse them too so names stay canonical.
    if value.split('/').any(|s| s.is_empty() || s == ".") {
        return Some("it has an empty or `.` component");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        for ok in [
            "tokenizer.json",
            "params/params_shard_0.bin",
            "model.layers.0.q_proj",
            "a..b",
        ] {
            check_relative(ok, "name").unwrap();
        }
        check_file_name("tokenizer.json", "name").unwrap();
    }

    #[test]
    fn rejects_escapes_with_a_user_error_naming_the_value() {
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "..",
            "",
            "a//b",
            "./a",
            "a/./b",
            "a\\..\\b",
            "a\0b",
            "a/",
        ] {
            let e = check_relative(bad, "tensor name").unwrap_err();
            assert_eq!(
                crate::error::class_of(&e),
                crate::error::ErrorClass::User,
                "{bad:?}"
            );
            assert!(e.to_string().contains("tensor name"), "{e}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(check_file_name("params/x", "tokenizer file name").is_err());
    }
}
