//! Chunk sizes other than 64 KiB (hostile3): a store opened with `StoreOptions::chunk_size`
//! 4 KiB, 16 KiB, 1 MiB, 2 MiB or 16 MiB takes full, background and incremental snapshots of a
//! running `memfill` guest, and every restore mode (eager, lazy, lazy with prefetch after and
//! before the first instruction, clones on a shared base) gives back the memory of the pause
//! byte for byte, compared against a copy of the source's RAM taken while it stayed paused
//! (not against the store, which could agree with itself). Odd sizes are refused naming
//! `chunk_size`; a store reopened with another chunk size reads its old snapshots with their
//! own and takes full, not incremental, snapshots on them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ram::{assert_same_ram, ram_of, Ram};
use hypervisor::guests::Builtin;
use hypervisor::snapshot::restore::{encode_prefetch, PREFETCH_ATTACHMENT};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveHooks, SaveMode, SaveOptions};
use hypervisor::vm::{BuiltinParams, SharedOutput, Vm};
use storage::{Store, StoreOptions};

const MEM_MIB: u64 = 16;

fn opts(cs: u32) -> StoreOptions {
    StoreOptions { chunk_size: cs, ..Default::default() }
}

/// Snapshots `vm` as `name` in `mode` and returns its RAM at the pause: stop-and-copy stays
/// paused to copy it; a background snapshot copies it in its pause (hook), the guest then
/// writing on while the snapshot copies (the saver waits for its first protected write).
fn snap(vm: &Vm, store: &Store, name: &str, mode: SaveMode, incremental: bool) -> (Ram, snapshot::SaveReport) {
    let seen: Arc<Mutex<Option<Ram>>> = Arc::default();
    let s = seen.clone();
    let hooks = SaveHooks {
        after_protect: Some(Arc::new(move |vm: &Vm| *s.lock().expect("lock") = Some(ram_of(vm)))),
        copy_after_first_fault: true,
        ..SaveHooks::NONE
    };
    let stay_paused = mode == SaveMode::Stop;
    let so = SaveOptions { mode, stay_paused, incremental, hooks, ..Default::default() };
    let report = snapshot::save(vm, store, name, &so, &|_| {}).unwrap_or_else(|e| panic!("snapshot {name}: {e}"));
    let ram = if stay_paused {
        let r = ram_of(vm);
        vm.resume();
        r
    } else {
        seen.lock().expect("lock").take().unwrap_or_else(|| panic!("snapshot {name}: no pause hook ran: {report:?}"))
    };
    (ram, report)
}

/// Restores `name` in every mode and compares each VM's RAM with `want`.
fn restore_all(store: &Store, name: &str, want: &Ram, what: &str) {
    for mode in [RestoreMode::Eager, RestoreMode::Lazy, RestoreMode::LazyPrefetch, RestoreMode::LazyPrefetchBefore] {
        let mut o = RestoreOptions::new(mode, Box::new(SharedOutput::default()));
        o.cache = None;
        let (vm, _) = snapshot::restore(store, name, o).unwrap_or_else(|e| panic!("{what}: restore {mode:?}: {e}"));
        // Pause the restored guest so it does not change what is compared.
        vm.pause();
        assert_same_ram(&ram_of(&vm), want, &format!("{what}: {mode:?} restore"));
        if let Some(s) = vm.page_server() {
            assert_eq!(s.error(), None, "{what}: {mode:?}");
        }
    }
    // Lazily through a chunk cache (the daemon's: 2 MiB slabs, whatever the chunk size),
    // twice: cold, then every chunk from the cache.
    let cache = migrate::lazy::ChunkCache::new(64 << 20);
    for pass in ["cold", "warm"] {
        for mode in [RestoreMode::Lazy, RestoreMode::LazyPrefetchBefore] {
            let mut o = RestoreOptions::new(mode, Box::new(SharedOutput::default()));
            o.cache = Some(cache.clone());
            let (vm, _) =
                snapshot::restore(store, name, o).unwrap_or_else(|e| panic!("{what}: {pass} cache {mode:?}: {e}"));
            assert_same_ram(&ram_of(&vm), want, &format!("{what}: {mode:?} restore, {pass} chunk cache"));
            assert_eq!(vm.page_server().and_then(|s| s.error()), None, "{what}: {pass} cache {mode:?}");
        }
    }
    let bases = migrate::lazy::BaseRegistry::new();
    let mut clones = Vec::new();
    for i in 0..2 {
        let mut o = RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default()));
        o.shared_base = Some(bases.clone());
        o.cache = Some(cache.clone());
        o.new_generation = true;
        let (vm, _) = snapshot::restore(store, name, o).unwrap_or_else(|e| panic!("{what}: clone {i}: {e}"));
        vm.pause();
        assert_same_ram(&ram_of(&vm), want, &format!("{what}: shared clone {i}"));
        clones.push(vm);
    }
    assert!(snapshot::restore::wait_resident(&clones[0], Duration::from_secs(60)), "{what}: clone resident");
    assert_same_ram(&ram_of(&clones[1]), want, &format!("{what}: shared clone 1, base complete"));
}

