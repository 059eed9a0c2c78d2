//! hostile4: name claims under shutdown and lost clients.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use serde_json::{json, Value};

fn states(d: &Daemon) -> Vec<(String, String)> {
    let vms = d.ok("GET", "/vms", None);
    let mut v: Vec<(String, String)> = vms
        .as_array()
        .expect("a list of VMs")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or("?").to_string(), v["state"].as_str().unwrap_or("?").to_string()))
        .collect();
    v.sort();
    v
}

/// SIGTERM with `--on-shutdown snapshot` while a clone request is restoring its VMs: every VM
/// the daemon knows at the next start comes back running (resumed from its shutdown snapshot);
/// none is left defined but stopped, its guest's state lost, and none the client was told was
/// made has vanished.
#[test]
fn sigterm_during_a_clone_leaves_no_clone_stopped_with_its_state_lost() {
    for round in 0..3u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = ["--on-shutdown", "snapshot", "--shutdown-timeout", "60"];
        let mut d = Daemon::start(dir.path(), &args);
        d.ok(
            "POST",
            "/vms",
            Some(json!({"name": "src", "guest": "memfill", "mem_mib": 128, "seed": 5, "start": true})),
        );
        let out = d.wait_serial("src", "memfill pass 0 ", Duration::from_secs(120));
        assert!(out.contains("memfill pass 0 "), "{out}");
        d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
        let clone = std::thread::scope(|s| {
            let c = s.spawn(|| {
                d.call_within(
                    "POST",
                    "/snapshots/s/clone",
                    Some(&json!({"prefix": "c-", "count": 6, "mode": "eager"})),
                    Duration::from_secs(120),
                )
            });
            std::thread::sleep(Duration::from_millis(30 + 40 * round));
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
            c.join().expect("the clone's thread")
        });
        let (status, took) = d.terminate_within(Duration::from_secs(90));
        assert!(status.is_some_and(|s| s.success()), "round {round}: exit {status:?} after {took:?}");
        drop(d);
        let d = Daemon::start(dir.path(), &[]);
        let now = states(&d);
        let answered: Option<u16> = clone.as_ref().ok().map(|(st, _)| *st);
        let answer: Option<Value> = clone.as_ref().ok().map(|(_, v)| v.clone());
        eprintln!("round {round}: clone answered {answered:?} {answer:?}; after restart {now:?}");
        for (name, state) in &now {
            assert_eq!(
                state, "running",
                "round {round}: VM '{name}' existed at SIGTERM with --on-shutdown snapshot, yet comes back \
                 {state} (its guest's state lost); clone answered {answered:?}; all: {now:?}"
            );
        }
        if let Some(st) = answered {
            if (200..300).contains(&st) {
                let clones = now.iter().filter(|(n, _)| n.starts_with("c-")).count();
                assert_eq!(clones, 6, "round {round}: the clone was answered {st}, yet {now:?}");
            }
        }
    }
}

fn threads(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", d.child.id())).map(|t| t.count()).unwrap_or(0)
}

