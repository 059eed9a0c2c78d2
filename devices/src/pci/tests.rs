//! The bus, the configuration ports and the host bridge together.

use std::sync::{Arc, Mutex};

use super::config::{BarKind, PciConfig, PciHeader, ROM_BAR};
use super::*;
use crate::bus::{Bus, BusDevice};

/// A mapper onto two real buses that records what it was told.
#[derive(Default)]
struct Mapper {
    pio: Bus,
    mmio: Bus,
    events: Mutex<Vec<String>>,
}

impl BarMapper for Mapper {
    fn map(&self, name: &'static str, r: BarRegion, dev: Arc<Mutex<dyn BusDevice>>) -> Result<(), String> {
        let bus = if r.space == BarSpace::Pio { &self.pio } else { &self.mmio };
        bus.insert(dev, r.addr, r.len).map_err(|e| e.to_string())?;
        self.events.lock().expect("lock").push(format!("map {name} {r}"));
        Ok(())
    }
    fn unmap(&self, r: BarRegion) {
        let bus = if r.space == BarSpace::Pio { &self.pio } else { &self.mmio };
        let _ = bus.remove(r.addr);
        self.events.lock().expect("lock").push(format!("unmap {r}"));
    }
}

impl Mapper {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.lock().expect("lock"))
    }
}

struct Echo;
impl BusDevice for Echo {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill((base + offset) as u8);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

struct TestDev {
    config: PciConfig,
    bar: Arc<Mutex<Echo>>,
}

impl PciDevice for TestDev {
    fn name(&self) -> &'static str {
        "test"
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

fn test_dev() -> TestDev {
    let mut config = PciConfig::new(PciHeader {
        vendor: 0x1af4,
        device: 0x1041,
        revision: 1,
        class: (0x02, 0, 0),
        subsystem_vendor: 0x1af4,
        subsystem: 1,
        interrupt_pin: 1,
    });
    config.add_bar(0, BarKind::Io, 0x20).expect("io");
    config.add_bar(1, BarKind::Mem32 { prefetchable: false }, 0x1000).expect("mem32");
    config.add_bar(2, BarKind::Mem64 { prefetchable: true }, 0x4000).expect("mem64");
    config.add_bar(ROM_BAR, BarKind::Rom, 0x800).expect("rom");
    TestDev { config, bar: Arc::new(Mutex::new(Echo)) }
}

const WINDOWS: PciWindows =
    PciWindows { io: (0x1000, 0x1_0000), mmio32: (0xc000_0000, 0xfec0_0000), mmio64: (1 << 40, 1 << 41) };

fn machine() -> (PciConfigIo, Arc<Mapper>, Arc<std::sync::atomic::AtomicU32>) {
    let mapper = Arc::new(Mapper::default());
    let mut bus = PciBus::new(WINDOWS, mapper.clone());
    bus.add(Bdf::new(0, 0), Arc::new(Mutex::new(HostBridge::new()))).expect("host bridge");
    bus.add(Bdf::new(3, 0), Arc::new(Mutex::new(test_dev()))).expect("device");
    let resets = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let r = resets.clone();
    let io = PciConfigIo::new(
        Arc::new(Mutex::new(bus)),
        Arc::new(move || _ = r.fetch_add(1, std::sync::atomic::Ordering::SeqCst)),
    );
    (io, mapper, resets)
}

fn addr(dev: u8, func: u8, reg: u8) -> u32 {
    0x8000_0000 | u32::from(dev) << 11 | u32::from(func) << 8 | u32::from(reg)
}

fn cfg_read(io: &mut PciConfigIo, a: u32, port_off: u64, len: usize) -> u32 {
    io.write(0xcf8, 0, &a.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(0xcf8, 4 + port_off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn cfg_write(io: &mut PciConfigIo, a: u32, port_off: u64, data: &[u8]) {
    io.write(0xcf8, 0, &a.to_le_bytes());
    io.write(0xcf8, 4 + port_off, data);
}

#[test]
fn mechanism_1_probe_reads_back_the_address() {
    let (mut io, _, _) = machine();
    io.write(0xcf8, 0, &0x8000_0000u32.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(0xcf8, 0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
    // Byte writes to 0xcf8 do not change the address register.
    io.write(0xcf8, 0, &[0x12]);
    io.read(0xcf8, 0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
}

#[test]
fn data_port_accesses_by_width_and_offset() {
    let (mut io, _, _) = machine();
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0), 0, 4), 0x1237_8086);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0), 2, 2), 0x1237);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0), 3, 1), 0x12);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 8), 0, 4), 0x0600_0002, "class 0600, revision 02");
    // Absent functions and other buses read all ones; the enable bit gates everything.
    assert_eq!(cfg_read(&mut io, addr(1, 0, 0), 0, 4), 0xffff_ffff);
    assert_eq!(cfg_read(&mut io, addr(0, 1, 0), 0, 2), 0xffff);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0) | 1 << 16, 0, 4), 0xffff_ffff);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0) & !0x8000_0000, 0, 4), 0xffff_ffff);
}

