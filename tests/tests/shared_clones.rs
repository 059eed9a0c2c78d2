//! Lazy clones on a shared base (migrate::lazy's base.rs): each clone reads the snapshot's
//! pages from one shared copy and writes into its own; a corrupt chunk stops only the clones
//! that touch it; the base goes with its last clone; and N waiting clones hold about one
//! guest's memory between them, not N.

mod common;
use common::at_pause::memfds;
use common::ram::assert_blocks_match_except;
use common::touch::touch_snapshot;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::control::ExitReason;
use hypervisor::guests::{memfill, BootInfo, Builtin, INFO_SEED};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};
use migrate::lazy::{Base, BaseRegistry};
use storage::ChunkRef;

const MIB: u64 = 1 << 20;

fn clone_opts(bases: &Arc<BaseRegistry>, out: &SharedOutput) -> RestoreOptions {
    RestoreOptions {
        shared_base: Some(bases.clone()),
        new_generation: true,
        ..RestoreOptions::new(RestoreMode::Lazy, Box::new(out.clone()))
    }
}

fn base_of(vm: &Vm) -> Arc<Base> {
    vm.page_server().and_then(|s| s.base()).expect("the clone maps a shared base").clone()
}

/// Snapshots a `memfill` guest before its first instruction, its RAM filled by the host with
/// the pattern of seed 99 (so the clones' pages are shared data, not zeros), set to run two
/// passes. Returns the fill ranges.
fn memfill_snapshot(store: &storage::Store, name: &str, mem: u64) -> Vec<(u64, u64)> {
    let params = BuiltinParams { seed: 5, passes: 2, ..Default::default() };
    let vm = Vm::new(VmConfig::new(
        mem,
        1,
        BootSource::Builtin { guest: Builtin::Memfill, params },
        Box::new(SharedOutput::default()),
    ))
    .expect("vm");
    let ranges = BootInfo::fill_ranges(&hypervisor::memory::e820_map(mem * MIB));
    let ram = vm.registry().get("pc.ram").expect("pc.ram");
    for &(s, e) in &ranges {
        let words: Vec<u8> = (s..e).step_by(8).flat_map(|a| memfill::pattern(a, 99).to_le_bytes()).collect();
        ram.write(s, &words).expect("fill");
    }
    snapshot::save(&vm, store, name, &SaveOptions::default(), &|_| {}).expect("snapshot");
    ranges
}

#[test]
fn clones_write_their_own_seeds_over_shared_pages_and_the_base_stays_intact() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let ranges = memfill_snapshot(&store, "m", MEM);
    let bases = BaseRegistry::new();

    let mut clones = Vec::new();
    for i in 0..3u64 {
        let out = SharedOutput::default();
        // No background fill: the base fills only as the guests fault (KVM's faults on
        // missing pages of the shared mapping reach the clones' fault threads).
        let opts = RestoreOptions { background_fill: false, ..clone_opts(&bases, &out) };
        let (vm, _) = snapshot::restore(&store, "m", opts).expect("clone");
        // Each clone fills memory with its own seed, then checks it in its second pass.
        let ram = vm.registry().get("pc.ram").expect("pc.ram");
        ram.write(hypervisor::layout::BUILTIN_INFO + INFO_SEED, &(100 + i).to_le_bytes()).expect("seed");
        clones.push((vm, out));
    }
    assert_eq!(bases.live().len(), 1, "the three clones share one base");
    for (vm, _) in clones.iter_mut() {
        vm.start().expect("start");
    }
    for (i, (vm, out)) in clones.iter_mut().enumerate() {
        let seed = 100 + i as u64;
        assert_eq!(vm.wait(Some(Duration::from_secs(120))), ExitReason::GuestExit { status: 0 }, "{}", out.text());
        let text = out.text();
        assert!(
            text.contains(&format!("memfill pass 1 seed {:#x} checksum", seed + 1)) && text.contains("mismatches 0"),
            "clone {i} read back its own seed: {text}"
        );
        let ram = vm.registry().get("pc.ram").expect("pc.ram");
        let mut word = [0u8; 8];
        for &(s, e) in &ranges {
            for a in (s..e).step_by(4096) {
                ram.read(a, &mut word).expect("read");
                assert_eq!(u64::from_le_bytes(word), memfill::pattern(a, seed + 1), "clone {i} at {a:#x}");
            }
        }
    }
    let filled = base_of(&clones[0].0).stats().chunks_filled;
    let cs = u64::from(store.manifest("m").expect("manifest").chunk_size);
    let fill_chunks: u64 = ranges.iter().map(|(s, e)| (e - s) / cs).sum();
    assert!(filled >= fill_chunks, "the guests' faults filled the base: {filled} of {fill_chunks} chunks");
    // The clones' writes stayed theirs: a clone made now still sees the snapshot.
    let (late, _) = snapshot::restore(&store, "m", clone_opts(&bases, &SharedOutput::default())).expect("clone");
    assert!(Arc::ptr_eq(&base_of(&late), &base_of(&clones[0].0)), "the late clone maps the same base");
    assert_blocks_match_except(&late, &store, "m", &[], "a clone made after the others wrote");
}

