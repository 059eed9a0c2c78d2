//! The device's registers and runtime state, shared by the vCPU side (BAR and config
//! accesses) and the I/O thread, always under one mutex: [`Core`]. The register accesses
//! themselves are in `regs`.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::eventfd::EventFd;

use super::super::msix::{Msix, NO_VECTOR};
use super::super::QUEUE_MAX_SIZE;
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
    /// The device_feature_select values under which it read device_feature (the first 64).
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

/// The device's counters (per device, since it was created; a reset keeps them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Frames the driver sent that the backend took.
    pub tx_frames: u64,
    /// Frames the driver sent that the backend refused (a full tap: `EAGAIN`, or a tap gone):
    /// dropped, their chains completed all the same.
    pub tx_dropped: u64,
    /// Frames delivered into receive buffers.
    pub rx_frames: u64,
    /// Frames from the backend dropped: too short or long, or larger than the buffers.
    pub rx_dropped: u64,
    /// Receive passes that delivered at least one frame (used ring published, the driver
    /// signalled at most once each).
    pub rx_batches: u64,
    /// Reads of the backend that found nothing (`EAGAIN`).
    pub rx_empty_reads: u64,
    /// Waits of the I/O thread in epoll (each one that blocks is a sleep and a wake-up).
    pub sleeps: u64,
    /// Notifications of the receive queue by the driver (each an exit of its vCPU).
    pub rx_notifies: u64,
    /// Queue interrupts the device raised (MSI-X messages sent; none without a vector).
    pub interrupts: u64,
    /// CPU time the I/O thread used, in nanoseconds (recorded when it stops): with the frame
    /// counters, the device's cost per frame, whatever else the host runs.
    #[serde(default)]
    pub io_cpu_ns: u64,
}

/// At most one warning per this long about frames the backend refused.
pub const TX_DROP_WARN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// The device set `VRING_USED_F_NO_NOTIFY` on the receive queue and has not cleared it
    /// since (so that a round need not write it again).
    pub rx_notify_off: bool,
    /// A frame read from the backend that is waiting for receive buffers (length, 0: none).
    pub rx_pending: usize,
    pub rx_buf: Vec<u8>,
    /// The receive pass's working memory (see `rx`).
    pub rx_scratch: super::rx::RxScratch,
    pub tx_buf: Vec<u8>,
    pub record: DriverRecord,
    /// Rounds the I/O thread made (each wake-up is one): shows a thread that spins.
    pub rounds: u64,
    pub stats: NetStats,
    /// When the last warning about refused transmit frames was logged, and how many were
    /// refused since (for the rate-limited warning).
    pub tx_drop_warned: Option<Instant>,
    pub tx_drops_unwarned: u64,
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
        if v != NO_VECTOR {
            self.stats.interrupts += 1;
        }
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
        self.rx_notify_off = false;
        self.rx_pending = 0;
        if let Err(e) = self.backend.set_offload(0) {
            tracing::warn!("{}: clearing the offloads of {} failed: {e}", self.name, self.backend.name());
        }
    }
}
