//! Write protection of RAM blocks for background snapshots: the memory a snapshot saves is
//! the memory as it was when protection started, although the guest keeps running and
//! writing it.
//!
//! Protocol. With the VM paused, [`WriteProtect::start`] registers each block's used length
//! with a new userfaultfd in write-protect mode (created without `UFFD_USER_MODE_ONLY`, so a
//! write KVM makes on the guest's behalf faults too, and with `UFFD_FEATURE_WP_UNPOPULATED`,
//! so a page never touched yet is protected as well) and write-protects the chunks to save.
//! The VM then resumes and two parties move chunks out:
//!
//! - the *saver* (the snapshot's pipeline reader) calls [`WriteProtect::take_chunk`] for each
//!   chunk in order: a chunk nobody copied yet is read from guest memory (reads never fault)
//!   and then unprotected; a chunk the fault thread copied first is taken from its buffer;
//! - the *fault* thread reads write faults: the first write to a chunk not yet saved copies
//!   that chunk into a bounded buffer, unprotects it and wakes the writer. A write to a chunk
//!   already saved (the fault raced with its unprotection) only wakes the writer.
//!
//! A per-chunk state (protected, being copied, buffered, done) makes sure each chunk is copied
//! exactly once and always before the first write to it lands. Writes by VMM threads (a
//! device writing guest memory through [`super::GuestMemory`]) fault like the guest's and
//! wait for the fault thread. The fault thread therefore takes no lock that such a thread may
//! hold: it touches only its own state, the buffer's mutex (never held while guest memory is
//! written) and guest memory by raw reads.
//!
//! Bound. The buffer holds at most `buffer_bytes`; when it is full, a faulting writer waits
//! until the saver has taken buffered chunks, or has reached the faulting chunk itself (the
//! fault thread never claims a chunk it cannot buffer, so the saver never waits on it). A
//! guest that rewrites memory faster than the store takes it is slowed to the store's pace
//! for the rest of the snapshot, never stopped.
//!
//! Pre-protection (tracking). A snapshot can write-protect RAM *before* the pause, while the
//! guest runs, so that the pause only re-protects what the guest wrote since:
//! [`WriteProtect::start_tracking`] protects the chunks with the fault thread in a *track*
//! phase, where a write fault only unprotects its chunk and marks it re-dirtied (no copy);
//! [`WriteProtect::retrack`] re-protects the re-dirtied chunks (call it while the set shrinks);
//! with the VM paused, [`WriteProtect::arm`] makes the protected set exactly the chunks to
//! save (re-protecting the re-dirtied ones, dropping those not to save) and switches the fault
//! thread to *copy before write*. From then on it is the protocol above. Track handling and
//! `arm` hold one lock, so a fault is handled wholly in one phase; in the track phase a fault
//! first unprotects and only then marks the chunk re-dirtied, so `retrack` (which re-protects
//! only marked chunks) never protects a chunk the fault thread is about to unprotect. A late
//! fault on a chunk already marked unprotects it again (it may have been re-protected since),
//! so no writer can fault for ever. Should the fault thread fail, it unprotects everything and
//! `retrack`/`arm` check for that after protecting, and undo, so nothing stays protected
//! without a thread to serve it.
//!
//! End. Dropping the [`WriteProtect`] (an error or a cancellation) unprotects every
//! registered range, which wakes every waiting writer, stops the fault thread and unregisters:
//! the VM is never left with protected memory. A snapshot whose saver took every chunk ends
//! with [`WriteProtect::finish`] instead, which costs nothing per page: every chunk it
//! protected has been unprotected one by one already, so it stops the fault thread and keeps
//! the registration ([`WpRegistration`], see [`keep`]) for the next snapshot. Unprotecting
//! or unregistering all of RAM walks every page table entry of it and makes KVM drop all its
//! mappings (~40 ms per GiB here, each), which is what a repeat snapshot would otherwise
//! spend most of its time on.

mod fault;
mod keep;
mod track;
mod uffd;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use thiserror::Error;

use super::block::RamBlock;
pub use keep::WpRegistration;
use uffd::Uffd;

/// Errors of write protection.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WpError {
    #[error("userfaultfd write protection: {0}")]
    Uffd(String),
    #[error("write-protecting RAM block '{idstr}' ({len:#x} bytes): {reason}")]
    Block { idstr: String, len: u64, reason: String },
    #[error("chunk size {0:#x} is not a power of two multiple of 4 KiB")]
    ChunkSize(u64),
    #[error("write protection: no chunk {chunk} in block {block}")]
    NoChunk { block: usize, chunk: u64 },
    #[error("write protection: chunk {chunk} of RAM block '{idstr}' was taken twice")]
    TakenTwice { idstr: String, chunk: u64 },
    #[error("write protection's fault thread: {0}")]
    Fault(String),
}

