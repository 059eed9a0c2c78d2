//! Hostile 8 through the daemon: a snapshot whose manifest, valid on its own, lists pc.ram
//! two chunks shorter than its VM state does (its chunk table cut to match). Every restore
//! mode and a clone are refused with an error naming the block and both lengths, and leave
//! nothing behind: no VM listed, no base memfd; the daemon stays up, and the repaired
//! snapshot restores.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use serde_json::json;

#[test]
fn a_manifest_shorter_than_its_state_is_refused_by_every_daemon_restore_and_clone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "a", "guest": "idle", "mem_mib": 16, "start": true})));
    let t = d.wait_serial("a", "idle guest ready", Duration::from_secs(60));
    assert!(t.contains("idle guest ready"), "{t}");
    d.ok("POST", "/vms/a/snapshot", Some(json!({"name": "s", "mode": "stop"})));
    d.ok("DELETE", "/vms/a", None);
    let store_dir = d.state.join("store");
    d.terminate_within(Duration::from_secs(30));

    let (good, was, now) = {
        let store = storage::Store::open(&store_dir).expect("store");
        let good = store.debug_raw_manifest("s").expect("read").expect("stored");
        let mut m = store.manifest("s").expect("manifest");
        let cs = u64::from(m.chunk_size);
        let b = m.blocks.iter_mut().find(|b| b.idstr == "pc.ram").expect("pc.ram");
        let (was, now) = (b.used_length, b.used_length - 2 * cs);
        b.used_length = now;
        b.chunks.truncate(now.div_ceil(cs) as usize);
        store.debug_put_raw_manifest("s", &m.encode().expect("encode")).expect("damage");
        (good, was, now)
    };

    let mut d = Daemon::start(dir.path(), &[]);
    let refused = |what: &str, path: &str, body: serde_json::Value| {
        let (status, v) = d.call("POST", path, Some(body));
        let e = v.to_string();
        assert!((400..600).contains(&status), "{what}: {status} {e}");
        for w in ["pc.ram", &format!("{was:#x}"), &format!("{now:#x}")] {
            assert!(e.contains(w), "{what}: the error names {w}: {e}");
        }
        let vms = d.ok("GET", "/vms", None);
        assert_eq!(vms.as_array().map(Vec::len), Some(0), "{what}: no VM is left: {vms}");
        assert_eq!(d.base_memfds(), (0, 0), "{what}: no base is left");
    };
    for mode in ["eager", "lazy", "lazy-prefetch", "lazy-prefetch-before"] {
        refused(mode, "/snapshots/s/restore", json!({"vm": "r", "mode": mode}));
    }
    refused("clone", "/snapshots/s/clone", json!({"prefix": "c", "count": 2}));
    d.terminate_within(Duration::from_secs(30));

    storage::Store::open(&store_dir).expect("store").debug_put_raw_manifest("s", &good).expect("repair");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "r", "mode": "eager"})));
    d.ok("POST", "/snapshots/s/clone", Some(json!({"prefix": "c", "count": 2})));
    let vms = d.ok("GET", "/vms", None);
    assert_eq!(vms.as_array().map(Vec::len), Some(3), "{vms}");
}
