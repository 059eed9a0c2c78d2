//! The device's saved state, and its restore: [`VirtioNetState`].
//!
//! A saved state is untrusted (it comes from a snapshot file). [`VirtioNet::restore`] checks
//! all of it before changing anything: queue sizes powers of two up to the maximum, the
//! rings of enabled queues aligned and inside this VM's guest RAM, MSI-X vectors inside the
//! table (or "no vector"), the MSI-X table of this device's size and pending bits only for
//! its vectors, the driver's features a subset of those this device offers, and an error text
//! of bounded length. A refused state leaves the device as it was; the error names the field
//! and the value. The MAC is not part of the state: a restored device keeps the MAC it was
//! configured with (clones get new MACs).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::core::{build_queue, VirtQueue, NUM_QUEUES, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET};
use super::features::{self, tun_offloads};
use super::{lock, VirtioNet};
use crate::virtio::msix::{MsixEntry, MSIX_ENABLE, MSIX_FUNCTION_MASK, NO_VECTOR};
use crate::virtio::QUEUE_MAX_SIZE;

/// Longest error text a state may carry.
const MAX_ERROR_LEN: usize = 1024;

/// One virtqueue, saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSaved {
    pub size: u16,
    pub ready: bool,
    pub vector: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// Everything of a virtio-net device that a snapshot keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    pub device_features: u64,
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub status: u8,
    pub config_generation: u8,
    pub config_vector: u16,
    pub queue_select: u16,
    pub queues: Vec<QueueSaved>,
    pub msix_table: Vec<MsixEntry>,
    pub msix_pba: u64,
    pub msix_enabled: bool,
    pub msix_function_mask: bool,
    pub isr: u8,
    pub link_up: bool,
    /// The problem that stopped the device (DEVICE_NEEDS_RESET), if any.
    pub error: Option<String>,
}

/// Why a saved state was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("virtio-net state has {n} queues, this device has {NUM_QUEUES}")]
    QueueCount { n: usize },
    #[error("virtio-net state: queue {queue}: {problem}")]
    Queue { queue: usize, problem: String },
    #[error("virtio-net state: {field} is MSI-X vector {vector}, the table has {table} entries")]
    Vector { field: String, vector: u16, table: u16 },
    #[error("virtio-net state: the driver accepted features {bits:#x} that this device does not offer")]
    Features { bits: u64 },
    #[error("virtio-net state: FEATURES_OK with a feature set the device refuses: {0}")]
    FeatureRules(features::FeatureError),
    #[error("virtio-net state: MSI-X table of {len} entries, this device has {expected}")]
    MsixTable { len: usize, expected: u16 },
    #[error("virtio-net state: MSI-X pending bits {pba:#x} name vectors past the table of {table}")]
    Pending { pba: u64, table: u16 },
    #[error("virtio-net state: error text of {len} bytes (at most {MAX_ERROR_LEN})")]
    ErrorText { len: usize },
}

impl VirtioNet {
    /// The device's state now. Pause the device first (and the vCPUs) for a state that
    /// matches guest memory.
    pub fn state(&self) -> VirtioNetState {
        let c = lock(&self.core);
        VirtioNetState {
            device_features: c.offered,
            driver_features: c.driver_features,
            device_feature_select: c.device_feature_select,
            driver_feature_select: c.driver_feature_select,
            status: c.status,
            config_generation: c.config_generation,
            config_vector: c.config_vector,
            queue_select: c.queue_select,
            queues: c
                .queues
                .iter()
                .map(|q| QueueSaved {
                    size: q.size,
                    ready: q.ready,
                    vector: q.vector,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    next_avail: q.queue.as_ref().map_or(0, virtio_queue::QueueT::next_avail),
                    next_used: q.queue.as_ref().map_or(0, virtio_queue::QueueT::next_used),
                })
                .collect(),
            msix_table: c.msix.table().to_vec(),
            msix_pba: c.msix.pba(),
            msix_enabled: c.msix.enabled(),
            msix_function_mask: c.msix.function_masked(),
            isr: c.isr,
            link_up: c.link_up,
            error: c.error.clone(),
        }
    }

