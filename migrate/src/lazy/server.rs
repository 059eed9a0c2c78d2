//! The page server: userfaultfd registration, the fault and fill threads, residency.

use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, IoctlFlags, Uffd, UffdBuilder};

use super::stats::LazyStats;
use super::{Fill, LazyError, PageSource};
use crate::ram::{RamBlock, RamBlockListener};

/// Host page size the copy fallback works in.
const PAGE: u64 = 4096;
/// Nice value of fill threads once they stream in memory nobody asked for yet.
const BACKGROUND_NICE: libc::c_int = 10;

/// A RAM block to restore lazily: its host mapping and the snapshot's used length.
#[derive(Clone, Debug)]
pub struct LazyBlock {
    pub idstr: String,
    /// Host address of the block's mapping (page-aligned).
    pub host: usize,
    /// Bytes to register and serve: the snapshot's used_length.
    pub len: u64,
}

/// How the server fills memory.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Chunks to load first, in order: (block idstr, offset).
    pub prefetch: Vec<(String, u64)>,
    /// Stream in every chunk after the prefetch list, until fully resident.
    pub background_fill: bool,
    /// Record the order of chunks served on faults (for a later prefetch list).
    pub record_faults: bool,
    /// Threads loading the prefetch list and the background fill (0 is taken as 1).
    pub fill_threads: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { prefetch: Vec::new(), background_fill: false, record_faults: false, fill_threads: 2 }
    }
}

struct Block {
    desc: LazyBlock,
    chunks: u64,
    resident: Vec<AtomicU64>,
    /// A thread is reading and copying the chunk: others wait for it rather than repeat it.
    claimed: Vec<AtomicU64>,
}

