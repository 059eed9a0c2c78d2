//! Guest-physical memory as devices see it: the one path by which a device reads or writes
//! guest RAM.
//!
//! A [`GuestMemory`] maps guest-physical ranges onto RAM blocks (where each block appears,
//! as the KVM slot map places it). Every write goes through [`RamBlock::write`], which marks
//! the pages in the block's dirty bitmap. KVM's dirty log sees only what vCPUs write; a live
//! snapshot reads both, so a device write (fw_cfg DMA, say) made after a chunk was copied is
//! copied again. A device that wrote through a view of its own (a vm-memory mapping of the
//! same host memory) would leave that chunk stale in the snapshot.
//!
//! Accesses are checked: an address outside every range, or a range running into a hole, is
//! an error naming the address, never a partial access.

use std::sync::Arc;

use thiserror::Error;

use super::block::RamBlock;

/// Errors accessing guest memory.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GuestMemoryError {
    #[error("guest memory access of {len:#x} bytes at {gpa:#x} is outside guest RAM")]
    Outside { gpa: u64, len: u64 },
    #[error("guest memory region at {gpa:#x} ({len:#x} bytes of '{idstr}' at {block_offset:#x}): {reason}")]
    Region { gpa: u64, len: u64, idstr: String, block_offset: u64, reason: String },
    #[error("guest memory at {gpa:#x}: {source}")]
    Block { gpa: u64, source: super::RamError },
}

/// Part of a RAM block placed in guest-physical memory.
#[derive(Clone, Debug)]
pub struct GuestRegion {
    pub gpa: u64,
    pub len: u64,
    pub block: Arc<RamBlock>,
    pub block_offset: u64,
}

/// Guest RAM for devices. Cheap to clone.
#[derive(Clone, Debug)]
pub struct GuestMemory {
    /// Sorted by `gpa`, not overlapping.
    regions: Arc<Vec<GuestRegion>>,
}

impl GuestMemory {
    /// Guest memory made of `regions`, which must not overlap, wrap, or reach beyond their
    /// blocks' mappings.
    pub fn new(mut regions: Vec<GuestRegion>) -> Result<GuestMemory, GuestMemoryError> {
        regions.sort_by_key(|r| r.gpa);
        let mut end_prev = 0;
        for r in &regions {
            let bad = |reason: &str| GuestMemoryError::Region {
                gpa: r.gpa,
                len: r.len,
                idstr: r.block.idstr().to_string(),
                block_offset: r.block_offset,
                reason: reason.to_string(),
            };
            let end = r.gpa.checked_add(r.len).ok_or_else(|| bad("wraps the address space"))?;
            if r.block_offset.checked_add(r.len).is_none_or(|e| e > r.block.max_length()) {
                return Err(bad("reaches beyond the block"));
            }
            if r.gpa < end_prev {
                return Err(bad("overlaps another region"));
            }
            end_prev = end;
        }
        Ok(GuestMemory { regions: Arc::new(regions) })
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Guest memory of one block placed at guest address 0 (tests, simple machines).
    pub fn flat(block: Arc<RamBlock>) -> GuestMemory {
        let len = block.max_length();
        GuestMemory { regions: Arc::new(vec![GuestRegion { gpa: 0, len, block, block_offset: 0 }]) }
    }

    /// Splits `gpa..gpa+len` into (region, offset in region, length) pieces; an error unless
    /// every byte lies in a region.
    fn pieces(&self, gpa: u64, len: usize) -> Result<Vec<(&GuestRegion, u64, usize)>, GuestMemoryError> {
        let outside = GuestMemoryError::Outside { gpa, len: len as u64 };
        let mut out = Vec::new();
        let mut at = gpa;
        let mut left = len as u64;
        while left > 0 {
            let r = self.regions.iter().find(|r| at >= r.gpa && at - r.gpa < r.len).ok_or_else(|| outside.clone())?;
            let off = at - r.gpa;
            let n = left.min(r.len - off);
            out.push((r, off, n as usize));
            left -= n;
            at = at.checked_add(n).ok_or_else(|| outside.clone())?;
        }
        Ok(out)
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for (r, off, n) in self.pieces(gpa, buf.len())? {
            r.block
                .read(r.block_offset + off, &mut buf[done..done + n])
                .map_err(|source| GuestMemoryError::Block { gpa: r.gpa + off, source })?;
            done += n;
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`, marking the pages dirty in their blocks.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        let pieces = self.pieces(gpa, data.len())?;
        let mut done = 0;
        for (r, off, n) in pieces {
            r.block
                .write(r.block_offset + off, &data[done..done + n])
                .map_err(|source| GuestMemoryError::Block { gpa: r.gpa + off, source })?;
            done += n;
        }
        Ok(())
    }
}
