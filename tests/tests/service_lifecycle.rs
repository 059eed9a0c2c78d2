//! The daemon's VM and operation lifecycle, against a real daemon: a stopped VM gives back its
//! guest memory and its shared base and still starts again; a background snapshot operation
//! shows real progress while it copies; a snapshot that commits while the daemon stops on
//! SIGTERM is reported to its client as it ended (success and the snapshot exists, or a
//! failure and it does not).

mod common;

use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::{json, Value};

fn rss_mib(d: &Daemon) -> u64 {
    d.proc_status("VmRSS:") / 1024
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stopped_vm_releases_its_memory_and_its_shared_base_and_starts_again() {
    const MEM: u64 = 512;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &["--cache-idle-secs", "1"]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": MEM, "start": true})));
    d.wait_serial("m", "memfill pass 0 ", Duration::from_secs(120));
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "ms"})));
    let c = d.ok("POST", "/snapshots/ms/clone", Some(json!({"prefix": "c", "count": 1})));
    assert_eq!(c[0]["state"], "running", "{c}");
    wait_for("the clone resident", Duration::from_secs(120), || {
        !d.ok("GET", "/vms/c0", None)["lazy_resident_ms"].is_null()
    });
    let (rss_running, fds_running) = (rss_mib(&d), d.base_memfds().0);
    assert!(fds_running >= 1, "the clone maps a shared base: {fds_running} memfds");
    assert!(rss_running > MEM, "a {MEM} MiB memfill and its clone: daemon RSS {rss_running} MiB");

    assert_eq!(d.ok("POST", "/vms/m/stop", None)["state"], "stopped");
    assert_eq!(d.ok("POST", "/vms/c0/stop", None)["state"], "stopped");
    // Both guests' memory goes (the VM's own, and the clone's base with its last clone).
    let mut rss_stopped = rss_running;
    let released = Instant::now() + Duration::from_secs(30);
    while Instant::now() < released {
        rss_stopped = rss_mib(&d);
        if rss_stopped + MEM <= rss_running && d.base_memfds().0 == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "daemon RSS: {rss_running} MiB with both VMs running ({fds_running} base memfds), {rss_stopped} MiB stopped"
    );
    assert!(
        rss_stopped + MEM <= rss_running,
        "stopped VMs keep their memory: daemon RSS {rss_running} MiB running, {rss_stopped} MiB stopped"
    );
    assert_eq!(d.base_memfds().0, 0, "a stopped clone still holds its shared base");
    let info = d.ok("GET", "/vms/c0", None);
    assert_eq!(info["state"], "stopped", "{info}");
    assert!(!info["exit"].is_null(), "a stopped VM still shows how it ended: {info}");

    // A stopped clone starts again: a fresh boot of its guest from its definition. The serial
    // log keeps what the clone printed before it stopped, so only what follows counts.
    let before = serial_text(&d, "c0").len();
    assert_eq!(d.ok("POST", "/vms/c0/start", None)["state"], "running");
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = loop {
        let text = serial_text(&d, "c0");
        let new = text.get(before..).unwrap_or_default().to_string();
        // (the whole line: the serial log may end mid-line)
        if new.contains("mismatches 0\n") || Instant::now() > deadline {
            break new;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(out.contains("memfill pass 0 ") && out.contains("mismatches 0\n"), "after the start: {out}");
    assert_eq!(d.ok("POST", "/vms/m/start", None)["state"], "running");
}

#[test]
fn a_snapshot_operation_reports_the_chunks_copied_while_it_runs() {
    const MEM: u64 = 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": MEM, "start": true})));
    d.wait_serial("m", "memfill pass 0 ", Duration::from_secs(120));
    for mode in ["background", "stop"] {
        let (st, v) = d.call("POST", "/vms/m/snapshot", Some(json!({"name": mode, "mode": mode, "async": true})));
        assert_eq!(st, 202, "{v}");
        let id = v["operation"].as_u64().expect("operation id");
        let mut while_running: Vec<u64> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        let last = loop {
            let op = d.ok("GET", &format!("/operations/{id}"), None);
            if op["state"] != "running" {
                break op;
            }
            if let Some(n) = op["progress"]["chunks_copied"].as_u64() {
                while_running.push(n);
            }
            assert!(Instant::now() < deadline, "{mode}: the snapshot never finished: {op}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(last["state"], "done", "{mode}: {last}");
        assert!(
            while_running.iter().any(|&n| n > 0),
            "{mode}: no progress seen while the snapshot ran (chunks_copied: {while_running:?})"
        );
        assert!(while_running.windows(2).all(|w| w[0] <= w[1]), "{mode}: progress went back: {while_running:?}");
        let total = last["progress"]["chunks_copied"].as_u64().unwrap_or(0);
        eprintln!(
            "{mode}: {} polls while running, chunks_copied {:?} .. {:?}, total {total}",
            while_running.len(),
            while_running.first(),
            while_running.last()
        );
        assert!(total > 0, "{mode}: the finished operation reports no chunks copied: {last}");
        assert!(while_running.iter().all(|&n| n <= total), "{mode}: {while_running:?} beyond the total {total}");
    }
}

/// The keys of an operation's progress, sorted (none when it is not an object).
fn progress_keys(op: &Value) -> Vec<String> {
    let mut keys: Vec<String> = op["progress"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    keys.sort();
    keys
}

/// A snapshot operation's progress has every key from the `202` on and the same keys at every
/// poll, and a finished snapshot's counts add up: `chunks_copied + chunks_inherited ==
/// chunks_total`, an incremental one's chunks taken from its parent being `chunks_inherited`.
/// (Before: the progress was null until the copy started, then its keys changed between the
/// copy and the end, and an incremental snapshot ended with `chunks_copied` below the total.)
#[test]
fn snapshot_progress_keeps_one_shape_and_a_finished_incremental_snapshot_adds_up() {
    const KEYS: [&str; 6] =
        ["bytes_copied", "chunks_copied", "chunks_inherited", "chunks_total", "dirty_chunks", "round"];
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "i", "guest": "idle", "mem_mib": 256, "start": true})));
    d.wait_serial("i", "idle guest ready", Duration::from_secs(60));
    for (snap, mode, incremental) in
        [("full", "background", false), ("inc", "background", true), ("inc-stop", "stop", true)]
    {
        let (st, v) = d.call("POST", "/vms/i/snapshot", Some(json!({"name": snap, "mode": mode, "async": true})));
        assert_eq!(st, 202, "{v}");
        let id = v["operation"].as_u64().expect("operation id");
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut polls = 0;
        let last = loop {
            let op = d.ok("GET", &format!("/operations/{id}"), None);
            polls += 1;
            assert_eq!(progress_keys(&op), KEYS, "{snap}: poll {polls}: {op}");
            if op["state"] != "running" {
                break op;
            }
            assert!(Instant::now() < deadline, "{snap}: the snapshot never finished: {op}");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(last["state"], "done", "{snap}: {last}");
        assert_eq!(last["result"]["incremental"], incremental, "{snap}: {last}");
        let p = &last["progress"];
        let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{snap}: {k} is no count: {last}"));
        assert!(n("chunks_total") >= 256 * 16, "{snap}: 256 MiB of RAM in 64 KiB chunks at least: {last}");
        assert_eq!(n("chunks_copied") + n("chunks_inherited"), n("chunks_total"), "{snap}: {last}");
        if incremental {
            assert!(
                n("chunks_inherited") > n("chunks_total") / 2,
                "{snap}: an idle guest's chunks are inherited: {last}"
            );
        } else {
            assert_eq!(n("chunks_inherited"), 0, "{snap}: {last}");
        }
        eprintln!("{snap}: {polls} polls, progress at the end {p}");
    }
}

/// DELETE of a VM whose background snapshot is copying cancels the snapshot and returns: the
/// operation fails saying so, nothing of the snapshot is in the store, and the store stays
/// intact. The daemon's test hook holds the copy until the snapshot is cancelled (or for
/// 60 s), so the DELETE can only return within this test's 30 s by cancelling it. (Before,
/// DELETE waited for the whole snapshot, which then committed.)
#[test]
fn deleting_a_vm_cancels_its_background_snapshot_and_keeps_the_store_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &["--test-hold-snapshot-copy"]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 64, "start": true})));
    d.wait_serial("m", "memfill pass 0 ", Duration::from_secs(120));
    // A snapshot committed before: the cancelled one must leave it as it was.
    let (st, v) = d.call("POST", "/vms/m/snapshot", Some(json!({"name": "kept", "mode": "stop"})));
    assert_eq!(st, 201, "{v}");
    let (st, v) = d.call("POST", "/vms/m/snapshot", Some(json!({"name": "held", "mode": "background", "async": true})));
    assert_eq!(st, 202, "{v}");
    let op = format!("/operations/{}", v["operation"].as_u64().expect("operation id"));
    wait_for("the snapshot to start", Duration::from_secs(60), || {
        d.ok("GET", &op, None)["progress"]["chunks_total"].as_u64().is_some_and(|n| n > 0)
    });
    let (st, v) =
        d.call_within("DELETE", "/vms/m", None, Duration::from_secs(30)).expect("DELETE answered within 30 s");
    assert_eq!(st, 204, "{v}");
    assert_eq!(d.call("GET", "/vms/m", None).0, 404);
    let mut last = Value::Null;
    wait_for("the operation to end", Duration::from_secs(30), || {
        last = d.ok("GET", &op, None);
        last["state"] != "running"
    });
    assert_eq!(last["state"], "failed", "{last}");
    assert!(last["error"].as_str().is_some_and(|e| e.contains("cancelled")), "{last}");
    assert_eq!(d.ok("GET", "/snapshots", None), json!(["kept"]));
    let (status, _) = d.terminate_within(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let store = storage::Store::open_read_only(d.state.join("store")).expect("open the store");
    assert_eq!(store.list().expect("list"), ["kept"]);
    let reports = store.verify_all().expect("verify");
    assert!(reports.iter().all(|r| r.ok()), "{reports:?}");
    let index = store.check_index().expect("check index");
    assert!(index.ok(), "{index:?}");
}

