//! ioeventfds follow their BAR: registered where it is mapped, unregistered when it moves or
//! stops decoding.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::config::{BarKind, PciConfig, PciHeader};
use super::*;
use crate::bus::BusDevice;

#[derive(Default)]
struct Mapper {
    events: Mutex<Vec<String>>,
    refuse_ioevents: bool,
}

impl Mapper {
    fn log(&self, s: String) {
        self.events.lock().expect("lock").push(s);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.lock().expect("lock"))
    }
}

impl BarMapper for Mapper {
    fn map(&self, _name: &'static str, r: BarRegion, _dev: Arc<Mutex<dyn BusDevice>>) -> Result<(), String> {
        self.log(format!("map {r}"));
        Ok(())
    }
    fn unmap(&self, r: BarRegion) {
        self.log(format!("unmap {r}"));
    }
    fn map_ioevent(&self, _space: BarSpace, addr: u64, ev: &IoEvent) -> Result<(), String> {
        if self.refuse_ioevents {
            return Err("no ioeventfds here".into());
        }
        self.log(format!("ioevent {addr:#x} len {} match {:?}", ev.len, ev.datamatch));
        Ok(())
    }
    fn unmap_ioevent(&self, _space: BarSpace, addr: u64, _ev: &IoEvent) {
        self.log(format!("no ioevent {addr:#x}"));
    }
}

struct Nothing;
impl BusDevice for Nothing {
    fn read(&mut self, _base: u64, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

struct NotifyDev {
    config: PciConfig,
    fds: Vec<Arc<EventFd>>,
}

impl PciDevice for NotifyDev {
    fn name(&self) -> &'static str {
        "notify"
    }
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_device(&self, _index: usize) -> Option<Arc<Mutex<dyn BusDevice>>> {
        Some(Arc::new(Mutex::new(Nothing)))
    }
    fn ioevents(&self, index: usize) -> Vec<IoEvent> {
        if index != 4 {
            return Vec::new();
        }
        self.fds
            .iter()
            .enumerate()
            .map(|(q, fd)| IoEvent { offset: 0x3000 + 4 * q as u64, len: 0, datamatch: None, fd: fd.clone() })
            .collect()
    }
}

fn bus(refuse_ioevents: bool) -> (PciBus, Arc<Mapper>) {
    let mut config = PciConfig::new(PciHeader {
        vendor: 0x1af4,
        device: 0x1041,
        revision: 1,
        class: (0x02, 0, 0),
        subsystem_vendor: 0x1af4,
        subsystem: 1,
        interrupt_pin: 1,
    });
    config.add_bar(4, BarKind::Mem64 { prefetchable: true }, 0x4000).expect("bar 4");
    let fds = (0..2).map(|_| Arc::new(EventFd::new(0).expect("eventfd"))).collect();
    let mapper = Arc::new(Mapper { refuse_ioevents, ..Default::default() });
    let windows = PciWindows { io: (0x1000, 0x1_0000), mmio32: (0xc000_0000, 0xfec0_0000), mmio64: (1 << 40, 1 << 41) };
    let mut bus = PciBus::new(windows, mapper.clone());
    bus.add(Bdf::new(3, 0), Arc::new(Mutex::new(NotifyDev { config, fds }))).expect("add");
    (bus, mapper)
}

fn place(bus: &mut PciBus, lo: u32) {
    let bdf = Bdf::new(3, 0);
    bus.write(bdf, 0x20, &lo.to_le_bytes());
    bus.write(bdf, 0x24, &0u32.to_le_bytes());
}

#[test]
fn ioevents_follow_their_bar() {
    let (mut bus, mapper) = bus(false);
    let bdf = Bdf::new(3, 0);
    place(&mut bus, 0xfe00_0000);
    assert!(mapper.take().is_empty(), "nothing before decoding is on");
    bus.write(bdf, 0x04, &[0x06, 0x00]);
    assert_eq!(
        mapper.take(),
        vec![
            "map MMIO 0xfe000000+0x4000",
            "ioevent 0xfe003000 len 0 match None",
            "ioevent 0xfe003004 len 0 match None"
        ]
    );
    place(&mut bus, 0xfd00_0000);
    assert_eq!(
        mapper.take(),
        vec![
            "no ioevent 0xfe003000",
            "no ioevent 0xfe003004",
            "unmap MMIO 0xfe000000+0x4000",
            "map MMIO 0xfd000000+0x4000",
            "ioevent 0xfd003000 len 0 match None",
            "ioevent 0xfd003004 len 0 match None",
        ]
    );
    bus.write(bdf, 0x04, &[0x00, 0x00]);
    assert_eq!(mapper.take(), vec!["no ioevent 0xfd003000", "no ioevent 0xfd003004", "unmap MMIO 0xfd000000+0x4000"]);
}

#[test]
fn refused_ioevents_leave_the_bar_mapped_and_are_not_unregistered() {
    let (mut bus, mapper) = bus(true);
    let bdf = Bdf::new(3, 0);
    place(&mut bus, 0xfe00_0000);
    bus.write(bdf, 0x04, &[0x06, 0x00]);
    assert_eq!(mapper.take(), vec!["map MMIO 0xfe000000+0x4000"]);
    assert_eq!(bus.mapped(bdf, 4).map(|r| r.addr), Some(0xfe00_0000));
    bus.write(bdf, 0x04, &[0x00, 0x00]);
    assert_eq!(mapper.take(), vec!["unmap MMIO 0xfe000000+0x4000"]);
}
