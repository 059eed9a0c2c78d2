//! An option ROM in a RAM block, mapped read-only through a PCI function's expansion ROM BAR,
//! run by real firmware: SeaBIOS sizes the ROM BAR, places it, enables it, reads the ROM
//! through the KVM memory slot snapvisor maps there, checks its signature, PCIR IDs and
//! checksum, copies it below 1 MiB and calls it (`Running option rom at ...`). A ROM for the
//! transitional ID 1af4:1000 runs too, because its block holds the copy patched to 1041 with
//! the checksum byte fixed; SeaBIOS refuses ROMs whose checksum is off.
//!
//! The function here is a stand-in for virtio-net (same IDs and class, no BARs but the ROM),
//! so the test needs nothing of the device model. SeaBIOS takes a few seconds here (real mode
//! is emulated); the test waits for lines, up to minutes.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::config::{BarKind, PciConfig, PciHeader, ROM_BAR};
use devices::pci::PciDevice;
use hypervisor::net::rom::{self, VIRTIO_NET_DEVICE, VIRTIO_NET_TRANSITIONAL, VIRTIO_VENDOR};
use hypervisor::net::{nic_bdf, rom_block_name};
use hypervisor::vm::{BootSource, SharedOutput, Vm, VmConfig};
use migrate::ram::RamBlock;

struct RomFunction {
    config: PciConfig,
    rom: Arc<RamBlock>,
}

impl PciDevice for RomFunction {
    fn name(&self) -> &'static str {
        "ROM function"
    }
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_memory(&self, index: usize) -> Option<Arc<RamBlock>> {
        (index == ROM_BAR).then(|| self.rom.clone())
    }
}

/// Boots SeaBIOS with a function at 00:03.0 whose ROM is `image`; returns the debug console
/// up to SeaBIOS's boot attempt, and the ROM block's KVM slots seen while it ran.
fn boot_with_rom(image: Vec<u8>) -> (String, Vec<(u64, u64, bool)>) {
    let debugcon = SharedOutput::default();
    let mut cfg = VmConfig::new(64, 1, BootSource::Firmware, Box::new(SharedOutput::default()));
    cfg.firmware = Some(hypervisor::boot::firmware::read_seabios().expect("Debian's seabios (deploy/install-deps.sh)"));
    cfg.debugcon_out = Some(Box::new(debugcon.clone()));
    let mut vm = Vm::new(cfg).expect("create VM");

    let parsed = rom::parse("test.rom", image).expect("a valid ROM");
    let bdf = nic_bdf(0);
    let block = rom::create_block(vm.registry(), bdf, &parsed, None).expect("ROM block");
    let mut config = PciConfig::new(PciHeader {
        vendor: VIRTIO_VENDOR,
        device: VIRTIO_NET_DEVICE,
        revision: 1,
        class: (0x02, 0x00, 0x00),
        subsystem_vendor: VIRTIO_VENDOR,
        subsystem: 1,
        interrupt_pin: 1,
    });
    config.add_bar(ROM_BAR, BarKind::Rom, block.used_length()).expect("ROM BAR");
    let f = Arc::new(Mutex::new(RomFunction { config, rom: block }));
    vm.devices().platform.pci_bus.lock().expect("lock").add(bdf, f).expect("add the function");

    vm.start().expect("start");
    let t0 = Instant::now();
    let idstr = rom_block_name(bdf);
    let mut slots = Vec::new();
    let text = loop {
        let text = String::from_utf8_lossy(&debugcon.0.lock().expect("lock")).into_owned();
        for (_, p, len) in vm.slots().slots_of(&idstr) {
            let s = (p.gpa, len, p.readonly);
            if !slots.contains(&s) {
                slots.push(s);
            }
        }
        if text.contains("No bootable device") || text.contains("Booting from ROM") {
            break text;
        }
        assert!(t0.elapsed() < Duration::from_secs(240), "SeaBIOS did not get to its boot attempt:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    };
    vm.stop("test over");
    (text, slots)
}

fn assert_rom_ran(text: &str, slots: &[(u64, u64, bool)]) {
    assert!(text.contains("PCI: init bdf=00:03.0 id=1af4:1041"), "SeaBIOS found the function:\n{text}");
    assert!(!text.contains("bad checksum"), "the ROM's checksum holds:\n{text}");
    let ran = text.lines().find(|l| l.contains("Running option rom at")).unwrap_or_else(|| {
        panic!("SeaBIOS did not run the ROM from the BAR:\n{text}");
    });
    eprintln!("SeaBIOS: {ran}");
    // SeaBIOS enables the ROM BAR only while it copies the ROM, so the 10 ms polling may miss
    // the slot; the ROM's bytes reach SeaBIOS only through it, which the line above proves.
    eprintln!("ROM block slots seen (gpa, len, read-only): {slots:x?}");
    assert!(slots.iter().all(|&(_, len, ro)| ro && len == 0x1000), "only read-only 4 KiB slots: {slots:x?}");
}

#[test]
fn seabios_runs_a_rom_read_through_the_read_only_rom_bar() {
    let (text, slots) = boot_with_rom(rom::synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE));
    assert_rom_ran(&text, &slots);
}

#[test]
fn seabios_runs_a_transitional_rom_patched_in_its_block() {
    let (text, slots) = boot_with_rom(rom::synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_TRANSITIONAL));
    assert_rom_ran(&text, &slots);
}
