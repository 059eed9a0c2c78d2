//! Serving chunks: per-chunk residency and claims, copying into the registered ranges, and
//! the fault and fill loops the page server's threads run.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use userfaultfd::{Event, Uffd};

use super::place::{copy_result, zeropage, Placed};
use super::server::LazyBlock;
use super::stats::{thread_cpu_ns, LazyStats};
use super::{Fill, LazyError, PageSource};

/// Host page size the copy fallback works in.
pub(super) const PAGE: u64 = 4096;
/// Nice value of fill threads once they stream in memory nobody asked for yet.
const BACKGROUND_NICE: libc::c_int = 10;

pub(super) struct Block {
    pub(super) desc: LazyBlock,
    pub(super) chunks: u64,
    pub(super) resident: Vec<AtomicU64>,
    /// A thread is reading and copying the chunk: others wait for it rather than repeat it.
    pub(super) claimed: Vec<AtomicU64>,
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

    pub(super) fn resident_count(&self) -> u64 {
        self.resident.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }
}

pub(super) struct Shared {
    pub(super) uffd: Uffd,
    pub(super) blocks: Vec<Block>,
    pub(super) source: Arc<dyn PageSource>,
    pub(super) chunk: u64,
    pub(super) remaining: AtomicU64,
    pub(super) stop: AtomicBool,
    pub(super) stop_fd: vmm_sys_util::eventfd::EventFd,
    pub(super) stats: LazyStats,
    pub(super) failed: OnceLock<LazyError>,
    pub(super) on_error: Box<dyn Fn(&LazyError) + Send + Sync>,
    pub(super) fault_order: Mutex<Vec<(u32, u64)>>,
    pub(super) record: bool,
    /// Dropped once every chunk is resident, the server fails or stops: the snapshot pin of
    /// the source (see [`super::server::PageServer::hold_until_resident`]).
    pub(super) hold: Mutex<Option<Box<dyn Send>>>,
    /// The prefetch list, checked: (block index, chunk index), each chunk once, in order.
    pub(super) prefetch: Vec<(usize, u64)>,
    /// The next entry of `prefetch` to load: every loader (the fill threads, and the restore's
    /// own thread when it loads the list before the first instruction) takes entries from it,
    /// so the list is loaded in order by as many threads as there are.
    pub(super) cursor: AtomicUsize,
    /// A clone's shared base, when its blocks map one (base_server.rs).
    pub(super) base: Option<super::base_server::BaseLink>,
    /// Fill threads start loading once this is open, or at `fill_deadline` (gate.rs).
    pub(super) gate: Arc<super::gate::FillGate>,
    pub(super) fill_deadline: Instant,
    /// Fill threads `0..fill_ungated` do not wait at the gate.
    pub(super) fill_ungated: usize,
    /// Threads waiting for a chunk another one is loading (waiters.rs).
    pub(super) waiters: super::waiters::Waiters,
}

#[derive(Clone, Copy)]
pub(super) enum Why {
    Fault,
    Prefetch,
    Background,
}

impl Shared {
    pub(super) fn fail(&self, e: LazyError) {
        if self.failed.set(e.clone()).is_ok() {
            tracing::error!("{e}");
            (self.on_error)(&e);
        }
        self.stop.store(true, Ordering::Release);
        self.gate.open();
        self.release_hold();
    }

    /// Drops what [`super::server::PageServer::hold_until_resident`] was given: nothing will
    /// be read from the source any more.
    pub(super) fn release_hold(&self) {
        let held = self.hold.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(held);
    }

    fn chunk_len(&self, b: &Block, chunk: u64) -> u64 {
        self.chunk.min(b.desc.len - chunk * self.chunk)
    }

    /// Copies (or zero-fills) `len` bytes at block offset `off`. The caller holds the chunk's
    /// claim, so no other server thread places these pages: a page already present (`EEXIST`)
    /// was put there by someone else, and its bytes are not the snapshot's. That is an error,
    /// never "resident". `EAGAIN` (the copy stopped part way, or the mm changed under it)
    /// continues after the bytes that were placed.
    fn place(&self, b: &Block, off: u64, len: u64, data: Option<&[u8]>) -> Result<(), LazyError> {
        let mut done = 0u64;
        let mut retries = 0;
        while done < len {
            let at = off + done;
            let dst = (b.desc.host + at as usize) as *mut libc::c_void;
            let n = (len - done) as usize;
            let r = match data {
                // SAFETY: dst..dst+n lies inside the block's registered range (off + len <= the
                // block's length); `d` holds `len` bytes, of which `done..` are copied.
                Some(d) => copy_result(unsafe { self.uffd.copy(d[done as usize..].as_ptr().cast(), dst, n, true) }, n),
                None => zeropage(&self.uffd, dst, n),
            };
            match r {
                Placed::All => done = len,
                Placed::Exists => return Err(LazyError::Present { idstr: b.desc.idstr.clone(), offset: at }),
                Placed::Part(placed) if retries < 100 => {
                    retries += 1;
                    done += placed as u64;
                }
                Placed::Part(_) => {
                    return Err(LazyError::Copy {
                        idstr: b.desc.idstr.clone(),
                        offset: at,
                        reason: "the copy kept stopping part way (EAGAIN)".into(),
                    })
                }
                Placed::Failed(reason) => {
                    return Err(LazyError::Copy { idstr: b.desc.idstr.clone(), offset: at, reason })
                }
            }
        }
        Ok(())
    }

