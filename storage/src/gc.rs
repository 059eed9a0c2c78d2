//! Garbage collection: mark-and-sweep over committed manifests, and the limited collection
//! that recovers a store after an unclean close.
//!
//! Mark: every chunk hash referenced by a committed manifest, plus every hash recorded by a
//! writer that is still open in this process, plus every chunk of a snapshot pinned by a
//! restore in flight (pin.rs). Sweep: every stored chunk not marked, and every
//! attachment whose snapshot has no manifest. Then the bytes of swept chunks are freed by
//! punching holes into the packs (see `pack.rs`). The exclusive GC lock keeps writers from
//! recording a reference between mark and sweep; readers are not affected.
//!
//! Damage never turns into deletion: before anything is removed, GC checks that the index
//! holds every marked chunk and that every entry it keeps points at a pack entry header
//! naming that chunk and length. If a manifest does not decode, a marked chunk is missing or
//! an entry disagrees with its pack, GC fails with an error naming the repair command and
//! removes nothing: a damaged index would otherwise look like a store of dead chunks.
//!
//! Recovery ([`Store::recover`], run when a store that was not closed cleanly opens) removes
//! only unmarked chunks that an interrupted session can have left: those in packs that
//! session created (ids from its recorded `first-new-pack`) and those of snapshots deleted
//! since the last GC (tombstones). Other unmarked chunks are left for `store gc` and counted.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;

use serde::Serialize;

use crate::chunk::{ChunkRef, Hash};
use crate::error::{Result, StoreError};
use crate::open::FIRST_NEW_PACK;
use crate::pack::{list_ids, parse_entry_header, Location, ENTRY_HEADER, PACK_HEADER};
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
    /// Unreferenced chunks a recovery left for `store gc` (not from the interrupted session).
    #[serde(default)]
    pub chunks_left: u64,
}

fn libc_eopnotsupp() -> i32 {
    nix::errno::Errno::EOPNOTSUPP as i32
}

/// Which unreferenced chunks a run may remove.
enum Scope {
    All,
    Recovery { first_pack: u32, tombstoned: HashSet<Hash> },
}

impl Store {
    /// Removes chunks no committed snapshot (or open writer) references, and orphaned
    /// attachments. Fails without removing anything if the index disagrees with the
    /// manifests or packs.
    pub fn gc(&self) -> Result<GcReport> {
        self.writable()?;
        self.ensure_index_room()?;
        self.collect(Scope::All)
    }

    /// Recovery after an unclean close (see the module doc).
    pub(crate) fn recover(&self) -> Result<GcReport> {
        let first_pack = match self.inner.meta.get(FIRST_NEW_PACK).map_err(self.db_err("read session start"))? {
            Some(v) => {
                let raw: [u8; 4] = v.as_ref().try_into().map_err(|_| {
                    self.damaged(format!("meta record first-new-pack is {} bytes, expected 4", v.len()))
                })?;
                u32::from_le_bytes(raw)
            }
            None => 0,
        };
        let tombstoned = self.tombstoned_chunks()?;
        let r = self.collect(Scope::Recovery { first_pack, tombstoned })?;
        if r.chunks_left > 0 {
            tracing::info!(
                left = r.chunks_left,
                "recovery left unreferenced chunks of earlier sessions for `store gc`"
            );
        }
        Ok(r)
    }

