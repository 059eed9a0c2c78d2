//! The snapshot pipeline: chunks copied, hashed and compressed on several threads at once,
//! and stored in order.
//!
//! ```text
//!  worker threads (n)                                      the calling thread
//!  take a free buffer; claim chunk i; read() into it;  --->  reorder by i; append to the
//!  zero check; blake3; index lookup; zstd if the             pack, index, record; buffer
//!  index lacks the hash                                      back to the pool
//!       ^                                                    |   every 16 MiB: start the
//!       '------------------- free buffers -------------------'   packs' writeback
//! ```
//!
//! Each worker reads its own chunk: there is no reader thread, so a chunk is copied out of
//! guest memory by the core that hashes and compresses it, while it is in that core's cache,
//! and no hand-off sits between the copy and the work. (Until December 2026 a reader thread
//! copied every chunk and passed it on: on 2 cores its hand-offs and the writer's stalls
//! made the pipeline slower than the serial path it replaced; see the crate docs.)
//!
//! Memory stays bounded: there are `max(2 * workers + 2, 8 MiB / chunk size)` chunk buffers;
//! a worker takes a free buffer *before* it claims the next chunk, so every claimed chunk has
//! one and the chunk the writer waits for is always being worked on, and the writer hands a
//! buffer back only after it has stored that chunk; at most that many chunks (and their
//! compressed values) are in flight, however uneven the workers are. The pool is deep enough
//! to ride out a writer stall (a sled flush, a pack append the kernel throttles) without
//! idling the workers. The writer stores chunks in the order they were given, so a
//! snapshot's new chunks sit in its packs in address order (restores read them in that
//! order) and the pack layout does not depend on thread timing. An all-zero chunk is
//! recognised by [`crate::chunk::is_zero`] and recorded as [`crate::ChunkRef::Zero`] without
//! being hashed.
//!
//! Every 16 MiB of new values the writer starts the kernel's writeback of the packs
//! (`sync_file_range`), so the disk writes while the workers compress and the commit's
//! `fdatasync` finds most of the snapshot already on disk. It does so on its own thread and
//! waits for the call (which can block for tens of milliseconds on a busy disk), while the
//! buffer pool keeps the workers going: tried on a thread of its own that the writer only
//! kicked, the writer ran ahead of the disk, the kernel throttled its pack appends instead
//! (dirty-page balancing) and the write stage of incompressible memfill took 4x as long
//! (`bench snapshot`, two runs each, alternated with the previous build).
//!
//! Errors: the first one (a worker's read or work, or the writer's) sets the stop flag, which
//! every stage checks between chunks, and is returned; a panicking worker sets it too. The
//! snapshot is not committed by anyone after an error, and its chunks are reclaimed by the
//! next GC.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::writer::{Prepared, SnapshotWriter};

/// Bytes appended between two starts of pack writeback: the commit's final sync then has at
/// most about this much left to flush, and the disk writes while the workers compress.
const WRITEBACK_STEP: u64 = 16 << 20;

/// Bytes of chunk buffers in flight (at least `2 * workers + 2` buffers whatever this says).
const IN_FLIGHT_BYTES: usize = 8 << 20;

/// How often the writer, waiting for the next chunk, checks whether a stage has stopped.
const STOP_POLL: Duration = Duration::from_millis(20);

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
    /// Reading chunks out of the source (guest memory) into buffers, summed over the workers.
    pub read_ns: u64,
    /// Zero check, hash, index lookup and compression.
    pub work_ns: u64,
    /// Pack appends, index inserts and recording references.
    pub write_ns: u64,
}

/// Reads chunk `offset` of a block into the buffer (whose length is the chunk's); the error
/// says why it cannot.
pub type ReadChunk<'a> = dyn Fn(&str, u64, &mut [u8]) -> std::result::Result<(), String> + Sync + 'a;

/// Stores `jobs` with `workers` threads that read, hash and compress, reading each chunk with
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
    let claimed = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<StoreError>> = Mutex::new(None);
    let fail = |e: StoreError| {
        stop.store(true, Ordering::Relaxed);
        first_error.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
    };
    let buffers = (2 * workers + 2).max(IN_FLIGHT_BYTES / cs.max(1)).min(jobs.len().max(1));
    let (free_tx, free_rx) = channel::<Vec<u8>>();
    for _ in 0..buffers {
        // The receiver is alive here; a send cannot fail.
        let _ = free_tx.send(vec![0u8; cs]);
    }
    let free_rx = Mutex::new(free_rx);
    let (done_tx, done_rx) = channel::<(usize, Vec<u8>, Result<Prepared>)>();
    let mut write_ns = 0u64;
    let name = writer.name().to_owned();

    std::thread::scope(|scope| {
        let mut pool = Vec::with_capacity(workers);
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let (free_rx, claimed, read_ns, work_ns, bytes_read, stop, checked, fail, name) =
                (&free_rx, &claimed, &read_ns, &work_ns, &bytes_read, &stop, &checked, &fail, &name);
            pool.push(scope.spawn(move || {
                let _guard = StopOnPanic(stop);
                loop {
                    // A buffer first, then a chunk: every claimed chunk has a buffer.
                    let next = free_rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok(mut buf) = next else { return };
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let seq = claimed.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(seq) else { return };
                    let len = checked[seq].2;
                    let t = Instant::now();
                    let res = read(&job.block, job.offset, &mut buf[..len]);
                    let t_read = Instant::now();
                    read_ns.fetch_add(t_read.saturating_duration_since(t).as_nanos() as u64, Ordering::Relaxed);
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
                    let prepared = writer.prepare(&job.block, job.offset, &buf[..len]);
                    work_ns.fetch_add(t_read.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    if done_tx.send((seq, buf, prepared)).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(done_tx);

        // The writer, on this thread: chunks in job order.
        let mut pending: BTreeMap<usize, (Vec<u8>, Result<Prepared>)> = BTreeMap::new();
        let mut next = 0usize;
        let mut written_back = writer.stats().bytes_stored;
        while next < jobs.len() && !stop.load(Ordering::Relaxed) {
            // With a timeout: a worker that failed or panicked never sends its chunk, and
            // the others may all be waiting for buffers; the stop flag ends the wait.
            let (seq, buf, prepared) = match done_rx.recv_timeout(STOP_POLL) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
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
        // Ends the workers (no more free buffers, nobody to send to).
        drop(free_tx);
        drop(done_rx);
        let panicked = pool.into_iter().map(|w| w.join().is_err()).fold(false, |a, b| a | b);
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

/// Sets the stop flag if the worker holding it panics, so the writer stops waiting for the
/// chunk that worker had claimed.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}