/// Pages of `[host, host + len)` in this process that are mapped and the process's own (not
/// a file's page: for a clone, written or copied, no longer the base's), from pagemap.
fn own_pages(host: usize, len: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    let mut entries = vec![0u8; (len / 4096 * 8) as usize];
    pagemap.read_exact_at(&mut entries, host as u64 / 4096 * 8).expect("read pagemap");
    entries
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
        .filter(|e| e & (1 << 63) != 0 && e & (1 << 61) == 0)
        .count() as u64
}

#[test]
fn a_clone_that_writes_what_it_reads_gets_its_own_copy_and_the_base_stays_intact() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let ranges = memfill_snapshot(&store, "w", MEM);
    let bases = BaseRegistry::new();
    let out = SharedOutput::default();
    let (mut vm, _) = snapshot::restore(&store, "w", clone_opts(&bases, &out)).expect("clone");
    let ram = vm.registry().get("pc.ram").expect("pc.ram");
    ram.write(hypervisor::layout::BUILTIN_INFO + INFO_SEED, &200u64.to_le_bytes()).expect("seed");
    let (host, len) = (ram.host_addr() as usize, ram.used_length());
    vm.start().expect("start");
    // memfill reads every word and then writes it: the clone is given its own copy of all
    // its memory, including the pages the guest never touches (below the fill ranges).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut own = own_pages(host, len);
    while own < len / 4096 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        own = own_pages(host, len);
    }
    assert_eq!(own, len / 4096, "pages of the clone's {MEM} MiB that are its own (the rest still map the base)");
    assert_eq!(vm.wait(Some(Duration::from_secs(120))), ExitReason::GuestExit { status: 0 }, "{}", out.text());
    let text = out.text();
    assert!(
        text.contains("memfill pass 1 seed 0xc9 checksum") && text.contains("mismatches 0"),
        "the clone found its first pass intact in its second: {text}"
    );
    let mut word = [0u8; 8];
    for &(s, e) in &ranges {
        for a in (s..e).step_by(4096) {
            ram.read(a, &mut word).expect("read");
            assert_eq!(u64::from_le_bytes(word), memfill::pattern(a, 201), "the clone's own bytes at {a:#x}");
        }
    }
    // Its copy is its own: a clone made now still sees the snapshot.
    let (late, _) = snapshot::restore(&store, "w", clone_opts(&bases, &SharedOutput::default())).expect("clone");
    assert!(Arc::ptr_eq(&base_of(&late), &base_of(&vm)), "the late clone maps the same base");
    assert_blocks_match_except(&late, &store, "w", &[], "a clone made after another copied its memory");
}

/// Pss (bytes) of the mappings overlapping `ranges` in this process.
fn pss_of(ranges: &[(usize, usize)]) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|(a, _)| !a.is_empty() && !a.contains(':')) {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = ranges.iter().any(|&(s, e)| a < e && s < b);
                continue;
            }
        }
        if inside {
            if let Some(kib) = line.strip_prefix("Pss:") {
                total += kib.trim().trim_end_matches("kB").trim().parse::<u64>().expect("Pss") * 1024;
            }
        }
    }
    total
}

