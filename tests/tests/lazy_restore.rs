//! Lazy restore on real KVM: faults served from the store, the working set recorded and
//! prefetched, resizes refused while memory is still arriving, and a corrupted chunk stopping
//! the VM with an error that names it instead of handing the guest wrong bytes.

mod common;
use common::touch::touch_snapshot;

use std::sync::atomic::Ordering;
use std::time::Duration;

use hypervisor::control::ExitReason;
use hypervisor::guests::Builtin;
use hypervisor::snapshot::{self, restore::record_working_set, RestoreMode, RestoreOptions, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, FwCfgFile, SharedOutput, Vm, VmConfig};
use storage::ChunkRef;

const MEM: u64 = 64;

fn lazy(background_fill: bool, out: &SharedOutput) -> RestoreOptions {
    RestoreOptions { background_fill, ..RestoreOptions::new(RestoreMode::Lazy, Box::new(out.clone())) }
}

#[test]
fn working_set_is_recorded_then_prefetched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let expect = touch_snapshot(&store, "t", MEM, 77);

    let out = SharedOutput::default();
    let (mut vm, _) = snapshot::restore(&store, "t", lazy(false, &out)).expect("restore");
    vm.devices().go.store(true, Ordering::Release);
    vm.start().expect("start");
    assert_eq!(vm.wait(Some(Duration::from_secs(60))), ExitReason::GuestExit { status: 0 });
    assert_eq!(out.text(), expect);
    let stats = snapshot::restore::lazy_stats(&vm).expect("lazy");
    assert!(stats.faults > 0 && stats.chunks_on_fault > 0, "{stats:?}");
    assert_eq!(stats.chunks_background, 0, "no background fill was asked for");
    let recorded = record_working_set(&vm, &store, "t").expect("record");
    assert!(recorded as u64 >= stats.chunks_on_fault / 2, "{recorded} chunks recorded");
    drop(vm);

    let out = SharedOutput::default();
    let opts = RestoreOptions {
        background_fill: false,
        ..RestoreOptions::new(RestoreMode::LazyPrefetch, Box::new(out.clone()))
    };
    let (mut vm, report) = snapshot::restore(&store, "t", opts).expect("restore with prefetch");
    assert_eq!(report.prefetch_chunks, recorded);
    vm.devices().go.store(true, Ordering::Release);
    vm.start().expect("start");
    assert_eq!(vm.wait(Some(Duration::from_secs(60))), ExitReason::GuestExit { status: 0 });
    assert_eq!(out.text(), expect);
    let s = snapshot::restore::lazy_stats(&vm).expect("lazy");
    assert!(s.chunks_prefetched > 0, "{s:?}");
}

#[test]
fn a_corrupt_chunk_stops_the_vm_with_its_name_and_never_maps_wrong_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    touch_snapshot(&store, "c", MEM, 77);
    // The first span of the working set starts at 2 MiB: corrupt the chunk there.
    let m = store.manifest("c").expect("manifest");
    let cs = u64::from(m.chunk_size);
    let offset = 0x20_0000;
    let ChunkRef::Stored(hash) = m.block("pc.ram").expect("pc.ram").chunks[(offset / cs) as usize] else {
        panic!("the chunk at 2 MiB holds data");
    };
    let loc = store.debug_chunk_location(&hash).expect("location").expect("indexed");
    let path = store.debug_pack_path(loc.pack);
    let mut pack = std::fs::read(&path).expect("pack");
    pack[(loc.offset + u64::from(loc.len) / 2) as usize] ^= 0xff;
    std::fs::write(&path, &pack).expect("write pack");

    let out = SharedOutput::default();
    let (mut vm, _) = snapshot::restore(&store, "c", lazy(false, &out)).expect("restore");
    vm.devices().go.store(true, Ordering::Release);
    vm.start().expect("start");
    let reason = vm.wait(Some(Duration::from_secs(60)));
    let ExitReason::Crash { detail } = &reason else {
        panic!("expected the VM to stop on the bad chunk, got {reason:?}")
    };
    assert!(detail.contains("pc.ram") && detail.contains("0x200000"), "{detail}");
    assert!(!out.text().contains("working set"), "the guest must not finish on wrong bytes");
    assert!(vm.page_server().and_then(|s| s.error()).is_some());

    // Eager restore refuses the snapshot outright, naming the chunk.
    let err =
        snapshot::restore(&store, "c", RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default())))
            .err()
            .expect("eager restore of a corrupt snapshot fails");
    assert!(err.to_string().contains("pc.ram") && err.to_string().contains("0x200000"), "{err}");
}

