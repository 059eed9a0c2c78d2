//! SIGKILL of `snapvisor serve` at each step of its own operations, then a restart on the same
//! state directory (hostile7): during an image upload; during a restore (eager and lazy) and a
//! clone, right as the VM definitions appear; during a snapshot delete (between its manifest
//! file and its index entry) and a GC; and after SIGTERM with `--on-shutdown snapshot`, while
//! several VMs are snapshotted. After every kill the daemon starts again, every VM it lists
//! starts or is refused with a clear error (4xx naming the VM), the store verifies clean, the
//! committed snapshots restore byte for byte to what they held before any kill, and no
//! temporary file of the killed daemon is left behind (each kill would add one for good).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::ram::{assert_same_ram, ram_of, Ram};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions};
use hypervisor::vm::SharedOutput;
use serde_json::json;
use storage::Store;

fn kill(pid: u32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Names of the entries of `dir` (none if it is missing).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

/// Polls (every 100 µs, at most 30 s) until `seen()` holds, then SIGKILLs `pid`. False if it
/// never held.
fn kill_when(pid: u32, seen: &dyn Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen() {
        if Instant::now() > deadline {
            kill(pid);
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    kill(pid);
    true
}

/// An eager restore of `name`'s RAM, read from the store directly (the daemon is down).
fn restored_ram(store: &Store, name: &str) -> Ram {
    let opts = RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default()));
    let (vm, _) = snapshot::restore(store, name, opts).unwrap_or_else(|e| panic!("restore {name}: {e}"));
    ram_of(&vm)
}

/// Files a killed daemon may have left in the state directory: VM definitions and manifest
/// files being written, image uploads.
fn temporaries(state: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (dir, temp) in [("vms", ".tmp"), ("store/manifests", ".tmp-"), ("images", ".upload-"), ("pending", "clone-")] {
        let dir = state.join(dir);
        for n in entries(&dir) {
            if n.ends_with(temp) || n.starts_with(temp) {
                out.push(dir.join(n));
            }
        }
    }
    out
}

/// After a kill: the daemon (with `args`) starts on the state directory; every VM it lists
/// starts (and is deleted), or is refused with a clear 4xx naming it; it stops cleanly. Then the store verifies clean,
/// `kept` restore byte for byte, and no temporary file is left.
fn check_after_kill(dir: &Path, args: &[&str], kept: &[(&str, Ram)], what: &str, not_listed: Option<&str>) {
    let mut d = Daemon::start(dir, args);
    let vms = d.ok("GET", "/vms", None);
    for v in vms.as_array().expect("VM list") {
        let name = v["name"].as_str().or_else(|| v["def"]["name"].as_str()).expect("VM name").to_string();
        if let Some(prefix) = not_listed {
            assert!(!name.starts_with(prefix), "{what}: clone {name} of the killed request is still defined: {vms}");
        }
        let (status, body) = d.call("POST", &format!("/vms/{name}/start"), None);
        let ok = (200..300).contains(&status)
            || ((400..500).contains(&status) && body.to_string().contains(&format!("'{name}'")));
        assert!(ok, "{what}: starting listed VM {name}: {status} {body}");
        if (200..300).contains(&status) {
            d.ok("DELETE", &format!("/vms/{name}"), None);
        }
    }
    let (status, _) = d.terminate_within(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{what}: the restarted daemon did not stop cleanly: {status:?}");
    let left = temporaries(&d.state);
    assert!(left.is_empty(), "{what}: temporary files left behind after a restart: {left:?}");
    let store = Store::open(d.state.join("store")).unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
    for r in store.verify_all().expect("verify") {
        assert!(r.ok(), "{what}: verify: {:?}", r.errors);
    }
    let listed = store.list().expect("list");
    for (name, want) in kept {
        assert!(listed.iter().any(|n| n == name), "{what}: committed snapshot {name} is gone: {listed:?}");
        assert_same_ram(&restored_ram(&store, name), want, &format!("{what}: {name}"));
    }
}

/// An upload cut short by a SIGKILL leaves its hidden file in the image directory; the next
/// daemon must remove it (it is no one's any more), or every killed upload adds one for good.
#[test]
fn a_daemon_killed_during_image_uploads_leaves_no_upload_file_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("state/images");
    for round in 0..3 {
        let d = Daemon::start(dir.path(), &[]);
        let sock = d.socket.clone();
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) else { return };
            let len = 64 << 20;
            let head = format!(
                "PUT /images/kernel{round} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
            );
            let _ = s.write_all(head.as_bytes());
            // Part of the body, then the connection stays open until the kill.
            let _ = s.write_all(&vec![0x5a; 4 << 20]);
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut sink);
        });
        let upload_written = || {
            entries(&images)
                .iter()
                .any(|n| n.starts_with(".upload-") && std::fs::metadata(images.join(n)).is_ok_and(|m| m.len() > 0))
        };
        assert!(kill_when(d.child.id(), &upload_written), "round {round}: the upload never reached the disk");
        drop(d);
        let _ = sender.join();
        check_after_kill(dir.path(), &[], &[], &format!("round {round}: upload killed"), None);
    }
}

