//! Incremental snapshots: a VM restored from, or snapshotted to, the store copies only the
//! chunks written since and takes the rest from its parent's manifest. Every snapshot of a
//! chain is compared byte for byte with the VM's memory at the pause and after restores in
//! every mode, including after its ancestors were deleted and GC ran; zero chunks read back as
//! zeros; a damaged chunk shared by parent and child is reported for both.

mod common;

use common::ram::assert_blocks_match;

use common::memfill::{check_continues, wait_lines};

use std::time::{Duration, Instant};

use common::{snapvisor, start_builtin};
use hypervisor::guests::{Builtin, MemfillMode};
use hypervisor::snapshot::restore::{encode_prefetch, lazy_stats, PREFETCH_ATTACHMENT};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions, SaveReport};
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};
use storage::{ChunkRef, Store};

const CS: u64 = 64 * 1024;

/// `len` bytes from a xorshift generator seeded with `seed` (never all zero).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

fn paused() -> SaveOptions {
    SaveOptions { stay_paused: true, ..Default::default() }
}

fn assert_incremental(r: &SaveReport, parent: &str) {
    assert!(r.incremental, "'{}' should be incremental on '{parent}': {:?}", r.name, r.full_reason);
    assert_eq!(r.parent.as_deref(), Some(parent));
}

/// vCPU writes (KVM's dirty log): a memfill guest rewriting its memory is snapshotted full,
/// then twice incrementally; each snapshot equals the paused VM's memory. After the full
/// snapshot and the first incremental are deleted and GC ran, the last restores eagerly and
/// lazily, equals the store's bytes, and the guest carries on with its pattern intact.
#[test]
fn memfill_incremental_chain_is_byte_exact_and_restores_after_its_parents_are_collected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    let (mem, seed) = (64, 5);
    let (mut vm, out) = start_builtin(
        Builtin::Memfill,
        mem,
        BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    wait_lines(&out, 1, Duration::from_secs(60));
    let full = snapshot::save(&vm, &store, "full", &paused(), &|_| {}).expect("full snapshot");
    assert!(!full.incremental, "{full:?}");
    assert!(full.store.zero_chunks > 0, "the guest's untouched low memory is zero chunks: {:?}", full.store);
    assert_blocks_match(&vm, &store, "full", "full snapshot");
    vm.resume();
    std::thread::sleep(Duration::from_millis(20));
    let inc1 = snapshot::save(&vm, &store, "inc1", &paused(), &|_| {}).expect("incremental 1");
    assert_incremental(&inc1, "full");
    assert_blocks_match(&vm, &store, "inc1", "first incremental");
    vm.resume();
    std::thread::sleep(Duration::from_millis(35));
    let inc2 = snapshot::save(&vm, &store, "inc2", &paused(), &|_| {}).expect("incremental 2");
    assert_incremental(&inc2, "inc1");
    assert_blocks_match(&vm, &store, "inc2", "second incremental");
    eprintln!(
        "copied: full {} MiB, inc1 {} MiB, inc2 {} MiB",
        full.bytes_copied >> 20,
        inc1.bytes_copied >> 20,
        inc2.bytes_copied >> 20
    );
    let before = out.text();
    vm.stop("snapshots taken");

    store.delete("full").expect("delete full");
    store.delete("inc1").expect("delete inc1");
    store.gc().expect("gc");
    assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()), "store intact after gc");
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let out2 = SharedOutput::default();
        let (mut vm2, _) =
            snapshot::restore(&store, "inc2", RestoreOptions::new(mode, Box::new(out2.clone()))).expect("restore");
        assert_blocks_match(&vm2, &store, "inc2", &format!("{mode:?} restore of inc2"));
        vm2.start().expect("start");
        let after = wait_lines(&out2, 2, Duration::from_secs(60));
        vm2.stop("test done");
        check_continues(&before, &after, seed, mem);
    }
}

