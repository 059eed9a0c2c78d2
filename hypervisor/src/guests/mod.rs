//! Built-in guests: tiny programs written for snapvisor's tests and benchmarks, assembled
//! when a VM is built and loaded like a kernel at 1 MiB with 64-bit entry.
//!
//! - `hello` (CPL0, port I/O) prints a line and exits with status 0.
//! - `fwcfg` (CPL0, port I/O) reads fw_cfg's signature, features and file directory through
//!   both the port interface and DMA, prints every file from each and every file's size and
//!   checksum as read each way, and exits 0 only if the two agree byte for byte.
//! - `idle` (CPL0) prints a line and halts with interrupts off: a VM that costs no CPU, for
//!   density measurements and the daemon's tests.
//! - `memfill` (CPL3, MMIO) fills RAM with a seeded pattern; see [`memfill`].
//! - `touch` (CPL3, MMIO) fills RAM, waits for the VMM's go, then touches a spread-out
//!   working set, reporting each step as a progress mark: the lazy-restore benchmark's guest;
//!   see [`touch`].
//! - `netping` (CPL3, MMIO) drives NIC 0's virtio-net device through its BARs and pings,
//!   answers pings, or pushes frames for the network benchmark; see [`netping`].
//! - `timer` (CPL0, port I/O, an IDT) arms the LAPIC timer (TSC-deadline or one-shot) tick
//!   after tick and counts the interrupts it takes: the guest for testing restored LAPIC
//!   timers; see [`timer`].
//!
//! Parameters reach a guest in a [`BootInfo`] block at [`layout::BUILTIN_INFO`], as boot
//! parameters reach a kernel in its zero page.

pub mod asm;
pub mod fwcfg;
pub mod hello;
pub mod idle;
pub mod memfill;
pub mod netping;
pub mod netping_proto;
pub mod netping_virtio;
pub mod timer;
pub mod touch;

use iced_x86::code_asm::CodeAssembler;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
pub use netping::{NetMode, NetParams};
pub use timer::TimerMode;

/// Errors building or loading a built-in guest.
#[derive(Debug, Error)]
pub enum GuestError {
    #[error("unknown built-in guest '{0}' (known: hello, fwcfg, memfill, idle, touch, timer, netping)")]
    Unknown(String),
    #[error("assembling built-in guest '{name}': {reason}")]
    Assemble { name: &'static str, reason: String },
    #[error("loading built-in guest into guest memory at {addr:#x}: {reason}")]
    Load { addr: u64, reason: String },
    #[error("built-in guest parameter {what}: {reason}")]
    Param { what: &'static str, reason: String },
}

/// The built-in guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Builtin {
    Hello,
    Fwcfg,
    Memfill,
    Idle,
    Touch,
    Timer,
    Netping,
}

impl Builtin {
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Hello => "hello",
            Builtin::Fwcfg => "fwcfg",
            Builtin::Memfill => "memfill",
            Builtin::Idle => "idle",
            Builtin::Touch => "touch",
            Builtin::Timer => "timer",
            Builtin::Netping => "netping",
        }
    }

    /// Whether the guest starts at CPL3 (and so uses MMIO for its devices).
    pub fn user_mode(self) -> bool {
        matches!(self, Builtin::Memfill | Builtin::Touch | Builtin::Netping)
    }

    /// Assembles the guest for loading at [`layout::HIMEM_START`].
    pub fn assemble(self) -> Result<Vec<u8>, GuestError> {
        let name = self.name();
        let err = |e: iced_x86::IcedError| GuestError::Assemble { name, reason: e.to_string() };
        let mut a = CodeAssembler::new(64).map_err(err)?;
        match self {
            Builtin::Hello => hello::emit(&mut a),
            Builtin::Fwcfg => fwcfg::emit(&mut a),
            Builtin::Memfill => memfill::emit(&mut a),
            Builtin::Idle => idle::emit(&mut a),
            Builtin::Touch => touch::emit(&mut a),
            Builtin::Timer => timer::emit(&mut a),
            Builtin::Netping => netping::emit(&mut a),
        }
        .map_err(err)?;
        a.assemble(layout::HIMEM_START).map_err(err)
    }
}

