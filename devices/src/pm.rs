//! The ACPI fixed-hardware power-management block, at the ports the FADT names (QEMU's PIIX4
//! PM layout): PM1a event (status, enable), PM1a control, the PM timer, and GPE0 (status,
//! enable). One device serves the four ranges; which one an access hit is told by its `base`.
//!
//! ```text
//! PM1a_EVT  +0 status (16 bits, write 1 to clear)  +2 enable (16 bits)
//! PM1a_CNT  +0 control: bit 0 SCI_EN, bits 12:10 SLP_TYP, bit 13 SLP_EN (write-only)
//! PM_TMR    +0 24-bit counter at 3.579545 MHz (read-only)
//! GPE0      +0 status (16 bits, write 1 to clear)  +2 enable (16 bits)
//! ```
//!
//! Registers are byte arrays, so byte, word and dword accesses at any offset inside a block
//! work the same way. The SCI is level-triggered: it is asserted while any status bit is set
//! whose enable bit is set (PM1 or GPE0), and re-evaluated after every change.
//!
//! Sleep: writing SLP_EN with SLP_TYP = [`SLP_TYP_S5`] powers the machine off through a
//! callback (the DSDT's `\_S5` package must name that value, as QEMU's does for PIIX4).
//! Other sleep states are not supported and are ignored with a log line.
//!
//! The timer counts from a monotonic clock; its saved state is the count at the time of the
//! snapshot, and a restored timer continues from it. The timer's overflow status bit
//! (TMR_STS) is not generated: nothing on this machine enables its interrupt.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// PM timer frequency, Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// SCI_EN in PM1 control.
pub const SCI_EN: u16 = 1 << 0;
/// SLP_EN in PM1 control.
pub const SLP_EN: u16 = 1 << 13;
/// The SLP_TYP value that means S5 (soft off).
pub const SLP_TYP_S5: u16 = 0;
/// Bits of PM1 status the device implements: TMR_STS, GBL_STS, PWRBTN_STS, SLPBTN_STS,
/// RTC_STS, WAK_STS.
const PM1_STS_MASK: u16 = 0x0001 | 0x0020 | 0x0100 | 0x0200 | 0x0400 | 0x8000;
/// Bits of PM1 enable: TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN.
const PM1_EN_MASK: u16 = 0x0001 | 0x0020 | 0x0100 | 0x0200 | 0x0400;
/// Writable bits of PM1 control: SCI_EN, BM_RLD, GBL_RLS, SLP_TYP.
const PM1_CNT_MASK: u16 = 0x0001 | 0x0002 | 0x0004 | 0x1c00;

/// Errors of the PM block.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PmError {
    #[error("GPE0 bit {bit} does not exist (the block has 16)")]
    GpeBit { bit: u8 },
    #[error("PM state's timer value {value:#x} does not fit in 24 bits")]
    Timer { value: u32 },
    #[error("PM state's control register {value:#x} has SLP_EN or reserved bits set")]
    Control { value: u16 },
}

/// Where the four blocks are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmPorts {
    pub pm1a_evt: u64,
    pub pm1a_cnt: u64,
    pub pm_tmr: u64,
    pub gpe0: u64,
}

/// Lengths of the blocks.
pub const PM1_EVT_LEN: u64 = 4;
pub const PM1_CNT_LEN: u64 = 2;
pub const PM_TMR_LEN: u64 = 4;
pub const GPE0_LEN: u64 = 4;

/// The saved state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmState {
    pub pm1_sts: u16,
    pub pm1_en: u16,
    pub pm1_cnt: u16,
    pub gpe_sts: u16,
    pub gpe_en: u16,
    /// The timer's count when saved.
    pub timer: u32,
}

/// Called when the guest enters S5.
pub type PowerOffCallback = Arc<dyn Fn() + Send + Sync>;

/// The PM block.
pub struct Pm {
    ports: PmPorts,
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    gpe_sts: u16,
    gpe_en: u16,
    /// The timer reads `timer_base` plus the ticks since `timer_start`.
    timer_start: Instant,
    timer_base: u32,
    sci: Arc<dyn IrqLine>,
    power_off: PowerOffCallback,
}

impl Pm {
    /// A PM block at `ports`, raising `sci`. SCI_EN starts set: the machine has no SMM and
    /// is always in ACPI mode (the FADT names no SMI command port).
    pub fn new(ports: PmPorts, sci: Arc<dyn IrqLine>, power_off: PowerOffCallback) -> Self {
        Pm {
            ports,
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: SCI_EN,
            gpe_sts: 0,
            gpe_en: 0,
            timer_start: Instant::now(),
            timer_base: 0,
            sci,
            power_off,
        }
    }

    /// Sets GPE0 status bit `bit` (0..16) and raises the SCI if the bit is enabled.
    pub fn raise_gpe(&mut self, bit: u8) -> Result<(), PmError> {
        if bit >= 16 {
            return Err(PmError::GpeBit { bit });
        }
        self.gpe_sts |= 1 << bit;
        self.update_sci();
        Ok(())
    }

