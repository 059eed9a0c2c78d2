//! The snapshot store: content-addressed, compressed (zstd, or LZ4) chunks, indexed in sled.
//!
//! A snapshot is a [`Manifest`] (opaque caller state plus the RAM-block table) and the
//! contents of each RAM block cut into fixed-size chunks. A chunk is stored once under the
//! blake3 hash of its bytes, whatever snapshot or VM wrote it; all-zero chunks are recorded in
//! the manifest and not stored. [`Store`] is a cheap-to-clone handle (an `Arc`) for many
//! threads and VMs; [`SnapshotWriter`] takes chunks from several threads at once;
//! [`SnapshotReader`] serves verified random reads straight into the caller's buffer.
//!
//! # On disk
//!
//! ```text
//! <dir>/snapvisor-store      marker: "snapvisor store\nformat 2\n" (layout.rs)
//! <dir>/snapvisor-closed     present only while the store is closed cleanly (sledfiles.rs)
//! <dir>/conf, db, snap.*     sled 0.34: the index, rebuildable by `store repair`; trees:
//!     index        blake3 hash (32 B) -> pack id u32, offset u64, length u32 (LE) of the value
//!     manifests    snapshot name -> "SVMF" header + CBOR manifest (see manifest.rs)
//!     attachments  snapshot name, 0x00, attachment name -> crc32 u32 LE + bytes
//!     meta         "clean" while no process has the store open; "first-new-pack" u32 LE, the
//!                  first pack the last session could write; "deleted/NAME" tombstones
//! <dir>/manifests/NAME       each committed manifest again, same bytes (mfiles.rs)
//! <dir>/packs/00000000.pack  pack header, then entries: entry header (magic, length, hash,
//!                            value crc, header crc) + value (codec u8, length u32, payload);
//!                            see pack.rs
//! ```
//!
//! Chunk values live in pack files and not in sled because sled 0.34 measured 1.5x-2.6x the
//! value bytes on disk (leaves holding values are rewritten on consolidation and segments are
//! only cleaned below 50% live), even after tuning segment size and mode. With packs, disk
//! usage is 1.01x the stored bytes on the benchmark image and stays there through deletes
//! thanks to hole punching. Packs and manifest files together hold everything a snapshot
//! needs, so the sled index can be rebuilt from them ([`Store::repair`]). Stores of format 1
//! (no marker, packs without headers) are refused with an error naming both versions; they
//! must be re-created.
//!
//! # Writing chunks: the pipeline
//!
//! [`put_pipelined`] is how snapshots write RAM (pipeline.rs): each worker claims its next
//! chunk (at most 16 MiB of chunks in flight), copies it out of guest memory into a buffer of
//! its own, zero-checks it (an all-zero chunk is recorded as the zero marker and never
//! hashed), hashes, looks up and compresses it into a complete pack entry, then stores it
//! itself: a short sequencer gives the new chunks their places in the packs in the order the
//! chunks were given, and the worker writes and indexes them outside it. There is no writer
//! thread; the pack layout is address order whatever the thread timing; writeback starts
//! every 16 MiB. `put_chunk` (one chunk, any thread) runs the same two halves (`prepare`,
//! `record`) inline.
//!
//! Where a full snapshot's time goes (`examples/pipeline_cost.rs`, 1 GiB, profiled with
//! `perf record` and counted with callgrind): on the `touch` fill (one word in four set,
//! compresses 4x) zstd is two thirds of all instructions (`ZSTD_compressBlock_fast`, sequence
//! and Huffman encoding: the fill is one 8-byte literal and one 24-byte match per 32 bytes,
//! 32 million sequences per GiB), blake3 a tenth, copies 7%; sled lookups and inserts, pack
//! appends and crc32 are a few percent. So that fill costs 2.5-3.5 CPU-seconds per GiB on this
//! machine whatever the pipeline does, and a full snapshot of it on 2 cores takes at least
//! 1.3-1.8 s; incompressible memory costs ~1 CPU-second per GiB (hash, and zstd giving up)
//! and is bound by the disk instead. Two things in the first pipeline cost wall time without
//! showing up as work: a reader thread that copied every chunk and handed it on (a fourth
//! busy thread on 2 cores, and a hand-off per chunk), and the writer starting writeback on its
//! own thread (`sync_file_range` blocked for up to 190 ms on this disk), which with a pool of
//! only `2 * workers + 2` buffers stopped every worker. Workers then read their own chunks and
//! the pool grew deep enough to ride out a stall (the next section has what came after). (Starting writeback on a thread of its own
//! was tried and measured worse: see pipeline.rs.) Measured under the others' builds (load
//! 9-16), `bench snapshot` could not show these changes in wall time: see the README. `encode`
//! compresses into a per-thread scratch buffer and allocates each value at its size (it used
//! to zero-fill a compression bound per chunk: a 1 GiB memset per GiB).
//!
//! # Incremental snapshots
//!
//! [`SnapshotWriter::inherit`] fills a new snapshot's chunk table with a parent's references
//! for every block of unchanged length; the caller then writes only the chunks changed since
//! (inherit.rs). The result is an ordinary manifest listing every hash: there is no chain,
//! deleting the parent never breaks the child, GC keeps whatever any manifest lists, and
//! `store verify` checks a shared chunk for every snapshot that lists it. Inheriting is refused
//! ([`StoreError::ParentChanged`]) unless the store holds exactly the parent the caller
//! describes (checked under the shared GC lock), so a deleted or replaced parent can only
//! make a snapshot full, never wrong.
//!
//! # Format compatibility
//!
//! Neither the pipeline nor incremental snapshots changed a byte on disk: the zero marker (tag
//! 0 in a chunk table) has been in manifest format 1 from the start, and an incremental
//! snapshot's manifest is a format-1 manifest like any other. Stores of format 2 written
//! before these changes open and restore unchanged, and older builds read the new snapshots.
//!
//! Chunk codec 3 (LZ4, December 2026) is the one exception, and only where it is switched on
//! ([`StoreOptions::lz4`], off by default): a build before it refuses such a chunk with
//! "unknown codec 3" (never wrong bytes), so a store that holds LZ4 chunks needs this build
//! or a later one. This build reads every codec ever written (zstd 1, raw 2, LZ4 3), in any
//! mix within a store or a snapshot; the codec does not enter the hash or dedup.
//!
//! # Commit protocol
//!
//! 1. `put_chunk` (or the pipeline): zero check; hash; if the index lacks the hash, compress, append entry
//!    header + value to the active pack (`pwrite`; the pack is marked unsynced before and
//!    after), insert the index entry only if still absent (the first copy wins); record the
//!    reference in the writer.
//! 2. `commit`: every chunk of every declared block must have been put; `fdatasync` every pack
//!    written since the last sync; flush sled (index entries durable); write
//!    `manifests/NAME` (temporary file, fsync, exclusive hard link, directory fsync); insert
//!    the manifest into sled with one compare-and-swap (only if the name is absent); flush.
//! 3. `delete`: record a tombstone; remove `manifests/NAME` (directory fsync); remove the
//!    sled manifest and attachments; flush.
//!
//! A snapshot is visible exactly when its manifest is in the `manifests` tree, and the
//! manifest is written only after everything it references is durable.
//!
//! # What survives what
//!
//! *SIGKILL* (the process dies, the kernel keeps what it wrote), tested by
//! `tests/tests/store_crash.rs` (30 kills of a writing, deleting and collecting child):
//! every listed snapshot reads back bit-exact and nothing partial is listed. A commit killed
//! after its manifest file was linked is completed at the next open (everything it
//! references was already durable); a delete killed after its file was removed is undone at
//! the next open (the file is written again). The next read-write open collects the chunks
//! the killed session left unreferenced.
//!
//! *Power loss* (writes not yet synced are lost): a commit or delete that returned survives,
//! since each step above is synced before the next one starts; creating a pack `fsync`s
//! `packs/`. Because the first indexed copy of a chunk is never replaced and a pack's
//! unsynced mark is only cleared by a sync that began after the last write into it, a commit
//! never references chunk bytes, its own or deduplicated, that it did not sync. Recovery
//! removes the index entries of the interrupted session's packs that no manifest references,
//! so nothing can deduplicate against bytes that may be lost. Hole punching by GC is not
//! synced (a lost punch only leaves dead bytes for the next GC). This relies on sled's
//! `flush` and the filesystem honouring `fsync`; no test here cuts power (the machine has no
//! write-logging block device set up), so it rests on this ordering argument.
//!
//! *Damage* (a truncated, deleted or flipped file) is an error, never an empty store and
//! never deletion: a missing `db` is refused before sled can create an empty one; sled's
//! manifests are cross-checked against the manifest files on every open, read-write opens
//! and every GC check that the index holds every referenced chunk, and GC checks each entry
//! it keeps against its pack entry header before punching anything (consistency.rs, gc.rs).
//! `store verify` checks the index against the packs and the manifest files; `store repair`
//! rebuilds the index (repair.rs). Store files are opened without following symlinks and
//! must be regular files of bounded size. Attachments live only in sled: a repair keeps the
//! ones the damaged database still yields.
//!
//! # Garbage collection and recovery
//!
//! Mark-and-sweep, no refcounts ([`Store::gc`], gc.rs): mark every hash referenced by a
//! committed manifest or by an open writer of this process; remove every other index entry
//! and orphaned attachments; flush; then punch holes into the packs over every byte range no
//! live entry covers (packs with nothing live are deleted and closed, so the space is free
//! at once). Writers hold a shared lock while they look up and record a hash; GC holds it
//! exclusively, so a deduplicated reference is never swept under a writer. Readers never take
//! it. A store that was not closed cleanly (no `clean` marker) is recovered on open: only
//! unreferenced chunks in packs the interrupted session created, or of snapshots deleted
//! since the last GC, are removed; a failed recovery fails the open.
//!
//! # Integrity
//!
//! Every chunk read checks the entry header in front of the value against the index, then
//! decompresses into the caller's buffer and checks the content hash; a mismatch, a missing
//! chunk, a corrupt index entry or a short pack read is an error naming the snapshot, block
//! and offset, and the buffer is zeroed: never wrong bytes. Manifests carry a magic, a
//! format version and a crc32, and every count and size is validated on decode. Deleting a
//! snapshot while an unpinned reader still uses it makes that reader's later reads fail
//! (after the next GC) with such an error. Restores therefore read through
//! [`Store::pinned_reader`]: a pinned snapshot cannot be deleted and GC keeps its chunks
//! (pin.rs).
//!
//! # Full disk
//!
//! Before each pack append and commit the store checks free space (`statvfs`) and fails with
//! [`StoreError::Full`] if less than [`StoreOptions::min_free_bytes`] (4 MiB) would remain.
//! The reserve matters: sled 0.34 poisons its handle on a write error, and measured with a
//! zero reserve on a full tmpfs, `delete` and `gc` then fail with ENOSPC. With the reserve,
//! deletes and GC run and the store keeps working (`tests/tests/store_full.rs`, 16 MiB tmpfs).
//!
//! # Chunk size and zstd level
//!
//! Measured with `cargo run --release -p storage --example store_sweep -- 1024` on this shared
//! 2-core machine (write MB/s varied by up to 2x between runs; latency, ratio and growth are
//! stable). Image: `bench` module, runs of 60% zero, 15% random, 25% text-like pages, 1 GiB,
//! 2 writer threads; 10 clones, each the base with its own 1% of pages rewritten.
//!
//! | chunk | level | ratio | read p50 / p99 | 1-thread restore | clones growth | disk/stored |
//! |------:|------:|------:|---------------:|-----------------:|--------------:|------------:|
//! | 16 KiB | 3 | 4.75x | 30 / 46 us | 1.4 GB/s | 139 MB | 1.020 |
//! | 32 KiB | 3 | 4.80x | 50 / 71 us | 1.85 GB/s | 226 MB | 1.025 |
//! | 64 KiB | 3 | 4.83x | 71 / 116 us | 1.8 GB/s | 375 MB | 1.009 |
//! | 256 KiB | 3 | 4.87x | 187 us / 2.7 ms | 1.4 GB/s | 1078 MB | 1.004 |
//! | 1 MiB | 3 | 4.90x | 621 us / 4.7 ms | 1.4 GB/s | 2065 MB | 1.001 |
//!
//! zstd alone, one thread, on the non-zero chunks (compress / decompress MB/s, ratio):
//! 16 KiB: level 1 315 / 830, 1.98; level 3 303 / 970-1050, 2.03. 64 KiB: level 1 416-483 /
//! 1100-1290, 2.42; level 3 364-455 / 1476-1519, 2.49; level 5 drops to 94-174 MB/s.
//!
//! Default chunk size: 64 KiB. Per core it compresses 40% and decompresses 50% faster than
//! 16 KiB (per-call costs), which the snapshot pause and the restore stream pay for; a lazy
//! fault still costs under 0.1 ms. 16 KiB halves fault latency and cuts clone growth by
//! 2.7x: set `StoreOptions::chunk_size` to 16384 for fleets of many near-identical clones.
//! Chunks above 64 KiB gain under 2% ratio and lose on latency and dedup.
//!
//! Default level: -1, zstd's first fast level (it was 3 until the snapshot pipeline, then 1
//! until December 2026). Measured with `cargo run --release -p storage --example chunk_costs
//! -- 128 -5,-3,-2,-1,1,3`, one thread, 64 KiB chunks, now in CPU time of the measuring thread
//! (the earlier wall-time table moved by up to 3x between runs under the others' builds; CPU
//! time still moves by up to 1.3x, through shared caches), two runs at load average 9-10, and
//! the instructions counted by `valgrind --tool=callgrind` (exact, load-free) for compressing
//! and decompressing 16 MiB of each image. Images: `memfill` (pseudo-random words,
//! incompressible), `touch` (the benchmarks' guest fill: one pattern word in four, zeros
//! between), `mixed` (the `bench` module's image above).
//!
//! | image | level | compress MB/s per CPU-second (run 1 / run 2) | stored/in | decompress MB/s per CPU-s |
//! |-------|------:|--------------:|----------:|----------------:|
//! | memfill | -5 / -1 / 1 / 3 | 1197-1282 / 1039-1391 / 1025-1267 / 882 | 1.000 (stored raw) | (raw copy) |
//! | touch | -5 | 488 / 647 | 0.345 | 829-915 |
//! | touch | -2 | 527 | 0.282 | 1109 |
//! | touch | -1 | 602 / 374 | 0.255 | 1916-2493 |
//! | touch | 1 | 445 / 351 | 0.255 | 1455-2454 |
//! | touch | 3 | 178 | 0.262 | 1130 |
//! | mixed | -5 | 771 / 559 | 0.229 | 1484-2218 |
//! | mixed | -1 | 730 / 444 | 0.223 | 944-2069 |
//! | mixed | 1 | 588 / 457 | 0.218 | 1318-1436 |
//! | mixed | 3 | 387 | 0.212 | 1686 |
//!
//! Instructions for the three images together (compress + decompress, 48 MiB): level 1
//! 807 M, -1 773 M (-4%), -3 744 M (-8%), -5 707 M (-12%), -7 700 M (-13%). blake3 is 4.3-9
//! GB/s per CPU-second on the same chunks, so compression is what a snapshot pays for.
//!
//! So the fast levels buy little here: the touch fill is sequence-bound (one literal and one
//! match per 32 bytes) and even -7 spends 87% of level 1's instructions, while -2 and below
//! store 10-35% more of it (`touch` 0.282-0.345 against 0.255: more disk writes and a slower
//! restore, since decompression slows too). Level -1 stores exactly what level 1 stores on
//! `touch`, 2% more on `mixed` (0.223 against 0.218), and costs 4% fewer instructions and
//! 0-35% less CPU time (it skips Huffman coding of literals, which random words do not
//! shrink anyway); its decompression was as fast or faster in both runs on `touch`. So -1:
//! the snapshot gets a little faster and the store 0-2% larger. Incompressible chunks cost
//! all levels about the same (zstd gives up early; they are stored raw). A store whose
//! snapshots are restored far more often than taken can set `StoreOptions::zstd_level` to 3
//! (3% smaller on mixed memory, half the compression speed). The level is per chunk value,
//! not part of the format: stores written at level 1 or 3 read the same (unit test
//! `chunks_written_at_the_old_level_read_back_after_the_default_changed`).
//!
//! # The floors of a full snapshot, and LZ4 (issue 13: 1 GiB in <= 1 s)
//!
//! Measured December 2026 on this shared 2-core machine at load average 6.5-7.5 (other
//! engineers' builds), with `examples/codec_floor.rs` (one stage per process, thread CPU
//! time, 256 MiB, three runs) and its instructions under `valgrind --tool=callgrind` (16 MiB,
//! a run of the stage minus a run of none: exact and load-free). Per GiB:
//!
//! | image | stage | CPU-s (3 runs) | G instructions | stored/in |
//! |-------|-------|---------------:|---------------:|----------:|
//! | touch | copy out of memory | 0.089-0.092 | 1.1 | |
//! | touch | blake3 | 0.212-0.215 | 2.7 | |
//! | touch | zstd 1 | | 19.3 | 0.255 |
//! | touch | zstd -1 (default) | 1.109-1.123 | 15.9 | 0.255 |
//! | touch | zstd -3 | | 13.7 | 0.344 |
//! | touch | zstd -5 | 0.972-1.079 | 11.9 | 0.345 |
//! | touch | zstd -1, hashLog 12, minMatch 7 | 1.138-1.143 | 15.9 | 0.255 |
//! | touch | LZ4 (lz4_flex) | 0.830-0.834 | 10.5 | 0.358 |
//! | touch | decompress: zstd -1 / LZ4 | | 5.0 / 3.1 | |
//! | mixed | zstd -1 / LZ4 | 1.166 / 0.649 | 14.9 / 6.0 | 0.213 / 0.261 |
//! | mixed | zstd -1, minMatch 7 (hashLog 14 / 12) | | 11.4 / 11.5 | 0.214 / 0.218 |
//! | mixed | decompress: zstd -1 / LZ4 | | 7.0 / 3.4 | |
//! | memfill | zstd -1 / LZ4 (both give up: stored raw) | 0.209 / 0.149 | 4.0 / 2.1 | 1.000 |
//!
//! Disk, 1 GiB of random bytes from tmpfs onto the store's filesystem: `dd bs=1M
//! conv=fdatasync` 10.4, 9.5, 2.6 and 2.4 s (103-455 MB/s), with `oflag=direct` 4.8, 4.2,
//! 2.8 and 3.3 s, at different minutes of the same load: the disk is shared too. `bench
//! snapshot`'s full memfill took 2.6-4.7 s in the same minutes, so the store is at the
//! disk's speed (the README has the runs).
//!
//! What follows:
//! - *memfill* (incompressible) must put 1 GiB on the disk and `fdatasync` it: the disk alone
//!   takes 4-10 s here under load, so 1 s is out of reach on this machine without dropping
//!   durability, which the commit protocol does not do. Its CPU work (copy, blake3, zstd
//!   giving up) is ~0.5 CPU-s per GiB, well under the disk's time.
//! - *touch* costs copy + blake3 + zstd -1 = 1.4 CPU-s per GiB in isolated stages (0.7 s on 2
//!   idle cores); the whole pipeline measured 1.95-2.25 CPU-s per GiB of process time
//!   (`examples/pipeline_cost.rs`, three runs: sled, pack appends, page-cache copies,
//!   hand-offs and the writer on top). The fill is sequence-bound (one literal and one match
//!   per 32 bytes): no zstd level or parameter removes that work, and the faster levels pay in
//!   bytes (-3 and below store 35% more).
//! - LZ4 takes 25% less CPU than zstd -1 on touch (45% less on mixed memory, and
//!   decompresses 1.6-2x faster, which lazy restores feel), but stores 40% more of touch
//!   (23% more of mixed). In the whole pipeline it saved 5-15% of process CPU (1.72-2.19
//!   against 1.95-2.25 CPU-s, three runs each, alternated) and wrote 366 MiB instead of 261
//!   MiB; `bench snapshot --lz4` against zstd -1 (two rounds each, alternated) showed no
//!   difference in wall time under the load (4360 and 4079 ms against 4534 and 4514 ms for
//!   touch; the same binary moved 2x between rounds). So zstd -1 stays the default and LZ4
//!   is [`StoreOptions::lz4`], for hosts whose disks are fast and cores few, or where
//!   restore speed matters most. An adaptive rule (LZ4 while the writer waits for
//!   the workers, zstd while they wait for the disk) was not built: the gain it could reach
//!   is this 5-15%.
//! - zstd -1 with `minMatch` 7 costs 23% fewer instructions on the mixed image (and its
//!   frames 26% fewer to decompress) and changes nothing on touch, but the thread CPU time
//!   fell only 1-6% (1.20 and 1.36 against 1.22 and 1.45 CPU-s per GiB: fewer instructions
//!   at a lower IPC) while storing 2.3% more (0.218 against 0.213): not taken.
//!
//! # Why the pipeline lost to the per-thread path, and what changed (December 2026)
//!
//! Measured with `examples/pipeline_cost.rs` (1 GiB, 64 KiB chunks, process CPU time, and
//! each thread's CPU clock) and `perf record`, alternated with the previous build, load
//! average 3-8 (the other engineers' builds):
//!
//! - The calling thread stored every chunk: 0.54 CPU-s per GiB on touch and 0.96 on memfill,
//!   nearly all of it the kernel's page-cache work for `pwrite` (copying, ext4 delayed
//!   allocation per 4 KiB block, folio accounting) plus sled's index inserts, on one thread.
//!   On memfill that thread needed more CPU than each worker (0.38 CPU-s), so it set the
//!   pace; on touch it made three busy threads for two cores. The per-thread path (each
//!   thread appends its own chunks) has neither problem, which is why it won.
//! - Per chunk, the writer also copied each value again (entry header + value into a new
//!   buffer: 1 GiB of copies for memfill), computed its crc32, and every value was a fresh
//!   allocation, freed by another thread: glibc returned the memory and the next allocations
//!   faulted it in again (page faults and page clearing showed in the workers' profile).
//!
//! Now every worker stores its own chunks (pipeline.rs): a sequencer gives new chunks their
//! places in chunk order and the pwrites, index inserts and references happen outside it, in
//! parallel; a worker builds the complete pack entry (header and crc) itself, zstd compresses
//! straight into a recycled entry buffer, and each worker reads into one buffer of its own
//! that stays in its cache. Alternated with the previous build, three runs each, 1 GiB:
//!
//! | load | image | pipeline wall ms before / after | process CPU-s before / after |
//! |-----:|-------|--------------------------------:|-----------------------------:|
//! | 2.5-2.8 | touch | 1080-1639 / 949-1077 | 1.88-2.93 / 1.74-1.95 |
//! | 2.5-2.8 | memfill | 1024-1126 / 805-893 | 1.65-1.77 / 1.30-1.36 |
//! | 7 | touch | 3002-3584 / 3381-4321 | 2.58-2.65 / 2.15-2.55 |
//! | 7 | memfill | 2235-4361 / 3566-4862 | 1.82-2.08 / 1.59-1.83 |
//!
//! zstd is now 55-60% of the pipeline's samples on touch, blake3 7%, copies 6%, sled 4-5%,
//! the kernel's pack writes a few percent: what is left is the codec. At load 7 (two other
//! engineers building) the CPU still fell but the wall time rose; writeback was ruled out
//! (a build without it was as slow), and the cause was not found: the wall times there moved
//! by 2x between runs of the same build. `bench snapshot`
//! now reports the workers' CPU time (`cpu_ms`) beside the stages' wall times.
//!
//! `bench snapshot --mem-mib 1024`, three runs each alternated with the previous build, load
//! 2.3-3.1, `total_ms`: `full` touch 1100-1246 before, 1020-1140 after (the workers' CPU
//! 1.82-2.01 s); `full` memfill 1186-1302 before, 932-1111 after (CPU 1.41-1.67 s; commit
//! 8-10 ms), against `dd bs=1M conv=fdatasync` of 1 GiB onto the same filesystem in the same
//! minutes: 0.63-2.84 s; `background` touch 1433-1729 / 1364-1502, memfill 1790-1969 /
//! 1717-1945 (its copy goes through the write protection: 0.4-0.9 s of its read stage);
//! `baseline` (the per-thread path, unchanged but for the codec's buffers) touch 980-1174 /
//! 943-1066. The issue's 1 s for a full snapshot of touch is within 2-14% on this shared
//! machine; what stands in its way is the codec's CPU time.
//!
//! # Where the rest of a full snapshot's CPU went, and batched pack writes (December 2026)
//!
//! `perf record -g` (kernel stacks included) on `snapvisor bench snapshot --mem-mib 1024`,
//! the two pipeline workers of the `full` touch row (found by thread id; 3748 samples, 1.87
//! CPU-s), samples by where they fell, with the examples' profiles (`pipeline_cost` built
//! with frame pointers) for the callers:
//!
//! | share | CPU-s | what |
//! |------:|------:|------|
//! | 53% | 0.99 | zstd -1 (the fill's 32 M sequences per GiB: see above) |
//! | 11.5% | 0.22 | pack `pwrite`s: the kernel's page-cache work (ext4 delayed allocation, folio allocation and accounting, the copy) |
//! | 9.7% | 0.18 | blake3 |
//! | 8.4% | 0.16 | sled: the index lookup before compressing and the compare-and-swap after writing (half each) |
//! | 5.7% | 0.11 | copying chunks out of guest memory |
//! | 5.2% | 0.10 | malloc and free (mostly sled's nodes; entry buffers are recycled) |
//! | 1.8% | 0.04 | starting writeback (`sync_file_range` every 16 MiB) |
//! | 0.9% | 0.02 | page faults (guest memory was resident; buffers are not faulted in per chunk) |
//!
//! The pack writes were the one large cost the pipeline's shape chose: one `pwrite` per
//! entry, back to back, so each 16 KiB write started at an unaligned offset and the kernel
//! did its per-write and per-folio work for every one. `examples/pack_writes.rs`: 261 MiB
//! (what touch stores) in 16432-byte writes 0.17-0.18 CPU-s, in 512 KiB writes 0.06-0.08.
//! Now new entries are written in batches of up to 512 KiB (or 128 chunks), one `pwritev`
//! per pack a batch lands in (pipeline.rs); in the same profile after the change (a run
//! with a build beside it: 1.99 CPU-s) the pack writes were 5.7% (0.11 CPU-s) and
//! writeback 1.0%. Not changed, and why: sled (its per-operation cost is
//! the tree walk and node updates, which batching does not remove; an in-memory filter
//! in front of the lookup would be a second copy of the index to keep right through GC and
//! recovery), zstd's level (see above: the fill is sequence-bound), the copy out of guest
//! memory (a stop-and-copy snapshot could hash and compress guest memory in place, but live
//! and background copies must not, and it would save at most 0.1 CPU-s).
//!
//! Alternated runs, old and new binary, `bench snapshot --mem-mib 1024`, five each, the
//! workers' CPU (`cpu_ms`), under the other engineers' builds (load 6.5-11, so wall times
//! moved 2x between runs of one binary and are not the measure here): `full` touch 2085,
//! 1817, 1788, 1868, 1977 before (mean 1907), 1671, 1594, 1623, 1658, 1800 after (mean
//! 1669, -12%). memfill (incompressible: 64 KiB raw entries, large writes already) did not
//! gain and may have lost: `full` memfill 1630, 1371, 1408, 2176, 1442 before (mean 1605),
//! 1751, 1565, 1970, 1918, 1658 after (mean 1772); `background` memfill means 1465 / 1621;
//! in `examples/pipeline_cost.rs` (five more alternations) the medians were 1384 / 1405 ms.
//! `perf` of the example showed the kernel's copy into the page cache
//! (`copy_folio_from_iter_atomic`) at 8% of samples before and 32-37% after on memfill,
//! also with batches of a single entry, which `examples/pack_writes.rs` (a hot buffer) does
//! not reproduce: not understood yet (an open question for the next change here).
//!
//! # After batching: what is left of a full snapshot of touch (December 2026)
//!
//! `perf record -g` on `examples/pipeline_cost.rs` (1 GiB touch, two workers, 1.72 CPU-s in
//! the workers, load 5), the workers' samples: zstd -1 62% (the match finder two thirds of
//! it, sequence coding a third), blake3 11% (its AVX-512 code: `_blake3_hash_many_avx512`),
//! the kernel 9% (pack `pwritev`s 6%, of which ext4 delayed allocation 2%), the copy out of
//! memory 6%, sled 5%, malloc 2%, the rest 5%. Instructions under `valgrind --tool=callgrind`
//! (64 MiB): the workers' code outside zstd, blake3 and the copy is about 1% of the
//! pipeline's; the index lookup before compressing costs 3.4 k instructions a chunk (0.23%
//! of all) and the index insert 9.7 k (0.7%): an in-memory filter in front of the lookup
//! would save under 1%. sled's 5% of samples are cache misses, not work. So zstd -1 and
//! blake3 are ~75% of the CPU, and the listed overheads together ~25%: the issue's 1 s on two
//! cores (a 15-20% cut) is not reachable by trimming them; it needs a cheaper codec or
//! level for compressible memory (see the LZ4 and level tables above). zstd's parameters
//! for a 64 KiB input are already its single-shot ones (`ZSTD_compress2` knows the size; the
//! context is reused per thread; the frame goes straight into the entry buffer).

