//! The bus: address ranges mapped to devices, for port I/O and for MMIO.
//!
//! One access shape for every device: `read(base, offset, data)` / `write(base, offset, data)`,
//! where `base` is where the range the access hit starts (a device may be mapped at several
//! ranges, such as the serial port on port 0x3f8 and at an MMIO alias) and `offset` is the
//! access's distance from it.
//!
//! Lock order: the bus's `RwLock` (read side, held only to find the device), then the device's
//! `Mutex` (held for the access). A device never calls back into a bus while locked.
//!
//! A read may park its vCPU thread in the VMM (the exit device's wait registers): the device
//! then returns the wait from [`BusDevice::take_park`] and the bus runs it after releasing
//! the device's `Mutex`, so that other vCPUs' accesses to the device do not wait behind it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use thiserror::Error;

use crate::latch::Park;

/// A device on a bus.
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
    /// A park the last read asked for (see the module doc): run by the bus, unlocked, and it
    /// gives the read's bytes.
    fn take_park(&mut self) -> Option<Park> {
        None
    }
}

/// Errors of bus accesses and of mapping devices.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps the device at {other:#x}+{other_len:#x}")]
    Overlap { base: u64, len: u64, other: u64, other_len: u64 },
    #[error("range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
    #[error("no device at {addr:#x}")]
    NoDevice { addr: u64 },
    #[error("access of {len} bytes at {addr:#x} runs past the end of its device's range")]
    Straddle { addr: u64, len: usize },
}

type Device = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping ranges, each mapped to a device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, (u64, Device)>>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    /// Maps `dev` at `base..base+len`.
    pub fn insert(&self, dev: Device, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let mut r = self.ranges.write().unwrap_or_else(PoisonError::into_inner);
        let before = r.range(..=base).next_back().map(|(b, (l, _))| (*b, *l));
        let after = r.range(base..).next().map(|(b, (l, _))| (*b, *l));
        for (other, other_len) in before.into_iter().chain(after) {
            if base < other + other_len && other < base + len {
                return Err(BusError::Overlap { base, len, other, other_len });
            }
        }
        r.insert(base, (len, dev));
        Ok(())
    }

    /// Unmaps the range starting at `base`.
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        self.ranges
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NoDevice { addr: base })
    }

    fn find(&self, addr: u64, len: usize) -> Result<(u64, Device), BusError> {
        let r = self.ranges.read().unwrap_or_else(PoisonError::into_inner);
        let (base, (range_len, dev)) = r.range(..=addr).next_back().ok_or(BusError::NoDevice { addr })?;
        if addr - base >= *range_len {
            return Err(BusError::NoDevice { addr });
        }
        if addr - base + len as u64 > *range_len {
            return Err(BusError::Straddle { addr, len });
        }
        Ok((*base, dev.clone()))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (base, dev) = self.find(addr, data.len())?;
        let park = {
            let mut d = dev.lock().unwrap_or_else(PoisonError::into_inner);
            d.read(base, addr - base, data);
            d.take_park()
        };
        if let Some(p) = park {
            p.finish(data);
        }
        Ok(())
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (base, dev) = self.find(addr, data.len())?;
        dev.lock().unwrap_or_else(PoisonError::into_inner).write(base, addr - base, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill((base + offset) as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_reports_base_and_offset() {
        let bus = Bus::new();
        let d = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d.clone(), 0x3f8, 8).expect("insert");
        bus.insert(d.clone(), 0x1000, 8).expect("alias");
        bus.write(0x3fd, &[1]).expect("write");
        bus.write(0x1002, &[2, 3]).expect("write");
        let mut b = [0u8; 1];
        bus.read(0x3f9, &mut b).expect("read");
        assert_eq!(b[0], 0xf9);
        assert_eq!(d.lock().expect("lock").0, vec![(0x3f8, 5, vec![1]), (0x1000, 2, vec![2, 3])]);
    }

    #[test]
    fn overlaps_gaps_and_straddles() {
        let bus = Bus::new();
        let d = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d.clone(), 0x100, 0x10).expect("insert");
        assert!(matches!(bus.insert(d.clone(), 0x108, 0x10), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(d.clone(), 0xf8, 0x10), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(d.clone(), 0x0, 0), Err(BusError::BadRange { .. })));
        bus.insert(d.clone(), 0x110, 0x10).expect("adjacent is fine");
        assert_eq!(bus.write(0x120, &[0]), Err(BusError::NoDevice { addr: 0x120 }));
        assert_eq!(bus.write(0x50, &[0]), Err(BusError::NoDevice { addr: 0x50 }));
        assert_eq!(bus.write(0x11e, &[0; 4]), Err(BusError::Straddle { addr: 0x11e, len: 4 }));
        bus.remove(0x110).expect("remove");
        assert!(bus.write(0x110, &[0]).is_err());
    }
}
