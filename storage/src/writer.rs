//! [`SnapshotWriter`]: streams chunks into the store from any number of threads and commits
//! the manifest atomically.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::chunk::{self, ChunkRef, Hash};
use crate::error::{Result, StoreError};
use crate::manifest::{chunk_count, BlockManifest, Manifest};
use crate::name::validate_snapshot_name;
use crate::pack::ENTRY_HEADER;
use crate::store::Store;

/// A RAM block as declared when a snapshot begins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    pub idstr: String,
    pub used_length: u64,
    pub max_length: u64,
    pub page_size: u64,
    pub resizeable: bool,
}

/// Counters of one writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WriteStats {
    /// Bytes passed to `put_chunk`.
    pub bytes_in: u64,
    /// Chunks that were all zero (not stored).
    pub zero_chunks: u64,
    /// Chunks already present in the store (not stored again).
    pub dedup_chunks: u64,
    /// Chunks newly stored.
    pub new_chunks: u64,
    /// Bytes of newly stored chunk values (compressed, with header).
    pub bytes_stored: u64,
    /// Bytes hashed (the non-zero chunks passed to `put_chunk`).
    pub bytes_hashed: u64,
    /// Bytes compressed (the non-zero chunks the store did not hold yet).
    pub bytes_compressed_in: u64,
    /// Chunks taken by reference from a parent snapshot ([`SnapshotWriter::inherit`]).
    pub inherited_chunks: u64,
}

impl WriteStats {
    /// Chunks put so far (zero, deduplicated and new ones; not the inherited ones).
    pub fn chunks_put(&self) -> u64 {
        self.zero_chunks + self.dedup_chunks + self.new_chunks
    }
}

fn stats_of(s: &WriterShared) -> WriteStats {
    WriteStats {
        bytes_in: s.bytes_in.load(Ordering::Relaxed),
        zero_chunks: s.zero_chunks.load(Ordering::Relaxed),
        dedup_chunks: s.dedup_chunks.load(Ordering::Relaxed),
        new_chunks: s.new_chunks.load(Ordering::Relaxed),
        bytes_stored: s.bytes_stored.load(Ordering::Relaxed),
        bytes_hashed: s.bytes_hashed.load(Ordering::Relaxed),
        bytes_compressed_in: s.bytes_compressed_in.load(Ordering::Relaxed),
        inherited_chunks: s.inherited_chunks.load(Ordering::Relaxed),
    }
}

impl Store {
    /// The counters of the snapshot `name` being written now, if one is: for progress reports
    /// from outside the writing thread.
    pub fn writing_stats(&self, name: &str) -> Option<WriteStats> {
        let writers = self.inner.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers.values().filter_map(std::sync::Weak::upgrade).find(|w| w.name == name).map(|w| stats_of(&w))
    }
}

/// A chunk after [`SnapshotWriter::prepare`].
pub(crate) enum Prepared {
    /// All bytes zero: recorded as the zero marker.
    Zero,
    /// The index lacked `hash`: `entry` is its complete pack entry (header with crc, then
    /// the compressed value), ready to append.
    New { hash: Hash, entry: Vec<u8> },
    /// The index held `hash` when it was looked up.
    Known { hash: Hash },
}

pub(crate) struct WriterBlock {
    pub(crate) spec: BlockSpec,
    pub(crate) chunks: Mutex<Vec<Option<ChunkRef>>>,
}

pub(crate) struct WriterShared {
    pub(crate) name: String,
    pub(crate) chunk_size: u32,
    pub(crate) blocks: Vec<WriterBlock>,
    pub(crate) bytes_in: AtomicU64,
    zero_chunks: AtomicU64,
    dedup_chunks: AtomicU64,
    new_chunks: AtomicU64,
    bytes_stored: AtomicU64,
    bytes_hashed: AtomicU64,
    bytes_compressed_in: AtomicU64,
    pub(crate) inherited_chunks: AtomicU64,
}

impl WriterShared {
    /// Every stored hash this writer has recorded so far (GC marks them live).
    pub(crate) fn referenced(&self, out: &mut std::collections::HashSet<Hash>) {
        for b in &self.blocks {
            let chunks = b.chunks.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(chunks.iter().filter_map(|c| match c {
                Some(ChunkRef::Stored(h)) => Some(*h),
                _ => None,
            }));
        }
    }
}

