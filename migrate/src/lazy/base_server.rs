//! The page server of a clone whose blocks map a shared [`Base`]: its userfaultfd, its fault
//! thread, and what happens when the base completes or a chunk fails. The protocol is in
//! base.rs's module doc; this is the clone's half.
//!
//! - A fault: the base fills the chunk (or waits for whoever is filling it), then the fault
//!   thread wakes the clone's range; the retried fault finds the page in the base.
//! - The base completes: every chunk counts as resident, the snapshot pin goes, and the
//!   clone's ranges are unregistered (pending faults are woken and find their pages), so the
//!   clone's memory is plain copy-on-write memory from then on.
//! - A chunk fails: the clone stops (`on_error`), and its blocks are replaced by anonymous
//!   memory *before* its waiting faults are woken. Only unregistering, as a private restore
//!   does, would let the retried fault allocate a zero page in the shared base, which every
//!   other clone would then read as the snapshot's bytes.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use userfaultfd::{Event, IoctlFlags, UffdBuilder};

use super::base::Base;
use super::server::{check_prefetch, run_guarded, LazyBlock, PageServer};
use super::serving::{Block, Shared, PAGE};
use super::stats::LazyStats;
use super::LazyError;

/// A clone's link to its base: the base and, per clone block, the base's block index.
pub(super) struct BaseLink {
    pub(super) base: Arc<Base>,
    pub(super) index: Vec<usize>,
}

impl PageServer {
    /// Serves `blocks`, which the caller has mapped over `base` ([`crate::ram::RamBlock::map_base`]),
    /// from the base. `on_error` is called once, from the fault thread, if a chunk the clone
    /// touches cannot be read. `prefetch` is the clone's own working-set list (untrusted,
    /// checked as for [`PageServer::start`]): [`PageServer::load_prefetch`] puts it in the base.
    pub fn start_on_base(
        blocks: Vec<LazyBlock>,
        base: Arc<Base>,
        prefetch: &[(Arc<str>, u64)],
        on_error: Box<dyn Fn(&LazyError) + Send + Sync>,
    ) -> Result<PageServer, LazyError> {
        let chunk = base.chunk_size();
        let fills = base.fills_in_background();
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| LazyError::Create(e.to_string()))?;
        let mut state = Vec::with_capacity(blocks.len());
        let mut index = Vec::with_capacity(blocks.len());
        let mut total = 0;
        for b in blocks {
            let reg = |reason: String| LazyError::Register { idstr: b.idstr.clone(), len: b.len, reason };
            let bi = base.block_index(&b.idstr).ok_or_else(|| reg("the shared base has no such block".into()))?;
            match base.block_fd(bi) {
                Some((_, len)) if len == b.len => {}
                other => return Err(reg(format!("the shared base holds {:#x} bytes of it", other.map_or(0, |x| x.1)))),
            }
            if b.len % PAGE != 0 || b.host % PAGE as usize != 0 {
                return Err(reg("address or length not page-aligned".into()));
            }
            // No check for present pages: the range was just mapped over the base, so the
            // clone has none of its own, and pages already in the base are the snapshot's.
            let ioctls = uffd.register(b.host as *mut _, b.len as usize).map_err(|e| reg(e.to_string()))?;
            if !ioctls.contains(IoctlFlags::WAKE) {
                return Err(reg(format!("missing userfaultfd ioctls, have {ioctls:?}")));
            }
            let chunks = b.len.div_ceil(chunk);
            total += chunks;
            let words = chunks.div_ceil(64);
            index.push(bi);
            state.push(Block {
                desc: b,
                chunks,
                resident: (0..words).map(|_| AtomicU64::new(0)).collect(),
                claimed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        let (prefetch, dropped) = check_prefetch(prefetch, &state, chunk);
        if dropped > 0 {
            tracing::info!("shared base: {dropped} of the clone's prefetch list entries ignored (unknown block, offset past its end, or repeated)");
        }
        let stop_fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| LazyError::Create(format!("stop eventfd: {e}")))?;
        let shared = Arc::new(Shared {
            uffd,
            blocks: state,
            source: Arc::new(NoSource(chunk)),
            chunk,
            remaining: AtomicU64::new(total),
            stop: AtomicBool::new(false),
            stop_fd,
            stats: LazyStats::new(),
            failed: OnceLock::new(),
            on_error,
            fault_order: Mutex::new(Vec::new()),
            record: true,
            hold: Mutex::new(None),
            // The base's fill threads load the list of the clone that made the base; this
            // clone's own is loaded by its prefetch thread, and by `load_prefetch`
            // (prefetch-before) on its caller.
            prefetch,
            cursor: AtomicUsize::new(0),
            base: Some(BaseLink { base, index }),
            gate: Arc::new(super::gate::FillGate::new_open()),
            fill_deadline: std::time::Instant::now(),
            fill_ungated: 0,
            waiters: Default::default(),
        });
        if total == 0 {
            shared.stats.mark_resident();
        }
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("uffd-base".into())
            .spawn(move || {
                run_guarded(&s, "fault", |sh| sh.base_fault_loop());
                if s.failed.get().is_some() {
                    s.release_faults();
                }
            })
            .map_err(|e| LazyError::Thread { thread: "fault", reason: e.to_string() })?;
        let mut threads = vec![thread];
        // The clone's own working set, into the base beside its first instructions: the base
        // may have been made by a clone without a list. Chunks filled, failed or being filled
        // are passed over, so a hundred clones of one base never wait on each other here.
        if !shared.prefetch.is_empty() {
            let s = shared.clone();
            match std::thread::Builder::new().name("uffd-prefetch".into()).spawn(move || s.prefetch_into_base()) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::warn!("shared base: no prefetch thread for a clone, its faults load its working set: {e}")
                }
            }
        }
        // Gives a clone that writes what it reads its own copy at once (privatize.rs). Not
        // vital: without the thread the clone shares as before.
        let s = shared.clone();
        match std::thread::Builder::new().name("uffd-cow".into()).spawn(move || s.privatize_loop()) {
            Ok(t) => threads.push(t),
            Err(e) => tracing::warn!("shared base: no copy thread for a clone, it shares whatever it writes: {e}"),
        }
        Ok(PageServer::from_parts(shared, threads, fills))
    }

    /// The shared base this clone maps, if any.
    pub fn base(&self) -> Option<&Arc<Base>> {
        self.shared().base.as_ref().map(|l| &l.base)
    }
}

