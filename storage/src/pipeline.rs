//! The snapshot pipeline: chunks copied, hashed and compressed on several threads at once,
//! and stored in order.
//!
//! ```text
//!  reader thread          worker threads (n)                 the calling thread
//!  chunk i: read()  --->  zero check; blake3; index lookup;  --->  reorder by i; append to
//!  into a free buffer     zstd if the index lacks the hash         the pack, index, record;
//!       ^                                                          buffer back to the pool
//!       '-------------------------- free buffers ----------------------'
//! ```
//!
//! Memory stays bounded: there are `2 * workers + 2` chunk buffers, the reader blocks until
//! one is free, and the writer hands a buffer back only after it has stored that chunk, so at
//! most that many chunks (and their compressed values) are in flight, however uneven the
//! workers are. The writer stores chunks in the order they were given, so a snapshot's new
//! chunks sit in its packs in address order (restores read them in that order) and the
//! pack layout does not depend on thread timing. An all-zero chunk is recognised by
//! [`crate::chunk::is_zero`] and recorded as [`crate::ChunkRef::Zero`] without being hashed.
//!
//! Every 16 MiB of new values the writer starts the kernel's writeback of the packs without
//! waiting for it, so the disk writes while the workers compress and the commit's `fdatasync`
//! finds most of the snapshot already on disk.
//!
//! Errors: the first one (the reader's, a worker's or the writer's) stops all three stages
//! (dropping a channel end ends its peers' loops) and is returned; the snapshot is not
//! committed by anyone after an error, and its chunks are reclaimed by the next GC.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::writer::{Prepared, SnapshotWriter};

/// Bytes appended between two starts of pack writeback: the commit's final sync then has at
/// most about this much left to flush, and the disk writes while the workers compress.
const WRITEBACK_STEP: u64 = 16 << 20;

/// One chunk to store: a block and a chunk-aligned offset in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkJob {
    pub block: String,
    pub offset: u64,
}

/// Where each stage spent its time, summed over its threads (nanoseconds), and what it moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PipelineStats {
    pub chunks: u64,
    pub bytes_read: u64,
    /// Reading chunks out of the source (guest memory) into buffers.
    pub read_ns: u64,
    /// Zero check, hash, index lookup and compression.
    pub work_ns: u64,
    /// Pack appends, index inserts and recording references.
    pub write_ns: u64,
}

/// Reads chunk `offset` of a block into the buffer (whose length is the chunk's); the error
/// says why it cannot.
pub type ReadChunk<'a> = dyn Fn(&str, u64, &mut [u8]) -> std::result::Result<(), String> + Sync + 'a;

/// Stores `jobs` with `workers` hashing/compressing threads, reading each chunk with
/// `read(block, offset, buf)` (which fills `buf`, whose length is the chunk's).
pub fn put_pipelined(
    writer: &SnapshotWriter,
    jobs: &[ChunkJob],
    workers: usize,
    read: &ReadChunk<'_>,
) -> Result<PipelineStats> {
    let workers = workers.max(1);
    let cs = writer.chunk_size() as usize;
    // Every job checked up front: the stages below only see valid chunks.
    let mut checked = Vec::with_capacity(jobs.len());
    for j in jobs {
        let b = writer.block_index(&j.block)?;
        let used = writer.block_at(b).spec.used_length;
        let len = (used.saturating_sub(j.offset)).min(cs as u64) as usize;
        let (_, slot) = writer.check_chunk(&j.block, j.offset, len)?;
        checked.push((b, slot, len));
    }
    let read_ns = AtomicU64::new(0);
    let work_ns = AtomicU64::new(0);
    let bytes_read = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<StoreError>> = Mutex::new(None);
    let fail = |e: StoreError| {
        stop.store(true, Ordering::Relaxed);
        first_error.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
    };
    let buffers = 2 * workers + 2;
    let (free_tx, free_rx) = channel::<Vec<u8>>();
    for _ in 0..buffers {
        // The receiver is alive here; a send cannot fail.
        let _ = free_tx.send(vec![0u8; cs]);
    }
    let (work_tx, work_rx) = sync_channel::<(usize, Vec<u8>)>(buffers);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = channel::<(usize, Vec<u8>, Result<Prepared>)>();
    let mut write_ns = 0u64;
    let name = writer.name().to_owned();

    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let free_rx: Receiver<Vec<u8>> = free_rx;
            let work_tx = work_tx;
            for (seq, job) in jobs.iter().enumerate() {
                let Ok(mut buf) = free_rx.recv() else { return };
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let len = checked[seq].2;
                let t = Instant::now();
                let res = read(&job.block, job.offset, &mut buf[..len]);
                read_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                if let Err(reason) = res {
                    fail(StoreError::Source {
                        snapshot: name.clone(),
                        block: job.block.clone(),
                        offset: job.offset,
                        reason,
                    });
                    return;
                }
                bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                if work_tx.send((seq, buf)).is_err() {
                    return;
                }
            }
        });
        let mut pool = Vec::with_capacity(workers);
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let (work_rx, work_ns, stop, checked) = (&work_rx, &work_ns, &stop, &checked);
            pool.push(scope.spawn(move || loop {
                let next = work_rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                let Ok((seq, buf)) = next else { return };
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let t = Instant::now();
                let job = &jobs[seq];
                let prepared = writer.prepare(&job.block, job.offset, &buf[..checked[seq].2]);
                work_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                if done_tx.send((seq, buf, prepared)).is_err() {
                    return;
                }
            }));
        }
        drop(done_tx);

        // The writer, on this thread: chunks in job order.
        let mut pending: BTreeMap<usize, (Vec<u8>, Result<Prepared>)> = BTreeMap::new();
        let mut next = 0usize;
        let mut written_back = writer.stats().bytes_stored;
        while next < jobs.len() && !stop.load(Ordering::Relaxed) {
            let Ok((seq, buf, prepared)) = done_rx.recv() else { break };
            pending.insert(seq, (buf, prepared));
            while let Some((buf, prepared)) = pending.remove(&next) {
                let t = Instant::now();
                let (b, slot, len) = checked[next];
                let res =
                    prepared.and_then(|p| writer.record(writer.block_at(b), slot, jobs[next].offset, p, &buf[..len]));
                write_ns += t.elapsed().as_nanos() as u64;
                if let Err(e) = res {
                    fail(e);
                    break;
                }
                let _ = free_tx.send(buf);
                next += 1;
                let stored = writer.stats().bytes_stored;
                if stored >= written_back + WRITEBACK_STEP {
                    written_back = stored;
                    let t = Instant::now();
                    writer.store.start_writeback();
                    write_ns += t.elapsed().as_nanos() as u64;
                }
            }
        }
        // Ends the reader (no more free buffers) and, through it, the workers.
        drop(free_tx);
        drop(done_rx);
        let panicked = reader.join().is_err() | pool.into_iter().map(|w| w.join().is_err()).fold(false, |a, b| a | b);
        // A panic, or a stage that ended early without an error of its own.
        if panicked || next < jobs.len() {
            fail(StoreError::Pipeline { snapshot: name.clone() });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(e);
    }
    Ok(PipelineStats {
        chunks: jobs.len() as u64,
        bytes_read: bytes_read.into_inner(),
        read_ns: read_ns.into_inner(),
        work_ns: work_ns.into_inner(),
        write_ns,
    })
}
