//! `--store-codec`: `run` and `serve` write new chunks with the codec asked for. LZ4 stores
//! the compressible `touch` fill in more bytes than zstd (~1.4x), and what it stores checks
//! whole (`store verify` decompresses every chunk and compares its blake3) and restores.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use serde_json::{json, Value};

/// Bytes the store at `dir` holds for its chunks (`store du`).
fn stored_bytes(dir: &std::path::Path) -> u64 {
    let o = common::snapvisor(&["store", "du", "--store", &dir.to_string_lossy(), "--json"]);
    assert!(o.status.success(), "store du: {}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).expect("du JSON");
    v["stored_bytes"].as_u64().expect("stored_bytes")
}

fn verify_clean(dir: &std::path::Path) {
    let o = common::snapvisor(&["store", "verify", "--store", &dir.to_string_lossy()]);
    assert!(
        o.status.success(),
        "store verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn run_writes_the_codec_asked_for_and_both_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut stored = Vec::new();
    for codec in ["zstd", "lz4"] {
        let store = dir.path().join(codec);
        // touch fills its memory (a compressible pattern) and then waits: by 1.5 s the
        // memory is the same in both runs.
        let o = common::snapvisor(&[
            "run",
            "--builtin",
            "touch",
            "--mem-mib",
            "64",
            "--snapshot-after-ms",
            "1500",
            "--snapshot-mode",
            "stop",
            "--exit-after-snapshot",
            "--store",
            &store.to_string_lossy(),
            "--name",
            "t",
            "--store-codec",
            codec,
        ]);
        assert!(o.status.success(), "run with {codec}: {}", String::from_utf8_lossy(&o.stderr));
        verify_clean(&store);
        stored.push(stored_bytes(&store));
    }
    let (zstd, lz4) = (stored[0], stored[1]);
    assert!(zstd > 0, "something compressible was stored");
    assert!(lz4 * 10 >= zstd * 12, "LZ4 stores touch in more bytes than zstd: {lz4} against {zstd}");
    let bad = common::snapvisor(&["run", "--builtin", "hello", "--mem-mib", "16", "--store-codec", "brotli"]);
    assert_eq!(bad.status.code(), Some(2), "an unknown codec is refused");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("brotli"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn the_daemon_writes_the_codec_asked_for_and_restores_from_it() {
    let mut stored = Vec::new();
    let dirs = [tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir")];
    for (dir, codec) in dirs.iter().zip(["zstd", "lz4"]) {
        let d = Daemon::start(dir.path(), &["--store-codec", codec]);
        d.ok("POST", "/vms", Some(json!({"name": "t", "guest": "touch", "mem_mib": 64, "start": true})));
        std::thread::sleep(Duration::from_millis(1500));
        d.ok("POST", "/vms/t/snapshot", Some(json!({"name": "s", "mode": "stop"})));
        // An eager restore reads every chunk back through the codec; the VM runs.
        let r = d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "r", "mode": "eager"})));
        assert_eq!(r["state"], "running", "{r}");
        drop(d);
        let store = dir.path().join("state").join("store");
        verify_clean(&store);
        stored.push(stored_bytes(&store));
    }
    let (zstd, lz4) = (stored[0], stored[1]);
    assert!(zstd > 0 && lz4 * 10 >= zstd * 12, "the daemon's LZ4 store holds more bytes: {lz4} against {zstd}");
}
