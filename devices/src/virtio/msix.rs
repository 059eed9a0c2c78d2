//! MSI-X for a virtio PCI function: the vector table and pending-bit array (both in
//! [`super::MSIX_BAR`]) and the enable / function-mask bits of the capability's message
//! control, delivered through the machine's [`MsiRoutes`].
//!
//! ```text
//! table entry i at MSIX_TABLE_OFFSET + 16 * i:
//!   +0 message address low   +4 message address high   +8 message data   +12 vector control (bit 0: masked)
//! PBA at MSIX_PBA_OFFSET: bit i set while vector i is pending (raised while masked)
//! message control (capability + 2): bits 10:0 table size - 1, bit 14 function mask, bit 15 enable
//! ```
//!
//! Every change that alters what a vector delivers (an entry written, a vector masked or
//! unmasked, MSI-X enabled or the function masked) calls [`MsiRoutes::set_route`] for the
//! vectors concerned, with `None` while they cannot deliver. Raising a vector that is masked
//! (itself or by the function mask) sets its pending bit; unmasking delivers it once and
//! clears the bit. With MSI-X disabled no message is delivered or made pending; the function
//! raises the VM's paravirtual interrupt line instead ([`MsiRoutes::raise_line`]: no INTx pin
//! in config space and no interrupt controller input, only a latch that CPL3 guests wait on;
//! drivers that poll, such as iPXE, read the ISR and never look at it).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{MsiMessage, MsiRoutes, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET};

/// "No vector" in the virtio vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// Message-control bits.
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Vector-control bit 0.
const VECTOR_MASKED: u32 = 1;

/// One MSI-X table entry as the guest wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl Default for MsixEntry {
    /// Masked, as at reset.
    fn default() -> Self {
        MsixEntry { addr_lo: 0, addr_hi: 0, data: 0, control: VECTOR_MASKED }
    }
}

/// A function's MSI-X state.
pub struct Msix {
    table: Vec<MsixEntry>,
    pba: u64,
    enabled: bool,
    function_mask: bool,
    routes: Arc<dyn MsiRoutes>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("table", &self.table)
            .field("pba", &self.pba)
            .field("enabled", &self.enabled)
            .field("function_mask", &self.function_mask)
            .finish()
    }
}

impl Msix {
    /// `vectors` entries (at most 64), all masked, MSI-X disabled.
    pub fn new(vectors: u16, routes: Arc<dyn MsiRoutes>) -> Msix {
        let n = usize::from(vectors.clamp(1, 64));
        Msix { table: vec![MsixEntry::default(); n], pba: 0, enabled: false, function_mask: false, routes }
    }

    pub fn len(&self) -> u16 {
        self.table.len() as u16
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_mask
    }

    pub fn table(&self) -> &[MsixEntry] {
        &self.table
    }

    pub fn pba(&self) -> u64 {
        self.pba
    }

    fn masked(&self, i: usize) -> bool {
        self.function_mask || self.table[i].control & VECTOR_MASKED != 0
    }

