//! Real firmware nobody here wrote: Debian's SeaBIOS boots in a snapvisor VM through the PC
//! platform (CMOS, i8042, PCI with the i440FX host bridge, fw_cfg) to its boot attempt, with
//! one and with two vCPUs.
//!
//! SeaBIOS runs at CPL0 and in real mode, which KVM emulates on hosts without hardware
//! virtualisation, so a run takes seconds to tens of seconds on a busy machine: the VM gets
//! minutes. With no bootable device SeaBIOS waits `etc/boot-fail-wait` (1 s here) and reboots
//! through port 0xcf9, which ends the run with snapvisor's reset status (126).

use std::path::Path;
use std::time::Instant;

mod common;
use common::snapvisor;

const SEABIOS: &str = "/usr/share/seabios/bios.bin";

/// Removes ANSI escape sequences (`ESC [ ... final`, `ESC c`, other two-byte escapes) and
/// carriage returns, which SeaBIOS's serial console sends around its text.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

struct Boot {
    serial: String,
    debugcon: String,
    stderr: String,
    status: Option<i32>,
    secs: f64,
}

fn boot(vcpus: &str) -> Boot {
    assert!(Path::new(SEABIOS).exists(), "{SEABIOS} is missing: install Debian's `seabios` package");
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("debugcon.log");
    let log_arg = log.to_str().expect("utf-8 path");
    let t0 = Instant::now();
    let o = snapvisor(&[
        "run",
        "--firmware",
        "seabios",
        "--mem-mib",
        "128",
        "--vcpus",
        vcpus,
        "--timeout",
        "240",
        "--debugcon",
        log_arg,
    ]);
    let secs = t0.elapsed().as_secs_f64();
    Boot {
        serial: strip_ansi(&String::from_utf8_lossy(&o.stdout)),
        debugcon: std::fs::read_to_string(&log).expect("debugcon log"),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        status: o.status.code(),
        secs,
    }
}

fn check(b: &Boot, vcpus: u32) {
    let ctx = format!(
        "status {:?} after {:.1} s\nstderr: {}\ndebugcon:\n{}\nserial:\n{}",
        b.status, b.secs, b.stderr, b.debugcon, b.serial
    );
    assert!(b.serial.contains("SeaBIOS (version 1.16.2-"), "no banner on the serial console\n{ctx}");
    for line in [
        "Found QEMU fw_cfg",
        "QEMU fw_cfg DMA interface supported",
        "Running on QEMU (i440fx)",
        "PS2 keyboard initialized",
    ] {
        assert!(b.debugcon.contains(line), "debugcon lacks {line:?}\n{ctx}");
    }
    assert!(
        b.debugcon.contains(&format!("Found {vcpus} cpu(s) max supported {vcpus} cpu(s)")),
        "wrong CPU count\n{ctx}"
    );
    assert!(b.debugcon.contains("No bootable device"), "SeaBIOS did not reach its boot attempt\n{ctx}");
    assert!(b.serial.contains("No bootable device"), "the boot attempt is not on the serial console\n{ctx}");
    let warnings: Vec<&str> = b.debugcon.lines().filter(|l| l.contains("WARNING")).collect();
    assert!(warnings.is_empty(), "SeaBIOS warned: {warnings:?}\n{ctx}");
    // After boot-fail-wait SeaBIOS reboots, which ends the run.
    assert_eq!(b.status, Some(126), "{ctx}");
    assert!(b.stderr.contains("the guest reset the machine"), "{ctx}");
    eprintln!("SeaBIOS with {vcpus} vCPU(s): run ended after {:.1} s", b.secs);
}

#[test]
fn seabios_boots_to_its_boot_attempt() {
    check(&boot("1"), 1);
}

#[test]
fn seabios_boots_with_two_vcpus() {
    check(&boot("2"), 2);
}

#[test]
fn ansi_escapes_are_stripped() {
    assert_eq!(strip_ansi("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\n"), "SeaBIOS\n");
}
