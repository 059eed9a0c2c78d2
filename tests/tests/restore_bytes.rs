//! A restored VM's memory holds the snapshot's bytes, every one of them, whatever the
//! destination put in its blocks: compared block by block against the store in every restore
//! mode, through the `fwcfg` guest's checksums from the command line, and after fw_cfg DMA
//! wrote guest memory in the middle of a live snapshot.

mod common;

use common::ram::assert_blocks_match;

use std::time::{Duration, Instant};

use common::snapvisor;
use devices::bus::BusDevice;
use devices::fw_cfg::{DMA_CTL_READ, DMA_CTL_SELECT, PORT_BASE, PORT_DMA};
use hypervisor::guests::{fwcfg, idle, Builtin};
use hypervisor::snapshot::restore::{encode_prefetch, lazy_stats, PREFETCH_ATTACHMENT};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, FwCfgFile, SharedOutput, Vm, VmConfig};
use storage::ChunkRef;

const FILE: &str = "opt/snapvisor/blob";
const BLOCK: &str = "/rom@opt/snapvisor/blob";

/// Snapshots a 16 MiB `hello` VM as "s" whose fw_cfg file `FILE` holds data (seeded by
/// `seed`), an all-zero 64 KiB chunk, data and a short tail of data; returns the file.
fn snapshot_with_file(store: &storage::Store, seed: u64) -> Vec<u8> {
    let mut a = common::noise(64 * 1024, seed);
    a.extend(vec![0u8; 64 * 1024]);
    a.extend(common::noise(64 * 1024 + 5000, seed + 1));
    let mut cfg = VmConfig::new(
        16,
        1,
        BootSource::Builtin { guest: Builtin::Hello, params: BuiltinParams::default() },
        Box::new(SharedOutput::default()),
    );
    cfg.fw_cfg_files = vec![FwCfgFile { name: FILE.into(), data: a.clone() }];
    let vm = Vm::new(cfg).expect("vm");
    snapshot::save(&vm, store, "s", &SaveOptions::default(), &|_| {}).expect("snapshot");
    a
}

#[test]
fn restored_ram_blocks_hold_the_snapshots_bytes_in_every_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let a = snapshot_with_file(&store, 1);
    let manifest = store.manifest("s").expect("manifest");
    let chunks = &manifest.block(BLOCK).expect("file block").chunks;
    assert!(matches!(chunks[1], ChunkRef::Zero) && matches!(chunks[0], ChunkRef::Stored(_)));
    // A working set that starts with the file's chunks, for the prefetching restore.
    // All of pc.ram after it, so that the before-first-instruction restore has more to load
    // than its fill threads could finish while the rest of the restore runs.
    let mut prefetch = vec![(BLOCK.to_string(), 0), (BLOCK.to_string(), 0x10000)];
    prefetch.extend((0..16u64 << 20).step_by(0x10000).map(|off| ("pc.ram".to_string(), off)));
    store.put_attachment("s", PREFETCH_ATTACHMENT, &encode_prefetch(&prefetch)).expect("attachment");

    for mode in [RestoreMode::Eager, RestoreMode::Lazy, RestoreMode::LazyPrefetch, RestoreMode::LazyPrefetchBefore] {
        // The destination's own file: as long, different everywhere, zero nowhere.
        let mut opts = RestoreOptions::new(mode, Box::new(SharedOutput::default()));
        opts.fw_cfg_files = Some(vec![FwCfgFile {
            name: FILE.into(),
            data: common::noise(a.len(), 3).iter().map(|x| x | 1).collect(),
        }]);
        opts.background_fill = false;
        opts.cache = None;
        let (vm2, report) = snapshot::restore(&store, "s", opts).expect("restore");
        if mode != RestoreMode::Eager && mode != RestoreMode::Lazy {
            assert_eq!(report.prefetch_chunks, prefetch.len(), "{mode:?}: every entry names a chunk");
        }
        if mode == RestoreMode::LazyPrefetchBefore {
            // Loaded before the restore returned: no waiting.
            let s = lazy_stats(&vm2).expect("lazy");
            assert_eq!(s.chunks_prefetched, prefetch.len() as u64, "{s:?}");
        }
        if mode == RestoreMode::LazyPrefetch {
            let deadline = Instant::now() + Duration::from_secs(20);
            while lazy_stats(&vm2).expect("lazy").chunks_prefetched < prefetch.len() as u64 {
                assert!(Instant::now() < deadline, "prefetch never finished: {:?}", lazy_stats(&vm2));
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        assert_blocks_match(&vm2, &store, "s", &format!("{mode:?} restore"));
        if let Some(server) = vm2.page_server() {
            assert_eq!(server.error(), None, "{mode:?}");
        }
    }
}

/// A lazy restore whose chunks all come from a cache of decompressed chunks (a daemon that
/// restored the snapshot before) holds the snapshot's bytes: the cache's own bytes are placed
/// (`Fill::Shared`), never the page server's buffer. A snapshot of that VM holds them too.
#[test]
fn a_restore_from_a_warm_chunk_cache_holds_the_snapshots_bytes_and_snapshots_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let a = snapshot_with_file(&store, 11);
    let prefetch = vec![(BLOCK.to_string(), 0), (BLOCK.to_string(), 0x20000), ("pc.ram".to_string(), 0x10000)];
    store.put_attachment("s", PREFETCH_ATTACHMENT, &encode_prefetch(&prefetch)).expect("attachment");

    for mode in [RestoreMode::Lazy, RestoreMode::LazyPrefetch, RestoreMode::LazyPrefetchBefore] {
        let cache = migrate::lazy::ChunkCache::new(64 << 20);
        let restore = || {
            let mut opts = RestoreOptions::new(mode, Box::new(SharedOutput::default()));
            opts.fw_cfg_files = Some(vec![FwCfgFile {
                name: FILE.into(),
                data: common::noise(a.len(), 13).iter().map(|x| x | 1).collect(),
            }]);
            opts.cache = Some(cache.clone());
            snapshot::restore(&store, "s", opts).expect("restore").0
        };
        // The first restore fills the cache with every stored chunk.
        let first = restore();
        assert!(snapshot::restore::wait_resident(&first, Duration::from_secs(60)), "{mode:?}: first resident");
        drop(first);
        let (hits0, _) = cache.counters();
        let vm2 = restore();
        assert!(snapshot::restore::wait_resident(&vm2, Duration::from_secs(60)), "{mode:?}: resident");
        let s = lazy_stats(&vm2).expect("lazy");
        assert_eq!(s.bytes_stored_read, 0, "{mode:?}: every chunk from the cache: {s:?}");
        assert!(cache.counters().0 > hits0, "{mode:?}: cache hits");
        assert_eq!(vm2.page_server().and_then(|p| p.error()), None, "{mode:?}");
        assert_blocks_match(&vm2, &store, "s", &format!("{mode:?} restore from a warm cache"));
        let again = format!("s-{mode:?}");
        snapshot::save(&vm2, &store, &again, &SaveOptions::default(), &|_| {}).expect("snapshot of the restored VM");
        assert_blocks_match(&vm2, &store, &again, &format!("{mode:?}: snapshot of the restored VM"));
        assert_blocks_match(&vm2, &store, "s", &format!("{mode:?}: after its snapshot"));
    }
}

