//! SeaBIOS VMs for tests: built, run until SeaBIOS ran its ACPI table-loader, read.

use std::path::Path;
use std::time::{Duration, Instant};

use hypervisor::acpi::AcpiTable;
use hypervisor::boot::files::BootFile;
use hypervisor::boot::firmware::{MAX_IMAGE, SEABIOS_PATH};
use hypervisor::vm::{BootSource, SharedOutput, Vm, VmConfig};

/// A SeaBIOS VM of 128 MiB, not started.
pub fn firmware_vm(tables: Vec<AcpiTable>) -> Vm {
    let fw = BootFile::read_path("firmware", Path::new(SEABIOS_PATH), MAX_IMAGE).expect("SeaBIOS (Debian seabios)");
    let mut cfg = VmConfig::new(128, 1, BootSource::Firmware, Box::new(SharedOutput::default()));
    cfg.firmware = Some(fw);
    cfg.acpi_tables = tables;
    Vm::new(cfg).expect("create the VM")
}

pub fn guest_read(vm: &Vm, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    vm.ram().device_memory().read(gpa, &mut v).expect("guest memory");
    v
}

/// An RSDP with valid checksums in the BIOS area: the loader has run to its end.
pub fn rsdp_in_fseg(vm: &Vm) -> bool {
    let area = guest_read(vm, 0xe_0000, 0x2_0000);
    (0..area.len() - 36).step_by(16).any(|i| {
        let r = &area[i..i + 36];
        let sum = |s: &[u8]| s.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        &r[..8] == b"RSD PTR " && sum(&r[..20]) == 0 && sum(r) == 0
    })
}

/// Starts `vm` and waits until SeaBIOS ran the table-loader (RSDP in place, VMGenID address
/// reported), then pauses it.
pub fn run_loader(vm: &mut Vm) {
    vm.start().expect("start");
    let t0 = Instant::now();
    let vmgenid = vm.devices().vmgenid.clone().expect("a firmware VM has VMGenID");
    while !(vmgenid.addr() != 0 && rsdp_in_fseg(vm)) {
        assert!(t0.elapsed() < Duration::from_secs(90), "SeaBIOS did not run the table-loader within 90 s");
        assert!(vm.control().exit_reason().is_none(), "the VM ended: {:?}", vm.control().exit_reason());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(vm.pause(), "pause");
}
