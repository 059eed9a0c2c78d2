//! The page server: userfaultfd registration, the fault and fill threads, residency.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{IoctlFlags, UffdBuilder};

use super::gate::FillGate;
use super::serving::{Block, Shared, PAGE};
use super::stats::LazyStats;
use super::{LazyError, PageSource};
use crate::ram::{RamBlock, RamBlockListener};

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
    /// Chunks to load first, in order: (block idstr, offset). The names are shared (a list
    /// names a few blocks thousands of times: one allocation each was ~0.3 ms of a 4 GiB
    /// restore's time to its first instruction, and as much again to free them).
    pub prefetch: Vec<(Arc<str>, u64)>,
    /// Stream in every chunk after the prefetch list, until fully resident.
    pub background_fill: bool,
    /// Record the order of chunks served on faults (for a later prefetch list).
    pub record_faults: bool,
    /// Threads loading the prefetch list and the background fill (0 is taken as 1).
    pub fill_threads: usize,
    /// `None`: the fill threads start loading at once. `Some(d)`: they wait until the gate
    /// ([`PageServer::fill_gate`]) is opened, at most `d` after the start (gate.rs).
    pub fill_hold_off: Option<Duration>,
    /// With a hold-off, this many fill threads (the first ones) start loading at once anyway;
    /// the others wait at the gate (gate.rs).
    pub fill_ungated: usize,
}

/// Fill threads by default: one per core, at least two (one keeps loading while the other
/// waits on a chunk the fault thread holds), at most [`MAX_DEFAULT_FILL_THREADS`].
pub fn default_fill_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, MAX_DEFAULT_FILL_THREADS))
}

/// Bound on [`default_fill_threads`]: a daemon restores many VMs at once (clones), and past
/// a few loaders one restore would crowd out the others.
pub const MAX_DEFAULT_FILL_THREADS: usize = 4;

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            prefetch: Vec::new(),
            background_fill: false,
            record_faults: false,
            fill_threads: default_fill_threads(),
            fill_hold_off: None,
            fill_ungated: 0,
        }
    }
}

/// The prefetch list as (block index, chunk index) of `blocks`, and the number of entries
/// dropped ([`super::prefetch_list`]).
pub(super) fn check_prefetch(list: &[(Arc<str>, u64)], blocks: &[Block], chunk: u64) -> (Vec<(usize, u64)>, usize) {
    super::prefetch_list::chunks_of(list, blocks.iter().map(|b| (&*b.desc.idstr, b.desc.len)), chunk)
}

/// The offset of the first page of `host..host+len` that is present (mapped), if any. Asks
/// the page tables (`crate::ram::used_pages`: microseconds for gigabytes nobody touched, and
/// swapped-out pages count), or, where they cannot answer, `mincore` (per page).
fn first_present_page(host: usize, len: u64) -> Result<Option<u64>, String> {
    match crate::ram::used_pages(host, len, true) {
        Ok(Some(runs)) => return Ok(runs.first().map(|r| r.start)),
        Ok(None) => {}
        Err(e) => tracing::warn!("lazy restore: finding the pages in use: {e}; asking mincore instead"),
    }
    first_present_page_mincore(host, len)
}

