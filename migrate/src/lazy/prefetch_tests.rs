//! The prefetch list on real userfaultfd: checked (it comes from the store), loaded before
//! the first instruction when asked, and a bad chunk in it reported, never waited on for ever.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::tests::{block, Mapping, TestSource, CHUNK};
use super::*;

/// A source slow enough that the fill threads cannot have loaded the list by the time a
/// caller that does not wait for it looks.
struct SlowSource(TestSource);

impl PageSource for SlowSource {
    fn chunk_size(&self) -> u64 {
        self.0.chunk_size()
    }
    fn read_chunk(&self, idstr: &str, offset: u64, buf: &mut [u8]) -> Result<Fill, String> {
        std::thread::sleep(Duration::from_millis(30));
        self.0.read_chunk(idstr, offset, buf)
    }
}

/// A list with every kind of bad entry: a repeat, the same chunk at an unaligned offset, an
/// unknown block, offsets at and past the block's end.
fn hostile_list() -> Vec<(Arc<str>, u64)> {
    let b = |off: u64| -> (Arc<str>, u64) { ("b".into(), off) };
    vec![
        b(20 * CHUNK),
        b(7 * CHUNK),
        b(7 * CHUNK),
        b(7 * CHUNK + 4096 + 5),
        ("nope".into(), 0),
        b(32 * CHUNK),
        b(u64::MAX),
        b(3 * CHUNK),
    ]
}

#[test]
fn a_hostile_list_is_checked_and_loaded_before_the_first_touch() {
    let m = Mapping::new(32 * CHUNK as usize);
    let src = Arc::new(SlowSource(TestSource { fail_at: None, reads: AtomicU64::new(0) }));
    let opts = ServerOptions { prefetch: hostile_list(), fill_threads: 2, ..Default::default() };
    let server = PageServer::start(vec![block(&m)], src.clone(), opts, Box::new(|_| {})).expect("start");
    assert_eq!(server.prefetch_len(), 3, "chunks 20, 7 and 3, each once");
    server.load_prefetch().expect("prefetch");
    // Every listed chunk is in place when load_prefetch returns: nothing faults, nothing waits.
    let s = server.stats().snapshot();
    assert_eq!(s.chunks_prefetched, 3, "{s:?}");
    assert_eq!(s.zero_chunks, 1, "{s:?}");
    assert_eq!(src.0.reads.load(Ordering::Relaxed), 3, "each listed chunk read once");
    assert_eq!(m.word(20 * CHUNK + 8), 20 * CHUNK + 8);
    assert_eq!(m.word(7 * CHUNK + 4096), 7 * CHUNK + 4096);
    assert_eq!(m.word(3 * CHUNK), 0);
    assert_eq!(server.stats().snapshot().faults, 0, "the listed chunks were resident before the touch");
    assert_eq!(server.error(), None);
}

#[test]
fn a_bad_chunk_in_the_list_fails_the_load_before_the_first_instruction() {
    let src = Arc::new(TestSource { fail_at: Some(7 * CHUNK), reads: AtomicU64::new(0) });
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e2 = errors.clone();
    // One fill thread or two racing the restoring thread for the bad chunk: whoever reads it,
    // the error comes back from load_prefetch.
    for fill_threads in [1, 2] {
        let m = Mapping::new(32 * CHUNK as usize);
        errors.lock().expect("lock").clear();
        let e3 = e2.clone();
        let opts = ServerOptions { prefetch: hostile_list(), fill_threads, ..Default::default() };
        let server = Arc::new(
            PageServer::start(
                vec![block(&m)],
                src.clone(),
                opts,
                Box::new(move |e| e3.lock().expect("lock").push(e.to_string())),
            )
            .expect("start"),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = server.clone();
        std::thread::spawn(move || {
            let _ = tx.send(s2.load_prefetch());
        });
        let r = rx.recv_timeout(Duration::from_secs(20)).expect("load_prefetch must return, not hang");
        let err = r.expect_err("a chunk that cannot be read");
        assert!(
            matches!(&err, LazyError::Source { idstr, offset, .. } if idstr == "b" && *offset == 7 * CHUNK),
            "{err}"
        );
        assert!(err.to_string().contains("'b'") && err.to_string().contains("0x70000"), "{err}");
        assert_eq!(server.error(), Some(err), "the server failed with it");
        let errs = errors.lock().expect("lock").clone();
        assert_eq!(errs.len(), 1, "reported once through on_error: {errs:?}");
    }
}
