//! A *base*: one snapshot's memory, decompressed once into shared memory that every clone of
//! the snapshot in this process maps copy-on-write.
//!
//! Layout. One memfd per RAM block of the snapshot (`memfd:snapvisor-base-<n>`), sized to the
//! block's used length. A clone maps it `MAP_PRIVATE` over its block
//! ([`crate::ram::RamBlock::map_base`]): a read maps the page-cache page itself (no copy, one
//! physical page for every clone), a write copies that page into the clone.
//!
//! Filling. The base starts empty (a sparse file) and is filled a chunk at a time, by fill
//! threads (the prefetch list, then everything, at a low priority) and on demand by the
//! clones' fault threads ([`Base::ensure`]). A chunk is written with `pwrite`, never through a
//! shared mapping: `pwrite` fills each page while holding its page-cache lock, and a fault on
//! that page waits for the lock, so a clone never maps a page that is half written. All-zero
//! chunks are `fallocate`d: the file then holds zero pages there, never a hole.
//!
//! Serving clones: missing faults on a shmem mapping. A clone's range is registered with its
//! own userfaultfd in MISSING mode. For a `MAP_PRIVATE` mapping of shmem a missing fault fires
//! only when the page is not in the file's page cache (mm/shmem.c asks userfaultfd before it
//! allocates a page); once a chunk is in the base, every clone maps it without a fault. So the
//! clone's fault thread fills the chunk into the base (or waits for whoever is filling it) and
//! then `UFFDIO_WAKE`s the range: the retried fault finds the page. This was chosen over MINOR
//! mode (`UFFDIO_CONTINUE`), which fires on every first touch of every page in every clone
//! even when the base holds it: a fault per page per clone is exactly the cost sharing is
//! meant to remove. MISSING faults on shmem reach the handler for faults KVM takes itself as
//! for the guest's, since the userfaultfd is created with `user_mode_only(false)` (see
//! `tests/tests/shared_clones.rs`, whose guests run at CPL3 and whose host reads fault too).
//! Once the base is complete a clone unregisters its ranges: from then on it is plain
//! copy-on-write memory, which userfaultfd write-protection can also be registered on.
//!
//! Guarantees (as for [`super::PageServer`]):
//! - the guest never sees a byte that is not the snapshot's: a page enters the base only
//!   complete and verified (the source checks the chunk's hash before returning it);
//! - a chunk that fails (read error, hash mismatch) is marked failed: the fill threads go on
//!   with the other chunks, and only a clone that touches the chunk is stopped (its fault
//!   thread gets the error); later touches of it fail the same way without reading it again;
//! - a chunk a fault is filling is waited for by other faults and skipped by the loaders; a
//!   fault waits for a loader only while the loader writes the chunk (loaders read before
//!   they claim, see `Inner::preload`), and a loader's read is dropped when a fault claimed
//!   the chunk meanwhile;
//! - the snapshot's pin (given to [`Base::start`]) is held until every chunk is filled or has
//!   failed: nothing is read from the store after that;
//! - the base's memory goes when the last clone using it has gone: clones hold an
//!   `Arc<Base>`, whose drop stops the fill threads and closes the memfds; the pages go
//!   with the clones' mappings of them.
//!
//! The [`BaseRegistry`] finds a live base by the snapshot's manifest, compared whole: a
//! snapshot deleted and created again under the same name has another manifest (another
//! commit time, other chunks) and gets a base of its own. A base in which a chunk has failed
//! is not handed to new clones: it would fail that chunk for them too, without reading it
//! again, for as long as any clone keeps the base alive, though the failure may have passed
//! (an I/O error, a pack put right). A new clone gets a new base, which reads it again.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::serving::PAGE;
use super::{Fill, LazyError, PageSource};

/// Nice value of the fill threads once past the prefetch list.
const BACKGROUND_NICE: libc::c_int = 10;

/// How a base fills itself.
#[derive(Clone, Debug)]
pub struct BaseOptions {
    /// Chunks to fill first, in order: (block idstr, offset).
    pub prefetch: Vec<(Arc<str>, u64)>,
    /// Fill every chunk after the prefetch list, until complete.
    pub background_fill: bool,
    /// Fill threads (0 is taken as 1).
    pub fill_threads: usize,
}

impl Default for BaseOptions {
    fn default() -> Self {
        BaseOptions { prefetch: Vec::new(), background_fill: true, fill_threads: 2 }
    }
}