/// Writes one snapshot. `put_chunk` takes `&self`: share the writer between threads.
/// Dropping it without [`SnapshotWriter::commit`] abandons the snapshot; its chunks are
/// reclaimed by the next [`Store::gc`].
pub struct SnapshotWriter {
    pub(crate) store: Store,
    pub(crate) shared: Arc<WriterShared>,
    id: u64,
}

impl std::fmt::Debug for SnapshotWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriter").field("name", &self.shared.name).finish()
    }
}

impl Store {
    /// Begins snapshot `name` with the given RAM blocks, using the store's chunk size.
    pub fn begin(&self, name: &str, blocks: Vec<BlockSpec>) -> Result<SnapshotWriter> {
        validate_snapshot_name(name)?;
        self.writable()?;
        if self.inner.manifests.contains_key(name).map_err(self.db_err("look up manifest"))? {
            return Err(StoreError::Exists(name.to_owned()));
        }
        let chunk_size = self.inner.opts.chunk_size;
        let mut wblocks: Vec<WriterBlock> = Vec::with_capacity(blocks.len());
        for spec in blocks {
            if wblocks.iter().any(|b| b.spec.idstr == spec.idstr) {
                return Err(StoreError::DuplicateBlock { snapshot: name.to_owned(), block: spec.idstr });
            }
            let n = usize::try_from(chunk_count(spec.used_length, chunk_size))
                .map_err(|_| StoreError::Option(format!("block '{}' used_length is too large", spec.idstr)))?;
            wblocks.push(WriterBlock { spec, chunks: Mutex::new(vec![None; n]) });
        }
        let shared = Arc::new(WriterShared {
            name: name.to_owned(),
            chunk_size,
            blocks: wblocks,
            bytes_in: AtomicU64::new(0),
            zero_chunks: AtomicU64::new(0),
            dedup_chunks: AtomicU64::new(0),
            new_chunks: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            bytes_hashed: AtomicU64::new(0),
            bytes_compressed_in: AtomicU64::new(0),
            inherited_chunks: AtomicU64::new(0),
        });
        let id = self.register_writer(name, &shared)?;
        tracing::debug!(snapshot = name, "snapshot begun");
        Ok(SnapshotWriter { store: self.clone(), shared, id })
    }
}

impl SnapshotWriter {
    /// Name of the snapshot being written.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Chunk size of this snapshot.
    pub fn chunk_size(&self) -> u32 {
        self.shared.chunk_size
    }

    /// Counters so far.
    pub fn stats(&self) -> WriteStats {
        stats_of(&self.shared)
    }

    fn block(&self, idstr: &str) -> Result<&WriterBlock> {
        self.shared
            .blocks
            .iter()
            .find(|b| b.spec.idstr == idstr)
            .ok_or_else(|| StoreError::NoSuchBlock { snapshot: self.shared.name.clone(), block: idstr.to_owned() })
    }

    /// Stores the chunk of `block` starting at `offset` (a multiple of the chunk size). `data`
    /// is a whole chunk, or the rest of the block for the last one. Writing the same offset
    /// again replaces the earlier content.
    pub fn put_chunk(&self, block: &str, offset: u64, data: &[u8]) -> Result<()> {
        let (b, slot) = self.check_chunk(block, offset, data.len())?;
        let prepared = self.prepare(block, offset, data, &mut Vec::new())?;
        self.record(b, slot, offset, prepared, data).map(drop)
    }

    /// Index of `block` among this writer's blocks, for [`SnapshotWriter::put_pipelined`].
    pub(crate) fn block_index(&self, idstr: &str) -> Result<usize> {
        self.shared
            .blocks
            .iter()
            .position(|b| b.spec.idstr == idstr)
            .ok_or_else(|| StoreError::NoSuchBlock { snapshot: self.shared.name.clone(), block: idstr.to_owned() })
    }

    pub(crate) fn block_at(&self, index: usize) -> &WriterBlock {
        &self.shared.blocks[index]
    }

