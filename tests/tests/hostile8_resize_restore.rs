//! Hostile 8: restores into destinations whose resizeable blocks (a fw_cfg file) and fixed
//! blocks (pc.ram) differ from the snapshot's, in every restore mode; snapshots of such VMs
//! (stop-and-copy, background, incremental over a parent of another length, after a resize
//! at run time), and the chain once its ancestors are deleted and collected.

mod common;
use common::noise;
use common::ram::assert_blocks_match;

use std::sync::Arc;

use hypervisor::guests::Builtin;
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveMode, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, FwCfgFile, SharedOutput, Vm, VmConfig};
use migrate::lazy::BaseRegistry;

const FILE: &str = "opt/snapvisor/blob";
const BLOCK: &str = "/rom@opt/snapvisor/blob";
/// The snapshot's file: not page-aligned, its block reserved at 64 KiB.
const SNAP_LEN: usize = 40_000;

/// An idle 8 MiB VM with a fw_cfg file of `len` noise bytes, snapshotted as `name`.
fn snapshot_with_file(store: &storage::Store, name: &str, len: usize) {
    let mut cfg = VmConfig::new(
        8,
        1,
        BootSource::Builtin { guest: Builtin::Idle, params: BuiltinParams::default() },
        Box::new(SharedOutput::default()),
    );
    cfg.fw_cfg_files = vec![FwCfgFile { name: FILE.into(), data: noise(len, 1) }];
    let vm = Vm::new(cfg).expect("vm");
    vm.registry().get("pc.ram").expect("pc.ram").write(0x10_0000, &noise(0x20_0000, 2)).expect("fill pc.ram");
    snapshot::save(&vm, store, name, &SaveOptions { mode: SaveMode::Stop, ..SaveOptions::default() }, &|_| {})
        .expect("snapshot");
}

/// Restore options for `mode` ("shared clone": lazy over a shared base) with the destination's
/// own file of `file_len` bytes (different from the snapshot's everywhere) when given.
fn opts(mode: &str, file_len: Option<usize>) -> RestoreOptions {
    let m = match mode {
        "eager" => RestoreMode::Eager,
        "prefetch" => RestoreMode::LazyPrefetch,
        "prefetch-before" => RestoreMode::LazyPrefetchBefore,
        _ => RestoreMode::Lazy,
    };
    let mut o = RestoreOptions::new(m, Box::new(SharedOutput::default()));
    if mode == "shared clone" {
        o.shared_base = Some(BaseRegistry::new());
    }
    o.fw_cfg_files =
        file_len.map(|len| vec![FwCfgFile { name: FILE.into(), data: noise(len, 3).iter().map(|x| x | 1).collect() }]);
    o
}

const MODES: [&str; 5] = ["eager", "lazy", "prefetch", "prefetch-before", "shared clone"];

/// The file as the guest's fw_cfg directory shows it, and its block's unaligned length.
fn file_sizes(vm: &Vm) -> (u64, u64) {
    let dir = vm.devices().fw_cfg.lock().expect("fw_cfg").file(FILE).expect("the file is listed").1;
    (dir, vm.registry().get(BLOCK).expect("block").unaligned_length())
}

/// `vm` holds snapshot `name`'s bytes and its file is `len` bytes long, to the guest too.
fn assert_restored(vm: &Vm, store: &storage::Store, name: &str, len: usize, what: &str) {
    assert_blocks_match(vm, store, name, what);
    assert_eq!(file_sizes(vm), (len as u64, len as u64), "{what}: the file's size is the snapshot's");
}

#[test]
fn destinations_with_other_file_sizes_are_resized_to_the_snapshot_in_every_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(storage::Store::open(dir.path()).expect("store"));
    snapshot_with_file(&store, "s", SNAP_LEN);
    // Smaller; unaligned within the same pages; larger; larger than the snapshot's maximum.
    for dest in [3_000, SNAP_LEN + 500, 100_000, 300_000] {
        for mode in MODES {
            let what = format!("{mode} into a {dest}-byte file");
            let (vm, _) =
                snapshot::restore(&store, "s", opts(mode, Some(dest))).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_restored(&vm, &store, "s", SNAP_LEN, &what);
        }
    }
}

