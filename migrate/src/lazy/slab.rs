//! Memory for the chunk cache's entries: 2 MiB slabs carved into equal slots, handed out and
//! taken back by a pool.
//!
//! Why not one heap allocation per chunk: a chunk kept in the cache was a fresh 64 KiB
//! allocation, and on this nested host first touching its 16 new pages costs 2-4 µs each,
//! more than decompressing the chunk (a default lazy restore paid ~39 µs per cold chunk for
//! it, on top of ~69 µs of reading, decompressing, hashing and placing). A slab is mapped
//! once, 2 MiB aligned, asked to be a transparent huge page (`MADV_HUGEPAGE`) and populated in
//! one call (`MADV_POPULATE_WRITE`): about 5 µs per 64 KiB slot. The store decompresses a chunk
//! straight into its slot ([`super::ChunkCache::slot`]), so keeping it costs no copy either.
//! Where huge pages or populating are not available the slab is faulted in page by page, as
//! before.
//!
//! Ownership: the pool's free list holds each free slot once, and [`Pool::take`] hands it to
//! exactly one [`SlotMut`], the only writer. [`SlotMut::freeze`] turns it into
//! [`ChunkBytes`], shared and read-only from then on; the slot goes back to the free list when
//! the last `ChunkBytes` referring to it is dropped (the cache's entry and any restore still
//! placing from it). So bytes being read are never handed out for writing. A slab whose slots
//! are all free is unmapped when the pool already has two slabs' worth of free slots, and on
//! [`Pool::trim`]; a slab still holding a slot stays mapped (each slot keeps its slab alive).
//!
//! Lock order: the pool's mutex is a leaf (held for list operations only; never while mapping,
//! and never while a cache shard's lock is taken from inside it).

use std::collections::HashMap;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

/// Size of a slab, and the largest slot.
pub const SLAB_BYTES: usize = 2 << 20;
/// Smallest slot.
const MIN_SLOT: usize = 4096;

/// One mapping of [`SLAB_BYTES`], 2 MiB aligned, unmapped on drop.
struct Slab {
    base: NonNull<u8>,
}

// SAFETY: a slab is plain anonymous memory owned by this value; which thread may write which
// part of it is decided by the pool's slot ownership (module doc), not by the thread.
unsafe impl Send for Slab {}
// SAFETY: as for Send: shared references only give out slot pointers, and a slot is written
// through its unique `SlotMut` alone.
unsafe impl Sync for Slab {}

impl Slab {
    /// Maps a slab; huge pages and populating are asked for and their failure ignored.
    fn map() -> Option<Slab> {
        let len = 2 * SLAB_BYTES;
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(SLAB_BYTES);
        // Keep the aligned 2 MiB, give back the rest of the 4 MiB on both sides.
        // SAFETY: both ranges lie inside the mapping made above and outside the kept slab.
        unsafe {
            if aligned > start {
                libc::munmap(raw, aligned - start);
            }
            let tail = aligned + SLAB_BYTES;
            if start + len > tail {
                libc::munmap(tail as *mut libc::c_void, start + len - tail);
            }
        }
        let base = aligned as *mut libc::c_void;
        // SAFETY: advice on the slab just mapped, which nothing else uses yet; failure (no
        // THP, a kernel before 5.14) only leaves the pages to be faulted in on first write.
        unsafe {
            libc::madvise(base, SLAB_BYTES, libc::MADV_HUGEPAGE);
            libc::madvise(base, SLAB_BYTES, libc::MADV_POPULATE_WRITE);
        }
        NonNull::new(aligned as *mut u8).map(|base| Slab { base })
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: the slab's own mapping; no slot refers to it any more (each holds an Arc).
        unsafe { libc::munmap(self.base.as_ptr().cast(), SLAB_BYTES) };
    }
}

struct SlabEntry {
    slab: Arc<Slab>,
    used: u32,
}

#[derive(Default)]
struct Inner {
    slabs: HashMap<u64, SlabEntry>,
    free: Vec<(u64, u32)>,
    next_id: u64,
}