#[test]
fn host_bridge_pam_and_smram_are_stored() {
    let (mut io, _, _) = machine();
    cfg_write(&mut io, addr(0, 0, 0x58), 1, &[0x30]);
    cfg_write(&mut io, addr(0, 0, 0x5c), 0, &[0x33, 0x33, 0x33, 0x33]);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0x58), 0, 4) >> 8, 0x30);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0x5c), 0, 4), 0x3333_3333);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0x70), 2, 1), 0x02, "SMRAM at power-on");
    cfg_write(&mut io, addr(0, 0, 0x70), 2, &[0x0a]);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0x70), 2, 1), 0x0a);
    cfg_write(&mut io, addr(0, 0, 0x60), 0, &[0xff]);
    assert_eq!(cfg_read(&mut io, addr(0, 0, 0x60), 0, 1), 0, "other registers are read-only");
}

#[test]
fn bar_placement_changes_map_and_unmap() {
    let (mut io, mapper, _) = machine();
    let d = 3;
    cfg_write(&mut io, addr(d, 0, 0x10), 0, &0xc000u32.to_le_bytes());
    cfg_write(&mut io, addr(d, 0, 0x14), 0, &0xfebf_0000u32.to_le_bytes());
    cfg_write(&mut io, addr(d, 0, 0x18), 0, &0x0000_0000u32.to_le_bytes());
    cfg_write(&mut io, addr(d, 0, 0x1c), 0, &0x100u32.to_le_bytes());
    cfg_write(&mut io, addr(d, 0, 0x30), 0, &0xfeb8_0001u32.to_le_bytes());
    assert!(mapper.take().is_empty(), "nothing decodes before COMMAND enables it");
    cfg_write(&mut io, addr(d, 0, 0x04), 0, &[0x03, 0x00]);
    assert_eq!(
        mapper.take(),
        vec![
            "map test port 0xc000+0x20",
            "map test MMIO 0xfebf0000+0x1000",
            "map test MMIO 0x10000000000+0x4000",
            "map test MMIO 0xfeb80000+0x800",
        ]
    );
    let mut b = [0u8; 1];
    mapper.pio.read(0xc003, &mut b).expect("BAR 0 serves ports");
    assert_eq!(b[0], 0x03);
    // Moving a BAR unmaps the old place and maps the new one.
    cfg_write(&mut io, addr(d, 0, 0x14), 0, &0xfebe_0000u32.to_le_bytes());
    assert_eq!(mapper.take(), vec!["unmap MMIO 0xfebf0000+0x1000", "map test MMIO 0xfebe0000+0x1000"]);
    // Sizing with decoding on: unmapped while the BAR holds all ones, mapped again after.
    cfg_write(&mut io, addr(d, 0, 0x14), 0, &[0xff; 4]);
    assert_eq!(mapper.take(), vec!["unmap MMIO 0xfebe0000+0x1000"]);
    cfg_write(&mut io, addr(d, 0, 0x14), 0, &0xfebe_0000u32.to_le_bytes());
    assert_eq!(mapper.take(), vec!["map test MMIO 0xfebe0000+0x1000"]);
    // Turning memory decoding off unmaps every memory BAR and the ROM, but not I/O.
    cfg_write(&mut io, addr(d, 0, 0x04), 0, &[0x01, 0x00]);
    assert_eq!(
        mapper.take(),
        vec!["unmap MMIO 0xfebe0000+0x1000", "unmap MMIO 0x10000000000+0x4000", "unmap MMIO 0xfeb80000+0x800"]
    );
    // The ROM's own enable bit.
    cfg_write(&mut io, addr(d, 0, 0x04), 0, &[0x03, 0x00]);
    mapper.take();
    cfg_write(&mut io, addr(d, 0, 0x30), 0, &0xfeb8_0000u32.to_le_bytes());
    assert_eq!(mapper.take(), vec!["unmap MMIO 0xfeb80000+0x800"]);
}

