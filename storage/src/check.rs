//! `store verify`'s structural half: the index against the packs, the manifest files
//! against the sled manifests, and sled's settings file (sledfiles.rs). Chunk contents are
//! checked by [`Store::verify_all`].

use std::os::unix::fs::FileExt;

use serde::Serialize;

use crate::chunk::Hash;
use crate::error::Result;
use crate::mfiles;
use crate::pack::{list_ids, parse_entry_header, Location, ENTRY_HEADER, PACK_HEADER};
use crate::scan::MAX_VALUE;
use crate::store::Store;

/// Most problems listed one by one; the rest are counted.
const MAX_LISTED: usize = 100;

/// Outcome of [`Store::check_index`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IndexCheck {
    /// Index entries checked.
    pub entries: u64,
    /// Pack files whose header was checked.
    pub packs: u64,
    /// Manifest files compared with the sled manifests.
    pub manifest_files: u64,
    /// Problems found (at most 100 listed; `problems` counts all).
    pub errors: Vec<String>,
    pub problems: u64,
}

impl IndexCheck {
    /// True when index, packs and manifest files agree.
    pub fn ok(&self) -> bool {
        self.problems == 0
    }

    fn problem(&mut self, msg: String) {
        self.problems += 1;
        if self.errors.len() < MAX_LISTED {
            self.errors.push(msg);
        }
    }
}

impl Store {
    /// Checks that every index entry points at an intact pack entry of its chunk (header,
    /// length and value crc), that every pack has a valid header, and that the manifest
    /// files and the sled manifests name the same snapshots with the same bytes. Reads every
    /// indexed value once: O(store) I/O.
    pub fn check_index(&self) -> Result<IndexCheck> {
        let inner = &self.inner;
        let mut c = IndexCheck::default();
        let packs_dir = inner.packs.dir().to_path_buf();
        let ids = list_ids(&packs_dir).map_err(|source| crate::StoreError::Io {
            path: packs_dir.clone(),
            op: "list packs",
            source,
        })?;
        for id in ids {
            c.packs += 1;
            if let Err(e) = inner.packs.file(id) {
                c.problem(format!("pack {id}: {e}"));
            }
        }
        let mut buf = Vec::new();
        for item in inner.index.iter() {
            let (key, value) = item.map_err(self.db_err("verify: scan chunk index"))?;
            c.entries += 1;
            let Ok(hash) = <[u8; 32]>::try_from(&key[..]).map(Hash) else {
                c.problem(format!("index key of {} bytes is no chunk hash", key.len()));
                continue;
            };
            let Some(loc) = Location::decode(&value) else {
                c.problem(format!("index entry of chunk {} is corrupt ({} bytes)", hash.to_hex(), value.len()));
                continue;
            };
            if let Err(why) = self.check_entry(&hash, loc, &mut buf) {
                c.problem(format!(
                    "index entry of chunk {} (pack {} offset 0x{:x} length {}) {why}",
                    hash.to_hex(),
                    loc.pack,
                    loc.offset,
                    loc.len
                ));
            }
        }
        self.check_manifest_files(&mut c)?;
        // sled itself accepts a damaged crc in its settings file (sledfiles.rs).
        let path = &inner.path;
        if let Err(e) = crate::sledfiles::check_conf(path, &crate::open::sled_config(path, inner.opts.cache_capacity)) {
            c.problem(e.to_string());
        }
        if !c.ok() {
            tracing::warn!(problems = c.problems, "verify: index and packs disagree");
        }
        Ok(c)
    }

    fn check_entry(&self, hash: &Hash, loc: Location, buf: &mut Vec<u8>) -> Result<(), String> {
        let start =
            loc.offset.checked_sub(ENTRY_HEADER).filter(|s| *s >= PACK_HEADER).ok_or("lies in the pack header")?;
        if u64::from(loc.len) > MAX_VALUE {
            return Err(format!("is longer than the largest value ({MAX_VALUE} bytes)"));
        }
        let file = self.inner.packs.file(loc.pack).map_err(|e| format!("names an unreadable pack: {e}"))?;
        buf.resize(ENTRY_HEADER as usize + loc.len as usize, 0);
        file.read_exact_at(buf, start).map_err(|e| format!("cannot be read: {e}"))?;
        let h = parse_entry_header(buf).ok_or("does not point behind an entry header")?;
        if h.hash != *hash || h.len != loc.len {
            return Err(format!("points at the entry of chunk {} ({} bytes)", h.hash.to_hex(), h.len));
        }
        let actual = crc32fast::hash(&buf[ENTRY_HEADER as usize..]);
        if actual != h.value_crc {
            return Err(format!("points at a damaged value (crc32 0x{actual:08x}, header 0x{:08x})", h.value_crc));
        }
        Ok(())
    }

    fn check_manifest_files(&self, c: &mut IndexCheck) -> Result<()> {
        let dir = mfiles::dir_of(&self.inner.path);
        let files = match mfiles::list(&dir) {
            Ok(f) => f,
            Err(e) => {
                c.problem(e.to_string());
                return Ok(());
            }
        };
        let sled = self.list()?;
        for name in sled.iter().filter(|n| !files.contains(n)) {
            c.problem(format!("snapshot '{name}' has no manifest file in '{}'", dir.display()));
        }
        for name in &files {
            c.manifest_files += 1;
            let Some(in_sled) = self.inner.manifests.get(name).map_err(self.db_err("verify: read manifest"))? else {
                c.problem(format!(
                    "manifest file '{}' names a snapshot the index does not list",
                    dir.join(name).display()
                ));
                continue;
            };
            match mfiles::read(&dir, name) {
                Ok((_, raw)) if raw == in_sled.as_ref() => {}
                Ok(_) => {
                    c.problem(format!("manifest file '{}' differs from the index's copy", dir.join(name).display()))
                }
                Err(e) => c.problem(e.to_string()),
            }
        }
        Ok(())
    }
}
