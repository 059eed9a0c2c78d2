//! Incremental snapshots: the snapshot a VM's memory was last equal to, and the dirty
//! tracking since then.
//!
//! After a successful snapshot, and after a restore, a VM keeps the committed manifest of
//! that snapshot (its *parent*) and keeps dirty tracking on from that moment: KVM's dirty log
//! (`KVM_MEM_LOG_DIRTY_PAGES` on every slot) for what vCPUs write, each RAM block's own
//! bitmap for what the VMM and devices write through [`migrate::ram::GuestMemory`] or the
//! block API, and a resize (which marks its whole block dirty and changes its length). The
//! next snapshot then copies only the chunks dirtied since and takes the others from the
//! parent's manifest by reference ([`storage::SnapshotWriter::inherit`]).
//!
//! Correctness rests on one rule: the parent is taken out of the VM when a snapshot starts
//! and put back (as the new snapshot) only when it commits. Every snapshot consumes the dirty
//! records, so after a failed or cancelled one the records since the parent are incomplete,
//! and the lineage is simply gone: the next snapshot is full. The others fall back too, each
//! logged with its reason: a parent deleted or replaced in the store meanwhile, a different
//! chunk size, a block resized or added since (that block is copied whole). A lazily restored
//! VM that is not fully resident needs nothing special: chunks it never touched are not
//! dirty, so they are taken from the parent's manifest, which is where their bytes are.

use std::sync::{Arc, Mutex, PoisonError};

use storage::Manifest;

/// The parent snapshot of a VM, if its memory is tracked since that snapshot.
#[derive(Default)]
pub struct Lineage(Mutex<Option<Arc<Manifest>>>);

impl Lineage {
    /// Takes the parent out: a snapshot starting now consumes the dirty records.
    pub fn take(&self) -> Option<Arc<Manifest>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Records `parent` as the snapshot the VM's memory was equal to when the dirty records
    /// were last cleared.
    pub fn set(&self, parent: Arc<Manifest>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(parent);
    }

    /// The parent's name, if there is one.
    pub fn parent_name(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|m| m.name.clone())
    }
}
