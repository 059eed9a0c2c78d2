//! PCI bus 0: its functions, their BAR placements, and its saved state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::config::{PciConfig, ROM_BAR};
use super::{BarRegion, BarSpace, Bdf, PciError};
use crate::bus::BusDevice;

/// A PCI function.
pub trait PciDevice: Send {
    /// What it is, for logs and errors.
    fn name(&self) -> &'static str;
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// A configuration read; by default from the registers.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data)
    }
    /// A configuration write; by default through the masks.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data)
    }
    /// The bus device serving BAR `index` (0..=5, 6 for the ROM) once placed. It is called
    /// with `base` = the BAR's address and `offset` from it.
    fn bar_device(&self, _index: usize) -> Option<Arc<Mutex<dyn BusDevice>>> {
        None
    }
    /// RAM that BAR `index` decodes as memory instead of a bus device (the option ROM, mapped
    /// read-only). Taken over [`PciDevice::bar_device`] when both are given.
    fn bar_memory(&self, _index: usize) -> Option<Arc<migrate::ram::RamBlock>> {
        None
    }
    /// Eventfds to signal on writes inside BAR `index` (virtio notifications), as offsets from
    /// the BAR's base; the machine registers them with KVM wherever the BAR is placed.
    fn ioevents(&self, _index: usize) -> Vec<IoEvent> {
        Vec::new()
    }
    /// A bus reset: back to the function's power-on state.
    fn reset(&mut self) {
        self.config_mut().reset()
    }
}

/// A write inside a BAR that signals an eventfd instead of exiting to the VMM.
#[derive(Clone, Debug)]
pub struct IoEvent {
    /// From the BAR's base.
    pub offset: u64,
    /// Access length that matches (0: any).
    pub len: u32,
    /// Value that matches (none: any).
    pub datamatch: Option<u64>,
    pub fd: Arc<vmm_sys_util::eventfd::EventFd>,
}

/// Maps BAR regions onto the machine's buses (implemented by the machine).
pub trait BarMapper: Send + Sync {
    /// Puts `device` at `region`; an error (an overlap) leaves nothing mapped.
    fn map(&self, name: &'static str, region: BarRegion, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), String>;
    /// Removes what `map` put at `region`.
    fn unmap(&self, region: BarRegion);
    /// Maps `block` read-only as guest memory at `region` (an option ROM).
    fn map_memory(
        &self,
        _name: &'static str,
        _region: BarRegion,
        _block: Arc<migrate::ram::RamBlock>,
    ) -> Result<(), String> {
        Err("this machine cannot map BAR memory".into())
    }
    /// Removes what `map_memory` put at `region`.
    fn unmap_memory(&self, _region: BarRegion) {}
    /// Registers `ev` at `addr` (the BAR's base plus `ev.offset`) with the hypervisor.
    fn map_ioevent(&self, _space: BarSpace, _addr: u64, _ev: &IoEvent) -> Result<(), String> {
        Err("this machine has no ioeventfds".into())
    }
    /// Removes what `map_ioevent` registered.
    fn unmap_ioevent(&self, _space: BarSpace, _addr: u64, _ev: &IoEvent) {}
}

/// Where BARs may be placed (start, end exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    pub io: (u64, u64),
    pub mmio32: (u64, u64),
    pub mmio64: (u64, u64),
}

impl PciWindows {
    fn contains(&self, r: &BarRegion) -> bool {
        let inside = |(s, e): (u64, u64)| r.addr >= s && r.addr.checked_add(r.len).is_some_and(|end| end <= e);
        match r.space {
            BarSpace::Pio => inside(self.io),
            BarSpace::Mmio => inside(self.mmio32) || inside(self.mmio64),
        }
    }
}

/// One function's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceState {
    pub devfn: u8,
    pub name: String,
    pub config: Vec<u8>,
}

/// The bus's saved state: every function's configuration space.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciBusState {
    pub devices: Vec<PciDeviceState>,
}

