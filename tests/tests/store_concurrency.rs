//! Many readers with writers, deletes and GC alongside: every read is bit-exact. Two writers
//! storing the same chunks at once, with GC running back to back, lose none of them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use storage::{BlockSpec, Store, StoreOptions, WriteStats};

const CS: u32 = 16 * 1024;

fn data(seed: u64, chunks: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = vec![0u8; chunks * CS as usize];
    for (i, c) in out.chunks_mut(CS as usize).enumerate() {
        if i % 5 == 4 {
            continue; // zero chunk
        }
        for b in c.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = if i % 2 == 0 { (x % 8) as u8 } else { x as u8 };
        }
    }
    out
}

fn commit(store: &Store, name: &str, content: &[u8]) {
    let spec = BlockSpec {
        idstr: "ram".into(),
        used_length: content.len() as u64,
        max_length: content.len() as u64,
        page_size: 4096,
        resizeable: false,
    };
    let w = store.begin(name, vec![spec]).expect("begin");
    w.put("ram", 0, content).expect("put");
    w.commit(Vec::new()).expect("commit");
}

#[test]
fn readers_writers_and_gc_in_parallel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), StoreOptions { chunk_size: CS, ..Default::default() }).expect("open");
    let base = data(0, 64);
    commit(&store, "base", &base);
    // Snapshots readers may pick from: (name, seed). Deleted ones leave this list first.
    let live: Mutex<Vec<(String, u64)>> = Mutex::new(vec![("base".into(), 0)]);
    let stop = AtomicBool::new(false);
    let writers_done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        for r in 0..4u64 {
            let (store, live, stop, reads) = (store.clone(), &live, &stop, &reads);
            s.spawn(move || {
                let mut buf = vec![0u8; CS as usize];
                let mut i = r;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let (name, seed) = {
                        let l = live.lock().expect("lock");
                        l[(i >> 33) as usize % l.len()].clone()
                    };
                    // The snapshot may be deleted (and its chunks collected) at any moment:
                    // then a read may fail, but never return wrong bytes.
                    let Ok(reader) = store.reader(&name) else {
                        continue;
                    };
                    let want = data(seed, 64);
                    let chunk = (i >> 40) as usize % 64;
                    match reader.read_chunk("ram", (chunk * CS as usize) as u64, &mut buf) {
                        Ok(n) => assert_eq!(
                            &buf[..n],
                            &want[chunk * CS as usize..(chunk + 1) * CS as usize],
                            "{name} chunk {chunk}"
                        ),
                        Err(e) => {
                            assert!(!store.contains(&name).expect("contains"), "read of listed {name} failed: {e}")
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (store, live) = (store.clone(), &live);
                s.spawn(move || {
                    for k in 0..8u64 {
                        let seed = 100 * (w + 1) + k;
                        let name = format!("w{w}-{k}");
                        commit(&store, &name, &data(seed, 64));
                        live.lock().expect("lock").push((name.clone(), seed));
                        if k % 2 == 1 {
                            let victim = format!("w{w}-{}", k - 1);
                            live.lock().expect("lock").retain(|(n, _)| *n != victim);
                            store.delete(&victim).expect("delete");
                        }
                    }
                })
            })
            .collect();
        let gc = {
            let (store, writers_done) = (store.clone(), &writers_done);
            s.spawn(move || {
                let (mut removed, mut runs) = (0, 0);
                // GC back to back for as long as writers commit and delete.
                while !writers_done.load(Ordering::Relaxed) {
                    removed += store.gc().expect("gc").chunks_removed;
                    runs += 1;
                }
                (removed, runs)
            })
        };
        for w in writers {
            w.join().expect("writer");
        }
        writers_done.store(true, Ordering::Relaxed);
        let (removed, runs) = gc.join().expect("gc thread");
        assert!(runs > 1, "gc ran only {runs} times alongside the writers");
        stop.store(true, Ordering::Relaxed);
        eprintln!("{runs} gc runs removed {removed} chunks during the run");
    });
    assert!(reads.load(Ordering::Relaxed) > 100);
    store.gc().expect("final gc");
    for r in store.verify_all().expect("verify") {
        assert!(r.ok(), "{}: {:?}", r.snapshot, r.errors);
    }
    assert_eq!(store.list().expect("list").len(), 1 + 8);
    let mut buf = vec![0u8; base.len()];
    store.reader("base").expect("reader").read_at("ram", 0, &mut buf).expect("read");
    assert_eq!(buf, base);
}

