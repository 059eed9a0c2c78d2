//! Real firmware nobody here wrote: Debian's SeaBIOS boots in a snapvisor VM through the PC
//! platform (CMOS, i8042, PCI with the i440FX host bridge, fw_cfg) to its boot attempt, with
//! one and with two vCPUs.
//!
//! SeaBIOS runs at CPL0 and in real mode, which KVM emulates on hosts without hardware
//! virtualisation, so a run takes seconds to tens of seconds on a busy machine: the VM gets
//! minutes. With no bootable device SeaBIOS waits `etc/boot-fail-wait` (1 s here) and reboots
//! through port 0xcf9: the VM resets in place (hypervisor::reset) and SeaBIOS runs again.

use std::path::Path;
use std::time::Duration;

mod common;
use common::{run_firmware_until, FirmwareRun};

const SEABIOS: &str = "/usr/share/seabios/bios.bin";
const BOOT_ATTEMPT: &str = "No bootable device";

/// Boots SeaBIOS until it has tried to boot, waited `etc/boot-fail-wait`, reset the machine
/// and tried again: two boot attempts.
fn boot(vcpus: &str) -> FirmwareRun {
    assert!(Path::new(SEABIOS).exists(), "{SEABIOS} is missing: install Debian's `seabios` package");
    let dir = tempfile::tempdir().expect("temp dir");
    run_firmware_until(
        &["run", "--firmware", "seabios", "--mem-mib", "128", "--vcpus", vcpus],
        dir.path(),
        Duration::from_secs(300),
        |log| log.matches(BOOT_ATTEMPT).count() >= 2,
    )
}

fn check(b: &FirmwareRun, vcpus: u32) {
    let ctx = format!("after {:.1} s\ndebugcon:\n{}\nserial:\n{}", b.secs, b.debugcon, b.serial);
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
    assert!(b.serial.contains(BOOT_ATTEMPT), "the boot attempt is not on the serial console\n{ctx}");
    let warnings: Vec<&str> = b.debugcon.lines().filter(|l| l.contains("WARNING")).collect();
    assert!(warnings.is_empty(), "SeaBIOS warned: {warnings:?}\n{ctx}");
    // After boot-fail-wait SeaBIOS resets the machine (port 0xcf9): the VM resets in place and
    // the firmware runs its whole POST again, finding the same machine.
    assert!(b.debugcon.contains("Rebooting."), "{ctx}");
    let second = &b.debugcon[b.debugcon.find("Rebooting.").unwrap_or(0)..];
    for line in
        ["Running on QEMU (i440fx)", &format!("Found {vcpus} cpu(s) max supported {vcpus} cpu(s)"), BOOT_ATTEMPT]
    {
        assert!(second.contains(line), "after the reset, debugcon lacks {line:?}\n{ctx}");
    }
    eprintln!("SeaBIOS with {vcpus} vCPU(s): two boot attempts and a reset in {:.1} s", b.secs);
}

#[test]
fn seabios_boots_to_its_boot_attempt_and_again_after_its_reset() {
    check(&boot("1"), 1);
}

#[test]
fn seabios_boots_with_two_vcpus() {
    check(&boot("2"), 2);
}