/// Two snapshots of a running 16 MiB memfill VM (stop-and-copy, then background, the second
/// incremental), taken by a daemon in `dir` that then stops cleanly; their RAM as an eager
/// restore gives it now, before any kill.
fn two_snapshots(dir: &Path) -> Vec<(&'static str, Ram)> {
    let mut d = Daemon::start(dir, &[]);
    d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "m", "guest": "memfill", "mem_mib": 16, "seed": 3, "passes": 0, "start": true})),
    );
    d.wait_serial("m", "memfill pass 1 ", Duration::from_secs(60));
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "s1", "mode": "stop"})));
    d.wait_serial("m", "memfill pass 3 ", Duration::from_secs(60));
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "s2", "mode": "background"})));
    d.ok("DELETE", "/vms/m", None);
    assert!(d.terminate_within(Duration::from_secs(30)).0.is_some_and(|s| s.success()));
    let store = Store::open(d.state.join("store")).expect("store");
    vec![("s1", restored_ram(&store, "s1")), ("s2", restored_ram(&store, "s2"))]
}

/// Sends `method path body` on its own connection from another thread and returns at once;
/// the answer (or the broken connection of a kill) is ignored.
fn send_async(
    d: &Daemon,
    method: &'static str,
    path: String,
    body: Option<serde_json::Value>,
) -> std::thread::JoinHandle<()> {
    let sock = d.socket.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) else { return };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(req.as_bytes());
        let _ = s.read_to_end(&mut Vec::new());
    })
}