/// A clone on a base reads nothing itself: every chunk comes through [`Base::ensure`].
struct NoSource(u64);

impl super::PageSource for NoSource {
    fn chunk_size(&self) -> u64 {
        self.0
    }
    fn read_chunk(&self, idstr: &str, offset: u64, _buf: &mut [u8]) -> Result<super::Fill, String> {
        Err(format!("a clone on a shared base reads no chunk itself ('{idstr}' at {offset:#x})"))
    }
}

impl Shared {
    pub(super) fn base_fault_loop(&self) -> Result<(), LazyError> {
        let Some(link) = &self.base else { return Ok(()) };
        let mut buf = vec![0u8; self.chunk as usize];
        let mut events = userfaultfd::EventBuffer::new(64);
        let complete: BorrowedFd<'_> = link.base.complete_fd();
        let mut fds = [
            libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.stop_fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: complete.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        while !self.stop.load(Ordering::Acquire) {
            if !super::serving::poll_events(&mut fds)? {
                continue;
            }
            if fds[1].revents != 0 {
                break;
            }
            if fds[0].revents != 0 {
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
                    self.serve_from_base(link, addr, &mut buf)?;
                }
            }
            if fds[2].revents != 0 || link.base.is_complete() {
                self.adopt_complete_base();
                return Ok(());
            }
        }
        Ok(())
    }

