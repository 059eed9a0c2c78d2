//! [`SnapshotReader`]: verified random-access reads of one committed snapshot. No locks: a
//! read is a sled lookup, a zstd decompression into the caller's buffer and a blake3 check.

use std::sync::Arc;

use std::cell::RefCell;

use crate::chunk::{self, ChunkError, ChunkRef, Hash};
use crate::error::{Result, StoreError};
use crate::manifest::{BlockManifest, Manifest};
use crate::pack::Location;
use crate::store::Store;

/// Largest stored value accepted from the index (a 16 MiB chunk that did not compress).
const MAX_VALUE: usize = (crate::manifest::MAX_CHUNK_SIZE as usize) + chunk::VALUE_HEADER;

thread_local! {
    /// Compressed bytes of the chunk being read; reused so reads do not allocate.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

enum Fetch {
    Missing,
    Db(sled::Error),
    Chunk(ChunkError),
}

/// Reads chunks of one snapshot; cheap to clone, usable from many threads.
#[derive(Clone)]
pub struct SnapshotReader {
    store: Store,
    manifest: Arc<Manifest>,
}

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader").field("name", &self.manifest.name).finish()
    }
}

impl SnapshotReader {
    pub(crate) fn new(store: Store, manifest: Arc<Manifest>) -> SnapshotReader {
        SnapshotReader { store, manifest }
    }

    /// The snapshot's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The snapshot's manifest, shared (no copy of its chunk tables).
    pub fn manifest_shared(&self) -> Arc<Manifest> {
        Arc::clone(&self.manifest)
    }

    /// Chunk size of this snapshot.
    pub fn chunk_size(&self) -> u32 {
        self.manifest.chunk_size
    }

    fn block(&self, idstr: &str) -> Result<&BlockManifest> {
        self.manifest
            .block(idstr)
            .ok_or_else(|| StoreError::NoSuchBlock { snapshot: self.manifest.name.clone(), block: idstr.to_owned() })
    }

    /// Reads the chunk of `block` at chunk-aligned `offset` into the front of `buf` and
    /// returns its length (short for the last chunk of a block). The content is checked
    /// against its hash; on error `buf` holds zeros, never wrong bytes.
    pub fn read_chunk(&self, block: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let b = self.block(block)?;
        let cs = u64::from(self.manifest.chunk_size);
        if !offset.is_multiple_of(cs) || offset >= b.used_length {
            return Err(StoreError::BadOffset {
                snapshot: self.manifest.name.clone(),
                block: block.to_owned(),
                offset,
                chunk_size: self.manifest.chunk_size,
                used_length: b.used_length,
            });
        }
        let len = (b.used_length - offset).min(cs) as usize;
        let chunk_err = |source| StoreError::Chunk {
            snapshot: self.manifest.name.clone(),
            block: block.to_owned(),
            offset,
            source: Box::new(source),
        };
        if buf.len() < len {
            return Err(chunk_err(chunk::ChunkError::Buffer { got: buf.len(), needed: len }));
        }
        match b.chunks[(offset / cs) as usize] {
            ChunkRef::Zero => buf[..len].fill(0),
            ChunkRef::Stored(hash) => {
                if let Err(e) = self.fetch(&hash, len, buf) {
                    buf[..len].fill(0);
                    return Err(match e {
                        Fetch::Missing => StoreError::ChunkMissing {
                            snapshot: self.manifest.name.clone(),
                            block: block.to_owned(),
                            offset,
                            hash: hash.to_hex(),
                        },
                        Fetch::Db(e) => self.store.db_err("read chunk index")(e),
                        Fetch::Chunk(e) => chunk_err(e),
                    });
                }
            }
        }
        Ok(len)
    }

    /// Looks `hash` up, reads its value from its pack and decodes it into `buf[..len]`.
    fn fetch(&self, hash: &Hash, len: usize, buf: &mut [u8]) -> Result<(), Fetch> {
        let inner = &self.store.inner;
        let raw = inner.index.get(hash.0).map_err(Fetch::Db)?.ok_or(Fetch::Missing)?;
        let loc = Location::decode(&raw).ok_or(Fetch::Chunk(ChunkError::BadIndex { hash: *hash, len: raw.len() }))?;
        if loc.len as usize > MAX_VALUE {
            return Err(Fetch::Chunk(ChunkError::BadIndex { hash: *hash, len: loc.len as usize }));
        }
        READ_BUF.with(|cell| {
            let mut value = cell.borrow_mut();
            inner.packs.read(hash, loc, &mut value).map_err(|source| {
                Fetch::Chunk(ChunkError::Read { hash: *hash, pack: loc.pack, offset: loc.offset, len: loc.len, source })
            })?;
            chunk::decode_into(hash, &value, len, buf).map_err(Fetch::Chunk)
        })
    }

    /// Reads `buf.len()` bytes of `block` starting at any `offset` (must lie within
    /// used_length). Whole aligned chunks decompress straight into `buf`; partial ones go
    /// through a scratch chunk.
    pub fn read_at(&self, block: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let b = self.block(block)?;
        let cs = u64::from(self.manifest.chunk_size);
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= b.used_length);
        if end.is_none() {
            return Err(StoreError::BadOffset {
                snapshot: self.manifest.name.clone(),
                block: block.to_owned(),
                offset,
                chunk_size: self.manifest.chunk_size,
                used_length: b.used_length,
            });
        }
        let mut scratch = Vec::new();
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let start = off - off % cs;
            let skip = (off - start) as usize;
            let chunk_len = (b.used_length - start).min(cs) as usize;
            let take = (chunk_len - skip).min(buf.len() - pos);
            if skip == 0 && take == chunk_len {
                self.read_chunk(block, start, &mut buf[pos..pos + take])?;
            } else {
                scratch.resize(cs as usize, 0);
                self.read_chunk(block, start, &mut scratch)?;
                buf[pos..pos + take].copy_from_slice(&scratch[skip..skip + take]);
            }
            pos += take;
        }
        Ok(())
    }
}
