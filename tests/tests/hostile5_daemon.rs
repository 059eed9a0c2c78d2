//! Hostile round 5 through the daemon, as a user would: shared clones of a snapshot that is
//! deleted and collected while they run from its base; a snapshot of a clone restored and
//! cloned again; the last clones of a snapshot deleted while a new clone of it starts; the
//! bases' memfds gone with their last clone.

mod common;
use common::daemon::Daemon;

use std::time::{Duration, Instant};

use serde_json::json;

/// Complete memfill pass lines of `text`: (pass, mismatches). A restored guest may first print
/// the tail of a line its snapshot cut; that is not one.
fn pass_lines(text: &str) -> Vec<(u64, u64)> {
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.strip_prefix("memfill pass ")?.split(' ').collect();
            Some((f.first()?.parse().ok()?, f.get(6)?.parse().ok()?))
        })
        .collect()
}

/// Waits until VM `vm` printed `more` pass lines beyond those it has now; every line must find
/// the previous pass intact.
fn runs_intact(d: &Daemon, vm: &str, more: usize) {
    let serial = |d: &Daemon| d.call("GET", &format!("/vms/{vm}/serial"), None).1.as_str().unwrap_or("").to_string();
    let n = pass_lines(&serial(d)).len();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut text = serial(d);
    while pass_lines(&text).len() < n + more && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        text = serial(d);
    }
    let p = pass_lines(&text);
    assert!(p.len() >= n + more, "{vm} goes on: {text}");
    assert!(p.iter().all(|&(_, m)| m == 0), "{vm} found its memory intact: {text}");
    let info = d.ok("GET", &format!("/vms/{vm}"), None);
    assert_eq!(info["state"], "running", "{vm}: {info}");
}

fn delete(d: &Daemon, path: &str) -> u16 {
    d.call("DELETE", path, None).0
}

