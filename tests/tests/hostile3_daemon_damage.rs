//! Damage under a running daemon, byte by byte (hostile3): with the daemon up, every byte of
//! the pack header, every byte of the entry headers of chunks only one snapshot holds and of a
//! chunk both hold, and the first bytes (codec, length) and a sample of the payload of each
//! such entry are damaged in turn. After each damage a restore through the API of each
//! snapshot holding the chunk fails with a clear error (HTTP 4xx/5xx naming the chunk or the
//! snapshot) and never runs a VM; the other snapshot restores; the list keeps both; the
//! daemon stays up. GC under damage collects nothing live. A lazy restore of a damaged chunk
//! stops only its VM. After the daemon stops, `store verify` finds every damage.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::{json, Value};
use storage::{ChunkRef, Store};

/// Entry header length and offsets in it (storage/src/pack.rs).
const PACK_HEADER: u64 = 16;
const ENTRY_HEADER: u64 = 48;

struct Entry {
    pack: PathBuf,
    offset: u64,
    len: u64,
    hash: [u8; 32],
}

fn entries(packs: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(packs).expect("packs").map(|e| e.expect("entry").path()).collect();
    files.sort();
    for p in files {
        let data = std::fs::read(&p).expect("pack");
        let mut off = PACK_HEADER as usize;
        while off + ENTRY_HEADER as usize <= data.len() {
            assert_eq!(&data[off..off + 4], b"SVCE", "entry magic at {off} of {}", p.display());
            let len = u64::from(u32::from_le_bytes(data[off + 4..off + 8].try_into().expect("len")));
            let hash: [u8; 32] = data[off + 8..off + 40].try_into().expect("hash");
            out.push(Entry { pack: p.clone(), offset: off as u64, len, hash });
            off += (ENTRY_HEADER + len) as usize;
        }
    }
    out
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open for damage");
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).expect("write byte");
    f.sync_all().expect("sync");
}

fn hashes(store: &Store, name: &str) -> Vec<[u8; 32]> {
    let m = store.manifest(name).expect("manifest");
    m.blocks
        .iter()
        .flat_map(|b| b.chunks.iter())
        .filter_map(|c| match c {
            ChunkRef::Stored(h) => Some(h.0),
            ChunkRef::Zero => None,
        })
        .collect()
}

fn snapshot_names(d: &Daemon) -> Vec<String> {
    let v = d.ok("GET", "/snapshots", None);
    let mut n: Vec<String> =
        v.as_array().expect("list").iter().map(|s| s.as_str().unwrap_or_default().to_string()).collect();
    n.sort();
    n
}

fn take(d: &Daemon, vm: &str, body: Value, ready: &str, snap: &str) {
    d.ok("POST", "/vms", Some(body));
    let t = d.wait_serial(vm, ready, Duration::from_secs(60));
    assert!(t.contains(ready), "{vm}: {t}");
    d.ok("POST", &format!("/vms/{vm}/snapshot"), Some(json!({"name": snap, "mode": "stop"})));
    d.ok("DELETE", &format!("/vms/{vm}"), None);
}

/// Restores `snap` eagerly as VM "r": Ok(()) if it was made (and deleted again), Err((status,
/// message)) otherwise.
fn restore(d: &Daemon, snap: &str) -> Result<(), (u16, String)> {
    let (s, v) = d.call("POST", &format!("/snapshots/{snap}/restore"), Some(json!({"vm": "r", "mode": "eager"})));
    if (200..300).contains(&s) {
        d.ok("DELETE", "/vms/r", None);
        Ok(())
    } else {
        Err((s, v.to_string()))
    }
}