/// [`first_present_page`] by `mincore`.
fn first_present_page_mincore(host: usize, len: u64) -> Result<Option<u64>, String> {
    /// Pages asked about per `mincore` call.
    const BATCH: u64 = 16 * 1024;
    let pages = len / PAGE;
    let mut vec = vec![0u8; BATCH.min(pages) as usize];
    let mut first = 0;
    while first < pages {
        let n = BATCH.min(pages - first);
        let at = host + (first * PAGE) as usize;
        // SAFETY: `at..at + n pages` lies inside the caller's page-aligned mapping; mincore
        // only writes one byte per page into `vec`, which holds at least `n` bytes.
        let r = unsafe { libc::mincore(at as *mut libc::c_void, (n * PAGE) as usize, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(format!("mincore: {}", std::io::Error::last_os_error()));
        }
        if let Some(i) = first_resident(&vec[..n as usize]) {
            return Ok(Some((first + i as u64) * PAGE));
        }
        first += n;
    }
    Ok(None)
}

/// Index of the first byte of a `mincore` vector with bit 0 set (the page is resident). Scans
/// 64 bytes at a time (the OR of a block vectorises): a byte at a time was 1 ms of the 4 GiB
/// lazy restore's time to its first instruction.
fn first_resident(vec: &[u8]) -> Option<usize> {
    let mut at = 0;
    for block in vec.chunks(64) {
        if block.iter().fold(0u8, |a, b| a | b) & 1 != 0 {
            return block.iter().position(|v| v & 1 != 0).map(|i| at + i);
        }
        at += block.len();
    }
    None
}

pub(super) fn run_guarded(
    shared: &Arc<Shared>,
    thread: &'static str,
    f: impl FnOnce(&Shared) -> Result<(), LazyError>,
) {
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
    /// The blocks' ranges were unregistered ([`PageServer::release_ranges`]).
    released: Mutex<bool>,
    /// Threads of its own (or of its shared base) fill every chunk, whatever the guest
    /// touches: it becomes resident unless it fails.
    fills: bool,
}

impl PageServer {
    /// Registers `blocks` with a new userfaultfd and starts serving from `source`.
    /// `on_error` is called once, from a server thread, if serving fails.
    /// Refuses a block with any page already present (see the module doc).
    pub fn start(
        blocks: Vec<LazyBlock>,
        source: Arc<dyn PageSource>,
        opts: ServerOptions,
        on_error: Box<dyn Fn(&LazyError) + Send + Sync>,
    ) -> Result<PageServer, LazyError> {
        Self::start_checked(blocks, source, opts, on_error, true)
    }

    /// `start`, with the check for present pages optional: tests turn it off to see that the
    /// serving threads catch such a page too.
    pub(super) fn start_checked(
        blocks: Vec<LazyBlock>,
        source: Arc<dyn PageSource>,
        opts: ServerOptions,
        on_error: Box<dyn Fn(&LazyError) + Send + Sync>,
        check_present: bool,
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
            // Checked after registering: from now on only the server can make a page present.
            if let Some(off) = first_present_page(b.host, b.len).map_err(reg)?.filter(|_| check_present) {
                return Err(reg(format!(
                    "a page at offset {off:#x} is already present; a block served lazily must have \
                     none (drop them first), or the guest would see bytes that are not the snapshot's"
                )));
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
        let (prefetch, dropped) = check_prefetch(&opts.prefetch, &state, chunk);
        if dropped > 0 {
            tracing::warn!(
                "lazy restore: {dropped} of {} prefetch list entries ignored (unknown block, offset past \
                 the block's length, or a repeat)",
                opts.prefetch.len()
            );
        }
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
            hold: Mutex::new(None),
            prefetch,
            cursor: AtomicUsize::new(0),
            base: None,
            gate: Arc::new(match opts.fill_hold_off {
                Some(_) => FillGate::default(),
                None => FillGate::new_open(),
            }),
            fill_deadline: Instant::now() + opts.fill_hold_off.unwrap_or_default(),
            fill_ungated: opts.fill_ungated,
            waiters: Default::default(),
        });
        if total == 0 {
            shared.stats.mark_resident();
        }
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("uffd-fault".into())
                .spawn(move || {
                    run_guarded(&s, "fault", |sh| sh.fault_loop());
                    if s.failed.get().is_some() {
                        s.release_faults();
                    }
                })
                .map_err(|e| LazyError::Thread { thread: "fault", reason: e.to_string() })?,
        );
        if opts.background_fill || !shared.prefetch.is_empty() {
            let n = opts.fill_threads.max(1);
            for k in 0..n {
                let s = shared.clone();
                let background = opts.background_fill;
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("uffd-fill{k}"))
                        .spawn(move || run_guarded(&s, "fill", |sh| sh.fill_loop(background, k, n)))
                        .map_err(|e| LazyError::Thread { thread: "fill", reason: e.to_string() })?,
                );
            }
        }
        Ok(PageServer::from_parts(shared, threads, opts.background_fill))
    }

    /// Chunks in the checked prefetch list (see [`ServerOptions::prefetch`]): the entries
    /// given, less those naming no served chunk and repeats.
    pub fn prefetch_len(&self) -> usize {
        self.shared.prefetch.len()
    }

    /// Loads the prefetch list now, on this thread as well as the fill threads, and returns
    /// once every chunk in it is resident: for a restore that wants the working set in place
    /// before the first instruction. An error (a chunk that cannot be read, say) is the
    /// server's failure, reported through `on_error` as well, and names the chunk.
    pub fn load_prefetch(&self) -> Result<(), LazyError> {
        self.shared.load_prefetch()
    }

    /// The gate the fill threads wait at when started with a hold-off: open it once the
    /// guest runs (gate.rs).
    pub fn fill_gate(&self) -> Arc<FillGate> {
        self.shared.gate.clone()
    }

    pub(super) fn from_parts(shared: Arc<Shared>, threads: Vec<JoinHandle<()>>, fills: bool) -> PageServer {
        PageServer { shared, threads, released: Mutex::new(false), fills }
    }

    /// True if the server becomes resident without the guest's help (a background fill, its
    /// own or its shared base's), unless it fails; false if only the guest's touches and the
    /// prefetch list load chunks.
    pub fn fills_in_background(&self) -> bool {
        self.fills
    }

    /// Chunks not yet resident.
    pub fn chunks_left(&self) -> u64 {
        self.shared.remaining.load(Ordering::Acquire)
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.shared
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
        self.wait_resident_while(timeout, &|| true)
    }

    /// [`PageServer::wait_resident`] that also gives up (false) as soon as `keep_waiting`
    /// says no; it is asked every millisecond. A clone whose shared base failed a chunk is
    /// never resident (the base never completes): the wait ends once the base says so.
    pub fn wait_resident_while(&self, timeout: Duration, keep_waiting: &dyn Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_resident() {
            if self.shared.failed.get().is_some()
                || self.base().is_some_and(|b| b.stats().chunks_failed > 0)
                || Instant::now() >= deadline
                || !keep_waiting()
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Keeps `guard` (a snapshot pin) alive until every chunk is resident, the server fails,
    /// or it stops or is dropped; then drops it. Dropped at once if already resident.
    pub fn hold_until_resident(&self, guard: Box<dyn Send>) {
        *self.shared.hold.lock().unwrap_or_else(PoisonError::into_inner) = Some(guard);
        // The last chunk may have landed before the guard was stored.
        if self.is_resident() || self.shared.failed.get().is_some() {
            self.shared.release_hold();
        }
    }

    /// True while a guard given to [`PageServer::hold_until_resident`] is still held.
    pub fn holds(&self) -> bool {
        self.shared.hold.lock().unwrap_or_else(PoisonError::into_inner).is_some()
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

    /// The working set to record: the prefetch list this server was given (as checked, in its
    /// order), then the chunks served on faults that are not in it, in fault order. A chunk
    /// the list loaded never faults, so the faults alone would drop the listed chunks from a
    /// list recorded again after a prefetching restore. A listed chunk the guest no longer
    /// touches stays in the list: it costs a load, never a byte (every chunk is verified as
    /// it is served).
    pub fn working_set(&self) -> Vec<(String, u64)> {
        let sh = &self.shared;
        let faults = sh.fault_order.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut seen = std::collections::HashSet::with_capacity(sh.prefetch.len() + faults.len());
        sh.prefetch
            .iter()
            .copied()
            .chain(faults.iter().map(|&(bi, ci)| (bi as usize, ci)))
            .filter(|k| seen.insert(*k))
            .map(|(bi, ci)| (sh.blocks[bi].desc.idstr.clone(), ci * sh.chunk))
            .collect()
    }

    /// Once every chunk is resident, unregisters the blocks' ranges from the userfaultfd, so
    /// that another userfaultfd (a background snapshot's write protection) may register them;
    /// true if they are free (now or since an earlier call). False while chunks are still to
    /// be served or after the server failed: the ranges stay registered, since a fault on an
    /// unserved page must never map a zero page. Unregistering a resident range changes
    /// nothing for the guest: every page is present, and no fault can reach the server.
    pub fn release_ranges(&self) -> Result<bool, LazyError> {
        let mut released = self.released.lock().unwrap_or_else(PoisonError::into_inner);
        if *released {
            return Ok(true);
        }
        if !self.is_resident() || self.shared.failed.get().is_some() {
            return Ok(false);
        }
        for b in &self.shared.blocks {
            self.shared.uffd.unregister(b.desc.host as *mut _, b.desc.len as usize).map_err(|e| {
                LazyError::Register {
                    idstr: b.desc.idstr.clone(),
                    len: b.desc.len,
                    reason: format!("unregistering the resident block: {e}"),
                }
            })?;
        }
        *released = true;
        Ok(true)
    }

    /// A RAM-block listener that refuses resizes of blocks still being filled.
    pub fn resize_guard(&self) -> Arc<dyn RamBlockListener> {
        Arc::new(ResizeGuard(Arc::downgrade(&self.shared)))
    }

    /// Stops the server threads. The userfaultfd stays registered until the server is dropped.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.gate.open();
        let _ = self.shared.stop_fd.write(1);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a page server thread panicked while stopping");
            }
        }
        self.shared.release_hold();
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

#[cfg(test)]
mod resident_tests {
    use super::first_resident;

    /// The block-wise scan finds the first resident page wherever it is: in the first, a
    /// middle or the last (short) block, on block edges, and none when no bit 0 is set (the
    /// other bits of a `mincore` byte are reserved and must not count).
    #[test]
    fn first_resident_finds_the_first_bit_zero() {
        for len in [1usize, 63, 64, 65, 200, 16384] {
            let mut v = vec![0xfeu8; len];
            assert_eq!(first_resident(&v), None, "len {len}: no page resident");
            for at in [0, 1, 62, 63, 64, 65, 127, 128, len / 2, len - 1] {
                if at >= len {
                    continue;
                }
                v.fill(0);
                v[at] = 1;
                if at + 1 < len {
                    v[len - 1] = 1;
                }
                assert_eq!(first_resident(&v), Some(at), "len {len}, resident at {at}");
            }
        }
    }
}
