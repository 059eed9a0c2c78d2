//! A full disk in the middle of a daemon's VM snapshot (hostile3): the daemon's state
//! directory is a 64 MiB tmpfs, and a running memfill VM (each pass rewrites all its memory)
//! is snapshotted in the background until the disk fills mid-snapshot. The failure is a clear
//! error naming the full store, the VM runs on, the daemon stays up and lists only the
//! committed snapshots; every one of them restores and its guest finds its memory intact
//! (memfill checks all its RAM against the previous pass's pattern); GC gives the space of
//! the half-written snapshot back; once room is made, snapshots work again and the store
//! verifies clean after the daemon stops. Needs root (tmpfs), as store_full does.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use common::tmpfs::{free_bytes, Mount};
use serde_json::{json, Value};

fn state_of(d: &Daemon, vm: &str) -> String {
    d.ok("GET", &format!("/vms/{vm}"), None).get("state").and_then(Value::as_str).unwrap_or_default().to_string()
}

/// Restores `snap` lazily as `vm` and waits for its guest to complete a pass: every pass
/// line it prints finds the previous pattern intact (0 mismatches).
fn restores_intact(d: &Daemon, snap: &str, vm: &str) {
    d.ok("POST", &format!("/snapshots/{snap}/restore"), Some(json!({"vm": vm, "mode": "lazy"})));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = d.call("GET", &format!("/vms/{vm}/serial"), None);
        let text = v.as_str().map(String::from).unwrap_or_default();
        let p = common::memfill::passes(&text);
        if p.len() >= 2 {
            assert!(p.iter().all(|(_, _, mis)| *mis == 0), "{snap}: the restored guest found damage: {text}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{snap}: no pass after the restore: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.ok("DELETE", &format!("/vms/{vm}"), None);
}

#[test]
fn a_disk_filling_during_a_daemon_snapshot_is_a_clear_error_and_gc_gives_the_space_back() {
    let outer = tempfile::tempdir().expect("tempdir");
    let _mount = Mount::tmpfs(outer.path(), "64m");
    let mut d = Daemon::start(outer.path(), &[]);
    d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "m", "guest": "memfill", "mem_mib": 16, "seed": 4, "passes": 0, "start": true})),
    );
    d.wait_serial("m", "memfill pass 1 ", Duration::from_secs(60));
    let mut committed = Vec::new();
    let mut free_before;
    let err = loop {
        assert!(committed.len() < 20, "the 64 MiB disk never filled");
        let name = format!("s{}", committed.len());
        // Each pass rewrites all of RAM: the next snapshot stores it all again.
        std::thread::sleep(Duration::from_millis(300));
        free_before = free_bytes(outer.path());
        let (s, v) = d.call("POST", "/vms/m/snapshot", Some(json!({"name": name, "mode": "background"})));
        if !(200..300).contains(&s) {
            break (s, v.to_string());
        }
        committed.push(name);
    };
    eprintln!("{} snapshots fit; then {} {}", committed.len(), err.0, err.1);
    assert!(!committed.is_empty(), "not even one snapshot fit: {err:?}");
    assert!(err.0 == 507 && err.1.contains("full"), "the error says the disk is full (507): {err:?}");
    assert_eq!(state_of(&d, "m"), "running", "the VM runs on after the failed snapshot");
    let mut listed: Vec<String> = d
        .ok("GET", "/snapshots", None)
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v.as_str().unwrap_or("").into())
        .collect();
    listed.sort();
    assert_eq!(listed, committed, "only the committed snapshots are listed");
    // GC gives back what the half-written snapshot took.
    d.ok("POST", "/store/gc", None);
    let free_after = free_bytes(outer.path());
    assert!(
        free_after + (2 << 20) >= free_before,
        "gc left {} bytes of the failed snapshot ({free_before} free before it, {free_after} after gc)",
        free_before.saturating_sub(free_after)
    );
    // Making room: delete the VM (its memory) and the oldest snapshot; the rest restore intact.
    d.ok("DELETE", "/vms/m", None);
    d.ok("DELETE", &format!("/snapshots/{}", committed[0]), None);
    d.ok("POST", "/store/gc", None);
    for s in &committed[1..] {
        restores_intact(&d, s, "r");
    }
    // A new snapshot fits again.
    d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "n", "guest": "memfill", "mem_mib": 16, "seed": 5, "passes": 0, "start": true})),
    );
    d.wait_serial("n", "memfill pass 1 ", Duration::from_secs(60));
    d.ok("POST", "/vms/n/snapshot", Some(json!({"name": "after", "mode": "background"})));
    d.ok("DELETE", "/vms/n", None);
    restores_intact(&d, "after", "r2");
    let store_dir = d.state.join("store");
    d.terminate_within(Duration::from_secs(30));
    let store = storage::Store::open_read_only(&store_dir).expect("store opens");
    for r in store.verify_all().expect("verify") {
        assert!(r.ok(), "verify: {:?}", r.errors);
    }
}
