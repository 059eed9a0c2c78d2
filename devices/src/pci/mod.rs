//! The PCI bus: bus 0 with 32 slots of 8 functions, configuration mechanism #1 at
//! 0xcf8/0xcfc, an i440FX-compatible host bridge at 00:00.0, and functions whose
//! configuration space is registers plus writable masks ([`config`]).
//!
//! BAR placement: after every configuration write the bus compares where each BAR of the
//! written function decodes ([`config::PciConfig::bar_region`]: address, size, decoding
//! enabled) with where it is mapped, and tells the machine's [`BarMapper`] to unmap the old
//! region and map the new one onto the port or MMIO bus, served by the bus device the
//! function gives for that BAR. Placements outside the bus's windows, or overlapping
//! anything already on the machine's buses, are refused with a log line and left unmapped,
//! as a real bus would leave a conflicting BAR dead; the guest can move it again.
//!
//! Lock order: [`PciConfigIo`] (locked by the port bus) -> [`PciBus`] -> a function's mutex,
//! which is released before the mapper takes the machine bus's write lock. No function
//! calls back into the PCI bus.

pub mod bus;
pub mod config;
pub mod config_io;
pub mod host_bridge;

pub use bus::{BarMapper, IoEvent, PciBus, PciBusState, PciDevice, PciDeviceState, PciWindows};
pub use config::{BarKind, PciConfig, PciHeader};
pub use config_io::PciConfigIo;
pub use host_bridge::HostBridge;

use thiserror::Error;

/// Errors of the PCI bus and its functions.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciError {
    #[error("BAR {index}: {reason}")]
    Bar { index: usize, reason: String },
    #[error("config space range {at:#x}+{len} runs past its 256 bytes")]
    ConfigRange { at: usize, len: usize },
    #[error("capability {id:#x} of {len} bytes does not fit: {free} bytes left")]
    CapabilitySpace { id: u8, len: usize, free: usize },
    #[error("PCI function {bdf} is already taken")]
    SlotTaken { bdf: Bdf },
    #[error("no free PCI slot on bus 0")]
    NoFreeSlot,
    #[error("saved config space is {len} bytes, not 256")]
    StateLength { len: usize },
    #[error("saved config space says {saved:02x?} at {offset:#x}, this function has {here:02x?}")]
    Identity { offset: usize, saved: Vec<u8>, here: Vec<u8> },
    #[error("PCI function {bdf}: {source}")]
    Function { bdf: Bdf, source: Box<PciError> },
    #[error("the snapshot has PCI function {bdf}, which this machine does not")]
    UnknownFunction { bdf: Bdf },
    #[error("the snapshot has no state for PCI function {bdf} ({name})")]
    MissingFunction { bdf: Bdf, name: String },
}

/// A function's address on bus 0: device (slot) and function number, as `devfn`
/// (device << 3 | function).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf(pub u8);

impl Bdf {
    pub fn new(device: u8, function: u8) -> Bdf {
        Bdf(((device & 0x1f) << 3) | (function & 7))
    }
    pub fn device(self) -> u8 {
        self.0 >> 3
    }
    pub fn function(self) -> u8 {
        self.0 & 7
    }
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0000:00:{:02x}.{}", self.device(), self.function())
    }
}

/// Which of the machine's buses a BAR decodes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarSpace {
    Pio,
    Mmio,
}

/// A BAR's placement: bus, address, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    pub space: BarSpace,
    pub addr: u64,
    pub len: u64,
}

impl std::fmt::Display for BarRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let space = match self.space {
            BarSpace::Pio => "port",
            BarSpace::Mmio => "MMIO",
        };
        write!(f, "{space} {:#x}+{:#x}", self.addr, self.len)
    }
}

#[cfg(test)]
mod ioevent_tests;
#[cfg(test)]
mod tests;
