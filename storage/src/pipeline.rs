//! The snapshot pipeline: chunks copied, hashed, compressed and stored on several threads at
//! once, in order.
//!
//! ```text
//!  each of n worker threads, in a loop:
//!    take a slot in the window; claim chunk i; read() it into the worker's own buffer;
//!    zero check; blake3; index lookup; zstd (if the index lacks the hash) straight into a
//!    recycled entry buffer, entry header and crc included;
//!    GC lock (shared) -> sequencer: i joins the chunks waiting; the worker drains every
//!        chunk whose turn has come (i, and those after it that others finished); new ones
//!        join the batch; a batch of 512 KiB (or 128 chunks, or the run's last chunk) is
//!        given its places, back to back (reservations: arithmetic under a short lock; a
//!        pack rotates between entries, never inside one)
//!    <- sequencer; pwritev the batch (one call per pack it landed in), index its entries
//!        (compare-and-swap),
//!        record the references (repeats of this run's chunks after the batch); every
//!        16 MiB placed, start the packs' writeback; free one window slot per chunk stored
//! ```
//!
//! Every worker stores chunks; there is no writer thread. The order of the packs is decided
//! in the sequencer, in job order, so a snapshot's new chunks sit in its packs in address
//! order (restores read them in that order) and the layout does not depend on thread timing;
//! the bytes are written outside it, by whichever worker drained them, in parallel with the
//! other worker's compression and writes.
//!
//! Why (December 2026, issue 13): the pipeline before this one had the calling thread store
//! every chunk. On 2 cores that made three busy threads for two cores, a hand-off per chunk,
//! and one thread doing all the kernel's page-cache work serially: 0.96 CPU-s per GiB of
//! incompressible memfill on that thread alone (`examples/pipeline_cost.rs`, thread CPU
//! time), more than the two workers' hashing (0.38 CPU-s each), so its wall time was bound
//! by the writer; for touch the writer took 0.54 CPU-s against 0.9 per worker. The per-thread
//! path (`put_chunk` from each thread, the benchmark's baseline) has no such thread and was
//! faster. Now each worker does what the per-thread path does (read, hash, compress, append,
//! index), and only the choice of places is serial.
//!
//! Memory stays bounded: at most `max(2 * workers + 2, 16 MiB / chunk size)` chunks are in
//! flight (claimed and not yet stored: the window). A worker takes a slot *before* it claims
//! the next chunk, so every claimed chunk has one and the chunk whose turn is next is always
//! being worked on; a slot is freed only when its chunk is stored. A worker reads into one
//! buffer of its own, which stays in its core's cache; what waits in the sequencer is the
//! compressed entry (and, for a chunk the index already held, a copy of its bytes: see
//! [`SnapshotWriter::record`]). Entry buffers are recycled by the worker that stored them.
//! An all-zero chunk is recognised by [`crate::chunk::is_zero`] and recorded as
//! [`crate::ChunkRef::Zero`] without being hashed. A chunk that occurs twice in one run is
//! placed once: the second is recorded as a duplicate of the first (whose write the commit
//! waits for, as it waits for every chunk).
//!
//! New entries are written in batches, not one `pwrite` each (December 2026, issue 13): the
//! entries lie back to back, so one write per entry (16 KiB on the `touch` guest) lands at
//! unaligned offsets and the kernel pays its per-write and per-folio page-cache work for
//! every one. `examples/pack_writes.rs` on this machine: 261 MiB in 16432-byte `pwrite`s
//! 0.17-0.18 CPU-s, in `pwritev`s of 512 KiB 0.06-0.08 CPU-s (and a shorter `fdatasync`).
//! A batch holds at most [`BATCH_CHUNKS`] chunks and never more than the window, so chunks
//! waiting in a batch cannot take every slot: when the next chunk in line is unclaimed, the
//! only slots held are the batch's, and one is free. A chunk that repeats one of this run's
//! new chunks is recorded only after the batch it came with is written and indexed (a GC
//! in between would otherwise find a reference to a chunk not yet in the index).
//!
//! Locks: the GC lock (shared) is taken before the sequencer and held until the drained
//! entries are written and indexed, so a GC never sees a place reserved and not yet
//! written, and never waits for compression. Never the other way round: a GC waiting for the
//! lock would otherwise block a worker that holds the sequencer.
//!
//! Every 16 MiB of new values placed, the worker that crosses the mark starts the kernel's
//! writeback of the packs (`sync_file_range`) after its writes, so the disk writes while the
//! workers compress and the commit's `fdatasync` finds most of the snapshot already on disk.
//! The call can block for tens of milliseconds on a busy disk; the other workers go on
//! meanwhile. (A thread of its own for it was tried with the old writer and measured worse:
//! the kernel throttled the appends instead.)
//!
//! Errors: the first one (a worker's read, work or store) sets the stop flag, which every
//! worker checks between chunks (also while it waits for a slot), and is returned; a
//! panicking worker sets it too. Places drained after an error are left unwritten (a gap,
//! like a punched hole). The snapshot is not committed by anyone after an error, and its
//! chunks are reclaimed by the next GC.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::chunk::Hash;
use crate::error::{Result, StoreError};
use crate::pack::ENTRY_HEADER;
use crate::writer::{Prepared, SnapshotWriter};