/// The `seed 0x...` of memfill's first `pass 0` line in `text`, once it is there.
fn pass0_seed(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("memfill pass 0 ") && l.contains(" checksum "))?;
    line.split_whitespace().skip_while(|w| *w != "seed").nth(1).map(str::to_string)
}

/// A VM restored from a snapshot of a memfill VM, stopped and started again, boots memfill with
/// the seed it was defined with: the snapshot records the guest's parameters and the restored
/// VM's definition takes them. (Before, the restored definition had seed 0, so the fresh boot
/// filled memory with another pattern.)
#[test]
fn a_restored_memfill_vm_started_again_keeps_its_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let def = json!({"name": "m", "guest": "memfill", "mem_mib": 32, "seed": 7, "passes": 0, "start": true});
    d.ok("POST", "/vms", Some(def));
    let mut seed = None;
    wait_for("memfill's first pass", Duration::from_secs(120), || {
        seed = pass0_seed(&serial_text(&d, "m"));
        seed.is_some()
    });
    let seed = seed.expect("seed");
    let (st, v) = d.call("POST", "/vms/m/snapshot", Some(json!({"name": "s", "mode": "stop"})));
    assert_eq!(st, 201, "{v}");
    let r = d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "r"})));
    assert_eq!((r["seed"].as_u64(), r["passes"].as_u64()), (Some(7), Some(0)), "the restored definition: {r}");
    d.ok("POST", "/vms/r/stop", None);
    let before = serial_text(&d, "r").len();
    assert_eq!(d.ok("POST", "/vms/r/start", None)["state"], "running");
    let mut again = None;
    wait_for("the fresh boot's first pass", Duration::from_secs(120), || {
        again = pass0_seed(serial_text(&d, "r").get(before..).unwrap_or_default());
        again.is_some()
    });
    assert_eq!(again.as_deref(), Some(seed.as_str()), "the fresh boot of the restored VM ran with another seed");
}