/// Many concurrent restores (eager, lazy, lazy-prefetch; some of a missing snapshot) and
/// their VMs deleted again, round after round: the daemon's threads and fds come back to
/// where they were, the names are usable again, and the snapshot is pinned by no one (its
/// delete succeeds).
#[test]
fn concurrent_restores_leave_no_threads_fds_claims_or_pins_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "src", "guest": "memfill", "mem_mib": 32, "seed": 9, "start": true})));
    let out = d.wait_serial("src", "memfill pass 0 ", Duration::from_secs(120));
    assert!(out.contains("memfill pass 0 "), "{out}");
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
    d.ok("DELETE", "/vms/src", None);
    let modes = ["eager", "lazy", "lazy-prefetch"];
    let round = |r: usize| {
        let results: Vec<(String, u16, Value)> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..9)
                .map(|i| {
                    let d = &d;
                    s.spawn(move || {
                        let (snap, vm) =
                            if i == 8 { ("missing", "x".to_string()) } else { ("s", format!("v{}", i % 4)) };
                        let body = json!({"vm": vm, "mode": modes[(i + r) % 3]});
                        let (st, v) = d.call("POST", &format!("/snapshots/{snap}/restore"), Some(body));
                        (vm, st, v)
                    })
                })
                .collect();
            calls.into_iter().map(|c| c.join().expect("a request thread")).collect()
        });
        for v in 0..4 {
            let name = format!("v{v}");
            let wins: Vec<_> = results.iter().filter(|(n, st, _)| *n == name && *st == 201).collect();
            assert_eq!(wins.len(), 1, "round {r}: exactly one restore of {name} wins: {results:?}");
            for (_, st, e) in results.iter().filter(|(n, st, _)| *n == name && *st != 201) {
                assert_eq!(*st, 409, "round {r}: {e}");
            }
        }
        assert!(results.iter().any(|(n, st, _)| n == "x" && *st == 404), "{results:?}");
        for v in 0..4 {
            d.ok("DELETE", &format!("/vms/v{v}"), None);
        }
    };
    round(0);
    std::thread::sleep(Duration::from_millis(300));
    // Descriptors other than KVM's; KVM's are bounded apart (one pre-built VM shell at most).
    let (t0, f0) = (threads(&d), d.fds_beside_kvm().other);
    for r in 1..13 {
        round(r);
    }
    // Helper threads end on their own (not joined): give them a moment.
    let mut t1 = threads(&d);
    let mut f1 = d.fds_beside_kvm().other;
    for _ in 0..100 {
        if t1 <= t0 && f1 <= f0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        (t1, f1) = (threads(&d), d.fds_beside_kvm().other);
    }
    assert!(t1 <= t0 + 2, "threads {t0} after one round, {t1} after 13");
    assert!(f1 <= f0, "fds {f0} after one round, {f1} after 13");
    d.fds_beside_kvm().assert_at_most_a_shell("after 13 rounds");
    let (st, v) = d.call("DELETE", "/snapshots/s", None);
    assert_eq!(st, 204, "no VM is left, yet the snapshot cannot be deleted: {v}");
    d.ok("POST", "/vms", Some(json!({"name": "v0", "guest": "idle", "mem_mib": 16, "start": true})));
}