mod attachment;
mod check;
mod chunk;
#[cfg(test)]
mod codec_tests;
mod consistency;
mod debug;
mod error;
mod fsfile;
mod gc;
mod inherit;
mod layout;
mod manifest;
#[cfg(test)]
mod manifest_hostile_tests;
mod mfiles;
mod name;
mod open;
mod pack;
mod pin;
mod pipeline;
#[cfg(test)]
mod pipeline_hostile_tests;
#[cfg(test)]
mod pipeline_store_tests;
#[cfg(test)]
mod pipeline_tests;
mod reader;
mod repair;
mod scan;
mod sledfiles;
mod store;
mod usage;
mod verify;
mod writer;

pub use check::IndexCheck;
pub use chunk::{
    decode_into as decode_chunk_into, encode as encode_chunk, encode_with as encode_chunk_with,
    is_zero as chunk_is_zero, ChunkError, ChunkRef, Codec, Hash,
};
pub use error::{is_no_room, Result, StoreError};
pub use gc::GcReport;
pub use manifest::{BlockManifest, Manifest, ManifestError};
pub use name::{validate_attachment_name, validate_snapshot_name, NameError};
pub use pack::{Location, PACK_MAX};
pub use pin::SnapshotPin;
pub use pipeline::{put_pipelined, ChunkJob, PipelineStats, ReadChunk};
pub use reader::SnapshotReader;
pub use repair::RepairReport;
pub use store::{Store, StoreOptions, DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL};
pub use usage::{disk_bytes, Usage};
pub use verify::VerifyReport;
pub use writer::{BlockSpec, SnapshotWriter, WriteStats};
pub mod bench;
