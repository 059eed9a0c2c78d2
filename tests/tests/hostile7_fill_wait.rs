//! A background snapshot waiting for a lazy restore's fill, through the daemon (hostile7),
//! where hostile6 did not reach. The fill is made to last by moving the daemon's fill threads
//! (`uffd-fill*`) into a cgroup with 1% of a CPU (common/throttle.rs); the guest runs at full
//! speed. While one VM's snapshot waits, requests for other VMs (create, snapshot, pause,
//! list, delete, snapshot delete) are answered and work; the waiting snapshot then runs in
//! the background and holds the restored memory byte for byte. A corrupt chunk the fill meets
//! during the wait fails the snapshot with an error naming the chunk, commits nothing, and
//! leaves the daemon and the other VMs running. Needs root (cgroups).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::ram::{assert_same_ram, ram_of};
use common::throttle::Throttle;
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions};
use hypervisor::vm::SharedOutput;
use serde_json::{json, Value};
use storage::Store;

/// Guest memory of the snapshot restored lazily (MiB): 4,096 chunks to fill.
const MEM: u64 = 256;
/// A chunk near the end of `pc.ram` (the touch guest, waiting for its go, never reads it).
const FAR: u64 = (MEM - 4) << 20;

/// A touch guest's snapshot "a" (memory filled, waiting for go) put into the store of a
/// daemon's state directory in `dir` before the daemon starts; `damage_far` corrupts the
/// chunk at [`FAR`].
fn touch_snapshot_in(dir: &Path, damage_far: bool) {
    let store = Store::open(dir.join("state/store")).expect("store");
    common::touch::touch_snapshot(&store, "a", MEM, 21);
    if damage_far {
        let _keep_damaged = common::damage::damage(&store, "a", FAR);
    }
}

/// Restores "a" lazily as "v", slows its fill down and asks for a background snapshot `snap`
/// of it (async): the snapshot is waiting for the fill when this returns. The throttle and
/// the operation id.
fn snapshot_waiting_for_fill(d: &Daemon, snap: &str) -> (Throttle, u64) {
    // Its fill threads are slowed as they appear, during the restore request.
    let throttle = std::thread::scope(|s| {
        let restore = s.spawn(|| d.ok("POST", "/snapshots/a/restore", Some(json!({"vm": "v", "mode": "lazy"}))));
        let throttle = Throttle::threads(d.child.id(), "uffd-fill");
        restore.join().expect("restore");
        throttle
    });
    let info = d.ok("GET", "/vms/v", None);
    assert!(info.get("lazy_resident_ms").is_none(), "v was resident before its fill was slowed: {info}");
    let r = d.ok("POST", "/vms/v/snapshot", Some(json!({"name": snap, "mode": "background", "async": true})));
    let id = r["id"].as_u64().or_else(|| r["operation"].as_u64()).unwrap_or_else(|| panic!("no operation id: {r}"));
    (throttle, id)
}