/// Page size protection works in.
const PAGE: u64 = 4096;

const PROTECTED: u8 = 0;
const COPYING: u8 = 1;
const BUFFERED: u8 = 2;
const DONE: u8 = 3;
/// Track phase: unprotected by a write fault since the last re-protection.
const REDIRTIED: u8 = 4;

/// Track phase: the most chunks protected by one call. One call is one MMU-notifier
/// invalidation of its whole range, during which KVM cannot map any page of it: the guest
/// stalls on all of it until the call ends (150 ms for 1 GiB of 4 KiB pages here). In 2 MiB
/// pieces (with 64 KiB chunks) it stalls at most on the piece being protected.
const TRACK_RUN: u64 = 32;

/// Phases of the fault thread.
const PHASE_TRACK: u8 = 0;
const PHASE_COPY: u8 = 1;

/// Faults to inject, for tests that show a broken or failing protection is caught. Never set
/// outside tests.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WpTestFaults {
    /// The fault thread unprotects without copying (copy phase).
    pub skip_copy: bool,
    /// `arm` leaves re-dirtied chunks unprotected (they would be saved with later writes).
    pub arm_skips_redirtied: bool,
    /// The fault thread fails at its first track-phase fault.
    pub fail_on_track_fault: bool,
}

/// A block to protect: the chunks (indexes of `chunk`-byte pieces of its used length) that
/// the snapshot will save.
pub struct WpBlock {
    pub block: Arc<RamBlock>,
    pub chunks: Vec<u64>,
}

struct Blk {
    block: Arc<RamBlock>,
    host: u64,
    /// Registered bytes: the used length when protection started.
    len: u64,
    state: Vec<AtomicU8>,
}

/// What the fault thread did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct WpStats {
    /// Write faults taken.
    pub faults: u64,
    /// Chunks the fault thread copied ahead of the saver.
    pub chunks_copied_on_fault: u64,
    /// Times a writer waited for room in the buffer.
    pub buffer_waits: u64,
    /// Pre-protection: write faults in the track phase (each unprotected a chunk).
    pub track_faults: u64,
    /// Pre-protection: `retrack` rounds run while the guest ran.
    pub track_rounds: u64,
    /// Pre-protection: chunks `retrack` re-protected, all rounds.
    pub retracked_chunks: u64,
    /// Chunks `arm` protected (re-dirtied or new to the set) with the VM paused.
    pub armed_chunks: u64,
}

struct Shared {
    /// Shared with the [`WpRegistration`] a clean finish hands on.
    uffd: Arc<Uffd>,
    blocks: Vec<Blk>,
    chunk: u64,
    buffer_bytes: u64,
    /// Chunks the fault thread copied, until the saver takes them: (block, chunk) -> bytes.
    buffer: Mutex<HashMap<(usize, u64), Vec<u8>>>,
    /// Signalled when the saver takes a buffered chunk or a chunk changes state.
    room: Condvar,
    stop: AtomicBool,
    stop_fd: vmm_sys_util::eventfd::EventFd,
    failed: OnceLock<WpError>,
    faults: AtomicU64,
    copied_on_fault: AtomicU64,
    buffer_waits: AtomicU64,
    /// `PHASE_TRACK` or `PHASE_COPY`; changed only with `phase_lock` held.
    phase: AtomicU8,
    /// Held by the fault thread while it handles a fault in the track phase, and by `arm`.
    phase_lock: Mutex<()>,
    track_faults: AtomicU64,
    track_rounds: AtomicU64,
    retracked: AtomicU64,
    armed: AtomicU64,
    /// Test only: faults to inject (the bugs the tests must catch).
    test: WpTestFaults,
}

/// Write protection of a VM's RAM while a background snapshot saves it. See the module doc.
pub struct WriteProtect {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Set by [`WriteProtect::finish`] once nothing is protected and the registration has been
    /// handed on: dropping then has nothing left to undo.
    finished: bool,
}

impl WriteProtect {
    /// Registers `blocks` and write-protects their listed chunks (`chunk` bytes each), then
    /// starts the fault thread. Call it with the VM paused.
    pub fn start(blocks: Vec<WpBlock>, chunk: u64, buffer_bytes: u64) -> Result<WriteProtect, WpError> {
        Self::start_inner(blocks, chunk, buffer_bytes, PHASE_COPY, WpTestFaults::default(), None)
    }

