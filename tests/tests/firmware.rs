//! SeaBIOS in snapvisor, end to end with the `snapvisor` binary and the daemon: a VM
//! snapshotted in the middle of SeaBIOS continues to the same final lines after an eager and
//! a lazy restore in a new process; the daemon boots firmware and serves the debug console;
//! firmware choices from API clients are names, never host paths.
//!
//! SeaBIOS runs here in a few seconds (real mode and CPL0 are emulated by this machine's KVM):
//! these tests wait for lines, never for fixed times, and give the firmware minutes.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::snapvisor_bin;
use serde_json::json;

/// SeaBIOS's last line before it gives up on booting (this machine has no boot device).
const BOOT_ATTEMPT: &str = "No bootable device";
const LIMIT: Duration = Duration::from_secs(180);

/// Runs `snapvisor ARGS` until file `log` has a line containing `needle`, then stops it;
/// returns the log. Panics with the log if the process ends or the limit passes first.
fn run_until(args: &[&str], log: &Path, needle: &str) -> String {
    let mut child = std::process::Command::new(snapvisor_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn snapvisor");
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l.contains(needle)) {
            let _ = child.kill();
            let _ = child.wait();
            // The process may have written a little more before the kill: read it all.
            return std::fs::read_to_string(log).unwrap_or(text);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            panic!(
                "snapvisor {args:?} ended ({status}) before `{needle}`:\n{}\nlog:\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(t0.elapsed() < LIMIT, "no `{needle}` within {LIMIT:?}; log:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The log up to and including the first line containing `needle`.
fn through(log: &str, needle: &str) -> String {
    let mut out = String::new();
    for l in log.split_inclusive('\n') {
        out.push_str(l);
        if l.contains(needle) {
            break;
        }
    }
    out
}

#[test]
fn seabios_snapshotted_mid_boot_continues_to_the_same_lines_after_eager_and_lazy_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let (store, full, before) = (p("store"), p("full.log"), p("before.log"));

    // The whole boot, for reference.
    let reference = run_until(
        &["run", "--firmware", "seabios", "--mem-mib", "64", "--debugcon", &full],
        Path::new(&full),
        BOOT_ATTEMPT,
    );
    let reference = through(&reference, BOOT_ATTEMPT);

    // The same boot, snapshotted after 1.5 s of it and stopped there.
    let out = std::process::Command::new(snapvisor_bin())
        .args(["run", "--firmware", "seabios", "--mem-mib", "64", "--debugcon", &before])
        .args(["--snapshot-after-ms", "1500", "--store", &store, "--name", "mid", "--exit-after-snapshot"])
        .output()
        .expect("run");
    assert!(out.status.success(), "snapshot run: {}", String::from_utf8_lossy(&out.stderr));
    let head = std::fs::read_to_string(&before).expect("debugcon log before the snapshot");
    assert!(head.contains("SeaBIOS (version"), "the snapshot was taken before SeaBIOS printed anything:\n{head}");
    assert!(!head.contains(BOOT_ATTEMPT), "the snapshot was taken after SeaBIOS finished; take it earlier:\n{head}");
    assert!(reference.starts_with(&head), "the first part differs from the reference boot:\n{head}\n---\n{reference}");

    for mode in ["eager", "lazy"] {
        let after = p(&format!("after-{mode}.log"));
        let mut args = vec!["restore", "--store", &store, "mid", "--debugcon", &after];
        if mode == "lazy" {
            args.push("--lazy");
        }
        let tail = through(&run_until(&args, Path::new(&after), BOOT_ATTEMPT), BOOT_ATTEMPT);
        assert_eq!(
            format!("{head}{tail}"),
            reference,
            "{mode} restore: the log before the snapshot and after the restore is not the reference boot's"
        );
    }
}

#[test]
fn the_daemon_boots_seabios_and_serves_its_debug_console() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("images");
    std::fs::create_dir(&images).expect("image dir");
    let d = Daemon::start(dir.path(), &["--image-dir", images.to_str().expect("utf-8")]);

    // A host path is not a firmware name; firmware with another boot source is refused.
    for (body, why) in [
        (json!({"name": "a", "firmware": "/usr/share/seabios/bios.bin", "mem_mib": 64}), "path"),
        (json!({"name": "a", "firmware": "../bios.bin", "mem_mib": 64}), "escape"),
        (json!({"name": "a", "firmware": "seabios", "guest": "idle", "mem_mib": 64}), "two sources"),
    ] {
        let (status, v) = d.call("POST", "/vms", Some(body));
        assert_eq!(status, 400, "{why}: {v}");
    }
    // An image that is not a firmware image (wrong size) is refused when the VM starts.
    let (status, v) = d.call("PUT", "/images/tiny", Some(json!("not firmware")));
    assert!((200..300).contains(&status), "upload: {status} {v}");
    d.ok("POST", "/vms", Some(json!({"name": "bad", "firmware": "tiny", "mem_mib": 64})));
    let (status, v) = d.call("POST", "/vms/bad/start", None);
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("multiple of 64 KiB"), "{v}");

    let info = d.ok("POST", "/vms", Some(json!({"name": "fw", "firmware": "seabios", "mem_mib": 64, "start": true})));
    assert_eq!(info["firmware"], "seabios", "{info}");
    let t0 = Instant::now();
    let log = loop {
        let (status, v) = d.call("GET", "/vms/fw/debugcon", None);
        assert_eq!(status, 200, "{v}");
        let text = v.as_str().map(String::from).unwrap_or_default();
        if text.contains(BOOT_ATTEMPT) || t0.elapsed() > LIMIT {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(log.contains("SeaBIOS (version"), "{log}");
    assert!(log.contains(BOOT_ATTEMPT), "no boot attempt within {LIMIT:?}:\n{log}");
    let (status, _) = d.call("GET", "/vms/nope/debugcon", None);
    assert_eq!(status, 404);

    // Snapshotted and restored by the daemon, the VM still says what it boots.
    d.ok("POST", "/vms/fw/snapshot", Some(json!({"name": "fw-snap"})));
    let restored = d.ok("POST", "/snapshots/fw-snap/restore", Some(json!({"vm": "fw2", "mode": "eager"})));
    assert_eq!(restored["firmware"], "seabios", "{restored}");
}
