//! The prefetch modes of lazy restore on real KVM: a prefetch list from the store is untrusted
//! (bad entries are dropped, the guest still gets the snapshot's bytes), and a corrupt chunk in
//! it stops the VM with an error naming the chunk, also when the list is loaded before the
//! first instruction, where the restore itself fails instead of hanging; a damaged list (its
//! crc) is dropped with a warning, and the restore goes on without it.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::touch::touch_snapshot;
use hypervisor::control::ExitReason;
use hypervisor::snapshot::restore::{encode_prefetch, PREFETCH_ATTACHMENT};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions};
use hypervisor::vm::SharedOutput;
use storage::ChunkRef;

const MEM: u64 = 32;

fn opts(mode: RestoreMode, out: &SharedOutput) -> RestoreOptions {
    RestoreOptions { background_fill: false, cache: None, ..RestoreOptions::new(mode, Box::new(out.clone())) }
}

#[test]
fn a_hostile_prefetch_list_is_checked_in_both_prefetch_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let expect = touch_snapshot(&store, "t", MEM, 91);
    let ram_len = store.manifest("t").expect("manifest").block("pc.ram").expect("pc.ram").used_length;
    let ram = |off: u64| ("pc.ram".to_string(), off);
    // Two chunks of the working set; everything else is a repeat, not served, or past the end.
    let list = vec![
        ram(0x20_0000),
        ram(0x2a_0000),
        ram(0x20_0000),
        ram(0x20_0123),
        ("no such block".to_string(), 0),
        ram(ram_len),
        ram(u64::MAX),
    ];
    let mut bytes = encode_prefetch(&list);
    bytes.extend_from_slice(b"zz pc.ram\nnot a line\n\xff\xfe 12\n");
    store.put_attachment("t", PREFETCH_ATTACHMENT, &bytes).expect("attachment");

    for mode in [RestoreMode::LazyPrefetch, RestoreMode::LazyPrefetchBefore] {
        let out = SharedOutput::default();
        let (mut vm, report) = snapshot::restore(&store, "t", opts(mode, &out)).expect("restore");
        assert_eq!(report.prefetch_chunks, 2, "{mode:?}: the list's usable chunks, each once");
        // The guest touches its working set only after its go: let the loader finish first,
        // so the two listed chunks are loaded by it (a loaded host could otherwise let the
        // guest fault one of them first, and the count below would say nothing).
        vm.start().expect("start");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while snapshot::restore::lazy_stats(&vm).expect("lazy").chunks_prefetched < 2 {
            assert!(std::time::Instant::now() < deadline, "{mode:?}: the list was not loaded in 60 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        vm.devices().go.store(true, Ordering::Release);
        assert_eq!(vm.wait(Some(Duration::from_secs(60))), ExitReason::GuestExit { status: 0 }, "{mode:?}");
        assert_eq!(out.text(), expect, "{mode:?}");
        let s = snapshot::restore::lazy_stats(&vm).expect("lazy");
        assert_eq!(s.chunks_prefetched, 2, "{mode:?}: {s:?}");
        assert_eq!(vm.page_server().and_then(|p| p.error()), None, "{mode:?}");
    }
}

#[test]
fn a_corrupt_chunk_in_the_prefetch_list_stops_the_vm_naming_it_in_both_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    touch_snapshot(&store, "c", MEM, 91);
    let offset = 0x20_0000;
    damage_chunk(&store, "c", offset);
    let list = [0x2a_0000, 0x34_0000, offset, 0x3e_0000].map(|o| ("pc.ram".to_string(), o));
    store.put_attachment("c", PREFETCH_ATTACHMENT, &encode_prefetch(&list)).expect("attachment");

    // Before the first instruction: the restore fails with the chunk's name, and returns.
    let (tx, rx) = std::sync::mpsc::channel();
    let store2 = store.clone();
    std::thread::spawn(move || {
        let r = snapshot::restore(&store2, "c", opts(RestoreMode::LazyPrefetchBefore, &SharedOutput::default()));
        let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
    });
    let r = rx.recv_timeout(Duration::from_secs(60)).expect("the restore must return, not hang");
    let err = r.expect_err("a corrupt chunk in the working set fails the restore");
    assert!(err.contains("pc.ram") && err.contains("0x200000"), "{err}");

    // Alongside the first instructions: the VM stops with it, although the guest (never told
    // go) touches nothing.
    let out = SharedOutput::default();
    let (mut vm, _) = snapshot::restore(&store, "c", opts(RestoreMode::LazyPrefetch, &out)).expect("restore");
    vm.start().expect("start");
    let reason = vm.wait(Some(Duration::from_secs(60)));
    let ExitReason::Crash { detail } = &reason else {
        panic!("expected the VM to stop on the bad chunk, got {reason:?}")
    };
    assert!(detail.contains("pc.ram") && detail.contains("0x200000"), "{detail}");
    assert!(out.text().is_empty(), "{}", out.text());
}