    fn serve_from_base(&self, link: &BaseLink, addr: usize, buf: &mut [u8]) -> Result<(), LazyError> {
        let t0 = Instant::now();
        let start = self.blocks.iter().position(|b| addr >= b.desc.host && ((addr - b.desc.host) as u64) < b.desc.len);
        let bi = start.ok_or(LazyError::StrayFault { addr: addr as u64 })?;
        let b = &self.blocks[bi];
        let ci = (addr - b.desc.host) as u64 / self.chunk;
        let off = ci * self.chunk;
        link.base.ensure(link.index[bi], ci, buf).map_err(|reason| LazyError::Source {
            idstr: b.desc.idstr.clone(),
            offset: off,
            reason,
        })?;
        // Every page of the chunk is in the base now: wake whatever waits on any of them.
        let len = self.chunk.min(b.desc.len - off) as usize;
        self.uffd.wake((b.desc.host + off as usize) as *mut libc::c_void, len).map_err(|e| LazyError::Copy {
            idstr: b.desc.idstr.clone(),
            offset: off,
            reason: e.to_string(),
        })?;
        let bit = 1u64 << (ci % 64);
        if b.resident[(ci / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            self.stats.chunks_on_fault.fetch_add(1, Ordering::Relaxed);
            if self.record {
                self.fault_order.lock().unwrap_or_else(PoisonError::into_inner).push((bi as u32, ci));
            }
            if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.stats.mark_resident();
                self.release_hold();
            }
        }
        self.stats.record_fault(t0.elapsed());
        Ok(())
    }

    /// A clone's [`PageServer::load_prefetch`]: every chunk of its list into the base (or
    /// waited for, if another thread fills it), on the calling thread, before the clone's first
    /// instruction. A chunk that cannot be read is an error naming it (the base marks it
    /// failed, as for a fault); the clone is not started.
    pub(super) fn load_prefetch_into_base(&self, link: &BaseLink) -> Result<(), LazyError> {
        let mut buf = vec![0u8; self.chunk as usize];
        for &(bi, ci) in &self.prefetch {
            if let Some(e) = self.failed.get() {
                return Err(e.clone());
            }
            if self.stop.load(Ordering::Acquire) {
                return Err(LazyError::Stopped);
            }
            link.base.ensure(link.index[bi], ci, &mut buf).map_err(|reason| LazyError::Source {
                idstr: self.blocks[bi].desc.idstr.clone(),
                offset: ci * self.chunk,
                reason,
            })?;
        }
        Ok(())
    }

    /// The clone's prefetch thread: its list into the base, each chunk unless someone else
    /// has it (see [`Base::fill_if_free`]), until done or the server stops or fails.
    fn prefetch_into_base(&self) {
        let Some(link) = &self.base else { return };
        let mut buf = vec![0u8; self.chunk as usize];
        for &(bi, ci) in &self.prefetch {
            if self.stop.load(Ordering::Acquire) || self.failed.get().is_some() || link.base.is_settled() {
                return;
            }
            link.base.fill_if_free(link.index[bi], ci, &mut buf);
        }
    }

    /// The base is complete: every chunk of the clone is there. Unregistering wakes any fault
    /// still queued; it retries and finds its page in the base.
    fn adopt_complete_base(&self) {
        for b in &self.blocks {
            for w in &b.resident {
                w.store(u64::MAX, Ordering::Release);
            }
            if let Err(e) = self.uffd.unregister(b.desc.host as *mut libc::c_void, b.desc.len as usize) {
                tracing::warn!("shared base complete: unregistering RAM block {}: {e}", b.desc.idstr);
            }
        }
        if self.remaining.swap(0, Ordering::AcqRel) != 0 {
            self.stats.mark_resident();
        }
        self.release_hold();
    }

    /// After a failure, before waking the clone's waiting faults: its blocks get anonymous
    /// memory (see the module doc), so no retried fault can allocate a page in the base.
    pub(super) fn detach_from_base(&self) {
        for b in &self.blocks {
            // SAFETY: the range is the clone's block mapping, which the VM owns and keeps
            // until the server is dropped; the VM has been stopped (`on_error`), and its
            // memory is thrown away with it. MAP_FIXED replaces exactly this range.
            let p = unsafe {
                libc::mmap(
                    b.desc.host as *mut libc::c_void,
                    b.desc.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                // Its faults stay asleep: a stuck VM rather than one that could see zeros
                // allocated in the base.
                tracing::error!(
                    "shared base: detaching RAM block {} of a failed clone: {}",
                    b.desc.idstr,
                    std::io::Error::last_os_error()
                );
                continue;
            }
            if let Err(e) = self.uffd.wake(b.desc.host as *mut libc::c_void, b.desc.len as usize) {
                tracing::warn!("shared base: waking the faults of RAM block {}: {e}", b.desc.idstr);
            }
        }
    }
}
