//! Damaged VM definitions across daemon restarts (hostile10): a definition that names a
//! shutdown snapshot and is found damaged keeps that snapshot, so repairing the file as the
//! daemon's error says brings the VM back with its guest's state; the other VM resumes as if
//! nothing were wrong.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use serde_json::json;

fn stop(mut d: Daemon) {
    let (status, _) = d.terminate_within(Duration::from_secs(120));
    assert!(status.is_some_and(|s| s.success()), "the daemon did not stop cleanly: {status:?}");
}

#[test]
fn a_repaired_definition_resumes_from_its_kept_shutdown_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--on-shutdown", "snapshot"];
    let d = Daemon::start(dir.path(), &args);
    for (name, seed) in [("m", 5), ("other", 6)] {
        d.ok(
            "POST",
            "/vms",
            Some(json!({"name": name, "guest": "memfill", "mem_mib": 64, "seed": seed, "start": true})),
        );
    }
    d.wait_intact_passes("m", 1, "before the shutdown");
    d.wait_intact_passes("other", 1, "before the shutdown");
    let def_path = d.state.join("vms/m.json");
    stop(d);

    // Cut short, as a power loss left a definition written without fsync.
    let good = std::fs::read(&def_path).expect("m's definition");
    assert!(String::from_utf8_lossy(&good).contains("__shutdown-"), "no shutdown snapshot named");
    std::fs::write(&def_path, &good[..good.len() / 2]).expect("damage it");
    let d = Daemon::start(dir.path(), &args);
    assert_eq!(d.metric("snapvisor_vm_definitions_damaged"), 1);
    let (code, body) = d.call("POST", "/vms", Some(json!({"name": "m", "guest": "idle", "mem_mib": 16})));
    assert_eq!(code, 409, "{body}");
    assert!(body.to_string().contains(&def_path.display().to_string()), "{body}");
    assert_eq!(d.ok("GET", "/vms/other", None)["state"], "running");
    d.wait_intact_passes("other", 2, "resumed beside a damaged definition");
    stop(d);

    // Repaired: m resumes from the snapshot the damaged start kept.
    std::fs::write(&def_path, &good).expect("repair it");
    let d = Daemon::start(dir.path(), &args);
    assert_eq!(d.metric("snapvisor_vm_definitions_damaged"), 0);
    let info = d.ok("GET", "/vms/m", None);
    assert_eq!(info["state"], "running", "the repaired VM did not resume: {info}");
    d.wait_intact_passes("m", 2, "resumed after its definition was repaired");
    stop(d);
}
