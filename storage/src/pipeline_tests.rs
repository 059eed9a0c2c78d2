//! Tests of the chunk pipeline (ordering, zero marker) and of incremental inheritance.

use crate::pipeline::{put_pipelined, ChunkJob};
use crate::{BlockSpec, ChunkRef, Hash, Store, StoreError};

const CS: u64 = 65536;

fn spec(idstr: &str, len: u64) -> BlockSpec {
    BlockSpec { idstr: idstr.into(), used_length: len, max_length: len, page_size: 4096, resizeable: false }
}

/// Chunk `i` of a test image: every third chunk zero, the others distinct; odd ones
/// incompressible noise (slow for zstd), even ones text (fast), so workers finish out of order.
fn chunk(i: u64, seed: u64) -> Vec<u8> {
    if i.is_multiple_of(3) {
        return vec![0; CS as usize];
    }
    let mut x = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
    (0..CS)
        .map(|j| {
            if !i.is_multiple_of(2) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                b"chunk text "[(j % 11) as usize] ^ (i as u8) ^ (seed as u8)
            }
        })
        .collect()
}

fn jobs(n: u64) -> Vec<ChunkJob> {
    (0..n).map(|i| ChunkJob { block: "ram".into(), offset: i * CS }).collect()
}

fn read(seed: u64) -> impl Fn(&str, u64, &mut [u8]) -> Result<(), String> + Sync {
    move |_, off, buf| {
        buf.copy_from_slice(&chunk(off / CS, seed));
        Ok(())
    }
}

/// The writer stage stores chunks in job order whatever order the workers finish in: the new
/// chunks' pack offsets rise with the chunk index.
#[test]
fn pipeline_stores_new_chunks_in_job_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let n = 96;
    let w = store.begin("s", vec![spec("ram", n * CS)]).expect("begin");
    let stats = put_pipelined(&w, &jobs(n), 4, &read(1)).expect("pipeline");
    assert_eq!(stats.chunks, n);
    assert_eq!(stats.bytes_read, n * CS);
    let m = w.commit(Vec::new()).expect("commit");
    let mut last = None;
    for (i, c) in m.blocks[0].chunks.iter().enumerate() {
        let ChunkRef::Stored(h) = c else { continue };
        let loc = store.debug_chunk_location(h).expect("index").expect("indexed");
        let key = (loc.pack, loc.offset);
        if let Some(prev) = last {
            assert!(key > prev, "chunk {i} stored at {key:?}, before the previous chunk at {prev:?}");
        }
        last = Some(key);
    }
    let r = store.reader("s").expect("reader");
    let mut buf = vec![0u8; CS as usize];
    for i in 0..n {
        r.read_chunk("ram", i * CS, &mut buf).expect("read");
        assert!(buf == chunk(i, 1), "chunk {i} reads back different bytes");
    }
}

/// All-zero chunks become the zero marker, are never hashed or stored, and read back as zeros.
#[test]
fn pipeline_records_zero_chunks_as_the_zero_marker_without_hashing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let n = 30;
    let w = store.begin("z", vec![spec("ram", n * CS)]).expect("begin");
    put_pipelined(&w, &jobs(n), 2, &read(2)).expect("pipeline");
    let st = w.stats();
    let zeros = (0..n).filter(|i| i.is_multiple_of(3)).count() as u64;
    assert_eq!(st.zero_chunks, zeros);
    assert_eq!(st.bytes_hashed, (n - zeros) * CS, "zero chunks must not be hashed");
    assert_eq!(st.new_chunks, n - zeros);
    let m = w.commit(Vec::new()).expect("commit");
    for (i, c) in m.blocks[0].chunks.iter().enumerate() {
        assert_eq!(matches!(c, ChunkRef::Zero), i.is_multiple_of(3), "chunk {i}: {c:?}");
    }
    assert_eq!(store.debug_chunk_location(&Hash::of(&vec![0u8; CS as usize])).expect("index"), None);
    let mut buf = vec![0xffu8; CS as usize];
    store.read_chunk("z", "ram", 0, &mut buf).expect("read zero chunk");
    assert!(buf.iter().all(|b| *b == 0));
}

/// A reader error stops the pipeline and names the chunk; nothing hangs.
#[test]
fn pipeline_reports_a_read_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let w = store.begin("e", vec![spec("ram", 40 * CS)]).expect("begin");
    let bad = |_: &str, off: u64, buf: &mut [u8]| {
        if off == 17 * CS {
            return Err("page gone".to_string());
        }
        buf.fill(1);
        Ok(())
    };
    let err = put_pipelined(&w, &jobs(40), 3, &bad).expect_err("must fail");
    assert!(matches!(err, StoreError::Source { offset, .. } if offset == 17 * CS), "{err}");
}

