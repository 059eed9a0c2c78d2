//! No two running VMs of one daemon ever have one MAC (service/mac_claims.rs): every way a VM
//! comes to run claims its MACs atomically, and a conflict is a 409 naming the MAC, the NIC
//! and the VM that holds it, with nothing made. Each way a duplicate got through before is
//! replayed against a real daemon: (a) two clone requests at once with one MAC, many rounds;
//! (b) `POST /vms` with a running VM's MAC; (c) starting a stopped VM whose MAC a clone took;
//! (d) restoring a snapshot while its source runs. And the claim is given back when a VM is
//! stopped, deleted, fails to start, or its guest exits: the MAC can be used again.
//!
//! The daemon creates the taps (host namespace); their names carry the test process id.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::{json, Value};

/// A tap name unique to this test process and test `t`: `m<pid % 100000><t><what>` (at most
/// 15 characters; tests of one process run at once).
fn tap_of(t: char, what: &str) -> String {
    format!("m{}{t}{what}", std::process::id() % 100_000)
}

fn tap_exists(name: &str) -> bool {
    Command::new("ip").args(["link", "show", name]).output().is_ok_and(|o| o.status.success())
}

/// A NIC on `tap`, with `mac` if given, no option ROM (these guests boot without firmware).
fn nic(tap: &str, mac: Option<&str>) -> Value {
    match mac {
        Some(m) => json!({"tap": tap, "mac": m, "romfile": "none"}),
        None => json!({"tap": tap, "romfile": "none"}),
    }
}

fn define(d: &Daemon, name: &str, guest: &str, net: Value, start: bool) -> (u16, Value) {
    d.call("POST", "/vms", Some(json!({"name": name, "guest": guest, "mem_mib": 16, "net": [net], "start": start})))
}

/// Defines and starts an idle VM `name` with `net`: it must run.
fn run_idle(d: &Daemon, name: &str, net: Value) {
    let (status, v) = define(d, name, "idle", net, true);
    assert_eq!(status, 201, "starting '{name}': {v}");
}

/// Runs an idle VM `src` on `tap` with `mac` (None: the daemon's choice) and snapshots it as
/// `s`, the snapshot the clones and restores below are made from.
fn snapshot_source(d: &Daemon, tap: &str, mac: Option<&str>) {
    run_idle(d, "src", nic(tap, mac));
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
}

/// The 409 of a MAC conflict: names the MAC, the NIC and the VM holding it.
fn assert_conflict(r: (u16, Value), mac: &str, holder: &str, what: &str) {
    let (status, body) = r;
    let text = body.to_string();
    assert_eq!(status, 409, "{what}: {text}");
    assert!(text.contains(mac), "{what}: the MAC is not named: {text}");
    assert!(text.contains("net[0]"), "{what}: the NIC is not named: {text}");
    assert!(text.contains(&format!("'{holder}'")), "{what}: the holder '{holder}' is not named: {text}");
}

fn state(d: &Daemon, vm: &str) -> String {
    d.ok("GET", &format!("/vms/{vm}"), None)["state"].as_str().unwrap_or("").to_string()
}

/// The MACs of all running or paused VMs: never one twice.
fn assert_running_macs_unique(d: &Daemon, when: &str) {
    let vms = d.ok("GET", "/vms", None);
    let mut seen: Vec<(String, String)> = Vec::new();
    for v in vms.as_array().expect("list") {
        if !matches!(v["state"].as_str(), Some("running" | "paused")) {
            continue;
        }
        let name = v["name"].as_str().unwrap_or("?").to_string();
        for m in v["macs"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if let Some((_, other)) = seen.iter().find(|(mm, _)| mm == m) {
                panic!("{when}: running VMs '{other}' and '{name}' both have MAC {m}");
            }
            seen.push((m.to_string(), name.clone()));
        }
    }
}