impl std::str::FromStr for Builtin {
    type Err = GuestError;
    fn from_str(s: &str) -> Result<Self, GuestError> {
        match s {
            "hello" => Ok(Builtin::Hello),
            "fwcfg" => Ok(Builtin::Fwcfg),
            "memfill" => Ok(Builtin::Memfill),
            "idle" => Ok(Builtin::Idle),
            "touch" => Ok(Builtin::Touch),
            "timer" => Ok(Builtin::Timer),
            "netping" => Ok(Builtin::Netping),
            _ => Err(GuestError::Unknown(s.to_string())),
        }
    }
}

/// What a memfill run does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemfillMode {
    /// Fill with the pattern of each pass, checking the previous pass's pattern on the way.
    #[default]
    Fill,
    /// Only check that memory holds the pattern of `seed`.
    Verify,
}

/// Parameters for built-in guests, written at [`layout::BUILTIN_INFO`]:
///
/// ```text
/// +0   u64 magic "SNVBOOT1"
/// +8   u64 seed
/// +16  u64 passes (0 = run until stopped)
/// +24  u64 mode (0 fill, 1 verify)
/// +32  u64 touch: working-set stride in bytes
/// +40  u64 touch: bytes touched at each stride
/// +48  u64 timer: mode (0 TSC-deadline, 1 one-shot)
/// +56  u64 netping: mode (0 ping, 1 echo, 2 evil, 3 tx, 4 rx)
/// +64  u64 netping: own IPv4 address (its 4 bytes in network order, then zeros)
/// +72  u64 netping: netmask (likewise)
/// +80  u64 netping: peer IPv4 address (likewise)
/// +88  u64 netping: count (replies, answered frames, frames; 0 = no limit)
/// +96  u64 netping: frame size (tx)
/// +104 u64 netping: ms between a reply and the next request
/// +112 u64 netping: TSC cycles per ms
/// +120 u64 netping: NIC 0's MSI-X BAR address
/// +128 u64 netping: NIC 0's virtio BAR address
/// +136 u64 number of RAM ranges (at most MAX_RANGES)
/// +144 (u64 start, u64 end) per range: RAM the guest may fill
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub seed: u64,
    pub passes: u64,
    pub mode: MemfillMode,
    pub stride: u64,
    pub span: u64,
    pub timer: TimerMode,
    pub net: NetParams,
    /// TSC cycles per ms ([`netping::host_tsc_per_ms`]; only netping reads it).
    pub tsc_per_ms: u64,
    /// NIC 0's (MSI-X BAR, virtio BAR) addresses ([`crate::net::builtin_bars`]).
    pub nic_bars: (u64, u64),
    pub ranges: Vec<(u64, u64)>,
}

/// Offsets in the boot info the guests read.
pub const INFO_SEED: u64 = 8;
pub const INFO_PASSES: u64 = 16;
pub const INFO_MODE: u64 = 24;
pub const INFO_STRIDE: u64 = 32;
pub const INFO_SPAN: u64 = 40;
pub const INFO_TIMER: u64 = 48;
pub const INFO_NET_MODE: u64 = 56;
pub const INFO_NET_IP: u64 = 64;
pub const INFO_NET_MASK: u64 = 72;
pub const INFO_NET_PEER: u64 = 80;
pub const INFO_NET_COUNT: u64 = 88;
pub const INFO_NET_FRAME: u64 = 96;
pub const INFO_NET_INTERVAL: u64 = 104;
pub const INFO_NET_TSC_MS: u64 = 112;
pub const INFO_NET_MSIX_BAR: u64 = 120;
pub const INFO_NET_VIRTIO_BAR: u64 = 128;
pub const INFO_NRANGES: u64 = 136;
pub const INFO_RANGES: u64 = 144;

pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"SNVBOOT1");
pub const MAX_RANGES: usize = 4;
/// Built-in guests leave everything below 2 MiB (their code, tables and stack) alone.
pub const FILL_START: u64 = 0x20_0000;

impl BootInfo {
    /// The fillable RAM of a guest with `e820` RAM ranges.
    pub fn fill_ranges(e820: &[crate::boot::linux::E820Entry]) -> Vec<(u64, u64)> {
        e820.iter()
            .filter(|e| e.kind == crate::memory::E820_RAM)
            .filter_map(|e| {
                let start = e.addr.max(FILL_START);
                let end = e.addr + e.size;
                (end > start).then_some((start, end))
            })
            .collect()
    }

    pub fn encode(&self) -> Result<Vec<u8>, GuestError> {
        if self.stride < 4096 || self.span == 0 || self.span > self.stride {
            return Err(GuestError::Param {
                what: "working set",
                reason: format!(
                    "stride {:#x} must be at least 4 KiB and span {:#x} in 1..=stride",
                    self.stride, self.span
                ),
            });
        }
        if self.ranges.len() > MAX_RANGES {
            return Err(GuestError::Param {
                what: "ranges",
                reason: format!("{} ranges, at most {MAX_RANGES}", self.ranges.len()),
            });
        }
        let mut words = vec![
            BOOT_INFO_MAGIC,
            self.seed,
            self.passes,
            self.mode as u64,
            self.stride,
            self.span,
            self.timer.word(),
            self.net.mode.word(),
            netping::ip_word(self.net.ip),
            netping::ip_word(self.net.netmask()),
            netping::ip_word(self.net.peer),
            self.net.count,
            self.net.frame_size,
            self.net.interval_ms,
            self.tsc_per_ms,
            self.nic_bars.0,
            self.nic_bars.1,
            self.ranges.len() as u64,
        ];
        for (s, e) in &self.ranges {
            words.push(*s);
            words.push(*e);
        }
        Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), GuestError> {
        let bytes = self.encode()?;
        mem.write_slice(&bytes, GuestAddress(layout::BUILTIN_INFO))
            .map_err(|e| GuestError::Load { addr: layout::BUILTIN_INFO, reason: e.to_string() })
    }
}

/// Loads `code` at 1 MiB.
pub fn load(mem: &GuestMemoryMmap, code: &[u8]) -> Result<u64, GuestError> {
    mem.write_slice(code, GuestAddress(layout::HIMEM_START))
        .map_err(|e| GuestError::Load { addr: layout::HIMEM_START, reason: e.to_string() })?;
    Ok(layout::HIMEM_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_assembles() {
        for g in [
            Builtin::Hello,
            Builtin::Fwcfg,
            Builtin::Memfill,
            Builtin::Idle,
            Builtin::Touch,
            Builtin::Timer,
            Builtin::Netping,
        ] {
            let code = g.assemble().expect("assembles");
            assert!(!code.is_empty() && code.len() < 8192, "{}: {} bytes", g.name(), code.len());
        }
    }

    #[test]
    fn boot_info_layout() {
        let b = BootInfo {
            seed: 7,
            passes: 2,
            mode: MemfillMode::Verify,
            stride: 8192,
            span: 4096,
            timer: TimerMode::Oneshot,
            net: NetParams::default(),
            tsc_per_ms: 0,
            nic_bars: (0, 0),
            ranges: vec![(0x20_0000, 0x400_0000)],
        };
        let bytes = b.encode().expect("encodes");
        assert_eq!(&bytes[0..8], b"SNVBOOT1");
        assert_eq!(bytes.len() as u64, INFO_RANGES + 16);
        assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes")), 1);
        assert_eq!(u64::from_le_bytes(bytes[48..56].try_into().expect("8 bytes")), 1, "one-shot timer");
        let too_many = BootInfo { ranges: vec![(0, 1); 5], ..b.clone() };
        assert!(too_many.encode().is_err());
        assert!(BootInfo { stride: 0, ..b.clone() }.encode().is_err());
        assert!(BootInfo { span: 16384, ..b }.encode().is_err());
    }
}
