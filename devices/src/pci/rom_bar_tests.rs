//! The expansion ROM BAR backed by RAM (`PciDevice::bar_memory`): mapped through
//! `BarMapper::map_memory` only while COMMAND.MEM and the ROM enable bit are both set.

use std::sync::{Arc, Mutex};

use migrate::ram::{RamBlock, RamBlockConfig, RamRegistry};

use super::config::{BarKind, PciConfig, PciHeader, COMMAND, ROM_ADDRESS, ROM_BAR};
use super::*;
use crate::bus::BusDevice;

/// Records map/unmap calls of both kinds.
#[derive(Default)]
struct Mapper {
    events: Mutex<Vec<String>>,
}

impl Mapper {
    fn push(&self, e: String) {
        self.events.lock().expect("lock").push(e);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.lock().expect("lock"))
    }
}

impl BarMapper for Mapper {
    fn map(&self, name: &'static str, r: BarRegion, _dev: Arc<Mutex<dyn BusDevice>>) -> Result<(), String> {
        self.push(format!("map {name} {r}"));
        Ok(())
    }
    fn unmap(&self, r: BarRegion) {
        self.push(format!("unmap {r}"));
    }
    fn map_memory(&self, name: &'static str, r: BarRegion, block: Arc<RamBlock>) -> Result<(), String> {
        self.push(format!("map_memory {name} {r} {}", block.idstr()));
        Ok(())
    }
    fn unmap_memory(&self, r: BarRegion) {
        self.push(format!("unmap_memory {r}"));
    }
}

struct RomDev {
    config: PciConfig,
    rom: Arc<RamBlock>,
}

impl PciDevice for RomDev {
    fn name(&self) -> &'static str {
        "romdev"
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

const WINDOWS: PciWindows =
    PciWindows { io: (0x1000, 0x1_0000), mmio32: (0xc000_0000, 0xfec0_0000), mmio64: (1 << 40, 1 << 41) };
const BDF: Bdf = Bdf(3 << 3);

fn bus() -> (PciBus, Arc<Mapper>) {
    let reg = RamRegistry::new();
    let rom = reg
        .add(RamBlockConfig {
            idstr: "0000:00:03.0/virtio-net-pci.rom".into(),
            size: 0x2000,
            max_size: 0x2000,
            page_size: 0,
            resizeable: false,
        })
        .expect("block");
    let mut config = PciConfig::new(PciHeader {
        vendor: 0x1af4,
        device: 0x1041,
        revision: 1,
        class: (0x02, 0, 0),
        subsystem_vendor: 0x1af4,
        subsystem: 1,
        interrupt_pin: 1,
    });
    config.add_bar(ROM_BAR, BarKind::Rom, 0x2000).expect("rom bar");
    let mapper = Arc::new(Mapper::default());
    let mut bus = PciBus::new(WINDOWS, mapper.clone());
    bus.add(BDF, Arc::new(Mutex::new(RomDev { config, rom }))).expect("add");
    (bus, mapper)
}

#[test]
fn the_rom_is_mapped_as_memory_only_with_mem_and_enable() {
    let (mut bus, m) = bus();
    assert!(m.take().is_empty(), "nothing decodes at power-on");

    // Sizing, as SeaBIOS does it (decoding off): the size mask reads back, nothing is mapped.
    bus.write(BDF, ROM_ADDRESS, &0xffff_f800u32.to_le_bytes());
    let mut v = [0u8; 4];
    bus.read(BDF, ROM_ADDRESS, &mut v);
    assert_eq!(u32::from_le_bytes(v), 0xffff_e000, "a 0x2000-byte ROM BAR");
    bus.write(BDF, ROM_ADDRESS, &0xfeb0_0000u32.to_le_bytes());
    bus.write(BDF, COMMAND, &2u16.to_le_bytes());
    assert!(m.take().is_empty(), "COMMAND.MEM without the ROM enable bit maps nothing");
    bus.write(BDF, ROM_ADDRESS, &0xfeb0_0001u32.to_le_bytes());
    assert_eq!(m.take(), ["map_memory romdev MMIO 0xfeb00000+0x2000 0000:00:03.0/virtio-net-pci.rom"]);
    assert_eq!(bus.mapped(BDF, ROM_BAR).map(|r| r.addr), Some(0xfeb0_0000));

    bus.write(BDF, COMMAND, &0u16.to_le_bytes());
    assert_eq!(m.take(), ["unmap_memory MMIO 0xfeb00000+0x2000"], "COMMAND.MEM off unmaps it");
    bus.write(BDF, ROM_ADDRESS, &0xfeb0_0000u32.to_le_bytes());
    bus.write(BDF, COMMAND, &2u16.to_le_bytes());
    assert!(m.take().is_empty(), "the enable bit is off");
    bus.write(BDF, ROM_ADDRESS, &0xfea0_0001u32.to_le_bytes());
    assert_eq!(m.take(), ["map_memory romdev MMIO 0xfea00000+0x2000 0000:00:03.0/virtio-net-pci.rom"]);
    bus.write(BDF, ROM_ADDRESS, &0xfe00_0001u32.to_le_bytes());
    assert_eq!(
        m.take(),
        [
            "unmap_memory MMIO 0xfea00000+0x2000",
            "map_memory romdev MMIO 0xfe000000+0x2000 0000:00:03.0/virtio-net-pci.rom"
        ],
        "a move unmaps, then maps at the new place"
    );

    // Moved onto RAM (outside the PCI windows): unmapped, and not mapped there.
    bus.write(BDF, ROM_ADDRESS, &0x0010_0001u32.to_le_bytes());
    assert_eq!(m.take(), ["unmap_memory MMIO 0xfe000000+0x2000"]);
    assert_eq!(bus.mapped(BDF, ROM_BAR), None);
    bus.write(BDF, ROM_ADDRESS, &0xfe00_0001u32.to_le_bytes());
    m.take();

    let state = bus.state();
    bus.reset();
    assert_eq!(m.take(), ["unmap_memory MMIO 0xfe000000+0x2000"], "a reset unmaps");
    bus.restore(&state).expect("restore");
    assert_eq!(
        m.take(),
        ["map_memory romdev MMIO 0xfe000000+0x2000 0000:00:03.0/virtio-net-pci.rom"],
        "the mapping follows the restored configuration"
    );
}
