//! PCI configuration mechanism #1 on ports 0xcf8..0xcff.
//!
//! ```text
//! 0xcf8 (32-bit only)  bit 31 enable | 23:16 bus | 15:11 device | 10:8 function | 7:2 register
//! 0xcf9 (8-bit)        reset control: writing bit 2 with bit 1 set resets the machine
//! 0xcfc..0xcff         data: byte, word or dword at register + (port - 0xcfc)
//! ```
//!
//! A 32-bit read of 0xcf8 returns what was last written there (firmware probes for the
//! mechanism by writing 0x80000000 and reading it back). Data accesses with the enable bit
//! clear, or for a bus other than 0, read all ones and write nothing.

use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::bus::PciBusState;
use super::{Bdf, PciBus, PciError};
use crate::bus::BusDevice;

/// Ports the device decodes.
pub const LEN: u64 = 8;
const ENABLE: u32 = 1 << 31;
/// Reset control register bits: system reset, reset CPU.
const RCR_SYS_RST: u8 = 0x02;
const RCR_RST_CPU: u8 = 0x04;

/// Errors restoring the configuration ports and their bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciConfigIoError {
    #[error(transparent)]
    Bus(#[from] PciError),
}

/// Saved state: the address register, the reset control register and the bus behind them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    pub address: u32,
    pub reset_control: u8,
    pub bus: PciBusState,
}

/// Called when the guest resets the machine through 0xcf9.
pub type ResetCallback = Arc<dyn Fn() + Send + Sync>;

/// The configuration ports.
pub struct PciConfigIo {
    address: u32,
    reset_control: u8,
    bus: Arc<Mutex<PciBus>>,
    reset: ResetCallback,
}

impl PciConfigIo {
    pub fn new(bus: Arc<Mutex<PciBus>>, reset: ResetCallback) -> Self {
        PciConfigIo { address: 0, reset_control: 0, bus, reset }
    }

    /// The bus behind the ports.
    pub fn bus(&self) -> &Arc<Mutex<PciBus>> {
        &self.bus
    }

    fn target(&self) -> Option<(Bdf, usize)> {
        let bus = (self.address >> 16) & 0xff;
        (self.address & ENABLE != 0 && bus == 0)
            .then_some((Bdf(((self.address >> 8) & 0xff) as u8), (self.address & 0xfc) as usize))
    }

    pub fn state(&self) -> PciConfigIoState {
        PciConfigIoState {
            address: self.address,
            reset_control: self.reset_control,
            bus: self.bus.lock().unwrap_or_else(PoisonError::into_inner).state(),
        }
    }

    /// Takes `s` (untrusted), the bus's functions included, re-mapping their BARs.
    pub fn restore(&mut self, s: &PciConfigIoState) -> Result<(), PciConfigIoError> {
        self.bus.lock().unwrap_or_else(PoisonError::into_inner).restore(&s.bus)?;
        self.address = s.address;
        self.reset_control = s.reset_control & RCR_SYS_RST;
        Ok(())
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            1 if data.len() == 1 => data[0] = self.reset_control,
            0..=3 => {
                let bytes = self.address.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
                }
            }
            4..=7 => match self.target() {
                Some((bdf, reg)) => {
                    let bus = self.bus.lock().unwrap_or_else(PoisonError::into_inner);
                    bus.read(bdf, reg + (offset as usize - 4), data);
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            (1, 1) => {
                let v = data[0];
                if v & RCR_RST_CPU != 0 && (v | self.reset_control) & RCR_SYS_RST != 0 {
                    tracing::info!("the guest reset the machine through port 0xcf9");
                    (self.reset)();
                }
                self.reset_control = v & RCR_SYS_RST;
            }
            (4..=7, _) => {
                if let Some((bdf, reg)) = self.target() {
                    let mut bus = self.bus.lock().unwrap_or_else(PoisonError::into_inner);
                    bus.write(bdf, reg + (offset as usize - 4), data);
                }
            }
            _ => {}
        }
    }
}
