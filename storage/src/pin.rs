//! Pins: snapshots in use by a restore that still reads from them.
//!
//! A lazily restored VM reads its memory from its snapshot until every chunk is resident; an
//! eager restore reads it until the restore returns. Deleting that snapshot and collecting
//! garbage meanwhile would take chunks away under the VM (`chunk ... is missing from the
//! store`) and crash it. So whoever keeps a restore's memory source alive holds a
//! [`SnapshotPin`], named after its holder (`VM 'web1'`), taken together with the reader by
//! [`Store::pinned_reader`]:
//!
//! - [`Store::delete`] of a pinned snapshot fails with [`StoreError::Pinned`], naming every
//!   holder; delete it again once they are resident or gone;
//! - [`Store::gc`] marks every chunk of every pinned manifest live, whether or not that
//!   manifest is still in the store (a repair or a crash recovery may have dropped it).
//!
//! The pin is released when the guard is dropped: the lazy page server drops it as soon as
//! the VM is fully resident, when it fails, and when the VM goes away.
//!
//! The registry lives in this process only, and that is enough: sled locks its directory, so
//! while a daemon has the store open no other process (`snapvisor store delete`, `store gc`)
//! can open it, and a process that can open it has no restore of its own in flight unless it
//! pinned it here.
//!
//! Atomicity: taking a pin (manifest read plus registration) and deleting (pin check plus
//! manifest removal) both hold the registry's lock, so a delete either sees the pin or the
//! pin's manifest read fails with [`StoreError::NotFound`]; never a pin on a snapshot that a
//! concurrent delete removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::chunk::{ChunkRef, Hash};
use crate::error::{Result, StoreError};
use crate::manifest::Manifest;
use crate::reader::SnapshotReader;
use crate::store::Store;

struct Entry {
    holder: String,
    manifest: Arc<Manifest>,
}

/// The pins of one open store, by pin id.
#[derive(Default)]
pub(crate) struct Pins {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry>>,
}

impl Pins {
    pub(crate) fn lock(&self) -> PinsGuard<'_> {
        PinsGuard(self.map.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The locked registry: held across "check pins, remove manifest" and "read manifest, pin".
pub(crate) struct PinsGuard<'a>(MutexGuard<'a, HashMap<u64, Entry>>);

impl PinsGuard<'_> {
    /// Holders of pins on snapshot `name`, sorted, without repeats.
    pub(crate) fn holders(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> =
            self.0.values().filter(|e| e.manifest.name == name).map(|e| e.holder.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Adds every stored chunk of every pinned manifest to `live`.
    pub(crate) fn mark(&self, live: &mut std::collections::HashSet<Hash>) {
        for e in self.0.values() {
            for b in &e.manifest.blocks {
                live.extend(b.chunks.iter().filter_map(|c| match c {
                    ChunkRef::Stored(h) => Some(*h),
                    ChunkRef::Zero => None,
                }));
            }
        }
    }
}

/// Keeps one snapshot from being deleted, and its chunks from being collected, until dropped.
pub struct SnapshotPin {
    store: Store,
    id: u64,
    snapshot: String,
    holder: String,
}

impl std::fmt::Debug for SnapshotPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotPin").field("snapshot", &self.snapshot).field("holder", &self.holder).finish()
    }
}

impl SnapshotPin {
    /// The pinned snapshot.
    pub fn snapshot(&self) -> &str {
        &self.snapshot
    }

    /// Who holds the pin.
    pub fn holder(&self) -> &str {
        &self.holder
    }
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        self.store.inner.pins.lock().0.remove(&self.id);
        tracing::debug!(snapshot = %self.snapshot, holder = %self.holder, "snapshot unpinned");
    }
}

