//! A PCI function's type-0 configuration space as registers plus masks: 256 bytes, a
//! write mask (bits the guest may change), a write-1-to-clear mask (status bits), and the
//! bytes as built, which `reset` returns to.
//!
//! ```text
//! 0x00 vendor  0x02 device  0x04 command  0x06 status  0x08 rev  0x09 class (3 bytes)
//! 0x0c cache line  0x0d latency  0x0e header type  0x10..0x27 BAR0..BAR5
//! 0x2c subsystem vendor  0x2e subsystem  0x30 expansion ROM BAR  0x34 capability pointer
//! 0x3c interrupt line  0x3d interrupt pin
//! ```
//!
//! BARs (the low bits are read-only and say what the BAR is; the address bits above the
//! region's size are writable, so writing all ones reads back the size mask):
//!
//! ```text
//! I/O     bit 0 = 1, bit 1 = 0, bits 31:2 address          (size 4 .. 64 KiB)
//! mem32   bits 2:1 = 00, bit 3 = prefetchable, 31:4 address (size 16 .. 2 GiB)
//! mem64   bits 2:1 = 10, bit 3 = prefetchable, 31:4 low address; the next BAR holds 63:32
//! ROM     0x30: bit 0 = enable, bits 31:11 address          (size 2 KiB .. 2 GiB)
//! ```
//!
//! COMMAND bit 0 turns decoding of I/O BARs on, bit 1 of memory BARs and the ROM (which also
//! needs its own enable bit). Capabilities are chained from 0x34, each `id, next, body`,
//! placed from 0x40 upwards by [`PciConfig::add_capability`].

use super::{BarRegion, BarSpace, PciError};

/// Size of a conventional configuration space.
pub const CONFIG_LEN: usize = 256;
/// Standard BARs, and the index used for the expansion ROM BAR.
pub const NUM_BARS: usize = 6;
pub const ROM_BAR: usize = 6;
/// Register offsets.
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const ROM_ADDRESS: usize = 0x30;
pub const CAPABILITY_LIST: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
/// COMMAND bits.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_MASTER: u16 = 1 << 2;
/// COMMAND bits the guest may write: I/O, memory, bus master, parity, SERR, INTx disable.
const COMMAND_WMASK: u16 = 0x0547;
/// STATUS bit 4: a capability list exists.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// STATUS bits that are write-1-to-clear: master data parity error, signalled target abort,
/// received target abort, received master abort, signalled system error, detected parity error.
const STATUS_W1C: u16 = 0xf900;
/// First capability offset.
const CAP_START: usize = 0x40;
/// ROM BAR enable bit.
pub const ROM_ENABLE: u32 = 1;

/// What a BAR is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32 { prefetchable: bool },
    Mem64 { prefetchable: bool },
    Rom,
}

/// The identity of a function, as its header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    /// 0 for none, 1..=4 for INTA..INTD.
    pub interrupt_pin: u8,
}

