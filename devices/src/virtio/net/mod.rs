//! virtio-net on the modern virtio PCI transport (virtio 1.x, 4.1 and 5.1).
//!
//! [`VirtioNet`] is the PCI function: its configuration space (header, BARs, capabilities),
//! the MSI-X BAR and the modern BAR (see the contract in [`super`]), and the I/O thread that
//! moves frames between the virtqueues and a [`NetBackend`]. Capabilities, in chain order:
//!
//! ```text
//! vendor (0x09) COMMON    bar 4 offset 0x0000 length 0x38
//! vendor (0x09) ISR       bar 4 offset 0x1000 length 1
//! vendor (0x09) DEVICE    bar 4 offset 0x2000 length 10 (mac[6], status u16, max_virtqueue_pairs u16)
//! vendor (0x09) NOTIFY    bar 4 offset 0x3000 length 8, notify_off_multiplier 4 (queue i at +4i)
//! vendor (0x09) PCI_CFG   bar/offset/length writable; pci_cfg_data reads and writes that BAR window
//! MSI-X  (0x11)           3 vectors, table in bar 1 at 0, PBA in bar 1 at 0x800
//! ```
//!
//! Locking: the PCI bus locks the [`VirtioNet`] for configuration accesses, which then locks
//! the shared [`core::Core`]; BAR accesses and the I/O thread lock only the core. Nothing
//! locks the other way round.
//!
//! State: [`VirtioNet::state`] / [`VirtioNet::restore`] (see [`state`]). The MAC is
//! configuration, not state: a restore keeps the MAC this device was created with. Take the
//! state with the device paused ([`VirtioNet::pause`]) and the vCPUs stopped, so that the
//! saved queue indices match guest memory.

#[cfg(test)]
mod bench_rx;
pub mod core;
pub mod features;
mod queues;
mod regs;
mod rx;
pub mod state;
mod worker;

#[cfg(test)]
pub(crate) mod test_util;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_io;
#[cfg(test)]
mod tests_queues;
#[cfg(test)]
mod tests_rx;

use std::sync::{Arc, Mutex, PoisonError};

use migrate::ram::{GuestMemory, RamBlock};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::core::{Core, NetStats, VirtQueue, MAX_FRAME, NUM_QUEUES};
use self::worker::Worker;
use super::msix::{Msix, MSIX_ENABLE, MSIX_FUNCTION_MASK, NO_VECTOR};
use super::*;
use crate::bus::BusDevice;
use crate::net::NetBackend;
use crate::pci::{BarKind, PciConfig, PciDevice, PciHeader};

pub use self::core::DriverRecord;
pub use self::state::{StateError, VirtioNetState};

/// MSI-X vectors: configuration changes, and one per queue.
pub const MSIX_VECTORS: u16 = 3;

/// virtio PCI capability types.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;

/// Where each structure of the modern BAR ends.
const COMMON_LEN: u64 = 0x38;
const ISR_LEN: u64 = 1;
const NOTIFY_LEN: u64 = NUM_QUEUES as u64 * NOTIFY_OFF_MULTIPLIER as u64;

/// How to build a device.
pub struct NetConfig {
    pub mac: [u8; 6],
    pub backend: Box<dyn NetBackend>,
    pub mem: GuestMemory,
    pub msi: Arc<dyn MsiRoutes>,
    /// The option ROM's RAM block (its used length, a power of two of at least 2 KiB, is the
    /// ROM BAR's size).
    pub rom: Option<Arc<RamBlock>>,
}

/// Errors building a device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("virtio-net {mac}: guest memory: {source}")]
    Memory { mac: String, source: migrate::ram::VmViewError },
    #[error("virtio-net {mac}: PCI configuration: {source}")]
    Pci { mac: String, source: crate::pci::PciError },
    #[error("virtio-net {mac}: option ROM '{idstr}' of {len:#x} bytes: {reason}")]
    Rom { mac: String, idstr: String, len: u64, reason: String },
    #[error("virtio-net {mac}: {what}: {source}")]
    Io { mac: String, what: &'static str, source: std::io::Error },
}

/// Formats a MAC as `52:54:00:12:34:56`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One BAR of the device, as the machine's bus sees it.
struct Bar {
    core: Arc<Mutex<Core>>,
    index: usize,
}

impl BusDevice for Bar {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        bar_read(&mut lock(&self.core), self.index, offset, data)
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        bar_write(&mut lock(&self.core), self.index, offset, data)
    }
}

