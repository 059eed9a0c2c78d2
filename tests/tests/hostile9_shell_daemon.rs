//! Hostile checks of the pre-built VM shell pool through the daemon: rounds of concurrent
//! restores and clones (shared and private) of one shape, with restores of another shape
//! racing them and the builder; every VM runs on with its memory intact, no shell is taken
//! more often than shells were built, and with the VMs deleted the daemon holds one shell at
//! most; the daemon killed (SIGKILL) with a shell kept, and stopped (SIGTERM) right after a
//! restore asked for one, exits and starts again fine; with `--on-shutdown snapshot` a VM
//! restored on a shell is snapshotted at SIGTERM and resumes intact at the next start.

mod common;

use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::json;

/// A memfill VM of `mem` MiB snapshotted (stop) as `snap` after its first pass; VM deleted.
fn memfill_snapshot(d: &Daemon, vm: &str, snap: &str, mem: u64, seed: u64) {
    d.ok(
        "POST",
        "/vms",
        Some(json!({"name": vm, "guest": "memfill", "mem_mib": mem, "seed": seed, "passes": 0, "start": true})),
    );
    d.wait_serial(vm, "memfill pass 1 ", Duration::from_secs(60));
    d.ok("POST", &format!("/vms/{vm}/snapshot"), Some(json!({"name": snap, "mode": "stop"})));
    d.ok("DELETE", &format!("/vms/{vm}"), None);
}

fn wait_shell(d: &Daemon, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.metric("snapvisor_vm_shells_ready") == 0 {
        assert!(Instant::now() < deadline, "{what}: no shell was built");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn shells_taken_at_most_built(d: &Daemon, what: &str) -> u64 {
    let (taken, built) = (d.metric("snapvisor_vm_shells_taken_total"), d.metric("snapvisor_vm_shells_built_total"));
    assert!(taken <= built, "{what}: {taken} shells taken, {built} built: one was used twice");
    taken
}

#[test]
fn concurrent_restores_and_clones_share_no_shell_and_the_daemon_survives_kills_with_one_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    memfill_snapshot(&d, "m", "s", 16, 3);
    memfill_snapshot(&d, "n", "t", 32, 5);
    d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "first", "mode": "eager"})));
    d.ok("DELETE", "/vms/first", None);
    wait_shell(&d, "after the first restore");
    let fds = d.fds_beside_kvm();

    for round in 0..3 {
        let what = format!("round {round}");
        let mut vms: Vec<String> = Vec::new();
        std::thread::scope(|scope| {
            let d = &d;
            let mut jobs = Vec::new();
            for (i, mode) in ["eager", "lazy", "lazy", "lazy-prefetch"].into_iter().enumerate() {
                let vm = format!("r{round}-{i}");
                vms.push(vm.clone());
                jobs.push(scope.spawn(move || {
                    d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": vm, "mode": mode})));
                }));
            }
            let other = format!("o{round}");
            vms.push(other.clone());
            jobs.push(scope.spawn(move || {
                d.ok("POST", "/snapshots/t/restore", Some(json!({"vm": other, "mode": "lazy"})));
            }));
            for (prefix, memory) in [(format!("cs{round}-"), "shared"), (format!("cp{round}-"), "private")] {
                for i in 0..2 {
                    vms.push(format!("{prefix}{i}"));
                }
                jobs.push(scope.spawn(move || {
                    d.ok("POST", "/snapshots/s/clone", Some(json!({"prefix": prefix, "count": 2, "memory": memory})));
                }));
            }
            for j in jobs {
                j.join().expect("request thread");
            }
        });
        let taken = shells_taken_at_most_built(&d, &what);
        for vm in &vms {
            let info = d.ok("GET", &format!("/vms/{vm}"), None);
            assert_eq!(info["state"], "running", "{what}: {vm}: {info}");
        }
        for vm in &vms {
            d.wait_intact_passes(vm, 2, &what);
        }
        for vm in &vms {
            d.ok("DELETE", &format!("/vms/{vm}"), None);
        }
        eprintln!("{what}: {taken} shells taken so far");
    }
    // One shape restored last: its shell is kept, nothing else.
    d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "last", "mode": "lazy"})));
    d.ok("DELETE", "/vms/last", None);
    wait_shell(&d, "after the rounds");
    shells_taken_at_most_built(&d, "after the rounds");
    let now = d.fds_beside_kvm();
    now.assert_at_most_a_shell("after the rounds");
    assert!(now.other <= fds.other + 2, "descriptors beside KVM's grew over the rounds: {fds:?} -> {now:?}");

    // SIGKILL with a shell kept: the next start restores, and keeps a shell again.
    drop(d);
    let mut d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "k0", "mode": "lazy"})));
    wait_shell(&d, "after the restart");
    d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "k1", "mode": "eager"})));
    assert_eq!(d.metric("snapvisor_vm_shells_taken_total"), 1, "after the restart");
    d.wait_intact_passes("k1", 2, "after the SIGKILL");
    for vm in ["k0", "k1"] {
        d.ok("DELETE", &format!("/vms/{vm}"), None);
    }

    // SIGTERM right after a restore asked for a shell (the builder may run): a clean exit.
    d.ok("POST", "/snapshots/t/restore", Some(json!({"vm": "k2", "mode": "lazy"})));
    let (status, _) = d.terminate_within(Duration::from_secs(30));
    let status = status.expect("the daemon did not exit within 30 s of SIGTERM");
    assert!(status.success(), "SIGTERM while a shell was built: {status:?}");

    // --on-shutdown snapshot with a shell kept: the VM restored on a shell resumes intact.
    let args = ["--on-shutdown", "snapshot"];
    let mut d = Daemon::start(dir.path(), &args);
    d.ok("DELETE", "/vms/k2", None);
    d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "a0", "mode": "lazy"})));
    wait_shell(&d, "--on-shutdown snapshot");
    d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "a1", "mode": "lazy"})));
    assert_eq!(d.metric("snapvisor_vm_shells_taken_total"), 1, "--on-shutdown snapshot");
    wait_shell(&d, "--on-shutdown snapshot, a1 restored");
    d.wait_intact_passes("a1", 1, "before the shutdown");
    let (status, _) = d.terminate_within(Duration::from_secs(60));
    assert!(status.expect("no exit within 60 s of SIGTERM").success());
    let d = Daemon::start(dir.path(), &args);
    for vm in ["a0", "a1"] {
        let info = d.ok("GET", &format!("/vms/{vm}"), None);
        assert_eq!(info["state"], "running", "{vm} after the restart: {info}");
        d.wait_intact_passes(vm, 2, "resumed from its shutdown snapshot");
    }
}
