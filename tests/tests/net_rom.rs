//! The option-ROM cases of a restore (issue 12, item 4) through `snapvisor run` / `snapshot`
//! / `restore --net`: a NIC's ROM block (`0000:00:03.0/virtio-net-pci.rom`) of the snapshot
//! against the one the destination builds from its `--net` override.
//!
//! - snapshot ROM 0x1000, destination ROM 0x20000: refused, naming the block, both sizes and
//!   the fixes (`romsize=`, `romfile=`);
//! - snapshot ROM, destination `romfile=none`: refused, naming the fix;
//! - snapshot without ROM, destination with one: accepted, the destination's ROM stays;
//! - destination `romsize` at least the snapshot's: accepted, the block resized.
//!
//! Refusals are checked eagerly and lazily, and leave the store as it was. The ROMs are built
//! here (valid headers, PCIR 1af4:1041, checksums) at 0x1000 and 0x20000 bytes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::snapvisor_bin;
use hypervisor::net::rom::{synthetic, VIRTIO_NET_DEVICE, VIRTIO_VENDOR};

const BLOCK: &str = "0000:00:03.0/virtio-net-pci.rom";

/// A tap name unique to this test process and tag.
fn tap_name(tag: &str) -> String {
    format!("rom{tag}{}", std::process::id() % 100_000)
}

/// A persistent tap, deleted when dropped.
struct PersistentTap(String);

impl PersistentTap {
    fn new(name: &str) -> Self {
        let o = Command::new("ip").args(["tuntap", "add", "dev", name, "mode", "tap"]).output().expect("ip tuntap");
        assert!(o.status.success(), "ip tuntap add {name}: {}", String::from_utf8_lossy(&o.stderr));
        PersistentTap(name.to_string())
    }
}

impl Drop for PersistentTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["tuntap", "del", "dev", &self.0, "mode", "tap"]).output();
    }
}

fn snapvisor(args: &[&str]) -> Output {
    Command::new(snapvisor_bin()).args(args).output().expect("run snapvisor")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The store's snapshot data, every file under `manifests/` and `packs/` with its bytes: a
/// refused restore must leave them as they were. (sled's own files, `db`, `snap.*`, are
/// rewritten by any open of the store and say nothing about its snapshots.)
fn store_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.join("manifests"), dir.join("packs")];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read store dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

struct Setup {
    dir: tempfile::TempDir,
    tap: String,
    _tap: PersistentTap,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("small.rom"), synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE))
            .expect("small ROM");
        std::fs::write(dir.path().join("big.rom"), synthetic(0x20000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE))
            .expect("big ROM");
        let tap = tap_name(tag);
        let t = PersistentTap::new(&tap);
        Setup { dir, tap, _tap: t }
    }

    fn path(&self, n: &str) -> String {
        self.dir.path().join(n).to_string_lossy().into_owned()
    }

    /// `romfile=` value: a ROM built here, or `none`.
    fn rom(&self, which: &str) -> String {
        match which {
            "none" => "none".into(),
            n => self.path(&format!("{n}.rom")),
        }
    }

    /// Snapshots an idle built-in guest whose NIC has ROM `which` as `name`.
    fn snapshot(&self, name: &str, which: &str) {
        let net = format!("tap={},romfile={}", self.tap, self.rom(which));
        let store = self.path("store");
        let o = snapvisor(&[
            "run",
            "--builtin",
            "idle",
            "--mem-mib",
            "32",
            "--net",
            &net,
            "--snapshot-after-ms",
            "300",
            "--store",
            &store,
            "--name",
            name,
            "--exit-after-snapshot",
        ]);
        assert!(o.status.success(), "snapshot {name} with ROM {which}: {}", stderr(&o));
    }

    /// `restore NAME --net NET` (lazily if asked), stopped after `secs` if it runs.
    fn restore(&self, name: &str, net: &str, lazy: bool, secs: &str) -> Output {
        let store = self.path("store");
        let net = format!("tap={},{net}", self.tap);
        let mut args = vec!["restore", "--store", &store, name, "--net", &net, "--timeout", secs];
        if lazy {
            args.push("--lazy");
        }
        snapvisor(&args)
    }

    /// Asserts that restoring `name` with `net` is refused, eagerly and lazily alike, with an
    /// error containing every `needle`, and that the store is unchanged.
    fn refused(&self, name: &str, net: &str, needles: &[&str]) {
        let before = store_files(&self.dir.path().join("store"));
        let mut errors = Vec::new();
        for lazy in [false, true] {
            let o = self.restore(name, &net.replace("{dir}", &self.path("")), lazy, "5");
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "refused as bad input (lazy {lazy}): {e}");
            for n in needles {
                assert!(e.contains(n), "lazy {lazy}: missing {n:?} in: {e}");
            }
            assert!(!e.contains("driver {"), "no VM ran (lazy {lazy}): {e}");
            errors.push(e);
        }
        assert_eq!(errors[0], errors[1], "eager and lazy refuse alike");
        eprintln!("{name} with {net}: {}", errors[0].trim());
        let after = store_files(&self.dir.path().join("store"));
        assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "the store's files");
        assert!(before == after, "a refused restore changed the store");
    }
}