/// Which structure of the modern BAR `offset..offset+len` falls in, and the offset in it.
fn modern_region(offset: u64, len: usize) -> Option<(u64, u64)> {
    let end = offset.checked_add(len as u64)?;
    [COMMON_OFFSET, ISR_OFFSET, DEVICE_CFG_OFFSET, NOTIFY_OFFSET]
        .into_iter()
        .zip([COMMON_LEN, ISR_LEN, core::DEVICE_CFG_LEN as u64, NOTIFY_LEN])
        .find(|&(start, l)| offset >= start && end <= start + l)
        .map(|(start, _)| (start, offset - start))
}

fn bar_read(c: &mut Core, index: usize, offset: u64, data: &mut [u8]) {
    data.fill(0);
    match (index, modern_region(offset, data.len())) {
        (MSIX_BAR, _) => c.msix.read(offset, data),
        (MODERN_BAR, Some((COMMON_OFFSET, at))) => c.read_common(at, data),
        (MODERN_BAR, Some((ISR_OFFSET, at))) => c.read_isr(at, data),
        (MODERN_BAR, Some((DEVICE_CFG_OFFSET, at))) => c.read_device(at, data),
        _ => tracing::debug!("{}: BAR {index} read of {} bytes at {offset:#x} ignored", c.name, data.len()),
    }
}

fn bar_write(c: &mut Core, index: usize, offset: u64, data: &[u8]) {
    match (index, modern_region(offset, data.len())) {
        (MSIX_BAR, _) => c.msix.write(offset, data),
        (MODERN_BAR, Some((COMMON_OFFSET, at))) => c.write_common(at, data),
        (MODERN_BAR, Some((NOTIFY_OFFSET, at))) => c.write_notify(at, data),
        _ => tracing::debug!("{}: BAR {index} write of {} bytes at {offset:#x} ignored", c.name, data.len()),
    }
}

/// The virtio-net PCI function.
pub struct VirtioNet {
    config: PciConfig,
    msix_cap: usize,
    pci_cfg_cap: usize,
    core: Arc<Mutex<Core>>,
    msix_bar: Arc<Mutex<dyn BusDevice>>,
    modern_bar: Arc<Mutex<dyn BusDevice>>,
    rom: Option<Arc<RamBlock>>,
    notify: [Arc<EventFd>; NUM_QUEUES],
    worker: Option<Worker>,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet").field("name", &lock(&self.core).name).finish()
    }
}