/// The hash of the chunk of `pc.ram` at `offset` in snapshot `name`.
fn chunk_hash(store: &storage::Store, name: &str, offset: u64) -> storage::Hash {
    let m = store.manifest(name).expect("manifest");
    let cs = u64::from(m.chunk_size);
    let ChunkRef::Stored(hash) = m.block("pc.ram").expect("pc.ram").chunks[(offset / cs) as usize] else {
        panic!("the chunk at {offset:#x} holds data");
    };
    hash
}

/// Flips a byte in the middle of the stored value of the chunk of `pc.ram` at `offset`.
fn damage_chunk(store: &storage::Store, name: &str, offset: u64) -> storage::Hash {
    let hash = chunk_hash(store, name, offset);
    let loc = store.debug_chunk_location(&hash).expect("location").expect("indexed");
    let path = store.debug_pack_path(loc.pack);
    let mut pack = std::fs::read(&path).expect("pack");
    pack[(loc.offset + u64::from(loc.len) / 2) as usize] ^= 0xff;
    std::fs::write(&path, &pack).expect("write pack");
    hash
}

#[test]
fn a_corrupt_chunk_is_never_kept_in_the_chunk_cache_and_what_is_kept_is_the_snapshots() {
    // A default restore reads each missed chunk straight into a slot of the chunk cache and
    // publishes it only once its hash holds: the damaged chunk must never be published, for
    // this restore or the next one sharing the cache.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    touch_snapshot(&store, "k", MEM, 91);
    let (good, bad) = (0x2a_0000, 0x20_0000);
    let good_hash = chunk_hash(&store, "k", good);
    let mut expect = vec![0u8; 64 << 10];
    store.reader("k").expect("reader").read_chunk("pc.ram", good, &mut expect).expect("the good chunk");
    let bad_hash = damage_chunk(&store, "k", bad);
    let cache = migrate::lazy::ChunkCache::new(64 << 20);
    // The good chunk, loaded before the first instruction: kept, with the snapshot's bytes.
    let list = [("pc.ram".to_string(), good)];
    store.put_attachment("k", PREFETCH_ATTACHMENT, &encode_prefetch(&list)).expect("attachment");
    let out = SharedOutput::default();
    let o = RestoreOptions { cache: Some(cache.clone()), ..opts(RestoreMode::LazyPrefetchBefore, &out) };
    drop(snapshot::restore(&store, "k", o).expect("restore"));
    let kept = cache.get_shared(&good_hash.0).expect("the good chunk is kept");
    assert!(*kept == expect[..], "the kept chunk is not the snapshot's");
    drop(kept);
    // Then both: each restore stops on the bad one, which is never kept.
    let list = [good, bad].map(|o| ("pc.ram".to_string(), o));
    store.put_attachment("k", PREFETCH_ATTACHMENT, &encode_prefetch(&list)).expect("attachment");
    for round in 0..2 {
        let out = SharedOutput::default();
        let o = RestoreOptions { cache: Some(cache.clone()), ..opts(RestoreMode::LazyPrefetch, &out) };
        let (mut vm, _) = snapshot::restore(&store, "k", o).expect("restore");
        vm.start().expect("start");
        let reason = vm.wait(Some(Duration::from_secs(60)));
        let ExitReason::Crash { detail } = &reason else {
            panic!("round {round}: expected the VM to stop on the bad chunk, got {reason:?}")
        };
        assert!(detail.contains("pc.ram") && detail.contains("0x200000"), "round {round}: {detail}");
        assert!(cache.get_shared(&bad_hash.0).is_none(), "round {round}: the damaged chunk was kept");
    }
}

#[test]
fn a_damaged_prefetch_list_costs_the_head_start_not_the_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let expect = touch_snapshot(&store, "d", MEM, 91);
    let list = [0x20_0000, 0x2a_0000].map(|o| ("pc.ram".to_string(), o));
    store.put_attachment("d", PREFETCH_ATTACHMENT, &encode_prefetch(&list)).expect("attachment");
    drop(store);
    // One bit of the stored list flipped: its crc no longer holds.
    {
        let db = sled::open(dir.path()).expect("the store's sled database");
        let tree = db.open_tree("attachments").expect("attachments");
        let key = [b"d".as_slice(), &[0], PREFETCH_ATTACHMENT.as_bytes()].concat();
        let mut v = tree.get(&key).expect("get").expect("the attachment is stored").to_vec();
        let last = v.len() - 1;
        v[last] ^= 1;
        tree.insert(key, v).expect("insert");
        db.flush().expect("flush");
    }
    let store = storage::Store::open(dir.path()).expect("store");
    assert!(store.attachment("d", PREFETCH_ATTACHMENT).is_err(), "the list is damaged");
    for mode in [RestoreMode::LazyPrefetch, RestoreMode::LazyPrefetchBefore] {
        let out = SharedOutput::default();
        let (mut vm, report) = snapshot::restore(&store, "d", opts(mode, &out)).expect("restore without the list");
        assert_eq!(report.prefetch_chunks, 0, "{mode:?}: nothing prefetched");
        vm.devices().go.store(true, Ordering::Release);
        vm.start().expect("start");
        assert_eq!(vm.wait(Some(Duration::from_secs(60))), ExitReason::GuestExit { status: 0 }, "{mode:?}");
        assert_eq!(out.text(), expect, "{mode:?}: the snapshot's bytes all the same");
    }
}