/// The workers keep reading and compressing ahead of a chunk that is slow to read (as they
/// do of a writer that stalls on the disk): while chunk 0's read waits, at least 32 later
/// chunks (2 MiB) must be read. A single reader thread, or a pool of `2 * workers + 2`
/// buffers, stops after a handful and the read of chunk 0 gives up.
#[test]
fn pipeline_reads_ahead_of_a_slow_chunk() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let n = 64;
    let w = store.begin("slow", vec![spec("ram", n * CS)]).expect("begin");
    let others = AtomicU64::new(0);
    let slow = |_: &str, off: u64, buf: &mut [u8]| {
        if off == 0 {
            let until = Instant::now() + Duration::from_secs(10);
            while others.load(Ordering::SeqCst) < 32 {
                if Instant::now() > until {
                    return Err(format!("only {} chunks read past chunk 0", others.load(Ordering::SeqCst)));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            others.fetch_add(1, Ordering::SeqCst);
        }
        buf.copy_from_slice(&chunk(off / CS, 4));
        Ok(())
    };
    put_pipelined(&w, &jobs(n), 2, &slow).expect("the pipeline read ahead of the slow chunk");
    w.commit(Vec::new()).expect("commit");
    let mut buf = vec![0u8; CS as usize];
    for i in 0..n {
        store.read_chunk("slow", "ram", i * CS, &mut buf).expect("read");
        assert!(buf == chunk(i, 4), "chunk {i} reads back different bytes");
    }
}

/// A read that panics stops the pipeline with an error; the other workers and the writer do
/// not wait for its chunk forever.
#[test]
fn pipeline_survives_a_panicking_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let w = store.begin("p", vec![spec("ram", 400 * CS)]).expect("begin");
    let bad = |_: &str, off: u64, buf: &mut [u8]| {
        assert!(off != 5 * CS, "test panic in read");
        buf.fill(2);
        Ok(())
    };
    let err = put_pipelined(&w, &jobs(400), 2, &bad).expect_err("must fail");
    assert!(matches!(err, StoreError::Pipeline { .. }), "{err}");
}

/// Snapshots written at the previous default level (1) still read back and verify in a store
/// opened with today's default: the level is per chunk value, not part of the format.
#[test]
fn chunks_written_at_the_old_level_read_back_after_the_default_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = 24;
    {
        let old = crate::StoreOptions { zstd_level: 1, ..Default::default() };
        let store = Store::open_with(dir.path(), old).expect("open at level 1");
        let w = store.begin("old", vec![spec("ram", n * CS)]).expect("begin");
        put_pipelined(&w, &jobs(n), 2, &read(5)).expect("pipeline");
        w.commit(Vec::new()).expect("commit");
    }
    let store = Store::open(dir.path()).expect("reopen with the default level");
    assert_ne!(store.options().zstd_level, 1, "the default level is no longer 1");
    let w = store.begin("new", vec![spec("ram", n * CS)]).expect("begin");
    put_pipelined(&w, &jobs(n), 2, &read(6)).expect("pipeline");
    w.commit(Vec::new()).expect("commit");
    let mut buf = vec![0u8; CS as usize];
    for (name, seed) in [("old", 5), ("new", 6)] {
        for i in 0..n {
            store.read_chunk(name, "ram", i * CS, &mut buf).expect("read");
            assert!(buf == chunk(i, seed), "{name} chunk {i} reads back different bytes");
        }
    }
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "verify");
}

