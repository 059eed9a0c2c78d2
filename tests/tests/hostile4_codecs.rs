//! hostile4: one store written by daemons of both codecs in turn (`--store-codec lz4`, then
//! zstd, then lz4 again): a paused VM's snapshot taken under one codec and again under the
//! other (every chunk deduplicated onto the first codec's), a shutdown snapshot under one and
//! its resume under the other, fresh chunks under each; parents deleted and GC run. Every
//! remaining snapshot restores with the guest's whole RAM intact (memfill checks every byte
//! at every pass) eagerly, lazily, with prefetch and as shared clones, and `store verify`
//! finds nothing.

mod common;

use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::json;

fn start(dir: &std::path::Path, codec: &str) -> Daemon {
    Daemon::start(dir, &["--store-codec", codec, "--on-shutdown", "snapshot", "--shutdown-timeout", "60"])
}

fn stop(mut d: Daemon) {
    let (status, took) = d.terminate_within(Duration::from_secs(90));
    assert!(status.is_some_and(|s| s.success()), "exit {status:?} after {took:?}");
}

/// Waits for two whole passes of memfill on `vm` after `after` were seen, all clean.
fn two_clean_passes(d: &Daemon, vm: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, out) = d.call("GET", &format!("/vms/{vm}/serial"), None);
        let text = out.as_str().map(String::from).unwrap_or_default();
        let p = common::memfill::passes(&text);
        if p.len() >= 2 {
            assert!(p.iter().all(|(_, _, mis)| *mis == 0), "{what}: {vm} found wrong memory: {text}");
            return;
        }
        let info = d.ok("GET", &format!("/vms/{vm}"), None);
        assert_eq!(info["state"], "running", "{what}: {info} {text}");
        assert!(Instant::now() < deadline, "{what}: no passes: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_store_of_mixed_lz4_and_zstd_chunks_restores_whole_in_every_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("state").join("store");
    let d = start(dir.path(), "lz4");
    let vm = json!({"name": "m", "guest": "memfill", "mem_mib": 32, "seed": 7, "passes": 0, "start": true});
    d.ok("POST", "/vms", Some(vm));
    d.wait_serial("m", "memfill pass 1 ", Duration::from_secs(60));
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "a", "mode": "stop"})));
    d.ok("POST", "/vms/m/pause", None);
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "p-lz4", "mode": "stop"})));
    stop(d);
    // zstd: m resumes (paused) from its LZ4 shutdown snapshot; the same memory again is all
    // deduplicated onto the LZ4 chunks; then fresh zstd chunks.
    let d = start(dir.path(), "zstd");
    assert_eq!(d.ok("GET", "/vms/m", None)["state"], "paused");
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "p-zstd", "mode": "stop"})));
    d.ok("POST", "/vms/m/resume", None);
    std::thread::sleep(Duration::from_millis(300));
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "q-zstd"})));
    stop(d);
    // lz4 again: background snapshot over a mostly-zstd parent.
    let d = start(dir.path(), "lz4");
    std::thread::sleep(Duration::from_millis(300));
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "r-lz4"})));
    d.ok("DELETE", "/vms/m", None);
    for gone in ["a", "p-lz4"] {
        d.ok("DELETE", &format!("/snapshots/{gone}"), None);
    }
    d.ok("POST", "/store/gc", None);
    for snap in ["p-zstd", "q-zstd", "r-lz4"] {
        for mode in ["eager", "lazy", "lazy-prefetch", "clone"] {
            let what = format!("{snap} {mode}");
            let vms: Vec<String> = if mode == "clone" {
                d.ok("POST", &format!("/snapshots/{snap}/clone"), Some(json!({"prefix": "c", "count": 2})));
                vec!["c0".into(), "c1".into()]
            } else {
                d.ok("POST", &format!("/snapshots/{snap}/restore"), Some(json!({"vm": "r", "mode": mode})));
                vec!["r".into()]
            };
            for v in &vms {
                if snap == "p-zstd" {
                    // Restored paused? A snapshot of a paused VM restores running here.
                    let _ = d.call("POST", &format!("/vms/{v}/resume"), None);
                }
                two_clean_passes(&d, v, &what);
            }
            for v in &vms {
                d.ok("DELETE", &format!("/vms/{v}"), None);
            }
        }
    }
    stop(d);
    let o = common::snapvisor(&["store", "verify", "--store", &store.to_string_lossy()]);
    assert!(
        o.status.success(),
        "store verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
