//! The CMOS RAM and real-time clock at ports 0x70 (index) and 0x71 (data), as the PC's
//! firmware reads it.
//!
//! Index port: bits 6..0 select one of 128 registers; bit 7 is the NMI mask, which is
//! ignored. The clock registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 weekday,
//! 0x07 day, 0x08 month, 0x09 year, 0x32 century) are not stored: each read computes them
//! from the host's clock (UTC) plus the offset the guest's own writes set, in the format
//! status register B asks for (bit 2: binary instead of BCD; bit 1: 24-hour instead of
//! 12-hour with bit 7 = PM). A guest write to a clock register moves the guest's clock, kept
//! as an offset in seconds from the host's, which is the whole of the clock's saved state.
//!
//! Status A (0x0a) reads the divider the guest wrote (0x26 at power-on) and its update-in-
//! progress bit during the last 244 µs of every second, as the chip does. Status C (0x0c)
//! clears when read; status D (0x0d) always says the battery is good. No RTC interrupts
//! are generated: the firmware and the guests this machine runs do not use them.
//!
//! The other registers are plain bytes that the machine fills at power-on the way QEMU's PC
//! does: no floppy (0x10), the equipment byte (0x14), base/extended memory sizes
//! (0x15-0x18, 0x30/0x31), memory above 16 MiB in 64 KiB units (0x34/0x35), above 4 GiB
//! (0x5b-0x5d), the boot order (0x38, 0x3d: 0), the vCPU count less one (0x5f), and the
//! checksum of 0x10..=0x2d at 0x2e/0x2f.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::BusDevice;

/// Number of CMOS registers.
pub const NREGS: usize = 128;
/// Ports the device decodes (index, data).
pub const LEN: u64 = 2;

pub const REG_SECONDS: u8 = 0x00;
pub const REG_MINUTES: u8 = 0x02;
pub const REG_HOURS: u8 = 0x04;
pub const REG_WEEKDAY: u8 = 0x06;
pub const REG_DAY: u8 = 0x07;
pub const REG_MONTH: u8 = 0x08;
pub const REG_YEAR: u8 = 0x09;
pub const REG_STATUS_A: u8 = 0x0a;
pub const REG_STATUS_B: u8 = 0x0b;
pub const REG_STATUS_C: u8 = 0x0c;
pub const REG_STATUS_D: u8 = 0x0d;
pub const REG_SHUTDOWN: u8 = 0x0f;
pub const REG_FLOPPY: u8 = 0x10;
pub const REG_EQUIPMENT: u8 = 0x14;
pub const REG_BASE_MEM_LO: u8 = 0x15;
pub const REG_EXT_MEM_LO: u8 = 0x17;
pub const REG_CHECKSUM_HI: u8 = 0x2e;
pub const REG_EXT_MEM2_LO: u8 = 0x30;
pub const REG_CENTURY: u8 = 0x32;
pub const REG_MEM_16M_LO: u8 = 0x34;
pub const REG_BOOT_ORDER_1: u8 = 0x38;
pub const REG_BOOT_ORDER_2: u8 = 0x3d;
pub const REG_MEM_4G_LO: u8 = 0x5b;
pub const REG_NB_CPUS: u8 = 0x5f;

/// Status A at power-on: 32.768 kHz time base, 1024 Hz rate.
const STATUS_A_RESET: u8 = 0x26;
/// Status A bit 7: update in progress.
const STATUS_A_UIP: u8 = 0x80;
/// Status B at power-on: 24-hour, BCD.
const STATUS_B_RESET: u8 = 0x02;
/// Status B bits.
const STATUS_B_24H: u8 = 0x02;
const STATUS_B_BINARY: u8 = 0x04;
/// Status D bit 7: valid RAM and time (battery good).
const STATUS_D_VRT: u8 = 0x80;
/// How long before each second's end the update-in-progress bit reads set.
const UIP_NANOS: u32 = 244_000;
/// Largest clock offset a snapshot may carry: about 10,000 years.
const MAX_OFFSET_SECS: i64 = 10_000 * 366 * 86_400;

/// Errors of the CMOS device.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmosError {
    #[error("CMOS state holds {len} registers, the device has {NREGS}")]
    Registers { len: usize },
    #[error("CMOS state selects register {index:#x}, past the last one ({last:#x})", last = NREGS - 1)]
    Index { index: u8 },
    #[error("CMOS state's clock offset {secs} s is out of range (at most {MAX_OFFSET_SECS} s either way)")]
    Offset { secs: i64 },
}