/// A function's configuration space.
#[derive(Clone)]
pub struct PciConfig {
    bytes: [u8; CONFIG_LEN],
    wmask: [u8; CONFIG_LEN],
    w1c: [u8; CONFIG_LEN],
    initial: [u8; CONFIG_LEN],
    bars: [Option<(BarKind, u64)>; NUM_BARS + 1],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfig {
    /// A type-0 header for `h`, no BARs, no capabilities.
    pub fn new(h: PciHeader) -> Self {
        let mut c = PciConfig {
            bytes: [0; CONFIG_LEN],
            wmask: [0; CONFIG_LEN],
            w1c: [0; CONFIG_LEN],
            initial: [0; CONFIG_LEN],
            bars: [None; NUM_BARS + 1],
            last_cap: None,
            next_cap: CAP_START,
        };
        c.set16(VENDOR_ID, h.vendor);
        c.set16(0x02, h.device);
        c.bytes[0x08] = h.revision;
        c.bytes[0x09] = h.class.2;
        c.bytes[0x0a] = h.class.1;
        c.bytes[0x0b] = h.class.0;
        c.set16(SUBSYSTEM_VENDOR_ID, h.subsystem_vendor);
        c.set16(0x2e, h.subsystem);
        c.bytes[INTERRUPT_PIN] = h.interrupt_pin;
        c.wmask[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WMASK.to_le_bytes());
        c.w1c[STATUS..STATUS + 2].copy_from_slice(&STATUS_W1C.to_le_bytes());
        c.wmask[0x0c] = 0xff;
        c.wmask[0x0d] = 0xff;
        c.wmask[INTERRUPT_LINE] = 0xff;
        c.initial = c.bytes;
        c
    }

    fn set16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn get32(&self, at: usize) -> u32 {
        u32::from_le_bytes([self.bytes[at], self.bytes[at + 1], self.bytes[at + 2], self.bytes[at + 3]])
    }

    /// Sets bytes at `at` as built (they are also what `reset` returns to).
    pub fn set_initial(&mut self, at: usize, data: &[u8]) -> Result<(), PciError> {
        let end = at
            .checked_add(data.len())
            .filter(|&e| e <= CONFIG_LEN)
            .ok_or(PciError::ConfigRange { at, len: data.len() })?;
        self.bytes[at..end].copy_from_slice(data);
        self.initial[at..end].copy_from_slice(data);
        Ok(())
    }

    /// Makes the bits set in `mask` at `at` writable by the guest.
    pub fn set_wmask(&mut self, at: usize, mask: &[u8]) -> Result<(), PciError> {
        let end = at
            .checked_add(mask.len())
            .filter(|&e| e <= CONFIG_LEN)
            .ok_or(PciError::ConfigRange { at, len: mask.len() })?;
        self.wmask[at..end].copy_from_slice(mask);
        Ok(())
    }

    /// Makes the bits set in `mask` at `at` write-1-to-clear.
    pub fn set_w1c(&mut self, at: usize, mask: &[u8]) -> Result<(), PciError> {
        let end = at
            .checked_add(mask.len())
            .filter(|&e| e <= CONFIG_LEN)
            .ok_or(PciError::ConfigRange { at, len: mask.len() })?;
        self.w1c[at..end].copy_from_slice(mask);
        Ok(())
    }

    /// Declares BAR `index` (0..6, or [`ROM_BAR`] with [`BarKind::Rom`]) of `size` bytes, a
    /// power of two. A 64-bit BAR also takes `index + 1`.
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64) -> Result<(), PciError> {
        let bad = |reason: &str| PciError::Bar { index, reason: reason.to_string() };
        let (min, max) = match kind {
            BarKind::Io => (4, 0x1_0000),
            BarKind::Mem32 { .. } => (16, 1 << 31),
            BarKind::Mem64 { .. } => (16, 1 << 62),
            BarKind::Rom => (0x800, 1 << 31),
        };
        if !size.is_power_of_two() || !(min..=max).contains(&size) {
            return Err(bad(&format!("size {size:#x} is not a power of two from {min:#x} to {max:#x}")));
        }
        if (kind == BarKind::Rom) != (index == ROM_BAR) {
            return Err(bad("the expansion ROM is BAR 6, and BAR 6 is the expansion ROM"));
        }
        let wide = matches!(kind, BarKind::Mem64 { .. });
        let last = if wide { index + 1 } else { index };
        if last > ROM_BAR || (wide && last >= NUM_BARS) {
            return Err(bad("does not exist"));
        }
        if self.bars[index].is_some() || (wide && self.bars[last].is_some()) || self.is_upper_half(index) {
            return Err(bad("is already declared"));
        }
        let mask = !(size - 1);
        let (at, low_bits, low_mask) = match kind {
            BarKind::Io => (BAR0 + 4 * index, 0x1, mask as u32 & !0x3),
            BarKind::Mem32 { prefetchable } => (BAR0 + 4 * index, u32::from(prefetchable) << 3, mask as u32 & !0xf),
            BarKind::Mem64 { prefetchable } => {
                (BAR0 + 4 * index, 0x4 | u32::from(prefetchable) << 3, mask as u32 & !0xf)
            }
            BarKind::Rom => (ROM_ADDRESS, 0, (mask as u32 & !0x7ff) | ROM_ENABLE),
        };
        self.set_initial(at, &low_bits.to_le_bytes())?;
        self.set_wmask(at, &low_mask.to_le_bytes())?;
        if wide {
            self.set_wmask(at + 4, &((mask >> 32) as u32).to_le_bytes())?;
        }
        self.bars[index] = Some((kind, size));
        Ok(())
    }

    /// Changes the size of the expansion ROM BAR (declared with [`PciConfig::add_bar`]): its
    /// block was resized by a restore, which then restores the saved address into it. Address
    /// bits below the new size are cleared, as the guest could not have set them.
    pub fn resize_rom_bar(&mut self, size: u64) -> Result<(), PciError> {
        let bad = |reason: String| PciError::Bar { index: ROM_BAR, reason };
        if self.bar(ROM_BAR).is_none() {
            return Err(bad("is not declared".into()));
        }
        if !size.is_power_of_two() || !(0x800..=1 << 31).contains(&size) {
            return Err(bad(format!("size {size:#x} is not a power of two from 0x800 to 0x80000000")));
        }
        let wmask = (!(size - 1) as u32 & !0x7ff) | ROM_ENABLE;
        self.set_wmask(ROM_ADDRESS, &wmask.to_le_bytes())?;
        let v = self.get32(ROM_ADDRESS) & wmask;
        self.bytes[ROM_ADDRESS..ROM_ADDRESS + 4].copy_from_slice(&v.to_le_bytes());
        self.bars[ROM_BAR] = Some((BarKind::Rom, size));
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0 && matches!(self.bars[index - 1], Some((BarKind::Mem64 { .. }, _)))
    }