fn vendor_cap(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
    // After id and next: cap_len, cfg_type, bar, id, padding[2], offset, length, extra.
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, bar, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioNet {
    /// Builds the device and starts its I/O thread.
    pub fn new(cfg: NetConfig) -> Result<Arc<Mutex<VirtioNet>>, VirtioError> {
        let mut dev = Self::build(cfg)?;
        dev.start()?;
        Ok(Arc::new(Mutex::new(dev)))
    }

    /// Builds the device without its I/O thread (see [`VirtioNet::start`]).
    pub fn build(cfg: NetConfig) -> Result<VirtioNet, VirtioError> {
        let mac = mac_string(&cfg.mac);
        let pci = |source| VirtioError::Pci { mac: mac.clone(), source };
        let io = |what, source| VirtioError::Io { mac: mac.clone(), what, source };
        let mem = cfg.mem.tracked().map_err(|source| VirtioError::Memory { mac: mac.clone(), source })?;
        let mut config = PciConfig::new(PciHeader {
            vendor: VENDOR_ID,
            device: NET_DEVICE_ID,
            revision: 1,
            class: (0x02, 0x00, 0x00),
            subsystem_vendor: VENDOR_ID,
            subsystem: 0x1100,
            interrupt_pin: 0,
        });
        config.add_bar(MSIX_BAR, BarKind::Mem32 { prefetchable: false }, MSIX_BAR_SIZE).map_err(pci)?;
        config.add_bar(MODERN_BAR, BarKind::Mem64 { prefetchable: true }, MODERN_BAR_SIZE).map_err(pci)?;
        if let Some(rom) = &cfg.rom {
            let len = rom.used_length();
            config.add_bar(crate::pci::config::ROM_BAR, BarKind::Rom, len).map_err(|e| VirtioError::Rom {
                mac: mac.clone(),
                idstr: rom.idstr().to_string(),
                len,
                reason: e.to_string(),
            })?;
        }
        let bar = MODERN_BAR as u8;
        for (t, off, len, extra) in [
            (CAP_COMMON, COMMON_OFFSET, COMMON_LEN, vec![]),
            (CAP_ISR, ISR_OFFSET, ISR_LEN, vec![]),
            (CAP_DEVICE, DEVICE_CFG_OFFSET, core::DEVICE_CFG_LEN as u64, vec![]),
            (CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_LEN, NOTIFY_OFF_MULTIPLIER.to_le_bytes().to_vec()),
        ] {
            config.add_capability(CAP_ID_VENDOR, &vendor_cap(t, bar, off as u32, len as u32, &extra)).map_err(pci)?;
        }
        let pci_cfg_cap =
            usize::from(config.add_capability(CAP_ID_VENDOR, &vendor_cap(CAP_PCI_CFG, 0, 0, 0, &[0; 4])).map_err(pci)?);
        // bar, offset, length and the data window are the driver's to write.
        config.set_wmask(pci_cfg_cap + 4, &[0xff]).map_err(pci)?;
        config.set_wmask(pci_cfg_cap + 8, &[0xff; 12]).map_err(pci)?;
        let mut msix_body = (MSIX_VECTORS - 1).to_le_bytes().to_vec();
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32 | MSIX_BAR as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | MSIX_BAR as u32).to_le_bytes());
        let msix_cap = usize::from(config.add_capability(CAP_ID_MSIX, &msix_body).map_err(pci)?);
        config.set_wmask(msix_cap + 3, &[0xc0]).map_err(pci)?;

        let efd = || EventFd::new(EFD_NONBLOCK).map(Arc::new).map_err(|e| io("creating an eventfd", e));
        let notify = [efd()?, efd()?];
        let wake = efd()?;
        let offered = features::offered(cfg.backend.supported_offloads());
        let name = format!("virtio-net {mac}");
        let core = Arc::new(Mutex::new(Core {
            name,
            mac: cfg.mac,
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues: [VirtQueue::new_reset(), VirtQueue::new_reset()],
            isr: 0,
            link_up: true,
            error: None,
            msix: Msix::new(MSIX_VECTORS, cfg.msi),
            mem,
            backend: cfg.backend,
            notify: notify.clone(),
            wake,
            paused: false,
            rx_starved: false,
            rx_notify_off: false,
            rx_pending: 0,
            rx_buf: vec![0; MAX_FRAME + 4096],
            rx_scratch: Default::default(),
            tx_buf: Vec::with_capacity(MAX_FRAME),
            record: DriverRecord::default(),
            rounds: 0,
            stats: NetStats::default(),
            tx_drop_warned: None,
            tx_drops_unwarned: 0,
        }));
        let msix_bar: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Bar { core: core.clone(), index: MSIX_BAR }));
        let modern_bar: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Bar { core: core.clone(), index: MODERN_BAR }));
        Ok(VirtioNet { config, msix_cap, pci_cfg_cap, core, msix_bar, modern_bar, rom: cfg.rom, notify, worker: None })
    }

    /// Starts the I/O thread (once).
    pub fn start(&mut self) -> Result<(), VirtioError> {
        if self.worker.is_none() {
            let mac = mac_string(&lock(&self.core).mac);
            self.worker = Some(Worker::start(self.core.clone()).map_err(|source| VirtioError::Io {
                mac,
                what: "starting the I/O thread",
                source,
            })?);
        }
        Ok(())
    }

    /// Stops and joins the I/O thread (also done on drop), and closes the backend: the VM has
    /// ended, and its tap must be free for another VM (or this one started again) at once,
    /// not when the stopped VM is finally deleted.
    pub fn shutdown(&mut self) {
        let Some(mut w) = self.worker.take() else { return };
        w.stop();
        let c = &mut lock(&self.core);
        let name = c.backend.name();
        c.flush_tx_drop_warning();
        tracing::debug!("{}: I/O counters at shutdown: {:?}, {} rounds", c.name, c.stats, c.rounds);
        match crate::net::Detached::new(name.clone()) {
            Ok(d) => c.backend = Box::new(d),
            Err(e) => tracing::warn!("{}: cannot detach {name}: {e}", c.name),
        }
    }

    /// Stops the I/O thread from touching the queues and guest memory; when this returns,
    /// no processing is under way. Frames keep waiting in the backend.
    pub fn pause(&self) {
        lock(&self.core).paused = true;
    }

    /// Lets the I/O thread work again, and has it look at the queues at once.
    pub fn resume(&self) {
        let c = &mut lock(&self.core);
        c.paused = false;
        let _ = c.wake.write(1);
    }

    /// The MAC this device was created with.
    pub fn mac(&self) -> [u8; 6] {
        lock(&self.core).mac
    }

    /// What drivers did to this device since it was created.
    pub fn driver_record(&self) -> DriverRecord {
        lock(&self.core).record.clone()
    }

    /// device_status as the driver would read it.
    pub fn status(&self) -> u8 {
        lock(&self.core).status
    }

    /// The device's counters (frames moved and dropped each way).
    pub fn stats(&self) -> NetStats {
        lock(&self.core).stats
    }

    /// The problem that stopped the device, if it is in its error state.
    pub fn error(&self) -> Option<String> {
        lock(&self.core).error.clone()
    }

    /// Link status as the guest sees it; a change raises a configuration interrupt.
    pub fn set_link(&self, up: bool) {
        let c = &mut lock(&self.core);
        if c.link_up != up {
            c.link_up = up;
            c.config_changed();
        }
    }

    /// The eventfds signalled by notifications of queue 0 and 1.
    pub fn notify_fds(&self) -> [Arc<EventFd>; NUM_QUEUES] {
        self.notify.clone()
    }

    fn pci_cfg_window(&self) -> Option<(usize, u64, usize)> {
        let b = self.config.bytes();
        let p = self.pci_cfg_cap;
        let bar = usize::from(b[p + 4]);
        let off = u64::from(u32::from_le_bytes([b[p + 8], b[p + 9], b[p + 10], b[p + 11]]));
        let len = u32::from_le_bytes([b[p + 12], b[p + 13], b[p + 14], b[p + 15]]) as usize;
        let size = match bar {
            MSIX_BAR => MSIX_BAR_SIZE,
            MODERN_BAR => MODERN_BAR_SIZE,
            _ => return None,
        };
        let fits = matches!(len, 1 | 2 | 4) && off.is_multiple_of(len as u64) && off + len as u64 <= size;
        fits.then_some((bar, off, len))
    }

    fn msix_control(&self) -> u16 {
        let b = self.config.bytes();
        u16::from_le_bytes([b[self.msix_cap + 2], b[self.msix_cap + 3]])
    }
}

