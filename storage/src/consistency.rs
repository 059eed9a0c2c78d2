//! Cross-checks between the sled index, the manifest files and the packs, run when a store
//! opens and before anything is collected. sled may open a truncated or damaged database
//! as empty or as an older state without complaint, so nothing here trusts it alone:
//!
//! * manifest files and sled manifests must name the same snapshots; a file without a sled
//!   entry is rolled forward only if the index holds every chunk it references (an
//!   interrupted commit), otherwise the index is damaged; a sled entry without a file gets its
//!   file back (an interrupted delete: see mfiles.rs);
//! * every chunk a committed manifest references must be in the index (read-write opens and
//!   every GC check this; read-only opens check only that the index is not empty while
//!   snapshots reference chunks).
//!
//! Any disagreement is [`StoreError::IndexDamaged`], which names the repair command; nothing
//! is removed.

use std::collections::{HashMap, HashSet};

use crate::chunk::{ChunkRef, Hash};
use crate::error::{Result, StoreError};
use crate::manifest::Manifest;
use crate::mfiles;
use crate::store::Store;

/// Meta key prefix of tombstones: manifests deleted since the last GC.
pub(crate) const TOMBSTONE: &[u8] = b"deleted/";

pub(crate) fn tombstone_key(name: &str) -> Vec<u8> {
    let mut k = TOMBSTONE.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn stored(m: &Manifest) -> impl Iterator<Item = Hash> + '_ {
    m.blocks.iter().flat_map(|b| b.chunks.iter()).filter_map(|c| match c {
        ChunkRef::Stored(h) => Some(*h),
        ChunkRef::Zero => None,
    })
}

impl Store {
    pub(crate) fn damaged(&self, reason: String) -> StoreError {
        StoreError::IndexDamaged { path: self.inner.path.clone(), reason }
    }

    /// Every committed manifest, decoded (an undecodable one is an error naming it).
    pub(crate) fn all_manifests(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for item in self.inner.manifests.iter() {
            let (key, value) = item.map_err(self.db_err("scan manifests"))?;
            let snapshot = String::from_utf8_lossy(&key).into_owned();
            let m = Manifest::decode(&value).map_err(|source| StoreError::Manifest { snapshot, source })?;
            out.push(m);
        }
        Ok(out)
    }

    /// How many of `m`'s stored chunks the index lacks, and one of them.
    fn missing_chunks(&self, m: &Manifest) -> Result<(u64, Option<Hash>)> {
        let mut missing = (0, None);
        let mut seen = HashSet::new();
        for h in stored(m) {
            if seen.insert(h) && !self.inner.index.contains_key(h.0).map_err(self.db_err("look up chunk"))? {
                missing.0 += 1;
                missing.1.get_or_insert(h);
            }
        }
        Ok(missing)
    }

    /// Makes manifest files and sled manifests agree, or fails (see the module doc). A
    /// read-only handle only checks.
    pub(crate) fn reconcile_manifests(&self) -> Result<()> {
        let inner = &self.inner;
        let dir = mfiles::dir_of(&inner.path);
        let files: HashSet<String> = mfiles::list(&dir)?.into_iter().collect();
        let mut in_sled = HashMap::new();
        for item in inner.manifests.iter() {
            let (key, value) = item.map_err(self.db_err("scan manifests"))?;
            in_sled.insert(String::from_utf8_lossy(&key).into_owned(), value);
        }
        let mut names: Vec<&String> = files.iter().filter(|n| !in_sled.contains_key(*n)).collect();
        names.sort();
        for name in names {
            let (m, raw) = mfiles::read(&dir, name)?;
            let (missing, example) = self.missing_chunks(&m)?;
            if missing > 0 {
                return Err(self.damaged(format!(
                    "snapshot '{name}' has a manifest file but is not in the index, which also lacks {missing} \
                     of its chunks (e.g. {})",
                    example.map(|h| h.to_hex()).unwrap_or_default()
                )));
            }
            if inner.read_only {
                tracing::warn!(snapshot = %name, "manifest file of an interrupted commit; a read-write open completes it");
                continue;
            }
            tracing::info!(snapshot = %name, "completing an interrupted commit from its manifest file");
            inner.manifests.insert(name.as_bytes(), raw).map_err(self.db_err("insert manifest"))?;
        }
        for (name, value) in &in_sled {
            if files.contains(name) {
                continue;
            }
            let m =
                Manifest::decode(value).map_err(|source| StoreError::Manifest { snapshot: name.clone(), source })?;
            if m.name != *name {
                return Err(self.damaged(format!("sled manifest '{name}' holds snapshot '{}'", m.name)));
            }
            if inner.read_only {
                tracing::warn!(snapshot = %name, "snapshot has no manifest file; a read-write open writes it");
                continue;
            }
            tracing::warn!(snapshot = %name, "snapshot had no manifest file (interrupted delete?); writing it");
            mfiles::write(&dir, name, value)?;
        }
        Ok(())
    }

    /// Read-only opens: the index must not be empty while snapshots reference chunks.
    pub(crate) fn check_index_not_emptied(&self) -> Result<()> {
        if !self.inner.index.is_empty() {
            return Ok(());
        }
        for m in self.all_manifests()? {
            if let Some(h) = stored(&m).next() {
                return Err(self.damaged(format!(
                    "the chunk index is empty, but snapshot '{}' references chunk {}",
                    m.name,
                    h.to_hex()
                )));
            }
        }
        Ok(())
    }

    /// Every chunk a committed manifest references must be in the index.
    pub(crate) fn check_live_indexed(&self) -> Result<()> {
        let mut total = 0;
        let mut first = None;
        for m in self.all_manifests()? {
            let (missing, example) = self.missing_chunks(&m)?;
            if missing > 0 {
                total += missing;
                first.get_or_insert((m.name.clone(), example));
            }
        }
        match first {
            None => Ok(()),
            Some((name, h)) => Err(self.damaged(format!(
                "{total} chunk(s) that snapshots reference are not in the index (e.g. {} of '{name}')",
                h.map(|h| h.to_hex()).unwrap_or_default()
            ))),
        }
    }

    /// Before a delete: records a tombstone (so recovery after a crash may collect the
    /// snapshot's chunks) and removes the manifest file (durably).
    pub(crate) fn tombstone_and_unlink(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        if let Some(raw) = inner.manifests.get(name).map_err(self.db_err("read manifest"))? {
            inner.meta.insert(tombstone_key(name), raw).map_err(self.db_err("record tombstone"))?;
            self.flush()?;
        }
        mfiles::remove(&mfiles::dir_of(&inner.path), name)
    }

    /// Hashes referenced by tombstoned manifests (undecodable tombstones are skipped: they
    /// only ever widen what recovery may remove).
    pub(crate) fn tombstoned_chunks(&self) -> Result<HashSet<Hash>> {
        let mut out = HashSet::new();
        for item in self.inner.meta.scan_prefix(TOMBSTONE) {
            let (_, value) = item.map_err(self.db_err("scan tombstones"))?;
            if let Ok(m) = Manifest::decode(&value) {
                out.extend(stored(&m));
            }
        }
        Ok(out)
    }

    /// Removes every tombstone (after a GC that saw every chunk they name).
    pub(crate) fn clear_tombstones(&self) -> Result<()> {
        let mut batch = sled::Batch::default();
        for item in self.inner.meta.scan_prefix(TOMBSTONE).keys() {
            batch.remove(item.map_err(self.db_err("scan tombstones"))?);
        }
        self.inner.meta.apply_batch(batch).map_err(self.db_err("clear tombstones"))
    }
}