    fn collect(&self, scope: Scope) -> Result<GcReport> {
        let inner = &self.inner;
        let _excl = inner.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut live: HashSet<Hash> = HashSet::new();
        let mut names: HashSet<Vec<u8>> = HashSet::new();
        let mut owner: HashMap<Hash, String> = HashMap::new();
        for m in self.all_manifests()? {
            for b in &m.blocks {
                for c in &b.chunks {
                    if let ChunkRef::Stored(h) = c {
                        if live.insert(*h) {
                            owner.insert(*h, m.name.clone());
                        }
                    }
                }
            }
            names.insert(m.name.into_bytes());
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
        // Scan the index; decide, but remove nothing until every check passed.
        let mut batch = sled::Batch::default();
        let mut extents: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        let mut kept: Vec<(Hash, Location)> = Vec::new();
        let mut indexed: HashSet<Hash> = HashSet::new();
        for item in inner.index.iter() {
            let (key, value) = item.map_err(self.db_err("gc: scan chunk index"))?;
            let loc = Location::decode(&value);
            let hash = <[u8; 32]>::try_from(&key[..]).ok().map(Hash);
            let removable = match (hash, loc) {
                (Some(h), _) if live.contains(&h) => false,
                (None, _) => true, // not a chunk key at all
                (Some(h), Some(l)) => match &scope {
                    Scope::All => true,
                    Scope::Recovery { first_pack, tombstoned } => l.pack >= *first_pack || tombstoned.contains(&h),
                },
                (Some(_), None) => matches!(scope, Scope::All),
            };
            if let Some(h) = hash {
                indexed.insert(h);
            }
            if removable {
                report.chunks_removed += 1;
                report.bytes_removed += loc.map_or(0, |l| u64::from(l.len));
                batch.remove(key);
                continue;
            }
            match (hash, loc) {
                (Some(h), Some(l)) => {
                    if !live.contains(&h) {
                        report.chunks_left += 1;
                    }
                    report.chunks_kept += 1;
                    kept.push((h, l));
                    extents.entry(l.pack).or_default().push((l.offset, u64::from(l.len)));
                }
                _ => {
                    return Err(self.damaged(format!(
                        "the index entry of a chunk still needed is corrupt ({} bytes)",
                        value.len()
                    )))
                }
            }
        }
        if let Some(h) = live.iter().find(|h| !indexed.contains(*h)) {
            let missing = live.iter().filter(|h| !indexed.contains(*h)).count();
            let snap = owner.get(h).map_or("an open writer", String::as_str);
            return Err(self.damaged(format!(
                "{missing} chunk(s) that snapshots reference are not in the index (e.g. {} of '{snap}')",
                h.to_hex()
            )));
        }
        self.check_entries(&kept)?;
        let disk_before = disk_bytes(&packs_dir).map_err(io_err("gc: measure packs"))?;
        inner.index.apply_batch(batch).map_err(self.db_err("gc: remove chunks"))?;
        // The index must be durable without the dead entries before their bytes are freed.
        self.flush()?;
        for id in list_ids(&packs_dir).map_err(io_err("gc: list packs"))? {
            let mut live = extents.remove(&id).unwrap_or_default();
            live.sort_unstable();
            match inner.packs.reclaim(id, &live) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!(pack = id, error = %e, "gc: pack is not a valid pack file, left untouched");
                }
                Err(e) if e.raw_os_error() == Some(libc_eopnotsupp()) => {
                    tracing::warn!(pack = id, "gc: filesystem cannot punch holes, space not reclaimed");
                    break;
                }
                Err(e) => return Err(io_err("gc: reclaim pack space")(e)),
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
        self.clear_tombstones()?;
        self.flush()?;
        tracing::info!(?report, "gc done");
        Ok(report)
    }

    /// Every kept index entry must point just behind an entry header naming its chunk and
    /// length; otherwise punching the gaps between kept entries could free live bytes.
    fn check_entries(&self, kept: &[(Hash, Location)]) -> Result<()> {
        let mut header = [0u8; ENTRY_HEADER as usize];
        for (h, l) in kept {
            let bad = |why: String| {
                self.damaged(format!(
                    "index entry of chunk {} (pack {} offset 0x{:x} length {}) {why}",
                    h.to_hex(),
                    l.pack,
                    l.offset,
                    l.len
                ))
            };
            let start = l
                .offset
                .checked_sub(ENTRY_HEADER)
                .filter(|s| *s >= PACK_HEADER)
                .ok_or_else(|| bad("lies in the pack header".into()))?;
            let file = self.inner.packs.file(l.pack).map_err(|e| bad(format!("names an unreadable pack: {e}")))?;
            file.read_exact_at(&mut header, start).map_err(|e| bad(format!("cannot be read: {e}")))?;
            match parse_entry_header(&header) {
                Some(e) if e.hash == *h && e.len == l.len => {}
                Some(e) => {
                    return Err(bad(format!("points at the entry of chunk {} ({} bytes)", e.hash.to_hex(), e.len)))
                }
                None => return Err(bad("does not point behind an entry header".into())),
            }
        }
        Ok(())
    }
}