#[test]
fn concurrent_clones_with_one_mac_never_both_run() {
    let tap = |w: &str| tap_of('A', w);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    snapshot_source(&d, &tap("s"), None);
    let rounds = 20;
    let mut conflicts = 0;
    for r in 0..rounds {
        let mac = format!("52:54:00:aa:00:{r:02x}");
        let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
            let threads: Vec<_> = ["a", "b"]
                .iter()
                .map(|side| {
                    let (d, mac) = (&d, mac.clone());
                    s.spawn(move || {
                        let body = json!({"prefix": format!("{side}{r}-"), "count": 1,
                            "network_overrides": [[{"nic": 0, "new_tap": tap(&format!("{side}{r}")), "mac": mac}]]});
                        d.call("POST", "/snapshots/s/clone", Some(body))
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().expect("request thread")).collect()
        });
        let made: Vec<&str> =
            ["a", "b"].iter().zip(&answers).filter(|(_, (st, _))| *st == 201).map(|(side, _)| *side).collect();
        assert_eq!(made.len(), 1, "round {r}: exactly one of two clones with MAC {mac} may run: {answers:?}");
        let (loser, (st, body)) = ["a", "b"].iter().zip(&answers).find(|(_, (st, _))| *st != 201).expect("a loser");
        let winner = format!("{}{r}-0", made[0]);
        assert_conflict((*st, body.clone()), &mac, &winner, &format!("round {r}"));
        // Nothing of the refused clone is left: no VM record, no tap.
        assert_eq!(d.call("GET", &format!("/vms/{loser}{r}-0"), None).0, 404, "round {r}");
        assert!(!tap_exists(&tap(&format!("{loser}{r}"))), "round {r}: the refused clone's tap exists");
        assert_running_macs_unique(&d, &format!("round {r}"));
        conflicts += 1;
        d.ok("DELETE", &format!("/vms/{winner}"), None);
    }
    assert_eq!(conflicts, rounds);
    // Deleting the winners gave their MACs back: a clone with the first round's MAC runs.
    let again = json!({"prefix": "z", "count": 1,
        "network_overrides": [[{"nic": 0, "new_tap": tap("z"), "mac": "52:54:00:aa:00:00"}]]});
    d.ok("POST", "/snapshots/s/clone", Some(again));
}

#[test]
fn a_new_vm_with_a_running_vms_mac_is_refused_and_runs_once_that_vm_stops() {
    let tap = |w: &str| tap_of('B', w);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let mac = "52:54:00:bb:00:01";
    run_idle(&d, "a", nic(&tap("a"), Some(mac)));
    // Defined and started in one request: refused, nothing defined, no tap.
    assert_conflict(define(&d, "b", "idle", nic(&tap("b"), Some(mac)), true), mac, "a", "POST /vms start");
    assert_eq!(d.call("GET", "/vms/b", None).0, 404, "a refused VM is not left defined");
    assert!(!d.state.join("vms/b.json").exists(), "a refused VM's definition is not kept");
    assert!(!tap_exists(&tap("b")), "a refused VM's tap was made");
    // Defined only: allowed (a stopped VM sends no frames); its start is refused while 'a' runs.
    let (st, v) = define(&d, "b", "idle", nic(&tap("b"), Some(mac)), false);
    assert_eq!(st, 201, "defining a VM with a running VM's MAC: {v}");
    assert_conflict(d.call("POST", "/vms/b/start", None), mac, "a", "start b");
    assert_eq!(state(&d, "b"), "created");
    assert!(!tap_exists(&tap("b")), "a refused start made the tap");
    // Released by a stop: 'b' runs, and now 'a' is the one refused.
    d.ok("POST", "/vms/a/stop", None);
    assert_eq!(d.ok("POST", "/vms/b/start", None)["state"], "running");
    assert_conflict(d.call("POST", "/vms/a/start", None), mac, "b", "start a after b took the MAC");
    assert_running_macs_unique(&d, "end");
}

#[test]
fn a_stopped_vm_whose_mac_a_clone_took_cannot_start_until_the_clone_is_deleted() {
    let tap = |w: &str| tap_of('C', w);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let mac = "52:54:00:cc:00:01";
    run_idle(&d, "p", nic(&tap("p"), Some(mac)));
    d.ok("POST", "/vms/p/stop", None);
    snapshot_source(&d, &tap("s"), None);
    // 'p' is stopped: its MAC is free on the wire, a clone may take it.
    let c = d.ok(
        "POST",
        "/snapshots/s/clone",
        Some(json!({"prefix": "c", "count": 1, "network_overrides": [[{"nic": 0, "new_tap": tap("c"), "mac": mac}]]})),
    );
    assert_eq!(c[0]["macs"][0], mac, "{c}");
    assert_conflict(d.call("POST", "/vms/p/start", None), mac, "c0", "start p");
    assert_eq!(state(&d, "p"), "stopped");
    assert_running_macs_unique(&d, "after the refused start");
    // Released by the delete.
    d.ok("DELETE", "/vms/c0", None);
    assert_eq!(d.ok("POST", "/vms/p/start", None)["macs"][0], mac);
}

#[test]
fn restoring_a_snapshot_while_its_source_runs_is_refused_naming_the_source() {
    let tap = |w: &str| tap_of('D', w);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let mac = "52:54:00:dd:00:01";
    snapshot_source(&d, &tap("s"), Some(mac));
    // On another tap (no MAC override: the restore keeps the snapshot's MAC), and as saved.
    let moved = json!({"vm": "r", "network_overrides": [{"nic": 0, "new_tap": tap("r")}]});
    assert_conflict(d.call("POST", "/snapshots/s/restore", Some(moved.clone())), mac, "src", "restore on a new tap");
    assert_eq!(d.call("GET", "/vms/r", None).0, 404, "a refused restore left a VM");
    assert!(!tap_exists(&tap("r")), "a refused restore made its tap");
    assert_conflict(d.call("POST", "/snapshots/s/restore", Some(json!({"vm": "r"}))), mac, "src", "restore as saved");
    assert_eq!(d.call("GET", "/vms/r", None).0, 404);
    assert_running_macs_unique(&d, "after the refused restores");
    // Once the source stops, the restore runs with the MAC, and the source cannot start.
    d.ok("POST", "/vms/src/stop", None);
    assert_eq!(d.ok("POST", "/snapshots/s/restore", Some(moved))["macs"][0], mac);
    assert_conflict(d.call("POST", "/vms/src/start", None), mac, "r", "start the source again");
}

#[test]
fn a_failed_start_and_a_guest_exit_give_the_mac_back() {
    let tap = |w: &str| tap_of('E', w);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let (m1, m2) = ("52:54:00:ee:00:01", "52:54:00:ee:00:02");
    run_idle(&d, "a", nic(&tap("a"), Some(m1)));
    // 'b' claims m2, then fails to start: its tap is 'a''s, in use.
    let (st, v) = define(&d, "b", "idle", nic(&tap("a"), Some(m2)), false);
    assert_eq!(st, 201, "{v}");
    let (st, v) = d.call("POST", "/vms/b/start", None);
    assert!(st >= 400, "a start on a busy tap: {st} {v}");
    // m2 is free again: 'c' runs with it, and then holds it.
    assert_eq!(define(&d, "c", "idle", nic(&tap("c"), Some(m2)), true).0, 201, "m2 after the failed start");
    assert_conflict(define(&d, "e", "idle", nic(&tap("e"), Some(m2)), true), m2, "c", "m2 held by c");
    // A guest that exits gives its MAC back once it has ended.
    let m3 = "52:54:00:ee:00:03";
    assert_eq!(define(&d, "h", "hello", nic(&tap("h"), Some(m3)), true).0, 201);
    let deadline = Instant::now() + Duration::from_secs(60);
    while state(&d, "h") != "stopped" {
        assert!(Instant::now() < deadline, "the hello guest never ended: {}", d.ok("GET", "/vms/h", None));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(define(&d, "f", "idle", nic(&tap("f"), Some(m3)), true).0, 201, "m3 after the guest exit");
    assert_conflict(define(&d, "g", "idle", nic(&tap("g"), Some(m3)), true), m3, "f", "m3 held by f");
    assert_running_macs_unique(&d, "end");
}

#[test]
fn one_new_tap_for_two_clones_is_refused_up_front_naming_both() {
    let tap = |w: &str| tap_of('F', w);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    snapshot_source(&d, &tap("s"), None);
    let t = tap("t");
    let body = json!({"prefix": "x", "count": 2,
        "network_overrides": [[{"nic": 0, "new_tap": t}], [{"nic": 0, "new_tap": t}]]});
    let (st, v) = d.call("POST", "/snapshots/s/clone", Some(body));
    let text = v.to_string();
    assert_eq!(st, 400, "{text}");
    assert!(text.contains(&format!("new_tap '{t}' is given to clones 'x0' and 'x1'")), "{text}");
    assert!(text.contains("nothing was cloned"), "{text}");
    for c in ["x0", "x1"] {
        assert_eq!(d.call("GET", &format!("/vms/{c}"), None).0, 404, "{c} was made");
    }
    assert!(!tap_exists(&t), "the tap was made");
}