/// Kills in the daemon's restores (eager, lazy), clones, creates, snapshot deletes and GCs,
/// each followed by a restart and the checks of [`check_after_kill`].
#[test]
fn kills_in_restores_clones_deletes_and_gc_leave_a_daemon_that_starts_and_snapshots_that_restore_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kept = two_snapshots(dir.path());
    let vms = dir.path().join("state/vms");
    let manifests = dir.path().join("state/store/manifests");
    for round in 0..12u32 {
        let d = Daemon::start(dir.path(), &[]);
        let pid = d.child.id();
        let what;
        // A clone request is all or nothing across a kill too (service/pending.rs).
        let mut not_listed = None;
        let sender = match round % 6 {
            step @ (0 | 1) => {
                // A restore, killed as its VM's definition appears (the VM runs by then; the
                // daemon has not listed it yet).
                let mode = if step == 0 { "eager" } else { "lazy" };
                what = format!("round {round}: {mode} restore killed at its definition write");
                let vm = format!("r{round}");
                let s = send_async(&d, "POST", "/snapshots/s2/restore".into(), Some(json!({"vm": vm, "mode": mode})));
                let seen = || entries(&vms).iter().any(|n| n.starts_with(&format!("{vm}.json")));
                assert!(kill_when(pid, &seen), "{what}: no definition was written");
                s
            }
            2 => {
                // A clone of three, killed as the first clone's definition appears.
                what = format!("round {round}: clone killed at its first definition write");
                let prefix = format!("c{round}-");
                let s =
                    send_async(&d, "POST", "/snapshots/s1/clone".into(), Some(json!({"prefix": prefix, "count": 3})));
                let seen = || entries(&vms).iter().any(|n| n.starts_with(&prefix));
                assert!(kill_when(pid, &seen), "{what}: no definition was written");
                not_listed = Some(prefix);
                s
            }
            3 => {
                // A snapshot delete, killed once its manifest file is gone (the index entry
                // goes next).
                what = format!("round {round}: snapshot delete killed as its manifest file went");
                let snap = format!("d{round}");
                d.ok("POST", "/snapshots/s1/restore", Some(json!({"vm": "t", "mode": "eager"})));
                d.ok("POST", "/vms/t/snapshot", Some(json!({"name": snap, "mode": "stop"})));
                d.ok("DELETE", "/vms/t", None);
                let s = send_async(&d, "DELETE", format!("/snapshots/{snap}"), None);
                let file = manifests.join(&snap);
                assert!(kill_when(pid, &|| !file.exists()), "{what}: the manifest file stayed");
                s
            }
            5 => {
                // A create with start, killed as its definition appears (before the start).
                what = format!("round {round}: create killed at its definition write");
                let vm = format!("n{round}");
                let def =
                    json!({"name": vm, "guest": "memfill", "mem_mib": 16, "seed": round, "passes": 0, "start": true});
                let s = send_async(&d, "POST", "/vms".into(), Some(def));
                let seen = || entries(&vms).iter().any(|n| n.starts_with(&format!("{vm}.json")));
                assert!(kill_when(pid, &seen), "{what}: no definition was written");
                s
            }
            _ => {
                // A GC with garbage to collect (a deleted snapshot of another memfill seed),
                // killed 0 to 9 ms in.
                let delay = Duration::from_millis(u64::from(round * 7 % 10));
                what = format!("round {round}: gc killed {delay:?} in");
                d.ok("POST", "/vms", Some(json!({"name": "g", "guest": "memfill", "mem_mib": 16, "seed": round + 50, "passes": 0, "start": true})));
                d.wait_serial("g", "memfill pass 1 ", Duration::from_secs(60));
                d.ok("POST", "/vms/g/snapshot", Some(json!({"name": "g", "mode": "stop"})));
                d.ok("DELETE", "/vms/g", None);
                d.ok("DELETE", "/snapshots/g", None);
                let s = send_async(&d, "POST", "/store/gc".into(), None);
                std::thread::sleep(delay);
                kill(pid);
                s
            }
        };
        drop(d);
        let _ = sender.join();
        check_after_kill(dir.path(), &[], &kept, &what, not_listed.as_deref());
        eprintln!("{what}: ok");
    }
}