#[test]
fn waiting_clones_share_one_copy_of_memory() {
    const MEM: u64 = 64;
    const N: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    touch_snapshot(&store, "t", MEM, 77);
    let bases = BaseRegistry::new();
    let mut clones = Vec::new();
    for _ in 0..N {
        let (mut vm, _) = snapshot::restore(&store, "t", clone_opts(&bases, &SharedOutput::default())).expect("clone");
        vm.start().expect("start");
        clones.push(vm);
    }
    for vm in &clones {
        assert!(snapshot::restore::wait_resident(vm, Duration::from_secs(120)), "resident");
    }
    // Every page of every clone mapped (read, as a snapshot of it would), none written.
    let mut ranges = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for vm in &clones {
        let ram = vm.registry().get("pc.ram").expect("pc.ram");
        for off in (0..ram.used_length()).step_by(buf.len()) {
            ram.read(off, &mut buf).expect("read");
        }
        let host = ram.host_addr() as usize;
        ranges.push((host, host + ram.max_length() as usize));
        assert!(vm.control().exit_reason().is_none(), "the clone still waits for its go");
    }
    let pss = pss_of(&ranges);
    eprintln!("PSS of the guest memory of {N} waiting clones of {MEM} MiB: {} MiB", pss / MIB);
    assert!(pss < 2 * MEM * MIB, "{N} clones hold {} MiB of guest memory: not shared", pss / MIB);
}

#[test]
fn a_corrupt_chunk_in_the_base_stops_only_the_clones_that_touch_it() {
    const MEM: u64 = 64;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    touch_snapshot(&store, "c", MEM, 77);
    // The working set's first span starts at 2 MiB: corrupt the chunk there.
    let m = store.manifest("c").expect("manifest");
    let offset = 0x20_0000;
    let ChunkRef::Stored(hash) = m.block("pc.ram").expect("pc.ram").chunks[(offset / u64::from(m.chunk_size)) as usize]
    else {
        panic!("the chunk at 2 MiB holds data");
    };
    let loc = store.debug_chunk_location(&hash).expect("location").expect("indexed");
    let path = store.debug_pack_path(loc.pack);
    let mut pack = std::fs::read(&path).expect("pack");
    pack[(loc.offset + u64::from(loc.len) / 2) as usize] ^= 0xff;
    std::fs::write(&path, &pack).expect("write pack");

    let bases = BaseRegistry::new();
    let out_a = SharedOutput::default();
    let (mut a, _) = snapshot::restore(&store, "c", clone_opts(&bases, &out_a)).expect("clone a");
    let (mut b, _) = snapshot::restore(&store, "c", clone_opts(&bases, &SharedOutput::default())).expect("clone b");
    let base = base_of(&a);
    a.devices().go.store(true, Ordering::Release);
    a.start().expect("start a");
    b.start().expect("start b");
    let reason = a.wait(Some(Duration::from_secs(60)));
    let ExitReason::Crash { detail } = &reason else { panic!("clone a must stop on the bad chunk, got {reason:?}") };
    assert!(detail.contains("pc.ram") && detail.contains("0x200000"), "{detail}");
    assert!(!out_a.text().contains("working set"), "clone a must not finish on wrong bytes");

    // The base's fill threads pass the bad chunk too, and go on; b, which waits for its go
    // and never touches it, keeps running.
    assert!(base.wait_settled(Duration::from_secs(120)), "the base settles");
    let stats = base.stats();
    assert_eq!(stats.chunks_failed, 1, "{stats:?}");
    assert_eq!(stats.chunks_filled, stats.chunks - 1, "{stats:?}");
    assert!(!base.holds(), "nothing left to read: the snapshot's pin is released");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(b.control().exit_reason(), None, "clone b keeps running");
    assert_blocks_match_except(&b, &store, "c", &[("pc.ram", offset)], "clone b");
    assert_eq!(b.control().exit_reason(), None, "clone b still runs after its memory was read");
    // A background snapshot of b would wait for its base to complete, which it never will:
    // the wait ends at once, the snapshot falls back to stop-and-copy, whose copy meets the
    // bad chunk, and nothing is committed.
    let wait = Duration::from_secs(600);
    let t0 = std::time::Instant::now();
    let opts = SaveOptions { fill_wait: wait, ..Default::default() };
    let err = snapshot::save(&b, &store, "cb", &opts, &|_| {}).expect_err("a snapshot over a bad chunk");
    assert!(t0.elapsed() < wait / 2, "the snapshot waited for a base that cannot complete: {err}");
    assert!(err.to_string().contains("0x200000"), "{err}");
    assert!(store.manifest("cb").is_err(), "a snapshot with a bad chunk was committed");
    b.stop("test done");
}

