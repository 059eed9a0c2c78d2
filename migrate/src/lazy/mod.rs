//! Lazy restore: guest RAM registered with userfaultfd and filled from a snapshot as the guest
//! touches it.
//!
//! Protocol. Before any vCPU runs, every RAM block being restored is registered with one
//! userfaultfd in MISSING mode, created with `user_mode_only(false)` so that faults KVM takes
//! on the guest's behalf reach it too. Exactly the snapshot's `used_length` of each block is
//! registered. Two threads then fill the blocks a chunk (the store's unit) at a time:
//!
//! - the *fault* thread reads fault events and serves the chunk holding each faulting
//!   address: read it from the [`PageSource`] (which verifies and decompresses it), then
//!   `UFFDIO_COPY` it (`UFFDIO_ZEROPAGE` for all-zero chunks), waking the faulting thread;
//! - the *fill* threads (one per core by default) first load the prefetch list (chunks in the
//!   order a previous run first faulted them), then every chunk not yet resident, until the
//!   VM is fully resident. With a hold-off they first wait at a gate (gate.rs) until the
//!   guest runs, so that they do not take the cores the first instruction needs (all but
//!   the first `fill_ungated` of them; by default all).
//!
//! Prefetch. The list is read from the store, so it is checked first: entries naming a block
//! not served or an offset past its length are dropped, and so are repeats. Its loaders take
//! entries from one shared cursor, so the list is loaded front first, in the guest's order,
//! by every loader at once. A restore can also load it *before the first instruction*
//! ([`PageServer::load_prefetch`]): the restoring thread joins the fill threads on the list and
//! returns once every listed chunk is resident, or with the first error, which names the
//! chunk (the VM is then never started). Either way the claims below apply unchanged.
//!
//! The threads may want the same chunk; a per-chunk claim lets one thread load it while the other
//! waits (a fault) or moves on (a fill), and a per-chunk bit records residency. Since only the
//! claim holder places a chunk's pages, a copy that fails with `EEXIST` means a page was
//! there that the server did not put there, holding bytes that are not the snapshot's: that
//! is an error that stops the VM, never taken as "resident".
//!
//! Registration. A block must have no page present when it is registered, or the guest would
//! see whatever was there (the destination's own fw_cfg file, say) instead of the snapshot's
//! bytes. The owner drops the pages first (`RamBlock::discard_present`); the server checks
//! after registering and refuses a block that still has any. Both ask the page tables
//! (`ram::used_pages`, `PAGEMAP_SCAN`: empty levels are skipped whole, so a block nobody
//! touched costs microseconds whatever its size, and a swapped-out page counts as present),
//! or `mincore` page by page where the kernel cannot answer or the mapping is not private
//! anonymous memory.
//!
//! Failure. A read error or hash mismatch from the source is reported through the server's
//! error callback, which stops the VM; the chunk is never mapped, so the guest never sees
//! wrong bytes, and the faulting vCPU leaves `KVM_RUN` when the VM kicks it. The
//! userfaultfd stays open until the server is dropped, which the VM does only after its vCPU
//! threads have ended: closing it earlier would let pending faults map zero pages.
//! Should a server thread panic, the panic is caught and reported the same way.
//!
//! Pins. The source's snapshot must not be deleted or collected while chunks are still to be
//! read from it: the restore hands the server its snapshot pin
//! ([`PageServer::hold_until_resident`]), which the server drops when the last chunk becomes
//! resident, when serving fails, and when it is stopped or dropped (the VM goes away).
//!
//! Resizes. While a block is not fully resident, a resize of it is refused (the server
//! registers a RAM-block listener that vetoes it).
//!
//! Clones. Clones of one snapshot can instead share a *base* (base.rs): the snapshot's
//! memory decompressed once into memfds that every clone maps copy-on-write, served on
//! missing faults of the shared mapping (base_server.rs). The guarantees above hold there
//! too; base.rs says how.

mod base;
mod base_server;
mod cache;
mod gate;
mod place;
pub mod prefetch_list;
mod privatize;
mod server;
mod serving;
mod slab;
mod stats;
mod waiters;

pub use base::{Base, BaseOptions, BaseRegistry, BaseStats};
pub use cache::ChunkCache;
pub use gate::FillGate;
pub use server::{default_fill_threads, LazyBlock, PageServer, ServerOptions, MAX_DEFAULT_FILL_THREADS};
pub use slab::{ChunkBytes, SlotMut};
pub use stats::{LazyStats, StatsSnapshot, FAULT_BUCKETS_US};

use thiserror::Error;

/// What a chunk read gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fill {
    /// `buf` holds the chunk's bytes; `stored` bytes were read from the store (0 when the
    /// chunk came from a cache shared with other restores).
    Data { stored: u64 },
    /// The chunk is all zeros (nothing stored; `buf` untouched).
    Zero,
    /// The chunk's bytes, verified, held by a cache shared with other restores (`buf`
    /// untouched): they are placed from there, without a copy into `buf` first. Its length
    /// must be the chunk's; the server refuses any other. `stored` bytes were read from the
    /// store for it (0 on a cache hit; a miss is read straight into the cache).
    Shared { data: ChunkBytes, stored: u64 },
}

/// Where lazily restored pages come from.
pub trait PageSource: Send + Sync {
    /// Chunk size in bytes: a power of two, a multiple of the page size.
    fn chunk_size(&self) -> u64;
    /// Reads the chunk of block `idstr` at `offset` (a multiple of the chunk size) into `buf`
    /// (the chunk's length: the chunk size, or less for a block's last chunk).
    fn read_chunk(&self, idstr: &str, offset: u64, buf: &mut [u8]) -> Result<Fill, String>;
}

/// Errors of the page server.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LazyError {
    #[error("creating userfaultfd: {0} (is /dev/userfaultfd or vm.unprivileged_userfaultfd available?)")]
    Create(String),
    #[error("registering RAM block '{idstr}' ({len:#x} bytes) with userfaultfd: {reason}")]
    Register { idstr: String, len: u64, reason: String },
    #[error("chunk size {0:#x} is not a power of two multiple of 4 KiB")]
    ChunkSize(u64),
    #[error("lazy restore: reading chunk of RAM block '{idstr}' at offset {offset:#x}: {reason}")]
    Source { idstr: String, offset: u64, reason: String },
    #[error("lazy restore: UFFDIO_COPY of RAM block '{idstr}' at offset {offset:#x}: {reason}")]
    Copy { idstr: String, offset: u64, reason: String },
    #[error("lazy restore: RAM block '{idstr}' already had a page at offset {offset:#x} that the page server did not place: its bytes are not the snapshot's")]
    Present { idstr: String, offset: u64 },
    #[error("lazy restore: reading userfaultfd events: {0}")]
    Events(String),
    #[error("lazy restore: fault at host address {addr:#x} outside every registered block")]
    StrayFault { addr: u64 },
    #[error("lazy restore: {thread} thread panicked: {message}")]
    Panicked { thread: &'static str, message: String },
    #[error("lazy restore: the page server stopped before the prefetch list was loaded")]
    Stopped,
    #[error("shared memory base of RAM block '{idstr}': {reason}")]
    Base { idstr: String, reason: String },
    #[error("starting the page server's {thread} thread: {reason}")]
    Thread { thread: &'static str, reason: String },
}

#[cfg(test)]
mod loader_tests;
#[cfg(test)]
mod prefetch_tests;
#[cfg(test)]
mod tests;