#[test]
fn overlapping_and_out_of_window_placements_are_refused() {
    let (mut io, mapper, _) = machine();
    let d = 3;
    mapper.mmio.insert(Arc::new(Mutex::new(Echo)), 0xfebf_0800, 0x100).expect("something already there");
    cfg_write(&mut io, addr(d, 0, 0x14), 0, &0xfebf_0000u32.to_le_bytes());
    cfg_write(&mut io, addr(d, 0, 0x10), 0, &0x0100u32.to_le_bytes());
    cfg_write(&mut io, addr(d, 0, 0x04), 0, &[0x03, 0x00]);
    assert!(mapper.take().is_empty(), "an overlap and an I/O BAR below the window are left unmapped");
    let bus = io.bus().lock().expect("lock");
    assert_eq!(bus.mapped(Bdf::new(3, 0), 1), None);
    assert_eq!(bus.mapped(Bdf::new(3, 0), 0), None);
    drop(bus);
    cfg_write(&mut io, addr(d, 0, 0x14), 0, &0xfeb0_0000u32.to_le_bytes());
    assert_eq!(mapper.take(), vec!["map test MMIO 0xfeb00000+0x1000"], "a free place works");
}

#[test]
fn reset_control_at_0xcf9() {
    let (mut io, _, resets) = machine();
    io.write(0xcf8, 1, &[0x02]);
    assert_eq!(resets.load(std::sync::atomic::Ordering::SeqCst), 0);
    let mut b = [0u8];
    io.read(0xcf8, 1, &mut b);
    assert_eq!(b[0], 0x02);
    io.write(0xcf8, 1, &[0x06]);
    assert_eq!(resets.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn state_restores_config_and_remaps_bars() {
    let (mut io, _, _) = machine();
    let d = 3;
    cfg_write(&mut io, addr(d, 0, 0x14), 0, &0xfebf_0000u32.to_le_bytes());
    cfg_write(&mut io, addr(d, 0, 0x04), 0, &[0x02, 0x00]);
    cfg_write(&mut io, addr(0, 0, 0x58), 1, &[0x30]);
    let s = io.state();
    let (mut other, mapper, _) = machine();
    other.restore(&s).expect("restore");
    assert_eq!(mapper.take(), vec!["map test MMIO 0xfebf0000+0x1000"]);
    assert_eq!(cfg_read(&mut other, addr(0, 0, 0x58), 1, 1), 0x30);
    assert_eq!(other.state(), s);
    // A snapshot of another machine is refused before anything changes.
    let mut wrong = s.clone();
    wrong.bus.devices[1].config[0] = 0x86;
    assert!(matches!(other.restore(&wrong), Err(config_io::PciConfigIoError::Bus(PciError::Function { .. }))));
    let mut missing = s.clone();
    missing.bus.devices.pop();
    assert!(matches!(other.restore(&missing), Err(config_io::PciConfigIoError::Bus(PciError::MissingFunction { .. }))));
    let mut extra = s.clone();
    let mut e = extra.bus.devices[1].clone();
    e.devfn = Bdf::new(9, 0).0;
    extra.bus.devices.push(e);
    assert!(matches!(other.restore(&extra), Err(config_io::PciConfigIoError::Bus(PciError::UnknownFunction { .. }))));
}