#[test]
fn clones_outlive_their_collected_snapshot_and_a_clone_of_a_clones_snapshot_races_the_last_of_its_siblings_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 128, "start": true})));
    runs_intact(&d, "m", 1);
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "s", "mode": "stop"})));
    assert_eq!(delete(&d, "/vms/m"), 204);

    let clones = d.ok("POST", "/snapshots/s/clone", Some(json!({"prefix": "c", "count": 3})));
    assert_eq!(clones.as_array().map(Vec::len), Some(3), "{clones}");
    // The snapshot is deleted as soon as the daemon lets it: while the base still reads from
    // it, a delete is refused and names who holds it.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = d.call("DELETE", "/snapshots/s", None);
        if status == 204 {
            break;
        }
        assert_eq!(status, 409, "{body}");
        assert!(Instant::now() < deadline, "the snapshot stayed pinned: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.ok("POST", "/store/gc", None);
    for c in ["c0", "c1", "c2"] {
        runs_intact(&d, c, 2);
    }

    // A snapshot of a clone (background by default), restored and cloned: both carry on.
    let r = d.ok("POST", "/vms/c1/snapshot", Some(json!({"name": "cs"})));
    assert!(r.is_object(), "{r}");
    d.ok("POST", "/snapshots/cs/restore", Some(json!({"vm": "r", "mode": "lazy"})));
    d.ok("POST", "/snapshots/cs/clone", Some(json!({"prefix": "k", "count": 2})));
    for vm in ["r", "k0", "k1", "c1"] {
        runs_intact(&d, vm, 2);
    }

    // The last clones of cs go while a new clone of cs is being made, over and over.
    for round in 0..4 {
        let prefix = format!("q{round}-");
        let ((a, b), made) = std::thread::scope(|s| {
            let del = s.spawn(|| {
                let pre = if round == 0 { "k".to_string() } else { format!("q{}-", round - 1) };
                (delete(&d, &format!("/vms/{pre}0")), delete(&d, &format!("/vms/{pre}1")))
            });
            let made = d.ok("POST", "/snapshots/cs/clone", Some(json!({"prefix": prefix, "count": 2})));
            (del.join().expect("delete thread"), made)
        });
        assert_eq!((a, b), (204, 204), "round {round}");
        assert_eq!(made.as_array().map(Vec::len), Some(2), "round {round}: {made}");
        for i in 0..2 {
            runs_intact(&d, &format!("{prefix}{i}"), 2);
        }
    }

    // Every VM goes: no base is left open or mapped.
    let vms = d.ok("GET", "/vms", None);
    for v in vms.as_array().expect("list") {
        let name = v["name"].as_str().expect("name");
        assert_eq!(delete(&d, &format!("/vms/{name}")), 204, "{name}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.base_memfds() != (0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.base_memfds(), (0, 0), "the bases went with their last clones");
    // Nothing pins cs any more.
    assert_eq!(delete(&d, "/snapshots/cs"), 204);
}

/// Clones of a large snapshot deleted while their base is still far from filled: the deletes
/// answer, the base's memfds and shared memory go, and nothing pins the snapshot any more.
#[test]
fn clones_deleted_while_their_base_fills_leave_no_memfd_shared_memory_or_pin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 768, "start": true})));
    runs_intact(&d, "m", 1);
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "big", "mode": "stop"})));
    assert_eq!(delete(&d, "/vms/m"), 204);
    let shmem_before = d.proc_status("RssShmem:");
    for round in 0..3 {
        let made = d.ok("POST", "/snapshots/big/clone", Some(json!({"prefix": format!("b{round}-"), "count": 3})));
        assert_eq!(made.as_array().map(Vec::len), Some(3), "{made}");
        let filling = d.base_memfds();
        assert!(filling.0 >= 1, "round {round}: the clones' base is open: {filling:?}");
        for i in 0..3 {
            assert_eq!(delete(&d, &format!("/vms/b{round}-{i}")), 204, "round {round}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.base_memfds() != (0, 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(d.base_memfds(), (0, 0), "round {round}: the base went with its clones");
    }
    let shmem = d.proc_status("RssShmem:");
    assert!(shmem < shmem_before + 16 * 1024, "RssShmem {shmem_before} -> {shmem} KiB after every clone went");
    assert_eq!(delete(&d, "/snapshots/big"), 204, "no pin is left on the snapshot");
}

/// Through the daemon: a lazily restored memfill VM snapshotted four times (the first full,
/// then incremental), the middle two deleted and collected; the last restores every way and
/// carries on intact, as does a shared clone of it.
#[test]
fn an_incremental_chain_of_a_lazily_restored_vm_survives_its_middle_parents_through_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 256, "start": true})));
    runs_intact(&d, "m", 1);
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "src", "mode": "stop"})));
    assert_eq!(delete(&d, "/vms/m"), 204);
    d.ok("POST", "/snapshots/src/restore", Some(json!({"vm": "r", "mode": "lazy"})));
    let mut reports = Vec::new();
    for (i, mode) in ["background", "stop", "background", "live", "background"].iter().enumerate() {
        runs_intact(&d, "r", 1);
        let r = d.ok("POST", "/vms/r/snapshot", Some(json!({"name": format!("s{i}"), "mode": mode})));
        reports.push(r);
    }
    let incremental: Vec<bool> = reports.iter().map(|r| r["incremental"].as_bool().unwrap_or(false)).collect();
    assert!(incremental.iter().skip(1).filter(|&&x| x).count() >= 2, "incremental snapshots: {reports:?}");
    for gone in ["s1", "s2", "s3", "src"] {
        assert_eq!(delete(&d, &format!("/snapshots/{gone}")), 204, "{gone}");
    }
    d.ok("POST", "/store/gc", None);
    for s in ["s0", "s4"] {
        for (vm, mode) in [("e", "eager"), ("l", "lazy"), ("p", "lazy-prefetch")] {
            let name = format!("{s}{vm}");
            d.ok("POST", &format!("/snapshots/{s}/restore"), Some(json!({"vm": name, "mode": mode})));
            runs_intact(&d, &name, 2);
            assert_eq!(delete(&d, &format!("/vms/{name}")), 204);
        }
        d.ok("POST", &format!("/snapshots/{s}/clone"), Some(json!({"prefix": format!("{s}c"), "count": 2})));
        for i in 0..2 {
            runs_intact(&d, &format!("{s}c{i}"), 2);
        }
    }
    runs_intact(&d, "r", 2);
}
