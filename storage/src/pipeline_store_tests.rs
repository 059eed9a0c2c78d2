//! Tests of how the pipeline's workers store chunks (pipeline.rs): a chunk repeated within
//! one run is written once, a run that fails leaves the store as it was, and batched
//! entries of every size land exactly once, bit-exact.

use crate::pipeline::{put_pipelined, ChunkJob};
use crate::{BlockSpec, Store, StoreError};

const CS: u64 = 65536;

fn spec(idstr: &str, len: u64) -> BlockSpec {
    BlockSpec { idstr: idstr.into(), used_length: len, max_length: len, page_size: 4096, resizeable: false }
}

fn jobs(n: u64) -> Vec<ChunkJob> {
    (0..n).map(|i| ChunkJob { block: "ram".into(), offset: i * CS }).collect()
}

/// Chunk `i` of image `seed`: distinct, half of it compressible text, half noise.
fn chunk(i: u64, seed: u64) -> Vec<u8> {
    let mut x = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
    (0..CS)
        .map(|j| {
            if j < CS / 2 {
                b"pipeline store "[(j % 15) as usize] ^ (i as u8)
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// Bytes in the store's pack files.
fn pack_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("packs"))
        .expect("packs")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum()
}

/// A chunk that occurs many times in one run (here every chunk: the workers prepare the
/// copies at once, before any is in the index) is written to the packs once, and every
/// copy reads back.
#[test]
fn a_chunk_repeated_within_a_run_is_written_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let n = 200;
    let same = chunk(7, 1);
    let before = pack_bytes(dir.path());
    let w = store.begin("dup", vec![spec("ram", n * CS)]).expect("begin");
    let read = |_: &str, _: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&same);
        Ok(())
    };
    put_pipelined(&w, &jobs(n), 4, &read).expect("pipeline");
    let st = w.stats();
    assert_eq!((st.new_chunks, st.dedup_chunks), (1, n - 1), "{st:?}");
    w.commit(Vec::new()).expect("commit");
    let written = pack_bytes(dir.path()) - before;
    // One pack header and one entry (48-byte header and the value).
    assert_eq!(written, 16 + 48 + st.bytes_stored, "the packs hold more than one copy of the chunk");
    let mut buf = vec![0u8; CS as usize];
    for i in 0..n {
        store.read_chunk("dup", "ram", i * CS, &mut buf).expect("read");
        assert!(buf == same, "chunk {i} reads back different bytes");
    }
}

/// A run that fails halfway (a read error after many chunks were stored) commits nothing:
/// the snapshot committed before it still reads back bit-exact and verifies, the failed one
/// is not listed, GC reclaims what it wrote, and the next snapshot of the same memory works.
#[test]
fn a_failed_run_leaves_the_store_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let n = 300;
    let good = |_: &str, off: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&chunk(off / CS, 1));
        Ok(())
    };
    let w = store.begin("before", vec![spec("ram", n * CS)]).expect("begin");
    put_pipelined(&w, &jobs(n), 2, &good).expect("pipeline");
    w.commit(Vec::new()).expect("commit");

    let w = store.begin("failed", vec![spec("ram", n * CS)]).expect("begin");
    let bad = |_: &str, off: u64, buf: &mut [u8]| {
        if off == 250 * CS {
            return Err("guest memory gone".to_string());
        }
        buf.copy_from_slice(&chunk(off / CS, 2));
        Ok(())
    };
    let err = put_pipelined(&w, &jobs(n), 2, &bad).expect_err("must fail");
    assert!(matches!(err, StoreError::Source { offset, .. } if offset == 250 * CS), "{err}");
    assert!(w.stats().new_chunks > 0, "the run failed before it stored anything: the test shows nothing");
    drop(w);

    assert_eq!(store.list().expect("list"), vec!["before".to_string()]);
    let gc = store.gc().expect("gc");
    assert!(gc.chunks_removed > 0, "GC found nothing of the failed run to reclaim: {gc:?}");
    let mut buf = vec![0u8; CS as usize];
    for i in 0..n {
        store.read_chunk("before", "ram", i * CS, &mut buf).expect("read");
        assert!(buf == chunk(i, 1), "chunk {i} of the earlier snapshot reads back different bytes");
    }
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "verify after the failed run");

    let w = store.begin("after", vec![spec("ram", n * CS)]).expect("begin");
    let again = |_: &str, off: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&chunk(off / CS, 2));
        Ok(())
    };
    put_pipelined(&w, &jobs(n), 2, &again).expect("pipeline");
    w.commit(Vec::new()).expect("commit");
    for i in 0..n {
        store.read_chunk("after", "ram", i * CS, &mut buf).expect("read");
        assert!(buf == chunk(i, 2), "chunk {i} of the next snapshot reads back different bytes");
    }
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "verify");
}

