//! The snapshot store: content-addressed, zstd-compressed chunks in sled.
//! (Full format and protocol description: see the end of this file.)

mod chunk;
mod debug;
mod error;
mod gc;
mod manifest;
mod name;
mod pack;
mod reader;
mod store;
mod usage;
mod verify;
mod writer;

pub use chunk::{ChunkError, ChunkRef, Hash};
pub use error::{Result, StoreError};
pub use gc::GcReport;
pub use manifest::{BlockManifest, Manifest, ManifestError};
pub use name::{validate_attachment_name, validate_snapshot_name, NameError};
pub use pack::{Location, PACK_MAX};
pub use reader::SnapshotReader;
pub use store::{Store, StoreOptions, DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL};
pub use usage::{disk_bytes, Usage};
pub use verify::VerifyReport;
pub use writer::{BlockSpec, SnapshotWriter, WriteStats};
pub mod bench;
