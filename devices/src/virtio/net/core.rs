//! The device's registers and runtime state, shared by the vCPU side (BAR and config
//! accesses) and the I/O thread, always under one mutex: [`Core`].
//!
//! Common configuration (virtio 1.x, 4.1.4.3), at [`super::super::COMMON_OFFSET`] in the
//! modern BAR:
//!
//! ```text
//! 0x00 device_feature_select u32   0x04 device_feature u32 (ro)   0x08 driver_feature_select u32
//! 0x0c driver_feature u32          0x10 config_msix_vector u16     0x12 num_queues u16 (ro)
//! 0x14 device_status u8            0x15 config_generation u8 (ro)  0x16 queue_select u16
//! 0x18 queue_size u16              0x1a queue_msix_vector u16      0x1c queue_enable u16
//! 0x1e queue_notify_off u16 (ro)   0x20 queue_desc u64   0x28 queue_driver u64   0x30 queue_device u64
//! ```
//!
//! Registers are accessed at their own width (64-bit addresses also as two 32-bit halves);
//! other accesses are ignored with a debug line. Writing 0 to device_status resets the
//! device, and device_status reads 0 from then on until the driver writes it again (SeaBIOS
//! and iPXE spin on that). A queue is checked when the driver enables it: its size a power of
//! two up to [`QUEUE_MAX_SIZE`], its rings aligned and inside guest RAM; a bad one puts the
//! device in its error state (see [`Core::fail`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::eventfd::EventFd;

use super::super::msix::{Msix, NO_VECTOR};
use super::super::QUEUE_MAX_SIZE;
use super::features::*;
use crate::net::NetBackend;
use migrate::ram::TrackedMemory;

/// device_status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// ISR bits: a queue interrupt, a configuration change.
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// Queues: receive 0, transmit 1.
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const NUM_QUEUES: usize = 2;

/// Bytes of the device configuration: mac[6], status u16, max_virtqueue_pairs u16.
pub const DEVICE_CFG_LEN: usize = 10;
/// virtio_net_config.status: link up.
pub const NET_S_LINK_UP: u16 = 1;

/// Largest frame, header included, in either direction (65550-byte GSO frame + 12).
pub const MAX_FRAME: usize = 65562;

/// What a driver did to the device (for tests with foreign drivers, such as iPXE).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverRecord {
    /// Every device_status bit the driver has set (the OR of its status writes).
    pub status_bits: u8,
    /// The status values it wrote, in order (the first 64).
    pub status_writes: Vec<u8>,
    /// One flag per byte of the device configuration: read by the driver.
    pub config_read: Vec<bool>,
    /// The device_feature_select values under which it read device_feature.
    pub feature_words_read: Vec<u32>,
    /// The features it accepted when it last set FEATURES_OK.
    pub features_accepted: u64,
    /// Queues it enabled (in order, the first 64).
    pub queues_enabled: Vec<u16>,
    /// Device resets it asked for (status 0 written).
    pub resets: u32,
}

impl DriverRecord {
    /// Whether the driver read all six bytes of the MAC.
    pub fn read_mac(&self) -> bool {
        self.config_read.len() >= 6 && self.config_read[..6].iter().all(|&b| b)
    }
}

/// One virtqueue's registers, and the queue built from them once enabled.
#[derive(Debug)]
pub struct VirtQueue {
    pub size: u16,
    pub ready: bool,
    pub vector: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Built and checked when the driver enables the queue.
    pub queue: Option<Queue>,
}

impl VirtQueue {
    pub fn new_reset() -> VirtQueue {
        VirtQueue { size: QUEUE_MAX_SIZE, ready: false, vector: NO_VECTOR, desc: 0, avail: 0, used: 0, queue: None }
    }
}