    /// What vector `i` delivers now.
    fn route(&self, i: usize) -> Option<MsiMessage> {
        let e = self.table.get(i)?;
        (self.enabled && !self.masked(i))
            .then_some(MsiMessage { addr: u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo), data: e.data })
    }

    fn sync(&self, i: usize) {
        if let Err(e) = self.routes.set_route(i as u16, self.route(i)) {
            tracing::warn!("MSI-X vector {i}: setting its route failed: {e}");
        }
    }

    /// Delivers vector `i` if it is pending and can deliver now.
    fn flush_pending(&mut self, i: usize) {
        if self.pba & (1 << i) != 0 && self.route(i).is_some() {
            self.pba &= !(1 << i);
            self.routes.trigger(i as u16);
        }
    }

    /// Pushes every route to the machine and delivers what is pending and deliverable (after
    /// a restore).
    pub fn sync_all(&mut self) {
        for i in 0..self.table.len() {
            self.sync(i);
            self.flush_pending(i);
        }
    }

    /// The capability's enable and function-mask bits changed (or may have).
    pub fn set_control(&mut self, enabled: bool, function_mask: bool) {
        if (enabled, function_mask) == (self.enabled, self.function_mask) {
            return;
        }
        self.enabled = enabled;
        self.function_mask = function_mask;
        self.sync_all();
    }

    /// Raises vector `v` (virtio's [`NO_VECTOR`] and vectors past the table do nothing).
    /// With MSI-X disabled, whatever the vector, the function's interrupt line is raised
    /// instead ([`MsiRoutes::raise_line`]).
    pub fn notify(&mut self, v: u16) {
        if !self.enabled {
            self.routes.raise_line();
            return;
        }
        let i = usize::from(v);
        if v == NO_VECTOR || i >= self.table.len() {
            return;
        }
        if self.masked(i) {
            self.pba |= 1 << i;
        } else {
            self.routes.trigger(v);
        }
    }

    /// A read of the MSI-X BAR at `offset`. Only aligned 4- and 8-byte accesses reach the
    /// table; others read 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(4) {
            tracing::debug!("MSI-X BAR: {}-byte read at {offset:#x} ignored", data.len());
            return;
        }
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            let v = self.read_dword(offset + 4 * k as u64);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    fn read_dword(&self, offset: u64) -> u32 {
        let table_end = MSIX_TABLE_OFFSET + 16 * self.table.len() as u64;
        if (MSIX_TABLE_OFFSET..table_end).contains(&offset) {
            let e = &self.table[((offset - MSIX_TABLE_OFFSET) / 16) as usize];
            match (offset - MSIX_TABLE_OFFSET) % 16 {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                _ => e.control,
            }
        } else if offset == MSIX_PBA_OFFSET {
            self.pba as u32
        } else if offset == MSIX_PBA_OFFSET + 4 {
            (self.pba >> 32) as u32
        } else {
            0
        }
    }

    /// A write to the MSI-X BAR at `offset` (the PBA is read-only).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(4) {
            tracing::debug!("MSI-X BAR: {}-byte write at {offset:#x} ignored", data.len());
            return;
        }
        for (k, chunk) in data.chunks(4).enumerate() {
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.write_dword(offset + 4 * k as u64, v);
        }
    }

    fn write_dword(&mut self, offset: u64, v: u32) {
        let table_end = MSIX_TABLE_OFFSET + 16 * self.table.len() as u64;
        if !(MSIX_TABLE_OFFSET..table_end).contains(&offset) {
            tracing::debug!("MSI-X BAR: write of {v:#x} at {offset:#x} outside the table ignored");
            return;
        }
        let i = ((offset - MSIX_TABLE_OFFSET) / 16) as usize;
        let before = self.table[i];
        let e = &mut self.table[i];
        match (offset - MSIX_TABLE_OFFSET) % 16 {
            0 => e.addr_lo = v & !3,
            4 => e.addr_hi = v,
            8 => e.data = v,
            _ => e.control = v & VECTOR_MASKED,
        }
        if self.table[i] != before {
            self.sync(i);
            self.flush_pending(i);
        }
    }

    /// Back to power-on: entries masked and zero, nothing pending, disabled.
    pub fn reset(&mut self) {
        let n = self.table.len();
        self.table = vec![MsixEntry::default(); n];
        self.pba = 0;
        self.enabled = false;
        self.function_mask = false;
        for i in 0..n {
            self.sync(i);
        }
    }

    /// Replaces the whole state (checked by the caller), then pushes every route.
    pub fn restore(&mut self, table: &[MsixEntry], pba: u64, enabled: bool, function_mask: bool) {
        self.table = table.to_vec();
        self.pba = pba;
        self.enabled = enabled;
        self.function_mask = function_mask;
        self.sync_all();
    }
}