fn overlaps(offset: usize, len: usize, start: usize, n: usize) -> bool {
    offset < start + n && start < offset + len
}

impl PciDevice for VirtioNet {
    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        let window = self.pci_cfg_cap + 16;
        if overlaps(offset, data.len(), window, 4) {
            let mut v = [0u8; 4];
            if let Some((bar, off, len)) = self.pci_cfg_window() {
                bar_read(&mut lock(&self.core), bar, off, &mut v[..len]);
            }
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(k) = (offset + i).checked_sub(window).filter(|&k| k < 4) {
                    *b = v[k];
                }
            }
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if overlaps(offset, data.len(), self.msix_cap + 2, 2) {
            let ctrl = self.msix_control();
            lock(&self.core).msix.set_control(ctrl & MSIX_ENABLE != 0, ctrl & MSIX_FUNCTION_MASK != 0);
        }
        let window = self.pci_cfg_cap + 16;
        if overlaps(offset, data.len(), window, 4) {
            if let Some((bar, off, len)) = self.pci_cfg_window() {
                let v = self.config.bytes()[window..window + len].to_vec();
                bar_write(&mut lock(&self.core), bar, off, &v);
            }
        }
    }

    fn bar_device(&self, index: usize) -> Option<Arc<Mutex<dyn BusDevice>>> {
        match index {
            MSIX_BAR => Some(self.msix_bar.clone()),
            MODERN_BAR => Some(self.modern_bar.clone()),
            _ => None,
        }
    }

    fn bar_memory(&self, index: usize) -> Option<Arc<RamBlock>> {
        (index == crate::pci::config::ROM_BAR).then(|| self.rom.clone()).flatten()
    }

    fn ioevents(&self, index: usize) -> Vec<IoEvent> {
        if index != MODERN_BAR {
            return Vec::new();
        }
        self.notify
            .iter()
            .enumerate()
            .map(|(q, fd)| IoEvent {
                offset: NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                len: 0,
                datamatch: None,
                fd: fd.clone(),
            })
            .collect()
    }

    /// A bus reset: configuration space, MSI-X and the virtio device back to power-on.
    fn reset(&mut self) {
        self.config.reset();
        let c = &mut lock(&self.core);
        c.reset();
        c.msix.reset();
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.shutdown();
    }
}
