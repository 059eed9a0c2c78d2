//! Garbage collection: mark-and-sweep over committed manifests.
//!
//! Mark: every chunk hash referenced by a committed manifest, plus every hash recorded by a
//! writer that is still open in this process, plus every chunk of a snapshot pinned by a
//! restore in flight (pin.rs). Sweep: every stored chunk not marked, and every
//! attachment whose snapshot has no manifest. Then the bytes of swept chunks are freed by
//! punching holes into the packs (see `pack.rs`). The exclusive GC lock keeps writers from
//! recording a reference between mark and sweep; readers are not affected. Chunks written by
//! a process that crashed before its commit are unreferenced and therefore swept. If any
//! manifest does not decode, GC stops without deleting anything: it cannot know what that
//! snapshot references.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::chunk::{ChunkRef, Hash};
use crate::error::{Result, StoreError};
use crate::manifest::Manifest;
use crate::pack::{list_ids, Location};
use crate::store::Store;
use crate::usage::disk_bytes;

/// What a GC run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub attachments_removed: u64,
    /// Reduction of the bytes allocated by pack files.
    pub disk_bytes_freed: u64,
}

fn libc_eopnotsupp() -> i32 {
    nix::errno::Errno::EOPNOTSUPP as i32
}

impl Store {
    /// Removes chunks no committed snapshot (or open writer) references, and orphaned
    /// attachments.
    pub fn gc(&self) -> Result<GcReport> {
        let inner = &self.inner;
        let _excl = inner.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut live: HashSet<Hash> = HashSet::new();
        let mut names: HashSet<Vec<u8>> = HashSet::new();
        for item in inner.manifests.iter() {
            let (key, value) = item.map_err(self.db_err("gc: scan manifests"))?;
            let snapshot = String::from_utf8_lossy(&key).into_owned();
            let m = Manifest::decode(&value).map_err(|source| StoreError::Manifest { snapshot, source })?;
            for b in &m.blocks {
                live.extend(b.chunks.iter().filter_map(|c| match c {
                    ChunkRef::Stored(h) => Some(*h),
                    ChunkRef::Zero => None,
                }));
            }
            names.insert(key.to_vec());
        }
        // Chunks a restore in flight still reads, even if its manifest is gone (pin.rs).
        inner.pins.lock().mark(&mut live);
        {
            let writers = inner.writers.lock().unwrap_or_else(|p| p.into_inner());
            for w in writers.values().filter_map(std::sync::Weak::upgrade) {
                w.referenced(&mut live);
            }
        }
        let mut report = GcReport::default();
        let packs_dir = inner.packs.dir().to_path_buf();
        let io_err = |op: &'static str| {
            let path = packs_dir.clone();
            move |source| StoreError::Io { path, op, source }
        };
        let disk_before = disk_bytes(&packs_dir).map_err(io_err("gc: measure packs"))?;
        let mut batch = sled::Batch::default();
        let mut extents: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        let mut undecodable = 0u64;
        for item in inner.index.iter() {
            let (key, value) = item.map_err(self.db_err("gc: scan chunk index"))?;
            let loc = Location::decode(&value);
            let dead = match <[u8; 32]>::try_from(&key[..]) {
                Ok(h) => !live.contains(&Hash(h)),
                Err(_) => true, // not a chunk key at all
            };
            if dead {
                report.chunks_removed += 1;
                report.bytes_removed += loc.map_or(0, |l| u64::from(l.len));
                batch.remove(key);
            } else {
                report.chunks_kept += 1;
                match loc {
                    Some(l) => extents.entry(l.pack).or_default().push((l.offset, u64::from(l.len))),
                    None => undecodable += 1,
                }
            }
        }
        inner.index.apply_batch(batch).map_err(self.db_err("gc: remove chunks"))?;
        // The index must be durable without the dead entries before their bytes are freed.
        self.flush()?;
        if undecodable > 0 {
            // Some live chunk's location is unknown: punching gaps could free its bytes.
            tracing::warn!(undecodable, "gc: corrupt index entries, pack space not reclaimed");
        } else {
            for id in list_ids(&packs_dir).map_err(io_err("gc: list packs"))? {
                let mut live = extents.remove(&id).unwrap_or_default();
                live.sort_unstable();
                match inner.packs.reclaim(id, &live) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc_eopnotsupp()) => {
                        tracing::warn!(pack = id, "gc: filesystem cannot punch holes, space not reclaimed");
                        break;
                    }
                    Err(e) => return Err(io_err("gc: reclaim pack space")(e)),
                }
            }
        }
        let disk_after = disk_bytes(&packs_dir).map_err(io_err("gc: measure packs"))?;
        report.disk_bytes_freed = disk_before.saturating_sub(disk_after);
        let mut batch = sled::Batch::default();
        for item in inner.attachments.iter().keys() {
            let key = item.map_err(self.db_err("gc: scan attachments"))?;
            let owner = key.split(|b| *b == 0).next().unwrap_or(&[]);
            if !names.contains(owner) {
                report.attachments_removed += 1;
                batch.remove(key);
            }
        }
        inner.attachments.apply_batch(batch).map_err(self.db_err("gc: remove attachments"))?;
        self.flush()?;
        tracing::info!(?report, "gc done");
        Ok(report)
    }
}
