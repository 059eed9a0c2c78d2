//! Snapshot store API: round trips, dedup, zero and short chunks, attachments, delete + gc,
//! names, corruption detection.

use storage::{BlockSpec, ChunkRef, Store, StoreError, StoreOptions};

const CS: u32 = 16 * 1024;

fn opts() -> StoreOptions {
    StoreOptions { chunk_size: CS, ..Default::default() }
}

/// Deterministic bytes: mostly compressible text with some noise, zero runs where `zero`.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 4096) % 3 == 0 {
                b"guest page text "[i % 16]
            } else {
                x as u8
            }
        })
        .collect()
}

fn spec(idstr: &str, len: u64) -> BlockSpec {
    BlockSpec { idstr: idstr.into(), used_length: len, max_length: len * 2, page_size: 4096, resizeable: true }
}

fn write(store: &Store, name: &str, blocks: &[(&str, &[u8])]) -> storage::Manifest {
    let specs = blocks.iter().map(|(id, d)| spec(id, d.len() as u64)).collect();
    let w = store.begin(name, specs).expect("begin");
    for (id, d) in blocks {
        w.put(id, 0, d).expect("put");
    }
    w.commit(format!("state of {name}").into_bytes()).expect("commit")
}

fn read_block(store: &Store, name: &str, block: &str) -> Vec<u8> {
    let r = store.reader(name).expect("reader");
    let len = r.manifest().block(block).expect("block").used_length as usize;
    let mut out = vec![0xee; len];
    r.read_at(block, 0, &mut out).expect("read_at");
    out
}

#[test]
fn roundtrip_zero_short_chunks_and_dedup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), opts()).expect("open");
    let mut ram = content(1, 40 * 4096 + 4096); // 10.25 chunks: last chunk short
    ram[CS as usize..2 * CS as usize].fill(0); // one all-zero chunk
    let rom = content(2, 4096 * 3);
    let m = write(&store, "vm1", &[("pc.ram", &ram), ("/rom@etc/acpi/tables", &rom)]);
    let b = m.block("pc.ram").expect("block");
    assert_eq!(b.chunks.len(), 11);
    assert_eq!(b.chunks[1], ChunkRef::Zero);
    assert!(matches!(b.chunks[10], ChunkRef::Stored(_)));
    assert_eq!(m.state, b"state of vm1");

    assert_eq!(store.list().expect("list"), vec!["vm1".to_string()]);
    let again = store.manifest("vm1").expect("manifest");
    assert_eq!(again, m);
    assert_eq!(read_block(&store, "vm1", "pc.ram"), ram);
    assert_eq!(read_block(&store, "vm1", "/rom@etc/acpi/tables"), rom);

    // Short last chunk via read_chunk, into a larger buffer.
    let mut buf = vec![0xaa; CS as usize + 10];
    let n = store.read_chunk("vm1", "pc.ram", 10 * u64::from(CS), &mut buf).expect("read last");
    assert_eq!(n, 4096);
    assert_eq!(&buf[..n], &ram[10 * CS as usize..]);
    // Unaligned read_at crossing chunk boundaries.
    let r = store.reader("vm1").expect("reader");
    let mut mid = vec![0; 20000];
    r.read_at("pc.ram", 12345, &mut mid).expect("read_at");
    assert_eq!(&mid[..], &ram[12345..12345 + 20000]);

    // A second snapshot with the same content stores nothing new.
    let before = store.usage().expect("usage");
    let w = store.begin("vm1-clone", vec![spec("pc.ram", ram.len() as u64)]).expect("begin");
    w.put("pc.ram", 0, &ram).expect("put");
    let stats = w.stats();
    w.commit(Vec::new()).expect("commit");
    assert_eq!(stats.new_chunks, 0);
    assert_eq!(stats.zero_chunks, 1);
    assert_eq!(stats.dedup_chunks, 10);
    let after = store.usage().expect("usage");
    assert_eq!(after.chunks, before.chunks);
    assert_eq!(after.snapshots, 2);
    let v = store.verify("vm1-clone").expect("verify");
    assert!(v.ok(), "{:?}", v.errors);
    assert_eq!(v.chunks, 11);
}

#[test]
fn reopen_keeps_snapshots_and_attachments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ram = content(3, 8 * CS as usize);
    {
        let store = Store::open_with(dir.path(), opts()).expect("open");
        write(&store, "a", &[("ram", &ram)]);
        store.put_attachment("a", "prefetch", b"1,2,3").expect("attach");
        store.put_attachment("a", "prefetch", b"3,2,1").expect("replace");
        assert!(matches!(store.put_attachment("nope", "prefetch", b"x"), Err(StoreError::NotFound(_))));
    }
    let store = Store::open_with(dir.path(), opts()).expect("reopen");
    // One process-wide handle per store: a second open is refused, naming the directory.
    let second = Store::open_with(dir.path(), opts()).expect_err("second open");
    assert!(second.to_string().contains(&dir.path().display().to_string()), "{second}");
    assert_eq!(read_block(&store, "a", "ram"), ram);
    assert_eq!(store.attachment("a", "prefetch").expect("get").as_deref(), Some(&b"3,2,1"[..]));
    assert_eq!(store.attachment("a", "other").expect("get"), None);
    assert_eq!(store.attachments("a").expect("list"), vec!["prefetch".to_string()]);
    // Writes after reopen go to a new pack and dedup against the old one.
    write(&store, "b", &[("ram", &ram), ("extra", &content(4, CS as usize))]);
    assert_eq!(read_block(&store, "b", "extra"), content(4, CS as usize));
}