/// Where a BAR should decode, and the device that serves it.
type WantedBar = (Option<BarRegion>, Option<Arc<Mutex<dyn BusDevice>>>);

struct Slot {
    device: Arc<Mutex<dyn PciDevice>>,
    mapped: [Option<BarRegion>; ROM_BAR + 1],
    /// The ioeventfds registered for each mapped BAR, to unregister them when it moves.
    ioevents: [Vec<IoEvent>; ROM_BAR + 1],
}

/// Bus 0.
pub struct PciBus {
    windows: PciWindows,
    mapper: Arc<dyn BarMapper>,
    slots: BTreeMap<Bdf, Slot>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `events` of a BAR just mapped at `region`; returns those the mapper took. One
/// refused (this KVM may have no ioeventfds) is left to the device's MMIO path, which signals
/// the same eventfd on a notify write that exits.
fn map_ioevents(mapper: &dyn BarMapper, region: BarRegion, events: Vec<IoEvent>, bdf: Bdf, name: &str) -> Vec<IoEvent> {
    let mut taken = Vec::with_capacity(events.len());
    for ev in events {
        if ev.offset >= region.len {
            tracing::warn!("PCI {bdf} {name}: ioevent at offset {:#x} is outside its BAR at {region}", ev.offset);
            continue;
        }
        match mapper.map_ioevent(region.space, region.addr + ev.offset, &ev) {
            Ok(()) => taken.push(ev),
            Err(e) => {
                tracing::debug!("PCI {bdf} {name}: ioevent at {:#x} not registered: {e}", region.addr + ev.offset)
            }
        }
    }
    taken
}

/// Unregisters what [`map_ioevents`] registered for the BAR that was at `region`.
fn unmap_ioevents(mapper: &dyn BarMapper, region: BarRegion, events: &mut Vec<IoEvent>) {
    for ev in events.drain(..) {
        mapper.unmap_ioevent(region.space, region.addr + ev.offset, &ev);
    }
}

impl PciBus {
    pub fn new(windows: PciWindows, mapper: Arc<dyn BarMapper>) -> Self {
        PciBus { windows, mapper, slots: BTreeMap::new() }
    }

    /// Puts `device` at `bdf`.
    pub fn add(&mut self, bdf: Bdf, device: Arc<Mutex<dyn PciDevice>>) -> Result<(), PciError> {
        if self.slots.contains_key(&bdf) {
            return Err(PciError::SlotTaken { bdf });
        }
        self.slots.insert(bdf, Slot { device, mapped: [None; ROM_BAR + 1], ioevents: Default::default() });
        self.update(bdf);
        Ok(())
    }

    /// The first slot with no function in it, as function 0.
    pub fn free_slot(&self) -> Result<Bdf, PciError> {
        (0..32)
            .map(|d| Bdf::new(d, 0))
            .find(|b| !self.slots.keys().any(|k| k.device() == b.device()))
            .ok_or(PciError::NoFreeSlot)
    }

    /// The function at `bdf`.
    pub fn device(&self, bdf: Bdf) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.slots.get(&bdf).map(|s| s.device.clone())
    }

    /// Where BAR `index` of `bdf` is mapped now.
    pub fn mapped(&self, bdf: Bdf, index: usize) -> Option<BarRegion> {
        self.slots.get(&bdf).and_then(|s| s.mapped.get(index).copied().flatten())
    }

