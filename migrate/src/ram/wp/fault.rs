//! The fault thread of write protection: it reads the userfaultfd's write faults and makes
//! each faulting chunk writable, copying it into the bounded buffer first when nobody has
//! saved it yet (copy phase), or only marking it re-dirtied (track phase, [`super::track`]).
//! The protocol and the per-chunk states are in the parent module's doc.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};
use std::time::Duration;

use super::uffd::{UffdMsg, UFFD_EVENT_PAGEFAULT, UFFD_PAGEFAULT_FLAG_WP};
use super::{Shared, WpError, BUFFERED, COPYING, PAGE, PHASE_TRACK, PROTECTED};

impl Shared {
    pub(super) fn find(&self, addr: u64) -> Option<(usize, u64)> {
        self.blocks
            .iter()
            .position(|b| addr >= b.host && addr - b.host < b.len)
            .map(|i| (i, (addr - self.blocks[i].host) / self.chunk))
    }

    pub(super) fn range(&self, bi: usize, ci: u64) -> (u64, u64) {
        let b = &self.blocks[bi];
        let off = ci * self.chunk;
        (b.host + off, self.chunk.min(b.len - off))
    }

    /// Copies chunk `ci` of block `bi` out of guest memory into `buf` (its length).
    pub(super) fn copy_out(&self, bi: usize, ci: u64, buf: &mut [u8]) {
        let (start, len) = self.range(bi, ci);
        let n = buf.len().min(len as usize);
        // SAFETY: `start..start+len` lies inside the block's registered range, which is inside
        // its mapping (alive as long as `blocks` holds the block); `buf` holds at least `n`
        // bytes. Raw copy: other threads may read the same memory; writers wait on faults.
        unsafe { std::ptr::copy_nonoverlapping(start as *const u8, buf.as_mut_ptr(), n) };
    }

    pub(super) fn lock_buffer(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, u64), Vec<u8>>> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn fault_loop(&self) -> Result<(), WpError> {
        let mut msgs = [UffdMsg::default(); 16];
        loop {
            let mut fds = [
                libc::pollfd { fd: self.uffd.raw(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&self.stop_fd), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: `fds` is a valid array of two pollfd structures.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(WpError::Fault(format!("poll: {e}")));
            }
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let n = self.uffd.read_events(&mut msgs)?;
            for m in &msgs[..n] {
                if m.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                self.faults.fetch_add(1, Ordering::Relaxed);
                let addr = m.address & !(PAGE - 1);
                let Some((bi, ci)) = self.find(addr) else {
                    return Err(WpError::Fault(format!(
                        "fault at host address {addr:#x} outside every registered block"
                    )));
                };
                if m.flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                    self.on_wp_fault(bi, ci)?;
                }
                // The chunk is unprotected now, whoever did it; the writer may still sleep if
                // it queued after that unprotection woke the range.
                self.uffd.wake(addr, PAGE)?;
            }
        }
    }

    /// A write fault on chunk `ci` of block `bi`: tracked or copied, by phase.
    fn on_wp_fault(&self, bi: usize, ci: u64) -> Result<(), WpError> {
        if self.phase.load(Ordering::Acquire) == PHASE_TRACK {
            let g = self.lock_phase();
            if self.phase.load(Ordering::Acquire) == PHASE_TRACK {
                return self.track_fault(bi, ci, &g);
            }
        }
        self.serve(bi, ci)
    }

    pub(super) fn lock_phase(&self) -> MutexGuard<'_, ()> {
        self.phase_lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes chunk `ci` of block `bi` writable, copying it first if nobody has.
    pub(super) fn serve(&self, bi: usize, ci: u64) -> Result<(), WpError> {
        let st = &self.blocks[bi].state[ci as usize];
        let (start, len) = self.range(bi, ci);
        loop {
            match st.load(Ordering::Acquire) {
                PROTECTED => {
                    if self.test.skip_copy {
                        return self.uffd.write_protect(start, len, false);
                    }
                    let mut buf = self.lock_buffer();
                    let used: u64 = buf.values().map(|v| v.len() as u64).sum();
                    if used + len > self.buffer_bytes {
                        // Wait for the saver to take buffered chunks or to save this one
                        // itself; never claim it while it cannot be buffered.
                        self.buffer_waits.fetch_add(1, Ordering::Relaxed);
                        let (g, _) = self
                            .room
                            .wait_timeout(buf, Duration::from_millis(50))
                            .unwrap_or_else(PoisonError::into_inner);
                        drop(g);
                        if self.stop.load(Ordering::Acquire) {
                            return Ok(());
                        }
                        continue;
                    }
                    if st.compare_exchange(PROTECTED, COPYING, Ordering::AcqRel, Ordering::Acquire).is_err() {
                        continue;
                    }
                    let mut data = vec![0u8; len as usize];
                    self.copy_out(bi, ci, &mut data);
                    buf.insert((bi, ci), data);
                    drop(buf);
                    self.copied_on_fault.fetch_add(1, Ordering::Relaxed);
                    // Unprotected before it is marked: a chunk the saver has taken (`DONE`) is
                    // writable, whoever copied it ([`WriteProtect::finish`] relies on it).
                    // The saver waits on `COPYING` meanwhile.
                    let r = self.uffd.write_protect(start, len, false);
                    st.store(BUFFERED, Ordering::Release);
                    return r;
                }
                // The saver is copying it; it unprotects once done.
                COPYING => std::thread::yield_now(),
                _ => return Ok(()),
            }
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
        }
    }
}
