//! The registers of the modern BAR as the driver reaches them: common configuration, ISR,
//! device configuration and notifications, all on [`Core`].
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
//! two up to [`crate::virtio::QUEUE_MAX_SIZE`], its rings aligned and inside guest RAM; a bad one puts the
//! device in its error state (see [`Core::fail`]).

use super::core::*;
use super::features::*;
use crate::virtio::msix::NO_VECTOR;

impl Core {
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
        let words = &self.record.feature_words_read;
        if offset <= 0x04 && end > 0x04 && words.len() < 64 && !words.contains(&self.device_feature_select) {
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
            if let Err(e) = super::features::check(self.driver_features) {
                tracing::warn!("{}: FEATURES_OK refused: {e}", self.name);
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
