//! Lazy clones on a shared base: the snapshot's memory decompressed once into memfds that
//! every clone in this process maps copy-on-write (migrate::lazy's base.rs has the protocol
//! and the guarantees). Used by daemon clones; `RestoreOptions::shared_base` turns it on.
//!
//! The base is found by the snapshot's manifest in a [`BaseRegistry`], or made from a reader
//! of its own holding its own pin (held until every chunk is filled or has failed). The
//! clone's own pin, like a private lazy restore's, is held until its memory is all there:
//! here, until the base is complete.

use std::sync::{Arc, OnceLock};

use migrate::lazy::{Base, BaseOptions, BaseRegistry, LazyBlock, LazyError, PageServer};
use migrate::ram::RamBlock;
use migrate::snapshot::ram_io::StorePageSource;
use storage::{SnapshotReader, Store};

use super::SnapshotError;

/// The bases of every clone this process restores (the daemon's).
pub fn shared_bases() -> Arc<BaseRegistry> {
    static BASES: OnceLock<Arc<BaseRegistry>> = OnceLock::new();
    BASES.get_or_init(BaseRegistry::new).clone()
}

/// The base of snapshot `name` (whose manifest `reader` holds), made if none is alive.
pub fn base_for(
    registry: &BaseRegistry,
    store: &Store,
    name: &str,
    reader: &SnapshotReader,
    opts: BaseOptions,
) -> Result<Arc<Base>, SnapshotError> {
    registry.get_or_create(reader.manifest(), || {
        let (own, pin) = store.pinned_reader(name, &format!("the shared memory of snapshot '{name}'"))?;
        if own.manifest() != reader.manifest() {
            // Deleted and made again between the two reads: this clone's snapshot is gone.
            return Err(SnapshotError::Lazy(LazyError::Base {
                idstr: String::new(),
                reason: format!("snapshot '{name}' changed while its clone was being restored"),
            }));
        }
        let blocks = own.manifest().blocks.iter().map(|b| (b.idstr.clone(), b.used_length)).collect();
        let source = Arc::new(StorePageSource::new(own, None));
        tracing::debug!(snapshot = name, "shared memory base created");
        Ok(Base::start(blocks, source, opts, Box::new(pin))?)
    })
}

/// Maps `base` over `blocks` (already discarded and of the snapshot's used lengths) and
/// starts the clone's page server on it, with the clone's working-set list `prefetch`.
pub fn start_on_base(
    blocks: &[Arc<RamBlock>],
    base: Arc<Base>,
    prefetch: &[(Arc<str>, u64)],
    on_error: Box<dyn Fn(&LazyError) + Send + Sync>,
) -> Result<PageServer, SnapshotError> {
    let mut lazy = Vec::with_capacity(blocks.len());
    for b in blocks {
        let missing = || LazyError::Base { idstr: b.idstr().to_string(), reason: "not in the base".into() };
        let bi = base.block_index(b.idstr()).ok_or_else(missing)?;
        let (fd, len) = base.block_fd(bi).ok_or_else(missing)?;
        if len != b.used_length() {
            return Err(LazyError::Base {
                idstr: b.idstr().to_string(),
                reason: format!("the base holds {len:#x} bytes, the block uses {:#x}", b.used_length()),
            }
            .into());
        }
        b.map_base(fd, len).map_err(migrate::snapshot::ram_io::RamIoError::from)?;
        lazy.push(LazyBlock { idstr: b.idstr().to_string(), host: b.host_addr() as usize, len });
    }
    Ok(PageServer::start_on_base(lazy, base, prefetch, on_error)?)
}