    /// A configuration read; absent functions read all ones.
    pub fn read(&self, bdf: Bdf, offset: usize, data: &mut [u8]) {
        match self.slots.get(&bdf) {
            Some(s) => lock(&s.device).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write, then the BAR placements it changed.
    pub fn write(&mut self, bdf: Bdf, offset: usize, data: &[u8]) {
        let Some(s) = self.slots.get(&bdf) else { return };
        lock(&s.device).write_config(offset, data);
        self.update(bdf);
    }

    /// Brings the mappings of `bdf`'s BARs in line with its configuration space.
    fn update(&mut self, bdf: Bdf) {
        let windows = self.windows;
        let mapper = self.mapper.clone();
        let Some(slot) = self.slots.get_mut(&bdf) else { return };
        let (name, wanted) = {
            let d = lock(&slot.device);
            let wanted: Vec<WantedBar> = (0..=ROM_BAR).map(|i| (d.config().bar_region(i), d.bar_device(i))).collect();
            (d.name(), wanted)
        };
        for (i, (want, dev)) in wanted.into_iter().enumerate() {
            if slot.mapped[i] == want {
                continue;
            }
            if let Some(old) = slot.mapped[i].take() {
                unmap_ioevents(mapper.as_ref(), old, &mut slot.ioevents[i]);
                mapper.unmap(old);
                tracing::debug!("PCI {bdf} {name}: BAR {i} unmapped from {old}");
            }
            let (Some(region), Some(dev)) = (want, dev) else { continue };
            if !windows.contains(&region) {
                // Sizing writes all ones with decoding on: not worth more than a debug line.
                let sizing = region.addr | (region.len - 1) >= 0xffff_ffff;
                if sizing {
                    tracing::debug!("PCI {bdf} {name}: BAR {i} at {region} (sizing) left unmapped");
                } else {
                    tracing::warn!("PCI {bdf} {name}: BAR {i} at {region} is outside the PCI windows; left unmapped");
                }
                continue;
            }
            match mapper.map(name, region, dev) {
                Ok(()) => {
                    tracing::debug!("PCI {bdf} {name}: BAR {i} mapped at {region}");
                    slot.mapped[i] = Some(region);
                    let events = lock(&slot.device).ioevents(i);
                    slot.ioevents[i] = map_ioevents(mapper.as_ref(), region, events, bdf, name);
                }
                Err(e) => tracing::warn!("PCI {bdf} {name}: BAR {i} at {region} refused, left unmapped: {e}"),
            }
        }
    }

    /// A bus reset: every function back to power-on, every BAR unmapped.
    pub fn reset(&mut self) {
        let bdfs: Vec<Bdf> = self.slots.keys().copied().collect();
        for bdf in bdfs {
            if let Some(s) = self.slots.get(&bdf) {
                lock(&s.device).reset();
            }
            self.update(bdf);
        }
    }

    pub fn state(&self) -> PciBusState {
        PciBusState {
            devices: self
                .slots
                .iter()
                .map(|(bdf, s)| {
                    let d = lock(&s.device);
                    PciDeviceState { devfn: bdf.0, name: d.name().to_string(), config: d.config().bytes().to_vec() }
                })
                .collect(),
        }
    }

    /// Takes `s` (untrusted): every function of this bus must have its state in it and
    /// nothing else, each checked before any is changed; then BARs are mapped again.
    pub fn restore(&mut self, s: &PciBusState) -> Result<(), PciError> {
        let mut by_bdf = BTreeMap::new();
        for d in &s.devices {
            let bdf = Bdf(d.devfn);
            let slot = self.slots.get(&bdf).ok_or(PciError::UnknownFunction { bdf })?;
            lock(&slot.device)
                .config()
                .check_saved(&d.config)
                .map_err(|e| PciError::Function { bdf, source: Box::new(e) })?;
            by_bdf.insert(bdf, d);
        }
        if let Some((bdf, slot)) = self.slots.iter().find(|(b, _)| !by_bdf.contains_key(b)) {
            return Err(PciError::MissingFunction { bdf: *bdf, name: lock(&slot.device).name().to_string() });
        }
        for (bdf, d) in by_bdf {
            if let Some(slot) = self.slots.get(&bdf) {
                lock(&slot.device)
                    .config_mut()
                    .restore(&d.config)
                    .map_err(|e| PciError::Function { bdf, source: Box::new(e) })?;
            }
            self.update(bdf);
        }
        Ok(())
    }
}