impl Block {
    /// Claims `chunk`; false if another thread holds it.
    fn claim(&self, chunk: u64) -> bool {
        let bit = 1 << (chunk % 64);
        self.claimed[(chunk / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn release(&self, chunk: u64) {
        self.claimed[(chunk / 64) as usize].fetch_and(!(1 << (chunk % 64)), Ordering::AcqRel);
    }

    fn is_resident(&self, chunk: u64) -> bool {
        self.resident[(chunk / 64) as usize].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    /// Marks `chunk` resident; true if it was not before.
    fn set_resident(&self, chunk: u64) -> bool {
        let bit = 1 << (chunk % 64);
        self.resident[(chunk / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn claimed_now(&self, chunk: u64) -> bool {
        self.claimed[(chunk / 64) as usize].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    fn resident_count(&self) -> u64 {
        self.resident.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }
}

struct Shared {
    uffd: Uffd,
    blocks: Vec<Block>,
    source: Arc<dyn PageSource>,
    chunk: u64,
    remaining: AtomicU64,
    stop: AtomicBool,
    stop_fd: vmm_sys_util::eventfd::EventFd,
    stats: LazyStats,
    failed: OnceLock<LazyError>,
    on_error: Box<dyn Fn(&LazyError) + Send + Sync>,
    fault_order: Mutex<Vec<(u32, u64)>>,
    record: bool,
}

#[derive(Clone, Copy)]
enum Why {
    Fault,
    Prefetch,
    Background,
}

impl Shared {
    fn fail(&self, e: LazyError) {
        if self.failed.set(e.clone()).is_ok() {
            tracing::error!("{e}");
            (self.on_error)(&e);
        }
        self.stop.store(true, Ordering::Release);
    }

    fn chunk_len(&self, b: &Block, chunk: u64) -> u64 {
        self.chunk.min(b.desc.len - chunk * self.chunk)
    }

    /// Copies (or zero-fills) `len` bytes at block offset `off`; `EEXIST` means another thread
    /// got there first, and the rest of the chunk is then done page by page.
    fn place(&self, b: &Block, off: u64, len: u64, data: Option<&[u8]>) -> Result<bool, LazyError> {
        let dst = b.desc.host + off as usize;
        let copy_err = |reason: String| LazyError::Copy { idstr: b.desc.idstr.clone(), offset: off, reason };
        let whole = match data {
            // SAFETY: dst..dst+len lies inside the block's registered range (off + len <= len of
            // the block); `d` holds `len` bytes.
            Some(d) => unsafe { self.uffd.copy(d.as_ptr().cast(), dst as *mut _, len as usize, true) },
            // SAFETY: as above; zeropage writes nothing of ours.
            None => unsafe { self.uffd.zeropage(dst as *mut _, len as usize, true) },
        };
        let mut raced = false;
        match whole {
            Ok(_) => return Ok(false),
            Err(userfaultfd::Error::CopyFailed(e)) | Err(userfaultfd::Error::ZeropageFailed(e))
                if e as i32 == libc::EEXIST =>
            {
                raced = true
            }
            Err(userfaultfd::Error::PartiallyCopied(_)) => {}
            Err(e) => return Err(copy_err(e.to_string())),
        }
        // Page by page: some pages are already there (EEXIST) or the mm changed (EAGAIN).
        for p in (0..len).step_by(PAGE as usize) {
            let pdst = (dst + p as usize) as *mut libc::c_void;
            for attempt in 0.. {
                let r = match data {
                    // SAFETY: one page inside the registered range; `d` has it.
                    Some(d) => unsafe { self.uffd.copy(d[p as usize..].as_ptr().cast(), pdst, PAGE as usize, true) },
                    // SAFETY: one page inside the registered range.
                    None => unsafe { self.uffd.zeropage(pdst, PAGE as usize, true) },
                };
                match r {
                    Ok(_) => break,
                    Err(userfaultfd::Error::CopyFailed(e)) | Err(userfaultfd::Error::ZeropageFailed(e))
                        if e as i32 == libc::EEXIST =>
                    {
                        raced = true;
                        break;
                    }
                    Err(userfaultfd::Error::PartiallyCopied(_)) if attempt < 100 => continue,
                    Err(e) => return Err(copy_err(e.to_string())),
                }
            }
        }
        Ok(raced)
    }

    /// Makes chunk `ci` of block `bi` resident.
    fn serve(&self, bi: usize, ci: u64, why: Why, buf: &mut [u8]) -> Result<(), LazyError> {
        let b = &self.blocks[bi];
        if b.is_resident(ci) {
            return Ok(());
        }
        if !b.claim(ci) {
            // Another thread is loading it: a fault waits for that (the copy wakes the guest
            // anyway); a fill thread moves on.
            if matches!(why, Why::Fault) {
                while !b.is_resident(ci) && self.failed.get().is_none() && b.claimed_now(ci) {
                    std::thread::yield_now();
                }
                if !b.is_resident(ci) && self.failed.get().is_none() {
                    return self.serve(bi, ci, why, buf);
                }
            }
            return Ok(());
        }
        let result = self.load(b, ci, why, buf);
        b.release(ci);
        result
    }

    /// Reads chunk `ci` and copies it in; the caller holds its claim.
    fn load(&self, b: &Block, ci: u64, why: Why, buf: &mut [u8]) -> Result<(), LazyError> {
        if b.is_resident(ci) {
            return Ok(());
        }
        let off = ci * self.chunk;
        let len = self.chunk_len(b, ci);
        let fill = self
            .source
            .read_chunk(&b.desc.idstr, off, &mut buf[..len as usize])
            .map_err(|reason| LazyError::Source { idstr: b.desc.idstr.clone(), offset: off, reason })?;
        let raced = match fill {
            Fill::Data { stored } => {
                self.stats.bytes_stored_read.fetch_add(stored, Ordering::Relaxed);
                self.place(b, off, len, Some(&buf[..len as usize]))?
            }
            Fill::Zero => {
                self.stats.zero_chunks.fetch_add(1, Ordering::Relaxed);
                self.place(b, off, len, None)?
            }
        };
        if raced {
            self.stats.races.fetch_add(1, Ordering::Relaxed);
        }
        if b.set_resident(ci) {
            self.stats.bytes_copied.fetch_add(len, Ordering::Relaxed);
            let counter = match why {
                Why::Fault => &self.stats.chunks_on_fault,
                Why::Prefetch => &self.stats.chunks_prefetched,
                Why::Background => &self.stats.chunks_background,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.stats.mark_resident();
            }
        }
        Ok(())
    }

    fn locate(&self, addr: usize) -> Option<(usize, u64)> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            let start = b.desc.host;
            (addr >= start && ((addr - start) as u64) < b.desc.len).then(|| (i, (addr - start) as u64 / self.chunk))
        })
    }

    fn fault_loop(&self) -> Result<(), LazyError> {
        let mut buf = vec![0u8; self.chunk as usize];
        let mut events = userfaultfd::EventBuffer::new(64);
        let mut fds = [
            libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.stop_fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        while !self.stop.load(Ordering::Acquire) {
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(LazyError::Events(e.to_string()));
            }
            if fds[1].revents != 0 {
                break;
            }
            if fds[0].revents == 0 {
                continue;
            }
            let faults: Vec<usize> = self
                .uffd
                .read_events(&mut events)
                .map_err(|e| LazyError::Events(e.to_string()))?
                .filter_map(|ev| match ev {
                    Ok(Event::Pagefault { addr, .. }) => Some(Ok(addr as usize)),
                    Ok(_) => None,
                    Err(e) => Some(Err(LazyError::Events(e.to_string()))),
                })
                .collect::<Result<_, _>>()?;
            for addr in faults {
                let t0 = Instant::now();
                let (bi, ci) = self.locate(addr).ok_or(LazyError::StrayFault { addr: addr as u64 })?;
                let was_resident = self.blocks[bi].is_resident(ci);
                if was_resident {
                    // Filled by the other thread while this fault was queued: just wake it.
                    let page = addr & !(PAGE as usize - 1);
                    let _ = self.uffd.wake(page as *mut _, PAGE as usize);
                } else {
                    self.serve(bi, ci, Why::Fault, &mut buf)?;
                    if self.record {
                        self.fault_order.lock().unwrap_or_else(PoisonError::into_inner).push((bi as u32, ci));
                    }
                }
                self.stats.record_fault(t0.elapsed());
            }
        }
        Ok(())
    }

    /// Fill worker `k` of `n`: every n-th chunk of the prefetch list, then of the blocks.
    fn fill_loop(&self, prefetch: &[(usize, u64)], background: bool, k: usize, n: usize) -> Result<(), LazyError> {
        let mut buf = vec![0u8; self.chunk as usize];
        for &(bi, ci) in prefetch.iter().skip(k).step_by(n) {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.serve(bi, ci, Why::Prefetch, &mut buf)?;
        }
        if !background {
            return Ok(());
        }
        // The rest of memory is background work: let the fault path and the vCPUs go first.
        // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes
        // this thread's nice value (an error just leaves it as it was).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, BACKGROUND_NICE) };
        for (bi, b) in self.blocks.iter().enumerate() {
            for ci in (k as u64..b.chunks).step_by(n) {
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                self.serve(bi, ci, Why::Background, &mut buf)?;
            }
        }
        Ok(())
    }
}

fn run_guarded(shared: &Arc<Shared>, thread: &'static str, f: impl FnOnce(&Shared) -> Result<(), LazyError>) {
    match catch_unwind(AssertUnwindSafe(|| f(shared))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => shared.fail(e),
        Err(p) => {
            let message = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            shared.fail(LazyError::Panicked { thread, message });
        }
    }
}

/// A running page server. Drop it only after the VM's vCPUs have stopped.
pub struct PageServer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl PageServer {
    /// Registers `blocks` with a new userfaultfd and starts serving from `source`.
    /// `on_error` is called once, from a server thread, if serving fails.
    pub fn start(
        blocks: Vec<LazyBlock>,
        source: Arc<dyn PageSource>,
        opts: ServerOptions,
        on_error: Box<dyn Fn(&LazyError) + Send + Sync>,
    ) -> Result<PageServer, LazyError> {
        let chunk = source.chunk_size();
        if !chunk.is_power_of_two() || chunk < PAGE {
            return Err(LazyError::ChunkSize(chunk));
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| LazyError::Create(e.to_string()))?;
        let mut state = Vec::with_capacity(blocks.len());
        let mut total = 0;
        for b in blocks {
            let reg = |reason: String| LazyError::Register { idstr: b.idstr.clone(), len: b.len, reason };
            if b.len == 0 || b.len % PAGE != 0 || b.host % PAGE as usize != 0 {
                return Err(reg("address or length not page-aligned".into()));
            }
            let ioctls = uffd.register(b.host as *mut _, b.len as usize).map_err(|e| reg(e.to_string()))?;
            if !ioctls.contains(IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE) {
                return Err(reg(format!("missing userfaultfd ioctls, have {ioctls:?}")));
            }
            let chunks = b.len.div_ceil(chunk);
            total += chunks;
            let words = chunks.div_ceil(64);
            state.push(Block {
                desc: b,
                chunks,
                resident: (0..words).map(|_| AtomicU64::new(0)).collect(),
                claimed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        let prefetch: Vec<(usize, u64)> = opts
            .prefetch
            .iter()
            .filter_map(|(idstr, off)| {
                let bi = state.iter().position(|b| &b.desc.idstr == idstr)?;
                (*off < state[bi].desc.len).then_some((bi, off / chunk))
            })
            .collect();
        let stop_fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| LazyError::Create(format!("stop eventfd: {e}")))?;
        let shared = Arc::new(Shared {
            uffd,
            blocks: state,
            source,
            chunk,
            remaining: AtomicU64::new(total),
            stop: AtomicBool::new(false),
            stop_fd,
            stats: LazyStats::new(),
            failed: OnceLock::new(),
            on_error,
            fault_order: Mutex::new(Vec::new()),
            record: opts.record_faults,
        });
        if total == 0 {
            shared.stats.mark_resident();
        }
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("uffd-fault".into())
                .spawn(move || run_guarded(&s, "fault", |sh| sh.fault_loop()))
                .map_err(|e| LazyError::Thread { thread: "fault", reason: e.to_string() })?,
        );
        if opts.background_fill || !prefetch.is_empty() {
            let prefetch = Arc::new(prefetch);
            let n = opts.fill_threads.max(1);
            for k in 0..n {
                let s = shared.clone();
                let list = prefetch.clone();
                let background = opts.background_fill;
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("uffd-fill{k}"))
                        .spawn(move || run_guarded(&s, "fill", |sh| sh.fill_loop(&list, background, k, n)))
                        .map_err(|e| LazyError::Thread { thread: "fill", reason: e.to_string() })?,
                );
            }
        }
        Ok(PageServer { shared, threads })
    }

    pub fn stats(&self) -> &LazyStats {
        &self.shared.stats
    }

    /// The first error the server hit, if any.
    pub fn error(&self) -> Option<LazyError> {
        self.shared.failed.get().cloned()
    }

    pub fn is_resident(&self) -> bool {
        self.shared.remaining.load(Ordering::Acquire) == 0
    }

    /// Waits until every chunk is resident (true), the server failed or `timeout` passed.
    pub fn wait_resident(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_resident() {
            if self.shared.failed.get().is_some() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Chunks served on faults so far, in order: (block idstr, offset).
    pub fn fault_order(&self) -> Vec<(String, u64)> {
        self.shared
            .fault_order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|&(bi, ci)| (self.shared.blocks[bi as usize].desc.idstr.clone(), ci * self.shared.chunk))
            .collect()
    }

    /// A RAM-block listener that refuses resizes of blocks still being filled.
    pub fn resize_guard(&self) -> Arc<dyn RamBlockListener> {
        Arc::new(ResizeGuard(Arc::downgrade(&self.shared)))
    }

    /// Stops the server threads. The userfaultfd stays registered until the server is dropped.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.stop_fd.write(1);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a page server thread panicked while stopping");
            }
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct ResizeGuard(Weak<Shared>);

impl RamBlockListener for ResizeGuard {
    fn check_resize(&self, b: &RamBlock, _old: u64, _new: u64) -> Result<(), String> {
        let Some(s) = self.0.upgrade() else {
            return Ok(());
        };
        if s.stop.load(Ordering::Acquire) && s.failed.get().is_none() {
            return Ok(());
        }
        match s.blocks.iter().find(|x| x.desc.idstr == b.idstr()) {
            Some(x) if x.resident_count() < x.chunks => Err(format!(
                "lazy restore of RAM block '{}' is still filling ({} of {} chunks resident)",
                b.idstr(),
                x.resident_count(),
                x.chunks
            )),
            _ => Ok(()),
        }
    }
}