#[test]
fn byte_damage_under_a_running_daemon_is_a_clear_error_and_verify_finds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &[]);
    take(
        &d,
        "a",
        json!({"name": "a", "guest": "memfill", "mem_mib": 16, "seed": 7, "passes": 0, "start": true}),
        "memfill pass 1 ",
        "sa",
    );
    take(&d, "b", json!({"name": "b", "guest": "idle", "mem_mib": 16, "start": true}), "idle guest ready", "sb");
    let store_dir = d.state.join("store");
    d.terminate_within(Duration::from_secs(30));
    let (ha, hb) = {
        let s = Store::open_read_only(&store_dir).expect("store");
        (hashes(&s, "sa"), hashes(&s, "sb"))
    };
    let all = entries(&store_dir.join("packs"));
    let only_a = all.iter().find(|e| ha.contains(&e.hash) && !hb.contains(&e.hash)).expect("a chunk only sa has");
    let only_b = all.iter().find(|e| hb.contains(&e.hash) && !ha.contains(&e.hash)).expect("a chunk only sb has");
    let both = all.iter().find(|e| ha.contains(&e.hash) && hb.contains(&e.hash));
    // (file, byte, snapshots that must fail, what)
    let mut damage: Vec<(PathBuf, u64, Vec<&str>, String)> = Vec::new();
    for e in [Some(only_a), Some(only_b), both].into_iter().flatten() {
        let hit: Vec<&str> =
            [("sa", &ha), ("sb", &hb)].into_iter().filter(|(_, h)| h.contains(&e.hash)).map(|(n, _)| n).collect();
        for i in 0..ENTRY_HEADER {
            damage.push((e.pack.clone(), e.offset + i, hit.clone(), format!("entry header byte {i}")));
        }
        let value = e.offset + ENTRY_HEADER;
        let mut at: Vec<u64> = (0..8).collect();
        at.extend((1..16).map(|k| k * e.len / 16));
        at.push(e.len - 1);
        for i in at {
            damage.push((e.pack.clone(), value + i, hit.clone(), format!("value byte {i} of {}", e.len)));
        }
    }

    let mut d = Daemon::start(dir.path(), &[]);
    let want = vec!["sa".to_string(), "sb".to_string()];
    restore(&d, "sa").expect("sa restores undamaged");
    restore(&d, "sb").expect("sb restores undamaged");
    let packs: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = all.iter().map(|e| e.pack.clone()).collect();
        v.dedup();
        v
    };
    // The pack header: a running daemon may not read it again; whatever it does, no VM runs
    // with wrong bytes (every chunk read is checked), and the list stays whole.
    for p in &packs {
        for i in 0..PACK_HEADER {
            flip(p, i);
            for s in ["sa", "sb"] {
                if let Err((status, msg)) = restore(&d, s) {
                    assert!(status >= 400, "pack header byte {i}: {s}: {status} {msg}");
                }
            }
            assert_eq!(snapshot_names(&d), want, "pack header byte {i}");
            flip(p, i);
        }
    }
    for (n, (file, at, hit, what)) in damage.iter().enumerate() {
        flip(file, *at);
        for s in hit {
            match restore(&d, s) {
                Ok(()) => panic!("{what}: snapshot {s} restored over a damaged chunk"),
                Err((status, msg)) => {
                    if std::env::var_os("H3_SHOW").is_some() {
                        eprintln!("{what}: {s}: {status} {msg}");
                    }
                    assert!((400..600).contains(&status), "{what}: {s}: {status} {msg}");
                    assert!(
                        msg.contains("chunk") || msg.contains(s),
                        "{what}: {s}: the error names the chunk or the snapshot: {msg}"
                    );
                }
            }
        }
        // The other snapshot is unharmed (checked for a sample: each restore costs time).
        if n % 6 == 0 {
            for s in ["sa", "sb"].into_iter().filter(|s| !hit.contains(s)) {
                restore(&d, s).unwrap_or_else(|e| panic!("{what}: unharmed {s} fails: {e:?}"));
            }
        }
        assert_eq!(snapshot_names(&d), want, "{what}: the list");
        flip(file, *at);
    }
    // GC under damage collects nothing live: after it and the repair, both restore.
    let (file, at, _, what) = &damage[ENTRY_HEADER as usize + 3];
    flip(file, *at);
    d.ok("POST", "/store/gc", None);
    assert_eq!(snapshot_names(&d), want, "{what}: after gc");
    flip(file, *at);
    restore(&d, "sa").expect("sa after gc");
    restore(&d, "sb").expect("sb after gc");
    // A lazy restore over a damaged chunk stops its VM (the guest reads all its memory), and
    // only it: a second VM restored from the other snapshot runs on.
    let (file, at, _, _) = &damage[ENTRY_HEADER as usize + 20];
    flip(file, *at);
    d.ok("POST", "/snapshots/sb/restore", Some(json!({"vm": "ok", "mode": "lazy"})));
    let (s, v) = d.call("POST", "/snapshots/sa/restore", Some(json!({"vm": "bad", "mode": "lazy"})));
    if (200..300).contains(&s) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = d.ok("GET", "/vms/bad", None);
            let state = info.get("state").and_then(Value::as_str).unwrap_or_default().to_string();
            if state != "running" {
                assert!(state != "created", "{info}");
                break;
            }
            assert!(Instant::now() < deadline, "a VM reading a damaged chunk lazily still runs: {info}");
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        assert!(v.to_string().contains("chunk"), "{s} {v}");
    }
    let ok = d.ok("GET", "/vms/ok", None);
    assert_eq!(ok.get("state").and_then(Value::as_str), Some("running"), "{ok}");
    flip(file, *at);
    d.terminate_within(Duration::from_secs(30));

    // Offline: verify finds every damage (and the store opens), and nothing is left damaged.
    let verify = |what: &str| -> Vec<String> {
        match Store::open_read_only(&store_dir) {
            Err(e) => vec![format!("open: {e}")],
            Ok(s) => s.verify_all().expect("verify").into_iter().flat_map(|r| r.errors).collect(),
        }
        .into_iter()
        .map(|e| format!("{what}: {e}"))
        .collect()
    };
    assert_eq!(verify("undamaged"), Vec::<String>::new());
    for p in &packs {
        for i in 0..PACK_HEADER {
            flip(p, i);
            assert!(!verify("x").is_empty(), "pack header byte {i}: verify found nothing");
            flip(p, i);
        }
    }
    for (file, at, _, what) in &damage {
        flip(file, *at);
        assert!(!verify(what).is_empty(), "{what}: verify found nothing");
        flip(file, *at);
    }
}
