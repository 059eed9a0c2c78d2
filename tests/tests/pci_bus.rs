//! The machine's PCI bus on a real VM: a function added to bus 0 and programmed through the
//! configuration ports gets its BAR put on the machine's MMIO bus (and recorded as a placed
//! device, so a BAR device without a snapshot fragment fails snapshots by name); moving the
//! BAR or turning decoding off takes it away again; a BAR placed over another is refused.

mod common;

use std::sync::{Arc, Mutex};

use common::{start_builtin, Scratch};
use devices::bus::BusDevice;
use devices::pci::config::{BarKind, PciConfig, PciHeader, COMMAND};
use devices::pci::{PciDevice, PciWindows};
use hypervisor::guests::Builtin;
use hypervisor::machine::BusKind;
use hypervisor::snapshot::{self, SaveOptions, SnapshotError};
use hypervisor::vm::{BuiltinParams, Vm};

/// A function with two 4 KiB memory BARs, both served by one register.
struct TestFunction {
    config: PciConfig,
    bar: Arc<Mutex<Scratch>>,
}

impl PciDevice for TestFunction {
    fn name(&self) -> &'static str {
        "test function"
    }
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_device(&self, _index: usize) -> Option<Arc<Mutex<dyn BusDevice>>> {
        Some(self.bar.clone())
    }
}

fn config_write(vm: &Vm, device: u8, reg: u8, data: &[u8]) {
    let addr = 0x8000_0000u32 | u32::from(device) << 11 | u32::from(reg & 0xfc);
    let mut io = vm.devices().platform.pci_config.lock().expect("lock");
    io.write(0xcf8, 0, &addr.to_le_bytes());
    io.write(0xcf8, 4 + u64::from(reg & 3), data);
}

fn bars(vm: &Vm) -> Vec<(String, u64)> {
    vm.devices()
        .placed()
        .into_iter()
        .filter(|p| p.bus == BusKind::Mmio && p.name == "test function")
        .map(|p| (p.name.to_string(), p.addr))
        .collect()
}

#[test]
fn bars_are_placed_on_the_machine_bus_and_must_be_saved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("open store");
    let (mut vm, _out) = start_builtin(Builtin::Idle, 16, BuiltinParams::default());
    let opts = SaveOptions::default();
    snapshot::save(&vm, &store, "platform", &opts, &|_| {}).expect("the platform devices all have fragments");

    let mut config = PciConfig::new(PciHeader {
        vendor: 0x1af4,
        device: 0x10ff,
        revision: 0,
        class: (0xff, 0, 0),
        subsystem_vendor: 0x1af4,
        subsystem: 0,
        interrupt_pin: 0,
    });
    config.add_bar(0, BarKind::Mem32 { prefetchable: false }, 0x1000).expect("BAR 0");
    config.add_bar(1, BarKind::Mem32 { prefetchable: false }, 0x1000).expect("BAR 1");
    let f = Arc::new(Mutex::new(TestFunction { config, bar: Arc::new(Mutex::new(Scratch(0))) }));
    let slot = {
        let mut bus = vm.devices().platform.pci_bus.lock().expect("lock");
        let bdf = bus.free_slot().expect("a free slot");
        bus.add(bdf, f).expect("add the function");
        bdf.device()
    };
    assert_eq!(slot, 1, "slot 0 is the host bridge");

    config_write(&vm, slot, 0x10, &0xfebf_0000u32.to_le_bytes());
    config_write(&vm, slot, 0x14, &0xfebf_0000u32.to_le_bytes());
    assert!(bars(&vm).is_empty(), "nothing decodes before COMMAND.MEM");
    config_write(&vm, slot, COMMAND as u8, &[0x02, 0x00]);
    assert_eq!(bars(&vm), vec![("test function".to_string(), 0xfebf_0000)], "BAR 1 overlaps BAR 0 and is refused");

    let err = snapshot::save(&vm, &store, "with-bar", &opts, &|_| {}).expect_err("a BAR device with no fragment");
    assert!(matches!(err, SnapshotError::DeviceNotSaved { .. }), "{err}");
    assert!(err.to_string().contains("'test function'") && err.to_string().contains("MMIO 0xfebf0000"), "{err}");

    config_write(&vm, slot, 0x14, &0xfebe_0000u32.to_le_bytes());
    assert_eq!(
        bars(&vm),
        vec![("test function".to_string(), 0xfebf_0000), ("test function".to_string(), 0xfebe_0000)],
        "moved to a free place, BAR 1 is mapped"
    );
    config_write(&vm, slot, COMMAND as u8, &[0x00, 0x00]);
    assert!(bars(&vm).is_empty(), "decoding off unmaps both");
    vm.stop("test over");
}

#[test]
fn pci_windows_follow_the_memory_size() {
    let small: PciWindows = hypervisor::platform::pci_windows(128 << 20);
    assert_eq!(small.mmio32, (0x0800_0000, 0xfec0_0000), "from the end of low RAM, as QEMU's PCI hole");
    assert_eq!(small.mmio64.0, 1 << 32);
    let big = hypervisor::platform::pci_windows(8 << 30);
    assert_eq!(big.mmio32, (0xc000_0000, 0xfec0_0000));
    assert_eq!(big.mmio64.0, 9 << 30, "above the 5 GiB of RAM over 4 GiB");
    assert_eq!(big.io, (0x1000, 0x1_0000));
}
