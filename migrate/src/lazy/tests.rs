//! Page server tests on real userfaultfd: a mapping stands in for a RAM block, a thread's
//! reads stand in for the guest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

pub(super) const CHUNK: u64 = 64 * 1024;

/// Chunks of block "b" hold their offset in every word; chunk 3 is zero; `fail_at` fails.
pub(super) struct TestSource {
    pub(super) fail_at: Option<u64>,
    pub(super) reads: AtomicU64,
}

impl PageSource for TestSource {
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn read_chunk(&self, _idstr: &str, offset: u64, buf: &mut [u8]) -> Result<Fill, String> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if Some(offset) == self.fail_at {
            return Err(format!("hash mismatch at {offset:#x}"));
        }
        if offset == 3 * CHUNK {
            return Ok(Fill::Zero);
        }
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(offset + 8 * i as u64).to_le_bytes());
        }
        Ok(Fill::Data { stored: buf.len() as u64 / 4 })
    }
}

pub(super) struct Mapping(pub(super) *mut u8, usize);
// SAFETY: the mapping is plain anonymous memory; the tests synchronise through userfaultfd.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(super) fn new(len: usize) -> Mapping {
        // SAFETY: a fresh anonymous private mapping with no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping(p.cast(), len)
    }
    pub(super) fn word(&self, off: u64) -> u64 {
        // SAFETY: off + 8 <= len, inside the mapping; reads may fault into the page server.
        unsafe { std::ptr::read_volatile(self.0.add(off as usize).cast::<u64>()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

pub(super) fn block(m: &Mapping) -> LazyBlock {
    LazyBlock { idstr: "b".into(), host: m.0 as usize, len: m.1 as u64 }
}

#[test]
fn faults_are_served_from_the_source() {
    let m = Mapping::new(16 * CHUNK as usize);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let opts = ServerOptions { record_faults: true, ..Default::default() };
    let server = PageServer::start(vec![block(&m)], src.clone(), opts, Box::new(|_| {})).expect("start");
    assert_eq!(m.word(5 * CHUNK + 16), 5 * CHUNK + 16);
    assert_eq!(m.word(3 * CHUNK + 8), 0, "zero chunk");
    assert_eq!(m.word(0), 0);
    assert_eq!(m.word(CHUNK - 8), CHUNK - 8, "same chunk: no new fault");
    // The faulting thread is woken by the copy, a moment before the server counts it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.stats().snapshot().chunks_on_fault < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    let s = server.stats().snapshot();
    assert_eq!(s.chunks_on_fault, 3, "{s:?}");
    assert_eq!(s.zero_chunks, 1);
    assert_eq!(src.reads.load(Ordering::Relaxed), 3);
    assert_eq!(
        server.fault_order(),
        vec![("b".to_string(), 5 * CHUNK), ("b".to_string(), 3 * CHUNK), ("b".to_string(), 0)]
    );
    assert!(!server.is_resident());
}

#[test]
fn background_fill_makes_everything_resident_and_prefetch_goes_first() {
    let m = Mapping::new(32 * CHUNK as usize);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let opts = ServerOptions {
        prefetch: vec![("b".into(), 20 * CHUNK), ("b".into(), 7 * CHUNK), ("nope".into(), 0)],
        background_fill: true,
        record_faults: false,
        fill_threads: 2,
        fill_hold_off: None,
        fill_ungated: 0,
    };
    let server = PageServer::start(vec![block(&m)], src, opts, Box::new(|_| {})).expect("start");
    assert!(server.wait_resident(Duration::from_secs(20)));
    let s = server.stats().snapshot();
    assert_eq!(s.chunks_prefetched, 2);
    assert_eq!(s.chunks_prefetched + s.chunks_background + s.chunks_on_fault, 32);
    assert!(s.resident_after_ms.is_some());
    for c in 0..32 {
        let want = if c == 3 { 0 } else { c * CHUNK + 8 };
        assert_eq!(m.word(c * CHUNK + 8), want);
    }
}

#[test]
fn a_source_error_is_reported_and_no_bytes_are_mapped() {
    let m = Arc::new(Mapping::new(8 * CHUNK as usize));
    let src = Arc::new(TestSource { fail_at: Some(2 * CHUNK), reads: AtomicU64::new(0) });
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e2 = errors.clone();
    let mut server = PageServer::start(
        vec![block(&m)],
        src,
        ServerOptions::default(),
        Box::new(move |e| {
            e2.lock().expect("lock").push(e.to_string());
        }),
    )
    .expect("start");
    // The toucher blocks in the fault forever: it must not get bytes. Detach it.
    let m2 = m.clone();
    let toucher = std::thread::spawn(move || m2.word(2 * CHUNK));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while errors.lock().expect("lock").is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let errs = errors.lock().expect("lock").clone();
    assert_eq!(errs.len(), 1);
    assert!(errs[0].contains("offset 0x20000") && errs[0].contains("hash mismatch"), "{errs:?}");
    assert!(matches!(server.error(), Some(LazyError::Source { offset, .. }) if offset == 2 * CHUNK));
    // The error was reported (the VM is stopped by it) before the waiting thread was let go:
    // it is woken, never left sleeping for ever, and reads nothing the source gave.
    let word = toucher.join().expect("the faulting thread is released");
    assert_ne!(word, 2 * CHUNK, "bytes of the chunk that failed");
    server.stop();
}

/// A fault taken by the kernel on the process's behalf (KVM's own accesses to guest memory
/// inside an ioctl work this way) waits uninterruptibly: a failed server must release it too.
#[test]
fn a_kernel_access_to_a_chunk_that_failed_is_released_not_hung() {
    let m = Arc::new(Mapping::new(8 * CHUNK as usize));
    let src = Arc::new(TestSource { fail_at: Some(5 * CHUNK), reads: AtomicU64::new(0) });
    let mut server =
        PageServer::start(vec![block(&m)], src, ServerOptions::default(), Box::new(|_| {})).expect("start");
    let (tx, rx) = std::sync::mpsc::channel();
    let m2 = m.clone();
    std::thread::spawn(move || {
        // read(2) from a pipe into the unserved chunk: the copy faults inside the kernel.
        let mut fds = [0i32; 2];
        // SAFETY: pipe() fills the two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: writing 8 bytes from a local to the pipe we own.
        unsafe { libc::write(fds[1], [7u8; 8].as_ptr().cast(), 8) };
        // SAFETY: reading 8 bytes into the mapping at 5 chunks in, inside its length.
        let n = unsafe { libc::read(fds[0], m2.0.add(5 * CHUNK as usize).cast(), 8) };
        let _ = tx.send(n);
    });
    let n = rx.recv_timeout(Duration::from_secs(20)).expect("the kernel's fault was never released");
    assert_eq!(n, 8);
    assert!(server.error().is_some());
    server.stop();
}

#[test]
fn bad_registrations_are_refused() {
    let m = Mapping::new(4 * CHUNK as usize);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let mut b = block(&m);
    b.len = 100;
    let r = PageServer::start(vec![b], src, ServerOptions::default(), Box::new(|_| {}));
    assert!(matches!(r, Err(LazyError::Register { .. })));
}

/// A source whose reads panic: the page server thread dies mid-fault.
struct PanickingSource;

impl PageSource for PanickingSource {
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn read_chunk(&self, _idstr: &str, _offset: u64, _buf: &mut [u8]) -> Result<Fill, String> {
        panic!("store backend exploded");
    }
}

#[test]
fn a_dying_server_thread_is_reported_not_hung() {
    let m = Arc::new(Mapping::new(4 * CHUNK as usize));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e2 = errors.clone();
    let server = PageServer::start(
        vec![block(&m)],
        Arc::new(PanickingSource),
        ServerOptions::default(),
        Box::new(move |e| e2.lock().expect("lock").push(e.clone())),
    )
    .expect("start");
    let m2 = m.clone();
    let toucher = std::thread::spawn(move || m2.word(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while errors.lock().expect("lock").is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let errs = errors.lock().expect("lock").clone();
    assert_eq!(errs.len(), 1, "the owner hears of the dead thread once");
    assert!(
        matches!(&errs[0], LazyError::Panicked { thread: "fault", message } if message.contains("exploded")),
        "{errs:?}"
    );
    // The owner (who stops the VM) heard first; then the faulting thread is let go rather
    // than left sleeping for ever.
    assert_eq!(toucher.join().expect("the faulting thread is released"), 0);
    drop(server);
}

impl Mapping {
    /// Writes a word without userfaultfd in the way (before registration).
    fn poke(&self, off: u64, v: u64) {
        // SAFETY: off + 8 <= len, inside the mapping, which is not registered yet.
        unsafe { std::ptr::write_volatile(self.0.add(off as usize).cast::<u64>(), v) }
    }
}

#[test]
fn a_block_with_a_present_page_is_refused_at_registration() {
    let m = Mapping::new(8 * CHUNK as usize);
    m.poke(2 * CHUNK + 8, 0xdead);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let r = PageServer::start(vec![block(&m)], src, ServerOptions::default(), Box::new(|_| {}));
    let Err(LazyError::Register { idstr, reason, .. }) = r else {
        panic!("a block with a present page must be refused, got {:?}", r.err());
    };
    assert_eq!(idstr, "b");
    assert!(reason.contains("offset 0x20000 is already present"), "{reason}");
}

/// The registration check sees a page wherever it is in a large block (here the last page of
/// 1 GiB, past every 16 MiB `mincore` batch and page-table level boundary), and a page only
/// read (the shared zero page is mapped there: a fault would never come either).
#[test]
fn a_page_at_the_end_of_a_large_block_or_only_read_is_refused_at_registration() {
    let len = 1u64 << 30;
    for (off, write) in [(len - 4096, true), (5 * CHUNK + 4096, false)] {
        let m = Mapping::new(len as usize);
        if write {
            m.poke(off, 1);
        } else {
            // SAFETY: inside the mapping, which is not registered yet.
            let _ = unsafe { std::ptr::read_volatile(m.0.add(off as usize)) };
        }
        let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
        let r = PageServer::start(vec![block(&m)], src, ServerOptions::default(), Box::new(|_| {}));
        let Err(LazyError::Register { reason, .. }) = r else {
            panic!("a block with a page at {off:#x} must be refused, got {:?}", r.err());
        };
        assert!(reason.contains(&format!("offset {off:#x} is already present")), "{reason}");
    }
}

#[test]
fn eexist_on_an_unclaimed_chunk_is_an_error_not_residency() {
    let m = Mapping::new(8 * CHUNK as usize);
    // A page the server did not place, in chunk 2 (the registration check is off so that the
    // serving path meets it).
    m.poke(2 * CHUNK + PAGE_OFF, 0xdead);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e2 = errors.clone();
    let opts = ServerOptions { background_fill: true, fill_threads: 1, ..Default::default() };
    let server = PageServer::start_checked(
        vec![block(&m)],
        src,
        opts,
        Box::new(move |e| e2.lock().expect("lock").push(e.clone())),
        false,
    )
    .expect("start");
    assert!(!server.wait_resident(Duration::from_secs(10)), "a chunk holding foreign bytes never counts as resident");
    let errs = errors.lock().expect("lock").clone();
    assert_eq!(errs, vec![LazyError::Present { idstr: "b".into(), offset: 2 * CHUNK + PAGE_OFF }]);
    assert!(errs[0].to_string().contains("'b'") && errs[0].to_string().contains("0x21000"), "{}", errs[0]);
}

/// Offset of the foreign page inside its chunk: not the chunk's first page, so the copy of the
/// chunk places a page before it meets it.
const PAGE_OFF: u64 = 4096;
/// Sets its flag when dropped: stands in for a snapshot pin.
struct Guard(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn guard() -> (Box<dyn Send>, Arc<std::sync::atomic::AtomicBool>) {
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (Box::new(Guard(dropped.clone())), dropped)
}

fn wait_for(flag: &std::sync::atomic::AtomicBool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !flag.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    flag.load(Ordering::Acquire)
}

#[test]
fn the_pin_is_held_until_the_last_chunk_is_resident() {
    let m = Mapping::new(4 * CHUNK as usize);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let server = PageServer::start(vec![block(&m)], src, ServerOptions::default(), Box::new(|_| {})).expect("start");
    let (g, dropped) = guard();
    server.hold_until_resident(g);
    for c in 0..3 {
        assert_eq!(m.word(c * CHUNK + 8), c * CHUNK + 8);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(!server.is_resident());
    assert!(!dropped.load(Ordering::Acquire) && server.holds(), "released with a chunk still to read");
    assert_eq!(m.word(3 * CHUNK), 0);
    assert!(wait_for(&dropped), "released once resident");
    assert!(server.is_resident() && !server.holds());
    // Given after residency: dropped at once.
    let (g, dropped) = guard();
    server.hold_until_resident(g);
    assert!(dropped.load(Ordering::Acquire));
}

#[test]
fn the_pin_is_released_when_the_server_goes_away_before_residency() {
    let m = Mapping::new(4 * CHUNK as usize);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let server = PageServer::start(vec![block(&m)], src, ServerOptions::default(), Box::new(|_| {})).expect("start");
    let (g, dropped) = guard();
    server.hold_until_resident(g);
    assert_eq!(m.word(8), 8);
    assert!(!dropped.load(Ordering::Acquire));
    drop(server);
    assert!(dropped.load(Ordering::Acquire), "the VM went away: nothing reads the snapshot any more");
}

#[test]
fn the_pin_is_released_when_serving_fails() {
    let m = Arc::new(Mapping::new(4 * CHUNK as usize));
    let src = Arc::new(TestSource { fail_at: Some(0), reads: AtomicU64::new(0) });
    let server = PageServer::start(vec![block(&m)], src, ServerOptions::default(), Box::new(|_| {})).expect("start");
    let (g, dropped) = guard();
    server.hold_until_resident(g);
    let m2 = m.clone();
    let toucher = std::thread::spawn(move || m2.word(0));
    assert!(wait_for(&dropped), "a failed server reads no more");
    assert!(server.error().is_some());
    std::mem::forget(server);
    std::mem::forget(toucher);
}

/// Every word of a resident mapping of `TestSource` chunks holds its offset (chunk 3: zero).
fn assert_source_bytes(m: &Mapping) {
    for off in (0..m.1 as u64).step_by(512) {
        let want = if off / CHUNK == 3 { 0 } else { off };
        assert_eq!(m.word(off), want, "word at {off:#x}");
    }
}

/// With a hold-off, the fill threads load nothing until the gate opens, faults are served
/// meanwhile, and once it is opened every chunk arrives with its bytes. Fails if the fill
/// threads ignore the gate, or never start after it opens.
#[test]
fn fill_threads_wait_at_the_gate_until_it_opens() {
    let m = Mapping::new(16 * CHUNK as usize);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let opts = ServerOptions {
        prefetch: vec![("b".into(), 5 * CHUNK), ("b".into(), 6 * CHUNK)],
        background_fill: true,
        fill_threads: 2,
        fill_hold_off: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    let server = PageServer::start(vec![block(&m)], src.clone(), opts, Box::new(|_| {})).expect("start");
    assert_eq!(m.word(9 * CHUNK + 8), 9 * CHUNK + 8, "a fault is served while the gate is shut");
    std::thread::sleep(Duration::from_millis(100));
    let s = server.stats().snapshot();
    assert_eq!((s.chunks_prefetched, s.chunks_background), (0, 0), "nothing loaded before the gate opened");
    assert_eq!(src.reads.load(Ordering::Relaxed), 1, "only the faulted chunk was read");
    server.fill_gate().open();
    assert!(server.wait_resident(Duration::from_secs(10)), "the fill threads start once the gate opens");
    assert_eq!(server.stats().snapshot().chunks_prefetched, 2);
    assert_source_bytes(&m);
}

/// An ungated fill thread loads the prefetch list and the rest of memory while the gate is
/// shut, byte-exact; the gated one waits. Fails if `fill_ungated` is ignored (nothing loads
/// until the gate opens) or lets every thread through (the gate stays shut throughout here,
/// so only the count of threads that ran can tell: one).
#[test]
fn ungated_fill_threads_load_while_the_gate_is_shut() {
    let m = Mapping::new(16 * CHUNK as usize);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let opts = ServerOptions {
        prefetch: vec![("b".into(), 5 * CHUNK), ("b".into(), 6 * CHUNK)],
        background_fill: true,
        fill_threads: 2,
        fill_hold_off: Some(Duration::from_secs(600)),
        fill_ungated: 1,
        ..Default::default()
    };
    let server = PageServer::start(vec![block(&m)], src.clone(), opts, Box::new(|_| {})).expect("start");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.stats().snapshot().chunks_prefetched < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!server.fill_gate().is_open());
    let s = server.stats().snapshot();
    assert_eq!(s.chunks_prefetched, 2, "the ungated thread loads the list with the gate shut");
    // Thread 0 (ungated) fills every second chunk from 0; thread 1 (gated) those from 1.
    std::thread::sleep(Duration::from_millis(100));
    assert!(!server.is_resident(), "the gated thread's chunks wait for the gate");
    server.fill_gate().open();
    assert!(server.wait_resident(Duration::from_secs(10)));
    assert_source_bytes(&m);
}

/// A gate nobody opens opens itself after the hold-off: a guest that never exits still gets
/// all its memory (and the snapshot pin is let go). Fails if the fill waits for ever.
#[test]
fn a_gate_nobody_opens_opens_after_the_hold_off() {
    let m = Mapping::new(8 * CHUNK as usize);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let opts = ServerOptions {
        background_fill: true,
        fill_threads: 1,
        fill_hold_off: Some(Duration::from_millis(20)),
        ..Default::default()
    };
    let server = PageServer::start(vec![block(&m)], src, opts, Box::new(|_| {})).expect("start");
    assert!(server.wait_resident(Duration::from_secs(10)), "resident without anyone opening the gate");
    assert!(server.fill_gate().is_open());
    assert_source_bytes(&m);
}

/// Stopping a server whose gate is shut ends its fill threads at once (stop opens the gate).
#[test]
fn stop_releases_fill_threads_waiting_at_the_gate() {
    let m = Mapping::new(8 * CHUNK as usize);
    let src = Arc::new(TestSource { fail_at: None, reads: AtomicU64::new(0) });
    let opts = ServerOptions {
        background_fill: true,
        fill_threads: 2,
        fill_hold_off: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    let mut server = PageServer::start(vec![block(&m)], src.clone(), opts, Box::new(|_| {})).expect("start");
    server.stop();
    assert_eq!(src.reads.load(Ordering::Relaxed), 0, "stopped before loading anything");
}

/// Hands out chunks the way a shared cache does ([`Fill::Shared`]): offset-patterned bytes
/// built once and shared, never written into the server's buffer; `short_at` hands out one
/// a page short (a cache entry that does not fit the chunk).
struct SharedSource {
    short_at: Option<u64>,
    chunks: Vec<Arc<[u8]>>,
}

impl SharedSource {
    fn new(chunks: u64, short_at: Option<u64>) -> SharedSource {
        let chunks = (0..chunks)
            .map(|c| {
                let bytes: Vec<u8> =
                    (0..CHUNK / 8).flat_map(|i| (c * CHUNK + 8 * i).wrapping_mul(3).to_le_bytes()).collect();
                Arc::from(bytes)
            })
            .collect();
        SharedSource { short_at, chunks }
    }
}

impl PageSource for SharedSource {
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn read_chunk(&self, _idstr: &str, offset: u64, buf: &mut [u8]) -> Result<Fill, String> {
        // Poison the server's buffer: bytes from it would show up in the guest's memory.
        buf.fill(0xee);
        let data = self.chunks[(offset / CHUNK) as usize].clone();
        if Some(offset) == self.short_at {
            return Ok(Fill::Shared { data: data[..data.len() - 4096].into(), stored: 0 });
        }
        Ok(Fill::Shared { data: data.into(), stored: 0 })
    }
}

/// Chunks a cache holds are placed from the cache's own bytes: byte-exact on faults, from
/// the prefetch list and from the background fill.
#[test]
fn shared_chunks_are_placed_byte_exact() {
    let n = 24u64;
    let m = Mapping::new((n * CHUNK) as usize);
    let src = Arc::new(SharedSource::new(n, None));
    let opts = ServerOptions {
        prefetch: vec![("b".into(), 9 * CHUNK), ("b".into(), 2 * CHUNK)],
        background_fill: true,
        fill_threads: 2,
        ..Default::default()
    };
    let server = PageServer::start(vec![block(&m)], src, opts, Box::new(|_| {})).expect("start");
    assert_eq!(m.word(17 * CHUNK + 64), (17 * CHUNK + 64).wrapping_mul(3), "on a fault");
    assert!(server.wait_resident(Duration::from_secs(20)));
    assert!(server.error().is_none());
    for off in (0..n * CHUNK).step_by(8) {
        assert_eq!(m.word(off), off.wrapping_mul(3), "word at {off:#x}");
    }
}

/// A shared chunk whose length is not the chunk's is refused: the server fails naming the
/// chunk, and the faulting thread never sees its bytes (nor the server's buffer).
#[test]
fn a_shared_chunk_of_the_wrong_length_is_an_error_and_never_mapped() {
    let m = Arc::new(Mapping::new(8 * CHUNK as usize));
    let src = Arc::new(SharedSource::new(8, Some(4 * CHUNK)));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e2 = errors.clone();
    let mut server = PageServer::start(
        vec![block(&m)],
        src,
        ServerOptions::default(),
        Box::new(move |e| e2.lock().expect("lock").push(e.to_string())),
    )
    .expect("start");
    assert_eq!(m.word(CHUNK), CHUNK.wrapping_mul(3));
    let m2 = m.clone();
    let toucher = std::thread::spawn(move || m2.word(4 * CHUNK + 8));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while errors.lock().expect("lock").is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let errs = errors.lock().expect("lock").clone();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("offset 0x40000") && errs[0].contains("cached chunk has"), "{errs:?}");
    let word = toucher.join().expect("the faulting thread is released");
    assert_ne!(word, (4 * CHUNK + 8).wrapping_mul(3), "bytes of the refused chunk");
    assert_ne!(word, 0xeeee_eeee_eeee_eeee, "bytes of the server's buffer");
    server.stop();
}
