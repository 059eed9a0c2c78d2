//! One RAM block: a host mapping reserved at `max_length`, of which `used_length` is in use.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::error::RamError;

/// How to create a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlockConfig {
    pub idstr: String,
    /// The used size; it need not be page-aligned (the unaligned size is kept).
    pub size: u64,
    /// The most the block may grow to (resizeable blocks); rounded up to the page size.
    pub max_size: u64,
    /// 0 = the host's page size.
    pub page_size: u64,
    pub resizeable: bool,
}

/// Called after a resize with the block's idstr and new unaligned length.
pub type ResizedHook = Box<dyn Fn(&str, u64) + Send + Sync>;

/// A RAM block. Guest memory is written by vCPUs concurrently with the VMM, so contents are
/// only ever copied with raw pointer copies (no `&[u8]` is formed over guest memory).
pub struct RamBlock {
    idstr: String,
    host: *mut u8,
    max_length: u64,
    page_size: u64,
    resizeable: bool,
    used_length: AtomicU64,
    unaligned_length: AtomicU64,
    hook: Mutex<Option<ResizedHook>>,
    /// One bit per page of `max_length`: written by the VMM since the last `take_dirty`.
    dirty: Vec<AtomicU64>,
    /// Serialises resizes of this block.
    pub(super) resize_lock: Mutex<()>,
    /// Part of the mapping is a private mapping of a shared file (a clone's base, see
    /// [`RamBlock::map_base`]): dropping pages there would bring the file's bytes back, so
    /// [`RamBlock::discard`] maps fresh anonymous memory instead.
    file_backed: AtomicBool,
}

// SAFETY: `host` points at a private mapping owned by this block for its whole life; all
// access goes through bounds-checked raw copies, and the mutable metadata is atomic or locked.
unsafe impl Send for RamBlock {}
// SAFETY: as above.
unsafe impl Sync for RamBlock {}

impl std::fmt::Debug for RamBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamBlock")
            .field("idstr", &self.idstr)
            .field("used_length", &self.used_length())
            .field("max_length", &self.max_length)
            .field("resizeable", &self.resizeable)
            .finish()
    }
}

/// Host mappings of every live RAM block in this process: start -> length. For measuring
/// what guest memory costs (the daemon's guest-memory PSS), never for access.
static LIVE_MAPPINGS: Mutex<std::collections::BTreeMap<usize, usize>> = Mutex::new(std::collections::BTreeMap::new());

/// The host ranges (start, end) of every live RAM block in this process.
pub fn live_ram_ranges() -> Vec<(usize, usize)> {
    LIVE_MAPPINGS.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(&s, &l)| (s, s + l)).collect()
}

pub(super) fn host_page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

pub(super) fn align_up(v: u64, page: u64) -> Option<u64> {
    v.checked_add(page - 1).map(|x| x & !(page - 1))
}

impl RamBlock {
    pub(super) fn new(cfg: RamBlockConfig) -> Result<RamBlock, RamError> {
        let err = |reason: String| RamError::Config { idstr: cfg.idstr.clone(), reason };
        if cfg.idstr.is_empty() || cfg.idstr.len() > 256 {
            return Err(err(format!("idstr of {} bytes (1 to 256 allowed)", cfg.idstr.len())));
        }
        let page_size = if cfg.page_size == 0 { host_page_size() } else { cfg.page_size };
        if !page_size.is_power_of_two() || page_size < host_page_size() {
            return Err(err(format!("page size {page_size:#x} is not a power of two of at least the host's")));
        }
        if cfg.size == 0 {
            return Err(err("size 0".into()));
        }
        let used = align_up(cfg.size, page_size).ok_or_else(|| err(format!("size {:#x} overflows", cfg.size)))?;
        let max = align_up(cfg.max_size.max(cfg.size), page_size)
            .ok_or_else(|| err(format!("max size {:#x} overflows", cfg.max_size)))?;
        if !cfg.resizeable && max != used {
            return Err(err(format!("a non-resizeable block has max size {max:#x} != size {used:#x}")));
        }
        let len = usize::try_from(max).map_err(|_| err(format!("max size {max:#x} does not fit this host")))?;
        // SAFETY: a fresh anonymous private mapping with no address hint; the result is checked.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(RamError::Map {
                idstr: cfg.idstr,
                len: max,
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        let pages = max / page_size;
        LIVE_MAPPINGS.lock().unwrap_or_else(PoisonError::into_inner).insert(host as usize, len);
        Ok(RamBlock {
            idstr: cfg.idstr,
            host: host.cast(),
            max_length: max,
            page_size,
            resizeable: cfg.resizeable,
            used_length: AtomicU64::new(used),
            unaligned_length: AtomicU64::new(cfg.size),
            hook: Mutex::new(None),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            resize_lock: Mutex::new(()),
            file_backed: AtomicBool::new(false),
        })
    }