/// Bytes appended between two starts of pack writeback: the commit's final sync then has at
/// most about this much left to flush, and the disk writes while the workers compress.
const WRITEBACK_STEP: u64 = 16 << 20;

/// Chunks in flight (claimed, not yet stored), in bytes of chunks: at least `2 * workers + 2`
/// chunks whatever this says.
const IN_FLIGHT_BYTES: usize = 16 << 20;

/// New entries written together: a batch is placed and written once it holds this many
/// bytes (or [`BATCH_CHUNKS`] entries, or the run's last chunk). One `pwritev` of 512 KiB
/// cost the kernel a third of the CPU time of 16 KiB `pwrite`s at unaligned offsets, the
/// pattern one entry per write makes (`storage/examples/pack_writes.rs`).
const BATCH_BYTES: u64 = 512 << 10;

/// The most entries in one batch (at most the window, so a batch waiting to fill can never
/// hold every slot: see [`put_pipelined`]).
const BATCH_CHUNKS: usize = 128;

/// Entry buffers a worker keeps for its next chunks (the rest are freed). A worker gets back
/// every buffer of the batch it wrote (32 on the `touch` guest: 512 KiB of 16 KiB entries)
/// and needs one per chunk it compresses before its next batch, so it keeps two batches'
/// worth: at most 64 buffers of the compression bound (66 KiB for 64 KiB chunks), 4 MiB per
/// worker. With 8 (until December 2026) most buffers were freed and allocated again: on
/// `touch`, 1 GiB through `examples/pipeline_cost.rs` made glibc return its arenas' free
/// memory to the kernel 100 times (`madvise(MADV_DONTNEED)`, `strace -c`) and fault the
/// pages back in; with 64, 13 times, and 2500-6000 fewer page faults (10-24 MiB; `perf
/// stat`, three runs each). Under 1% of the pipeline's CPU time: too little to see in its
/// CPU column on this shared machine.
const SPARES: usize = 64;

/// How often a worker waiting for a slot in the window checks whether another has stopped.
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
    /// Storing chunks in order: reserving their place, pack writes, index inserts, recording
    /// references and starting writeback, summed over the workers that did it.
    pub write_ns: u64,
    /// CPU time of the workers (their thread CPU clocks, user and system), summed: what the
    /// stages above cost without the time the workers waited or were preempted.
    pub cpu_ns: u64,
}

/// Reads chunk `offset` of a block into the buffer (whose length is the chunk's); the error
/// says why it cannot.
pub type ReadChunk<'a> = dyn Fn(&str, u64, &mut [u8]) -> std::result::Result<(), String> + Sync + 'a;

/// A prepared chunk waiting for its turn, with a copy of its bytes if it was
/// [`Prepared::Known`] (see [`SnapshotWriter::record`]).
type Done = (Result<Prepared>, Vec<u8>);

