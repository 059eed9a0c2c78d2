//! A full disk gives a clear error and leaves the store usable. Runs on a 16 MiB tmpfs, so
//! it needs root (CI runs as root); without it the test fails and says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use storage::{BlockSpec, Store, StoreError, StoreOptions};

const CS: u32 = 64 * 1024;

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path) -> Mount {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount(8)");
        assert!(
            out.status.success(),
            "store_full needs root to mount a 16 MiB tmpfs at {}: mount failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Incompressible content for snapshot `k`.
fn noise(k: u64, len: usize) -> Vec<u8> {
    let mut x = (k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn try_commit(store: &Store, name: &str, content: &[u8]) -> Result<(), StoreError> {
    let spec = BlockSpec {
        idstr: "ram".into(),
        used_length: content.len() as u64,
        max_length: content.len() as u64,
        page_size: 4096,
        resizeable: false,
    };
    let w = store.begin(name, vec![spec])?;
    w.put("ram", 0, content)?;
    w.commit(Vec::new())?;
    Ok(())
}

#[test]
fn full_disk_is_a_clear_error_and_store_stays_usable() {
    let outer = tempfile::tempdir().expect("tempdir");
    let _mount = Mount::tmpfs(outer.path());
    let dir = outer.path().join("store");
    let opts = StoreOptions { chunk_size: CS, ..Default::default() };
    let store = Store::open_with(&dir, opts.clone()).expect("open");
    let size = 1 << 20;
    let mut committed = Vec::new();
    let full = loop {
        let k = committed.len() as u64;
        assert!(k < 64, "a 16 MiB filesystem never filled up");
        match try_commit(&store, &format!("s{k}"), &noise(k, size)) {
            Ok(()) => committed.push(k),
            Err(e) => break e,
        }
    };
    let msg = full.to_string();
    assert!(matches!(full, StoreError::Full { .. }), "expected Full, got {full:?}");
    assert!(msg.contains("is full") && msg.contains(&dir.display().to_string()), "{msg}");
    eprintln!("{} snapshots of 1 MiB fit before: {msg}", committed.len());
    assert!(committed.len() >= 5, "only {} snapshots fit", committed.len());
    assert!(!store.list().expect("list").contains(&format!("s{}", committed.len())));

    // Earlier snapshots are intact and the store keeps working after making room.
    for k in &committed {
        assert!(store.verify(&format!("s{k}")).expect("verify").ok());
    }
    for k in committed.drain(..3) {
        store.delete(&format!("s{k}")).expect("delete");
    }
    let gc = store.gc().expect("gc");
    assert!(gc.disk_bytes_freed >= 3 * size as u64, "{gc:?}");
    try_commit(&store, "after", &noise(1000, size)).expect("commit after gc");
    store.put_attachment("after", "prefetch", b"ok").expect("attachment");
    drop(store);
    let store = Store::open_with(&dir, opts).expect("reopen");
    let mut buf = vec![0u8; size];
    store.reader("after").expect("reader").read_at("ram", 0, &mut buf).expect("read");
    assert_eq!(buf, noise(1000, size));
    for k in &committed {
        assert!(store.verify(&format!("s{k}")).expect("verify").ok());
    }
}
