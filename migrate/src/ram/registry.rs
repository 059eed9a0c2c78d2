//! The registry of a VM's RAM blocks, with QEMU's resize rules and resize listeners.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::block::{align_up, RamBlock, RamBlockConfig};
use super::error::RamError;

/// Told about every block added, removed and resized.
pub trait RamBlockListener: Send + Sync {
    fn block_added(&self, _b: &Arc<RamBlock>) {}
    fn block_removed(&self, _b: &Arc<RamBlock>) {}
    /// May veto a resize before anything changes (a lazy restore still filling the block).
    fn check_resize(&self, _b: &RamBlock, _old: u64, _new: u64) -> Result<(), String> {
        Ok(())
    }
    /// The block is about to change from `old_used` to `new_used` (both page-aligned).
    fn block_resized(&self, _b: &RamBlock, _old_used: u64, _new_used: u64) {}
}

/// Identifies a registered listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListenerId(u64);

#[derive(Default)]
struct Inner {
    blocks: BTreeMap<String, Arc<RamBlock>>,
    listeners: Vec<(ListenerId, Arc<dyn RamBlockListener>)>,
    next_listener: u64,
}

/// A VM's RAM blocks.
#[derive(Default)]
pub struct RamRegistry {
    inner: Mutex<Inner>,
}

impl RamRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(RamRegistry::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn listeners(&self) -> Vec<Arc<dyn RamBlockListener>> {
        self.lock().listeners.iter().map(|(_, l)| l.clone()).collect()
    }

    /// Creates a block and tells the listeners.
    pub fn add(&self, cfg: RamBlockConfig) -> Result<Arc<RamBlock>, RamError> {
        if self.lock().blocks.contains_key(&cfg.idstr) {
            return Err(RamError::Duplicate(cfg.idstr));
        }
        let block = Arc::new(RamBlock::new(cfg)?);
        {
            let mut g = self.lock();
            if g.blocks.contains_key(block.idstr()) {
                return Err(RamError::Duplicate(block.idstr().to_string()));
            }
            g.blocks.insert(block.idstr().to_string(), block.clone());
        }
        for l in self.listeners() {
            l.block_added(&block);
        }
        Ok(block)
    }

    /// Removes a block and tells the listeners.
    pub fn remove(&self, idstr: &str) -> Result<Arc<RamBlock>, RamError> {
        let block = self.lock().blocks.remove(idstr).ok_or_else(|| RamError::Unknown(idstr.to_string()))?;
        for l in self.listeners() {
            l.block_removed(&block);
        }
        Ok(block)
    }

    pub fn get(&self, idstr: &str) -> Option<Arc<RamBlock>> {
        self.lock().blocks.get(idstr).cloned()
    }

    /// Every block, sorted by idstr.
    pub fn blocks(&self) -> Vec<Arc<RamBlock>> {
        self.lock().blocks.values().cloned().collect()
    }

    /// Registers a listener; it is told about the blocks that already exist.
    pub fn add_listener(&self, l: Arc<dyn RamBlockListener>) -> ListenerId {
        let (id, existing) = {
            let mut g = self.lock();
            let id = ListenerId(g.next_listener);
            g.next_listener += 1;
            g.listeners.push((id, l.clone()));
            (id, g.blocks.values().cloned().collect::<Vec<_>>())
        };
        for b in &existing {
            l.block_added(b);
        }
        id
    }

    pub fn remove_listener(&self, id: ListenerId) {
        self.lock().listeners.retain(|(i, _)| *i != id);
    }

    /// Resizes `idstr` to `new_size` (unaligned) by QEMU's rules:
    /// 1. align up to the page size;
    /// 2. same aligned size, different unaligned size: record it and call the hook;
    /// 3. not resizeable: `Size mismatch`;
    /// 4. beyond `max_length`: `Size too large`;
    /// 5. listeners may veto; then they are told (old, new), the length changes, the whole
    ///    block is marked dirty, and the hook runs.
    ///
    /// Listeners and the hook run without the registry's lock held, so they may call back in;
    /// resizes of one block are serialised by the block's own lock.
    pub fn resize(&self, idstr: &str, new_size: u64) -> Result<(), RamError> {
        let block = self.get(idstr).ok_or_else(|| RamError::Unknown(idstr.to_string()))?;
        let _serial = block.resize_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let new = align_up(new_size, block.page_size()).ok_or_else(|| RamError::SizeTooLarge {
            idstr: idstr.to_string(),
            new: new_size,
            max: block.max_length(),
        })?;
        let used = block.used_length();
        if new == used {
            if new_size != block.unaligned_length() {
                block.set_lengths(used, new_size);
                block.call_hook(new_size);
            }
            return Ok(());
        }
        if !block.resizeable() {
            return Err(RamError::SizeMismatch { idstr: idstr.to_string(), new, used });
        }
        if new > block.max_length() {
            return Err(RamError::SizeTooLarge { idstr: idstr.to_string(), new, max: block.max_length() });
        }
        let listeners = self.listeners();
        for l in &listeners {
            l.check_resize(&block, used, new)
                .map_err(|reason| RamError::ResizeRefused { idstr: idstr.to_string(), reason })?;
        }
        for l in &listeners {
            l.block_resized(&block, used, new);
        }
        block.set_lengths(new, new_size);
        block.mark_dirty(0, new);
        block.call_hook(new_size);
        Ok(())
    }
}
