//! Opening a store: layout and marker checks, sled, the cross-check of the index against
//! the manifest files, and recovery after an unclean close (see the crate docs).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Result, StoreError};
use crate::layout::{self, Layout};
use crate::manifest::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::pack::Packs;
use crate::sledfiles;
use crate::store::{Inner, Store, StoreOptions, CLEAN};

/// How to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Create the store if there is none.
    Create,
    /// The store must exist.
    Existing,
    /// The store must exist; nothing is written.
    ReadOnly,
}

/// Meta key: the first pack id the session that opened the store last could write.
pub(crate) const FIRST_NEW_PACK: &[u8] = b"first-new-pack";

/// True when `e` is sled failing to take its file lock (another process has the store).
pub(crate) fn is_lock_error(e: &sled::Error) -> bool {
    // sled 0.34 wraps the lock failure in an io::Error of kind Other whose text carries the
    // original WouldBlock error.
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
        || io.raw_os_error() == Some(libc::EWOULDBLOCK)
        || io.to_string().contains("could not acquire lock"))
}

/// How long an open waits for sled's file lock. sled 0.34 may finish writing an io buffer
/// on a background thread after its handle was dropped, holding the lock a moment longer;
/// measured under load this was tens of milliseconds.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The sled configuration of every store (its persisted part is checked by sledfiles.rs).
pub(crate) fn sled_config(path: &Path, cache_capacity: u64) -> sled::Config {
    sled::Config::new().path(path).cache_capacity(cache_capacity).use_compression(false).mode(sled::Mode::LowSpace)
}

pub(crate) fn open_sled(path: &Path, cache_capacity: u64) -> Result<sled::Db> {
    let start = std::time::Instant::now();
    loop {
        let r = sled_config(path, cache_capacity).open();
        match r {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_error(&e) && start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) if is_lock_error(&e) => return Err(StoreError::InUse(path.to_path_buf())),
            Err(source) => return Err(StoreError::Open { path: path.to_path_buf(), source }),
        }
    }
}

pub(crate) fn open(path: &Path, opts: StoreOptions, mode: Mode) -> Result<Store> {
    let cs = opts.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(StoreError::Option(format!("chunk_size {cs} must be a power of two in 4096..=16777216")));
    }
    if !(-7..=22).contains(&opts.zstd_level) {
        return Err(StoreError::Option(format!("zstd_level {} is outside -7..=22", opts.zstd_level)));
    }
    if opts.pack_max == 0 {
        return Err(StoreError::Option("pack_max 0: a pack must be allowed to hold bytes".into()));
    }
    let path = path.to_path_buf();
    match layout::classify(&path)? {
        Layout::Store => sledfiles::check_conf(&path, &sled_config(&path, opts.cache_capacity))?,
        Layout::Absent if mode == Mode::Create => layout::create(&path)?,
        Layout::Absent => return Err(StoreError::NoStore(path)),
    }
    let read_only = mode == Mode::ReadOnly;
    let db = open_sled(&path, opts.cache_capacity)?;
    let tree =
        |name: &'static str| db.open_tree(name).map_err(|source| StoreError::Open { path: path.clone(), source });
    let packs_dir = path.join("packs");
    let inner = Inner {
        index: tree("index")?,
        packs: Packs::open(packs_dir.clone(), read_only, opts.pack_max).map_err(|source| StoreError::Io {
            path: packs_dir,
            op: "open packs",
            source,
        })?,
        manifests: tree("manifests")?,
        attachments: tree("attachments")?,
        meta: tree("meta")?,
        db,
        path,
        opts,
        read_only,
        opened: AtomicBool::new(false),
        gc_lock: RwLock::new(()),
        writers: Mutex::new(HashMap::new()),
        next_writer: AtomicU64::new(1),
        pins: crate::pin::Pins::default(),
    };
    let store = Store { inner: Arc::new(inner) };
    let inner = &store.inner;
    let was_clean = inner.meta.contains_key(CLEAN).map_err(store.db_err("read clean marker"))?;
    if sledfiles::read_witness(&inner.path)? && !was_clean {
        return Err(sledfiles::lost_tail(&inner.path));
    }
    store.reconcile_manifests()?;
    if read_only {
        store.check_index_not_emptied()?;
    } else {
        // Witness first: a crash between the two leaves a clean index without a witness, which
        // is accepted (sledfiles.rs).
        sledfiles::remove_witness(&inner.path)?;
        inner.meta.remove(CLEAN).map_err(store.db_err("clear clean marker"))?;
        store.flush()?;
        if was_clean {
            store.check_live_indexed()?;
        } else {
            // After a crash the index may name chunks of snapshots that never committed,
            // whose pack bytes may never have reached the disk (power loss). Dropping them
            // before anyone can dedup against them keeps new snapshots off lost bytes. A
            // failure stops the open: the store is not used in an unknown state.
            tracing::info!(path = %inner.path.display(), "store was not closed cleanly, collecting leftovers");
            store.recover()?;
        }
        let first = inner.packs.first_new_id();
        inner.meta.insert(FIRST_NEW_PACK, &first.to_le_bytes()).map_err(store.db_err("record session start"))?;
        store.flush()?;
        crate::mfiles::remove_temporaries(&crate::mfiles::dir_of(&inner.path));
    }
    inner.opened.store(true, Ordering::Release);
    tracing::debug!(path = %inner.path.display(), was_clean, read_only, "opened snapshot store");
    Ok(store)
}