fn rss_shmem_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("RssShmem")
}

#[test]
fn the_base_is_freed_with_its_last_clone() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    memfill_snapshot(&store, "f", MEM);
    let bases = BaseRegistry::new();
    assert_eq!(memfds(), (0, 0));
    let before = rss_shmem_kib();
    let mut clones = Vec::new();
    for _ in 0..3 {
        let (vm, _) = snapshot::restore(&store, "f", clone_opts(&bases, &SharedOutput::default())).expect("clone");
        clones.push(vm);
    }
    for vm in &clones {
        assert!(snapshot::restore::wait_resident(vm, Duration::from_secs(120)), "resident");
        assert_blocks_match_except(vm, &store, "f", &[], "clone");
    }
    let (fds, maps) = memfds();
    assert!(fds >= 1 && maps >= 3, "the base's memfds ({fds}) and the clones' mappings of them ({maps})");
    let with = rss_shmem_kib();
    assert!(with >= before + MEM * 1024 / 2, "the clones map the base: RssShmem {before} -> {with} KiB");
    clones.pop();
    assert_eq!(memfds().0, fds, "two clones still use the base");
    clones.clear();
    assert_eq!(memfds(), (0, 0), "no memfd of a base is left open or mapped");
    assert!(bases.live().is_empty(), "the registry keeps no base alive");
    let after = rss_shmem_kib();
    assert!(after < before + 1024, "RssShmem back to {after} KiB (was {before} before the clones)");
    // A clone made now gets a base of its own, complete again.
    let (vm, _) = snapshot::restore(&store, "f", clone_opts(&bases, &SharedOutput::default())).expect("clone");
    assert!(snapshot::restore::wait_resident(&vm, Duration::from_secs(120)), "resident");
    assert_blocks_match_except(&vm, &store, "f", &[], "a clone of a new base");
}

#[test]
fn a_clone_snapshots_in_the_background_once_its_base_is_complete_and_the_snapshot_holds_its_bytes() {
    const MEM: u64 = 64;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    touch_snapshot(&store, "t", MEM, 77);
    let bases = BaseRegistry::new();
    let (mut vm, _) = snapshot::restore(&store, "t", clone_opts(&bases, &SharedOutput::default())).expect("clone");
    vm.start().expect("start");
    assert!(snapshot::restore::wait_resident(&vm, Duration::from_secs(120)), "resident");
    // The clone's own bytes: one page of each MiB written by the host, so the snapshot holds
    // private pages over shared ones.
    let ram = vm.registry().get("pc.ram").expect("pc.ram");
    for off in (0..ram.used_length()).step_by(MIB as usize) {
        ram.write(off + 0x800, &0xc10e_u64.wrapping_add(off).to_le_bytes()).expect("write");
    }
    let report = snapshot::save(&vm, &store, "tc", &SaveOptions::default(), &|_| {}).expect("snapshot of the clone");
    assert_eq!(report.mode, snapshot::SaveMode::Background, "{:?}", report.mode_reason);
    assert!(vm.control().exit_reason().is_none(), "the clone runs on");
    // The clone (still waiting for its go: it writes nothing) equals its snapshot.
    assert_blocks_match_except(&vm, &store, "tc", &[], "the clone against its snapshot");
    let (restored, _) =
        snapshot::restore(&store, "tc", RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default())))
            .expect("restore the clone's snapshot");
    assert_blocks_match_except(&restored, &store, "tc", &[], "the clone's snapshot restored");
    let r = restored.registry().get("pc.ram").expect("pc.ram");
    let mut word = [0u8; 8];
    r.read(MIB + 0x800, &mut word).expect("read");
    assert_eq!(u64::from_le_bytes(word), 0xc10e_u64.wrapping_add(MIB), "the clone's own write is in its snapshot");
    vm.stop("test done");
}