#[test]
fn a_snapshot_committed_while_the_daemon_stops_is_reported_as_it_ended() {
    // Big enough that the copy outlasts the connections' 2 s grace at shutdown.
    const MEM: u64 = 2048;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": MEM, "start": true})));
    d.wait_serial("m", "memfill pass 0 ", Duration::from_secs(120));
    let t0 = Instant::now();
    let answer = std::thread::scope(|s| {
        let d = &d;
        let request = s.spawn(move || {
            d.call_within("POST", "/vms/m/snapshot", Some(&json!({"name": "t"})), Duration::from_secs(120))
        });
        // SIGTERM while the snapshot is being taken.
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
        request.join().expect("request thread")
    });
    let answered_after = t0.elapsed();
    let (status, _) = d.terminate_within(Duration::from_secs(60));
    assert!(status.is_some(), "the daemon did not exit");
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    let exists = listed(&d).contains(&"t".to_string());
    let succeeded = matches!(&answer, Ok((201, _)));
    eprintln!("answer after {answered_after:?}: {answer:?}; snapshot exists afterwards: {exists}");
    assert_eq!(
        succeeded, exists,
        "the client was told {answer:?} (after {answered_after:?}), but the snapshot exists afterwards: {exists}"
    );
    // The daemon had its 30 s to stop: the snapshot finished in them and the client heard so.
    assert!(succeeded, "{answer:?}");
}

