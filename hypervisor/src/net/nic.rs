//! NICs in machine assembly: for each `--net`, a virtio-net-pci function at [`nic_bdf`] on the
//! machine's PCI bus, on its tap, with its MSI-X vectors routed through KVM
//! ([`crate::irq_routes`]) and its queue notifications registered as ioeventfds wherever its
//! BAR is placed (`devices::pci::PciBus` calls the machine's BAR mapper).
//!
//! MACs: a NIC without `mac=` gets one picked by [`MacLease::pick`]; a MAC given twice in one
//! VM is refused before any tap is opened. The NIC holds its lease until it is dropped.
//!
//! BARs: with firmware, the firmware places them (as SeaBIOS does). Without (built-in guests,
//! `--kernel`), snapvisor writes NIC `i`'s BARs at [`builtin_bars`]`(i)` and enables memory
//! decoding and bus mastering in its command register, through the bus, as firmware would:
//! a CPL3 guest then finds the device at fixed addresses.
//!
//! Lifetime: the device's I/O thread starts with the device and is stopped by
//! [`Nic::shutdown`] when the VM ends (`Vm::join`) and again, at the latest, when the NIC is
//! dropped with the machine.

use std::sync::{Arc, Mutex, PoisonError};

use devices::net::tap::{Tap, TapError};
use devices::pci::{Bdf, PciBus};
use devices::virtio::net::{NetConfig, VirtioError, VirtioNet};
use devices::virtio::{MODERN_BAR, MSIX_BAR};
use migrate::ram::{GuestMemory, RamBlock, RamRegistry};
use thiserror::Error;

use super::mac::{self, MacLease};
use super::{builtin_bars, nic_bdf, Mac, NetSpec, MAX_NICS};
use crate::irq_routes::{GsiRouter, KvmMsiRoutes};

/// Errors creating a VM's NICs.
#[derive(Debug, Error)]
pub enum NicError {
    #[error("{count} NICs asked for: a VM has at most {MAX_NICS}")]
    TooMany { count: usize },
    #[error("MAC {mac} is given to two NICs of this VM; each NIC needs its own")]
    DuplicateMac { mac: Mac },
    #[error("tap {tap} is given to two NICs of this VM (NICs {first} and {second}); a tap takes one NIC")]
    DuplicateTap { tap: String, first: usize, second: usize },
    #[error("NIC {index} (tap {tap}): {source}")]
    Tap { index: usize, tap: String, source: Box<TapError> },
    #[error(
        "NIC {index} (tap {tap}): '{tap}' is a multi-queue tap (made with `ip tuntap add ... multi_queue`); \
         snapvisor attaches single-queue taps only (attaching a multi-queue one needs IFF_MULTI_QUEUE, and \
         then nothing stops another process attaching too and taking part of its frames): \
         re-create it without multi_queue"
    )]
    MultiQueueTap { index: usize, tap: String },
    #[error("NIC {index} (tap {tap}): {source}")]
    Device { index: usize, tap: String, source: Box<VirtioError> },
    #[error("NIC {index} (tap {tap}) at PCI {bdf}: {reason}")]
    Pci { index: usize, tap: String, bdf: Bdf, reason: String },
    #[error("NIC {index} (tap {tap}): its option ROM: {reason}")]
    Rom { index: usize, tap: String, reason: String },
}

impl NicError {
    /// Whether the error is about what was asked for (a tap that cannot be used, a MAC twice)
    /// rather than snapvisor failing.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            NicError::TooMany { .. }
                | NicError::DuplicateMac { .. }
                | NicError::DuplicateTap { .. }
                | NicError::Tap { .. }
                | NicError::MultiQueueTap { .. }
        ) || matches!(self, NicError::Rom { .. })
    }
}