#[test]
fn a_snapshot_rom_of_another_size_is_refused_with_the_fixes() {
    let s = Setup::new("a");
    s.snapshot("small", "small");
    let big = format!("romfile={}", s.rom("big"));
    s.refused(
        "small",
        &big,
        &[
            &format!("Size mismatch: {BLOCK}: 0x1000 != 0x20000"),
            "restore the NIC at 0000:00:03.0 with romsize=0x20000",
            "romfile= the ROM the snapshot was taken with",
        ],
    );
    // The fix it names works: the big ROM with romsize=0x20000 takes the 0x1000 snapshot ROM.
    let o = s.restore("small", &format!("{big},romsize=0x20000"), false, "1");
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(124), "accepted, ran until --timeout: {e}");
    assert!(e.contains(&format!("resized RAM block {BLOCK} to the snapshot's 0x1000 bytes")), "{e}");
}

#[test]
fn a_snapshot_rom_without_a_destination_rom_is_refused_with_the_fix() {
    let s = Setup::new("b");
    s.snapshot("withrom", "small");
    s.refused(
        "withrom",
        "romfile=none",
        &[&format!("Unknown ramblock \"{BLOCK}\" (snapshot has 0x1000 bytes)"), "romfile=", "romsize=0x1000"],
    );
}

#[test]
fn a_destination_rom_the_snapshot_lacks_is_accepted_and_stays() {
    let s = Setup::new("c");
    s.snapshot("norom", "none");
    for lazy in [false, true] {
        let o = s.restore("norom", &format!("romfile={}", s.rom("small")), lazy, "1");
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(124), "accepted (lazy {lazy}), ran until --timeout: {e}");
        assert!(!e.contains("resized RAM block"), "{e}");
    }
}

#[test]
fn a_pinned_romsize_takes_a_smaller_snapshot_rom_eagerly_and_lazily() {
    let s = Setup::new("d");
    s.snapshot("small", "small");
    for lazy in [false, true] {
        let o = s.restore("small", &format!("romfile={},romsize=0x40000", s.rom("big")), lazy, "1");
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(124), "accepted (lazy {lazy}): {e}");
        assert!(e.contains(&format!("resized RAM block {BLOCK} to the snapshot's 0x1000 bytes")), "{e}");
    }
    // A romsize below the snapshot's ROM is refused, naming the snapshot's size.
    s.snapshot("big", "big");
    s.refused(
        "big",
        &format!("romfile={},romsize=0x8000", s.rom("small")),
        &[&format!("Size too large: {BLOCK}: 0x20000 > 0x8000"), "romsize=0x20000"],
    );
}

/// Through the daemon: a VM whose NIC has ROM image `net.rom` (0x1000) is snapshotted; the
/// image is then upgraded to a 0x20000 ROM (the case `romsize` exists for). A restore, eager
/// or lazy, is refused with the block, both sizes and the fixes, and leaves the daemon's VMs
/// and snapshots as they were; with the snapshot's ROM back in place it is accepted.
#[test]
fn the_api_refuses_a_restore_after_a_rom_upgrade_and_changes_nothing() {
    use common::daemon::Daemon;
    use serde_json::json;

    let s = Setup::new("e");
    let d = Daemon::start(s.dir.path(), &[]);
    let image = s.dir.path().join("state").join("images").join("net.rom");
    std::fs::write(&image, synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE)).expect("image");
    let net = json!([{"tap": s.tap, "romfile": "net.rom"}]);
    d.ok("POST", "/vms", Some(json!({"name": "src", "guest": "idle", "mem_mib": 16, "start": true, "net": net})));
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
    d.ok("DELETE", "/vms/src", None);

    std::fs::write(&image, synthetic(0x20000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE)).expect("upgraded image");
    let vms = d.ok("GET", "/vms", None);
    let snaps = d.ok("GET", "/snapshots", None);
    for mode in ["eager", "lazy"] {
        let (status, v) = d.call("POST", "/snapshots/s/restore", Some(json!({"vm": "r", "mode": mode})));
        let text = v.to_string();
        eprintln!("{mode}: {status} {text}");
        assert!((400..500).contains(&status), "refused as a client error ({mode}): {status} {text}");
        assert!(text.contains(&format!("Size mismatch: {BLOCK}: 0x1000 != 0x20000")), "{mode}: {text}");
        assert!(text.contains("romsize=0x20000") && text.contains("romfile= the ROM the snapshot"), "{mode}: {text}");
        assert_eq!(d.ok("GET", "/vms", None), vms, "no VM was left behind ({mode})");
        assert_eq!(d.ok("GET", "/snapshots", None), snaps, "the snapshots are as they were ({mode})");
    }

    // The fix named: the ROM the snapshot was taken with.
    std::fs::write(&image, synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE)).expect("image back");
    let r = d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "r", "mode": "eager"})));
    assert_eq!(r["name"], json!("r"), "{r}");
    d.ok("DELETE", "/vms/r", None);
}