/// Slots of one size.
pub struct Pool {
    slot: usize,
    per_slab: u32,
    inner: Mutex<Inner>,
}

impl Pool {
    /// A pool of slots holding up to `len` bytes (rounded up to a power of two, at least 4 KiB),
    /// or `None` if that is more than a slab.
    pub fn for_len(len: usize) -> Option<Arc<Pool>> {
        let slot = len.max(MIN_SLOT).checked_next_power_of_two()?;
        (slot <= SLAB_BYTES)
            .then(|| Arc::new(Pool { slot, per_slab: (SLAB_BYTES / slot) as u32, inner: Mutex::new(Inner::default()) }))
    }

    /// The slot size.
    #[cfg(test)]
    fn slot_len(&self) -> usize {
        self.slot
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A free slot, mapping a new slab if none is free; `None` if mapping fails.
    pub fn take(self: &Arc<Self>) -> Option<SlotMut> {
        let found = {
            let mut g = self.lock();
            g.free.pop().and_then(|(id, idx)| {
                let e = g.slabs.get_mut(&id)?;
                e.used += 1;
                Some((id, idx, e.slab.clone()))
            })
        };
        let (id, idx, slab) = match found {
            Some(f) => f,
            None => {
                // Mapped without the lock: populating 2 MiB takes a while.
                let slab = Arc::new(Slab::map()?);
                let mut g = self.lock();
                let id = g.next_id;
                g.next_id += 1;
                g.slabs.insert(id, SlabEntry { slab: slab.clone(), used: 1 });
                g.free.extend((1..self.per_slab).rev().map(|i| (id, i)));
                (id, 0, slab)
            }
        };
        Some(SlotMut(Slot { pool: self.clone(), slab, id, idx, len: self.slot }))
    }

    fn release(&self, id: u64, idx: u32) {
        let mut g = self.lock();
        g.free.push((id, idx));
        let Some(e) = g.slabs.get_mut(&id) else { return };
        e.used -= 1;
        if e.used == 0 && g.free.len() > 2 * self.per_slab as usize {
            g.slabs.remove(&id);
            g.free.retain(|&(s, _)| s != id);
        }
    }

    /// Unmaps every slab none of whose slots is in use; returns how many.
    pub fn trim(&self) -> usize {
        let mut g = self.lock();
        let empty: Vec<u64> = g.slabs.iter().filter(|(_, e)| e.used == 0).map(|(&id, _)| id).collect();
        for id in &empty {
            g.slabs.remove(id);
        }
        if !empty.is_empty() {
            g.free.retain(|(s, _)| !empty.contains(s));
        }
        empty.len()
    }

    /// Slabs mapped.
    pub fn slabs(&self) -> usize {
        self.lock().slabs.len()
    }
}

/// A slot with a length; returns to its pool when dropped.
struct Slot {
    pool: Arc<Pool>,
    slab: Arc<Slab>,
    id: u64,
    idx: u32,
    len: usize,
}

impl Slot {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: idx < per_slab, so the offset stays inside the slab's SLAB_BYTES.
        unsafe { self.slab.base.as_ptr().add(self.idx as usize * self.pool.slot) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.release(self.id, self.idx);
    }
}

/// A slot being written: its only reference.
pub struct SlotMut(Slot);

impl SlotMut {
    /// The whole slot, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the pool handed this slot to this value alone (module doc), the slot lies
        // inside the mapped slab kept alive by `self.0.slab`, and `&mut self` makes the
        // borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.0.ptr(), self.0.pool.slot) }
    }

    /// The first `len` bytes (at most the slot), shared and read-only from now on.
    pub fn freeze(mut self, len: usize) -> ChunkBytes {
        self.0.len = len.min(self.0.pool.slot);
        ChunkBytes(Repr::Slot(Arc::new(self.0)))
    }
}

/// A chunk's bytes, shared: in a slab slot, or on the heap.
#[derive(Clone)]
pub struct ChunkBytes(Repr);