/// A NIC of a VM.
pub struct Nic {
    pub index: usize,
    pub bdf: Bdf,
    /// As built: the MAC is always set.
    pub spec: NetSpec,
    pub device: Arc<Mutex<VirtioNet>>,
    /// Keeps the MSI routes (GSIs, irqfds) for as long as the device lives.
    _msi: Arc<KvmMsiRoutes>,
    _lease: MacLease,
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic").field("bdf", &self.bdf).field("spec", &self.spec).finish()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Nic {
    /// What the guest's driver did to this NIC, as one line for `snapvisor run`/`restore` to
    /// print at exit: `net0 0000:00:03.0 52:54:00:..: driver {json}` (the JSON of
    /// `devices::virtio::net::DriverRecord`: status bits, MAC bytes read, feature words read,
    /// features accepted, queues enabled, resets). Tests with foreign drivers (iPXE) read it.
    pub fn driver_report(&self) -> String {
        let record = lock(&self.device).driver_record();
        let json = serde_json::to_string(&record).unwrap_or_else(|e| format!("\"unserialisable: {e}\""));
        format!("net{} {} {}: driver {json}", self.index, self.bdf, self.mac())
    }

    /// The MAC the NIC has.
    pub fn mac(&self) -> Mac {
        self.spec.mac.unwrap_or(Mac(lock(&self.device).mac()))
    }

    /// Stops the device's I/O thread (idempotent).
    pub fn shutdown(&self) {
        lock(&self.device).shutdown();
    }

    /// Stops the I/O thread from touching queues and guest memory (snapshots, restores).
    pub fn pause(&self) {
        lock(&self.device).pause();
    }

    pub fn resume(&self) {
        lock(&self.device).resume();
    }
}

impl Drop for Nic {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Checks a VM's NIC list before anything is opened: the count and MACs given twice.
pub fn check_specs(specs: &[NetSpec]) -> Result<(), NicError> {
    if specs.len() > MAX_NICS {
        return Err(NicError::TooMany { count: specs.len() });
    }
    let given: Vec<Mac> = specs.iter().filter_map(|s| s.mac).collect();
    if let Some(mac) = mac::duplicate(&given) {
        return Err(NicError::DuplicateMac { mac });
    }
    for (second, s) in specs.iter().enumerate() {
        if let Some(first) = specs[..second].iter().position(|o| o.tap == s.tap) {
            return Err(NicError::DuplicateTap { tap: s.tap.clone(), first, second });
        }
    }
    Ok(())
}

/// The option ROM of NIC `index`, as a RAM block named [`super::rom_block_name`]: read,
/// checked and sized by [`super::rom`] (`romsize`, or the file's size rounded up to a power
/// of two), registered in `registry` and filled. None for `romfile=none`.
pub fn nic_rom(
    registry: &RamRegistry,
    index: usize,
    bdf: Bdf,
    spec: &NetSpec,
) -> Result<Option<Arc<RamBlock>>, NicError> {
    let err = |e: super::rom::RomError| NicError::Rom { index, tap: spec.tap.clone(), reason: e.to_string() };
    let Some(rom) = super::rom::load(spec, super::rom::RomOrigin::Cli).map_err(err)? else {
        return Ok(None);
    };
    super::rom::create_block(registry, bdf, &rom, spec.romsize).map(Some).map_err(err)
}

/// What the machine gives its NICs.
pub struct NicParts<'a> {
    pub pci: &'a Arc<Mutex<PciBus>>,
    pub router: &'a Arc<GsiRouter>,
    pub registry: &'a RamRegistry,
    /// The device memory of the machine (`GuestRam::device_memory`).
    pub mem: &'a GuestMemory,
    /// No firmware runs: place the BARs at [`builtin_bars`].
    pub place_bars: bool,
}