#[test]
fn blocks_that_do_not_fit_are_refused_naming_block_and_sizes_and_leave_no_pin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(storage::Store::open(dir.path()).expect("store"));
    snapshot_with_file(&store, "big", 100_000);
    for mode in MODES {
        // The destination's file reserves 64 KiB; the snapshot's uses 0x19000.
        let e = snapshot::restore(&store, "big", opts(mode, Some(3_000))).err().expect("refused").to_string();
        assert!(e.contains(BLOCK) && e.contains("0x19000") && e.contains("0x10000"), "{mode}: {e}");
        // pc.ram is fixed: 8 MiB in the snapshot.
        let mut o = opts(mode, None);
        o.mem_mib = Some(16);
        let e = snapshot::restore(&store, "big", o).err().expect("refused").to_string();
        assert!(e.contains("pc.ram") && e.contains("0x800000") && e.contains("0x1000000"), "{mode}: {e}");
        assert!(store.pin_holders("big").is_empty(), "{mode}: a refused restore left a pin");
    }
}

#[test]
fn snapshots_of_a_resized_restore_and_a_chain_across_a_resize_restore_exactly_after_gc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(storage::Store::open(dir.path()).expect("store"));
    snapshot_with_file(&store, "s", SNAP_LEN);

    // A VM restored into a larger file (resized down to the snapshot's), snapshotted whole,
    // in the background, and incrementally over "s".
    let stop = SaveOptions { mode: SaveMode::Stop, incremental: false, ..SaveOptions::default() };
    let bg = SaveOptions { mode: SaveMode::Background, incremental: false, ..SaveOptions::default() };
    let inc = SaveOptions { mode: SaveMode::Stop, incremental: true, ..SaveOptions::default() };
    let (vm, _) = snapshot::restore(&store, "s", opts("eager", Some(300_000))).expect("restore");
    snapshot::save(&vm, &store, "full", &stop, &|_| {}).expect("stop-and-copy");
    snapshot::save(&vm, &store, "bg", &bg, &|_| {}).expect("background");
    let r = snapshot::save(&vm, &store, "inc", &inc, &|_| {}).expect("incremental");
    assert!(r.incremental, "{r:?}");

    // At run time the file grows past the parent's length (within the 512 KiB the
    // destination reserved): the next incremental snapshot's parent has the other length.
    vm.registry().resize(BLOCK, 200_000).expect("grow");
    vm.registry().get(BLOCK).expect("block").write(0, &noise(200_000, 4)).expect("write");
    let r = snapshot::save(&vm, &store, "grown", &inc, &|_| {}).expect("incremental after a resize");
    assert_eq!(r.parent.as_deref(), Some("inc"), "{r:?}");
    // And shrinks back below the snapshot's length; only pc.ram changes after that.
    vm.registry().resize(BLOCK, 5_000).expect("shrink");
    vm.registry().get(BLOCK).expect("block").write(0, &noise(5_000, 5)).expect("write");
    snapshot::save(&vm, &store, "shrunk", &inc, &|_| {}).expect("incremental after a shrink");
    vm.registry().get("pc.ram").expect("pc.ram").write(0x40_0000, &noise(0x1000, 6)).expect("write");
    snapshot::save(&vm, &store, "last", &inc, &|_| {}).expect("incremental");
    drop(vm);

    let sizes = [
        ("full", SNAP_LEN),
        ("bg", SNAP_LEN),
        ("inc", SNAP_LEN),
        ("grown", 200_000),
        ("shrunk", 5_000),
        ("last", 5_000),
    ];
    let check_all = |names: &[(&str, usize)], when: &str| {
        for (name, len) in names {
            for mode in MODES {
                let what = format!("{name} {mode} {when}");
                let (vm, _) =
                    snapshot::restore(&store, name, opts(mode, None)).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_restored(&vm, &store, name, *len, &what);
            }
        }
    };
    check_all(&sizes, "with every ancestor");
    for gone in ["s", "full", "bg", "inc", "grown"] {
        store.delete(gone).expect("delete");
    }
    store.gc().expect("gc");
    check_all(&sizes[4..], "after its ancestors were collected");
    // The bytes of the grown file, from a snapshot whose parent is gone, survive too: restore
    // "shrunk"'s child into a 200 000-byte destination and compare with "last" once more.
    let (vm, _) = snapshot::restore(&store, "last", opts("lazy", Some(200_000))).expect("restore");
    assert_restored(&vm, &store, "last", 5_000, "last into a 200 000-byte file");
}

