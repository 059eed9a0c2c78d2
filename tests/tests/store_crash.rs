//! Crash safety for real: a child process writes, deletes and garbage-collects snapshots and
//! is killed with SIGKILL, 30 times: at random moments in even rounds, and in odd rounds the
//! moment it announces a commit. After each kill the store must open, every listed snapshot
//! must read back bit-exact (content derived from its name), every snapshot any child
//! committed (and did not start deleting) must still be listed, nothing else may be listed
//! but the one commit the kill interrupted, and GC must reclaim whatever was half-written. The
//! test also counts the kills that landed inside a commit (the child announced it and never
//! reported it done) and requires some.
//!
//! The test re-executes its own binary with `STORE_CRASH_CHILD=<dir>` to run the child, which
//! reports `@commit`, `@committed`, `@delete` lines on its stdout.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use storage::{BlockSpec, ChunkRef, Store, StoreOptions};

const CS: u32 = 16 * 1024;
const KILLS: u64 = 30;
const CHILD_ENV: &str = "STORE_CRASH_CHILD";
const ROUND_ENV: &str = "STORE_CRASH_ROUND";

fn opts() -> StoreOptions {
    StoreOptions { chunk_size: CS, ..Default::default() }
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The blocks and their contents that snapshot `name` holds: a pure function of the name.
fn expected(name: &str) -> Vec<(BlockSpec, Vec<u8>)> {
    let mut rng = Rng::new(name_seed(name));
    (0..2)
        .map(|b| {
            let len = (rng.next() % 24 + 1) * u64::from(CS) + (rng.next() % 4) * 4096;
            let mut data = vec![0u8; len as usize];
            for (i, chunk) in data.chunks_mut(CS as usize).enumerate() {
                match rng.next() % 4 {
                    0 => {} // zero chunk
                    1 => {
                        // shared between snapshots: exercises dedup
                        let mut r = Rng::new(i as u64 + 1000 * b);
                        chunk.iter_mut().for_each(|x| *x = (r.next() % 16) as u8);
                    }
                    _ => chunk.iter_mut().for_each(|x| *x = rng.next() as u8),
                }
            }
            let spec = BlockSpec {
                idstr: format!("block{b}"),
                used_length: len,
                max_length: len + 4096,
                page_size: 4096,
                resizeable: b == 1,
            };
            (spec, data)
        })
        .collect()
}

/// Tells the parent what the child is about to do or has done (unbuffered, one line).
fn report(what: &str, name: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "@{what} {name}");
    let _ = out.flush();
}

fn child(dir: &str, round: u64) -> ! {
    let store = match Store::open_with(dir, opts()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("child: open failed: {e}");
            std::process::exit(3)
        }
    };
    for k in 0.. {
        let name = format!("r{round}-s{k}");
        let blocks = expected(&name);
        let w = store.begin(&name, blocks.iter().map(|(s, _)| s.clone()).collect()).expect("begin");
        std::thread::scope(|s| {
            for t in 0..2usize {
                let (w, blocks) = (&w, &blocks);
                s.spawn(move || {
                    for (spec, data) in blocks {
                        for (i, c) in data.chunks(CS as usize).enumerate().skip(t).step_by(2) {
                            w.put_chunk(&spec.idstr, (i * CS as usize) as u64, c).expect("put");
                        }
                    }
                });
            }
        });
        report("commit", &name);
        w.commit(name.clone().into_bytes()).expect("commit");
        report("committed", &name);
        store.put_attachment(&name, "prefetch", name.as_bytes()).expect("attach");
        if k % 3 == 2 {
            let victim = format!("r{round}-s{}", k - 1);
            report("delete", &victim);
            store.delete(&victim).expect("delete");
        }
        if k % 4 == 3 {
            store.gc().expect("gc");
        }
    }
    unreachable!()
}

/// Checks every listed snapshot bit-exact; returns how many there are.
fn check(store: &Store) -> usize {
    let names = store.list().expect("list");
    let mut buf = vec![0u8; CS as usize];
    for name in &names {
        let m = store.manifest(name).unwrap_or_else(|e| panic!("manifest of listed '{name}': {e}"));
        assert_eq!(m.state, name.as_bytes(), "state of {name}");
        let want = expected(name);
        assert_eq!(m.blocks.len(), want.len(), "{name}");
        let r = store.reader(name).expect("reader");
        for (spec, data) in &want {
            let b = m.block(&spec.idstr).expect("block listed");
            assert_eq!(
                (b.used_length, b.max_length, b.resizeable),
                (spec.used_length, spec.max_length, spec.resizeable)
            );
            for (i, c) in data.chunks(CS as usize).enumerate() {
                let n = r
                    .read_chunk(&spec.idstr, (i * CS as usize) as u64, &mut buf)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(&buf[..n], c, "{name} {} chunk {i}", spec.idstr);
            }
        }
        if let Some(a) = store.attachment(name, "prefetch").expect("attachment") {
            assert_eq!(a, name.as_bytes());
        }
    }
    names.len()
}

