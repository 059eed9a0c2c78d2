//! A snapshot in use is pinned: while a restored VM still reads its memory from a snapshot,
//! deleting that snapshot is refused with an error naming the VM, and GC keeps its chunks, so
//! the VM runs on with correct memory (the memfill guest checks every word of the previous
//! pass). The pin goes when the VM is fully resident or goes away; then delete works. Through
//! the daemon, the refusal is a 409 naming the VM.

mod common;

use common::memfill::passes;

use std::time::{Duration, Instant};

use common::start_builtin;
use hypervisor::guests::{memfill, BootInfo, Builtin, MemfillMode};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use hypervisor::vm::{BuiltinParams, SharedOutput, Vm};
use serde_json::json;

const MEM: u64 = 256;
const SEED: u64 = 31;

/// Waits until the restored guest has completed `extra` passes after the snapshot, and checks
/// every pass: in order, the right checksum, the previous pattern intact.
fn check_passes(vm: &Vm, before: &str, out: &SharedOutput, extra: usize) {
    let done_before = passes(before).len();
    let deadline = Instant::now() + Duration::from_secs(120);
    let all = loop {
        let all = format!("{before}{}", out.text());
        if let Some(reason) = vm.control().exit_reason() {
            panic!("the restored VM stopped: {reason:?}\noutput: {all}");
        }
        if passes(&all).len() >= done_before + extra {
            break all;
        }
        assert!(Instant::now() < deadline, "no pass completed in time: {all}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let ranges = BootInfo::fill_ranges(&hypervisor::memory::e820_map(MEM << 20));
    for (i, (pass, sum, mis)) in passes(&all).into_iter().enumerate() {
        assert_eq!(pass, i as u64, "passes run in order: {all}");
        assert_eq!(mis, 0, "pass {pass} found the previous pattern damaged: {all}");
        assert_eq!(sum, memfill::checksum(&ranges, SEED + pass), "pass {pass} checksum: {all}");
    }
}

fn lazy(holder: &str, background_fill: bool, out: &SharedOutput) -> RestoreOptions {
    RestoreOptions {
        background_fill,
        pin_holder: holder.into(),
        ..RestoreOptions::new(RestoreMode::Lazy, Box::new(out.clone()))
    }
}

#[test]
fn a_snapshot_is_pinned_while_a_lazy_restore_fills_and_gc_cannot_take_its_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mut vm, out) = start_builtin(
        Builtin::Memfill,
        MEM,
        BuiltinParams { seed: SEED, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while passes(&out.text()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    snapshot::save(&vm, &store, "m", &SaveOptions { stay_paused: true, ..Default::default() }, &|_| {})
        .expect("snapshot");
    let before = out.text();
    assert!(!passes(&before).is_empty(), "snapshot after a complete pass: {before}");
    vm.stop("snapshot taken");
    drop(vm);

    // One VM fills only on faults (it stays non-resident: memfill never touches all of the
    // low 2 MiB), the other streams everything in the background.
    let (out1, out2) = (SharedOutput::default(), SharedOutput::default());
    let (mut one, _) = snapshot::restore(&store, "m", lazy("VM 'one'", false, &out1)).expect("restore one");
    let (mut two, _) = snapshot::restore(&store, "m", lazy("VM 'two'", true, &out2)).expect("restore two");
    one.start().expect("start one");
    two.start().expect("start two");
    assert!(!one.page_server().expect("lazy").is_resident());

    let deleted = store.delete("m");
    let gc = store.gc().expect("gc");
    // Without the pin the delete goes through, GC takes the chunks and the VMs crash on
    // `chunk ... is missing from the store`: check the VMs first to show that.
    check_passes(&one, &before, &out1, 1);
    check_passes(&two, &before, &out2, 1);
    let err = deleted.expect_err("a snapshot a VM still fills from cannot be deleted");
    let msg = err.to_string();
    assert!(matches!(&err, storage::StoreError::Pinned { .. }), "{err:?}");
    assert!(msg.contains("'m'") && msg.contains("VM 'one'"), "{msg}");
    assert_eq!(gc.chunks_removed, 0, "{gc:?}");
    assert!(store.contains("m").expect("contains"));

    // Fully resident: `two` lets go of the snapshot.
    assert!(snapshot::restore::wait_resident(&two, Duration::from_secs(60)), "two never became resident");
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.pin_holders("m").len() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(store.pin_holders("m"), vec!["VM 'one'".to_string()]);
    let err = store.delete("m").expect_err("still pinned by one");
    assert!(!err.to_string().contains("VM 'two'"), "{err}");

    // `one` goes away before it is resident: its pin goes with it.
    one.stop("test done");
    drop(one);
    assert!(store.pin_holders("m").is_empty());
    store.delete("m").expect("delete once no VM reads from it");
    let gc = store.gc().expect("gc");
    assert!(gc.chunks_removed > 0, "{gc:?}");
    // `two` is resident: it needs nothing from the store any more and carries on.
    check_passes(&two, &before, &out2, 2);
    two.stop("test done");
}

struct Daemon {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl Daemon {
    fn start(dir: &std::path::Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    fn start_with(dir: &std::path::Path, args: &[&str]) -> Daemon {
        let socket = dir.join("api.sock");
        let child = std::process::Command::new(common::snapvisor_bin())
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, socket }
    }

    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let (status, text) =
            hypervisor::service::client::request(&self.socket, method, path, body.as_ref()).expect("request");
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }
}

impl Daemon {
    /// SIGTERM, then wait for the exit.
    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "the daemon did not stop within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn serial(&self, vm: &str) -> String {
        let (_, v) = self.call("GET", &format!("/vms/{vm}/serial"), None);
        v.as_str().map(String::from).unwrap_or_else(|| v.to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_daemon_answers_409_naming_the_vm_while_a_restore_fills_from_the_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path());
    let (s, v) = d.call("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 512, "start": true})));
    assert!((200..300).contains(&s), "{s} {v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out) = d.call("GET", "/vms/m/serial", None);
        if out.as_str().is_some_and(|t| t.contains("memfill pass 0 ")) {
            break;
        }
        assert!(Instant::now() < deadline, "memfill never completed a pass: {out}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, v) = d.call("POST", "/vms/m/snapshot", Some(json!({"name": "s"})));
    assert!((200..300).contains(&s), "{s} {v}");
    assert_eq!(d.call("DELETE", "/vms/m", None).0, 204);

    // 512 MiB of patterned memory takes the background fill a good fraction of a second.
    let (s, v) = d.call("POST", "/snapshots/s/restore", Some(json!({"vm": "r", "mode": "lazy"})));
    assert!((200..300).contains(&s), "{s} {v}");
    let (s, v) = d.call("DELETE", "/snapshots/s", None);
    assert_eq!(s, 409, "{v}");
    let err = v["error"].as_str().expect("error message");
    assert!(err.contains("'s'") && err.contains("VM 'r'"), "{err}");
    // The VM goes away: the snapshot is free.
    assert_eq!(d.call("DELETE", "/vms/r", None).0, 204);
    assert_eq!(d.call("DELETE", "/snapshots/s", None).0, 204);

    // Once a restored VM is fully resident, the delete goes through and the VM runs on.
    d.call("POST", "/vms", Some(json!({"name": "m2", "guest": "memfill", "mem_mib": 64, "start": true})));
    let (s, v) = d.call("POST", "/vms/m2/snapshot", Some(json!({"name": "s2"})));
    assert!((200..300).contains(&s), "{s} {v}");
    let (s, v) = d.call("POST", "/snapshots/s2/restore", Some(json!({"vm": "r2", "mode": "lazy"})));
    assert!((200..300).contains(&s), "{s} {v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, v) = d.call("DELETE", "/snapshots/s2", None);
        if s == 204 {
            break;
        }
        assert_eq!(s, 409, "{v}");
        assert!(Instant::now() < deadline, "still pinned after 60 s: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.call("POST", "/store/gc", None).0, 200);
    assert_eq!(d.call("GET", "/vms/r2", None).1["state"], "running");
    assert_eq!(d.call("GET", "/snapshots", None).1, json!([]));
}

#[test]
fn a_vm_resumed_from_its_shutdown_snapshot_pins_it_and_a_second_shutdown_replaces_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--on-shutdown", "snapshot"];
    let d = Daemon::start_with(dir.path(), &args);
    let body = json!({"name": "m", "guest": "memfill", "mem_mib": 512, "seed": 3, "start": true});
    let (s, v) = d.call("POST", "/vms", Some(body));
    assert!((200..300).contains(&s), "{s} {v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.serial("m").contains("memfill pass 0 ") {
        assert!(Instant::now() < deadline, "memfill never completed a pass");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.terminate().success());

    // Resumed lazily at start: its shutdown snapshot is in use until it is resident.
    let d = Daemon::start_with(dir.path(), &args);
    let (_, names) = d.call("GET", "/snapshots", None);
    let names: Vec<String> = serde_json::from_value(names).expect("snapshot names");
    let [snap] = &names[..] else { panic!("one shutdown snapshot expected: {names:?}") };
    assert!(snap.starts_with("__shutdown-") && snap.ends_with("-m"), "{snap}");
    let (s, v) = d.call("DELETE", &format!("/snapshots/{snap}"), None);
    assert_eq!(s, 409, "{v}");
    let err = v["error"].as_str().expect("error message");
    assert!(err.contains(&format!("'{snap}'")) && err.contains("VM 'm'"), "{err}");
    // Shut down again at once: the new shutdown snapshot is committed first, so the VM comes
    // back from it with its memory intact, whether or not the old one was still pinned.
    assert!(d.terminate().success());
    let d = Daemon::start_with(dir.path(), &args);
    assert_eq!(d.call("GET", "/vms/m", None).1["state"], "running");
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = d.serial("m");
        if out.lines().any(|l| l.starts_with("memfill pass ") && l.contains(" mismatches ")) {
            break out;
        }
        assert!(Instant::now() < deadline, "the resumed VM completed no pass: {out:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(out.contains("mismatches 0") && !out.contains("memfill pass 0 "), "{out}");
    assert!(d.terminate().success());
}
