//! SIGKILL in the middle of a VM snapshot's batched pack writes (hostile3): the `snapvisor
//! run` CLI is killed at random moments of a full snapshot (background and stop-and-copy) of a
//! running memfill guest, and the daemon at random moments of a VM's second (incremental)
//! snapshot, background or stop-and-copy. After every kill the store opens (recovering),
//! `verify` is clean, the snapshots taken before restore byte-exact (every RAM block hashed
//! against the restore taken before any kill), nothing but those and commits of the killed
//! process are listed, and once those are deleted GC brings the packs' disk usage back to what
//! it was.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions};
use hypervisor::vm::SharedOutput;
use serde_json::json;
use storage::{disk_bytes, Hash, Store};

const ROUNDS: u64 = 12;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// (idstr, used length, hash of the bytes) of every RAM block.
type BlockHashes = Vec<(String, usize, Hash)>;

/// Every RAM block of an eager restore of `name`, hashed.
fn ram_hashes(store: &Store, name: &str) -> BlockHashes {
    let (vm, _) =
        snapshot::restore(store, name, RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default())))
            .unwrap_or_else(|e| panic!("restore {name}: {e}"));
    let mut out: Vec<(String, usize, Hash)> =
        common::ram::ram_of(&vm).into_iter().map(|(n, v)| (n, v.len(), Hash::of(&v))).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn kill(pid: u32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Sum of the sizes of the pack files.
fn pack_len(packs: &Path) -> u64 {
    std::fs::read_dir(packs).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// Waits until the pack files grow past `base` (the snapshot is writing), then `delay` more,
/// and SIGKILLs `pid`. False if `alive` says the process ended first or 30 s passed.
fn kill_during_writes(pid: u32, packs: &Path, base: u64, delay: Duration, alive: &mut dyn FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pack_len(packs) <= base {
        if !alive() || Instant::now() > deadline {
            kill(pid);
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(delay);
    kill(pid);
    true
}

/// Checks the store after a kill and cleans up: see the module doc.
/// Returns how many snapshots the killed process committed and whether it had written pack
/// bytes that GC then reclaimed (a kill in the middle of the writes when nothing committed).
fn check_after_kill(dir: &Path, kept: &[(&str, BlockHashes)], baseline: u64, what: &str) -> (usize, bool) {
    let before_gc = disk_bytes(&dir.join("packs")).expect("du");
    let mut committed = 0;
    let store = Store::open(dir).unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
    for r in store.verify_all().expect("verify") {
        assert!(r.ok(), "{what}: verify: {:?}", r.errors);
    }
    let listed = store.list().expect("list");
    for (name, want) in kept {
        assert!(listed.iter().any(|n| n == name), "{what}: {name} is gone: {listed:?}");
        assert_eq!(&ram_hashes(&store, name), want, "{what}: {name} restores with other bytes");
    }
    for n in &listed {
        if !kept.iter().any(|(k, _)| k == n) {
            assert!(n.starts_with('k') || n.starts_with('d'), "{what}: unexpected snapshot {n}");
            // What the killed process did commit restores too.
            let _ = ram_hashes(&store, n);
            store.delete(n).expect("delete");
            committed += 1;
        }
    }
    store.gc().expect("gc");
    let packs = disk_bytes(&dir.join("packs")).expect("du");
    // One 4 KiB block for the header of each pack a killed writer started may stay.
    assert!(packs <= baseline + 64 * 1024, "{what}: packs hold {packs} bytes after gc, {baseline} before the kill");
    (committed, before_gc > baseline + 64 * 1024)
}

#[test]
fn sigkill_during_cli_and_daemon_snapshots_leaves_earlier_snapshots_exact_and_gc_reclaims() {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_nanos() as u64 | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let store_dir = state.join("store");
    let sock;
    {
        // Two snapshots of one VM through the daemon: a full one and an incremental one.
        let mut d = Daemon::start(dir.path(), &[]);
        sock = d.socket.clone();
        d.ok(
            "POST",
            "/vms",
            Some(json!({"name": "m", "guest": "memfill", "mem_mib": 16, "seed": 9, "passes": 0, "start": true})),
        );
        d.wait_serial("m", "memfill pass 1 ", Duration::from_secs(60));
        d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "base", "mode": "stop"})));
        std::thread::sleep(Duration::from_millis(100));
        let r = d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "inc0", "mode": "background"})));
        assert_eq!(r.get("incremental").and_then(serde_json::Value::as_bool), Some(true), "{r}");
        d.ok("DELETE", "/vms/m", None);
        d.terminate_within(Duration::from_secs(30));
    }
    let _ = sock;
    let (kept, baseline) = {
        let store = Store::open(&store_dir).expect("store");
        store.gc().expect("gc");
        let kept = vec![("base", ram_hashes(&store, "base")), ("inc0", ram_hashes(&store, "inc0"))];
        (kept, disk_bytes(&store_dir.join("packs")).expect("du"))
    };
    let st = store_dir.to_str().expect("utf-8").to_string();
    // Rounds whose kill cut a snapshot's writes short (bytes in packs, the snapshot not
    // committed): the test is about those.
    let mut cut = 0;
    for round in 0..ROUNDS {
        // Into the pack writes: 0 to 60 ms after the first bytes reach a pack.
        let delay = Duration::from_micros(rng.next() % 60_000);
        let packs = store_dir.join("packs");
        let base = pack_len(&packs);
        let background = rng.next().is_multiple_of(2);
        let mode = if background { "background" } else { "stop" };
        let what;
        if round % 2 == 0 {
            // The CLI, a full snapshot 150 ms into the run, killed `delay` after that.
            what = format!("round {round}: CLI {mode} snapshot killed {delay:?} into its pack writes");
            let name = format!("k{round}");
            let seed_arg = (round + 20).to_string();
            let mut child = Command::new(common::snapvisor_bin())
                .args(["run", "--builtin", "memfill", "--mem-mib", "48", "--passes", "0", "--seed", &seed_arg])
                .args(["--snapshot-after-ms", "150", "--store", &st, "--name", &name, "--snapshot-mode", mode])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn");
            let pid = child.id();
            let hit = kill_during_writes(pid, &packs, base, delay, &mut || child.try_wait().ok().flatten().is_none());
            let _ = child.wait();
            assert!(hit, "{what}: the CLI ended or never wrote");
        } else {
            // The daemon: a VM's full snapshot, then its incremental one killed `delay` in.
            what = format!("round {round}: daemon incremental {mode} snapshot killed {delay:?} into its pack writes");
            let d = Daemon::start(dir.path(), &[]);
            let vm = format!("v{round}");
            d.ok(
                "POST",
                "/vms",
                Some(json!({"name": vm, "guest": "memfill", "seed": round, "mem_mib": 48, "passes": 0, "start": true})),
            );
            d.wait_serial(&vm, "memfill pass 1 ", Duration::from_secs(60));
            d.ok("POST", &format!("/vms/{vm}/snapshot"), Some(json!({"name": format!("d{round}a"), "mode": "stop"})));
            // The guest's next pass dirties what the incremental snapshot copies.
            let passes = d.wait_serial(&vm, "memfill pass 1 ", Duration::from_secs(1)).matches("memfill pass").count();
            d.wait_serial(&vm, &format!("memfill pass {} ", passes + 1), Duration::from_secs(60));
            let base_b = pack_len(&packs);
            let r = d.ok(
                "POST",
                &format!("/vms/{vm}/snapshot"),
                Some(json!({"name": format!("d{round}b"), "mode": mode, "async": true})),
            );
            assert!(r.get("id").is_some() || r.get("operation").is_some(), "{r}");
            let pid = d.child.id();
            kill_during_writes(pid, &packs, base_b, delay, &mut || true);
            drop(d); // waits for it
        }
        let (committed, wrote) = check_after_kill(&store_dir, &kept, baseline, &what);
        eprintln!("{what}: ok ({committed} committed, pack bytes written: {wrote})");
        let whole = if round % 2 == 0 { 1 } else { 2 };
        cut += usize::from(wrote && committed < whole);
    }
    assert!(cut > 0, "no kill landed in the middle of a snapshot's writes");
}