/// A restore builds its VM from the state read unchecked while the manifest is checked on
/// another thread: a damaged manifest is still the restore's error, naming the snapshot,
/// whether the damage is in the state the VM was built from or in a chunk table the early
/// read skips; and the snapshot restores exactly once it is whole again.
#[test]
fn a_damaged_manifest_fails_the_restore_though_the_vm_was_built_from_its_unchecked_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let expect = touch_snapshot(&store, "m", MEM, 77);
    let raw = store.debug_raw_manifest("m").expect("read").expect("stored");
    let state = store.unchecked_state("m").expect("the early read finds the state");
    let at = raw.windows(state.len()).position(|w| w == state.as_slice()).expect("the state in the manifest");
    let in_state = at + state.len() / 2;
    // The last byte is in the last block's chunk table (its last field).
    for (damaged, what) in [(in_state, "state"), (raw.len() - 1, "chunk table")] {
        let mut bad = raw.clone();
        bad[damaged] ^= 0x5a;
        store.debug_put_raw_manifest("m", &bad).expect("damage");
        let early = store.unchecked_state("m").expect("the early read does not check the crc");
        assert_eq!(early == state, what == "chunk table", "{what}");
        for mode in [RestoreMode::Lazy, RestoreMode::LazyPrefetch, RestoreMode::Eager] {
            let e = snapshot::restore(&store, "m", RestoreOptions::new(mode, Box::new(SharedOutput::default())))
                .err()
                .unwrap_or_else(|| panic!("{mode:?} restore with a damaged {what} succeeded"))
                .to_string();
            assert!(e.contains("'m'") && e.contains("manifest is corrupt") && e.contains("crc32"), "{what}: {e}");
        }
    }
    store.debug_put_raw_manifest("m", &raw).expect("repair");
    let out = SharedOutput::default();
    let (mut vm, _) = snapshot::restore(&store, "m", lazy(true, &out)).expect("restore");
    vm.devices().go.store(true, Ordering::Release);
    vm.start().expect("start");
    assert_eq!(vm.wait(Some(Duration::from_secs(60))), ExitReason::GuestExit { status: 0 });
    assert_eq!(out.text(), expect);
}

#[test]
fn a_resize_is_refused_while_the_lazy_restore_is_filling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let mut cfg = VmConfig::new(
        16,
        1,
        BootSource::Builtin { guest: Builtin::Idle, params: BuiltinParams::default() },
        Box::new(SharedOutput::default()),
    );
    cfg.fw_cfg_files = vec![FwCfgFile { name: "opt/snapvisor/blob".into(), data: vec![7; 20_000] }];
    let vm = Vm::new(cfg).expect("vm");
    snapshot::save(&vm, &store, "r", &SaveOptions::default(), &|_| {}).expect("snapshot");
    drop(vm);

    let (vm, _) = snapshot::restore(&store, "r", lazy(false, &SharedOutput::default())).expect("restore");
    let err = vm.registry().resize("/rom@opt/snapvisor/blob", 40_000).expect_err("refused");
    assert!(err.to_string().contains("still filling"), "{err}");
    assert_eq!(vm.registry().get("/rom@opt/snapvisor/blob").expect("block").unaligned_length(), 20_000);
    drop(vm);

    // Once resident, the same resize goes through.
    let (vm, _) = snapshot::restore(&store, "r", lazy(true, &SharedOutput::default())).expect("restore");
    assert!(snapshot::restore::wait_resident(&vm, Duration::from_secs(30)));
    vm.registry().resize("/rom@opt/snapvisor/blob", 40_000).expect("resize after fill");
}