/// The rest of the matrix through the daemon, with `network_overrides` carrying the ROM
/// options: the named fix `romsize` takes a ROM-upgraded restore; a snapshot ROM with
/// `"romfile": "none"` is refused naming the fix and changes nothing; a snapshot without a
/// ROM takes a destination ROM; a pinned `romsize` larger than the snapshot's is accepted.
#[test]
fn the_api_takes_the_rom_fixes_as_network_overrides() {
    use common::daemon::Daemon;
    use serde_json::json;

    let s = Setup::new("f");
    let d = Daemon::start(s.dir.path(), &[]);
    let images = s.dir.path().join("state").join("images");
    std::fs::write(images.join("small.rom"), synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE)).expect("image");
    std::fs::write(images.join("big.rom"), synthetic(0x20000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE)).expect("image");
    let snapshot = |vm: &str, snap: &str, romfile: &str| {
        let net = json!([{"tap": s.tap, "romfile": romfile}]);
        d.ok("POST", "/vms", Some(json!({"name": vm, "guest": "idle", "mem_mib": 16, "start": true, "net": net})));
        d.ok("POST", &format!("/vms/{vm}/snapshot"), Some(json!({"name": snap})));
        d.ok("DELETE", &format!("/vms/{vm}"), None);
    };
    snapshot("a", "small", "small.rom");
    snapshot("b", "norom", "none");
    let restore = |snap: &str, vm: &str, mode: &str, o: serde_json::Value| {
        d.call(
            "POST",
            &format!("/snapshots/{snap}/restore"),
            Some(json!({"vm": vm, "mode": mode, "network_overrides": [o]})),
        )
    };

    for mode in ["eager", "lazy"] {
        // Snapshot ROM 0x1000, destination ROM 0x20000: refused; with romsize=0x20000 taken.
        let (status, v) = restore("small", "r", mode, json!({"nic": 0, "romfile": "big.rom"}));
        assert!((400..500).contains(&status), "{mode}: {status} {v}");
        assert!(v.to_string().contains("romsize=0x20000"), "{mode}: {v}");
        let (status, v) = restore("small", "r", mode, json!({"nic": 0, "romfile": "big.rom", "romsize": 0x20000}));
        assert_eq!(status, 201, "the named fix through the API ({mode}): {v}");
        d.ok("DELETE", "/vms/r", None);

        // Snapshot ROM, destination none: refused, naming the fix, nothing changed.
        let vms = d.ok("GET", "/vms", None);
        let snaps = d.ok("GET", "/snapshots", None);
        let (status, v) = restore("small", "r", mode, json!({"nic": 0, "romfile": "none"}));
        let text = v.to_string();
        assert!((400..500).contains(&status), "{mode}: {status} {text}");
        assert!(
            text.contains(&format!("Unknown ramblock \\\"{BLOCK}\\\"")) && text.contains("romsize=0x1000"),
            "{text}"
        );
        assert_eq!(d.ok("GET", "/vms", None), vms, "no VM was left behind ({mode})");
        assert_eq!(d.ok("GET", "/snapshots", None), snaps, "the snapshots are as they were ({mode})");

        // Snapshot without a ROM, destination with one: accepted.
        let (status, v) = restore("norom", "r", mode, json!({"nic": 0, "romfile": "small.rom"}));
        assert_eq!(status, 201, "a destination ROM the snapshot lacks ({mode}): {v}");
        d.ok("DELETE", "/vms/r", None);

        // A pinned romsize at least the snapshot's: accepted (resized to the snapshot's).
        let (status, v) = restore("small", "r", mode, json!({"nic": 0, "romfile": "small.rom", "romsize": 0x40000}));
        assert_eq!(status, 201, "a pinned larger romsize ({mode}): {v}");
        d.ok("DELETE", "/vms/r", None);
    }
    // An override naming a ROM image that is not there is a client error naming it.
    let (status, v) = restore("small", "r", "eager", json!({"nic": 0, "romfile": "missing.rom"}));
    assert!((400..500).contains(&status) && v.to_string().contains("missing.rom"), "{status} {v}");
}