    /// `start` on the registration a previous snapshot of the same blocks kept (see
    /// [`WriteProtect::finish`]): no registering. A registration of other blocks or lengths
    /// (a block was resized since) is dropped and the blocks registered anew.
    pub fn start_on(
        kept: Option<WpRegistration>,
        blocks: Vec<WpBlock>,
        chunk: u64,
        buffer_bytes: u64,
        test: WpTestFaults,
    ) -> Result<WriteProtect, WpError> {
        Self::start_inner(blocks, chunk, buffer_bytes, PHASE_COPY, test, kept)
    }

    /// `start`, with a fault thread that unprotects without copying: a broken protection for
    /// tests to show that they catch it. Never use it to take a snapshot.
    #[doc(hidden)]
    pub fn start_broken_for_tests(
        blocks: Vec<WpBlock>,
        chunk: u64,
        buffer_bytes: u64,
    ) -> Result<WriteProtect, WpError> {
        Self::start_inner(
            blocks,
            chunk,
            buffer_bytes,
            PHASE_COPY,
            WpTestFaults { skip_copy: true, ..Default::default() },
            None,
        )
    }

    fn start_inner(
        blocks: Vec<WpBlock>,
        chunk: u64,
        buffer_bytes: u64,
        phase: u8,
        test: WpTestFaults,
        kept: Option<WpRegistration>,
    ) -> Result<WriteProtect, WpError> {
        if !chunk.is_power_of_two() || chunk < PAGE {
            return Err(WpError::ChunkSize(chunk));
        }
        // A kept registration of exactly these blocks and lengths saves registering them.
        let (uffd, already) = match kept.and_then(|k| k.take_if_covers(&blocks)) {
            Some(uffd) => (uffd, true),
            None => (Arc::new(Uffd::new()?), false),
        };
        let mut blks = Vec::with_capacity(blocks.len());
        for b in &blocks {
            let len = b.block.used_length();
            let chunks = len.div_ceil(chunk);
            blks.push(Blk {
                block: b.block.clone(),
                host: b.block.host_addr() as u64,
                len,
                state: (0..chunks).map(|_| AtomicU8::new(DONE)).collect(),
            });
        }
        let stop_fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| WpError::Uffd(format!("stop eventfd: {e}")))?;
        let shared = Shared {
            uffd,
            blocks: blks,
            chunk,
            buffer_bytes: buffer_bytes.max(chunk),
            buffer: Mutex::new(HashMap::new()),
            room: Condvar::new(),
            stop: AtomicBool::new(false),
            stop_fd,
            failed: OnceLock::new(),
            faults: AtomicU64::new(0),
            copied_on_fault: AtomicU64::new(0),
            buffer_waits: AtomicU64::new(0),
            phase: AtomicU8::new(phase),
            phase_lock: Mutex::new(()),
            track_faults: AtomicU64::new(0),
            track_rounds: AtomicU64::new(0),
            retracked: AtomicU64::new(0),
            armed: AtomicU64::new(0),
            test,
        };
        // From the first registration on, a failure must undo what was done: `Armed` does.
        let mut registered = Vec::new();
        let result = (|| {
            for (i, b) in blocks.iter().enumerate() {
                let blk = &shared.blocks[i];
                if blk.len == 0 {
                    continue;
                }
                let fail = |e: WpError| WpError::Block {
                    idstr: blk.block.idstr().to_string(),
                    len: blk.len,
                    reason: e.to_string(),
                };
                if !already {
                    shared.uffd.register_wp(blk.host, blk.len).map_err(fail)?;
                }
                registered.push(i);
                // Protect runs of consecutive chunks with one call each.
                let mut run: Option<(u64, u64)> = None;
                for &c in &b.chunks {
                    if c >= blk.state.len() as u64 {
                        continue;
                    }
                    blk.state[c as usize].store(PROTECTED, Ordering::Relaxed);
                    run = match run {
                        Some((first, last)) if last + 1 == c && (phase == PHASE_COPY || c - first < TRACK_RUN) => {
                            Some((first, c))
                        }
                        Some((first, last)) => {
                            protect_run(&shared, i, first, last).map_err(fail)?;
                            Some((c, c))
                        }
                        None => Some((c, c)),
                    };
                }
                if let Some((first, last)) = run {
                    protect_run(&shared, i, first, last).map_err(fail)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for &i in &registered {
                let b = &shared.blocks[i];
                let _ = shared.uffd.write_protect(b.host, b.len, false);
                let _ = shared.uffd.unregister(b.host, b.len);
            }
            return Err(e);
        }
        let shared = Arc::new(shared);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("uffd-wp".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.fault_loop()))
                    .unwrap_or_else(|_| Err(WpError::Fault("the thread panicked".into())));
                if let Err(e) = r {
                    tracing::error!("{e}");
                    let _ = s.failed.set(e);
                    // Nobody serves faults any more: let every writer through. The snapshot
                    // sees the error and commits nothing.
                    s.unprotect_all();
                }
            })
            .map_err(|e| WpError::Fault(format!("starting the thread: {e}")));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                shared.unprotect_all();
                shared.unregister_all();
                return Err(e);
            }
        };
        Ok(WriteProtect { shared, thread: Some(thread), finished: false })
    }

    /// The bytes chunk `ci` of block `bi` (indexes as given to `start`) had when protection
    /// started, into `buf`; the chunk is writable afterwards. Each chunk may be taken once.
    pub fn take_chunk(&self, bi: usize, ci: u64, buf: &mut [u8]) -> Result<(), WpError> {
        let s = &self.shared;
        if let Some(e) = s.failed.get() {
            return Err(e.clone());
        }
        let b = s.blocks.get(bi).ok_or(WpError::NoChunk { block: bi, chunk: ci })?;
        let st = b.state.get(ci as usize).ok_or(WpError::NoChunk { block: bi, chunk: ci })?;
        loop {
            match st.load(Ordering::Acquire) {
                PROTECTED => {
                    if st.compare_exchange(PROTECTED, COPYING, Ordering::AcqRel, Ordering::Acquire).is_err() {
                        continue;
                    }
                    s.copy_out(bi, ci, buf);
                    let (start, len) = s.range(bi, ci);
                    let r = s.uffd.write_protect(start, len, false);
                    st.store(DONE, Ordering::Release);
                    s.room.notify_all();
                    return r;
                }
                // The fault thread is copying it; should that thread have failed, it never will.
                COPYING => match s.failed.get() {
                    Some(e) => return Err(e.clone()),
                    None => std::thread::yield_now(),
                },
                BUFFERED => {
                    let data = s.lock_buffer().remove(&(bi, ci));
                    st.store(DONE, Ordering::Release);
                    s.room.notify_all();
                    let data =
                        data.ok_or_else(|| WpError::TakenTwice { idstr: b.block.idstr().to_string(), chunk: ci })?;
                    let n = buf.len().min(data.len());
                    buf[..n].copy_from_slice(&data[..n]);
                    return Ok(());
                }
                _ => return Err(WpError::TakenTwice { idstr: b.block.idstr().to_string(), chunk: ci }),
            }
        }
    }

    /// The first error of the fault thread, if any: the snapshot must not commit then.
    pub fn error(&self) -> Option<WpError> {
        self.shared.failed.get().cloned()
    }

    pub fn stats(&self) -> WpStats {
        let s = &self.shared;
        WpStats {
            faults: s.faults.load(Ordering::Relaxed),
            chunks_copied_on_fault: s.copied_on_fault.load(Ordering::Relaxed),
            buffer_waits: s.buffer_waits.load(Ordering::Relaxed),
            track_faults: s.track_faults.load(Ordering::Relaxed),
            track_rounds: s.track_rounds.load(Ordering::Relaxed),
            retracked_chunks: s.retracked.load(Ordering::Relaxed),
            armed_chunks: s.armed.load(Ordering::Relaxed),
        }
    }
}