    /// Checks that `len` bytes at `offset` are exactly one chunk of `block`; returns the block
    /// and the chunk's slot.
    pub(crate) fn check_chunk(&self, block: &str, offset: u64, len: usize) -> Result<(&WriterBlock, usize)> {
        let b = self.block(block)?;
        let cs = u64::from(self.shared.chunk_size);
        let used = b.spec.used_length;
        if !offset.is_multiple_of(cs) || offset >= used {
            return Err(StoreError::BadOffset {
                snapshot: self.shared.name.clone(),
                block: block.to_owned(),
                offset,
                chunk_size: self.shared.chunk_size,
                used_length: used,
            });
        }
        let expected = (used - offset).min(cs) as usize;
        if len != expected {
            return Err(StoreError::BadLength {
                snapshot: self.shared.name.clone(),
                block: block.to_owned(),
                offset,
                got: len,
                expected,
            });
        }
        Ok((b, (offset / cs) as usize))
    }

    /// The CPU work on one chunk, safe to run on any thread: the zero check (an all-zero
    /// chunk is never hashed), the hash, and compression unless the index already holds it.
    /// A new chunk's entry is built in `spare` (taken; pass an empty or a recycled buffer).
    pub(crate) fn prepare(&self, block: &str, offset: u64, data: &[u8], spare: &mut Vec<u8>) -> Result<Prepared> {
        let s = &self.shared;
        s.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        if chunk::is_zero(data) {
            return Ok(Prepared::Zero);
        }
        s.bytes_hashed.fetch_add(data.len() as u64, Ordering::Relaxed);
        let hash = Hash::of(data);
        let inner = &self.store.inner;
        if inner.index.contains_key(hash.0).map_err(self.store.db_err("look up chunk"))? {
            return Ok(Prepared::Known { hash });
        }
        // Compressed (and its entry sealed) before the GC lock is taken, so GC never waits
        // for compression, and on the calling thread, so the pipeline's writer only appends.
        let mut entry = std::mem::take(spare);
        self.encode_entry(&hash, block, offset, data, &mut entry)?;
        Ok(Prepared::New { hash, entry })
    }

    /// The complete pack entry of chunk `hash` (`data`) into `entry`: header, then the
    /// compressed value.
    fn encode_entry(&self, hash: &Hash, block: &str, offset: u64, data: &[u8], entry: &mut Vec<u8>) -> Result<()> {
        let s = &self.shared;
        s.bytes_compressed_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        let opts = &self.store.inner.opts;
        let codec = if opts.lz4 { chunk::Codec::Lz4 } else { chunk::Codec::Zstd(opts.zstd_level) };
        chunk::encode_into(data, codec, ENTRY_HEADER as usize, entry).map_err(|source| StoreError::Chunk {
            snapshot: s.name.clone(),
            block: block.to_owned(),
            offset,
            source: Box::new(source),
        })?;
        crate::pack::seal_entry(hash, entry).map_err(|source| StoreError::Io {
            path: self.store.inner.packs.dir().to_path_buf(),
            op: "seal chunk entry",
            source,
        })
    }