    /// Takes `s` (untrusted; see the module doc). Refused: nothing changes.
    pub fn restore(&mut self, s: &VirtioNetState) -> Result<(), StateError> {
        let mut c = lock(&self.core);
        let table = c.msix.len();
        if s.queues.len() != NUM_QUEUES {
            return Err(StateError::QueueCount { n: s.queues.len() });
        }
        if s.msix_table.len() != usize::from(table) {
            return Err(StateError::MsixTable { len: s.msix_table.len(), expected: table });
        }
        if s.msix_pba >> table != 0 {
            return Err(StateError::Pending { pba: s.msix_pba, table });
        }
        let extra = s.driver_features & !c.offered;
        if extra != 0 {
            return Err(StateError::Features { bits: extra });
        }
        if s.status & STATUS_FEATURES_OK != 0 {
            features::check(s.driver_features).map_err(StateError::FeatureRules)?;
        }
        if let Some(e) = &s.error {
            if e.len() > MAX_ERROR_LEN {
                return Err(StateError::ErrorText { len: e.len() });
            }
        }
        let vector_ok = |v: u16| v == NO_VECTOR || v < table;
        if !vector_ok(s.config_vector) {
            return Err(StateError::Vector { field: "config_msix_vector".into(), vector: s.config_vector, table });
        }
        let mut queues = Vec::new();
        for (i, q) in s.queues.iter().enumerate() {
            if !vector_ok(q.vector) {
                return Err(StateError::Vector { field: format!("queue {i} msix_vector"), vector: q.vector, table });
            }
            if q.size > QUEUE_MAX_SIZE || (q.size != 0 && !q.size.is_power_of_two()) {
                return Err(StateError::Queue {
                    queue: i,
                    problem: format!("size {} is not a power of two up to {QUEUE_MAX_SIZE}", q.size),
                });
            }
            let built = if q.ready && s.error.is_none() {
                Some(
                    build_queue(&c.mem, q.size, q.desc, q.avail, q.used, q.next_avail, q.next_used)
                        .map_err(|problem| StateError::Queue { queue: i, problem })?,
                )
            } else {
                None
            };
            queues.push(VirtQueue {
                size: q.size,
                ready: q.ready,
                vector: q.vector,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                queue: built,
            });
        }
        // Checked: from here on nothing fails.
        let [rx, tx]: [VirtQueue; NUM_QUEUES] = match queues.try_into() {
            Ok(q) => q,
            Err(_) => return Err(StateError::QueueCount { n: s.queues.len() }),
        };
        c.queues = [rx, tx];
        c.driver_features = s.driver_features;
        c.device_feature_select = s.device_feature_select;
        c.driver_feature_select = s.driver_feature_select;
        c.status = s.status;
        c.error = s.error.clone();
        if c.error.is_some() {
            c.status |= STATUS_NEEDS_RESET;
        }
        c.config_generation = s.config_generation;
        c.config_vector = s.config_vector;
        c.queue_select = s.queue_select;
        c.isr = s.isr;
        c.link_up = s.link_up;
        c.rx_pending = 0;
        c.rx_starved = false;
        c.rx_notify_off = false;
        let offloads = if c.status & STATUS_DRIVER_OK != 0 { tun_offloads(c.driver_features) } else { 0 };
        if let Err(e) = c.backend.set_offload(offloads) {
            tracing::warn!("{}: setting offloads {offloads:#x} on {} failed: {e}", c.name, c.backend.name());
        }
        c.msix.restore(&s.msix_table, s.msix_pba, s.msix_enabled, s.msix_function_mask);
        let _ = c.wake.write(1);
        drop(c);
        // The capability's bits follow the restored MSI-X state (the PCI bus restores the same
        // bytes from its own fragment).
        let mut ctrl = self.msix_control() & !(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        if s.msix_enabled {
            ctrl |= MSIX_ENABLE;
        }
        if s.msix_function_mask {
            ctrl |= MSIX_FUNCTION_MASK;
        }
        let at = self.msix_cap + 2;
        self.config.write(at, &ctrl.to_le_bytes());
        Ok(())
    }
}