impl Store {
    /// Opens snapshot `name` for reading, like [`Store::reader`], and pins it for `holder`
    /// (a name an operator recognises, e.g. `VM 'web1'`): until the pin is dropped the
    /// snapshot cannot be deleted and GC keeps its chunks.
    pub fn pinned_reader(&self, name: &str, holder: &str) -> Result<(SnapshotReader, SnapshotPin)> {
        let mut pins = self.inner.pins.lock();
        let manifest = Arc::new(self.manifest(name)?);
        let id = self.inner.pins.next.fetch_add(1, Ordering::Relaxed);
        pins.0.insert(id, Entry { holder: holder.to_owned(), manifest: manifest.clone() });
        drop(pins);
        tracing::debug!(snapshot = name, holder, "snapshot pinned");
        let pin = SnapshotPin { store: self.clone(), id, snapshot: name.to_owned(), holder: holder.to_owned() };
        Ok((SnapshotReader::new(self.clone(), manifest), pin))
    }

    /// Holders of pins on snapshot `name` (empty when nobody uses it).
    pub fn pin_holders(&self, name: &str) -> Vec<String> {
        self.inner.pins.lock().holders(name)
    }

    /// Fails with [`StoreError::Pinned`] if `name` is pinned (caller holds the registry lock).
    pub(crate) fn check_unpinned(pins: &PinsGuard<'_>, name: &str) -> Result<()> {
        let holders = pins.holders(name);
        if holders.is_empty() {
            return Ok(());
        }
        Err(StoreError::Pinned { snapshot: name.to_owned(), holders })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::BlockSpec;

    fn snapshot(store: &Store, name: &str, fill: u8) {
        let cs = store.options().chunk_size as usize;
        let spec = BlockSpec {
            idstr: "pc.ram".into(),
            used_length: 2 * cs as u64,
            max_length: 2 * cs as u64,
            page_size: 4096,
            resizeable: false,
        };
        let w = store.begin(name, vec![spec]).expect("writer");
        w.put_chunk("pc.ram", 0, &vec![fill; cs]).expect("put");
        w.put_chunk("pc.ram", cs as u64, &vec![fill.wrapping_add(1); cs]).expect("put");
        w.commit(b"state".to_vec()).expect("commit");
    }

    #[test]
    fn a_pinned_snapshot_cannot_be_deleted_until_the_pin_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        snapshot(&store, "s", 1);
        let (_r1, p1) = store.pinned_reader("s", "VM 'a'").expect("pin");
        let (_r2, p2) = store.pinned_reader("s", "VM 'b'").expect("pin");
        let err = store.delete("s").expect_err("pinned");
        assert!(matches!(&err, StoreError::Pinned { holders, .. } if holders == &["VM 'a'", "VM 'b'"]), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("'s'") && msg.contains("VM 'a'") && msg.contains("VM 'b'"), "{msg}");
        assert!(store.contains("s").expect("contains"));
        drop(p1);
        assert_eq!(store.pin_holders("s"), vec!["VM 'b'".to_string()]);
        assert!(store.delete("s").is_err(), "still pinned by b");
        drop(p2);
        assert!(store.pin_holders("s").is_empty());
        store.delete("s").expect("delete once unpinned");
        assert!(matches!(store.pinned_reader("s", "VM 'c'"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn gc_keeps_the_chunks_of_a_pinned_snapshot_even_without_its_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        snapshot(&store, "s", 1);
        let (reader, pin) = store.pinned_reader("s", "VM 'a'").expect("pin");
        // What a repair dropping a manifest, or any other path around `delete`, would leave.
        store.inner.manifests.remove("s").expect("remove manifest");
        let report = store.gc().expect("gc");
        assert_eq!(report.chunks_removed, 0, "{report:?}");
        let mut buf = vec![0u8; store.options().chunk_size as usize];
        reader.read_chunk("pc.ram", 0, &mut buf).expect("chunk still readable");
        assert!(buf.iter().all(|b| *b == 1));
        drop(pin);
        assert_eq!(store.gc().expect("gc").chunks_removed, 2);
        assert!(reader.read_chunk("pc.ram", 0, &mut buf).is_err(), "collected once unpinned");
    }
}