    /// Stores a prepared chunk (if the index still lacks it) and records the reference in
    /// `slot` of block `b`. `data` is the chunk again, read only for a [`Prepared::Known`]
    /// chunk whose index entry a GC removed since `prepare` (it is compressed anew then, and
    /// must hash to the same value, or this is an error). Returns the buffer of the entry, if
    /// one was built, for the next [`SnapshotWriter::prepare`].
    pub(crate) fn record(
        &self,
        b: &WriterBlock,
        slot: usize,
        offset: u64,
        prepared: Prepared,
        data: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        let s = &self.shared;
        let (hash, mut entry) = match prepared {
            Prepared::Zero => {
                s.zero_chunks.fetch_add(1, Ordering::Relaxed);
                b.chunks.lock().unwrap_or_else(|p| p.into_inner())[slot] = Some(ChunkRef::Zero);
                return Ok(None);
            }
            Prepared::New { hash, entry } => (hash, Some(entry)),
            Prepared::Known { hash } => (hash, None),
        };
        let inner = &self.store.inner;
        let _gc = inner.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        if inner.index.contains_key(hash.0).map_err(self.store.db_err("look up chunk"))? {
            s.dedup_chunks.fetch_add(1, Ordering::Relaxed);
        } else {
            let entry = match &mut entry {
                Some(e) => e,
                None => {
                    // Removed by a GC since `prepare`: compressed anew from `data`, which
                    // must be the chunk that was hashed.
                    if Hash::of(data) != hash {
                        return Err(StoreError::ChunkChanged {
                            snapshot: s.name.clone(),
                            block: b.spec.idstr.clone(),
                            offset,
                        });
                    }
                    let mut e = Vec::new();
                    self.encode_entry(&hash, &b.spec.idstr, offset, data, &mut e)?;
                    entry.insert(e)
                }
            };
            let stored = entry.len() as u64 - ENTRY_HEADER;
            self.store.ensure_space(stored)?;
            if self.store.store_new_entry(&hash, entry)? {
                s.bytes_stored.fetch_add(stored, Ordering::Relaxed);
                s.new_chunks.fetch_add(1, Ordering::Relaxed);
            } else {
                s.dedup_chunks.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Recorded while the GC lock is held: a GC either ran before the lookup above or
        // marks this reference live.
        b.chunks.lock().unwrap_or_else(|p| p.into_inner())[slot] = Some(ChunkRef::Stored(hash));
        Ok(entry)
    }

    /// Indexes new chunk `hash`, whose entry is written at `loc` (unless another writer
    /// indexed the hash meanwhile: the first copy wins, see [`Store::store_new_entry`]), and
    /// records the reference in `slot` of block `b`. The caller holds the GC lock shared,
    /// since before the entry's place was reserved.
    pub(crate) fn index_written(
        &self,
        b: &WriterBlock,
        slot: usize,
        hash: &Hash,
        loc: &crate::pack::Location,
    ) -> Result<()> {
        let s = &self.shared;
        if self.store.index_first(hash, loc)? {
            s.bytes_stored.fetch_add(u64::from(loc.len), Ordering::Relaxed);
            s.new_chunks.fetch_add(1, Ordering::Relaxed);
        } else {
            s.dedup_chunks.fetch_add(1, Ordering::Relaxed);
        }
        b.chunks.lock().unwrap_or_else(|p| p.into_inner())[slot] = Some(ChunkRef::Stored(*hash));
        Ok(())
    }

    /// Records chunk `hash`, which this writer is storing under another slot, in `slot` of
    /// block `b` (counted as deduplicated). The caller holds the GC lock shared, and the copy
    /// it refers to is written before the snapshot can commit (or the snapshot fails).
    pub(crate) fn record_duplicate(&self, b: &WriterBlock, slot: usize, hash: &Hash) {
        self.shared.dedup_chunks.fetch_add(1, Ordering::Relaxed);
        b.chunks.lock().unwrap_or_else(|p| p.into_inner())[slot] = Some(ChunkRef::Stored(*hash));
    }

    /// Convenience: stores `data` at chunk-aligned `offset` of `block`, cut into chunks.
    /// `data` must end on a chunk boundary or at the end of the block.
    pub fn put(&self, block: &str, offset: u64, data: &[u8]) -> Result<()> {
        let used = self.block(block)?.spec.used_length;
        let cs = u64::from(self.shared.chunk_size);
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let want = cs.min(used.saturating_sub(off)).max(1) as usize;
            let end = (pos + want).min(data.len());
            self.put_chunk(block, off, &data[pos..end])?;
            pos = end;
        }
        Ok(())
    }

    /// Makes the snapshot visible: checks every chunk was written, flushes all chunks, then
    /// inserts the manifest (absent-only) and flushes again. Returns the committed manifest.
    pub fn commit(self, state: Vec<u8>) -> Result<Manifest> {
        let s = &self.shared;
        let mut blocks = Vec::with_capacity(s.blocks.len());
        for b in &s.blocks {
            let table = b.chunks.lock().unwrap_or_else(|p| p.into_inner());
            let mut chunks = Vec::with_capacity(table.len());
            for (i, c) in table.iter().enumerate() {
                chunks.push(c.ok_or_else(|| StoreError::MissingChunk {
                    snapshot: s.name.clone(),
                    block: b.spec.idstr.clone(),
                    offset: i as u64 * u64::from(s.chunk_size),
                })?);
            }
            blocks.push(BlockManifest {
                idstr: b.spec.idstr.clone(),
                used_length: b.spec.used_length,
                max_length: b.spec.max_length,
                page_size: b.spec.page_size,
                resizeable: b.spec.resizeable,
                chunks,
            });
        }
        let created_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let manifest = Manifest { name: s.name.clone(), chunk_size: s.chunk_size, created_unix_ms, state, blocks };
        manifest.validate().map_err(|source| StoreError::Manifest { snapshot: s.name.clone(), source })?;
        let value = manifest.encode().map_err(|source| StoreError::Manifest { snapshot: s.name.clone(), source })?;
        self.store.ensure_space(value.len() as u64)?;
        // 1. chunk values, then their index entries, durable before the manifest.
        self.store.sync_packs()?;
        self.store.flush()?;
        // 2. the manifest file (fsynced, exclusive create), then the manifest in sled, inserted
        //    only if absent: one atomic sled operation makes the snapshot visible. Under the
        //    shared GC lock: a GC either sees the manifest or runs while this writer (and its
        //    references) is still registered.
        let inner = &self.store.inner;
        let files = crate::mfiles::dir_of(&inner.path);
        crate::mfiles::write(&files, &s.name, &value)?;
        let prev = {
            let _gc = inner.gc_lock.read().unwrap_or_else(|p| p.into_inner());
            inner.manifests.compare_and_swap(s.name.as_bytes(), None::<&[u8]>, Some(value))
        };
        let prev = match prev {
            Ok(p) => p,
            Err(e) => {
                let _ = crate::mfiles::remove(&files, &s.name);
                return Err(self.store.db_err("insert manifest")(e));
            }
        };
        if prev.is_err() {
            let _ = crate::mfiles::remove(&files, &s.name);
            return Err(StoreError::Exists(s.name.clone()));
        }
        // 3. manifest durable before commit returns.
        self.store.flush()?;
        tracing::info!(snapshot = %s.name, stats = ?self.stats(), "snapshot committed");
        Ok(manifest)
    }
}

impl Store {
    /// [`Store::store_new_entry`] for a bare chunk value (its entry built here).
    #[cfg(test)]
    pub(crate) fn store_new_chunk(&self, hash: &Hash, value: &[u8]) -> Result<bool> {
        let mut entry = vec![0u8; ENTRY_HEADER as usize];
        entry.extend_from_slice(value);
        crate::pack::seal_entry(hash, &mut entry).map_err(|source| StoreError::Io {
            path: self.inner.packs.dir().to_path_buf(),
            op: "seal chunk entry",
            source,
        })?;
        self.store_new_entry(hash, &entry)
    }

