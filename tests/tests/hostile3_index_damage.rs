//! Byte damage in the sled index of a store a daemon wrote (hostile3): every 7th byte of the
//! part of `db` sled has written (and every byte of `conf`), damaged in turn in a cleanly
//! closed store. Each time, opening it (as `store list`/`verify` do) fails with an error
//! naming the index and `store repair`, or it opens and lists both snapshots with their exact
//! manifests (never fewer: "empty" is never an answer), or `verify` reports the damage.

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::Daemon;
use serde_json::json;
use storage::Store;

fn flip(path: &Path, at: usize) {
    let mut data = std::fs::read(path).expect("read");
    data[at] ^= 0x5a;
    std::fs::write(path, data).expect("write");
}

#[test]
fn damaged_index_bytes_never_make_snapshots_vanish_silently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "a", "guest": "idle", "mem_mib": 16, "start": true})));
    d.wait_serial("a", "idle guest ready", Duration::from_secs(60));
    d.ok("POST", "/vms/a/snapshot", Some(json!({"name": "s1", "mode": "stop"})));
    d.ok("POST", "/vms/a/snapshot", Some(json!({"name": "s2", "mode": "stop"})));
    d.ok("DELETE", "/vms/a", None);
    let store_dir = d.state.join("store");
    d.terminate_within(Duration::from_secs(30));
    let manifests = |s: &Store| -> Vec<(String, Vec<u8>)> {
        s.list()
            .expect("list")
            .into_iter()
            .map(|n| {
                let m = s.manifest(&n).expect("manifest");
                (n, m.encode().expect("encode"))
            })
            .collect()
    };
    let want = manifests(&Store::open_read_only(&store_dir).expect("store"));
    assert_eq!(want.len(), 2);

    let (mut refused, mut found, mut harmless) = (0, 0, 0);
    for (file, step) in [("conf", 1), ("db", 7)] {
        let path = store_dir.join(file);
        let len = std::fs::read(&path).expect("read").iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        for at in (0..len).step_by(step) {
            flip(&path, at);
            let what = format!("{file} byte {at}");
            match Store::open_read_only(&store_dir) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains("repair") || msg.contains(file), "{what}: {msg}");
                    refused += 1;
                }
                Ok(s) => {
                    let problems: Vec<String> = match s.verify_all() {
                        Err(e) => vec![e.to_string()],
                        Ok(r) => r.into_iter().flat_map(|r| r.errors).collect(),
                    };
                    if problems.is_empty() {
                        assert_eq!(manifests(&s), want, "{what}: opened, verified clean, but lists other snapshots");
                        harmless += 1;
                    } else {
                        found += 1;
                    }
                }
            }
            flip(&path, at);
        }
    }
    eprintln!("index damage: {refused} refused at open, {found} found by verify, {harmless} harmless");
    assert!(refused + found > 0);
}