/// Runs `snapvisor ARGS` and returns its stdout, asserting exit status 0.
fn run_ok(args: &[&str]) -> String {
    let o = snapvisor(args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{args:?}\nstdout {out}\nstderr {}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn fwcfg_checksums_of_a_restored_vm_are_the_snapshots_from_the_command_line() {
    // (snapshot's file, destination's file): different data and size; all zeros against data.
    let cases = [(common::noise(70_000, 5), common::noise(90_000, 6)), (vec![0u8; 70_000], common::noise(70_000, 7))];
    for (i, (a, b)) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = dir.path().join("store");
        let st = st.to_str().expect("utf-8");
        let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&pa, a).expect("write a");
        std::fs::write(&pb, b).expect("write b");
        let file_a = format!("{FILE}={}", pa.to_str().expect("utf-8"));
        let file_b = format!("{FILE}={}", pb.to_str().expect("utf-8"));

        let original = run_ok(&["run", "--builtin", "fwcfg", "--mem-mib", "16", "--fw-cfg-file", &file_a]);
        let line =
            format!("file {FILE} size {} pio-checksum {1:#x} dma-checksum {1:#x}\n", a.len(), fwcfg::checksum(a));
        assert!(original.contains(&line), "case {i}: the guest prints A's checksum {line:?}:\n{original}");
        assert!(original.ends_with("files\n") && original.contains("fw_cfg: PIO and DMA agree on"), "{original}");
        let taken = run_ok(&[
            "run",
            "--builtin",
            "fwcfg",
            "--mem-mib",
            "16",
            "--fw-cfg-file",
            &file_a,
            "--snapshot-after-ms",
            "0",
            "--exit-after-snapshot",
            "--store",
            st,
            "--name",
            "f",
        ]);
        assert!(taken.is_empty(), "snapshot before the first instruction: {taken}");
        for mode in [&["--lazy"][..], &[][..]] {
            let mut args = vec!["restore", "--store", st, "f", "--fw-cfg-file", &file_b];
            args.extend_from_slice(mode);
            let restored = run_ok(&args);
            assert_eq!(restored, original, "case {i}, restore {mode:?} with B must print what A printed");
        }
    }
}

/// Guest addresses the DMA test uses, well clear of the idle guest's code and stack.
const DESC: u64 = 0x40_0000;
const BUF: u64 = 0x50_0000;