#[test]
fn delete_and_gc_reclaim_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), opts()).expect("open");
    let shared = content(5, 64 * CS as usize);
    let own = content(6, 64 * CS as usize);
    write(&store, "keep", &[("ram", &shared)]);
    write(&store, "drop", &[("ram", &shared), ("more", &own)]);
    store.put_attachment("drop", "prefetch", b"order").expect("attach");
    // An abandoned writer leaves chunks behind.
    let w = store.begin("abandoned", vec![spec("ram", own.len() as u64)]).expect("begin");
    w.put("ram", 0, &content(7, own.len())).expect("put");
    drop(w);
    let before = store.usage().expect("usage");
    store.delete("drop").expect("delete");
    assert!(matches!(store.delete("drop"), Err(StoreError::NotFound(_))));
    assert_eq!(store.attachment("drop", "prefetch").expect("get"), None);
    let report = store.gc().expect("gc");
    assert_eq!(report.chunks_removed, 128, "{report:?}");
    assert_eq!(report.chunks_kept, 64);
    let after = store.usage().expect("usage");
    assert!(after.disk_bytes < before.disk_bytes, "{before:?} -> {after:?}");
    assert!(report.disk_bytes_freed > 0);
    assert_eq!(read_block(&store, "keep", "ram"), shared);
    assert!(store.verify("keep").expect("verify").ok());
    // GC twice is a no-op.
    assert_eq!(store.gc().expect("gc").chunks_removed, 0);
}

#[test]
fn open_writer_chunks_survive_gc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), opts()).expect("open");
    let data = content(8, 4 * CS as usize);
    let w = store.begin("inflight", vec![spec("ram", data.len() as u64)]).expect("begin");
    w.put("ram", 0, &data).expect("put");
    assert_eq!(store.gc().expect("gc").chunks_removed, 0);
    w.commit(Vec::new()).expect("commit");
    assert_eq!(read_block(&store, "inflight", "ram"), data);
}

#[test]
fn names_and_writer_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), opts()).expect("open");
    for bad in ["", ".x", "a/b", "white space", &"n".repeat(65)] {
        let e = store.begin(bad, vec![]).expect_err(bad).to_string();
        assert!(e.contains(&format!("{bad:?}")), "{e}");
    }
    let w = store.begin("s", vec![spec("ram", 3 * u64::from(CS))]).expect("begin");
    assert!(matches!(store.begin("s", vec![]), Err(StoreError::Busy(_))));
    let e = w.put_chunk("ram", 100, &[1; 10]).expect_err("unaligned").to_string();
    assert!(e.contains("'s'") && e.contains("'ram'") && e.contains("0x64"), "{e}");
    let e = w.put_chunk("ram", 0, &[1; 10]).expect_err("short").to_string();
    assert!(e.contains("10 bytes"), "{e}");
    assert!(matches!(w.put_chunk("rom", 0, &[1; 10]), Err(StoreError::NoSuchBlock { .. })));
    w.put_chunk("ram", 0, &vec![1; CS as usize]).expect("put");
    let e = w.commit(Vec::new()).expect_err("missing").to_string();
    assert!(e.contains("0x4000") && e.contains("never written"), "{e}");
    assert!(store.list().expect("list").is_empty());
    write(&store, "s", &[("ram", &content(9, CS as usize))]);
    assert!(matches!(store.begin("s", vec![]), Err(StoreError::Exists(_))));
    let e = Store::open_with(dir.path().join("x"), StoreOptions { chunk_size: 5000, ..opts() });
    assert!(e.expect_err("bad chunk size").to_string().contains("5000"));
}

#[test]
fn corrupt_chunk_and_manifest_are_errors_not_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), opts()).expect("open");
    let ram = content(10, 4 * CS as usize);
    let m = write(&store, "vm", &[("pc.ram", &ram)]);
    let ChunkRef::Stored(hash) = m.block("pc.ram").expect("block").chunks[2] else {
        panic!("chunk 2 should be stored");
    };
    let loc = store.debug_chunk_location(&hash).expect("loc").expect("indexed");
    let path = store.debug_pack_path(loc.pack);
    let mut pack = std::fs::read(&path).expect("read pack");
    pack[(loc.offset + u64::from(loc.len) - 3) as usize] ^= 0x5a;
    std::fs::write(&path, &pack).expect("write pack");

    let mut buf = vec![0x77; CS as usize];
    let e = store.read_chunk("vm", "pc.ram", 2 * u64::from(CS), &mut buf).expect_err("corrupt");
    let msg = e.to_string();
    assert!(msg.contains("'vm'") && msg.contains("'pc.ram'") && msg.contains("0x8000"), "{msg}");
    assert!(buf.iter().all(|b| *b == 0), "no wrong bytes handed out");
    let v = store.verify("vm").expect("verify");
    assert_eq!(v.errors.len(), 1, "{:?}", v.errors);
    assert!(v.errors[0].contains("0x8000"));
    // Other chunks still read fine.
    store.read_chunk("vm", "pc.ram", 0, &mut buf).expect("chunk 0");
    assert_eq!(&buf[..], &ram[..CS as usize]);

    let raw = store.debug_raw_manifest("vm").expect("raw").expect("present");
    let mut bad = raw.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    store.debug_put_raw_manifest("vm", &bad).expect("put raw");
    let e = store.manifest("vm").expect_err("crc").to_string();
    assert!(e.contains("'vm'") && e.contains("crc32"), "{e}");
    assert!(store.gc().is_err(), "gc must refuse to sweep with an unreadable manifest");
    store.debug_put_raw_manifest("vm", &raw[..10]).expect("put raw");
    assert!(store.manifest("vm").expect_err("short").to_string().contains("shorter"));
    let mut wrong_version = raw.clone();
    wrong_version[4] = 9;
    store.debug_put_raw_manifest("vm", &wrong_version).expect("put raw");
    assert!(store.manifest("vm").expect_err("version").to_string().contains("version 9"));
}