/// Checks a queue's registers against guest memory and builds it; the error says what is
/// wrong with which value.
pub fn build_queue(
    mem: &TrackedMemory,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
) -> Result<Queue, String> {
    if size == 0 || !size.is_power_of_two() || size > QUEUE_MAX_SIZE {
        return Err(format!("size {size} is not a power of two from 1 to {QUEUE_MAX_SIZE}"));
    }
    let n = u64::from(size);
    for (what, addr, align, len) in [
        ("descriptor table", desc, 16, 16 * n),
        ("available ring", avail, 2, 6 + 2 * n),
        ("used ring", used, 4, 6 + 8 * n),
    ] {
        if addr % align != 0 {
            return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
        }
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Err(format!("{what} at {addr:#x} (+{len:#x}) is outside guest RAM"));
        }
    }
    let mut q = Queue::new(QUEUE_MAX_SIZE).map_err(|e| e.to_string())?;
    q.try_set_size(size).map_err(|e| format!("size {size}: {e}"))?;
    q.try_set_desc_table_address(GuestAddress(desc)).map_err(|e| format!("descriptor table {desc:#x}: {e}"))?;
    q.try_set_avail_ring_address(GuestAddress(avail)).map_err(|e| format!("available ring {avail:#x}: {e}"))?;
    q.try_set_used_ring_address(GuestAddress(used)).map_err(|e| format!("used ring {used:#x}: {e}"))?;
    q.set_next_avail(next_avail);
    q.set_next_used(next_used);
    q.set_ready(true);
    Ok(q)
}

/// Everything the device is, under one mutex.
pub struct Core {
    pub name: String,
    pub mac: [u8; 6],
    /// Features the device offers.
    pub offered: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub config_generation: u8,
    pub config_vector: u16,
    pub queue_select: u16,
    pub queues: [VirtQueue; NUM_QUEUES],
    pub isr: u8,
    pub link_up: bool,
    /// The problem that put the device in its error state (DEVICE_NEEDS_RESET).
    pub error: Option<String>,
    pub msix: Msix,
    pub mem: TrackedMemory,
    pub backend: Box<dyn NetBackend>,
    /// The queues' notify eventfds (also registered with KVM as ioeventfds).
    pub notify: [Arc<EventFd>; NUM_QUEUES],
    /// Wakes the I/O thread to look at the state again (driver ready, resume, restore).
    pub wake: Arc<EventFd>,
    /// Set by `pause()`: the I/O thread touches neither queues nor guest memory.
    pub paused: bool,
    /// The receive queue had no buffer for the last frame: the tap is not polled until the
    /// driver adds buffers.
    pub rx_starved: bool,
    /// A frame read from the backend that is waiting for receive buffers (length, 0: none).
    pub rx_pending: usize,
    pub rx_buf: Vec<u8>,
    pub tx_buf: Vec<u8>,
    pub record: DriverRecord,
}

impl Core {
    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    /// Whether the I/O thread may move frames now.
    pub fn running(&self) -> bool {
        self.driver_ok() && self.error.is_none() && !self.paused
    }

    pub fn has(&self, feature: u64) -> bool {
        self.driver_features & feature != 0
    }

    /// Puts the device in its error state: DEVICE_NEEDS_RESET set, a configuration-change
    /// interrupt, one warning line naming the queue and the problem; nothing is processed
    /// until the driver resets the device. Later problems are not logged again.
    pub fn fail(&mut self, queue: usize, problem: &str) {
        if self.error.is_some() {
            return;
        }
        let qname = if queue == RX { "receive queue 0" } else { "transmit queue 1" };
        tracing::warn!("{}: {qname}: {problem}; device stopped until the driver resets it", self.name);
        self.error = Some(format!("{qname}: {problem}"));
        self.status |= STATUS_NEEDS_RESET;
        self.isr |= ISR_CONFIG;
        self.msix.notify(self.config_vector);
    }

    /// Raises queue `q`'s interrupt.
    pub fn interrupt_queue(&mut self, q: usize) {
        self.isr |= ISR_QUEUE;
        let v = self.queues[q].vector;
        self.msix.notify(v);
    }

