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
        d.ok("POST", "/vms", Some(json!({"name": "src", "guest": "memfill", "mem_mib": 128, "seed": 5, "start": true})));
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
