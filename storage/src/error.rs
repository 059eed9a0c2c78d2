//! Errors of the snapshot store. Every message names the snapshot, block, offset or value
//! involved, so an operator can tell what is wrong without a debugger.

use std::path::PathBuf;

use crate::chunk::ChunkError;
use crate::manifest::ManifestError;
use crate::name::NameError;

/// Errors returned by [`crate::Store`] and its writers and readers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open snapshot store at '{path}': its index does not open: {source}; run \
         `snapvisor store repair --store {path}` to rebuild it from the pack files and manifests"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "snapshot store '{dir}': its index '{db}' is missing; a new empty index is not created over \
         existing data: run `snapvisor store repair --store {dir}` to rebuild it from the pack files \
         and manifests"
    )]
    IndexMissing { dir: PathBuf, db: PathBuf },
    #[error("snapshot store index '{path}' {reason}")]
    IndexFile { path: PathBuf, reason: String },
    #[error(
        "snapshot store '{path}': the index does not match the store's data: {reason}; nothing was \
         removed: run `snapvisor store repair --store {path}` to rebuild the index"
    )]
    IndexDamaged { path: PathBuf, reason: String },
    #[error("'{path}': {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("manifest file '{path}' {reason}")]
    ManifestFile { path: PathBuf, reason: String },
    #[error("snapshot store '{0}' is open read-only")]
    ReadOnly(PathBuf),
    #[error("snapshot store '{0}' is in use by another process (the daemon?); stop it first")]
    InUse(PathBuf),
    #[error("no snapshot store at '{0}' (expected sled files and a packs/ directory)")]
    NoStore(PathBuf),
    #[error("invalid store option: {0}")]
    Option(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("snapshot '{0}' already exists")]
    Exists(String),
    #[error("snapshot '{0}' is already being written by another writer")]
    Busy(String),
    #[error(
        "snapshot '{snapshot}' is in use by {}: a restored VM still reads its memory from it; \
         delete it once that VM is fully resident or gone",
        holders.join(", ")
    )]
    Pinned { snapshot: String, holders: Vec<String> },
    #[error("snapshot '{0}' not found")]
    NotFound(String),
    #[error("snapshot '{snapshot}' has no RAM block '{block}'")]
    NoSuchBlock { snapshot: String, block: String },
    #[error("snapshot '{snapshot}' declares RAM block '{block}' twice")]
    DuplicateBlock { snapshot: String, block: String },
    #[error(
        "snapshot '{snapshot}' block '{block}': offset 0x{offset:x} is not a chunk boundary \
         (chunk size 0x{chunk_size:x}) or lies beyond used_length 0x{used_length:x}"
    )]
    BadOffset { snapshot: String, block: String, offset: u64, chunk_size: u32, used_length: u64 },
    #[error(
        "snapshot '{snapshot}' block '{block}' offset 0x{offset:x}: got {got} bytes, \
         the chunk there is {expected} bytes"
    )]
    BadLength { snapshot: String, block: String, offset: u64, got: usize, expected: usize },
    #[error(
        "snapshot '{snapshot}' block '{block}': chunk at offset 0x{offset:x} was never written; \
         commit needs every chunk of every block"
    )]
    MissingChunk { snapshot: String, block: String, offset: u64 },
    #[error("snapshot '{snapshot}' block '{block}' offset 0x{offset:x}: {source}")]
    Chunk { snapshot: String, block: String, offset: u64, source: Box<ChunkError> },
    #[error(
        "snapshot '{snapshot}' block '{block}' offset 0x{offset:x}: chunk {hash} is missing \
         from the store"
    )]
    ChunkMissing { snapshot: String, block: String, offset: u64, hash: String },
    #[error("snapshot '{snapshot}': manifest is corrupt: {source}")]
    Manifest { snapshot: String, source: ManifestError },
    #[error("snapshot '{snapshot}' attachment '{name}' is corrupt: {reason}")]
    Attachment { snapshot: String, name: String, reason: String },
    #[error(
        "store '{path}' is full: {available} bytes free, a write needs at least {needed}; \
         free space on its file system, or delete snapshots and run gc (a delete or gc itself needs 2 MiB free)"
    )]
    Full { path: PathBuf, available: u64, needed: u64 },
    #[error("snapshot '{snapshot}' cannot take chunks from parent '{parent}': {reason}")]
    ParentChanged { snapshot: String, parent: String, reason: String },
    #[error("snapshot '{snapshot}' block '{block}' offset 0x{offset:x}: reading the chunk: {reason}")]
    Source { snapshot: String, block: String, offset: u64, reason: String },
    #[error("snapshot '{snapshot}': a chunk pipeline thread panicked")]
    Pipeline { snapshot: String },
    #[error(
        "snapshot '{snapshot}' block '{block}' offset 0x{offset:x}: the chunk to compress again (its \
         index entry was collected meanwhile) is not the chunk that was hashed"
    )]
    ChunkChanged { snapshot: String, block: String, offset: u64 },
    #[error("store '{path}': cannot query free space: {source}")]
    Statvfs { path: PathBuf, source: std::io::Error },
    #[error("store '{path}': {op}: {source}")]
    Db { path: PathBuf, op: &'static str, source: sled::Error },
    #[error("store '{path}': {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
}

impl StoreError {
    /// The store's file system has no room for the write: the store's own reserve check
    /// ([`StoreError::Full`]), or a write of a pack, manifest or the index that failed with
    /// ENOSPC (full) or EDQUOT (over quota).
    pub fn is_no_room(&self) -> bool {
        let io = match self {
            StoreError::Full { .. } => return true,
            StoreError::Io { source, .. } => source,
            StoreError::Db { source: sled::Error::Io(source), .. } => source,
            _ => return false,
        };
        is_no_room(io)
    }
}

/// An I/O error that says the file system has no room for the write: full (ENOSPC) or over
/// quota (EDQUOT). The kind counts too: sled hands out copies of its errors that keep the
/// kind, not the code.
pub fn is_no_room(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// Result type of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
