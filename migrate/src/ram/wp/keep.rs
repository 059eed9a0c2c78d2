//! Ending a background snapshot without touching every page, and keeping the userfaultfd
//! registration for the next one.
//!
//! Why. Lifting write protection from a range (`UFFDIO_WRITEPROTECT` without the protect
//! bit) and unregistering it (`UFFDIO_UNREGISTER`, which clears the protection bits again)
//! each walk every page table entry of the range and invalidate KVM's mappings of all of it,
//! protected or not: ~40 ms each for 1 GiB on these hosts, ~85 ms of a repeat snapshot that
//! otherwise copies 1% of RAM in ~10 ms.
//!
//! What makes it safe. In the copy phase a chunk reaches `DONE` only once it is writable
//! again: the saver unprotects it before marking it `DONE`; the fault thread buffers it and
//! unprotects it before marking it `BUFFERED`, and only then can the saver take it and mark
//! it `DONE` (should that unprotect fail, the thread fails and unprotects everything itself).
//! Chunks `arm` did not want are unprotected by `arm` (any failure there makes the caller
//! drop the protection whole). So once the phase is copy and every chunk is `DONE`, with the
//! fault thread not failed, no page of the registered ranges is write-protected:
//! [`WriteProtect::finish`] checks exactly that and otherwise falls back to the full
//! unprotect and unregister of `Drop`.
//!
//! Between snapshots the kept registration has no fault thread. No write can fault on it,
//! since nothing is protected (a write faults on a write-protect registration only on a
//! protected page); the guest's writes are seen by KVM's dirty log and the blocks' own dirty
//! bitmaps as before, which is what incremental snapshots use: the registration plays no part
//! in dirty tracking. The next snapshot starts a new fault thread on it before protecting
//! anything. A registration that no longer fits the blocks (a block resized or replaced) is
//! dropped, which unregisters it, and the blocks are registered anew; a mapping replaced under
//! it (`RamBlock::discard` of a file-backed range) makes protecting fail, which drops it too,
//! and the snapshot falls back as it does for any failure to protect.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::super::block::RamBlock;
use super::uffd::Uffd;
use super::{Shared, WpBlock, WriteProtect, DONE, PHASE_COPY};

/// A userfaultfd with RAM blocks registered for write protection and no page protected: what
/// a finished background snapshot leaves for the VM's next one. Dropping it unregisters.
pub struct WpRegistration {
    uffd: Option<Arc<Uffd>>,
    /// Each block with the host address and length registered (nothing when the length is 0).
    ranges: Vec<(Arc<RamBlock>, u64, u64)>,
    /// The fault thread of the snapshot that kept it, told to stop but not waited for (that
    /// waits on the scheduler, not on work: off the snapshot's time); joined before the
    /// registration is used again or dropped.
    last: Option<(JoinHandle<()>, Arc<Shared>)>,
}

impl WpRegistration {
    /// The userfaultfd, if this registration covers exactly `blocks` (same blocks, same order,
    /// each at the address and length registered); otherwise `None`, and the registration is
    /// dropped (unregistered).
    pub(super) fn take_if_covers(mut self, blocks: &[WpBlock]) -> Option<Arc<Uffd>> {
        if !self.settle() {
            return None;
        }
        let fits = self.ranges.len() == blocks.len()
            && self.ranges.iter().zip(blocks).all(|((b, host, len), w)| {
                Arc::ptr_eq(b, &w.block) && *host == w.block.host_addr() as u64 && *len == w.block.used_length()
            });
        if !fits {
            tracing::debug!("write protection: the kept registration no longer fits the RAM blocks; registering anew");
            return None;
        }
        self.ranges.clear();
        self.uffd.take()
    }

    /// Joins the last snapshot's fault thread and wakes any fault it left; false if that
    /// thread failed (it unprotected everything then: the registration is sound, but is not
    /// reused).
    fn settle(&mut self) -> bool {
        let Some((t, s)) = self.last.take() else { return true };
        if t.join().is_err() {
            tracing::error!("the write-protect fault thread panicked");
            return false;
        }
        if let Some(uffd) = &self.uffd {
            for (_, host, len) in &self.ranges {
                if *len > 0 {
                    let _ = uffd.wake(*host, *len);
                }
            }
        }
        match s.failed.get() {
            Some(e) => {
                tracing::warn!("write protection: the last snapshot's fault thread failed as it stopped: {e}");
                false
            }
            None => true,
        }
    }

    /// Bytes registered, all blocks.
    pub fn registered_bytes(&self) -> u64 {
        self.ranges.iter().map(|(_, _, len)| len).sum()
    }
}

impl Drop for WpRegistration {
    fn drop(&mut self) {
        self.settle();
        let Some(uffd) = &self.uffd else { return };
        for (b, host, len) in &self.ranges {
            if *len > 0 {
                if let Err(e) = uffd.unregister(*host, *len) {
                    tracing::error!(block = b.idstr(), "unregistering write protection: {e}");
                }
            }
        }
    }
}

impl WriteProtect {
    /// Ends a snapshot whose saver took every chunk it protected: stops the fault thread and,
    /// when no page can still be protected (the module doc of [`self`] says when), returns
    /// the registration for the next snapshot without touching a page. Otherwise (a chunk not
    /// taken, a failed fault thread, never armed) it unprotects and unregisters everything as
    /// dropping does, and returns `None`.
    ///
    /// The fault thread is told to stop but not waited for: faults it has read and not yet
    /// answered are on chunks already writable, which it answers before it stops (should it
    /// fail instead, it unprotects everything itself, and the registration is not reused).
    /// The registration joins it before it is used again or dropped.
    pub fn finish(mut self) -> Option<WpRegistration> {
        let s = self.shared.clone();
        s.stop.store(true, Ordering::Release);
        let _ = s.stop_fd.write(1);
        // Every chunk `DONE` is every chunk writable (see the module doc); no new chunk can be
        // protected now: `arm` and `retrack` are never called after the copy.
        let clean = s.failed.get().is_none()
            && s.phase.load(Ordering::Acquire) == PHASE_COPY
            && s.blocks.iter().all(|b| b.state.iter().all(|st| st.load(Ordering::Acquire) == DONE));
        if !clean {
            tracing::debug!("write protection: not every chunk was taken; unprotecting all of RAM");
            // `Drop` stops the thread, unprotects everything and unregisters.
            return None;
        }
        let t = self.thread.take()?;
        self.finished = true;
        Some(WpRegistration {
            uffd: Some(s.uffd.clone()),
            ranges: s.blocks.iter().map(|b| (b.block.clone(), b.host, b.len)).collect(),
            last: Some((t, s.clone())),
        })
    }
}

#[cfg(test)]
mod tests;
