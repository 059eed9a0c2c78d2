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

/// Restores "a" lazily as "v", slows its fill down and asks for a background snapshot "b" of
/// it (async): the snapshot is waiting for the fill when this returns. The throttle and the
/// operation id.
fn snapshot_waiting_for_fill(d: &Daemon) -> (Throttle, u64) {
    // Its fill threads are slowed as they appear, during the restore request.
    let throttle = std::thread::scope(|s| {
        let restore = s.spawn(|| d.ok("POST", "/snapshots/a/restore", Some(json!({"vm": "v", "mode": "lazy"}))));
        let throttle = Throttle::threads(d.child.id(), "uffd-fill");
        restore.join().expect("restore");
        throttle
    });
    let info = d.ok("GET", "/vms/v", None);
    assert!(info.get("lazy_resident_ms").is_none(), "v was resident before its fill was slowed: {info}");
    let r = d.ok("POST", "/vms/v/snapshot", Some(json!({"name": "b", "mode": "background", "async": true})));
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
    let (throttle, id) = snapshot_waiting_for_fill(&d);

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
    let (throttle, id) = snapshot_waiting_for_fill(&d);
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