    /// A configuration change (link status): new generation, interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.isr |= ISR_CONFIG;
        self.msix.notify(self.config_vector);
    }

    /// The virtio reset (device_status 0): the driver's settings and the queues go, the
    /// MSI-X table (a PCI function's) stays.
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        self.queues = [VirtQueue::new_reset(), VirtQueue::new_reset()];
        self.isr = 0;
        self.error = None;
        self.rx_starved = false;
        self.rx_pending = 0;
        if let Err(e) = self.backend.set_offload(0) {
            tracing::warn!("{}: clearing the offloads of {} failed: {e}", self.name, self.backend.name());
        }
    }

    fn device_config(&self) -> [u8; DEVICE_CFG_LEN] {
        let mut c = [0u8; DEVICE_CFG_LEN];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up { NET_S_LINK_UP } else { 0 };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    fn selected(&self) -> Option<&VirtQueue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn common_image(&self) -> [u8; 0x38] {
        let mut m = [0u8; 0x38];
        let mut put = |at: usize, b: &[u8]| m[at..at + b.len()].copy_from_slice(b);
        put(0x00, &self.device_feature_select.to_le_bytes());
        let word = match self.device_feature_select {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        };
        put(0x04, &word.to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        let word = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(0x0c, &word.to_le_bytes());
        put(0x10, &self.config_vector.to_le_bytes());
        put(0x12, &(NUM_QUEUES as u16).to_le_bytes());
        put(0x14, &[self.status, self.config_generation]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &q.vector.to_le_bytes());
            put(0x1c, &u16::from(q.ready).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes());
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.avail.to_le_bytes());
            put(0x30, &q.used.to_le_bytes());
        }
        m
    }

    /// A read of the common configuration.
    pub fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let img = self.common_image();
        let Some(end) = offset.checked_add(data.len() as u64).filter(|&e| e <= img.len() as u64) else {
            tracing::debug!("{}: common config read of {} bytes at {offset:#x} ignored", self.name, data.len());
            return;
        };
        data.copy_from_slice(&img[offset as usize..end as usize]);
        if offset <= 0x04 && end > 0x04 && !self.record.feature_words_read.contains(&self.device_feature_select) {
            self.record.feature_words_read.push(self.device_feature_select);
        }
    }

    /// A write to the common configuration.
    pub fn write_common(&mut self, offset: u64, data: &[u8]) {
        let v = match data.len() {
            1 => u64::from(data[0]),
            2 => u64::from(u16::from_le_bytes([data[0], data[1]])),
            4 => u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]])),
            8 => u64::from_le_bytes([data[0], data[1], data[2], data[3], data[4], data[5], data[6], data[7]]),
            _ => u64::MAX,
        };
        let len = data.len();
        let ignored = |c: &Core, why: &str| {
            tracing::debug!("{}: common config write of {len} bytes ({v:#x}) at {offset:#x} ignored: {why}", c.name)
        };
        match (offset, len) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    return ignored(self, "features are already accepted");
                }
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return ignored(self, "no such feature word"),
                };
                let word_mask = 0xffff_ffffu64 << shift;
                self.driver_features = (self.driver_features & !word_mask) | ((v << shift) & word_mask & self.offered);
            }
            (0x10, 2) => self.config_vector = if v < u64::from(self.msix.len()) { v as u16 } else { NO_VECTOR },
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) | (0x1a, 2) | (0x1c, 2) | (0x20..=0x37, 4) | (0x20 | 0x28 | 0x30, 8) => {
                self.write_queue_reg(offset, len, v)
            }
            _ => ignored(self, "not a register of that width"),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, len: usize, v: u64) {
        let qi = usize::from(self.queue_select);
        let Some(ready) = self.queues.get(qi).map(|q| q.ready) else {
            tracing::debug!("{}: queue register write at {offset:#x} with queue {qi} selected ignored", self.name);
            return;
        };
        let nvec = self.msix.len();
        let mut bad = None;
        match offset {
            0x1a => self.queues[qi].vector = if v < u64::from(nvec) { v as u16 } else { NO_VECTOR },
            0x1c => {
                if v == 1 && !ready {
                    self.enable_queue(qi);
                }
            }
            _ if ready => bad = Some("the queue is enabled"),
            0x18 => self.queues[qi].size = v as u16,
            _ => {
                let q = &mut self.queues[qi];
                let (field, at) = match offset {
                    0x20..=0x27 => (&mut q.desc, offset - 0x20),
                    0x28..=0x2f => (&mut q.avail, offset - 0x28),
                    _ => (&mut q.used, offset - 0x30),
                };
                match (at, len) {
                    (0, 8) => *field = v,
                    (0, 4) => *field = (*field & !0xffff_ffff) | v,
                    (4, 4) => *field = (*field & 0xffff_ffff) | v << 32,
                    _ => bad = Some("unaligned"),
                }
            }
        }
        if let Some(why) = bad {
            tracing::debug!("{}: queue {qi} register write ({v:#x}) at {offset:#x} ignored: {why}", self.name);
        }
    }

    fn enable_queue(&mut self, qi: usize) {
        if self.record.queues_enabled.len() < 64 {
            self.record.queues_enabled.push(qi as u16);
        }
        let q = &self.queues[qi];
        match build_queue(&self.mem, q.size, q.desc, q.avail, q.used, 0, 0) {
            Ok(built) => {
                let q = &mut self.queues[qi];
                q.queue = Some(built);
                q.ready = true;
                let _ = self.wake.write(1);
            }
            Err(problem) => {
                self.queues[qi].ready = true;
                self.fail(qi, &problem);
            }
        }
    }

    fn write_status(&mut self, v: u8) {
        if self.record.status_writes.len() < 64 {
            self.record.status_writes.push(v);
        }
        self.record.status_bits |= v;
        if v == 0 {
            self.record.resets += 1;
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = v | (old & STATUS_NEEDS_RESET);
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            if self.driver_features & VERSION_1 == 0 {
                tracing::debug!("{}: FEATURES_OK refused: the driver did not accept VERSION_1", self.name);
                new &= !STATUS_FEATURES_OK;
            } else {
                self.record.features_accepted = self.driver_features;
            }
        }
        self.status = new;
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            let flags = tun_offloads(self.driver_features);
            if let Err(e) = self.backend.set_offload(flags) {
                tracing::warn!("{}: setting offloads {flags:#x} on {} failed: {e}", self.name, self.backend.name());
            }
            let _ = self.wake.write(1);
        }
    }

    /// A read of the ISR status: returns it and clears it.
    pub fn read_isr(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && !data.is_empty() {
            data[0] = self.isr;
            self.isr = 0;
        }
    }

    /// A read of the device configuration.
    pub fn read_device(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cfg = self.device_config();
        let Some(end) = offset.checked_add(data.len() as u64).filter(|&e| e <= DEVICE_CFG_LEN as u64) else {
            tracing::debug!("{}: device config read of {} bytes at {offset:#x} ignored", self.name, data.len());
            return;
        };
        data.copy_from_slice(&cfg[offset as usize..end as usize]);
        if self.record.config_read.len() < DEVICE_CFG_LEN {
            self.record.config_read.resize(DEVICE_CFG_LEN, false);
        }
        for f in &mut self.record.config_read[offset as usize..end as usize] {
            *f = true;
        }
    }

    /// A write in the notify area: signals the queue's eventfd (as KVM's ioeventfd does).
    pub fn write_notify(&mut self, offset: u64, data: &[u8]) {
        let q = offset / u64::from(super::super::NOTIFY_OFF_MULTIPLIER);
        match self.notify.get(q as usize) {
            Some(fd) if offset.is_multiple_of(u64::from(super::super::NOTIFY_OFF_MULTIPLIER)) => {
                let _ = fd.write(1);
            }
            _ => tracing::debug!("{}: notify write of {} bytes at {offset:#x} ignored", self.name, data.len()),
        }
    }
}
