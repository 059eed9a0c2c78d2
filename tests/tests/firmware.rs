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
use common::{run_firmware_until, snapvisor_bin};
use serde_json::json;

/// SeaBIOS's last line before it gives up on booting (this machine has no boot device).
const BOOT_ATTEMPT: &str = "No bootable device";
const LIMIT: Duration = Duration::from_secs(180);

/// Runs `snapvisor ARGS` until its debug console has a line containing `needle`; returns
/// that log.
fn run_until(args: &[&str], dir: &Path, needle: &str) -> String {
    run_firmware_until(args, dir, LIMIT, |log| log.lines().any(|l| l.contains(needle))).debugcon
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
    let (store, before) = (p("store"), p("before.log"));

    // The whole boot, for reference.
    let reference =
        run_firmware_until(&["run", "--firmware", "seabios", "--mem-mib", "64"], dir.path(), LIMIT, |log| {
            log.lines().any(|l| l.contains(BOOT_ATTEMPT))
        });
    let boot_ms = (reference.secs * 1e3) as u64;
    let reference = through(&reference.debugcon, BOOT_ATTEMPT);

    // The same boot, snapshotted part of the way through and stopped there. How fast SeaBIOS
    // runs differs between machines (1.2 s to several seconds): the snapshot is taken at 40%
    // of the reference boot's time, earlier if that was already past its end, later if
    // SeaBIOS had not printed anything yet.
    let mut after_ms = (boot_ms * 2 / 5).max(50);
    let mut head = String::new();
    for attempt in 0..8 {
        let _ = std::fs::remove_dir_all(&store);
        let after = after_ms.to_string();
        let out = std::process::Command::new(snapvisor_bin())
            .args(["run", "--firmware", "seabios", "--mem-mib", "64", "--debugcon", &before])
            .args(["--snapshot-after-ms", &after, "--store", &store, "--name", "mid", "--exit-after-snapshot"])
            .output()
            .expect("run");
        assert!(out.status.success(), "snapshot run: {}", String::from_utf8_lossy(&out.stderr));
        head = std::fs::read_to_string(&before).expect("debugcon log before the snapshot");
        let (early, late) = (!head.contains("SeaBIOS (version"), head.contains(BOOT_ATTEMPT));
        if !early && !late || attempt == 7 {
            break;
        }
        after_ms = if late { after_ms / 2 } else { after_ms * 3 / 2 };
    }
    assert!(head.contains("SeaBIOS (version"), "the snapshot was taken before SeaBIOS printed anything:\n{head}");
    assert!(!head.contains(BOOT_ATTEMPT), "the snapshot was taken after SeaBIOS finished; take it earlier:\n{head}");
    assert!(reference.starts_with(&head), "the first part differs from the reference boot:\n{head}\n---\n{reference}");

    for mode in ["eager", "lazy"] {
        let mut args = vec!["restore", "--store", &store, "mid"];
        if mode == "lazy" {
            args.push("--lazy");
        }
        let tail = through(&run_until(&args, dir.path(), BOOT_ATTEMPT), BOOT_ATTEMPT);
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
        (json!({"name": "a", "firmware": "seabios", "cmdline": "x", "mem_mib": 64}), "cmdline without kernel"),
        (json!({"name": "a", "firmware": "seabios", "initrd": "i", "mem_mib": 64}), "initrd without kernel"),
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

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

#[test]
fn firmware_vms_leave_nothing_behind() {
    use hypervisor::vm::{BootSource, SharedOutput, Vm, VmConfig};
    let image = hypervisor::cli::run::read_firmware("seabios").expect("SeaBIOS");
    let run = || {
        let debugcon = SharedOutput::default();
        let mut cfg = VmConfig::new(256, 2, BootSource::Firmware, Box::new(SharedOutput::default()));
        cfg.firmware = Some(image.clone());
        cfg.debugcon_out = Some(Box::new(debugcon.clone()));
        let mut vm = Vm::new(cfg).expect("firmware VM");
        vm.start().expect("start");
        // Past the table-loader (ACPI blobs built, VMGenID address written) and the e820 dump.
        let t0 = Instant::now();
        while !debugcon.text().contains("e820 map") {
            assert!(t0.elapsed() < LIMIT, "SeaBIOS did not get far:\n{}", debugcon.text());
            std::thread::sleep(Duration::from_millis(20));
        }
        // Touch all of guest RAM so a leaked VM would show in RSS.
        let mem = vm.ram().device_memory().clone();
        let chunk = vec![0x5au8; 1 << 20];
        for off in (2u64 << 20..250 << 20).step_by(1 << 20) {
            mem.write(off, &chunk).expect("write guest RAM");
        }
        vm.stop("test done");
    };
    run();
    let (fds, rss) = (open_fds(), rss_kib());
    for _ in 0..3 {
        run();
    }
    let (fds_after, rss_after) = (open_fds(), rss_kib());
    assert!(fds_after <= fds, "file descriptors grew from {fds} to {fds_after}: a firmware VM was not freed");
    assert!(rss_after < rss + 128 * 1024, "RSS grew from {rss} KiB to {rss_after} KiB: a firmware VM was not freed");
}