/// Device writes (the RAM blocks' dirty bitmaps) on a restored VM: the restore is the parent.
/// The child copies exactly the chunks written, records a chunk overwritten with zeros as a
/// zero chunk, and a grandchild chains on; after both ancestors are deleted and collected, the
/// grandchild restores byte-exact in every mode, zero chunks as zeros.
#[test]
fn restored_vm_snapshots_incrementally_and_the_chain_survives_deleting_its_ancestors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    let cfg = VmConfig::new(
        16,
        1,
        BootSource::Builtin { guest: Builtin::Hello, params: BuiltinParams::default() },
        Box::new(SharedOutput::default()),
    );
    let vm = Vm::new(cfg).expect("vm");
    let mem = vm.ram().device_memory();
    mem.write(0x20_0000, &noise(1 << 20, 1)).expect("write base data");
    let base = snapshot::save(&vm, &store, "base", &SaveOptions::default(), &|_| {}).expect("base");
    assert!(!base.incremental && base.full_reason.is_some(), "{base:?}");
    drop(vm);

    let (vm, _) = snapshot::restore(
        &store,
        "base",
        RestoreOptions {
            track_dirty: true,
            ..RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default()))
        },
    )
    .expect("restore base");
    let mem = vm.ram().device_memory();
    mem.write(0x21_0000, &noise(CS as usize, 2)).expect("rewrite a data chunk");
    mem.write(0x22_0000, &vec![0u8; CS as usize]).expect("zero a data chunk");
    mem.write(0x40_0000, &noise(100, 3)).expect("write into a zero chunk");
    let child = snapshot::save(&vm, &store, "child", &SaveOptions::default(), &|_| {}).expect("child");
    assert_incremental(&child, "base");
    assert_eq!(child.bytes_copied, 3 * CS, "exactly the three chunks written: {child:?}");
    assert_eq!(child.store.bytes_hashed, 2 * CS, "the zeroed chunk is not hashed: {:?}", child.store);
    assert_blocks_match(&vm, &store, "child", "child");
    let m = store.manifest("child").expect("manifest");
    assert_eq!(m.block("pc.ram").expect("pc.ram").chunks[0x22], ChunkRef::Zero);

    mem.write(0x20_0000, &vec![0u8; CS as usize]).expect("zero another chunk");
    mem.write(0x80_0000, &noise(CS as usize, 4)).expect("write another chunk");
    let grandchild = snapshot::save(&vm, &store, "grandchild", &SaveOptions::default(), &|_| {}).expect("grandchild");
    assert_incremental(&grandchild, "child");
    assert_eq!(grandchild.bytes_copied, 2 * CS, "{grandchild:?}");
    assert_blocks_match(&vm, &store, "grandchild", "grandchild");

    // A failed snapshot (the name is taken) consumed the dirty records of this write: the next
    // snapshot must be full, and hold the write.
    mem.write(0x90_0000, &noise(CS as usize, 5)).expect("write before a failed snapshot");
    snapshot::save(&vm, &store, "child", &SaveOptions::default(), &|_| {}).expect_err("the name is taken");
    let after_failure = snapshot::save(&vm, &store, "after-failure", &SaveOptions::default(), &|_| {}).expect("save");
    assert!(!after_failure.incremental, "after a failed snapshot: {after_failure:?}");
    assert_blocks_match(&vm, &store, "after-failure", "snapshot after a failed one");
    drop(vm);

    store.delete("base").expect("delete base");
    store.delete("child").expect("delete child");
    let gc = store.gc().expect("gc");
    assert!(gc.chunks_removed > 0, "the ancestors' own chunks are collected: {gc:?}");
    assert!(store.verify("grandchild").expect("verify").ok());
    let prefetch = vec![("pc.ram".to_string(), 0x20_0000), ("pc.ram".to_string(), 0x22_0000)];
    store.put_attachment("grandchild", PREFETCH_ATTACHMENT, &encode_prefetch(&prefetch)).expect("attachment");
    for mode in [RestoreMode::Eager, RestoreMode::Lazy, RestoreMode::LazyPrefetch] {
        let mut opts = RestoreOptions::new(mode, Box::new(SharedOutput::default()));
        opts.background_fill = false;
        opts.cache = None;
        let (vm2, _) = snapshot::restore(&store, "grandchild", opts).expect("restore grandchild");
        if mode == RestoreMode::LazyPrefetch {
            let deadline = Instant::now() + Duration::from_secs(20);
            while lazy_stats(&vm2).expect("lazy").chunks_prefetched < prefetch.len() as u64 {
                assert!(Instant::now() < deadline, "prefetch never finished: {:?}", lazy_stats(&vm2));
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let block = vm2.ram().block();
        let mut buf = vec![0xffu8; CS as usize];
        for zero in [0x20_0000u64, 0x22_0000] {
            block.read(zero, &mut buf).expect("read");
            assert!(buf.iter().all(|b| *b == 0), "{mode:?}: zero chunk at {zero:#x} is not zero");
        }
        block.read(0x21_0000, &mut buf).expect("read");
        assert!(buf == noise(CS as usize, 2), "{mode:?}: the child's chunk");
        block.read(0x23_0000, &mut buf).expect("read");
        assert!(buf[..] == noise(1 << 20, 1)[0x3_0000..0x4_0000], "{mode:?}: the base's chunk");
        assert_blocks_match(&vm2, &store, "grandchild", &format!("{mode:?} restore"));
        if let Some(s) = vm2.page_server() {
            assert_eq!(s.error(), None, "{mode:?}");
        }
    }
}

/// A chunk shared by reference between a parent and its incremental child, damaged on disk,
/// is reported by `store verify` for both snapshots.
#[test]
fn a_damaged_chunk_shared_by_parent_and_child_is_reported_for_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let store = Store::open(&path).expect("store");
    let vm = Vm::new(VmConfig::new(
        16,
        1,
        BootSource::Builtin { guest: Builtin::Hello, params: BuiltinParams::default() },
        Box::new(SharedOutput::default()),
    ))
    .expect("vm");
    vm.ram().device_memory().write(0x30_0000, &noise(4 * CS as usize, 7)).expect("write");
    snapshot::save(&vm, &store, "parent-snap", &SaveOptions::default(), &|_| {}).expect("parent");
    vm.ram().device_memory().write(0x50_0000, &noise(CS as usize, 8)).expect("write");
    let child = snapshot::save(&vm, &store, "child-snap", &SaveOptions::default(), &|_| {}).expect("child");
    assert_incremental(&child, "parent-snap");
    drop(vm);
    let shared = store.manifest("child-snap").expect("manifest").block("pc.ram").expect("pc.ram").chunks[0x31];
    assert_eq!(store.manifest("parent-snap").expect("manifest").block("pc.ram").expect("pc.ram").chunks[0x31], shared);
    let ChunkRef::Stored(hash) = shared else { panic!("chunk 0x31 holds data") };
    let loc = store.debug_chunk_location(&hash).expect("index").expect("indexed");
    let pack = store.debug_pack_path(loc.pack);
    drop(store);
    let mut bytes = std::fs::read(&pack).expect("read pack");
    bytes[(loc.offset + u64::from(loc.len) / 2) as usize] ^= 0xff;
    std::fs::write(&pack, bytes).expect("write pack");

    let d = path.to_str().expect("utf-8");
    let out = snapvisor(&["store", "verify", "--store", d]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "verify must fail: {text}");
    let store = Store::open(&path).expect("reopen");
    for name in ["parent-snap", "child-snap"] {
        let r = store.verify(name).expect("verify");
        assert!(!r.ok() && r.errors.iter().any(|e| e.contains("0x310000")), "{name}: {r:?}");
        assert!(text.contains(name), "`store verify` names {name}: {text}");
    }
}