/// Counters of a base.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BaseStats {
    pub chunks: u64,
    pub chunks_filled: u64,
    pub chunks_failed: u64,
    /// Bytes read from the store (compressed, as stored).
    pub bytes_stored_read: u64,
    /// Bytes written into the base (data chunks).
    pub bytes_filled: u64,
}

struct BaseBlock {
    idstr: String,
    len: u64,
    chunks: u64,
    fd: OwnedFd,
    filled: Vec<AtomicU64>,
    claimed: Vec<AtomicU64>,
    failed: Vec<AtomicU64>,
}

fn bit(words: &[AtomicU64], i: u64) -> bool {
    words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
}

/// Sets bit `i`; true if it was clear.
fn set_bit(words: &[AtomicU64], i: u64) -> bool {
    let b = 1 << (i % 64);
    words[(i / 64) as usize].fetch_or(b, Ordering::AcqRel) & b == 0
}

fn clear_bit(words: &[AtomicU64], i: u64) {
    words[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
}

struct Inner {
    blocks: Vec<BaseBlock>,
    source: Arc<dyn PageSource>,
    chunk: u64,
    total: u64,
    /// Chunks not yet filled; the base is complete at 0.
    unfilled: AtomicU64,
    /// Chunks neither filled nor failed; nothing more is read from the store at 0.
    unsettled: AtomicU64,
    failed_count: AtomicU64,
    stop: AtomicBool,
    /// Readable (for ever) once the base is complete: clones' fault threads poll it.
    complete_fd: vmm_sys_util::eventfd::EventFd,
    /// The snapshot's pin, dropped once every chunk is settled.
    hold: Mutex<Option<Box<dyn Send>>>,
    /// Why a chunk failed, by (block, chunk): told to every clone that touches it.
    reasons: Mutex<BTreeMap<(usize, u64), String>>,
    bytes_stored_read: AtomicU64,
    bytes_filled: AtomicU64,
    /// Threads waiting for a chunk another one is filling (waiters.rs).
    waiters: super::waiters::Waiters,
}

/// One snapshot's memory in shared memory, filled lazily; see the module doc.
pub struct Base {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Fill threads load every chunk, touched or not ([`BaseOptions::background_fill`]).
    fills: bool,
}

fn memfd(n: usize, len: u64) -> Result<OwnedFd, String> {
    let name = std::ffi::CString::new(format!("snapvisor-base-{n}")).map_err(|e| e.to_string())?;
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create returns a new descriptor
    // or -1, checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::off_t::try_from(len).map_err(|_| format!("size {len:#x} too large"))?;
    // SAFETY: ftruncate on a descriptor we own; the result is checked.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
        return Err(format!("sizing to {len:#x} bytes: {}", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

impl Base {
    /// Creates the base of `blocks` ((idstr, used length), page-aligned) filled from
    /// `source`, and starts its fill threads. `hold` (the snapshot's pin) is kept until
    /// every chunk is filled or failed.
    pub fn start(
        blocks: Vec<(String, u64)>,
        source: Arc<dyn PageSource>,
        opts: BaseOptions,
        hold: Box<dyn Send>,
    ) -> Result<Arc<Base>, LazyError> {
        let chunk = source.chunk_size();
        if !chunk.is_power_of_two() || chunk < PAGE {
            return Err(LazyError::ChunkSize(chunk));
        }
        let mut state = Vec::with_capacity(blocks.len());
        let mut total = 0;
        for (n, (idstr, len)) in blocks.into_iter().enumerate() {
            if len == 0 || len % PAGE != 0 {
                return Err(LazyError::Base { idstr, reason: format!("length {len:#x} is not page-aligned") });
            }
            let fd = memfd(n, len).map_err(|reason| LazyError::Base { idstr: idstr.clone(), reason })?;
            let chunks = len.div_ceil(chunk);
            let words = chunks.div_ceil(64) as usize;
            let zeros = || (0..words).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
            total += chunks;
            state.push(BaseBlock { idstr, len, chunks, fd, filled: zeros(), claimed: zeros(), failed: zeros() });
        }
        let (prefetch, _) =
            super::prefetch_list::chunks_of(&opts.prefetch, state.iter().map(|b| (b.idstr.as_str(), b.len)), chunk);
        let inner = Arc::new(Inner {
            blocks: state,
            source,
            chunk,
            total,
            unfilled: AtomicU64::new(total),
            unsettled: AtomicU64::new(total),
            failed_count: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            complete_fd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| LazyError::Create(format!("base eventfd: {e}")))?,
            hold: Mutex::new(Some(hold)),
            reasons: Mutex::new(BTreeMap::new()),
            bytes_stored_read: AtomicU64::new(0),
            bytes_filled: AtomicU64::new(0),
            waiters: Default::default(),
        });
        if total == 0 {
            inner.settle_all();
        }
        let base = Arc::new(Base { inner, threads: Mutex::new(Vec::new()), fills: opts.background_fill });
        if opts.background_fill || !prefetch.is_empty() {
            let prefetch = Arc::new(prefetch);
            let n = opts.fill_threads.max(1);
            let mut threads = base.threads.lock().unwrap_or_else(PoisonError::into_inner);
            for k in 0..n {
                let (inner, list, background) = (base.inner.clone(), prefetch.clone(), opts.background_fill);
                let t = std::thread::Builder::new()
                    .name(format!("base-fill{k}"))
                    .spawn(move || inner.fill_loop(&list, background, k, n))
                    .map_err(|e| LazyError::Thread { thread: "base fill", reason: e.to_string() })?;
                threads.push(t);
            }
        }
        Ok(base)
    }

    /// The index of block `idstr` in the base.
    pub fn block_index(&self, idstr: &str) -> Option<usize> {
        self.inner.blocks.iter().position(|b| b.idstr == idstr)
    }

    /// Block `bi`'s memfd and length.
    pub fn block_fd(&self, bi: usize) -> Option<(BorrowedFd<'_>, u64)> {
        self.inner.blocks.get(bi).map(|b| (b.fd.as_fd(), b.len))
    }

    pub fn chunk_size(&self) -> u64 {
        self.inner.chunk
    }

    /// Makes chunk `ci` of block `bi` part of the base, or waits for the thread filling it.
    /// `buf` holds at least a chunk. An error names why the chunk could not be read.
    pub fn ensure(&self, bi: usize, ci: u64, buf: &mut [u8]) -> Result<(), String> {
        self.inner.ensure(bi, ci, buf)
    }

    /// True if fill threads load every chunk whatever the clones touch, so that the base
    /// completes unless a chunk fails.
    pub fn fills_in_background(&self) -> bool {
        self.fills
    }

    /// Fills chunk `ci` of block `bi` unless it is filled, has failed, or another thread is
    /// filling it: for loaders that must not wait on each other. A failure is recorded in the
    /// base (the clones touching the chunk get it), not returned.
    pub fn fill_if_free(&self, bi: usize, ci: u64, buf: &mut [u8]) {
        self.inner.preload(bi, ci, buf);
    }

    /// Every chunk is filled.
    pub fn is_complete(&self) -> bool {
        self.inner.unfilled.load(Ordering::Acquire) == 0
    }

    /// Every chunk is filled or has failed: nothing more will be read from the store.
    pub fn is_settled(&self) -> bool {
        self.inner.unsettled.load(Ordering::Acquire) == 0
    }

    /// A descriptor that becomes readable (and stays so) once the base is complete.
    pub fn complete_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd lives as long as `inner`, which outlives the borrow of `self`.
        unsafe { BorrowedFd::borrow_raw(self.inner.complete_fd.as_raw_fd()) }
    }

    /// True while the snapshot's pin is still held.
    pub fn holds(&self) -> bool {
        self.inner.hold.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    pub fn stats(&self) -> BaseStats {
        let i = &self.inner;
        BaseStats {
            chunks: i.total,
            chunks_filled: i.total - i.unfilled.load(Ordering::Acquire),
            chunks_failed: i.failed_count.load(Ordering::Acquire),
            bytes_stored_read: i.bytes_stored_read.load(Ordering::Relaxed),
            bytes_filled: i.bytes_filled.load(Ordering::Relaxed),
        }
    }

    /// Waits until the base is settled or `timeout` passes; true if settled.
    pub fn wait_settled(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while !self.is_settled() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        for t in self.threads.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            if t.join().is_err() {
                tracing::error!("a base fill thread panicked");
            }
        }
        tracing::debug!("shared memory base freed");
    }
}

impl Inner {
    fn ensure(&self, bi: usize, ci: u64, buf: &mut [u8]) -> Result<(), String> {
        let b = self.blocks.get(bi).ok_or_else(|| format!("no block {bi} in the base"))?;
        if ci >= b.chunks {
            return Err(format!("chunk {ci} is beyond the base's copy of '{}'", b.idstr));
        }
        loop {
            if bit(&b.filled, ci) {
                return Ok(());
            }
            if bit(&b.failed, ci) {
                return Err(self.reason(bi, ci));
            }
            if set_bit(&b.claimed, ci) {
                let r = self.fill(bi, ci, buf);
                clear_bit(&b.claimed, ci);
                self.waiters.wake();
                return r;
            }
            // Another thread is filling it: wait for that, then look again.
            self.waiters.wait_while(|| bit(&b.claimed, ci) && !bit(&b.filled, ci) && !bit(&b.failed, ci));
        }
    }

    fn reason(&self, bi: usize, ci: u64) -> String {
        self.reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(bi, ci))
            .cloned()
            .unwrap_or_else(|| "the chunk could not be read".into())
    }

    /// Reads chunk `ci` of block `bi` and writes it into the base; the caller holds its claim.
    fn fill(&self, bi: usize, ci: u64, buf: &mut [u8]) -> Result<(), String> {
        let b = &self.blocks[bi];
        if bit(&b.filled, ci) || bit(&b.failed, ci) {
            return if bit(&b.filled, ci) { Ok(()) } else { Err(self.reason(bi, ci)) };
        }
        let read = self.read(bi, ci, buf);
        self.write(bi, ci, read, buf)
    }

    /// For loaders (fill threads, a clone's prefetch): fills chunk `ci` of block `bi` unless it
    /// is filled, has failed or is claimed, reading it *before* claiming it. The claim is held
    /// only to write it, so a clone's fault on the chunk waits for a loader only while it
    /// writes, never while it reads: loaders run at a low priority past the prefetch list, and
    /// a fault that waited for their reads went at their pace. A fault that claimed the chunk
    /// meanwhile writes its own copy and this one is dropped. A chunk that cannot be read is
    /// read again under a claim ([`Inner::ensure`]), which records the failure once.
    fn preload(&self, bi: usize, ci: u64, buf: &mut [u8]) {
        let Some(b) = self.blocks.get(bi) else { return };
        if ci >= b.chunks || bit(&b.filled, ci) || bit(&b.failed, ci) || bit(&b.claimed, ci) {
            return;
        }
        let read = self.read(bi, ci, buf);
        if read.is_err() {
            let _ = self.ensure(bi, ci, buf);
            return;
        }
        if !set_bit(&b.claimed, ci) {
            return;
        }
        if !bit(&b.filled, ci) && !bit(&b.failed, ci) {
            let _ = self.write(bi, ci, read, buf);
        }
        clear_bit(&b.claimed, ci);
        self.waiters.wake();
    }

    /// Reads chunk `ci` of block `bi` from the source (which checks it).
    fn read(&self, bi: usize, ci: u64, buf: &mut [u8]) -> Result<Fill, String> {
        let b = &self.blocks[bi];
        let off = ci * self.chunk;
        let len = self.chunk.min(b.len - off) as usize;
        let fill = self.source.read_chunk(&b.idstr, off, &mut buf[..len])?;
        if let Fill::Data { stored } | Fill::Shared { stored, .. } = &fill {
            self.bytes_stored_read.fetch_add(*stored, Ordering::Relaxed);
        }
        Ok(fill)
    }

    /// Writes chunk `ci` of block `bi`, as [`Inner::read`] gave it, into the base and marks it
    /// filled, or marks it failed; the caller holds its claim and found it neither.
    fn write(&self, bi: usize, ci: u64, read: Result<Fill, String>, buf: &[u8]) -> Result<(), String> {
        let b = &self.blocks[bi];
        let off = ci * self.chunk;
        let len = self.chunk.min(b.len - off) as usize;
        let r = match read {
            Ok(Fill::Data { .. }) => pwrite_all(b.fd.as_fd(), &buf[..len], off).map(|()| {
                self.bytes_filled.fetch_add(len as u64, Ordering::Relaxed);
            }),
            Ok(Fill::Shared { data, .. }) if data.len() == len => pwrite_all(b.fd.as_fd(), &data, off).map(|()| {
                self.bytes_filled.fetch_add(len as u64, Ordering::Relaxed);
            }),
            Ok(Fill::Shared { data, .. }) => Err(format!("the cached chunk has {} bytes, expected {len}", data.len())),
            Ok(Fill::Zero) => fallocate(b.fd.as_fd(), off, len as u64),
            Err(reason) => Err(reason),
        };
        match r {
            Ok(()) => {
                if set_bit(&b.filled, ci) {
                    if self.unfilled.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let _ = self.complete_fd.write(1);
                    }
                    self.settled_one();
                }
                Ok(())
            }
            Err(reason) => {
                tracing::warn!("shared memory base: chunk of RAM block '{}' at {off:#x}: {reason}", b.idstr);
                self.reasons.lock().unwrap_or_else(PoisonError::into_inner).insert((bi, ci), reason.clone());
                if set_bit(&b.failed, ci) {
                    self.failed_count.fetch_add(1, Ordering::AcqRel);
                    self.settled_one();
                }
                Err(reason)
            }
        }
    }

    fn settled_one(&self) {
        if self.unsettled.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settle_all();
        }
    }

    fn settle_all(&self) {
        if self.unfilled.load(Ordering::Acquire) == 0 {
            let _ = self.complete_fd.write(1);
        }
        let held = self.hold.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(held);
    }

    /// Fill worker `k` of `n`: every n-th chunk of the prefetch list, then of the blocks. A
    /// chunk that fails is marked failed and skipped: only clones touching it stop.
    fn fill_loop(&self, prefetch: &[(usize, u64)], background: bool, k: usize, n: usize) {
        let mut buf = vec![0u8; self.chunk as usize];
        for &(bi, ci) in prefetch.iter().skip(k).step_by(n) {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            self.preload(bi, ci, &mut buf);
        }
        if !background {
            return;
        }
        // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes
        // this thread's nice value (an error just leaves it as it was).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, BACKGROUND_NICE) };
        for (bi, b) in self.blocks.iter().enumerate() {
            for ci in (k as u64..b.chunks).step_by(n) {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                self.preload(bi, ci, &mut buf);
            }
        }
    }
}