#[test]
fn fw_cfg_dma_during_a_live_snapshot_is_in_the_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let data = common::noise(3 * 4096 + 100, 9);
    let out = SharedOutput::default();
    let mut cfg = VmConfig::new(
        16,
        1,
        BootSource::Builtin { guest: Builtin::Idle, params: BuiltinParams::default() },
        Box::new(out.clone()),
    );
    cfg.fw_cfg_files = vec![FwCfgFile { name: FILE.into(), data: data.clone() }];
    let mut vm = Vm::new(cfg).expect("vm");
    vm.start().expect("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.text() != idle::READY {
        assert!(Instant::now() < deadline, "the idle guest never got ready: {:?}", out.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    let fw_cfg = vm.devices().fw_cfg.clone();
    let key = fw_cfg.lock().expect("fw_cfg").file(FILE).expect("listed").0;
    let ram = vm.ram().block().clone();
    let report = snapshot::save(
        &vm,
        &store,
        "live",
        &SaveOptions { live: true, stay_paused: true, ..Default::default() },
        &|p| {
            if p.round != 0 {
                return;
            }
            // After the first round copied the (blank) buffer, the device fills it by DMA, as a
            // guest's request would have it do; no vCPU writes the buffer's pages.
            let mut desc = Vec::new();
            desc.extend_from_slice(&((u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_READ).to_be_bytes());
            desc.extend_from_slice(&(data.len() as u32).to_be_bytes());
            desc.extend_from_slice(&BUF.to_be_bytes());
            ram.write(DESC, &desc).expect("descriptor");
            let mut f = fw_cfg.lock().expect("fw_cfg");
            f.write(PORT_BASE, PORT_DMA, &0u32.to_be_bytes());
            f.write(PORT_BASE, PORT_DMA + 4, &(DESC as u32).to_be_bytes());
        },
    )
    .expect("live snapshot");
    assert!(report.live);
    // The DMA happened: the source holds the file in its buffer and a zero status word.
    let mut status = [0xffu8; 4];
    ram.read(DESC, &mut status).expect("status");
    assert_eq!(status, [0; 4], "DMA succeeded");
    let mut got = vec![0u8; data.len()];
    ram.read(BUF, &mut got).expect("buffer");
    assert_eq!(got, data, "the source's buffer holds the file");
    // The paused source's memory is what the snapshot must hold, byte for byte.
    let mut source = vec![0u8; ram.used_length() as usize];
    ram.read(0, &mut source).expect("source RAM");
    vm.stop("snapshot taken");
    drop(vm);

    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let (vm2, _) = snapshot::restore(&store, "live", RestoreOptions::new(mode, Box::new(SharedOutput::default())))
            .expect("restore");
        let block = vm2.ram().block().clone();
        let mut buf = vec![0u8; data.len()];
        block.read(BUF, &mut buf).expect("restored buffer");
        assert!(buf == data, "{mode:?}: the DMA buffer was saved stale ({} rounds)", report.rounds);
        let mut restored = vec![0u8; source.len()];
        block.read(0, &mut restored).expect("restored RAM");
        let first = (0..source.len()).find(|&i| restored[i] != source[i]);
        assert_eq!(first, None, "{mode:?}: restored pc.ram differs from the paused source");
    }
}

/// Clones on a shared base (the base's memfd mapped over each block) hold the snapshot's
/// bytes too, although the destination put its own fw_cfg file (present pages, different
/// everywhere) in a block first: the first clone from a cold base, the second from the base
/// the first filled, both with the chunk cache warm or cold.
#[test]
fn shared_base_clones_hold_the_snapshots_bytes_over_the_destinations_own_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let a = snapshot_with_file(&store, 21);
    for warm_cache in [false, true] {
        let bases = migrate::lazy::BaseRegistry::new();
        let cache = migrate::lazy::ChunkCache::new(64 << 20);
        let clone = |seed: u64| {
            let mut opts = RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default()));
            opts.shared_base = Some(bases.clone());
            opts.new_generation = true;
            opts.fw_cfg_files = Some(vec![FwCfgFile {
                name: FILE.into(),
                data: common::noise(a.len(), seed).iter().map(|x| x | 1).collect(),
            }]);
            opts.cache = warm_cache.then(|| cache.clone());
            snapshot::restore(&store, "s", opts).expect("restore").0
        };
        let first = clone(23);
        assert_blocks_match(&first, &store, "s", &format!("first clone (cache {warm_cache})"));
        assert!(snapshot::restore::wait_resident(&first, Duration::from_secs(60)), "first resident");
        let second = clone(24);
        assert_blocks_match(&second, &store, "s", &format!("second clone (cache {warm_cache})"));
        assert_blocks_match(&first, &store, "s", &format!("first clone after the second (cache {warm_cache})"));
    }
}
