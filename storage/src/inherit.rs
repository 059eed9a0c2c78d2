//! Incremental snapshots: a writer takes the unchanged chunks of a parent snapshot by
//! reference.
//!
//! Chunks are shared by content hash, never by a chain: a child's manifest lists every chunk
//! hash itself, exactly like a full snapshot's, so deleting the parent (and collecting its
//! garbage) leaves the child intact, GC keeps every chunk a child references, and restoring a
//! child never looks at the parent. What makes it safe to take a parent's references without
//! reading them is [`SnapshotWriter::inherit`]'s check, under the shared GC lock, that the
//! store still holds exactly that parent: while it does, every chunk it lists is indexed and
//! live, and once recorded in the writer they stay live (GC marks a writer's references).

use std::sync::atomic::Ordering;

use crate::error::{Result, StoreError};
use crate::manifest::Manifest;
use crate::writer::SnapshotWriter;

impl SnapshotWriter {
    /// Takes every chunk of the blocks that `parent` records with the same length and page
    /// size (and the same chunk size) from `parent`'s manifest: the incremental snapshot's
    /// unchanged chunks, shared by reference. Chunks written with `put_chunk` afterwards
    /// replace them. Returns the idstrs of the blocks taken; the caller must write every chunk
    /// of the others.
    ///
    /// `parent` must be exactly the manifest the store holds under its name: a parent deleted
    /// (or deleted and written anew) since the caller read it gives [`StoreError::ParentChanged`]
    /// and nothing is taken. The check and the references are made under the shared GC lock,
    /// so the chunks are live throughout: the committed parent's until this writer has
    /// recorded them, this writer's (which GC marks) from then on, whatever happens to the
    /// parent afterwards.
    pub fn inherit(&self, parent: &Manifest) -> Result<Vec<String>> {
        let s = &self.shared;
        let changed = |reason: &str| StoreError::ParentChanged {
            snapshot: s.name.clone(),
            parent: parent.name.clone(),
            reason: reason.to_owned(),
        };
        if parent.chunk_size != s.chunk_size {
            return Err(changed(&format!(
                "its chunk size is {}, this store writes {}",
                parent.chunk_size, s.chunk_size
            )));
        }
        let inner = &self.store.inner;
        let _gc = inner.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let stored = match self.store.manifest(&parent.name) {
            Ok(m) => m,
            Err(StoreError::NotFound(_)) => return Err(changed("it was deleted")),
            Err(e) => return Err(e),
        };
        if stored != *parent {
            return Err(changed("the store holds a different snapshot under its name"));
        }
        let mut taken = Vec::new();
        for b in &s.blocks {
            let Some(pb) = parent.block(&b.spec.idstr) else { continue };
            if pb.used_length != b.spec.used_length || pb.page_size != b.spec.page_size {
                continue;
            }
            let mut table = b.chunks.lock().unwrap_or_else(|p| p.into_inner());
            if pb.chunks.len() != table.len() {
                continue;
            }
            for (slot, c) in table.iter_mut().zip(&pb.chunks) {
                *slot = Some(*c);
            }
            s.inherited_chunks.fetch_add(pb.chunks.len() as u64, Ordering::Relaxed);
            taken.push(b.spec.idstr.clone());
        }
        Ok(taken)
    }
}
