//! Every daemon endpoint that writes to the state directory, on a file system with no room
//! left (hostile6): the state directory is a small tmpfs filled to the last byte by a file of
//! the test's. Each request that needs room is refused with 507 Insufficient Storage and a
//! message saying so (not 500), leaves no VM or image behind, and the running VM, the
//! committed snapshots and the daemon go on; a snapshot delete (which writes the store's
//! index) is refused the same way and the snapshot stays whole; once the filler is gone every
//! request works again. Needs root (tmpfs).

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::daemon::Daemon;
use common::tmpfs::Mount;
use serde_json::{json, Value};

/// Writes `path` until the file system has no room left.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("filler");
    let block = vec![0x5au8; 64 << 10];
    loop {
        if let Err(e) = f.write_all(&block) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
            break;
        }
    }
    // Smaller writes take the last partial block.
    for _ in 0..64 {
        if f.write_all(&[0x5a; 512]).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
}

/// A minimal x86-64 ELF kernel (hlt; jmp back).
fn tiny_elf() -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    f
}

fn names(d: &Daemon, path: &str) -> Vec<String> {
    let v = d.ok("GET", path, None);
    v.as_array()
        .expect("a list")
        .iter()
        .map(|e| e.as_str().map(String::from).or_else(|| e["name"].as_str().map(String::from)).unwrap_or_default())
        .collect()
}

fn assert_full(what: &str, (code, body): (u16, String)) {
    assert_eq!(code, 507, "{what} on a full disk: {code} {body}");
    assert!(body.contains("No space left") || body.contains("full"), "{what}: the error does not say why: {body}");
}

#[test]
fn every_request_that_writes_on_a_full_disk_is_refused_with_507_and_harms_nothing() {
    let outer = tempfile::tempdir().expect("tempdir");
    let _mount = Mount::tmpfs(outer.path(), "48m");
    let d = Daemon::start(outer.path(), &[]);
    d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "m", "guest": "memfill", "mem_mib": 16, "seed": 4, "passes": 0, "start": true})),
    );
    d.wait_serial("m", "memfill pass 1 ", Duration::from_secs(60));
    for s in ["s0", "s1"] {
        d.ok("POST", "/vms/m/snapshot", Some(json!({"name": s, "mode": "stop"})));
    }
    let filler = outer.path().join("state").join("filler");
    fill(&filler);

    let text = |(c, v): (u16, Value)| (c, v.to_string());
    assert_full(
        "create",
        text(d.call("POST", "/vms", Some(json!({"name": "x", "guest": "idle", "mem_mib": 16, "start": true})))),
    );
    assert_full("restore", text(d.call("POST", "/snapshots/s1/restore", Some(json!({"vm": "r", "mode": "lazy"})))));
    assert_full("clone", text(d.call("POST", "/snapshots/s1/clone", Some(json!({"prefix": "c", "count": 2})))));
    assert_full("image upload", d.raw("PUT", "/images/k", "application/octet-stream", &tiny_elf()));
    assert_full("snapshot", text(d.call("POST", "/vms/m/snapshot", Some(json!({"name": "s2", "mode": "background"})))));
    let (code, body) = d.call("POST", "/store/gc", None);
    assert!(code < 300 || code == 507, "gc on a full disk: {code} {body}");

    // Nothing of the refused requests is left.
    assert_eq!(names(&d, "/vms"), ["m"], "a refused request left a VM");
    assert!(!names(&d, "/images").contains(&"k".to_string()), "a refused upload left an image");
    let mut snaps = names(&d, "/snapshots");
    snaps.sort();
    assert_eq!(snaps, ["s0", "s1"], "only the committed snapshots");
    let left: Vec<_> = std::fs::read_dir(outer.path().join("state").join("vms"))
        .expect("vms dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(left, ["m.json"], "a refused request left a file among the definitions");
    // The VM ran on.
    let (_, v) = d.call("GET", "/vms/m", None);
    assert_eq!(v["state"], "running", "{v}");
    // A delete writes the store's index too: on a disk filled to the last byte by someone
    // else it cannot, and says so; the snapshot stays whole.
    assert_full("snapshot delete", text(d.call("DELETE", "/snapshots/s0", None)));
    let mut snaps = names(&d, "/snapshots");
    snaps.sort();
    assert_eq!(snaps, ["s0", "s1"], "a refused delete removed the snapshot");

    std::fs::remove_file(&filler).expect("remove the filler");
    d.ok("POST", "/store/gc", None);
    d.ok("POST", "/snapshots/s0/restore", Some(json!({"vm": "r0", "mode": "eager"})));
    let passes = common::memfill::passes(&d.wait_serial("r0", "memfill pass", Duration::from_secs(60)));
    assert!(passes.iter().all(|(_, _, mis)| *mis == 0), "s0 after the refused delete: {passes:?}");
    d.ok("DELETE", "/vms/r0", None);
    let (code, body) = d.call("DELETE", "/snapshots/s0", None);
    assert_eq!(code, 204, "deleting once there is room: {body}");
    d.ok("POST", "/vms", Some(json!({"name": "x", "guest": "idle", "mem_mib": 16, "start": true})));
    d.ok("POST", "/snapshots/s1/restore", Some(json!({"vm": "r", "mode": "lazy"})));
    let (code, body) = d.raw("PUT", "/images/k", "application/octet-stream", &tiny_elf());
    assert!((200..300).contains(&code), "upload once there is room: {code} {body}");
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "s2", "mode": "background"})));
    d.wait_serial("r", "memfill pass", Duration::from_secs(60));
    let passes = common::memfill::passes(&d.wait_serial("r", "memfill pass", Duration::from_secs(60)));
    assert!(passes.iter().all(|(_, _, mis)| *mis == 0), "the restored guest found damage: {passes:?}");
}
