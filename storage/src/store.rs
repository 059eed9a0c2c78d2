//! The [`Store`] handle: opening, listing, reading manifests, deleting, attachments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::error::{Result, StoreError};
use crate::manifest::Manifest;
use crate::name::validate_snapshot_name;
use crate::pack::Packs;
use crate::reader::SnapshotReader;
use crate::writer::WriterShared;

/// Default chunk size (see the crate docs for the measurement behind it).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Default zstd level (see the crate docs).
pub const DEFAULT_ZSTD_LEVEL: i32 = -1;

/// Free bytes an index-only write (a delete, a GC) needs ([`Store::delete`], [`Store::gc`]):
/// four of sled's 512 KiB log segments, half the reserve of writes that add chunks.
/// (`StoreError::Full`'s message says "2 MiB": keep them together.)
pub const INDEX_HEADROOM: u64 = 2 << 20;

/// Options for [`Store::open_with`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Chunk size for new snapshots: a power of two, 4 KiB ..= 16 MiB.
    pub chunk_size: u32,
    /// zstd level for new chunks (-7..=22; negative levels are zstd's fast modes).
    pub zstd_level: i32,
    /// Compress new chunks with LZ4 (codec 3) instead of zstd (`zstd_level` is then unused):
    /// about a quarter less CPU per byte on compressible memory, 1.2-1.4x the bytes stored,
    /// and snapshots that builds before codec 3 cannot read (see the crate docs).
    pub lz4: bool,
    /// sled page cache size in bytes.
    pub cache_capacity: u64,
    /// Writes fail with [`StoreError::Full`] when the filesystem would have less free space
    /// than this afterwards; sled itself must never see ENOSPC (it poisons the handle).
    pub min_free_bytes: u64,
    /// Size at which a pack file is closed and the next one started ([`crate::PACK_MAX`];
    /// at least one chunk value always goes into a pack, whatever this says).
    pub pack_max: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            lz4: false,
            cache_capacity: 64 << 20,
            min_free_bytes: 4 << 20,
            pack_max: crate::PACK_MAX,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    pub(crate) db: sled::Db,
    /// Chunk index: blake3 hash -> [`crate::pack::Location`].
    pub(crate) index: sled::Tree,
    pub(crate) packs: Packs,
    pub(crate) manifests: sled::Tree,
    pub(crate) attachments: sled::Tree,
    /// `clean` while no process has the store open; `first-new-pack`; tombstones
    /// (`deleted/NAME`: manifests deleted since the last GC).
    pub(crate) meta: sled::Tree,
    pub(crate) read_only: bool,
    /// Set once opening succeeded: only then does closing mark the store clean.
    pub(crate) opened: std::sync::atomic::AtomicBool,
    pub(crate) opts: StoreOptions,
    /// Writers hold it shared while they record chunk references; GC holds it exclusively.
    /// Readers never touch it.
    pub(crate) gc_lock: RwLock<()>,
    pub(crate) writers: Mutex<HashMap<u64, Weak<WriterShared>>>,
    pub(crate) next_writer: AtomicU64,
    /// Snapshots in use by restores of this process (pin.rs).
    pub(crate) pins: crate::pin::Pins,
}

pub(crate) const CLEAN: &[u8] = b"clean";

impl Drop for Inner {
    /// Clean close: every pack synced, then the `clean` marker flushed, so the next open can
    /// skip recovery. A read-only handle, or one whose open failed, leaves the marker alone.
    fn drop(&mut self) {
        if self.read_only || !self.opened.load(Ordering::Acquire) {
            return;
        }
        let synced = self.packs.sync().map_err(|e| e.to_string());
        let marked = synced.and_then(|()| {
            self.meta.insert(CLEAN, &[1u8][..]).map_err(|e| e.to_string())?;
            self.db.flush().map_err(|e| e.to_string())
        });
        // The witness of the clean close comes after the mark is durable (sledfiles.rs).
        let witnessed =
            marked.and_then(|_| crate::sledfiles::write_witness(&self.path).map_err(|e| format!("witness: {e}")));
        if let Err(e) = witnessed {
            tracing::warn!(path = %self.path.display(), error = %e, "store not closed cleanly");
        }
    }
}