/// SIGKILL after SIGTERM while `--on-shutdown snapshot` snapshots three running VMs, at
/// several delays: at the next start each VM runs on from its shutdown snapshot with its
/// memory intact (memfill checks all of it at every pass), or is listed stopped and starts
/// afresh; every VM whose shutdown snapshot was committed resumes; no shutdown snapshot is
/// left that nothing resumes from.
#[test]
fn kills_during_shutdown_snapshots_leave_every_vm_resumed_intact_or_startable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kept = two_snapshots(dir.path());
    let manifests = dir.path().join("state/store/manifests");
    let args = ["--on-shutdown", "snapshot"];
    let mut resumed = 0;
    // Kill points: a delay after SIGTERM, or the moment the n-th shutdown snapshot's manifest
    // file appears (committed; its VM's definition is saved next).
    let points =
        [(Some(0), 0), (Some(5), 0), (Some(25), 0), (None, 1), (None, 2), (None, 3), (Some(150), 0), (None, 1)];
    for (round, (delay_ms, nth)) in points.into_iter().enumerate() {
        let what = match delay_ms {
            Some(ms) => format!("round {round}: killed {ms} ms after SIGTERM"),
            None => format!("round {round}: killed as shutdown snapshot {nth} of 3 was committed"),
        };
        {
            let d = Daemon::start(dir.path(), &args);
            for i in 0..3 {
                let name = format!("v{i}");
                if d.call("GET", &format!("/vms/{name}"), None).0 == 404 {
                    let def = json!({"name": name, "guest": "memfill", "mem_mib": 16, "seed": 10 + i, "passes": 0, "start": true});
                    d.ok("POST", "/vms", Some(def));
                } else if d.call("GET", &format!("/vms/{name}"), None).1["state"] != "running" {
                    d.ok("POST", &format!("/vms/{name}/start"), None);
                }
                // (A resumed guest's log starts at the pass it resumed in.)
                let text = d.wait_serial(&name, "memfill pass ", Duration::from_secs(60));
                assert!(text.contains("memfill pass "), "{what}: VM {name} prints nothing: {text}");
            }
            // Named before the SIGTERM: a shutdown snapshot committed right after it must count.
            // Counted by name, not by number: a VM resumed in the previous round deletes the
            // snapshot it came from once resident, and a new shutdown snapshot deletes its VM's
            // previous one, so the number on disk can stay level while new ones commit.
            let before: Vec<String> =
                entries(&manifests).into_iter().filter(|n| n.starts_with("__shutdown-")).collect();
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
            match delay_ms {
                Some(ms) => {
                    std::thread::sleep(Duration::from_millis(ms));
                    kill(d.child.id());
                }
                None => {
                    let seen = || {
                        entries(&manifests)
                            .into_iter()
                            .filter(|n| n.starts_with("__shutdown-") && !before.contains(n))
                            .count()
                            >= nth
                    };
                    assert!(kill_when(d.child.id(), &seen), "{what}: fewer shutdown snapshots were taken");
                }
            }
        }
        let d = Daemon::start(dir.path(), &args);
        let mut running_now = 0;
        for i in 0..3 {
            let name = format!("v{i}");
            let (status, info) = d.call("GET", &format!("/vms/{name}"), None);
            assert_eq!(status, 200, "{what}: VM {name} is gone: {info}");
            if info["state"] == "running" {
                resumed += 1;
                running_now += 1;
                // Two complete passes after the resume, each finding the previous intact.
                let text = d.wait_serial(&name, "\n", Duration::from_secs(60));
                let n = common::memfill::passes(&text).len();
                d.wait_intact_passes(&name, n + 2, &format!("{what}: resumed VM"));
            } else {
                assert!(
                    info["resume_from"].is_null(),
                    "{what}: VM {name} names a snapshot it did not resume from: {info}"
                );
            }
        }
        // A committed shutdown snapshot is never lost: its VM's definition named it before
        // it was taken (when it was saved after the commit, a kill in between lost it).
        assert!(running_now >= nth, "{what}: {nth} shutdown snapshots were committed, {running_now} VMs resumed");
        // Shutdown snapshots on disk: only those a resumed VM still reads.
        let mut d = d;
        let running: Vec<String> = d
            .ok("GET", "/vms", None)
            .as_array()
            .expect("list")
            .iter()
            .filter(|v| v["state"] == "running")
            .map(|v| v["name"].as_str().expect("name").to_string())
            .collect();
        let shutdown_snaps: Vec<String> =
            entries(&manifests).into_iter().filter(|n| n.starts_with("__shutdown-")).collect();
        for s in &shutdown_snaps {
            assert!(
                running.iter().any(|v| s.ends_with(&format!("-{v}"))),
                "{what}: shutdown snapshot {s} resumes nothing"
            );
        }
        assert!(d.terminate_within(Duration::from_secs(60)).0.is_some_and(|s| s.success()), "{what}: stop");
        drop(d);
        check_after_kill(dir.path(), &args, &kept, &what, None);
        eprintln!("{what}: ok ({resumed} resumed so far)");
    }
}
