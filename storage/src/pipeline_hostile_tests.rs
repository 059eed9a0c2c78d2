//! Hostile tests of the pipeline (pipeline.rs) against a store that other threads use at the
//! same time: concurrent snapshots sharing chunks, with deletes, GC and verify running
//! between them. Whatever the interleaving, every committed snapshot reads back its bytes.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::pipeline::{put_pipelined, ChunkJob};
use crate::{BlockSpec, Store, StoreOptions};

const CS: u64 = 16384;
const N: u64 = 48;

fn spec(len: u64) -> BlockSpec {
    BlockSpec { idstr: "ram".into(), used_length: len, max_length: len, page_size: 4096, resizeable: false }
}

/// Chunk `i` of snapshot `(writer, round)`: a third are common to every snapshot, a third to
/// two successive snapshots of the writer (an odd one, deleted at once, and the next: GC may
/// take them while the next one finds them in the index), a third its own, and every 8th chunk repeats chunk 0 of the run.
fn chunk(i: u64, writer: u64, round: u64) -> Vec<u8> {
    let key = match (i % 8, i % 3) {
        (0, _) => (0, writer, round),
        (_, 0) => (i, 99, 0),
        (_, 1) => (i, writer, 1000 + round.div_ceil(2)),
        _ => (i, writer, round),
    };
    let mut x = (key.0 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (key.1 << 20) ^ (key.2 << 40);
    (0..CS)
        .map(|j| {
            if j % 2 == 0 {
                j as u8
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

fn check(store: &Store, name: &str, writer: u64, round: u64) {
    let mut buf = vec![0u8; CS as usize];
    for i in 0..N {
        store.read_chunk(name, "ram", i * CS, &mut buf).unwrap_or_else(|e| panic!("{name} chunk {i}: {e}"));
        assert!(buf == chunk(i, writer, round), "{name}: chunk {i} reads back different bytes");
    }
}

#[test]
fn concurrent_snapshots_with_delete_gc_and_verify_read_back_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = StoreOptions { chunk_size: CS as u32, pack_max: 256 << 10, ..Default::default() };
    let store = Store::open_with(dir.path(), opts).expect("open");
    let done = AtomicBool::new(false);
    let rounds = 40;
    std::thread::scope(|s| {
        let store = &store;
        let done = &done;
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                s.spawn(move || {
                    for r in 0..rounds {
                        let name = format!("w{w}r{r}");
                        let sw = store.begin(&name, vec![spec(N * CS)]).expect("begin");
                        let jobs: Vec<ChunkJob> =
                            (0..N).map(|i| ChunkJob { block: "ram".into(), offset: i * CS }).collect();
                        let read = |_: &str, off: u64, buf: &mut [u8]| {
                            buf.copy_from_slice(&chunk(off / CS, w, r));
                            Ok(())
                        };
                        put_pipelined(&sw, &jobs, 2, &read).expect("pipeline");
                        sw.commit(Vec::new()).expect("commit");
                        check(store, &name, w, r);
                        // Every other snapshot is deleted again, so GC has chunks to take.
                        if r % 2 == 1 {
                            store.delete(&name).expect("delete");
                        }
                    }
                })
            })
            .collect();
        s.spawn(move || {
            while !done.load(Ordering::Relaxed) {
                store.gc().expect("gc");
                for rep in store.verify_all().expect("verify") {
                    // A snapshot deleted while verify ran may be reported missing; any other
                    // error is damage.
                    if store.list().expect("list").contains(&rep.snapshot) {
                        assert!(rep.ok(), "verify {}: {:?}", rep.snapshot, rep.errors);
                    }
                }
            }
        });
        for w in writers {
            w.join().expect("writer");
        }
        done.store(true, Ordering::Relaxed);
    });
    store.gc().expect("gc");
    for w in 0..3 {
        for r in (0..rounds).step_by(2) {
            check(&store, &format!("w{w}r{r}"), w, r);
        }
    }
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "verify at the end");
}

/// Sets this process's file size limit (RLIMIT_FSIZE, soft) to `bytes`: a write past it fails
/// with EFBIG (SIGXFSZ ignored), as a disk that filled up between the space check and the write.
fn limit_file_size(bytes: u64) {
    // SAFETY: ignoring SIGXFSZ and setting a resource limit of this process only.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut r), 0);
        r.rlim_cur = bytes.min(r.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &r), 0, "setrlimit");
    }
}

/// A pack write that fails halfway through a run (here: the file size limit, as a disk that
/// fills after the space check passed) fails the run; the torn entry and the places reserved
/// after it stay in the pack, and the store still works: the earlier snapshot reads back
/// exact and verifies, GC runs, and the next snapshot (in a new pack) reads back exact.
#[test]
fn a_pack_write_failing_mid_run_leaves_a_working_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = StoreOptions { chunk_size: CS as u32, ..Default::default() };
    let store = Store::open_with(dir.path(), opts.clone()).expect("open");
    let n = 3 * N;
    let jobs: Vec<ChunkJob> = (0..n).map(|i| ChunkJob { block: "ram".into(), offset: i * CS }).collect();
    let snap = |name: &str, round: u64| {
        let w = store.begin(name, vec![spec(n * CS)]).expect("begin");
        let read = |_: &str, off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&chunk(off / CS, 7, round));
            Ok(())
        };
        put_pipelined(&w, &jobs, 2, &read).and_then(|_| w.commit(Vec::new()))
    };
    let check_all = |name: &str, round: u64| {
        let mut buf = vec![0u8; CS as usize];
        for i in 0..n {
            store.read_chunk(name, "ram", i * CS, &mut buf).unwrap_or_else(|e| panic!("{name} chunk {i}: {e}"));
            assert!(buf == chunk(i, 7, round), "{name}: chunk {i} reads back different bytes");
        }
    };
    snap("before", 1).expect("first snapshot");
    let packs = dir.path().join("packs");
    let biggest =
        std::fs::read_dir(&packs).expect("packs").map(|e| e.expect("entry").metadata().expect("meta").len()).max();
    // Room for about a third of the next run's new chunks in a new pack.
    limit_file_size(biggest.expect("a pack") / 6);
    let err = snap("failed", 2).expect_err("the pack write must fail");
    limit_file_size(u64::MAX);
    assert!(err.to_string().contains("append chunk"), "{err}");
    assert_eq!(store.list().expect("list"), vec!["before".to_string()]);
    check_all("before", 1);
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "verify after the failed run");
    store.gc().expect("gc");
    check_all("before", 1);
    snap("after", 2).expect("the next snapshot");
    check_all("after", 2);
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "verify at the end");
    // And once more from a fresh handle, as after a restart.
    drop(store);
    let store = Store::open_with(dir.path(), opts).expect("reopen");
    let mut buf = vec![0u8; CS as usize];
    for (name, round) in [("before", 1), ("after", 2)] {
        for i in 0..n {
            store.read_chunk(name, "ram", i * CS, &mut buf).expect("read");
            assert!(buf == chunk(i, 7, round), "{name}: chunk {i} after reopening");
        }
    }
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "verify after reopening");
}
