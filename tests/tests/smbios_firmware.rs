//! SMBIOS tables for firmware VMs, end to end: SeaBIOS takes snapvisor's tables from fw_cfg
//! (`etc/smbios/*`) instead of building its own, and prints the UUID given with `--uuid` from
//! them. A few seconds of SeaBIOS under this machine's emulating KVM.

mod common;

use std::time::Duration;

use common::run_firmware_until;

const UUID: &str = "8df288a9-e68e-4b7e-82b2-fdecc2c728cd";

#[test]
fn seabios_copies_snapvisors_smbios_tables_and_prints_their_uuid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = run_firmware_until(
        &["run", "--firmware", "seabios", "--mem-mib", "64", "--vcpus", "2", "--uuid", UUID],
        dir.path(),
        Duration::from_secs(180),
        |log| log.lines().any(|l| l.starts_with("Machine UUID") || l.contains("No bootable device")),
    );
    let log = &run.debugcon;
    assert!(log.contains("Copying SMBIOS"), "SeaBIOS placed no SMBIOS entry point:\n{log}");
    // SeaBIOS reads type 1's UUID (first three fields little-endian) back as text.
    assert!(log.lines().any(|l| l == format!("Machine UUID {UUID}")), "no Machine UUID line for {UUID}:\n{log}");
    assert!(!log.contains("WARNING"), "SeaBIOS warned:\n{log}");
}