fn run_memfill() -> (Vm, SharedOutput) {
    let params = BuiltinParams { seed: 5, passes: 0, ..Default::default() };
    let (vm, out) = common::start_builtin(Builtin::Memfill, MEM_MIB, params);
    let t = common::memfill::wait_lines(&out, 2, Duration::from_secs(60));
    assert!(t.lines().count() >= 2, "memfill never ran two passes: {t:?}");
    (vm, out)
}

fn every_mode_at(cs: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path().join("store"), opts(cs)).expect("store");
    let (mut vm, _out) = run_memfill();
    let what = |s: &str| format!("chunk size {cs}: {s}");

    let (full, _) = snap(&vm, &store, "full", SaveMode::Stop, false);
    // A working set for the prefetching restores: a few chunks of pc.ram and its last chunk.
    let ram_len = MEM_MIB << 20;
    let list: Vec<(String, u64)> = [0, u64::from(cs), ram_len / 2, ram_len - u64::from(cs)]
        .into_iter()
        .map(|o| ("pc.ram".to_string(), o - o % u64::from(cs)))
        .collect();
    store.put_attachment("full", PREFETCH_ATTACHMENT, &encode_prefetch(&list)).expect("prefetch list");
    std::thread::sleep(Duration::from_millis(50));
    let (bg, rep) = snap(&vm, &store, "bg", SaveMode::Background, false);
    assert_eq!(rep.mode, SaveMode::Background, "{}: {:?}", what("background ran"), rep.mode_reason);
    std::thread::sleep(Duration::from_millis(50));
    let (inc, rep) = snap(&vm, &store, "inc", SaveMode::Stop, true);
    assert!(rep.incremental, "{}: {:?}", what("incremental on bg"), rep.full_reason);
    std::thread::sleep(Duration::from_millis(50));
    let (binc, rep) = snap(&vm, &store, "binc", SaveMode::Background, true);
    assert!(rep.incremental, "{}: {:?}", what("background incremental"), rep.full_reason);
    vm.stop("done");
    drop(vm);

    store.delete("bg").expect("delete the parent of inc");
    store.gc().expect("gc");
    for v in store.verify_all().expect("verify") {
        assert!(v.ok(), "{}: {v:?}", what("verify"));
    }
    restore_all(&store, "full", &full, &what("full"));
    restore_all(&store, "inc", &inc, &what("incremental"));
    restore_all(&store, "binc", &binc, &what("background incremental"));
    let _ = bg;
}

#[test]
fn snapshots_and_restores_are_byte_exact_at_4k_chunks() {
    every_mode_at(4096);
}

#[test]
fn snapshots_and_restores_are_byte_exact_at_16k_chunks() {
    every_mode_at(16 * 1024);
}

#[test]
fn snapshots_and_restores_are_byte_exact_at_1m_chunks() {
    every_mode_at(1 << 20);
}

#[test]
fn snapshots_and_restores_are_byte_exact_at_2m_chunks() {
    every_mode_at(2 << 20);
}

/// 16 MiB: a chunk as large as all of pc.ram, larger than every other block.
#[test]
fn snapshots_and_restores_are_byte_exact_at_16m_chunks() {
    every_mode_at(16 << 20);
}

#[test]
fn odd_chunk_sizes_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    for cs in [0u32, 1, 2048, 4095, 4097, 3 * 4096, 65535, 65537, 32 << 20, u32::MAX] {
        let e = Store::open_with(dir.path().join(format!("s{cs}")), opts(cs)).err();
        let e = e.unwrap_or_else(|| panic!("chunk size {cs} accepted"));
        assert!(e.to_string().contains("chunk_size"), "chunk size {cs}: {e}");
        assert!(!dir.path().join(format!("s{cs}")).exists(), "chunk size {cs}: a store was created");
    }
}

/// A store written at 16 KiB and reopened at 1 MiB: its snapshots restore with their own chunk
/// size, and a VM restored from one (tracking dirty pages) takes a full snapshot, saying why.
#[test]
fn a_store_reopened_with_another_chunk_size_reads_old_snapshots_and_snapshots_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let (mut vm, _out) = run_memfill();
    let want = {
        let store = Store::open_with(&path, opts(16 * 1024)).expect("store");
        let (want, _) = snap(&vm, &store, "small", SaveMode::Stop, false);
        want
    };
    vm.stop("done");
    drop(vm);
    let store = Store::open_with(&path, opts(1 << 20)).expect("reopen at 1 MiB");
    assert_eq!(store.manifest("small").expect("manifest").chunk_size, 16 * 1024);
    restore_all(&store, "small", &want, "16 KiB snapshot in a 1 MiB store");
    let mut o = RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default()));
    o.track_dirty = true;
    let (vm2, _) = snapshot::restore(&store, "small", o).expect("restore tracking");
    std::thread::sleep(Duration::from_millis(100));
    let (again, rep) = snap(&vm2, &store, "again", SaveMode::Stop, true);
    assert!(!rep.incremental, "incremental across chunk sizes: {rep:?}");
    assert!(rep.full_reason.as_deref().unwrap_or("").contains("chunk"), "reason names the chunk size: {rep:?}");
    drop(vm2);
    assert_eq!(store.manifest("again").expect("manifest").chunk_size, 1 << 20);
    restore_all(&store, "again", &again, "1 MiB snapshot of the restored VM");
}