/// A cheap-to-clone handle on an open store; share it between threads and VMs.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in directory `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        Store::open_with(dir, StoreOptions::default())
    }

    /// Opens the store in `dir`, failing with [`StoreError::NoStore`] when there is none
    /// (for tools that must not create a store by accident).
    pub fn open_existing(dir: impl AsRef<Path>) -> Result<Store> {
        crate::open::open(dir.as_ref(), StoreOptions::default(), crate::open::Mode::Existing)
    }

    /// Opens the existing store in `dir` for reading only: no recovery, no collection, no
    /// write of this crate's data (sled may still tidy its own files). Writes fail with
    /// [`StoreError::ReadOnly`]; closing it leaves an unclean store unclean.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<Store> {
        crate::open::open(dir.as_ref(), StoreOptions::default(), crate::open::Mode::ReadOnly)
    }

    /// Opens (creating if needed) the store in `dir`. An existing store is checked and, if it
    /// was not closed cleanly, recovered (see the crate docs); a store whose index is missing
    /// or damaged is an error that says how to repair it.
    pub fn open_with(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        crate::open::open(dir.as_ref(), opts, crate::open::Mode::Create)
    }

    /// Fails with [`StoreError::ReadOnly`] on a read-only handle.
    pub(crate) fn writable(&self) -> Result<()> {
        if self.inner.read_only {
            return Err(StoreError::ReadOnly(self.inner.path.clone()));
        }
        Ok(())
    }

    /// Directory of the store.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.opts
    }

    pub(crate) fn db_err(&self, op: &'static str) -> impl FnOnce(sled::Error) -> StoreError + '_ {
        move |source| StoreError::Db { path: self.inner.path.clone(), op, source }
    }

    /// Fails with [`StoreError::Full`] unless `needed` bytes plus the reserve are free.
    pub(crate) fn ensure_space(&self, needed: u64) -> Result<()> {
        self.ensure_free(needed + self.inner.opts.min_free_bytes)
    }

    /// Fails with [`StoreError::Full`] unless [`INDEX_HEADROOM`] is free: for writes that
    /// only change the index (a delete, a GC), which must work below the reserve (they are
    /// how room is made) but must never meet a full disk: sled fails every later call once
    /// one of its writes has failed, until the store is opened again, so one delete on a full
    /// disk broke the store for good although room was made afterwards.
    pub(crate) fn ensure_index_room(&self) -> Result<()> {
        self.ensure_free(INDEX_HEADROOM)
    }

    fn ensure_free(&self, needed: u64) -> Result<()> {
        let st = nix::sys::statvfs::statvfs(&self.inner.path)
            .map_err(|e| StoreError::Statvfs { path: self.inner.path.clone(), source: std::io::Error::from(e) })?;
        #[allow(clippy::useless_conversion)]
        let available = u64::from(st.blocks_available()) * u64::from(st.fragment_size());
        if available < needed {
            tracing::warn!(path = %self.inner.path.display(), available, needed, "store full");
            return Err(StoreError::Full { path: self.inner.path.clone(), available, needed });
        }
        Ok(())
    }

    /// Makes every chunk value written so far durable (`fdatasync` of the packs).
    pub(crate) fn sync_packs(&self) -> Result<()> {
        self.inner.packs.sync().map_err(|source| StoreError::Io {
            path: self.inner.packs.dir().to_path_buf(),
            op: "sync packs",
            source,
        })
    }

    /// Starts writeback of the packs written since their last sync, without waiting (see
    /// `Packs::start_writeback`); a failure only costs the commit's sync more time.
    pub(crate) fn start_writeback(&self) {
        if let Err(e) = self.inner.packs.start_writeback() {
            tracing::debug!(path = %self.inner.packs.dir().display(), "starting pack writeback: {e}");
        }
    }

    /// Flushes sled (index, manifests, attachments) to disk.
    pub fn flush(&self) -> Result<()> {
        self.inner.db.flush().map_err(self.db_err("flush"))?;
        Ok(())
    }

    /// Names of committed snapshots, sorted.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for item in self.inner.manifests.iter().keys() {
            let key = item.map_err(self.db_err("list manifests"))?;
            out.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(out)
    }

    /// True when snapshot `name` is committed.
    pub fn contains(&self, name: &str) -> Result<bool> {
        validate_snapshot_name(name)?;
        self.inner.manifests.contains_key(name).map_err(self.db_err("look up manifest"))
    }

    /// Reads and validates the manifest of snapshot `name`.
    pub fn manifest(&self, name: &str) -> Result<Manifest> {
        validate_snapshot_name(name)?;
        let raw = self
            .inner
            .manifests
            .get(name)
            .map_err(self.db_err("read manifest"))?
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))?;
        let m = Manifest::decode(&raw).map_err(|source| StoreError::Manifest { snapshot: name.to_owned(), source })?;
        if m.name != name {
            return Err(StoreError::Manifest {
                snapshot: name.to_owned(),
                source: crate::manifest::ManifestError::Invalid(format!("manifest names snapshot '{}'", m.name)),
            });
        }
        Ok(m)
    }

    /// The device and vCPU state of snapshot `name` as stored, *unchecked* (no crc, no
    /// decode of the chunk tables; see [`crate::manifest::peek_state`]): for work that a
    /// checked read of the same manifest confirms before anything relies on it. `None` if
    /// the snapshot is missing, unreadable or not of the shape this build writes.
    pub fn unchecked_state(&self, name: &str) -> Option<Vec<u8>> {
        validate_snapshot_name(name).ok()?;
        let raw = self.inner.manifests.get(name).ok()??;
        crate::manifest::peek_state(&raw).map(<[u8]>::to_vec)
    }

    /// Opens snapshot `name` for random-access chunk reads (decodes the manifest once).
    pub fn reader(&self, name: &str) -> Result<SnapshotReader> {
        let m = self.manifest(name)?;
        Ok(SnapshotReader::new(self.clone(), Arc::new(m)))
    }

    /// Reads one chunk of `snapshot` into `buf`; returns its length. Decodes the manifest on
    /// every call: hot paths use [`Store::reader`] once and [`SnapshotReader::read_chunk`].
    pub fn read_chunk(&self, snapshot: &str, block: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.reader(snapshot)?.read_chunk(block, offset, buf)
    }

    /// Deletes snapshot `name` and its attachments; its chunks are reclaimed by [`Store::gc`].
    /// Fails with [`StoreError::Pinned`], naming the holders, while a restore uses it.
    pub fn delete(&self, name: &str) -> Result<()> {
        validate_snapshot_name(name)?;
        // Held until the manifest is gone, so that no pin can be taken in between.
        let pins = self.inner.pins.lock();
        Store::check_unpinned(&pins, name)?;
        if !self.inner.manifests.contains_key(name).map_err(self.db_err("look up manifest"))? {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        let mut keys = Vec::new();
        for item in self.inner.attachments.scan_prefix(crate::attachment::attachment_prefix(name)).keys() {
            keys.push(item.map_err(self.db_err("list attachments"))?);
        }
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.writable()?;
        self.ensure_index_room()?;
        self.tombstone_and_unlink(name)?;
        // Manifest first: once it is gone the snapshot is invisible; leftover attachments
        // (crash in between) are swept by gc.
        self.inner.manifests.remove(name).map_err(self.db_err("delete manifest"))?;
        drop(pins);
        self.inner.attachments.apply_batch(batch).map_err(self.db_err("delete attachments"))?;
        self.flush()?;
        tracing::info!(snapshot = name, "deleted snapshot");
        Ok(())
    }

    pub(crate) fn register_writer(&self, name: &str, shared: &Arc<WriterShared>) -> Result<u64> {
        let id = self.inner.next_writer.fetch_add(1, Ordering::Relaxed);
        let mut writers = self.inner.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers.retain(|_, w| w.strong_count() > 0);
        if writers.values().filter_map(Weak::upgrade).any(|w| w.name == name) {
            return Err(StoreError::Busy(name.to_owned()));
        }
        writers.insert(id, Arc::downgrade(shared));
        Ok(id)
    }

    pub(crate) fn unregister_writer(&self, id: u64) {
        let mut writers = self.inner.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers.remove(&id);
    }
}