fn listed(d: &Daemon) -> Vec<String> {
    let v: Value = d.ok("GET", "/snapshots", None);
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(String::from)).collect()
}

/// A VM's serial log as the API returns it.
fn serial_text(d: &Daemon, vm: &str) -> String {
    let (_, v) = d.call("GET", &format!("/vms/{vm}/serial"), None);
    v.as_str().map(String::from).unwrap_or_else(|| v.to_string())
}

/// A client that hangs up while its restore runs does not cut the restore short: the restore
/// keeps its share of the memory budget until its VM is registered (a hostile finding: the
/// reservation and MAC claims went with the dropped request while the blocking restore went
/// on, so clients that timed out pushed the daemon past its budget, and the VM was dropped).
#[test]
fn a_restore_whose_client_hangs_up_completes_and_stays_in_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = budget_and_a_512_mib_snapshot(dir.path());
    // The client gives up long before an eager restore of 512 MiB is done.
    let r = d.call_within(
        "POST",
        "/snapshots/ms/restore",
        Some(&json!({"vm": "r1", "mode": "eager"})),
        Duration::from_millis(50),
    );
    assert!(r.is_err(), "an eager restore of 512 MiB answered within 50 ms: {r:?}");
    // Its memory is still held: a second restore does not fit the budget.
    let (code, body) = d.call("POST", "/snapshots/ms/restore", Some(json!({"vm": "r2", "mode": "lazy"})));
    assert_eq!(code, 409, "a second 512 MiB restore within a 700 MiB budget: {body}");
    assert!(body.to_string().contains("--max-guest-memory"), "{body}");
    // And the first restore completed: its VM is registered and runs.
    wait_for("the abandoned restore's VM", Duration::from_secs(120), || d.call("GET", "/vms/r1", None).0 == 200);
    assert_eq!(d.ok("GET", "/vms/r1", None)["state"], "running");
}

/// A clone request whose client hangs up is still all or nothing: a clone that failed (here,
/// over the memory budget) makes the request remove the clones it made, as when the client
/// waits (a hostile finding: with the request gone, the made clones stayed and the failure was
/// never rolled back).
#[test]
fn a_clone_request_whose_client_hangs_up_is_still_all_or_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = budget_and_a_512_mib_snapshot(dir.path());
    // Two clones of 512 MiB cannot both fit 700 MiB: one fails, so none may stay.
    let r = d.call_within(
        "POST",
        "/snapshots/ms/clone",
        Some(&json!({"prefix": "k", "count": 2, "mode": "eager"})),
        Duration::from_millis(50),
    );
    assert!(r.is_err(), "two eager clones of 512 MiB answered within 50 ms: {r:?}");
    // Once the request has rolled back, the budget is free again for one 512 MiB VM.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, body) = d.call("POST", "/snapshots/ms/restore", Some(json!({"vm": "r", "mode": "lazy"})));
        if code == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "the cut-short clone request kept its memory: {code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let vms = d.ok("GET", "/vms", None);
    let names: Vec<&str> = vms.as_array().expect("a list").iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["r"], "clones of a failed request stayed: {vms}");
}

/// A daemon with a 700 MiB guest-memory budget, no VM, and `ms`: a stop-mode snapshot of a
/// 512 MiB memfill guest (so one restore of it fits the budget and two do not).
fn budget_and_a_512_mib_snapshot(dir: &std::path::Path) -> Daemon {
    let d = Daemon::start(dir, &["--max-guest-memory", "700"]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 512, "start": true})));
    d.wait_serial("m", "memfill pass 0 ", Duration::from_secs(120));
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "ms", "mode": "stop"})));
    let (code, body) = d.call("DELETE", "/vms/m", None);
    assert!(code < 300, "{code} {body}");
    d
}