/// Commits `content` as `name`, returning what the writer did.
fn commit_stats(store: &Store, name: &str, content: &[u8]) -> WriteStats {
    let spec = BlockSpec {
        idstr: "ram".into(),
        used_length: content.len() as u64,
        max_length: content.len() as u64,
        page_size: 4096,
        resizeable: false,
    };
    let w = store.begin(name, vec![spec]).expect("begin");
    w.put("ram", 0, content).expect("put");
    let stats = w.stats();
    w.commit(Vec::new()).expect("commit");
    stats
}

/// The path the GC lock exists for: a writer finds a chunk already stored (by the other
/// writer, or by a snapshot deleted a moment ago) and records a reference to it, while GC
/// sweeps everything no committed snapshot or open writer references. Both writers store the
/// same content and delete each snapshot as soon as they have read it back, so the shared
/// chunks are often referenced by nothing but the writers in flight: a GC between a writer's
/// lookup and its recording the reference would leave its snapshot without the chunk.
#[test]
fn two_writers_storing_the_same_chunks_under_gc_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), StoreOptions { chunk_size: CS, ..Default::default() }).expect("open");
    let shared = data(7, 64);
    const ROUNDS: u64 = 40;
    let writers_done = AtomicBool::new(false);
    let (dedup, gc_runs) = std::thread::scope(|s| {
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (store, shared) = (store.clone(), &shared);
                s.spawn(move || {
                    let mut dedup = 0;
                    let mut buf = vec![0u8; shared.len()];
                    for k in 0..ROUNDS {
                        let name = format!("d{w}-{k}");
                        dedup += commit_stats(&store, &name, shared).dedup_chunks;
                        let read = store.reader(&name).expect("reader").read_at("ram", 0, &mut buf);
                        if let Err(e) = read {
                            panic!("committed {name} lost a chunk: {e}");
                        }
                        assert!(buf == *shared, "{name} read back different bytes");
                        if k + 1 < ROUNDS {
                            store.delete(&name).expect("delete");
                        }
                    }
                    dedup
                })
            })
            .collect();
        let gc = {
            let (store, writers_done) = (store.clone(), &writers_done);
            s.spawn(move || {
                let mut runs = 0;
                while !writers_done.load(Ordering::Relaxed) {
                    store.gc().expect("gc");
                    runs += 1;
                }
                runs
            })
        };
        let dedup: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
        writers_done.store(true, Ordering::Relaxed);
        (dedup, gc.join().expect("gc thread"))
    });
    eprintln!("{gc_runs} gc runs, {dedup} chunks deduplicated against stored ones");
    assert!(gc_runs > 1, "gc ran only {gc_runs} times alongside the writers");
    assert!(dedup > 0, "the writers never found each other's chunks: the path is not exercised");
    store.gc().expect("final gc");
    assert_eq!(store.list().expect("list"), vec!["d0-39".to_string(), "d1-39".to_string()]);
    for r in store.verify_all().expect("verify") {
        assert!(r.ok(), "{}: {:?}", r.snapshot, r.errors);
    }
    for name in ["d0-39", "d1-39"] {
        let mut buf = vec![0u8; shared.len()];
        store.reader(name).expect("reader").read_at("ram", 0, &mut buf).expect("read");
        assert!(buf == shared, "{name}");
    }
}
