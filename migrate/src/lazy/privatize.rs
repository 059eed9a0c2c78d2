//! A clone on a shared base that writes what it reads gets its own copy of its memory, made
//! at once in the host instead of page by page through the guest's faults.
//!
//! Why. A clone maps its base `MAP_PRIVATE`. A guest that reads a page and then writes it
//! (memfill checks the last pass, then writes the next) costs two faults per page on this
//! machine's paravirtual KVM: the read maps the base's page read-only, and the write makes
//! the kernel copy it (and, as we read it, KVM drop its mapping of the old page: an
//! MMU-notifier invalidation per page; not profiled). Measured with `bench fleet --guest
//! memfill --counts 1`: a pass of a shared clone took 1659 ms against 206 ms with a private
//! copy placed writable by `UFFDIO_COPY`. A page the host makes writable *before* KVM maps
//! it costs one fault, like a private clone's.
//!
//! How. A thread per clone samples, every [`SAMPLE_EVERY`], which of its pages are mapped and
//! which of those are its own (`/proc/self/pagemap`: present, and no longer the base's file
//! page, i.e. written). Once the clone has written at least [`MIN_WRITTEN_SHARE`] of its
//! memory and at least [`WRITTEN_PER_READ`] times as many pages as it has only read, it is
//! taken to write what it reads, and the thread makes all of its memory its own:
//! per chunk, [`super::Base::ensure`] (the chunk is in the base, so no fault of ours is
//! involved) then `MADV_POPULATE_WRITE` over the clone's range of it. A clone that only reads
//! (a `touch` clone waiting for its go, a memfill in verify mode) is never converted and
//! keeps sharing. The conversion copies the snapshot's bytes (the base's pages), so the guest
//! sees exactly what it would have; a page it wrote already is left as it is (the populate
//! finds it writable).
//!
//! Guarantees kept: a chunk that cannot be filled is skipped (the guest's own touch of it
//! fails and stops the VM as before: never a wrong byte); the thread ends when the server
//! stops or fails; it never holds the snapshot pin.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::serving::{Shared, PAGE};

/// How often a clone's pages are sampled at first.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(25);
/// After this long undecided, sampling slows to [`SAMPLE_SLOW`].
const FAST_FOR: Duration = Duration::from_secs(2);
const SAMPLE_SLOW: Duration = Duration::from_secs(1);
/// The clone must have written at least this share of its memory (1/n) and
/// [`MIN_WRITTEN_PAGES`] ...
pub const MIN_WRITTEN_SHARE: u64 = 64;
pub const MIN_WRITTEN_PAGES: u64 = 256;
/// ... and this many times the pages it has only read.
pub const WRITTEN_PER_READ: u64 = 3;

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE_OR_SHARED: u64 = 1 << 61;

/// Pages of a clone's blocks: (mapped and its own, mapped from the base).
fn sample(pagemap: &File, shared: &Shared) -> std::io::Result<(u64, u64)> {
    let (mut own, mut base) = (0, 0);
    let mut buf = vec![0u8; 4096 * 8];
    for b in &shared.blocks {
        let pages = b.desc.len / PAGE;
        let first = b.desc.host as u64 / PAGE;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(4096);
            let bytes = &mut buf[..(n * 8) as usize];
            pagemap.read_exact_at(bytes, (first + done) * 8)?;
            for e in bytes.chunks_exact(8) {
                let e = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                if e & PM_PRESENT != 0 {
                    if e & PM_FILE_OR_SHARED != 0 {
                        base += 1;
                    } else {
                        own += 1;
                    }
                }
            }
            done += n;
        }
    }
    Ok((own, base))
}

/// Whether a clone with `own` written and `base` read-only pages of `total` writes what it reads.
pub fn writes_what_it_reads(own: u64, base: u64, total: u64) -> bool {
    own >= (total / MIN_WRITTEN_SHARE).max(MIN_WRITTEN_PAGES) && own >= WRITTEN_PER_READ * base
}

impl Shared {
    /// The clone's sampling thread (see the module doc). Returns when the clone has been
    /// converted, or the server stops or fails.
    pub(super) fn privatize_loop(&self) {
        let Some(link) = &self.base else { return };
        let pagemap = match File::open("/proc/self/pagemap") {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("shared base: no pagemap, clones keep sharing whatever they write: {e}");
                return;
            }
        };
        let total: u64 = self.blocks.iter().map(|b| b.desc.len / PAGE).sum();
        let t0 = Instant::now();
        loop {
            let every = if t0.elapsed() < FAST_FOR { SAMPLE_EVERY } else { SAMPLE_SLOW };
            if self.wait_stop(every) {
                return;
            }
            match sample(&pagemap, self) {
                Ok((own, base)) if writes_what_it_reads(own, base, total) => {
                    tracing::debug!(
                        own,
                        base,
                        total,
                        "shared base: the clone writes what it reads: copying its memory"
                    );
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("shared base: reading pagemap: {e}; the clone keeps sharing");
                    return;
                }
            }
        }
        let t1 = Instant::now();
        let mut buf = vec![0u8; self.chunk as usize];
        let mut chunks = 0u64;
        for (bi, b) in self.blocks.iter().enumerate() {
            for ci in 0..b.chunks {
                if self.stop.load(Ordering::Acquire) || self.failed.get().is_some() {
                    return;
                }
                let off = ci * self.chunk;
                if let Err(reason) = link.base.ensure(link.index[bi], ci, &mut buf) {
                    // Left to the guest: its touch of the chunk fails and stops it.
                    tracing::debug!("shared base: not copying chunk {off:#x} of '{}': {reason}", b.desc.idstr);
                    continue;
                }
                let len = self.chunk.min(b.desc.len - off) as usize;
                // SAFETY: the range is part of the clone's block mapping, which the VM keeps
                // until this server (and this thread) has stopped; MADV_POPULATE_WRITE only
                // faults pages in (copying the base's page into the clone, as a guest write
                // would), it changes no byte the guest sees.
                let r = unsafe {
                    libc::madvise((b.desc.host + off as usize) as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE)
                };
                if r != 0 {
                    let e = std::io::Error::last_os_error();
                    tracing::debug!(
                        "shared base: copying chunk {off:#x} of '{}': {e}; the clone keeps sharing",
                        b.desc.idstr
                    );
                    return;
                }
                chunks += 1;
            }
        }
        tracing::debug!(chunks, ms = t1.elapsed().as_secs_f64() * 1e3, "shared base: the clone has its own copy");
    }

    /// Sleeps `d` unless the server stops first (true).
    fn wait_stop(&self, d: Duration) -> bool {
        let mut fd =
            libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&self.stop_fd), events: libc::POLLIN, revents: 0 };
        // SAFETY: `fd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut fd, 1, d.as_millis() as libc::c_int) };
        n > 0 || self.stop.load(Ordering::Acquire) || self.failed.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clones_that_write_what_they_read_are_converted() {
        let total = 16384;
        assert!(!writes_what_it_reads(0, 0, total), "a clone that touched nothing");
        assert!(!writes_what_it_reads(0, total, total), "a clone that read everything");
        assert!(!writes_what_it_reads(64, 0, total), "a few host writes");
        assert!(!writes_what_it_reads(255, 0, 8192), "fewer than MIN_WRITTEN_PAGES in a small guest");
        assert!(writes_what_it_reads(total / 64, 10, total), "a clone rewriting its memory");
        assert!(!writes_what_it_reads(total / 2, total / 4, total), "writes only twice what it only read");
        assert!(writes_what_it_reads(total, 1, total));
    }
}