/// The order of storing: chunks done out of order wait here until every chunk before them
/// is done.
struct Sequencer {
    pending: BTreeMap<usize, Done>,
    /// The next chunk to store, in job order.
    next: usize,
    /// Hashes of the new chunks given a place in this run: a second chunk with the same
    /// bytes is recorded as a duplicate, not written again.
    placed: HashSet<Hash>,
    /// New chunks whose turn has come, waiting to be placed and written together (job
    /// order), and their entries' bytes.
    batch: Vec<(usize, Hash, Vec<u8>)>,
    batch_bytes: u64,
    /// Chunks whose turn has come that repeat a new chunk of this run: recorded once the
    /// batch they came with is written and indexed (their copy may be in it), so that a GC
    /// never finds a reference whose chunk is not in the index yet.
    dups: Vec<(usize, Hash, Vec<u8>)>,
    /// Bytes placed so far, and where the next writeback starts.
    placed_bytes: u64,
    writeback_at: u64,
}

/// What the worker that drained it does with a chunk whose turn came (new chunks and their
/// repeats go into the [`Batch`] instead).
enum Turn {
    Zero,
    Known { hash: Hash, keep: Vec<u8> },
    Failed(StoreError),
}

/// A batch of new chunks given their places, to be written by the worker that placed them
/// (one `pwritev` per run), and the repeats to record after them.
struct Batch {
    runs: Vec<Run>,
    dups: Vec<(usize, Hash, Vec<u8>)>,
}

/// New chunks placed back to back from `offset` to `end` of pack `pack` (a batch is one run
/// unless its pack rotated, or another writer reserved, between two of its places).
struct Run {
    pack: u32,
    offset: u64,
    end: u64,
    entries: Vec<(usize, Hash, Vec<u8>)>,
}