    /// Appends a new chunk's complete pack entry (see [`crate::pack::seal_entry`]) and
    /// indexes it, unless another writer indexed the same hash meanwhile: the first index
    /// entry wins (compare-and-swap) and is never replaced, so a commit that deduplicated
    /// against it keeps pointing at bytes that its own sync covered. Returns whether this
    /// call's bytes became the indexed copy (the loser's bytes are dead and reclaimed by GC).
    /// Caller holds the GC lock shared.
    pub(crate) fn store_new_entry(&self, hash: &Hash, entry: &[u8]) -> Result<bool> {
        let inner = &self.inner;
        let loc = inner.packs.append_entry(entry).map_err(|source| StoreError::Io {
            path: inner.packs.dir().to_path_buf(),
            op: "append chunk",
            source,
        })?;
        self.index_first(hash, &loc)
    }

    /// Indexes chunk `hash` at `loc` unless it is indexed already (the first copy wins and is
    /// never replaced); whether this call's copy became the indexed one.
    pub(crate) fn index_first(&self, hash: &Hash, loc: &crate::pack::Location) -> Result<bool> {
        Ok(self
            .inner
            .index
            .compare_and_swap(hash.0, None::<&[u8]>, Some(&loc.encode()[..]))
            .map_err(self.db_err("index chunk"))?
            .is_ok())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        self.store.unregister_writer(self.id);
    }
}

#[cfg(test)]
mod tests {
    use crate::chunk::{self, Hash};
    use crate::store::Store;

    /// Two writers that both found a new chunk missing both append it; the first index entry
    /// must stay, so a commit that deduplicated against it never ends up pointing at the
    /// second copy, whose bytes its own pack sync may not have covered.
    #[test]
    fn the_first_indexed_copy_of_a_chunk_is_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let data = vec![0x42u8; 65536];
        let hash = Hash::of(&data);
        let value = chunk::encode(&data, 3).expect("encode");
        assert!(store.store_new_chunk(&hash, &value).expect("first"));
        let first = store.debug_chunk_location(&hash).expect("location").expect("indexed");
        assert!(!store.store_new_chunk(&hash, &value).expect("second"), "the second copy must lose");
        let after = store.debug_chunk_location(&hash).expect("location").expect("indexed");
        assert_eq!(after, first, "the index entry moved to the second copy");
    }
}