    pub fn idstr(&self) -> &str {
        &self.idstr
    }

    /// The page-aligned used length.
    pub fn used_length(&self) -> u64 {
        self.used_length.load(Ordering::Acquire)
    }

    /// The size the owner last asked for.
    pub fn unaligned_length(&self) -> u64 {
        self.unaligned_length.load(Ordering::Acquire)
    }

    pub fn max_length(&self) -> u64 {
        self.max_length
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    pub fn resizeable(&self) -> bool {
        self.resizeable
    }

    /// Base of the host mapping (`max_length` bytes).
    pub fn host_addr(&self) -> *mut u8 {
        self.host
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), RamError> {
        let used = self.used_length();
        match offset.checked_add(len as u64) {
            Some(end) if end <= used => Ok(()),
            _ => Err(RamError::OutOfRange { idstr: self.idstr.clone(), offset, len: len as u64, used }),
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the block.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), RamError> {
        self.check(offset, buf.len())?;
        // SAFETY: offset + len <= used_length <= max_length: inside the mapping. A raw copy is
        // used because vCPUs may write the same memory concurrently.
        unsafe { std::ptr::copy_nonoverlapping(self.host.add(offset as usize), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the block at `offset` and marks the pages dirty.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), RamError> {
        self.check(offset, data.len())?;
        // SAFETY: as in `read`; `data` does not overlap guest memory (it is a Rust slice the
        // caller owns).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.host.add(offset as usize), data.len()) };
        self.mark_dirty(offset, data.len() as u64);
        Ok(())
    }

    /// Drops the pages of `offset..offset+len` (page-aligned, inside the mapping): they read as
    /// zero afterwards and no longer hold host memory, and they are *missing*, so userfaultfd
    /// can serve them (a present page makes `UFFDIO_COPY` fail with `EEXIST`). The range is
    /// marked dirty, since its contents changed.
    ///
    /// A block backed by a base ([`RamBlock::map_base`]) behaves the same: `MADV_DONTNEED`
    /// would bring back the base's bytes, not zeros, so the range gets fresh anonymous memory.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), RamError> {
        let host_page = host_page_size();
        let inside = offset.checked_add(len).is_some_and(|end| end <= self.max_length);
        if !inside || !offset.is_multiple_of(host_page) || !len.is_multiple_of(host_page) {
            return Err(RamError::Discard {
                idstr: self.idstr.clone(),
                offset,
                len,
                reason: format!("not page-aligned inside the {:#x}-byte mapping", self.max_length),
            });
        }
        if len == 0 {
            return Ok(());
        }
        let r = if self.file_backed.load(Ordering::Acquire) {
            // SAFETY: the range is page-aligned and inside this block's reservation, which only
            // this block owns; MAP_FIXED replaces exactly those pages with zero-fill-on-demand
            // anonymous memory (KVM follows through its MMU notifier).
            let p = unsafe {
                libc::mmap(
                    self.host.add(offset as usize).cast(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                -1
            } else {
                0
            }
        } else {
            // SAFETY: the range is page-aligned and inside this block's private anonymous
            // mapping, which only this block owns; MADV_DONTNEED replaces its pages with
            // zero-fill-on-demand memory and touches nothing outside the range. Concurrent
            // readers see old or zero bytes.
            unsafe { libc::madvise(self.host.add(offset as usize).cast(), len as usize, libc::MADV_DONTNEED) }
        };
        if r != 0 {
            return Err(RamError::Discard {
                idstr: self.idstr.clone(),
                offset,
                len,
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        self.mark_dirty(offset, len);
        Ok(())
    }

    /// [`RamBlock::discard`] of the whole reservation, dropping only the runs of pages that
    /// are in use: a `MADV_DONTNEED` over gigabytes nobody touched still costs the kernel, and
    /// KVM, a walk of all of it. Afterwards no page of the block is present, as with
    /// `discard`, and the whole reservation is marked dirty the same way. A block backed by a
    /// base is discarded whole (its file's pages are not this process's page tables).
    ///
    /// The runs come from the page tables ([`super::used_pages`], `PAGEMAP_SCAN`: a few
    /// microseconds for an untouched 4 GiB block, where the `mincore` walk was ~0.65 ms), or,
    /// on a kernel without it, from a `mincore` walk.
    ///
    /// `mincore` says whether a page is in RAM, not whether it is mapped: an anonymous page
    /// that was swapped out reads as absent, would not be dropped, and would come back from
    /// swap with the old bytes instead of faulting to the page server. The page-table scan
    /// does see swapped-out pages, but a kernel without it falls back to `mincore`; so either
    /// walk is only used while no swap device is configured (`/proc/swaps` read before and
    /// after the walk: a page can only go to swap while one is); otherwise the whole
    /// reservation is dropped.
    /// Returns the bytes dropped.
    pub fn discard_present(&self) -> Result<u64, RamError> {
        self.discard_present_unless(swap_configured)
    }

    /// [`RamBlock::discard_present`] with the swap probe given (tests).
    pub fn discard_present_unless(&self, swap_configured: fn() -> bool) -> Result<u64, RamError> {
        if self.file_backed.load(Ordering::Acquire) || swap_configured() {
            self.discard(0, self.max_length)?;
            return Ok(self.max_length);
        }
        let dropped = match super::used_pages(self.host as usize, self.max_length, false) {
            Ok(Some(runs)) => {
                let mut dropped = 0;
                for r in runs {
                    self.discard(r.start, r.end - r.start)?;
                    dropped += r.end - r.start;
                }
                dropped
            }
            Ok(None) => self.discard_present_mincore()?,
            Err(e) => {
                tracing::warn!(block = %self.idstr, "finding the pages in use: {e}; asking mincore instead");
                self.discard_present_mincore()?
            }
        };
        if swap_configured() {
            // Swap came on during the walk: a page passed over may be in it now.
            self.discard(0, self.max_length)?;
            return Ok(self.max_length);
        }
        self.mark_dirty(0, self.max_length);
        Ok(dropped)
    }

    /// The runs of present pages of the reservation, found with `mincore`, dropped; returns
    /// the bytes dropped.
    fn discard_present_mincore(&self) -> Result<u64, RamError> {
        let page = host_page_size();
        let err = |offset: u64, len: u64, reason: String| RamError::Discard {
            idstr: self.idstr.clone(),
            offset,
            len,
            reason,
        };
        /// Pages asked about per `mincore` call.
        const BATCH: u64 = 16 * 1024;
        let pages = self.max_length / page;
        let mut vec = vec![0u8; BATCH.min(pages) as usize];
        let mut dropped = 0;
        let mut first = 0;
        while first < pages {
            let n = BATCH.min(pages - first);
            // SAFETY: `first..first+n` pages lie inside this block's page-aligned reservation;
            // mincore only writes one byte per page into `vec`, which holds at least `n`.
            let r = unsafe {
                libc::mincore(self.host.add((first * page) as usize).cast(), (n * page) as usize, vec.as_mut_ptr())
            };
            if r != 0 {
                return Err(err(first * page, n * page, format!("mincore: {}", std::io::Error::last_os_error())));
            }
            let mut i = 0;
            while let Some(start) = next_present(&vec[..n as usize], i) {
                let end = vec[start..n as usize].iter().position(|v| v & 1 == 0).map_or(n as usize, |e| start + e);
                let (off, len) = ((first + start as u64) * page, (end - start) as u64 * page);
                self.discard(off, len)?;
                dropped += len;
                i = end;
            }
            first += n;
        }
        Ok(dropped)
    }

    /// Maps `fd` (a clone's base, bytes `0..len`) copy-on-write over the start of the block:
    /// reads see the file's pages, writes copy them into this block's own memory. `len` must
    /// be page-aligned and within the reservation. The block keeps the mapping until it is
    /// dropped or [`RamBlock::discard`]ed.
    pub fn map_base(&self, fd: BorrowedFd<'_>, len: u64) -> Result<(), RamError> {
        let err = |reason: String| RamError::Map { idstr: self.idstr.clone(), len, reason };
        if len == 0 || len > self.max_length || !len.is_multiple_of(host_page_size()) {
            return Err(err(format!("a base of {len:#x} bytes does not fit the {:#x}-byte mapping", self.max_length)));
        }
        self.file_backed.store(true, Ordering::Release);
        // SAFETY: `host..host+len` is inside this block's reservation, which only this block
        // owns; MAP_FIXED replaces exactly those pages with a private (copy-on-write) mapping
        // of the caller's file, which the mapping keeps open by itself.
        let p = unsafe {
            libc::mmap(
                self.host.cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err(format!("mapping the base: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }

    /// True once part of the block is a private mapping of a base ([`RamBlock::map_base`]).
    pub fn is_base_backed(&self) -> bool {
        self.file_backed.load(Ordering::Acquire)
    }

    /// Sets the hook called after every resize (replacing any earlier one).
    pub fn set_resized_hook(&self, hook: ResizedHook) {
        *self.hook.lock().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    pub(super) fn call_hook(&self, unaligned: u64) {
        if let Some(h) = &*self.hook.lock().unwrap_or_else(PoisonError::into_inner) {
            h(&self.idstr, unaligned);
        }
    }

    pub(super) fn set_lengths(&self, used: u64, unaligned: u64) {
        self.unaligned_length.store(unaligned, Ordering::Release);
        self.used_length.store(used, Ordering::Release);
    }

    /// Marks the pages touching `offset..offset+len` dirty (clamped to the mapping). Call it
    /// after the writes it covers, never before: a [`RamBlock::take_dirty`] between a mark and
    /// its write would copy the page too early and clear the bit.
    ///
    /// Device data paths call this per frame, so it is cheap: shifts (the page size is a
    /// power of two), and no atomic read-modify-write for a page whose bit is already set.
    /// Skipping is safe only with the fence below: without it the load could see a bit that
    /// a concurrent `take_dirty` already cleared (and that copy could miss the caller's
    /// writes), which is the store-buffering pattern. The fence orders the caller's writes
    /// before the loads; `take_dirty`'s `SeqCst` swap orders its clear before its copy. A
    /// single page takes the read-modify-write directly, which costs no more than the fence.
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.max_length {
            return;
        }
        let end = offset.saturating_add(len).min(self.max_length);
        let shift = self.page_size.trailing_zeros();
        let (first, last) = (offset >> shift, ((end - 1) >> shift) + 1);
        if last - first == 1 {
            self.dirty[(first >> 6) as usize].fetch_or(1 << (first & 63), Ordering::AcqRel);
            return;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        // A word of 64 pages at a time: a lazy restore discards whole blocks, and one atomic
        // per page cost 1.3-5 ms per GiB before its first instruction.
        let mut p = first;
        while p < last {
            let bit = p & 63;
            let n = (64 - bit).min(last - p);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            let word = &self.dirty[(p >> 6) as usize];
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::AcqRel);
            }
            p += n;
        }
    }

    /// Page indexes dirtied since the last call, in order; clears them.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.dirty.iter().enumerate() {
            // SeqCst: pairs with the fence in `mark_dirty` (see there).
            let mut bits = w.swap(0, Ordering::SeqCst);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }
}

impl Drop for RamBlock {
    fn drop(&mut self) {
        // SAFETY: `host` was mapped with `max_length` bytes in `new` and nothing refers to it
        // once the block is dropped (the KVM slot map deletes its slots on removal).
        unsafe { libc::munmap(self.host.cast(), self.max_length as usize) };
        LIVE_MAPPINGS.lock().unwrap_or_else(PoisonError::into_inner).remove(&(self.host as usize));
    }
}

/// Whether the host has a swap device or file on (`/proc/swaps` lists one besides its header
/// line). Unreadable counts as yes: the caller then takes the slow, always-correct way.
pub fn swap_configured() -> bool {
    match std::fs::read_to_string("/proc/swaps") {
        Ok(s) => s.lines().skip(1).any(|l| !l.trim().is_empty()),
        Err(_) => true,
    }
}

/// Index of the first byte at or after `from` of a `mincore` vector with bit 0 set (the page
/// is present), looking 64 bytes at a time (the OR of a block vectorises).
fn next_present(vec: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    for block in vec[from.min(vec.len())..].chunks(64) {
        if block.iter().fold(0u8, |a, b| a | b) & 1 != 0 {
            return block.iter().position(|v| v & 1 != 0).map(|i| at + i);
        }
        at += block.len();
    }
    None
}