/// Polls operation `id` until it is no longer running (at most 120 s).
fn finished(d: &Daemon, id: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let op = d.ok("GET", &format!("/operations/{id}"), None);
        if op["state"] != "running" || Instant::now() > deadline {
            return op;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request that must be answered within 20 s (never queued behind the waiting snapshot).
fn answered(d: &Daemon, method: &str, path: &str, body: Option<Value>) -> Value {
    let (status, v) = d
        .call_within(method, path, body.as_ref(), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{method} {path} was not answered while a snapshot waited for a fill: {e}"));
    assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
    v
}

#[test]
fn other_vms_are_served_while_a_snapshot_waits_for_a_fill_and_it_then_holds_the_memory_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    touch_snapshot_in(dir.path(), false);
    let mut d = Daemon::start(dir.path(), &[]);
    d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "o1", "guest": "memfill", "mem_mib": 16, "seed": 4, "passes": 0, "start": true})),
    );
    d.wait_serial("o1", "memfill pass 1 ", Duration::from_secs(60));
    let (throttle, id) = snapshot_waiting_for_fill(&d, "b");

    // Other VMs, while v's snapshot waits.
    answered(
        &d,
        "POST",
        "/vms",
        Some(json!({"name": "o2", "guest": "memfill", "mem_mib": 16, "seed": 5, "passes": 0, "start": true})),
    );
    answered(&d, "POST", "/vms/o1/snapshot", Some(json!({"name": "o1s", "mode": "background"})));
    answered(&d, "POST", "/vms/o2/snapshot", Some(json!({"name": "o2s", "mode": "stop"})));
    answered(&d, "POST", "/vms/o1/pause", None);
    answered(&d, "POST", "/vms/o1/resume", None);
    let vms = answered(&d, "GET", "/vms", None);
    assert_eq!(vms.as_array().map(Vec::len), Some(3), "{vms}");
    answered(&d, "GET", "/snapshots", None);
    answered(&d, "POST", "/snapshots/o2s/restore", Some(json!({"vm": "o3", "mode": "eager"})));
    answered(&d, "DELETE", "/vms/o2", None);
    answered(&d, "DELETE", "/vms/o3", None);
    answered(&d, "DELETE", "/snapshots/o2s", None);
    // All of that was served during the wait: v's snapshot still waits, its fill unfinished.
    let op = d.ok("GET", &format!("/operations/{id}"), None);
    assert_eq!(op["state"], "running", "the snapshot stopped waiting before the other requests were done: {op}");
    assert!(d.ok("GET", "/vms/v", None).get("lazy_resident_ms").is_none(), "v became resident meanwhile");

    drop(throttle);
    let op = finished(&d, id);
    assert_eq!(op["state"], "done", "{op}");
    assert_eq!(op["result"]["mode"], "background", "it waited for the fill and ran in the background: {op}");
    assert!(op["result"]["fill_wait"]["resident"].as_bool().unwrap_or(false), "{op}");
    d.wait_serial("o1", "memfill pass 1 ", Duration::from_secs(1));
    assert_eq!(d.ok("GET", "/vms/o1", None)["state"], "running");
    assert!(d.terminate_within(Duration::from_secs(30)).0.is_some_and(|s| s.success()));

    // The touch guest waits for its go and writes nothing: "b" is "a" byte for byte.
    let store = Store::open(dir.path().join("state/store")).expect("store");
    let eager = |name: &str| {
        let opts = RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default()));
        ram_of(&snapshot::restore(&store, name, opts).unwrap_or_else(|e| panic!("restore {name}: {e}")).0)
    };
    assert_same_ram(&eager("b"), &eager("a"), "b against a");
    for r in store.verify_all().expect("verify") {
        assert!(r.ok(), "verify: {:?}", r.errors);
    }
}

#[test]
fn a_corrupt_chunk_met_by_the_fill_during_the_wait_fails_the_snapshot_naming_it_and_commits_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    touch_snapshot_in(dir.path(), true);
    let mut d = Daemon::start(dir.path(), &[]);
    d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "o1", "guest": "memfill", "mem_mib": 16, "seed": 4, "passes": 0, "start": true})),
    );
    let (throttle, id) = snapshot_waiting_for_fill(&d, "b");
    // The fill goes on at full speed and meets the bad chunk while the snapshot waits.
    drop(throttle);
    let op = finished(&d, id);
    assert_eq!(op["state"], "failed", "a snapshot over a chunk that cannot be read: {op}");
    let err = op["error"].as_str().unwrap_or_default();
    assert!(err.contains(&format!("{FAR:#x}")) && err.contains("pc.ram"), "the error does not name the chunk: {op}");
    let snaps = d.ok("GET", "/snapshots", None).to_string();
    assert!(!snaps.contains("\"b\""), "a snapshot over a bad chunk was committed: {snaps}");
    let v = d.ok("GET", "/vms/v", None);
    eprintln!("v after the failed snapshot: state {}, exit {}", v["state"], v["exit"]);
    // The daemon and the other VM run on; another snapshot of it works.
    d.ok("POST", "/vms/o1/snapshot", Some(json!({"name": "o1s", "mode": "background"})));
    assert_eq!(d.ok("GET", "/vms/o1", None)["state"], "running");
    d.ok("DELETE", "/vms/v", None);
    assert!(d.terminate_within(Duration::from_secs(30)).0.is_some_and(|s| s.success()));
}

