//! Copying RAM blocks into a snapshot being written, and back out of a committed one.
//!
//! Saving reads each block's `used_length` a chunk at a time and hands the chunks to the
//! store's writer from a few threads (the writer hashes, dedups and compresses). Eager
//! loading reads every chunk back into the block before the VM runs; lazy loading goes
//! through [`StorePageSource`] and the page server instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use storage::{BlockSpec, ChunkRef, SnapshotReader, SnapshotWriter, StoreError};
use thiserror::Error;

use crate::lazy::{ChunkCache, Fill, PageSource};
use crate::ram::{RamBlock, RamError};

/// Errors copying RAM.
#[derive(Debug, Error)]
pub enum RamIoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error("snapshot has no RAM block '{0}'")]
    NoBlock(String),
    #[error("a RAM copy thread panicked")]
    Panicked,
}

/// The store's description of `blocks`, for [`storage::Store::begin`].
pub fn block_specs(blocks: &[Arc<RamBlock>]) -> Vec<BlockSpec> {
    blocks
        .iter()
        .map(|b| BlockSpec {
            idstr: b.idstr().to_string(),
            used_length: b.used_length(),
            max_length: b.max_length(),
            page_size: b.page_size(),
            resizeable: b.resizeable(),
        })
        .collect()
}

/// Writes the chunks of `block` whose indexes `chunks` yields, from `threads` threads.
pub fn save_chunks(
    writer: &SnapshotWriter,
    block: &RamBlock,
    chunks: &[u64],
    threads: usize,
) -> Result<u64, RamIoError> {
    let cs = u64::from(writer.chunk_size());
    let used = block.used_length();
    let next = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<(), RamIoError> {
                    let mut buf = vec![0u8; cs as usize];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(&c) = chunks.get(i) else {
                            return Ok(());
                        };
                        let off = c * cs;
                        if off >= used {
                            continue;
                        }
                        let len = cs.min(used - off) as usize;
                        block.read(off, &mut buf[..len])?;
                        writer.put_chunk(block.idstr(), off, &buf[..len])?;
                        bytes.fetch_add(len as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| RamIoError::Panicked)??;
        }
        Ok::<(), RamIoError>(())
    })?;
    Ok(bytes.load(Ordering::Relaxed))
}

/// Writes every chunk of `block`.
pub fn save_block(writer: &SnapshotWriter, block: &RamBlock, threads: usize) -> Result<u64, RamIoError> {
    let n = block.used_length().div_ceil(u64::from(writer.chunk_size()));
    let all: Vec<u64> = (0..n).collect();
    save_chunks(writer, block, &all, threads)
}

/// Reads every chunk of the snapshot's copy of `block` into it (eager restore). The block must
/// already have the snapshot's used length.
///
/// All-zero chunks (not stored) are zeroed by dropping their pages: the destination block
/// need not be blank (a fw_cfg file of the destination's own is written into its block), and
/// on pages never touched the drop costs next to nothing.
pub fn load_block(reader: &SnapshotReader, block: &RamBlock) -> Result<u64, RamIoError> {
    let m = reader.manifest().block(block.idstr()).ok_or_else(|| RamIoError::NoBlock(block.idstr().to_string()))?;
    let cs = u64::from(reader.chunk_size());
    let used = block.used_length();
    let mut buf = vec![0u8; cs as usize];
    let mut bytes = 0;
    // Start of the run of all-zero chunks not yet discarded: one madvise per run.
    let mut zeros: Option<u64> = None;
    for (i, c) in m.chunks.iter().enumerate() {
        let off = i as u64 * cs;
        if matches!(c, ChunkRef::Zero) {
            zeros.get_or_insert(off);
            continue;
        }
        if let Some(start) = zeros.take() {
            block.discard(start, off - start)?;
        }
        let len = reader.read_chunk(block.idstr(), off, &mut buf)?;
        block.write(off, &buf[..len])?;
        bytes += len as u64;
    }
    if let Some(start) = zeros {
        let end = (m.chunks.len() as u64 * cs).min(used);
        block.discard(start, end.saturating_sub(start))?;
    }
    Ok(bytes)
}

/// Bytes lazy restores and shared bases in this process have read from the store (compressed,
/// as stored): the cost a fleet of clones puts on the store.
pub static LAZY_STORE_BYTES_READ: AtomicU64 = AtomicU64::new(0);

/// Serves lazy restores from a committed snapshot, through a cache of decompressed chunks
/// shared with other restores when given one.
pub struct StorePageSource {
    reader: SnapshotReader,
    cache: Option<Arc<ChunkCache>>,
}

impl StorePageSource {
    pub fn new(reader: SnapshotReader, cache: Option<Arc<ChunkCache>>) -> Self {
        StorePageSource { reader, cache }
    }
}

impl PageSource for StorePageSource {
    fn chunk_size(&self) -> u64 {
        u64::from(self.reader.chunk_size())
    }

    fn read_chunk(&self, idstr: &str, offset: u64, buf: &mut [u8]) -> Result<Fill, String> {
        let m = self.reader.manifest().block(idstr).ok_or_else(|| format!("snapshot has no RAM block '{idstr}'"))?;
        let index = (offset / self.chunk_size()) as usize;
        match m.chunks.get(index) {
            Some(ChunkRef::Zero) => Ok(Fill::Zero),
            Some(ChunkRef::Stored(hash)) => {
                if let Some(data) = self.cache.as_ref().and_then(|c| c.get_shared(&hash.0)) {
                    return Ok(Fill::Shared(data));
                }
                let n = self.reader.read_chunk(idstr, offset, buf).map_err(|e| e.to_string())?;
                LAZY_STORE_BYTES_READ.fetch_add(n as u64, Ordering::Relaxed);
                if let Some(cache) = &self.cache {
                    cache.insert(&hash.0, &buf[..n]);
                }
                Ok(Fill::Data { stored: n as u64 })
            }
            None => Err(format!("offset {offset:#x} is beyond the snapshot's copy of '{idstr}'")),
        }
    }
}