/// A restore refused before memory (a block that does not fit) or after it (a device's state
/// that does not decode, the blocks already resized and the page server or shared base
/// started) leaves nothing behind: no pin, no live base, no base memfd, mapped or open.
#[test]
fn a_restore_refused_before_or_after_its_memory_leaves_no_pin_base_or_memfd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(storage::Store::open(dir.path()).expect("store"));
    snapshot_with_file(&store, "s", SNAP_LEN);
    let good = store.manifest("s").expect("manifest");
    let mut bad = good.clone();
    bad.name = "bad".into();
    let mut state = migrate::snapshot::format::VmSnapshot::decode(&bad.state).expect("state");
    let fragment = state.fragments.keys().find(|k| k.starts_with("dev/")).expect("a device fragment").clone();
    state.fragments.insert(fragment.clone(), migrate::snapshot::format::serde_bytes_compat::Bytes(vec![0xff; 7]));
    bad.state = state.encode().expect("encode state");
    store.debug_put_raw_manifest("bad", &bad.encode().expect("encode")).expect("put");

    for mode in MODES {
        let bases = BaseRegistry::new();
        let with_bases = |mut o: RestoreOptions| {
            if o.shared_base.is_some() {
                o.shared_base = Some(bases.clone());
            }
            o
        };
        // Before memory: a pc.ram of another size.
        let mut o = with_bases(opts(mode, Some(300_000)));
        o.mem_mib = Some(16);
        let e = snapshot::restore(&store, "s", o).err().expect("refused").to_string();
        assert!(e.contains("pc.ram"), "{mode}: {e}");
        // After memory: the device state.
        let e = snapshot::restore(&store, "bad", with_bases(opts(mode, Some(300_000))))
            .err()
            .unwrap_or_else(|| panic!("{mode}: the restore of a damaged device state succeeded"))
            .to_string();
        assert!(e.contains(&fragment), "{mode}: the error names {fragment}: {e}");
        assert!(store.pin_holders("s").is_empty() && store.pin_holders("bad").is_empty(), "{mode}: a pin is left");
        assert!(bases.live().is_empty(), "{mode}: a base is left");
        assert_eq!(common::at_pause::memfds(), (0, 0), "{mode}: base memfds are left");
        // And the same snapshot, whole, restores into the same registry.
        let (vm, _) = snapshot::restore(&store, "s", with_bases(opts(mode, Some(300_000)))).expect("restore");
        assert_restored(&vm, &store, "s", SNAP_LEN, mode);
    }
}

/// Clones of one snapshot into destinations of other file sizes share one base; once
/// resident, one clone's file grows and shrinks at run time and is snapshotted (full and
/// incremental over the clone's snapshot): each snapshot restores exactly, and the base (and a
/// later clone on it) still holds the snapshot's bytes.
#[test]
fn clones_on_one_base_resized_at_run_time_snapshot_exactly_and_leave_the_base_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(storage::Store::open(dir.path()).expect("store"));
    snapshot_with_file(&store, "s", SNAP_LEN);
    let bases = BaseRegistry::new();
    let clone = |dest: usize| {
        let mut o = opts("shared clone", Some(dest));
        o.shared_base = Some(bases.clone());
        o.track_dirty = true;
        let (vm, _) = snapshot::restore(&store, "s", o).expect("clone");
        assert!(
            vm.page_server().expect("lazy").wait_resident(std::time::Duration::from_secs(60)),
            "the clone becomes resident"
        );
        vm
    };
    let a = clone(3_000);
    let b = clone(300_000);
    assert_eq!(bases.live().len(), 1, "one base for both clones");
    assert_restored(&b, &store, "s", SNAP_LEN, "clone b");

    let stop = SaveOptions { mode: SaveMode::Stop, incremental: false, ..SaveOptions::default() };
    let inc = SaveOptions { mode: SaveMode::Stop, incremental: true, ..SaveOptions::default() };
    b.registry().resize(BLOCK, 200_000).expect("grow");
    b.registry().get(BLOCK).expect("block").write(0, &noise(200_000, 7)).expect("write");
    snapshot::save(&b, &store, "b1", &stop, &|_| {}).expect("snapshot");
    b.registry().resize(BLOCK, 9_000).expect("shrink");
    b.registry().get(BLOCK).expect("block").write(100, &noise(50, 8)).expect("write");
    let r = snapshot::save(&b, &store, "b2", &inc, &|_| {}).expect("incremental");
    assert_eq!(r.parent.as_deref(), Some("b1"), "{r:?}");
    drop(b);
    assert_restored(&a, &store, "s", SNAP_LEN, "clone a after b resized");
    let c = clone(40_000);
    assert_restored(&c, &store, "s", SNAP_LEN, "clone c on the same base");
    drop((a, c));
    for (name, len) in [("b1", 200_000), ("b2", 9_000)] {
        for mode in MODES {
            let (vm, _) =
                snapshot::restore(&store, name, opts(mode, None)).unwrap_or_else(|e| panic!("{name} {mode}: {e}"));
            assert_restored(&vm, &store, name, len, &format!("{name} {mode}"));
        }
    }
}
