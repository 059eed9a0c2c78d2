//! Test-only hooks for corrupting and inspecting stored values. Not part of the API.

use crate::chunk::Hash;
use crate::error::Result;
use crate::pack::Location;
use crate::store::Store;

impl Store {
    /// Where the value of chunk `hash` is stored (pack id, offset, length).
    #[doc(hidden)]
    pub fn debug_chunk_location(&self, hash: &Hash) -> Result<Option<Location>> {
        let raw = self.inner.index.get(hash.0).map_err(self.db_err("debug: read index"))?;
        Ok(raw.and_then(|r| Location::decode(&r)))
    }

    /// Path of pack file `id`.
    #[doc(hidden)]
    pub fn debug_pack_path(&self, id: u32) -> std::path::PathBuf {
        self.inner.packs.dir().join(format!("{id:08}.pack"))
    }

    /// The raw stored manifest value of `name`.
    #[doc(hidden)]
    pub fn debug_raw_manifest(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let raw = self.inner.manifests.get(name).map_err(self.db_err("debug: read manifest"))?;
        Ok(raw.map(|r| r.to_vec()))
    }

    /// Replaces the raw stored manifest value of `name`.
    #[doc(hidden)]
    pub fn debug_put_raw_manifest(&self, name: &str, value: &[u8]) -> Result<()> {
        self.inner.manifests.insert(name, value).map_err(self.db_err("debug: write manifest"))?;
        self.flush()
    }
}