/// A run with no chunks at all (an incremental snapshot of memory nobody wrote), or with
/// fewer chunks than workers, returns: no worker waits for a slot in the window forever.
#[test]
fn runs_with_no_chunks_or_fewer_chunks_than_workers_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    for (seed, (n, workers)) in [(0, 2), (0, 4), (1, 2), (1, 4), (3, 8)].into_iter().enumerate() {
        let read = |_: &str, off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&chunk(off / CS, 10 + seed as u64));
            Ok(())
        };
        let name = format!("n{n}w{workers}");
        let w = store.begin(&name, vec![spec("ram", 8 * CS)]).expect("begin");
        let st = put_pipelined(&w, &jobs(n), workers, &read).expect("pipeline");
        assert_eq!(st.chunks, n, "{name}");
        assert_eq!(w.stats().new_chunks, n, "{name}");
    }
}

/// Chunk `i` of the batch test: most compress to a few dozen bytes (batches fill by count),
/// every 5th of the first 300 is noise stored raw (batches fill by bytes), every 7th is
/// zero, every 11th repeats chunk 1; each differs from its neighbours, so bytes left over
/// from a recycled entry buffer would show.
fn mixed_chunk(i: u64, seed: u64) -> Vec<u8> {
    if i.is_multiple_of(7) {
        return vec![0; CS as usize];
    }
    let i = if i.is_multiple_of(11) { 1 } else { i };
    let mut x = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
    (0..CS)
        .map(|j| {
            if i.is_multiple_of(5) && i < 300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                (i as u8) ^ (j / 4096) as u8
            }
        })
        .collect()
}

/// New entries are written in batches (pipeline.rs): tiny entries and raw 64 KiB ones,
/// batches that cross pack boundaries (256 KiB packs), repeats recorded after their batch,
/// one worker and several. Every chunk reads back bit-exact, the store verifies, the packs
/// hold exactly their headers and the new entries (no byte of a recycled buffer and no
/// entry twice), and no pack grows past its size limit.
#[test]
fn batched_entries_of_every_size_read_back_exact_across_packs() {
    for workers in [1, 3] {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = crate::StoreOptions { pack_max: 256 << 10, ..Default::default() };
        let store = Store::open_with(dir.path(), opts).expect("open");
        let n = 600;
        let w = store.begin("b", vec![spec("ram", n * CS)]).expect("begin");
        let read = |_: &str, off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&mixed_chunk(off / CS, 9));
            Ok(())
        };
        put_pipelined(&w, &jobs(n), workers, &read).expect("pipeline");
        let st = w.stats();
        w.commit(Vec::new()).expect("commit");
        let packs = std::fs::read_dir(dir.path().join("packs")).expect("packs").count() as u64;
        assert!(packs > 3, "{workers} workers: the test must cross pack boundaries ({packs} packs)");
        for e in std::fs::read_dir(dir.path().join("packs")).expect("packs") {
            let len = e.expect("entry").metadata().expect("metadata").len();
            assert!(len <= 256 << 10, "{workers} workers: a pack of {len} bytes: a batch went past the size limit");
        }
        assert_eq!(
            pack_bytes(dir.path()),
            16 * packs + 48 * st.new_chunks + st.bytes_stored,
            "{workers} workers: the packs hold other bytes than the new entries ({st:?})"
        );
        let mut buf = vec![0u8; CS as usize];
        for i in 0..n {
            store.read_chunk("b", "ram", i * CS, &mut buf).expect("read");
            assert!(buf == mixed_chunk(i, 9), "{workers} workers: chunk {i} reads back different bytes");
        }
        let report = store.verify("b").expect("verify");
        assert!(report.ok(), "{workers} workers: {report:?}");
    }
}