/// A RAM block resized while a background snapshot waits for the lazy fill (library level,
/// as hostile3_resize_wp resizes: a fw_cfg file block shrunk and grown back with other bytes,
/// and shrunk again). The snapshot commits what the VM holds at its pause, sized as then, or
/// is cancelled naming the block; the fill completes; nothing stays write-protected; the guest
/// finds all its memory intact; every committed snapshot restores byte for byte.
#[test]
fn a_block_resized_while_a_snapshot_waits_for_the_fill_commits_the_pause_or_cancels() {
    use common::at_pause::{capture_hook, AtPause};
    use hypervisor::guests::Builtin;
    use hypervisor::snapshot::{SaveMode, SaveOptions};
    use hypervisor::vm::{BootSource, BuiltinParams, FwCfgFile, Vm, VmConfig};
    const BLOCK: &str = "/rom@opt/h7/blob";
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    let guest = BootSource::Builtin {
        guest: Builtin::Memfill,
        params: BuiltinParams { seed: 8, passes: 0, ..Default::default() },
    };
    let mut cfg = VmConfig::new(64, 1, guest, Box::new(SharedOutput::default()));
    cfg.fw_cfg_files = vec![FwCfgFile { name: "opt/h7/blob".into(), data: common::noise(100_000, 1) }];
    let mut vm = Vm::new(cfg).expect("vm");
    vm.start().expect("start");
    let stop = SaveOptions { mode: SaveMode::Stop, stay_paused: true, ..Default::default() };
    std::thread::sleep(Duration::from_millis(200));
    snapshot::save(&vm, &store, "a", &stop, &|_| {}).expect("snapshot a");
    vm.stop("snapshot taken");
    drop(vm);

    let mut committed = 0;
    for (round, sizes) in
        [&[5_000usize, 128 * 1024][..], &[128 * 1024, 20_000][..], &[4096][..]].into_iter().enumerate()
    {
        let out = SharedOutput::default();
        // No chunk cache: each round's fill reads the store, as slowly as the first.
        let opts = RestoreOptions {
            fill_threads: 1,
            cache: None,
            ..RestoreOptions::new(RestoreMode::Lazy, Box::new(out.clone()))
        };
        let (vm, throttle) = std::thread::scope(|s| {
            let throttle = s.spawn(|| Throttle::threads(std::process::id(), "uffd-fill"));
            let (mut vm, _) = snapshot::restore(&store, "a", opts).expect("lazy restore");
            vm.start().expect("start");
            (vm, throttle.join().expect("throttle"))
        });
        let max = vm.registry().get(BLOCK).expect("block").max_length() as usize;
        let name = format!("b{round}");
        let seen: AtPause = Default::default();
        let (report, resized) = std::thread::scope(|s| {
            let saver = s.spawn(|| {
                let so = SaveOptions { mode: SaveMode::Background, hooks: capture_hook(&seen), ..Default::default() };
                snapshot::save(&vm, &store, &name, &so, &|_| {})
            });
            // Into the wait (the fill, throttled, needs seconds), then the resizes.
            std::thread::sleep(Duration::from_millis(100));
            let server = vm.page_server().expect("page server");
            assert!(!server.is_resident(), "round {round}: resident before the resize");
            let mut resized = Vec::new();
            for (k, &len) in sizes.iter().enumerate() {
                let len = len.min(max);
                // A block the fill has not placed yet refuses a resize; the throttled fill
                // places this small one early, but on a loaded host maybe not within the
                // sleep above: wait for it (pc.ram takes the fill seconds more).
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match vm.registry().resize(BLOCK, len as u64) {
                        Ok(()) => break,
                        Err(e) if e.to_string().contains("still filling") && Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("round {round}: resize to {len}: {e}"),
                    }
                }
                vm.registry().get(BLOCK).expect("block").write(0, &common::noise(len, 100 + k as u64)).expect("write");
                resized.push(len);
            }
            drop(throttle);
            (saver.join().expect("saver"), resized)
        });
        let server = vm.page_server().expect("page server");
        assert!(
            server.wait_resident(Duration::from_secs(120)),
            "round {round}: the fill never ended: {:?}",
            server.error()
        );
        assert_eq!(common::ram::protected_pages(&vm), 0, "round {round}: pages left write-protected");
        match report {
            Ok(r) => {
                let ram = seen.lock().expect("lock").take();
                eprintln!(
                    "round {round} (resized {resized:?}): committed, mode {:?}, fill wait {:?}",
                    r.mode, r.fill_wait
                );
                let want = ram
                    .unwrap_or_else(|| panic!("round {round}: committed in mode {:?}, not at a pause we saw", r.mode));
                let (k, last) = (resized.len() - 1, resized[resized.len() - 1]);
                let block = &want.iter().find(|(n, _)| n == BLOCK).expect("the block at the pause").1;
                assert_eq!(block.len(), last.next_multiple_of(4096), "round {round}: the block's size at the pause");
                // What was written after the last resize, not the snapshot's older bytes
                // placed over it by the fill.
                assert!(
                    block[..last] == common::noise(last, 100 + k as u64)[..],
                    "round {round}: the block lost its new bytes"
                );
                for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
                    let (vm2, _) =
                        snapshot::restore(&store, &name, RestoreOptions::new(mode, Box::new(SharedOutput::default())))
                            .unwrap_or_else(|e| panic!("round {round}: restore: {e}"));
                    assert_same_ram(&ram_of(&vm2), &want, &format!("round {round}: {mode:?} restore of {name}"));
                }
                committed += 1;
            }
            Err(e) => {
                eprintln!("round {round} (resized {resized:?}): {e}");
                assert!(e.to_string().contains(BLOCK), "round {round}: {e}");
                assert!(store.manifest(&name).is_err(), "round {round}: a failed snapshot was committed");
            }
        }
        // The guest runs on over intact memory.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            vm.control().exit_reason().is_none(),
            "round {round}: the VM stopped: {:?}",
            vm.control().exit_reason()
        );
        let text = out.text();
        assert!(common::memfill::passes(&text).iter().all(|(_, _, m)| *m == 0), "round {round}: {text}");
        let mut vm = vm;
        vm.stop("round done");
    }
    eprintln!("{committed} of 3 committed");
}