#[derive(Clone)]
enum Repr {
    Heap(Arc<[u8]>),
    Slot(Arc<Slot>),
}

impl Deref for ChunkBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Heap(b) => b,
            // SAFETY: a frozen slot is never written again until it is back in the pool,
            // which happens only after this last reference is gone; it lies in its slab,
            // which the Arc keeps mapped.
            Repr::Slot(s) => unsafe { std::slice::from_raw_parts(s.ptr(), s.len) },
        }
    }
}

impl From<Arc<[u8]>> for ChunkBytes {
    fn from(b: Arc<[u8]>) -> Self {
        ChunkBytes(Repr::Heap(b))
    }
}

impl From<&[u8]> for ChunkBytes {
    fn from(b: &[u8]) -> Self {
        ChunkBytes(Repr::Heap(Arc::from(b)))
    }
}

impl PartialEq for ChunkBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for ChunkBytes {}

impl std::fmt::Debug for ChunkBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkBytes({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_until_returned_and_reused_after() {
        let pool = Pool::for_len(64 << 10).expect("pool");
        assert_eq!(pool.slot_len(), 64 << 10);
        // Two slabs' worth: every slot distinct, each keeps what was written into it.
        let mut slots: Vec<SlotMut> = (0..64).map(|_| pool.take().expect("slot")).collect();
        for (i, s) in slots.iter_mut().enumerate() {
            s.bytes_mut().fill(i as u8);
        }
        let mut ptrs: Vec<usize> = slots.iter().map(|s| s.0.ptr() as usize).collect();
        ptrs.sort_unstable();
        ptrs.dedup();
        assert_eq!(ptrs.len(), 64, "a slot handed out twice");
        assert_eq!(pool.slabs(), 2);
        let frozen: Vec<ChunkBytes> = slots.into_iter().enumerate().map(|(i, s)| s.freeze(1000 + i)).collect();
        for (i, b) in frozen.iter().enumerate() {
            assert_eq!(b.len(), 1000 + i);
            assert!(b.iter().all(|&x| x == i as u8), "slot {i} was overwritten");
        }
        // A clone keeps the slot: it is not handed out while one reference remains.
        let kept = frozen[5].clone();
        let kept_ptr = kept.as_ptr() as usize;
        drop(frozen);
        for _ in 0..63 {
            let mut s = pool.take().expect("slot");
            assert_ne!(s.0.ptr() as usize, kept_ptr, "a slot still referenced was handed out");
            s.bytes_mut().fill(0xee);
        }
        assert!(kept.iter().all(|&x| x == 5));
    }

    #[test]
    fn empty_slabs_are_unmapped_on_trim_and_beyond_two_free_slabs() {
        let pool = Pool::for_len(1 << 20).expect("pool");
        // Two slots a slab: six slots make three slabs.
        let slots: Vec<SlotMut> = (0..6).map(|_| pool.take().expect("slot")).collect();
        assert_eq!(pool.slabs(), 3);
        drop(slots);
        // All free: up to two slabs' worth of free slots are kept for reuse.
        assert!(pool.slabs() <= 3);
        let before = pool.slabs();
        assert_eq!(pool.trim(), before, "every empty slab goes on trim");
        assert_eq!(pool.slabs(), 0);
        let kept = pool.take().expect("slot").freeze(10);
        assert_eq!(pool.trim(), 0, "a slab with a slot in use stays");
        assert_eq!(pool.slabs(), 1);
        drop(kept);
        assert_eq!(pool.trim(), 1);
    }

    #[test]
    fn sizes_round_up_and_stop_at_a_slab() {
        assert_eq!(Pool::for_len(1).expect("pool").slot_len(), 4096);
        assert_eq!(Pool::for_len(65537).expect("pool").slot_len(), 128 << 10);
        assert_eq!(Pool::for_len(SLAB_BYTES).expect("pool").slot_len(), SLAB_BYTES);
        assert!(Pool::for_len(SLAB_BYTES + 1).is_none());
    }
}
