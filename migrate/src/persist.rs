//! The contract between snapshots and the things they save: every device and vCPU is
//! [`Persist`], and its state is one named fragment of the snapshot.
//!
//! The defaults fail with the implementor's name, so a device that was added to a machine
//! without thinking about snapshots makes snapshotting fail loudly instead of silently
//! dropping its state. State handed to `restore_state` is untrusted: implementations decode
//! it into their own state type and validate every size, index and range before use.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::snapshot::format::{from_cbor, to_cbor, FormatError};

/// Errors saving or restoring one piece of state.
#[derive(Debug, Error)]
pub enum PersistError {
    #[error("{name} does not support snapshots: it has no saved state")]
    NotSupported { name: String },
    #[error("state of {name}: {source}")]
    Format { name: String, source: FormatError },
    #[error("state of {name} is invalid: {reason}")]
    Invalid { name: String, reason: String },
    #[error("{name}: {reason}")]
    Failed { name: String, reason: String },
}

/// Something whose state a snapshot saves.
pub trait Persist {
    /// The fragment name: unique in a VM, e.g. `dev/serial0`.
    fn persist_name(&self) -> String;

    /// Encodes the current state. Called with the VM paused.
    fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        Err(PersistError::NotSupported { name: self.persist_name() })
    }

    /// Replaces the current state with `bytes` (untrusted). Called before the VM runs.
    fn restore_state(&mut self, _bytes: &[u8]) -> Result<(), PersistError> {
        Err(PersistError::NotSupported { name: self.persist_name() })
    }
}

/// Encodes a state value for [`Persist::save_state`].
pub fn encode<T: Serialize>(name: &str, state: &T) -> Result<Vec<u8>, PersistError> {
    to_cbor(state).map_err(|source| PersistError::Format { name: name.to_string(), source })
}

/// Decodes a state value in [`Persist::restore_state`].
pub fn decode<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, PersistError> {
    from_cbor(bytes, name).map_err(|source| PersistError::Format { name: name.to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Forgotten;
    impl Persist for Forgotten {
        fn persist_name(&self) -> String {
            "dev/forgotten".into()
        }
    }

    #[test]
    fn a_device_without_state_fails_by_name() {
        let mut d = Forgotten;
        let e = d.save_state().expect_err("no state");
        assert_eq!(e.to_string(), "dev/forgotten does not support snapshots: it has no saved state");
        assert!(d.restore_state(&[]).is_err());
    }

    #[test]
    fn encode_decode() {
        let b = encode("x", &(1u8, "a".to_string())).expect("encode");
        let v: (u8, String) = decode("x", &b).expect("decode");
        assert_eq!(v, (1, "a".into()));
        assert!(matches!(decode::<u64>("x", &[0xff]), Err(PersistError::Format { .. })));
    }
}
