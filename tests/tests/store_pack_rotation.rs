//! Pack rotation at the size limit, with the limit set small (`StoreOptions::pack_max`) so
//! that a few MiB cross many pack boundaries: reads across packs, GC deleting packs with
//! nothing live and punching the rest, and reopening (which starts a new pack, never
//! appending to an old one) all keep every snapshot bit-exact.

use storage::{BlockSpec, ChunkRef, Store, StoreOptions};

const CS: u32 = 16 * 1024;
/// Ten chunk values a pack, about (random chunks do not compress).
const PACK_MAX: u64 = 160 * 1024;

fn opts() -> StoreOptions {
    StoreOptions { chunk_size: CS, pack_max: PACK_MAX, ..Default::default() }
}

/// `chunks` chunks of incompressible bytes; chunk `i` depends on `seed + i` only, so two
/// contents with overlapping seeds share chunks.
fn content(seed: u64, chunks: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((chunks * u64::from(CS)) as usize);
    for i in 0..chunks {
        let mut x = (seed + i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        out.extend((0..CS).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
    }
    out
}

fn write(store: &Store, name: &str, data: &[u8]) {
    let spec = BlockSpec {
        idstr: "ram".into(),
        used_length: data.len() as u64,
        max_length: data.len() as u64,
        page_size: 4096,
        resizeable: false,
    };
    let w = store.begin(name, vec![spec]).expect("begin");
    w.put("ram", 0, data).expect("put");
    w.commit(Vec::new()).expect("commit");
}

/// Reads all of `name` in one `read_at` that crosses every chunk and pack boundary.
fn check(store: &Store, name: &str, want: &[u8]) {
    let mut buf = vec![0u8; want.len()];
    store.reader(name).expect("reader").read_at("ram", 0, &mut buf).expect("read");
    assert!(buf == want, "{name} read back different bytes");
    // And at an offset that starts mid-chunk, across the boundary after it.
    let mut part = vec![0u8; CS as usize];
    let off = u64::from(CS) / 2 + u64::from(CS) * 9;
    store.reader(name).expect("reader").read_at("ram", off, &mut part).expect("read_at");
    assert!(part[..] == want[off as usize..off as usize + CS as usize], "{name} at {off:#x}");
}

fn pack_ids(store: &Store) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(store.path().join("packs"))
        .expect("packs dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".pack")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

/// Packs holding the stored chunks of `name`.
fn packs_of(store: &Store, name: &str) -> std::collections::BTreeSet<u32> {
    let m = store.manifest(name).expect("manifest");
    m.blocks[0]
        .chunks
        .iter()
        .filter_map(|c| match c {
            ChunkRef::Stored(h) => Some(store.debug_chunk_location(h).expect("index").expect("indexed").pack),
            ChunkRef::Zero => None,
        })
        .collect()
}

#[test]
fn packs_rotate_at_the_limit_and_reads_gc_and_reopen_work_across_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = content(0, 64);
    let b = content(32, 64); // shares chunks 32..64 of `a`
    {
        let store = Store::open_with(dir.path(), opts()).expect("open");
        write(&store, "a", &a);
        let ids = pack_ids(&store);
        assert!(ids.len() >= 6, "64 incompressible 16 KiB chunks under a 160 KiB limit: packs {ids:?}");
        for id in &ids {
            let len = std::fs::metadata(store.debug_pack_path(*id)).expect("pack").len();
            assert!(len <= PACK_MAX, "pack {id} is {len} bytes, over the limit");
        }
        assert!(packs_of(&store, "a").len() >= 6);
        check(&store, "a", &a);
        write(&store, "b", &b);
        check(&store, "b", &b);

        // Deleting `a` leaves its first half dead: those packs go entirely, the rest stay.
        let dead_packs: Vec<u32> = packs_of(&store, "a").difference(&packs_of(&store, "b")).copied().collect();
        assert!(!dead_packs.is_empty());
        store.delete("a").expect("delete");
        let report = store.gc().expect("gc");
        assert_eq!(report.chunks_removed, 32, "{report:?}");
        assert!(report.disk_bytes_freed >= 24 * u64::from(CS), "{report:?}");
        let after = pack_ids(&store);
        for id in &dead_packs {
            assert!(!after.contains(id), "pack {id} held only dead chunks but is still there: {after:?}");
        }
        check(&store, "b", &b);
    }

    // Reopened: old packs are read, new chunks go to packs after the last one.
    let c = content(1000, 40);
    {
        let store = Store::open_with(dir.path(), opts()).expect("reopen");
        check(&store, "b", &b);
        let last = *pack_ids(&store).last().expect("packs");
        write(&store, "c", &c);
        let new = packs_of(&store, "c");
        assert!(new.iter().all(|p| *p > last), "new chunks went into old packs: {new:?}, last was {last}");
        assert!(new.len() >= 4, "{new:?}");
        check(&store, "c", &c);
        store.delete("b").expect("delete");
        assert_eq!(store.gc().expect("gc").chunks_removed, 64);
        check(&store, "c", &c);
        for r in store.verify_all().expect("verify") {
            assert!(r.ok(), "{}: {:?}", r.snapshot, r.errors);
        }
    }

    // Reopened with the default limit: the small packs read the same.
    let store = Store::open(dir.path()).expect("reopen with defaults");
    check(&store, "c", &c);
    assert_eq!(store.list().expect("list"), vec!["c".to_string()]);
    let e = Store::open_with(dir.path().join("x"), StoreOptions { pack_max: 0, ..opts() }).expect_err("pack_max 0");
    assert!(e.to_string().contains("pack_max"), "{e}");
}