fn pwrite_all(fd: BorrowedFd<'_>, mut data: &[u8], mut off: u64) -> Result<(), String> {
    while !data.is_empty() {
        let at = libc::off_t::try_from(off).map_err(|_| format!("offset {off:#x} too large"))?;
        // SAFETY: `data` is a valid slice for the call; pwrite copies out of it into the file.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), at) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("writing the base at {off:#x}: {e}"));
        }
        if n == 0 {
            return Err(format!("writing the base at {off:#x}: no progress"));
        }
        data = &data[n as usize..];
        off += n as u64;
    }
    Ok(())
}

fn fallocate(fd: BorrowedFd<'_>, off: u64, len: u64) -> Result<(), String> {
    let (at, n) = match (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
        (Ok(a), Ok(n)) => (a, n),
        _ => return Err(format!("zero range {off:#x}+{len:#x} too large")),
    };
    // SAFETY: fallocate on a descriptor we own; it allocates zeroed pages in the file's range.
    if unsafe { libc::fallocate(fd.as_raw_fd(), 0, at, n) } != 0 {
        return Err(format!("zeroing the base at {off:#x}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Live bases by snapshot manifest; see the module doc.
#[derive(Default)]
pub struct BaseRegistry {
    bases: Mutex<Vec<(Arc<storage::Manifest>, Weak<Base>)>>,
}

impl BaseRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(BaseRegistry::default())
    }

    /// The live base of `manifest`, or a new one from `create` (called with the registry
    /// locked, so two clones never make two bases of one snapshot).
    pub fn get_or_create<E>(
        &self,
        manifest: &storage::Manifest,
        create: impl FnOnce() -> Result<Arc<Base>, E>,
    ) -> Result<Arc<Base>, E> {
        let mut g = self.bases.lock().unwrap_or_else(PoisonError::into_inner);
        g.retain(|(_, w)| w.strong_count() > 0);
        // A base in which a chunk failed keeps failing it (for the clones already on it): a
        // new clone gets a base of its own, which reads that chunk again.
        let sound = g
            .iter()
            .filter(|(m, _)| **m == *manifest)
            .filter_map(|(_, w)| w.upgrade())
            .find(|b| b.inner.failed_count.load(Ordering::Acquire) == 0);
        if let Some(b) = sound {
            return Ok(b);
        }
        let base = create()?;
        g.push((Arc::new(manifest.clone()), Arc::downgrade(&base)));
        Ok(base)
    }

    /// Bases alive now.
    pub fn live(&self) -> Vec<Arc<Base>> {
        let g = self.bases.lock().unwrap_or_else(PoisonError::into_inner);
        g.iter().filter_map(|(_, w)| w.upgrade()).collect()
    }
}