    /// Whether the SCI is asserted.
    pub fn sci_level(&self) -> bool {
        self.pm1_sts & self.pm1_en != 0 || self.gpe_sts & self.gpe_en != 0
    }

    fn update_sci(&self) {
        self.sci.set_level(self.sci_level());
    }

    /// The timer's 24-bit count now.
    pub fn timer(&self) -> u32 {
        let nanos = self.timer_start.elapsed().as_nanos();
        let ticks = (nanos * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64;
        (u64::from(self.timer_base).wrapping_add(ticks) & 0xff_ffff) as u32
    }

    pub fn state(&self) -> PmState {
        PmState {
            pm1_sts: self.pm1_sts,
            pm1_en: self.pm1_en,
            pm1_cnt: self.pm1_cnt,
            gpe_sts: self.gpe_sts,
            gpe_en: self.gpe_en,
            timer: self.timer(),
        }
    }

    /// Takes `s` (untrusted) as the state and sets the SCI's level from it.
    pub fn restore(&mut self, s: &PmState) -> Result<(), PmError> {
        if s.timer > 0xff_ffff {
            return Err(PmError::Timer { value: s.timer });
        }
        if s.pm1_cnt & !PM1_CNT_MASK != 0 {
            return Err(PmError::Control { value: s.pm1_cnt });
        }
        self.pm1_sts = s.pm1_sts & PM1_STS_MASK;
        self.pm1_en = s.pm1_en & PM1_EN_MASK;
        self.pm1_cnt = s.pm1_cnt;
        self.gpe_sts = s.gpe_sts;
        self.gpe_en = s.gpe_en;
        self.timer_base = s.timer;
        self.timer_start = Instant::now();
        self.update_sci();
        Ok(())
    }

    fn evt_bytes(&self) -> [u8; 4] {
        let [a, b] = self.pm1_sts.to_le_bytes();
        let [c, d] = self.pm1_en.to_le_bytes();
        [a, b, c, d]
    }

    fn gpe_bytes(&self) -> [u8; 4] {
        let [a, b] = self.gpe_sts.to_le_bytes();
        let [c, d] = self.gpe_en.to_le_bytes();
        [a, b, c, d]
    }

    fn write_cnt(&mut self, v: u16) {
        self.pm1_cnt = v & PM1_CNT_MASK;
        if v & SLP_EN != 0 {
            let typ = (v >> 10) & 7;
            if typ == SLP_TYP_S5 {
                tracing::info!("the guest entered ACPI S5: powering off");
                (self.power_off)();
            } else {
                tracing::info!("the guest asked for sleep type {typ}, which this machine does not support");
            }
        }
    }
}

/// Reads `data.len()` bytes at `offset` of `regs`, all ones past their end.
fn read_bytes(regs: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset).ok().and_then(|o| regs.get(o + i)).copied().unwrap_or(0xff);
    }
}

/// Applies a write of `data` at `offset` to a status/enable pair: status bytes (0, 1) are
/// write-1-to-clear, enable bytes (2, 3) are stored.
fn write_sts_en(sts: &mut u16, en: &mut u16, offset: u64, data: &[u8]) {
    for (i, &v) in data.iter().enumerate() {
        match offset + i as u64 {
            0 => *sts &= !u16::from(v),
            1 => *sts &= !(u16::from(v) << 8),
            2 => *en = (*en & 0xff00) | u16::from(v),
            3 => *en = (*en & 0x00ff) | (u16::from(v) << 8),
            _ => {}
        }
    }
}

impl BusDevice for Pm {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if base == self.ports.pm1a_evt {
            read_bytes(&self.evt_bytes(), offset, data);
        } else if base == self.ports.pm1a_cnt {
            read_bytes(&self.pm1_cnt.to_le_bytes(), offset, data);
        } else if base == self.ports.pm_tmr {
            read_bytes(&self.timer().to_le_bytes(), offset, data);
        } else if base == self.ports.gpe0 {
            read_bytes(&self.gpe_bytes(), offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if base == self.ports.pm1a_evt {
            write_sts_en(&mut self.pm1_sts, &mut self.pm1_en, offset, data);
            self.pm1_en &= PM1_EN_MASK;
        } else if base == self.ports.pm1a_cnt {
            let mut bytes = self.pm1_cnt.to_le_bytes();
            for (i, &v) in data.iter().enumerate() {
                if let Some(b) = usize::try_from(offset).ok().and_then(|o| bytes.get_mut(o + i)) {
                    *b = v;
                }
            }
            self.write_cnt(u16::from_le_bytes(bytes));
        } else if base == self.ports.gpe0 {
            write_sts_en(&mut self.gpe_sts, &mut self.gpe_en, offset, data);
        }
        self.update_sci();
    }
}

#[cfg(test)]
#[path = "pm_tests.rs"]
mod tests;