/// Creates the NICs `specs` asks for and puts them on the PCI bus. On error the NICs made so
/// far are dropped (their threads stopped, their taps closed); the caller drops the machine.
pub fn attach(parts: &NicParts<'_>, specs: &[NetSpec]) -> Result<Vec<Nic>, NicError> {
    check_specs(specs)?;
    let mut nics = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let bdf = nic_bdf(index);
        let tap_name = spec.tap.clone();
        let lease = match spec.mac {
            Some(m) => MacLease::hold(m),
            None => MacLease::pick(),
        };
        let mut spec = spec.clone();
        spec.mac = Some(lease.mac());
        let tap = Tap::open(&spec.tap).map_err(|e| tap_error(index, &tap_name, e))?;
        let rom = nic_rom(parts.registry, index, bdf, &spec)?;
        let msi = KvmMsiRoutes::new(parts.router.clone(), format!("virtio-net {bdf}"));
        let device = VirtioNet::new(NetConfig {
            mac: lease.mac().0,
            backend: Box::new(tap),
            mem: parts.mem.clone(),
            msi: msi.clone(),
            rom,
        })
        .map_err(|e| NicError::Device { index, tap: tap_name.clone(), source: Box::new(e) })?;
        if let Some(block) = parts.registry.get(&super::rom_block_name(bdf)) {
            // A restore that resizes a pinned ROM block resizes BAR 6 with it.
            let weak: std::sync::Weak<Mutex<dyn devices::pci::PciDevice>> = Arc::downgrade(&device) as _;
            super::rom::follow_resizes(&block, weak);
        }
        let pci_err = |reason: String| NicError::Pci { index, tap: tap_name.clone(), bdf, reason };
        {
            let mut bus = lock(parts.pci);
            bus.add(bdf, device.clone()).map_err(|e| pci_err(e.to_string()))?;
            if parts.place_bars {
                place_bars(&mut bus, bdf, index);
                if bus.mapped(bdf, MSIX_BAR).is_none() || bus.mapped(bdf, MODERN_BAR).is_none() {
                    return Err(pci_err("its BARs could not be placed at their fixed addresses".into()));
                }
            }
        }
        tracing::info!(nic = index, %bdf, tap = %spec.tap, mac = %lease.mac(), "NIC attached");
        nics.push(Nic { index, bdf, spec, device, _msi: msi, _lease: lease });
    }
    Ok(nics)
}

/// `IFF_MULTI_QUEUE` in a tun device's flags (`/sys/class/net/NAME/tun_flags`).
const IFF_MULTI_QUEUE: u32 = 0x0100;
/// `IFF_TAP` in the same flags.
const IFF_TAP: u32 = 0x0002;

/// Whether the interface `name` (a checked interface name) is a multi-queue tap, as this
/// process's network namespace sees it. The kernel refuses TUNSETIFF without IFF_MULTI_QUEUE
/// on one with EINVAL, which [`Tap::open`] reports as "not a tap"; this says what it is.
fn is_multi_queue_tap(name: &str) -> bool {
    let path = std::path::Path::new("/sys/class/net").join(name).join("tun_flags");
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    let text = text.trim();
    let flags = u32::from_str_radix(text.trim_start_matches("0x"), 16).unwrap_or(0);
    flags & IFF_MULTI_QUEUE != 0 && flags & IFF_TAP != 0
}

/// A tap that could not be opened, as a NIC error; a multi-queue tap is named as one.
fn tap_error(index: usize, tap: &str, e: TapError) -> NicError {
    if matches!(e, TapError::NotATap { .. }) && is_multi_queue_tap(tap) {
        return NicError::MultiQueueTap { index, tap: tap.to_string() };
    }
    NicError::Tap { index, tap: tap.to_string(), source: Box::new(e) }
}

/// PCI command register bits: memory decoding, bus mastering.
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_MASTER: u16 = 1 << 2;

/// Writes NIC `index`'s BARs at [`builtin_bars`] and turns on decoding, as firmware would.
fn place_bars(bus: &mut PciBus, bdf: Bdf, index: usize) {
    let (msix, modern) = builtin_bars(index);
    let bar_reg = |i: usize| 0x10 + 4 * i;
    bus.write(bdf, bar_reg(MSIX_BAR), &(msix as u32).to_le_bytes());
    bus.write(bdf, bar_reg(MODERN_BAR), &(modern as u32).to_le_bytes());
    bus.write(bdf, bar_reg(MODERN_BAR + 1), &((modern >> 32) as u32).to_le_bytes());
    bus.write(bdf, 0x04, &(COMMAND_MEMORY | COMMAND_MASTER).to_le_bytes());
}