/// A client's pause, then stop, of the VM whose snapshot waits for the fill: each ends the
/// wait and is answered once the snapshot's stop-and-copy is done (before, they queued behind
/// the wait: the pause got 504 after 30 s). Each snapshot holds the memory byte for byte.
#[test]
fn a_pause_or_stop_of_the_vm_whose_snapshot_waits_ends_the_wait_and_is_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    touch_snapshot_in(dir.path(), false);
    let mut d = Daemon::start(dir.path(), &[]);
    let (throttle, id) = snapshot_waiting_for_fill(&d, "b");
    let paused = answered(&d, "POST", "/vms/v/pause", None);
    assert_eq!(paused["state"], "paused", "{paused}");
    let op = finished(&d, id);
    assert_eq!(op["state"], "done", "{op}");
    assert_eq!(op["result"]["mode"], "stop", "the pause did not end the wait: {op}");
    assert_eq!(op["result"]["fill_wait"]["resident"], false, "{op}");
    drop(throttle);
    d.ok("DELETE", "/vms/v", None);

    // Again with a stop, on a fresh restore.
    let (throttle, id) = snapshot_waiting_for_fill(&d, "c");
    let stopped = answered(&d, "POST", "/vms/v/stop", None);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let op = finished(&d, id);
    assert_eq!(op["state"], "done", "{op}");
    assert_eq!(op["result"]["mode"], "stop", "the stop did not end the wait: {op}");
    drop(throttle);
    assert!(d.terminate_within(Duration::from_secs(30)).0.is_some_and(|s| s.success()));

    let store = Store::open(dir.path().join("state/store")).expect("store");
    let eager = |name: &str| {
        let opts = RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default()));
        ram_of(&snapshot::restore(&store, name, opts).unwrap_or_else(|e| panic!("restore {name}: {e}")).0)
    };
    let a = eager("a");
    assert_same_ram(&eager("b"), &a, "b against a");
    assert_same_ram(&eager("c"), &a, "c against a");
}
