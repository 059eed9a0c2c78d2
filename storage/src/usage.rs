//! Space accounting (`snapvisor store du`): logical, stored and on-disk bytes.

use std::path::Path;

use serde::Serialize;

use crate::chunk::ChunkRef;
use crate::error::{Result, StoreError};
use crate::store::Store;

/// Space used by a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub snapshots: u64,
    /// Sum of used_length over all blocks of all snapshots.
    pub logical_bytes: u64,
    /// Part of `logical_bytes` that is all-zero chunks.
    pub zero_bytes: u64,
    /// Distinct stored chunks.
    pub chunks: u64,
    /// Sum of stored chunk values (compressed + 5-byte header) in the index.
    pub stored_bytes: u64,
    /// Sum of manifest and attachment values.
    pub metadata_bytes: u64,
    /// Bytes allocated on disk by the store directory (st_blocks * 512).
    pub disk_bytes: u64,
}

impl Usage {
    /// disk_bytes / (stored_bytes + metadata_bytes).
    pub fn overhead(&self) -> f64 {
        self.disk_bytes as f64 / (self.stored_bytes + self.metadata_bytes).max(1) as f64
    }
}

impl Store {
    /// Measures the store. Walks every manifest and chunk key: O(store) work.
    pub fn usage(&self) -> Result<Usage> {
        let inner = &self.inner;
        let mut u = Usage::default();
        for name in self.list()? {
            let m = self.manifest(&name)?;
            u.snapshots += 1;
            for b in &m.blocks {
                u.logical_bytes += b.used_length;
                let cs = u64::from(m.chunk_size);
                for (i, c) in b.chunks.iter().enumerate() {
                    if *c == ChunkRef::Zero {
                        u.zero_bytes += (b.used_length - i as u64 * cs).min(cs);
                    }
                }
            }
        }
        for item in inner.index.iter() {
            let (_, v) = item.map_err(self.db_err("usage: scan chunk index"))?;
            u.chunks += 1;
            u.stored_bytes += crate::pack::Location::decode(&v).map_or(0, |l| u64::from(l.len));
        }
        for tree in [&inner.manifests, &inner.attachments] {
            for item in tree.iter() {
                let (_, v) = item.map_err(self.db_err("usage: scan metadata"))?;
                u.metadata_bytes += v.len() as u64;
            }
        }
        u.disk_bytes = disk_bytes(&inner.path).map_err(|source| StoreError::Io {
            path: inner.path.clone(),
            op: "usage: walk directory",
            source,
        })?;
        Ok(u)
    }
}

/// Bytes allocated by all files under `dir`.
pub fn disk_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += disk_bytes(&entry.path())?;
        } else {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}
