//! Guest RAM as RAM blocks, and the KVM memory-slot map that follows them.
//!
//! All guest RAM is one non-resizeable RAM block, `pc.ram`, as in QEMU's PC machine. When it
//! is larger than the space below the 32-bit PCI hole it is split: the first 3 GiB appear at
//! guest address 0, the rest at 4 GiB. Where a block appears is a *placement*; the
//! [`SlotMap`] is a [`RamBlockListener`] that turns placements into KVM memory slots when the
//! block is added, re-sizes them when the block is resized and deletes them when it goes.
//!
//! Lock order: the registry calls listeners without its own lock held; `SlotMap` takes its
//! one mutex inside each callback and calls only KVM ioctls under it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use migrate::ram::{GuestMemory, GuestRegion, RamBlock, RamBlockConfig, RamBlockListener, RamRegistry};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::boot::linux::E820Entry;
use crate::layout;

/// The idstr of main guest RAM.
pub const PC_RAM: &str = "pc.ram";

/// e820 types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Errors building guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is too small: snapvisor needs at least {min} MiB")]
    TooSmall { mib: u64, min: u64 },
    #[error("guest memory of {mib} MiB is more than this host can give ({host_mib} MiB of RAM)")]
    TooLarge { mib: u64, host_mib: u64 },
    #[error("creating RAM block {idstr}: {source}")]
    Block { idstr: String, source: migrate::ram::RamError },
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} ({idstr} at {gpa:#x}, {len:#x} bytes): {source}")]
    Slot { slot: u32, idstr: String, gpa: u64, len: u64, source: kvm_ioctls::Error },
    #[error("mapping {idstr} into vm-memory at {gpa:#x}: {reason}")]
    GuestMemory { idstr: String, gpa: u64, reason: String },
    #[error("reading the host's memory size: {0}")]
    HostMemory(String),
}

/// Smallest guest snapvisor builds: room for the boot structures and a little code.
pub const MIN_MEM_MIB: u64 = 4;

/// Where part of a RAM block appears in guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub block_offset: u64,
    pub gpa: u64,
    pub len: u64,
    pub readonly: bool,
}

/// The placements of `pc.ram` for a guest of `size` bytes.
pub fn pc_ram_layout(size: u64) -> Vec<Placement> {
    let low = size.min(layout::PCI_HOLE_START);
    let mut v = vec![Placement { block_offset: 0, gpa: 0, len: low, readonly: false }];
    if size > low {
        v.push(Placement { block_offset: low, gpa: layout::HIGH_RAM_START, len: size - low, readonly: false });
    }
    v
}

/// The e820 map of a guest of `size` bytes: the EBDA and legacy hole are reserved.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut v = Vec::new();
    for p in pc_ram_layout(size) {
        if p.gpa == 0 {
            v.push(E820Entry { addr: 0, size: layout::EBDA_START, kind: E820_RAM });
            v.push(E820Entry {
                addr: layout::EBDA_START,
                size: layout::HIMEM_START - layout::EBDA_START,
                kind: E820_RESERVED,
            });
            if p.len > layout::HIMEM_START {
                v.push(E820Entry { addr: layout::HIMEM_START, size: p.len - layout::HIMEM_START, kind: E820_RAM });
            }
        } else {
            v.push(E820Entry { addr: p.gpa, size: p.len, kind: E820_RAM });
        }
    }
    v
}

/// This host's RAM in MiB, the ceiling for one guest: `MemTotal`, as `sysinfo(2)` gives it
/// (reading /proc/meminfo, which formats every counter, was 50-180 µs of each VM's creation).
pub fn host_mem_mib() -> Result<u64, MemoryError> {
    // SAFETY: sysinfo is plain old data; all zeros is a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo; the call only writes it.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return Err(MemoryError::HostMemory(format!("sysinfo: {}", std::io::Error::last_os_error())));
    }
    Ok((info.totalram as u64).saturating_mul(u64::from(info.mem_unit.max(1))) >> 20)
}

/// Checks a requested guest size against snapvisor's floor and the host's RAM.
pub fn check_size(mib: u64) -> Result<u64, MemoryError> {
    if mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall { mib, min: MIN_MEM_MIB });
    }
    let host_mib = host_mem_mib()?;
    if mib > host_mib {
        return Err(MemoryError::TooLarge { mib, host_mib });
    }
    Ok(mib << 20)
}

#[derive(Debug)]
struct Slot {
    id: u32,
    idstr: String,
    placement: Placement,
    host: u64,
    mapped_len: u64,
}

#[derive(Default)]
struct SlotState {
    placements: BTreeMap<String, Vec<Placement>>,
    slots: Vec<Slot>,
    next_slot: u32,
    free: Vec<u32>,
    dirty_log: bool,
}

/// Keeps KVM memory slots in step with the RAM blocks that have placements.
pub struct SlotMap {
    vm: Arc<VmFd>,
    state: Mutex<SlotState>,
}