fn protect_run(s: &Shared, bi: usize, first: u64, last: u64) -> Result<(), WpError> {
    set_run(s, bi, first, last, true)
}

/// Protects (`protect`) or unprotects chunks `first..=last` of block `bi` with one call.
fn set_run(s: &Shared, bi: usize, first: u64, last: u64, protect: bool) -> Result<(), WpError> {
    let (start, _) = s.range(bi, first);
    let (end_start, end_len) = s.range(bi, last);
    s.uffd.write_protect(start, end_start + end_len - start, protect)
}

impl Shared {
    fn unprotect_all(&self) {
        for b in &self.blocks {
            if b.len > 0 {
                if let Err(e) = self.uffd.write_protect(b.host, b.len, false) {
                    tracing::error!(block = b.block.idstr(), "unprotecting after a background snapshot: {e}");
                }
            }
        }
        self.room.notify_all();
    }

    fn unregister_all(&self) {
        for b in &self.blocks {
            if b.len > 0 {
                if let Err(e) = self.uffd.unregister(b.host, b.len) {
                    tracing::error!(block = b.block.idstr(), "unregistering after a background snapshot: {e}");
                }
            }
        }
    }
}

impl Drop for WriteProtect {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let s = &self.shared;
        // Unprotect first: it wakes every writer, including one the fault thread waits on.
        s.stop.store(true, Ordering::Release);
        s.unprotect_all();
        let _ = s.stop_fd.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the write-protect fault thread panicked");
            }
        }
        // Faults queued meanwhile: their pages are writable now; wake them all.
        for b in &s.blocks {
            if b.len > 0 {
                let _ = s.uffd.wake(b.host, b.len);
            }
        }
        s.unregister_all();
    }
}

#[cfg(test)]
mod tests;
