//! Validation of snapshot and attachment names (they become sled keys and CLI arguments).

/// A name that is not 1..=64 characters of `[A-Za-z0-9._-]` or that starts with '.'.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("invalid {what} name {value:?}: {reason}")]
    Invalid { what: &'static str, value: String, reason: &'static str },
}

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

fn check(what: &'static str, value: &str) -> Result<(), NameError> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > MAX_NAME_LEN {
        Some("longer than 64 characters")
    } else if value.starts_with('.') {
        Some("must not start with '.'")
    } else if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        Some("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NameError::Invalid { what, value: value.to_owned(), reason }),
        None => Ok(()),
    }
}

/// Checks a snapshot name: 1..=64 chars of `[A-Za-z0-9._-]`, not starting with '.'.
pub fn validate_snapshot_name(name: &str) -> Result<(), NameError> {
    check("snapshot", name)
}

/// Checks an attachment name with the same rules as snapshot names.
pub fn validate_attachment_name(name: &str) -> Result<(), NameError> {
    check("attachment", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        for ok in ["a", "vm-1.snap_2", &"x".repeat(64)] {
            assert!(validate_snapshot_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(65), "é"] {
            let err = validate_snapshot_name(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
