//! Errors of the RAM-block registry. The size errors keep QEMU's wording, so operators who
//! know QEMU's messages recognise them.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RamError {
    #[error("Size mismatch: {idstr}: {new:#x} != {used:#x}")]
    SizeMismatch { idstr: String, new: u64, used: u64 },
    #[error("Size too large: {idstr}: {new:#x} > {max:#x}")]
    SizeTooLarge { idstr: String, new: u64, max: u64 },
    #[error("resize of RAM block '{idstr}' refused: {reason}")]
    ResizeRefused { idstr: String, reason: String },
    #[error("RAM block '{0}' already exists")]
    Duplicate(String),
    #[error("no RAM block '{0}'")]
    Unknown(String),
    #[error("RAM block '{idstr}': {reason}")]
    Config { idstr: String, reason: String },
    #[error("RAM block '{idstr}': access of {len:#x} bytes at offset {offset:#x} is beyond its used length {used:#x}")]
    OutOfRange { idstr: String, offset: u64, len: u64, used: u64 },
    #[error("RAM block '{idstr}': discarding {len:#x} bytes at offset {offset:#x}: {reason}")]
    Discard { idstr: String, offset: u64, len: u64, reason: String },
    #[error("reserving {len:#x} bytes of host memory for RAM block '{idstr}': {reason}")]
    Map { idstr: String, len: u64, reason: String },
}