/// A clone that fails part-way (the memory budget holds only some of its VMs), in the
/// foreground and in the background, with a restore of one of its names racing it: exactly
/// what one request made stays, the failed clone leaves nothing, and every name is usable
/// again afterwards.
#[test]
fn a_clone_failing_part_way_rolls_back_and_frees_its_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &["--max-guest-memory", "80M"]);
    d.ok("POST", "/vms", Some(json!({"name": "src", "guest": "idle", "mem_mib": 16, "start": true})));
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
    d.ok("DELETE", "/vms/src", None);
    for round in 0..6 {
        let background = round % 2 == 1;
        let body = json!({"prefix": "c-", "count": 8, "mode": if round % 3 == 0 { "eager" } else { "lazy" }, "async": background});
        let (clone, restore) = std::thread::scope(|s| {
            let c = s.spawn(|| d.call("POST", "/snapshots/s/clone", Some(body.clone())));
            let r = s.spawn(|| {
                std::thread::sleep(Duration::from_millis(round * 3));
                d.call("POST", "/snapshots/s/restore", Some(json!({"vm": "c-2", "mode": "lazy"})))
            });
            (c.join().expect("clone"), r.join().expect("restore"))
        });
        let clone = if background && clone.0 == 202 {
            let id = clone.1["operation"].clone();
            loop {
                let op = d.ok("GET", &format!("/operations/{id}"), None);
                if op["state"] != "running" {
                    break (if op["state"] == "done" { 201 } else { 409 }, op);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            clone
        };
        assert_eq!(clone.0, 409, "round {round}: 8 clones of 16 MiB cannot fit 80 MiB: {clone:?}");
        let why = clone.1.to_string();
        assert!(
            why.contains("made and removed again") || (restore.0 == 201 && why.contains("nothing was cloned")),
            "round {round}: it failed part-way, or at once if the restore had claimed c-2: {clone:?} {restore:?}"
        );
        let now = states(&d);
        let want: Vec<(String, String)> =
            if restore.0 == 201 { vec![("c-2".into(), "running".into())] } else { vec![] };
        assert_eq!(now, want, "round {round}: clone {clone:?}, restore {restore:?}");
        if restore.0 != 201 {
            assert_eq!(restore.0, 409, "round {round}: {restore:?}");
        }
        for (n, _) in &now {
            d.ok("DELETE", &format!("/vms/{n}"), None);
        }
        // Every name is free again.
        let made = d.ok("POST", "/snapshots/s/clone", Some(json!({"prefix": "c-", "count": 4, "mode": "lazy"})));
        assert_eq!(made.as_array().map(Vec::len), Some(4), "round {round}: {made}");
        for i in 0..4 {
            d.ok("DELETE", &format!("/vms/c-{i}"), None);
        }
    }
}

/// A VM deleted while the request making it is still saving its definition: the delete
/// answered 204, so the VM must not come back at the next daemon start (its definition
/// written after the delete removed it).
#[test]
fn a_vm_deleted_while_being_made_does_not_come_back_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "src", "guest": "idle", "mem_mib": 16, "start": true})));
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
    d.ok("DELETE", "/vms/src", None);
    let mut deleted = Vec::new();
    for round in 0..40 {
        let vm = format!("z{round}");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (made, del) = std::thread::scope(|s| {
            let m = s.spawn(|| {
                let r = if round % 2 == 0 {
                    d.call("POST", "/snapshots/s/restore", Some(json!({"vm": vm, "mode": "lazy"})))
                } else {
                    d.call("POST", "/vms", Some(json!({"name": vm, "guest": "idle", "mem_mib": 16, "start": false})))
                };
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                r
            });
            let x = s.spawn(|| loop {
                let (st, _) = d.call("DELETE", &format!("/vms/{vm}"), None);
                if st == 204 || stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break st;
                }
            });
            (m.join().expect("make"), x.join().expect("delete"))
        });
        if del == 204 {
            deleted.push((vm.clone(), made.0));
        } else {
            // The make won outright: delete it now, after its request answered.
            assert!((200..300).contains(&made.0), "{vm}: {made:?}");
            d.ok("DELETE", &format!("/vms/{vm}"), None);
            deleted.push((vm.clone(), made.0));
        }
        let listed = states(&d);
        assert!(!listed.iter().any(|(n, _)| *n == vm), "{vm} deleted (204) yet listed: {listed:?}");
    }
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    let back = states(&d);
    let early: Vec<_> = deleted.iter().filter(|(n, _)| back.iter().any(|(b, _)| b == n)).collect();
    assert!(early.is_empty(), "VMs deleted with 204 came back at the next start: {early:?} (all: {back:?})");
}

/// A VM deleted while a create of the same name retries: once the create wins (201), the
/// new VM's definition survives the delete that ran before it (the delete removed the old
/// definition only), so the VM is there at the next start.
#[test]
fn a_vm_made_again_right_after_a_delete_keeps_its_definition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let mut made = Vec::new();
    for round in 0..30 {
        let vm = format!("y{round}");
        let body = json!({"name": vm, "guest": "idle", "mem_mib": 16, "start": false});
        d.ok("POST", "/vms", Some(body.clone()));
        let st = std::thread::scope(|s| {
            let del = s.spawn(|| d.call("DELETE", &format!("/vms/{vm}"), None));
            let again = s.spawn(|| loop {
                let (st, v) = d.call("POST", "/vms", Some(body.clone()));
                if st == 201 {
                    break st;
                }
                assert_eq!(st, 409, "{vm}: {v}");
            });
            assert_eq!(del.join().expect("delete").0, 204);
            again.join().expect("create")
        });
        assert_eq!(st, 201);
        made.push(vm);
    }
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    let back: Vec<String> = states(&d).into_iter().map(|(n, _)| n).collect();
    let lost: Vec<&String> = made.iter().filter(|n| !back.contains(n)).collect();
    assert!(lost.is_empty(), "VMs made (201) after their name's delete are gone at the next start: {lost:?}");
}