/// A restore without `track_dirty` (the default) does not start tracking: the restored VM's
/// first snapshot is full (and byte-exact), and from there on its snapshots are incremental.
#[test]
fn a_default_restore_snapshots_full_first_then_incrementally() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    let cfg = VmConfig::new(
        16,
        1,
        BootSource::Builtin { guest: Builtin::Hello, params: BuiltinParams::default() },
        Box::new(SharedOutput::default()),
    );
    let vm = Vm::new(cfg).expect("vm");
    vm.ram().device_memory().write(0x20_0000, &noise(1 << 20, 7)).expect("write base data");
    snapshot::save(&vm, &store, "base", &SaveOptions::default(), &|_| {}).expect("base");
    drop(vm);

    let (vm, _) =
        snapshot::restore(&store, "base", RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default())))
            .expect("restore base");
    let mem = vm.ram().device_memory();
    mem.write(0x21_0000, &noise(CS as usize, 8)).expect("write after the restore");
    let first = snapshot::save(&vm, &store, "first", &SaveOptions::default(), &|_| {}).expect("first");
    assert!(!first.incremental && first.full_reason.is_some(), "untracked restore, first snapshot full: {first:?}");
    assert_blocks_match(&vm, &store, "first", "first snapshot after an untracked restore");
    mem.write(0x30_0000, &noise(CS as usize, 9)).expect("write after the first snapshot");
    let second = snapshot::save(&vm, &store, "second", &SaveOptions::default(), &|_| {}).expect("second");
    assert_incremental(&second, "first");
    assert_eq!(second.bytes_copied, CS, "{second:?}");
    assert_blocks_match(&vm, &store, "second", "second snapshot");
}