impl SlotMap {
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(SlotMap { vm, state: Mutex::new(SlotState::default()) })
    }

    /// Declares where `idstr` appears; takes effect when the block is added (or now, if it is
    /// already mapped: call before adding the block).
    pub fn place(&self, idstr: &str, placements: Vec<Placement>) {
        self.lock().placements.insert(idstr.to_string(), placements);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_slot(&self, slot: &Slot, len: u64, dirty_log: bool) -> Result<(), MemoryError> {
        let mut flags = 0;
        if slot.placement.readonly {
            flags |= KVM_MEM_READONLY;
        }
        if dirty_log {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let region = kvm_userspace_memory_region {
            slot: slot.id,
            flags,
            guest_phys_addr: slot.placement.gpa,
            memory_size: len,
            userspace_addr: slot.host,
        };
        // SAFETY: `userspace_addr..+len` lies inside the RAM block's mapping, which was reserved
        // at max_length and stays mapped while the block exists; the slot is deleted (size 0)
        // in `block_removed` before the block's mapping can go away.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot {
            slot: slot.id,
            idstr: slot.idstr.clone(),
            gpa: slot.placement.gpa,
            len,
            source,
        })
    }

    fn mapped_len(p: &Placement, used: u64) -> u64 {
        used.saturating_sub(p.block_offset).min(p.len)
    }

    /// Turns KVM dirty logging on or off for every slot (live snapshots).
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), MemoryError> {
        let mut st = self.lock();
        st.dirty_log = on;
        for s in &st.slots {
            self.set_slot(s, s.mapped_len, on)?;
        }
        Ok(())
    }

    /// The slots of a block as (slot id, placement, mapped length), for dirty-log reads.
    pub fn slots_of(&self, idstr: &str) -> Vec<(u32, Placement, u64)> {
        self.lock().slots.iter().filter(|s| s.idstr == idstr).map(|s| (s.id, s.placement, s.mapped_len)).collect()
    }

    fn add_block(&self, b: &RamBlock) -> Result<(), MemoryError> {
        let mut st = self.lock();
        let Some(placements) = st.placements.get(b.idstr()).cloned() else {
            return Ok(());
        };
        for p in placements {
            self.add_slot(&mut st, b, p)?;
        }
        Ok(())
    }

    /// Maps `b` at `p` now, while the VM runs (an option ROM that firmware just placed through
    /// a PCI BAR). The slot follows the block's resizes and goes with the block, like the
    /// placements declared with [`SlotMap::place`]; [`SlotMap::unmap_at`] removes it.
    pub fn map_block(&self, b: &RamBlock, p: Placement) -> Result<(), MemoryError> {
        let mut st = self.lock();
        self.add_slot(&mut st, b, p)
    }

    /// Gives `b`'s placement `p` a slot (a free id, or the next) and maps it with KVM; on an
    /// error the id goes back to the free list and nothing is recorded.
    fn add_slot(&self, st: &mut SlotState, b: &RamBlock, p: Placement) -> Result<(), MemoryError> {
        let id = match st.free.pop() {
            Some(id) => id,
            None => {
                st.next_slot += 1;
                st.next_slot - 1
            }
        };
        let mapped_len = Self::mapped_len(&p, b.used_length());
        let slot = Slot {
            id,
            idstr: b.idstr().to_string(),
            placement: p,
            host: b.host_addr() as u64 + p.block_offset,
            mapped_len,
        };
        if mapped_len > 0 {
            if let Err(e) = self.set_slot(&slot, mapped_len, st.dirty_log) {
                st.free.push(id);
                return Err(e);
            }
        }
        st.slots.push(slot);
        Ok(())
    }

    /// Removes the slot of `idstr` that [`SlotMap::map_block`] put at `gpa`; false if there is
    /// none.
    pub fn unmap_at(&self, idstr: &str, gpa: u64) -> bool {
        let mut st = self.lock();
        let Some(i) = st.slots.iter().position(|s| s.idstr == idstr && s.placement.gpa == gpa) else {
            return false;
        };
        let s = st.slots.remove(i);
        if s.mapped_len > 0 {
            if let Err(e) = self.set_slot(&s, 0, false) {
                tracing::error!(block = idstr, "deleting KVM slot at {gpa:#x} failed: {e}");
            }
        }
        st.free.push(s.id);
        true
    }
}

impl RamBlockListener for SlotMap {
    fn block_added(&self, b: &Arc<RamBlock>) {
        if let Err(e) = self.add_block(b) {
            tracing::error!(block = b.idstr(), "mapping RAM block into KVM failed: {e}");
        }
    }

    fn block_removed(&self, b: &Arc<RamBlock>) {
        let mut st = self.lock();
        let (gone, kept): (Vec<Slot>, Vec<Slot>) =
            std::mem::take(&mut st.slots).into_iter().partition(|s| s.idstr == b.idstr());
        st.slots = kept;
        for s in gone {
            if let Err(e) = self.set_slot(&s, 0, false) {
                tracing::error!(block = b.idstr(), "deleting KVM slot failed: {e}");
            }
            st.free.push(s.id);
        }
    }

