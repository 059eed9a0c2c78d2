//! A fault never waits for a loader's read: a loader (fill thread) reads a chunk before it
//! claims it, so a fault on that chunk is served while the loader's read is still under way
//! (before, the loader held the claim through its read and the fault waited for it: a fault
//! went at the pace of loaders running at a low priority). Page server and shared base alike.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::tests::{block, Mapping, TestSource, CHUNK};
use super::*;

/// [`TestSource`], except that a read of chunk 0 by a thread whose name starts with `loader`
/// blocks until [`Held::release`].
struct Held {
    inner: TestSource,
    loader: &'static str,
    entered: AtomicBool,
    released: Mutex<bool>,
    cv: Condvar,
}

impl Held {
    fn new(loader: &'static str) -> Arc<Held> {
        Arc::new(Held {
            inner: TestSource { fail_at: None, reads: AtomicU64::new(0) },
            loader,
            entered: AtomicBool::new(false),
            released: Mutex::new(false),
            cv: Condvar::new(),
        })
    }

    fn release(&self) {
        *self.released.lock().expect("lock") = true;
        self.cv.notify_all();
    }

    /// Waits (at most 30 s) until a loader is inside its read of chunk 0.
    fn wait_entered(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.entered.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "no loader read chunk 0");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl PageSource for Held {
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn read_chunk(&self, idstr: &str, offset: u64, buf: &mut [u8]) -> Result<Fill, String> {
        let me = std::thread::current().name().unwrap_or_default().to_string();
        if offset == 0 && me.starts_with(self.loader) {
            self.entered.store(true, Ordering::Release);
            let released = self.released.lock().expect("lock");
            // At most 60 s: a test that fails must not hang.
            drop(self.cv.wait_timeout_while(released, Duration::from_secs(60), |r| !*r).expect("wait"));
        }
        self.inner.read_chunk(idstr, offset, buf)
    }
}

#[test]
fn a_fault_is_served_while_a_fill_thread_reads_the_same_chunk() {
    let m = Arc::new(Mapping::new(4 * CHUNK as usize));
    let src = Held::new("uffd-fill");
    let opts = ServerOptions { background_fill: true, fill_threads: 1, fill_hold_off: None, ..Default::default() };
    let server = PageServer::start(vec![block(&m)], src.clone(), opts, Box::new(|_| {})).expect("start");
    src.wait_entered();

    let (tx, rx) = std::sync::mpsc::channel();
    let guest = m.clone();
    std::thread::spawn(move || {
        let _ = tx.send(guest.word(8));
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    src.release();
    assert_eq!(got, Ok(8), "the fault waited for the fill thread's read of its chunk");

    assert!(server.wait_resident(Duration::from_secs(20)));
    assert!(server.error().is_none(), "{:?}", server.error());
    for c in 0..4 {
        assert_eq!(m.word(c * CHUNK + 16), if c == 3 { 0 } else { c * CHUNK + 16 });
    }
    assert!(server.stats().snapshot().races >= 1, "the fill thread did not find the chunk taken");
}

#[test]
fn a_clone_fault_is_served_while_a_base_fill_thread_reads_the_same_chunk() {
    let src = Held::new("base-fill");
    let opts = BaseOptions { prefetch: Vec::new(), background_fill: true, fill_threads: 1 };
    let base = Base::start(vec![("b".into(), 4 * CHUNK)], src.clone(), opts, Box::new(())).expect("base");
    src.wait_entered();

    let (tx, rx) = std::sync::mpsc::channel();
    let b = base.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK as usize];
        let _ = tx.send(b.ensure(0, 0, &mut buf));
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    src.release();
    assert_eq!(got, Ok(Ok(())), "the fault waited for the base fill thread's read of its chunk");
    assert!(base.wait_settled(Duration::from_secs(20)));
    assert!(base.is_complete());
    let s = base.stats();
    assert_eq!((s.chunks_filled, s.chunks_failed), (4, 0), "{s:?}");
}