    /// Makes chunk `ci` of block `bi` resident.
    ///
    /// Claims. A chunk's claim is held by the one thread placing it, so no page is placed
    /// twice (`EEXIST` is an error, see [`Shared::place`]). A fault holds it from before its
    /// read. A loader (fill thread, or the restore's thread loading the prefetch list) reads
    /// and checks the chunk first and claims it only to place it; if a fault has claimed or
    /// placed it meanwhile, the loader drops its copy. So a fault waits for a loader only
    /// while that loader places a chunk, never while it reads one: loaders run at a low
    /// priority once past the prefetch list, and a fault that waited for their reads went at
    /// their pace (a copy of a VM's memory that kept meeting the chunk a loader had claimed
    /// just ahead of it crawled behind the loaders, one wait per chunk).
    fn serve(&self, bi: usize, ci: u64, why: Why, buf: &mut [u8]) -> Result<(), LazyError> {
        let b = &self.blocks[bi];
        if b.is_resident(ci) {
            return Ok(());
        }
        if !matches!(why, Why::Fault) {
            if b.claimed_now(ci) {
                // A fault is loading it.
                self.stats.races.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            let (fill, t0, t1) = self.read(b, ci, buf)?;
            if !b.claim(ci) {
                // A fault is loading it: it places its own copy.
                self.stats.races.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            let result = if b.is_resident(ci) {
                // A fault placed it meanwhile: this copy is dropped.
                self.stats.races.fetch_add(1, Ordering::Relaxed);
                Ok(())
            } else {
                self.put(b, ci, why, fill, buf, t0, t1)
            };
            b.release(ci);
            self.waiters.wake();
            return result;
        }
        if !b.claim(ci) {
            // Another thread is placing it (a loader) or loading it: wait for that (the copy
            // wakes the guest anyway).
            self.stats.races.fetch_add(1, Ordering::Relaxed);
            self.waiters.wait_while(|| !b.is_resident(ci) && self.failed.get().is_none() && b.claimed_now(ci));
            if !b.is_resident(ci) && self.failed.get().is_none() {
                return self.serve(bi, ci, why, buf);
            }
            return Ok(());
        }
        let result = if b.is_resident(ci) {
            Ok(())
        } else {
            self.read(b, ci, buf).and_then(|(fill, t0, t1)| self.put(b, ci, why, fill, buf, t0, t1))
        };
        b.release(ci);
        self.waiters.wake();
        result
    }

    /// Reads chunk `ci` (checked by the source) into `buf` or the cache's copy; with the times
    /// the read started and ended.
    fn read(&self, b: &Block, ci: u64, buf: &mut [u8]) -> Result<(Fill, Instant, Instant), LazyError> {
        let off = ci * self.chunk;
        let len = self.chunk_len(b, ci);
        let t0 = Instant::now();
        let fill = self
            .source
            .read_chunk(&b.desc.idstr, off, &mut buf[..len as usize])
            .map_err(|reason| LazyError::Source { idstr: b.desc.idstr.clone(), offset: off, reason })?;
        if let Fill::Data { stored } | Fill::Shared { stored, .. } = &fill {
            self.stats.bytes_stored_read.fetch_add(*stored, Ordering::Relaxed);
        }
        Ok((fill, t0, Instant::now()))
    }

    /// Places chunk `ci`, read by [`Shared::read`] (`fill`, in `buf` for data), and marks it
    /// resident; the caller holds its claim and found it not resident.
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        b: &Block,
        ci: u64,
        why: Why,
        fill: Fill,
        buf: &[u8],
        t0: Instant,
        t1: Instant,
    ) -> Result<(), LazyError> {
        let off = ci * self.chunk;
        let len = self.chunk_len(b, ci);
        let t2 = Instant::now();
        match fill {
            Fill::Data { .. } => self.place(b, off, len, Some(&buf[..len as usize]))?,
            Fill::Shared { data, .. } if data.len() as u64 == len => self.place(b, off, len, Some(&data))?,
            Fill::Shared { data, .. } => {
                return Err(LazyError::Source {
                    idstr: b.desc.idstr.clone(),
                    offset: off,
                    reason: format!("the cached chunk has {} bytes, expected {len}", data.len()),
                })
            }
            Fill::Zero => {
                self.stats.zero_chunks.fetch_add(1, Ordering::Relaxed);
                self.place(b, off, len, None)?
            }
        }
        if !matches!(why, Why::Background) {
            self.stats.record_load(t1.duration_since(t0), t2.elapsed());
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
                self.release_hold();
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

    pub(super) fn fault_loop(&self) -> Result<(), LazyError> {
        let mut buf = vec![0u8; self.chunk as usize];
        let mut events = userfaultfd::EventBuffer::new(64);
        let mut fds = [
            libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.stop_fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        while !self.stop.load(Ordering::Acquire) {
            if !poll_events(&mut fds)? {
                continue;
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

    /// After the server failed (the VM has been stopped by `on_error`): unregisters every
    /// block from userfaultfd, which wakes every fault still waiting, including the one whose
    /// chunk could not be read, and makes later touches plain (zero-filled) anonymous memory.
    /// Without this, a fault KVM itself takes inside an ioctl (restoring the kvmclock MSR
    /// touches the guest page it names; the instruction emulator reads guest code) sleeps
    /// uninterruptibly for ever, and so does the thread that issued the ioctl.
    ///
    /// What the woken faults see never reaches guest code: `on_error` stopped the VM before
    /// this runs, and a vCPU finds the stop (its kick signal pending) before it re-enters the
    /// guest. The VM is failed for good; its memory is thrown away with it.
    pub(super) fn release_faults(&self) {
        if self.base.is_some() {
            self.detach_from_base();
        }
        for b in &self.blocks {
            if let Err(e) = self.uffd.unregister(b.desc.host as *mut libc::c_void, b.desc.len as usize) {
                tracing::warn!("lazy restore failed: unregistering RAM block {}: {e}", b.desc.idstr);
            }
        }
    }

    /// Loads entries of the prefetch list, taking each from the shared cursor, until the list
    /// is exhausted or the server stops.
    fn load_list(&self, buf: &mut [u8]) -> Result<(), LazyError> {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let i = self.cursor.fetch_add(1, Ordering::AcqRel);
            let Some(&(bi, ci)) = self.prefetch.get(i) else {
                return Ok(());
            };
            self.serve(bi, ci, Why::Prefetch, buf)?;
        }
    }

    /// [`Shared::load_list`], adding this thread's CPU time on it to the stats.
    fn load_list_timed(&self, buf: &mut [u8]) -> Result<(), LazyError> {
        if self.prefetch.is_empty() {
            return Ok(());
        }
        let cpu0 = thread_cpu_ns();
        let r = self.load_list(buf);
        self.stats.record_list_cpu(thread_cpu_ns().saturating_sub(cpu0));
        r
    }

    /// The restore's own thread, before the first instruction: loads entries of the prefetch
    /// list alongside the fill threads, then waits until every listed chunk is resident (a
    /// chunk another thread claimed may still be arriving). The first error of any thread is
    /// returned; a failure of this thread's own load is reported like any other.
    pub(super) fn load_prefetch(&self) -> Result<(), LazyError> {
        if let Some(link) = &self.base {
            return self.load_prefetch_into_base(link);
        }
        let failed = || self.failed.get().cloned();
        // Every core on the list now: the first instruction waits for it anyway.
        self.gate.open();
        let mut buf = vec![0u8; self.chunk as usize];
        if let Err(e) = self.load_list_timed(&mut buf) {
            self.fail(e.clone());
            return Err(failed().unwrap_or(e));
        }
        for &(bi, ci) in &self.prefetch {
            let b = &self.blocks[bi];
            self.waiters
                .wait_while(|| !b.is_resident(ci) && self.failed.get().is_none() && !self.stop.load(Ordering::Acquire));
            if !b.is_resident(ci) {
                return Err(failed().unwrap_or(LazyError::Stopped));
            }
        }
        failed().map_or(Ok(()), Err)
    }

    /// A fill worker (`k` names it): entries of the prefetch list, then, with `background`,
    /// every `n`-th chunk of the blocks from its `k`-th.
    pub(super) fn fill_loop(&self, background: bool, k: usize, n: usize) -> Result<(), LazyError> {
        let mut buf = vec![0u8; self.chunk as usize];
        if k >= self.fill_ungated {
            self.gate.wait(self.fill_deadline);
        }
        self.load_list_timed(&mut buf)?;
        if !background || self.stop.load(Ordering::Acquire) {
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

/// Waits up to a second for any of `fds`; false when interrupted by a signal (poll again).
/// A fault thread's wait: its userfaultfd, its stop eventfd, and whatever else it watches.
pub(super) fn poll_events(fds: &mut [libc::pollfd]) -> Result<bool, LazyError> {
    // SAFETY: `fds` is a valid slice of pollfds for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(LazyError::Events(e.to_string()));
    }
    Ok(true)
}