    fn block_resized(&self, b: &RamBlock, _old: u64, new: u64) {
        let mut st = self.lock();
        let dirty_log = st.dirty_log;
        for i in 0..st.slots.len() {
            if st.slots[i].idstr != b.idstr() {
                continue;
            }
            let len = Self::mapped_len(&st.slots[i].placement, new);
            // KVM cannot change a slot's size in place: delete it, then add it back.
            let res = self.set_slot(&st.slots[i], 0, false).and_then(|()| {
                if len > 0 {
                    self.set_slot(&st.slots[i], len, dirty_log)
                } else {
                    Ok(())
                }
            });
            if let Err(e) = res {
                tracing::error!(block = b.idstr(), "re-sizing KVM slot failed: {e}");
            }
            st.slots[i].mapped_len = len;
        }
    }
}

/// Guest RAM: the `pc.ram` block, a vm-memory view of it for the loaders that fill it before
/// the VM runs, and the [`GuestMemory`] devices write through (which marks dirty pages).
pub struct GuestRam {
    block: Arc<RamBlock>,
    memory: GuestMemoryMmap,
    devices: GuestMemory,
    size: u64,
}

impl GuestRam {
    /// Creates `pc.ram` of `size` bytes in `registry`, placed per [`pc_ram_layout`] through
    /// `slots` (which must already listen to `registry`).
    pub fn new(registry: &RamRegistry, slots: &SlotMap, size: u64) -> Result<Self, MemoryError> {
        let placements = pc_ram_layout(size);
        slots.place(PC_RAM, placements.clone());
        let block = registry
            .add(RamBlockConfig { idstr: PC_RAM.into(), size, max_size: size, page_size: 0, resizeable: false })
            .map_err(|source| MemoryError::Block { idstr: PC_RAM.into(), source })?;
        let mut regions = Vec::new();
        for p in &placements {
            let gm_err = |reason: String| MemoryError::GuestMemory { idstr: PC_RAM.into(), gpa: p.gpa, reason };
            let len = usize::try_from(p.len).map_err(|e| gm_err(e.to_string()))?;
            // SAFETY: the range lies inside pc.ram's mapping (offset + len <= size), which was
            // created with these protection bits and flags and lives as long as `block`, which
            // `GuestRam` holds for as long as `memory` exists.
            let mapping = unsafe {
                MmapRegion::build_raw(
                    block.host_addr().add(p.block_offset as usize),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| gm_err(e.to_string()))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(p.gpa))
                .ok_or_else(|| gm_err("region wraps the address space".into()))?;
            regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::GuestMemory {
            idstr: PC_RAM.into(),
            gpa: 0,
            reason: e.to_string(),
        })?;
        let devices = GuestMemory::new(
            placements
                .iter()
                .map(|p| GuestRegion { gpa: p.gpa, len: p.len, block: block.clone(), block_offset: p.block_offset })
                .collect(),
        )
        .map_err(|e| MemoryError::GuestMemory { idstr: PC_RAM.into(), gpa: 0, reason: e.to_string() })?;
        Ok(GuestRam { block, memory, devices, size })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Guest memory for devices: every write marks the pages dirty in `pc.ram`.
    pub fn device_memory(&self) -> &GuestMemory {
        &self.devices
    }

    pub fn block(&self) -> &Arc<RamBlock> {
        &self.block
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The highest guest-physical address of RAM, plus one.
    pub fn top(&self) -> u64 {
        pc_ram_layout(self.size).last().map_or(0, |p| p.gpa + p.len)
    }

    pub fn e820(&self) -> Vec<E820Entry> {
        e820_map(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(
            pc_ram_layout(256 << 20),
            vec![Placement { block_offset: 0, gpa: 0, len: 256 << 20, readonly: false }]
        );
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let l = pc_ram_layout(4 << 30);
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].gpa, l[0].len), (0, 3 << 30));
        assert_eq!((l[1].block_offset, l[1].gpa, l[1].len), (3 << 30, 4 << 30, 1 << 30));
    }

    #[test]
    fn e820_reserves_legacy_hole_and_covers_ram() {
        let m = e820_map(6 << 30);
        let ram: u64 = m.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (6 << 30) - (layout::HIMEM_START - layout::EBDA_START));
        assert!(m.iter().any(|e| e.kind == E820_RESERVED && e.addr == layout::EBDA_START));
        assert_eq!(m.last().map(|e| e.addr), Some(layout::HIGH_RAM_START));
    }

    /// The same figure as /proc/meminfo's MemTotal, which it replaces.
    #[test]
    fn host_memory_is_memtotal() {
        let info = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
        let kib: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("MemTotal");
        assert_eq!(host_mem_mib().expect("sysinfo"), kib / 1024);
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(check_size(1), Err(MemoryError::TooSmall { .. })));
        assert!(matches!(check_size(u64::MAX >> 21), Err(MemoryError::TooLarge { .. })));
        assert_eq!(check_size(16).ok(), Some(16 << 20));
    }
}