#[test]
fn bench_restore_reports_every_mode() {
    let o = common::snapvisor(&["bench", "restore", "--mem-mib", "32", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let runs = v["runs"].as_array().expect("runs");
    let modes: Vec<&str> = runs.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(
        modes,
        vec![
            "resident",
            "eager",
            "lazy",
            "lazy no-shell",
            "lazy+prefetch",
            "lazy+prefetch-before",
            "lazy+prefetch warm",
            "lazy+prefetch-before warm"
        ]
    );
    for r in runs {
        let first = r["first_instruction_ms"].as_f64().expect("number");
        let ws = r["working_set_ms"].as_f64().expect("number");
        assert!(first <= ws, "{r}");
    }
    assert!(runs[2]["faults"].as_u64().expect("faults") > 0);
    // The rows after the first restore of the size run on the shell it asked for (the bench
    // waits for it); the baseline for pre-built VM shells builds its VM afresh.
    assert_eq!(runs[0]["prebuilt_shell"], false, "{}", runs[0]);
    for r in runs[1..].iter().filter(|r| r["mode"] != "lazy no-shell") {
        assert_eq!(r["prebuilt_shell"], true, "{r}");
    }
    assert_eq!(runs[3]["prebuilt_shell"], false, "{}", runs[3]);
    assert!(runs[4]["prefetch_chunks"].as_u64().expect("prefetch") > 0);
    for r in &runs[4..] {
        assert!(r["prefetch_chunks"].as_u64().expect("prefetch") > 0, "{r}");
        assert!(r["ws_floor"].as_f64().expect("ratio") > 0.0, "{r}");
    }
    // Warm: the working set came from the cache, not the store.
    assert!(runs[7]["bytes_read"].as_u64().expect("bytes") < runs[5]["bytes_read"].as_u64().expect("bytes"));
}

/// `--only` measures the rows named (and the floor), with and without the fill gate, and
/// each row has the process's CPU time to its first instruction and to its working set.
#[test]
fn bench_restore_measures_only_the_rows_asked_with_their_cpu_time() {
    for gate in [&[][..], &["--no-fill-gate"][..]] {
        let mut args = vec!["bench", "restore", "--mem-mib", "32", "--only", "lazy+prefetch", "--json"];
        args.extend_from_slice(gate);
        let o = common::snapvisor(&args);
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let runs = v["runs"].as_array().expect("runs");
        let modes: Vec<&str> = runs.iter().filter_map(|r| r["mode"].as_str()).collect();
        assert_eq!(modes, vec!["resident", "lazy+prefetch"], "{gate:?}");
        for r in runs {
            let (first, ws) = (r["first_cpu_ms"].as_f64().expect("cpu"), r["ws_cpu_ms"].as_f64().expect("cpu"));
            assert!(first > 0.0 && first <= ws, "{gate:?}: {r}");
            assert!(r["cpu_floor"].as_f64().expect("ratio") > 0.0, "{r}");
        }
    }
}

#[test]
fn clones_restored_together_share_decompressed_chunks() {
    let o = common::snapvisor(&["bench", "clones", "--count", "3", "--mem-mib", "32", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let (without, with) = (&v[0], &v[1]);
    assert_eq!(without["cache"], false);
    assert_eq!(with["cache"], true);
    let read = |r: &serde_json::Value| r["bytes_read"].as_u64().expect("bytes");
    assert!(with["cache_hits"].as_u64().expect("hits") > 0, "{v}");
    assert!(read(with) * 2 < read(without), "the cache must save most store reads: {v}");
}

#[test]
fn a_vm_stopped_before_it_is_resident_tears_down_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    touch_snapshot(&store, "s", MEM, 77);
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let out = SharedOutput::default();
        let (mut vm, _) = snapshot::restore(&store, "s", lazy(true, &out)).expect("restore");
        vm.devices().go.store(true, Ordering::Release);
        vm.start().expect("start");
        assert!(!vm.page_server().expect("lazy").is_resident(), "stopped while memory is still arriving");
        assert!(matches!(vm.stop("test"), ExitReason::Stopped { .. } | ExitReason::GuestExit { .. }));
        drop(vm);
        assert!(t0.elapsed() < Duration::from_secs(10), "teardown took {:?}", t0.elapsed());
    }
}
