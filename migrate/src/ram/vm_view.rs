//! A vm-memory view of [`GuestMemory`] whose writes mark the RAM blocks dirty.
//!
//! Crates of rust-vmm (virtio-queue's rings and descriptor chains) need a
//! `vm_memory::GuestMemory`. A plain `GuestMemoryMmap` over the blocks' host memory would
//! write guest RAM behind the blocks' dirty bitmaps, and a live snapshot would keep stale
//! copies of the pages the device wrote (see the `guest` module). This view maps the same
//! host memory (no copy, no new mapping: `with_raw_mmap_pointer`) with a vm-memory
//! [`Bitmap`] per region, [`BlockDirty`], that forwards every `mark_dirty` of vm-memory to
//! [`RamBlock::mark_dirty`] at the region's offset in its block. vm-memory marks the bitmap
//! on every write path (`write_slice`, `write_obj`, atomic `store`, volatile copies).
//!
//! Lifetime: each region's bitmap holds an `Arc` of its block, so the host mapping outlives
//! every view of it (the vm-memory regions are built as not owned and never unmap it).

use std::sync::Arc;

use thiserror::Error;
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap};

use super::block::RamBlock;
use super::guest::GuestMemory;

/// vm-memory's guest memory over RAM blocks, dirty-tracked by the blocks.
pub type TrackedMemory = vm_memory::GuestMemoryMmap<BlockDirty>;

/// Errors building a [`TrackedMemory`].
#[derive(Debug, Error)]
pub enum VmViewError {
    #[error("vm-memory view of '{idstr}' at guest {gpa:#x} (+{len:#x}, block offset {block_offset:#x}): {reason}")]
    Region { idstr: String, gpa: u64, len: u64, block_offset: u64, reason: String },
    #[error("vm-memory view of guest memory: {0}")]
    Collection(String),
}

/// The dirty bitmap of one vm-memory region: the part of a RAM block it maps.
#[derive(Clone)]
pub struct BlockDirty {
    block: Arc<RamBlock>,
    block_offset: u64,
}

impl std::fmt::Debug for BlockDirty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockDirty({}@{:#x})", self.block.idstr(), self.block_offset)
    }
}

impl<'a> WithBitmapSlice<'a> for BlockDirty {
    type S = BlockDirtySlice<'a>;
}

impl Bitmap for BlockDirty {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.block.mark_dirty(self.block_offset.saturating_add(offset as u64), len as u64);
    }

    /// Not tracked per region: the block's bitmap is read with `take_dirty`.
    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, offset: usize) -> BlockDirtySlice<'_> {
        BlockDirtySlice { block: &self.block, offset: self.block_offset.saturating_add(offset as u64) }
    }
}

/// A [`BlockDirty`] from an offset on, borrowed (what vm-memory hands its volatile slices).
#[derive(Clone, Copy)]
pub struct BlockDirtySlice<'a> {
    block: &'a RamBlock,
    /// From the start of the block.
    offset: u64,
}

impl std::fmt::Debug for BlockDirtySlice<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockDirtySlice({}@{:#x})", self.block.idstr(), self.offset)
    }
}

impl<'b> WithBitmapSlice<'b> for BlockDirtySlice<'_> {
    type S = Self;
}

impl BitmapSlice for BlockDirtySlice<'_> {}

impl Bitmap for BlockDirtySlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.block.mark_dirty(self.offset.saturating_add(offset as u64), len as u64);
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, offset: usize) -> Self {
        BlockDirtySlice { block: self.block, offset: self.offset.saturating_add(offset as u64) }
    }
}

impl GuestMemory {
    /// A vm-memory view of the same guest memory whose writes mark the blocks dirty.
    pub fn tracked(&self) -> Result<TrackedMemory, VmViewError> {
        let mut regions = Vec::new();
        for r in self.regions() {
            let bad = |reason: String| VmViewError::Region {
                idstr: r.block.idstr().to_string(),
                gpa: r.gpa,
                len: r.len,
                block_offset: r.block_offset,
                reason,
            };
            let len = usize::try_from(r.len).map_err(|_| bad("does not fit this host".into()))?;
            let off = usize::try_from(r.block_offset).map_err(|_| bad("does not fit this host".into()))?;
            // `GuestMemory::new` checked block_offset + len <= max_length.
            // SAFETY: `off < max_length` (checked when the GuestMemory was built), so the
            // pointer stays inside the block's mapping.
            let ptr = unsafe { r.block.host_addr().add(off) };
            let bitmap = BlockDirty { block: r.block.clone(), block_offset: r.block_offset };
            // SAFETY: `ptr..ptr+len` lies inside the block's live mapping (GuestMemory::new
            // checked `block_offset + len <= max_length`), and the bitmap holds an Arc of the
            // block, so the mapping outlives the region; the region is not owned and never
            // unmaps it.
            let mmap = unsafe { MmapRegionBuilder::new_with_bitmap(len, bitmap).with_raw_mmap_pointer(ptr) }
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(r.gpa)).ok_or_else(|| bad("wraps".into()))?;
            regions.push(region);
        }
        TrackedMemory::from_regions(regions).map_err(|e| VmViewError::Collection(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use crate::ram::{GuestMemory, GuestRegion, RamBlockConfig, RamRegistry};

    #[test]
    fn writes_through_the_view_mark_the_block_dirty() {
        let reg = RamRegistry::new();
        let b = reg
            .add(RamBlockConfig {
                idstr: "pc.ram".into(),
                size: 0x10000,
                max_size: 0x10000,
                page_size: 0x1000,
                resizeable: false,
            })
            .expect("block");
        // The block at guest 0x100000, from block offset 0x2000.
        let mem =
            GuestMemory::new(vec![GuestRegion { gpa: 0x10_0000, len: 0x8000, block: b.clone(), block_offset: 0x2000 }])
                .expect("memory");
        let view = mem.tracked().expect("view");
        b.take_dirty();
        view.write_obj(0xabcd_u32, GuestAddress(0x10_3ffe)).expect("write");
        assert_eq!(b.take_dirty(), vec![5, 6], "guest 0x103ffe is block offset 0x5ffe, pages 5 and 6");
        view.write_slice(&[1, 2, 3], GuestAddress(0x10_0000)).expect("write");
        assert_eq!(b.take_dirty(), vec![2]);
        view.store(7u16, GuestAddress(0x10_7000), std::sync::atomic::Ordering::Release).expect("store");
        assert_eq!(b.take_dirty(), vec![9]);
        let mut back = [0u8; 3];
        mem.read(0x10_0000, &mut back).expect("read");
        assert_eq!(back, [1, 2, 3], "the view maps the block's own memory");
        assert!(view.write_obj(1u8, GuestAddress(0x10_8000)).is_err(), "outside the region");
    }
}