/// The machine the CMOS describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmosConfig {
    /// RAM below 4 GiB, in bytes.
    pub below_4g: u64,
    /// RAM above 4 GiB, in bytes.
    pub above_4g: u64,
    /// Number of vCPUs (at least 1).
    pub vcpus: u8,
}

/// The saved state: registers (clock registers as last stored, not used), index, clock offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub regs: Vec<u8>,
    pub index: u8,
    /// Guest clock minus host clock, in seconds.
    pub clock_offset_secs: i64,
}

/// The host clock: time since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

/// The host's real-time clock.
pub fn host_clock() -> Clock {
    Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// The CMOS RAM and RTC.
pub struct Cmos {
    regs: [u8; NREGS],
    index: u8,
    clock_offset_secs: i64,
    clock: Clock,
}

/// A calendar time, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (days since 1970-01-01).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl DateTime {
    fn from_secs(secs: i64) -> DateTime {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        DateTime { year, month, day, hour: rem / 3600, minute: rem / 60 % 60, second: rem % 60 }
    }

    fn to_secs(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
    }

    /// 1 = Sunday .. 7 = Saturday.
    fn weekday(self) -> u32 {
        // 1970-01-01 was a Thursday (5).
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u32 + 1
    }
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10 % 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> Option<u32> {
    let (hi, lo) = (v >> 4, v & 0xf);
    (hi <= 9 && lo <= 9).then_some(u32::from(hi) * 10 + u32::from(lo))
}

impl Cmos {
    /// A CMOS for the machine `cfg`, its clock reading the host's.
    pub fn new(cfg: CmosConfig) -> Cmos {
        Cmos::with_clock(cfg, host_clock())
    }

    /// A CMOS whose clock reads `clock`.
    pub fn with_clock(cfg: CmosConfig, clock: Clock) -> Cmos {
        let mut regs = [0u8; NREGS];
        regs[usize::from(REG_STATUS_A)] = STATUS_A_RESET;
        regs[usize::from(REG_STATUS_B)] = STATUS_B_RESET;
        regs[usize::from(REG_STATUS_D)] = STATUS_D_VRT;
        // No floppy drive; equipment: FPU present, PS/2 mouse port (as QEMU says).
        regs[usize::from(REG_FLOPPY)] = 0;
        regs[usize::from(REG_EQUIPMENT)] = 0x06;
        let set16 = |regs: &mut [u8; NREGS], at: u8, v: u64| {
            let v = v.min(0xffff) as u16;
            regs[usize::from(at)..usize::from(at) + 2].copy_from_slice(&v.to_le_bytes());
        };
        set16(&mut regs, REG_BASE_MEM_LO, 640);
        let ext_kib = (cfg.below_4g / 1024).saturating_sub(1024);
        set16(&mut regs, REG_EXT_MEM_LO, ext_kib);
        set16(&mut regs, REG_EXT_MEM2_LO, ext_kib);
        set16(&mut regs, REG_MEM_16M_LO, cfg.below_4g.saturating_sub(16 << 20) / 0x1_0000);
        let high = (cfg.above_4g / 0x1_0000).min(0xff_ffff) as u32;
        regs[usize::from(REG_MEM_4G_LO)..usize::from(REG_MEM_4G_LO) + 3].copy_from_slice(&high.to_le_bytes()[..3]);
        regs[usize::from(REG_BOOT_ORDER_1)] = 0;
        regs[usize::from(REG_BOOT_ORDER_2)] = 0;
        regs[usize::from(REG_NB_CPUS)] = cfg.vcpus.saturating_sub(1);
        let sum: u16 = regs[0x10..=0x2d].iter().map(|&b| u16::from(b)).sum();
        regs[usize::from(REG_CHECKSUM_HI)..usize::from(REG_CHECKSUM_HI) + 2].copy_from_slice(&sum.to_be_bytes());
        Cmos { regs, index: 0, clock_offset_secs: 0, clock }
    }

    pub fn state(&self) -> CmosState {
        CmosState { regs: self.regs.to_vec(), index: self.index, clock_offset_secs: self.clock_offset_secs }
    }

    /// Takes `s` (untrusted) as the device's state.
    pub fn restore(&mut self, s: &CmosState) -> Result<(), CmosError> {
        let regs: [u8; NREGS] = s.regs.as_slice().try_into().map_err(|_| CmosError::Registers { len: s.regs.len() })?;
        if usize::from(s.index) >= NREGS {
            return Err(CmosError::Index { index: s.index });
        }
        if s.clock_offset_secs.unsigned_abs() > MAX_OFFSET_SECS as u64 {
            return Err(CmosError::Offset { secs: s.clock_offset_secs });
        }
        self.regs = regs;
        self.index = s.index;
        self.clock_offset_secs = s.clock_offset_secs;
        Ok(())
    }

    fn now(&self) -> (DateTime, u32) {
        let host = (self.clock)();
        let secs = i64::try_from(host.as_secs()).unwrap_or(i64::MAX / 2) + self.clock_offset_secs;
        (DateTime::from_secs(secs), host.subsec_nanos())
    }

    fn encode(&self, v: u32) -> u8 {
        if self.regs[usize::from(REG_STATUS_B)] & STATUS_B_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> Option<u32> {
        if self.regs[usize::from(REG_STATUS_B)] & STATUS_B_BINARY != 0 {
            Some(u32::from(v))
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.regs[usize::from(REG_STATUS_B)] & STATUS_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> Option<u32> {
        if self.regs[usize::from(REG_STATUS_B)] & STATUS_B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & 0x7f)?;
        if !(1..=12).contains(&h12) {
            return None;
        }
        Some(h12 % 12 + if v & 0x80 != 0 { 12 } else { 0 })
    }

    /// Reads register `reg`.
    pub fn read_reg(&mut self, reg: u8) -> u8 {
        let (t, nanos) = self.now();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday()),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u32),
            REG_CENTURY => self.encode(t.year.div_euclid(100).rem_euclid(100) as u32),
            REG_STATUS_A => {
                let uip = if nanos >= 1_000_000_000 - UIP_NANOS { STATUS_A_UIP } else { 0 };
                (self.regs[usize::from(REG_STATUS_A)] & !STATUS_A_UIP) | uip
            }
            REG_STATUS_C => std::mem::take(&mut self.regs[usize::from(REG_STATUS_C)]),
            REG_STATUS_D => STATUS_D_VRT,
            r => self.regs[usize::from(r) % NREGS],
        }
    }

    /// Writes register `reg`; a clock register moves the guest's clock.
    pub fn write_reg(&mut self, reg: u8, v: u8) {
        let (mut t, _) = self.now();
        let field = match reg {
            REG_SECONDS => self.decode(v).filter(|&s| s < 60).map(|s| t.second = s),
            REG_MINUTES => self.decode(v).filter(|&m| m < 60).map(|m| t.minute = m),
            REG_HOURS => self.decode_hour(v).filter(|&h| h < 24).map(|h| t.hour = h),
            // The weekday follows from the date.
            REG_WEEKDAY => return,
            REG_DAY => self.decode(v).filter(|d| (1..=31).contains(d)).map(|d| t.day = d),
            REG_MONTH => self.decode(v).filter(|m| (1..=12).contains(m)).map(|m| t.month = m),
            REG_YEAR => {
                self.decode(v).filter(|&y| y < 100).map(|y| t.year = t.year.div_euclid(100) * 100 + i64::from(y))
            }
            REG_CENTURY => {
                self.decode(v).filter(|&c| c < 100).map(|c| t.year = i64::from(c) * 100 + t.year.rem_euclid(100))
            }
            REG_STATUS_A => {
                self.regs[usize::from(REG_STATUS_A)] = v & !STATUS_A_UIP;
                return;
            }
            REG_STATUS_C | REG_STATUS_D => return,
            r => {
                self.regs[usize::from(r) % NREGS] = v;
                return;
            }
        };
        if field.is_none() {
            tracing::debug!("CMOS: ignoring clock register {reg:#x} write of invalid value {v:#x}");
            return;
        }
        let host = i64::try_from((self.clock)().as_secs()).unwrap_or(i64::MAX / 2);
        self.clock_offset_secs = (t.to_secs() - host).clamp(-MAX_OFFSET_SECS, MAX_OFFSET_SECS);
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(b) = data.first_mut() else { return };
        match offset {
            0 => *b = self.index,
            1 => *b = self.read_reg(self.index),
            _ => {}
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 masks NMIs, which this machine does not model.
            0 => self.index = v & 0x7f,
            1 => self.write_reg(self.index, v),
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "cmos_tests.rs"]
mod tests;