/// Stores `jobs` with `workers` threads that each read, hash, compress and store chunks,
/// reading each chunk with `read(block, offset, buf)` (which fills `buf`, whose length is
/// the chunk's).
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
    let write_ns = AtomicU64::new(0);
    let cpu_ns = AtomicU64::new(0);
    let bytes_read = AtomicU64::new(0);
    let claimed = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<StoreError>> = Mutex::new(None);
    let fail = |e: StoreError| {
        stop.store(true, Ordering::Relaxed);
        first_error.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
    };
    let window = (2 * workers + 2).max(IN_FLIGHT_BYTES / cs.max(1)).min(jobs.len().max(1));
    // A batch is written once it holds this many chunks: no more than the window, so the
    // chunks a batch holds never take every slot (the next chunk in line can always be
    // claimed; the run's last chunk writes whatever batch is left).
    let batch_chunks = BATCH_CHUNKS.min(window);
    let (free_tx, free_rx) = channel::<()>();
    for _ in 0..window {
        // The receiver is alive here; a send cannot fail.
        let _ = free_tx.send(());
    }
    let free_rx = Mutex::new(free_rx);
    let start = writer.stats().bytes_stored;
    let seq = Mutex::new(Sequencer {
        pending: BTreeMap::new(),
        next: 0,
        placed: HashSet::new(),
        batch: Vec::new(),
        batch_bytes: 0,
        dups: Vec::new(),
        placed_bytes: start,
        writeback_at: start + WRITEBACK_STEP,
    });
    let name = writer.name().to_owned();
    let inner = &writer.store.inner;

    // Stores the chunks whose turn has come, the worker's own `done` first in line: called
    // by every worker after preparing a chunk. Returns the entry buffers it is done with.
    let store_turns = |index: usize, done: Done, spares: &mut Vec<Vec<u8>>| {
        let t = Instant::now();
        // Lock order: the GC lock (shared) before the sequencer, never the other way (a GC
        // waiting for the lock would otherwise stop a worker holding the sequencer).
        let gc = inner.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        let mut turns = Vec::new();
        let mut batch = None;
        let mut writeback = false;
        {
            let mut q = seq.lock().unwrap_or_else(PoisonError::into_inner);
            q.pending.insert(index, done);
            while let Some((prepared, keep)) = {
                let n = q.next;
                q.pending.remove(&n)
            } {
                let i = q.next;
                q.next += 1;
                let turn = match prepared {
                    Ok(Prepared::Zero) => Turn::Zero,
                    Ok(Prepared::Known { hash }) => Turn::Known { hash, keep },
                    Ok(Prepared::New { hash, entry }) if !q.placed.insert(hash) => {
                        q.dups.push((i, hash, entry));
                        continue;
                    }
                    Ok(Prepared::New { hash, entry }) => {
                        q.batch_bytes += entry.len() as u64;
                        q.batch.push((i, hash, entry));
                        continue;
                    }
                    Err(e) => Turn::Failed(e),
                };
                turns.push((i, turn));
            }
            // The batch is placed (entries back to back in job order) once it is large
            // enough or the run's last chunk joined it.
            let held = q.batch.len() + q.dups.len();
            let full = q.batch_bytes >= BATCH_BYTES || held >= batch_chunks;
            if held > 0 && (full || q.next == jobs.len()) {
                let entries = std::mem::take(&mut q.batch);
                let dups = std::mem::take(&mut q.dups);
                q.batch_bytes = 0;
                // Each entry reserved on its own (a pack rotates at its size limit between
                // entries, never inside a batch), consecutive places joined into runs.
                let mut runs: Vec<Run> = Vec::new();
                let mut failed = None;
                for (i, hash, entry) in entries {
                    let len = entry.len() as u64;
                    match inner.packs.reserve(len) {
                        Ok((pack, offset)) => {
                            q.placed_bytes += len - ENTRY_HEADER;
                            match runs.last_mut() {
                                Some(r) if r.pack == pack && r.end == offset => {
                                    r.end += len;
                                    r.entries.push((i, hash, entry));
                                }
                                _ => {
                                    runs.push(Run { pack, offset, end: offset + len, entries: vec![(i, hash, entry)] })
                                }
                            }
                        }
                        Err(source) => {
                            failed = Some((i, source));
                            break;
                        }
                    }
                }
                match failed {
                    None => batch = Some(Batch { runs, dups }),
                    Some((i, source)) => turns.push((
                        i,
                        Turn::Failed(StoreError::Io {
                            path: inner.packs.dir().to_path_buf(),
                            op: "append chunk",
                            source,
                        }),
                    )),
                }
            }
            if q.placed_bytes >= q.writeback_at {
                q.writeback_at = q.placed_bytes + WRITEBACK_STEP;
                writeback = true;
            }
        }
        // Outside the sequencer: the other workers place their chunks while these are
        // written. After a failure the places left are not written: a gap in a pack is what
        // a punched hole or a torn write leaves too (scans resynchronise on the next entry,
        // GC punches it).
        let mut result = Ok(());
        let mut stored = turns.len();
        if let Some(Batch { runs, dups }) = batch {
            stored += runs.iter().map(|r| r.entries.len()).sum::<usize>() + dups.len();
            for run in &runs {
                if result.is_err() {
                    break;
                }
                result = writer.store.ensure_space(run.end - run.offset).and_then(|()| {
                    let bufs: Vec<&[u8]> = run.entries.iter().map(|(_, _, e)| &e[..]).collect();
                    let locs = inner.packs.write_entries_at(run.pack, run.offset, &bufs).map_err(|source| {
                        StoreError::Io { path: inner.packs.dir().to_path_buf(), op: "append chunk", source }
                    })?;
                    for ((i, hash, _), loc) in run.entries.iter().zip(&locs) {
                        let (b, slot, _) = checked[*i];
                        writer.index_written(writer.block_at(b), slot, hash, loc)?;
                    }
                    Ok(())
                });
            }
            // A repeat's copy is in this batch or an earlier one: written and indexed now
            // (or the run fails).
            if result.is_ok() {
                for (i, hash, _) in &dups {
                    let (b, slot, _) = checked[*i];
                    writer.record_duplicate(writer.block_at(b), slot, hash);
                }
            }
            spares.extend(runs.into_iter().flat_map(|r| r.entries).chain(dups).map(|(_, _, e)| e));
        }
        let mut known = Vec::new();
        for (i, turn) in turns {
            let (b, slot, _) = checked[i];
            let block = writer.block_at(b);
            let r = match turn {
                // (`record` takes no lock for a zero chunk.)
                Turn::Zero => writer.record(block, slot, jobs[i].offset, Prepared::Zero, &[]).map(drop),
                Turn::Known { hash, keep } => {
                    known.push((i, hash, keep));
                    Ok(())
                }
                Turn::Failed(e) => Err(e),
            };
            if result.is_ok() {
                result = r;
            }
        }
        drop(gc);
        // Chunks the index held: `record` looks again under the GC lock of its own.
        for (i, hash, keep) in known {
            let (b, slot, _) = checked[i];
            let r = writer.record(writer.block_at(b), slot, jobs[i].offset, Prepared::Known { hash }, &keep);
            if let (Ok(()), Err(e)) = (&result, r) {
                result = Err(e);
            }
        }
        if writeback && result.is_ok() {
            writer.store.start_writeback();
        }
        write_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result.map(|()| stored)
    };

    std::thread::scope(|scope| {
        let mut pool = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (free_rx, free_tx, claimed, read_ns, work_ns, bytes_read, stop, checked, fail, name) =
                (&free_rx, free_tx.clone(), &claimed, &read_ns, &work_ns, &bytes_read, &stop, &checked, &fail, &name);
            let store_turns = &store_turns;
            let cpu_ns = &cpu_ns;
            pool.push(scope.spawn(move || {
                let _guard = StopOnPanic(stop);
                let _cpu = CpuTime(cpu_ns);
                // This worker's only chunk buffer: it stays in the core's cache.
                let mut buf = vec![0u8; cs];
                // Entry buffers this worker's stores are done with, for its next entries.
                let mut spares: Vec<Vec<u8>> = Vec::new();
                loop {
                    // A slot in the window first, then a chunk: every claimed chunk has one,
                    // so the chunk next in line is always being worked on.
                    // With a timeout: after a failure the others may all be waiting here for
                    // slots nobody will free; the stop flag ends the wait.
                    // Likewise once every chunk is claimed (the workers holding them store them).
                    loop {
                        match free_rx.lock().unwrap_or_else(PoisonError::into_inner).recv_timeout(STOP_POLL) {
                            Ok(()) => break,
                            Err(RecvTimeoutError::Timeout)
                                if !stop.load(Ordering::Relaxed) && claimed.load(Ordering::Relaxed) < jobs.len() =>
                            {
                                continue
                            }
                            Err(_) => return,
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let index = claimed.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(index) else {
                        // Nothing left to claim: the slot goes back, so a worker waiting for
                        // one wakes up and finds that out too.
                        let _ = free_tx.send(());
                        return;
                    };
                    let len = checked[index].2;
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
                    let mut spare = spares.pop().unwrap_or_default();
                    let prepared = writer.prepare(&job.block, job.offset, &buf[..len], &mut spare);
                    if spare.capacity() > 0 {
                        spares.push(spare);
                    }
                    // A chunk the index held goes with a copy of its bytes, compressed should
                    // a GC remove that entry before the chunk is recorded.
                    let keep =
                        if matches!(prepared, Ok(Prepared::Known { .. })) { buf[..len].to_vec() } else { Vec::new() };
                    work_ns.fetch_add(t_read.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    let stored = store_turns(index, (prepared, keep), &mut spares);
                    spares.truncate(SPARES);
                    match stored {
                        // Every chunk stored frees its slot in the window.
                        Ok(n) => (0..n).for_each(|_| {
                            let _ = free_tx.send(());
                        }),
                        Err(e) => {
                            fail(e);
                            return;
                        }
                    }
                }
            }));
        }
        drop(free_tx);
        let panicked = pool.into_iter().map(|w| w.join().is_err()).fold(false, |a, b| a | b);
        let (next, unwritten) = {
            let q = seq.lock().unwrap_or_else(PoisonError::into_inner);
            (q.next, q.batch.len() + q.dups.len())
        };
        // A panic, or a worker that ended early without an error of its own (or left new
        // chunks unwritten, which the run's last chunk must not).
        if panicked || next < jobs.len() || unwritten > 0 {
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
        write_ns: write_ns.into_inner(),
        cpu_ns: cpu_ns.into_inner(),
    })
}

/// Adds the CPU time of the thread holding it to the sum when dropped (the thread ends).
struct CpuTime<'a>(&'a AtomicU64);

impl Drop for CpuTime<'_> {
    fn drop(&mut self) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            self.0.fetch_add(ns, Ordering::Relaxed);
        }
    }
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