/// Distinct stored chunks the listed snapshots reference.
fn live_chunks(store: &Store) -> u64 {
    let mut live = HashSet::new();
    for name in store.list().expect("list") {
        for b in store.manifest(&name).expect("manifest").blocks {
            live.extend(b.chunks.into_iter().filter(|c| *c != ChunkRef::Zero));
        }
    }
    live.len() as u64
}

#[test]
fn sigkill_at_random_moments_leaves_store_consistent() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let round = std::env::var(ROUND_ENV).ok().and_then(|r| r.parse().ok()).unwrap_or(0);
        child(&dir, round);
    }
    let start = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current_exe");
    let mut rng = Rng::new(42);
    let mut max_listed = 0;
    // Committed by some child and never handed to `delete`: must be listed after every kill.
    let mut must_list: HashSet<String> = HashSet::new();
    let (mut kills_in_commit, mut interrupted_listed) = (0, 0);
    for round in 0..KILLS {
        let mut c = Command::new(&exe)
            .args(["sigkill_at_random_moments_leaves_store_consistent", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdout = c.stdout.take().expect("child stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(event) = line.strip_prefix('@') {
                    let _ = tx.send(event.to_string());
                    lines.push(event.to_string());
                }
            }
            lines
        });
        if round % 2 == 1 {
            // Kill the moment the child starts its n-th commit of this round.
            let nth = rng.next() % 4;
            let mut seen = 0;
            loop {
                let event = rx.recv_timeout(Duration::from_secs(30)).expect("the child reports its commits");
                if event.starts_with("commit ") {
                    if seen == nth {
                        break;
                    }
                    seen += 1;
                }
            }
        } else {
            std::thread::sleep(Duration::from_millis(30 + rng.next() % 400));
        }
        if let Some(status) = c.try_wait().expect("try_wait") {
            panic!("child exited on its own in round {round}: {status}");
        }
        c.kill().expect("SIGKILL child");
        c.wait().expect("reap child");
        let events = reader.join().expect("stdout reader");
        // What the kill may have interrupted: the last commit not reported done, a delete.
        let mut in_flight: Vec<String> = Vec::new();
        let mut interrupted_commit = None;
        for e in &events {
            match e.split_once(' ') {
                Some(("commit", n)) => interrupted_commit = Some(n.to_string()),
                Some(("committed", n)) => {
                    interrupted_commit = None;
                    must_list.insert(n.to_string());
                }
                Some(("delete", n)) => {
                    must_list.remove(n);
                    in_flight.push(n.to_string());
                }
                _ => panic!("unexpected child report {e:?}"),
            }
        }
        in_flight.extend(interrupted_commit.clone());
        let store = Store::open_with(dir.path(), opts()).expect("store opens after SIGKILL");
        max_listed = max_listed.max(check(&store));
        let listed: HashSet<String> = store.list().expect("list").into_iter().collect();
        let mut lost: Vec<&String> = must_list.difference(&listed).collect();
        lost.sort();
        assert!(lost.is_empty(), "round {round}: committed snapshots no longer listed: {lost:?}");
        for name in &listed {
            assert!(
                must_list.contains(name) || in_flight.contains(name),
                "round {round}: '{name}' is listed but was never committed, or was deleted"
            );
        }
        if let Some(name) = interrupted_commit {
            kills_in_commit += 1;
            // Atomic: the interrupted snapshot is either absent or whole (check() read it).
            interrupted_listed += usize::from(listed.contains(&name));
        }
        // Settled now: what the kill interrupted is there for good or gone for good (no
        // later child touches this round's names).
        must_list.extend(in_flight.into_iter().filter(|n| listed.contains(n)));
        // Opening after a crash already collected what the killed child left half-written.
        let usage = store.usage().expect("usage");
        assert_eq!(usage.chunks, live_chunks(&store), "round {round}");
        if round % 5 == 4 {
            store.gc().expect("gc after crash");
            check(&store);
        }
    }
    eprintln!("{kills_in_commit} kills landed inside a commit; {interrupted_listed} of those snapshots were listed");
    assert!(kills_in_commit >= 3, "only {kills_in_commit} kills landed inside a commit");
    assert!(max_listed >= 5, "children committed too little to test anything: {max_listed}");
    // Everything half-written is reclaimed: after GC the index holds exactly the chunks
    // the listed snapshots reference.
    let store = Store::open_with(dir.path(), opts()).expect("open");
    store.gc().expect("final gc");
    let usage = store.usage().expect("usage");
    assert_eq!(usage.chunks, live_chunks(&store));
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()));
    eprintln!("{KILLS} kills in {:?}, {} snapshots listed at the end, {usage:?}", start.elapsed(), usage.snapshots);
}