/// A store written with LZ4 (codec 3) reads back and verifies when reopened with zstd, and
/// holds both codecs side by side; a flipped byte in an LZ4 value is a verify error naming
/// the snapshot, block and offset.
#[test]
fn lz4_snapshots_read_back_beside_zstd_ones_and_verify_catches_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = 24;
    let lz4_hash = {
        let opts = crate::StoreOptions { lz4: true, ..Default::default() };
        let store = Store::open_with(dir.path(), opts).expect("open with lz4");
        let w = store.begin("lz4", vec![spec("ram", n * CS)]).expect("begin");
        put_pipelined(&w, &jobs(n), 2, &read(7)).expect("pipeline");
        let m = w.commit(Vec::new()).expect("commit");
        // Chunk 2 is text: compressed, so its value is codec 3.
        let ChunkRef::Stored(h) = m.blocks[0].chunks[2] else { panic!("chunk 2 is stored") };
        h
    };
    let store = Store::open(dir.path()).expect("reopen with zstd");
    assert!(!store.options().lz4, "zstd is the default");
    let w = store.begin("zstd", vec![spec("ram", n * CS)]).expect("begin");
    put_pipelined(&w, &jobs(n), 2, &read(8)).expect("pipeline");
    w.commit(Vec::new()).expect("commit");
    let mut buf = vec![0u8; CS as usize];
    for (name, seed) in [("lz4", 7), ("zstd", 8)] {
        for i in 0..n {
            store.read_chunk(name, "ram", i * CS, &mut buf).expect("read");
            assert!(buf == chunk(i, seed), "{name} chunk {i} reads back different bytes");
        }
    }
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "verify");

    let h = lz4_hash;
    let loc = store.debug_chunk_location(&h).expect("index").expect("indexed");
    let pack = dir.path().join("packs").join(format!("{:08}.pack", loc.pack));
    let mut bytes = std::fs::read(&pack).expect("read pack");
    let at = (loc.offset + 5) as usize;
    assert_eq!(bytes[at - 5], crate::chunk::CODEC_LZ4, "the value at the index's offset is an LZ4 one");
    bytes[at + 3] ^= 0x40;
    std::fs::write(&pack, &bytes).expect("write pack");
    let report = store.verify("lz4").expect("verify");
    assert!(!report.ok(), "a flipped LZ4 payload byte must fail verify");
    let msg = report.errors.join("; ");
    assert!(msg.contains("ram") && msg.contains(&format!("{:x}", 2 * CS)), "names block and offset: {msg}");
    assert!(store.verify("zstd").expect("verify").ok(), "the other snapshot is intact");
}

/// An incremental child takes its parent's references, survives the parent's deletion and a
/// GC, and reads back the parent's bytes where it did not write and its own where it did.
#[test]
fn inherited_chunks_survive_parent_deletion_and_gc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let n = 12;
    let w = store.begin("parent", vec![spec("ram", n * CS), spec("rom", CS)]).expect("begin");
    put_pipelined(&w, &jobs(n), 2, &read(3)).expect("pipeline");
    w.put_chunk("rom", 0, &vec![5u8; CS as usize]).expect("rom");
    let parent = w.commit(Vec::new()).expect("commit");

    // The child's "rom" grew: it cannot be inherited and must be written in full.
    let w = store.begin("child", vec![spec("ram", n * CS), spec("rom", 2 * CS)]).expect("begin");
    assert_eq!(w.inherit(&parent).expect("inherit"), vec!["ram".to_string()]);
    w.put_chunk("ram", 4 * CS, &vec![9u8; CS as usize]).expect("dirty chunk");
    w.put("rom", 0, &vec![6u8; 2 * CS as usize]).expect("rom");
    assert_eq!(w.stats().inherited_chunks, n);
    w.commit(Vec::new()).expect("commit child");

    store.delete("parent").expect("delete parent");
    store.gc().expect("gc");
    let mut buf = vec![0u8; CS as usize];
    for i in 0..n {
        store.read_chunk("child", "ram", i * CS, &mut buf).expect("read child");
        let want = if i == 4 { vec![9u8; CS as usize] } else { chunk(i, 3) };
        assert!(buf == want, "child chunk {i} differs");
    }
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "verify after gc");
}

/// A parent deleted (or replaced) since it was read cannot be inherited from.
#[test]
fn inherit_refuses_a_parent_that_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let w = store.begin("p", vec![spec("ram", 2 * CS)]).expect("begin");
    w.put("ram", 0, &vec![1u8; 2 * CS as usize]).expect("put");
    let parent = w.commit(Vec::new()).expect("commit");
    store.delete("p").expect("delete");
    let w = store.begin("c", vec![spec("ram", 2 * CS)]).expect("begin");
    assert!(matches!(w.inherit(&parent), Err(StoreError::ParentChanged { .. })));
    drop(w);
    let w = store.begin("p", vec![spec("ram", 2 * CS)]).expect("begin again");
    w.put("ram", 0, &vec![2u8; 2 * CS as usize]).expect("put");
    w.commit(Vec::new()).expect("commit again");
    let w = store.begin("c", vec![spec("ram", 2 * CS)]).expect("begin");
    let err = w.inherit(&parent).expect_err("a different snapshot of the same name");
    assert!(err.to_string().contains("different snapshot"), "{err}");
    assert_eq!(w.stats().inherited_chunks, 0);
}