    /// BAR `index`'s kind and size, if declared.
    pub fn bar(&self, index: usize) -> Option<(BarKind, u64)> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` holds now (whatever decoding says).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let (kind, _) = self.bar(index)?;
        Some(match kind {
            BarKind::Io => u64::from(self.get32(BAR0 + 4 * index) & !0x3),
            BarKind::Mem32 { .. } => u64::from(self.get32(BAR0 + 4 * index) & !0xf),
            BarKind::Mem64 { .. } => {
                u64::from(self.get32(BAR0 + 4 * index) & !0xf) | u64::from(self.get32(BAR0 + 4 * index + 4)) << 32
            }
            BarKind::Rom => u64::from(self.get32(ROM_ADDRESS) & !0x7ff),
        })
    }

    /// The COMMAND register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }

    /// Where BAR `index` decodes now: none when it is not declared, its decoding is off, or it
    /// holds address 0 (unassigned).
    pub fn bar_region(&self, index: usize) -> Option<BarRegion> {
        let (kind, len) = self.bar(index)?;
        let cmd = self.command();
        let space = match kind {
            BarKind::Io if cmd & COMMAND_IO != 0 => BarSpace::Pio,
            BarKind::Mem32 { .. } | BarKind::Mem64 { .. } if cmd & COMMAND_MEMORY != 0 => BarSpace::Mmio,
            BarKind::Rom if cmd & COMMAND_MEMORY != 0 && self.get32(ROM_ADDRESS) & ROM_ENABLE != 0 => BarSpace::Mmio,
            _ => return None,
        };
        let addr = self.bar_address(index)?;
        (addr != 0).then_some(BarRegion { space, addr, len })
    }

    /// Adds capability `id` with `body` (the bytes after its id and next pointer), chained
    /// after the previous one; returns its offset. Make body bytes writable with
    /// [`PciConfig::set_wmask`].
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u8, PciError> {
        let at = self.next_cap;
        let end = at + 2 + body.len();
        if end > CONFIG_LEN {
            return Err(PciError::CapabilitySpace { id, len: body.len() + 2, free: CONFIG_LEN - at });
        }
        self.set_initial(at, &[id, 0])?;
        self.set_initial(at + 2, body)?;
        let offset = at as u8;
        match self.last_cap {
            Some(prev) => self.set_initial(prev + 1, &[offset])?,
            None => self.set_initial(CAPABILITY_LIST, &[offset])?,
        }
        let status = u16::from_le_bytes([self.initial[STATUS], self.initial[STATUS + 1]]) | STATUS_CAP_LIST;
        self.set_initial(STATUS, &status.to_le_bytes())?;
        self.last_cap = Some(at);
        self.next_cap = (end + 3) & !3;
        Ok(offset)
    }

    /// Reads `data.len()` bytes at `offset`; past the 256 bytes reads 0 (no extended space).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes `data` at `offset` through the masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = offset + i;
            let Some(old) = self.bytes.get(o).copied() else { return };
            let wm = self.wmask[o];
            self.bytes[o] = ((old & !wm) | (v & wm)) & !(v & self.w1c[o]);
        }
    }

    /// Returns the space to its state as built.
    pub fn reset(&mut self) {
        self.bytes = self.initial;
    }

    /// The raw bytes, for saving.
    pub fn bytes(&self) -> &[u8; CONFIG_LEN] {
        &self.bytes
    }

    /// Checks that `saved` (untrusted) is a saved space of this same function: its length, and
    /// the identity bytes (vendor, device, revision, class, header type, subsystem).
    pub fn check_saved(&self, saved: &[u8]) -> Result<(), PciError> {
        if saved.len() != CONFIG_LEN {
            return Err(PciError::StateLength { len: saved.len() });
        }
        for range in [0x00..0x04, 0x08..0x0c, HEADER_TYPE..HEADER_TYPE + 1, 0x2c..0x30] {
            if saved[range.clone()] != self.initial[range.clone()] {
                return Err(PciError::Identity {
                    offset: range.start,
                    saved: saved[range.clone()].to_vec(),
                    here: self.initial[range].to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Takes the guest-writable bits of `saved` (checked with [`PciConfig::check_saved`]);
    /// bits only the device sets stay as they are.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), PciError> {
        self.check_saved(saved)?;
        for (o, &s) in saved.iter().enumerate() {
            let guest = self.wmask[o] | self.w1c[o];
            self.bytes[o] = (s & guest) | (self.bytes[o] & !guest);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
