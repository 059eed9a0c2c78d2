//! Hostile round 5, shared clones (migrate::lazy's base.rs, privatize.rs): snapshots of a
//! clone that keeps writing, taken in every mode while its base still fills and after, each
//! restored in every mode and compared byte for byte with the clone's memory at the pause;
//! the clones' snapshot deleted and collected while they run from its base; clones made and
//! dropped while their base fills; a chunk that failed once in a base.

mod common;
use common::at_pause::{self, capture_hook, memfds, restore_every_way, running_memfill, AtPause};
use common::damage::damage;
use common::memfill::passes;
use common::ram::{assert_blocks_match, Ram};

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::control::ExitReason;
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveHooks, SaveMode, SaveOptions};
use hypervisor::vm::{SharedOutput, Vm};
use migrate::lazy::{Base, BaseRegistry};

fn clone_opts(bases: &Arc<BaseRegistry>, out: &SharedOutput, background_fill: bool) -> RestoreOptions {
    RestoreOptions {
        shared_base: Some(bases.clone()),
        new_generation: true,
        background_fill,
        track_dirty: true,
        ..RestoreOptions::new(RestoreMode::Lazy, Box::new(out.clone()))
    }
}

fn base_of(vm: &Vm) -> Arc<Base> {
    vm.page_server().and_then(|s| s.base()).expect("the clone maps a shared base").clone()
}

/// Snapshots clone `vm` in `mode` as `name`, returning its memory at the pause: with the VM
/// kept paused (and resumed after reading it) unless the snapshot runs in the background,
/// where the `after_protect` hook reads it.
fn snapshot_at_pause(vm: &Vm, store: &storage::Store, name: &str, mode: SaveMode, incremental: bool) -> (Ram, String) {
    // A background snapshot of a clone whose base still fills would wait for the fill:
    // keep it paused (stop-and-copy) to read it then. Once the base is complete it runs in
    // the background, and the hook reads it at the pause.
    let filling = !base_of(vm).is_complete();
    let background = mode == SaveMode::Background && !filling;
    let (ram, report) = at_pause::snapshot_at_pause(vm, store, name, mode, incremental, background);
    let how = format!(
        "{name}: asked {mode:?}, ran {:?}, incremental {}, base {}",
        report.mode,
        report.incremental,
        if filling { "filling" } else { "complete" }
    );
    eprintln!("{how}");
    (ram, how)
}

#[test]
fn snapshots_of_writing_clones_in_every_mode_while_the_base_fills_restore_to_the_pause_even_after_their_source_is_collected(
) {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    running_memfill(&store, "src", MEM, 40);
    let bases = BaseRegistry::new();
    // No background fill: the base fills only as the clones fault, copy their memory
    // (privatize.rs) or are read by a snapshot.
    let (out_a, out_b) = (SharedOutput::default(), SharedOutput::default());
    let (mut a, _) = snapshot::restore(&store, "src", clone_opts(&bases, &out_a, false)).expect("clone a");
    let (mut b, _) = snapshot::restore(&store, "src", clone_opts(&bases, &out_b, false)).expect("clone b");
    assert!(Arc::ptr_eq(&base_of(&a), &base_of(&b)), "one base");
    a.start().expect("start a");
    b.start().expect("start b");

    let plan = [
        ("a-bg-inc", SaveMode::Background, true),
        ("a-stop-inc", SaveMode::Stop, true),
        ("a-live", SaveMode::Live, false),
        ("a-bg-inc2", SaveMode::Background, true),
        ("a-stop-full", SaveMode::Stop, false),
        ("a-bg-inc3", SaveMode::Background, true),
    ];
    let mut taken = Vec::new();
    for (name, mode, inc) in plan {
        taken.push((name, snapshot_at_pause(&a, &store, name, mode, inc)));
        assert!(a.control().exit_reason().is_none(), "{name}: clone a runs on: {}", out_a.text());
    }
    // And one of clone b, which the snapshots of a never paused.
    taken.push(("b-bg", snapshot_at_pause(&b, &store, "b-bg", SaveMode::Background, true)));

    for (name, (ram, how)) in &taken {
        restore_every_way(&store, name, ram, how);
    }

    // The clones' source is deleted and collected while both still run from its base (its
    // pin is gone once the base is complete); the incremental snapshots keep their chunks.
    assert!(base_of(&a).wait_settled(Duration::from_secs(120)), "the base settles");
    store.delete("src").expect("delete the clones' source");
    store.gc().expect("gc");
    for (name, (ram, how)) in &taken {
        assert!(store.verify(name).expect("verify").ok(), "{name} verifies after src was collected");
        restore_every_way(&store, name, ram, &format!("{how}, after src was collected"));
    }
    // The clones ran through all of it, each pass finding the last intact.
    for (vm, out, who) in [(&mut a, &out_a, "a"), (&mut b, &out_b, "b")] {
        let n = passes(&out.text()).len();
        let deadline = Instant::now() + Duration::from_secs(120);
        while passes(&out.text()).len() < n + 2 && vm.control().exit_reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = out.text();
        assert!(vm.control().exit_reason().is_none(), "clone {who} runs: {text}");
        let p = passes(&text);
        assert!(p.len() >= n + 2, "clone {who} goes on: {text}");
        assert!(p.iter().all(|&(_, _, mis)| mis == 0), "clone {who} found its memory intact: {text}");
        vm.stop("test done");
    }
}

#[test]
fn clones_dropped_while_their_base_fills_and_new_clones_racing_the_last_one_out_all_see_the_snapshot() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(storage::Store::open(dir.path().join("store")).expect("store"));
    running_memfill(&store, "s", MEM, 7);
    let bases = BaseRegistry::new();
    for round in 0..6 {
        // A clone that dies at once, its base still filling (the background fill on).
        let (first, _) =
            snapshot::restore(&store, "s", clone_opts(&bases, &SharedOutput::default(), true)).expect("first clone");
        let first_base = base_of(&first);
        // Its last reference goes on another thread while a new clone of the same snapshot
        // is being made on this one.
        let dropper = std::thread::spawn(move || {
            if round % 2 == 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(first);
        });
        drop(first_base);
        let (second, _) = snapshot::restore(&store, "s", clone_opts(&bases, &SharedOutput::default(), round % 3 != 0))
            .expect("second clone");
        dropper.join().expect("dropper");
        assert_blocks_match(&second, &store, "s", &format!("round {round}: the new clone"));
        assert_eq!(second.page_server().and_then(|s| s.error()), None, "round {round}");
        drop(second);
        assert_eq!(memfds(), (0, 0), "round {round}: every base is freed with its clones");
        assert!(bases.live().is_empty(), "round {round}");
    }
    // Nothing holds the snapshot any more.
    store.delete("s").expect("delete: no pin left behind");
}

/// A chunk that could not be read once (a damaged pack put right since, an I/O error that
/// passed) stops the clone that touched it. A clone made afterwards, while another clone
/// keeps the first base alive, must read the chunk again, not inherit the first failure.
#[test]
fn a_chunk_that_failed_in_a_base_is_read_again_for_a_clone_made_after_the_store_was_put_right() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    running_memfill(&store, "f", MEM, 3);
    let offset = 0x40_0000;
    let repair = damage(&store, "f", offset);
    let bases = BaseRegistry::new();
    // A keeps the base alive and touches nothing (never started); B reads the chunk and stops.
    let (a, _) = snapshot::restore(&store, "f", clone_opts(&bases, &SharedOutput::default(), false)).expect("a");
    let (mut b, _) = snapshot::restore(&store, "f", clone_opts(&bases, &SharedOutput::default(), false)).expect("b");
    b.start().expect("start b");
    let reason = b.wait(Some(Duration::from_secs(60)));
    assert!(matches!(&reason, ExitReason::Crash { detail } if detail.contains("0x400000")), "{reason:?}");
    assert_eq!(base_of(&a).stats().chunks_failed, 1);
    drop(b);

    repair();
    assert!(store.verify("f").expect("verify").ok(), "the store is sound again");
    let out = SharedOutput::default();
    let (mut c, _) = snapshot::restore(&store, "f", clone_opts(&bases, &out, true)).expect("c");
    c.start().expect("start c");
    let deadline = Instant::now() + Duration::from_secs(120);
    while passes(&out.text()).is_empty() && c.control().exit_reason().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.control().exit_reason(), None, "clone c, made after the store was put right, runs: {}", out.text());
    let p = passes(&out.text());
    assert!(!p.is_empty() && p.iter().all(|&(_, _, m)| m == 0), "clone c's memory is the snapshot's: {}", out.text());
    c.stop("test done");
    drop(a);
}

/// `lazy-prefetch-before` on a shared clone: the recorded working set is in the base before the
/// restore returns (even on a base made by an earlier clone without the list), and a chunk of
/// it that cannot be read fails the restore, naming it, as for a private restore.
#[test]
fn a_shared_clone_restored_prefetch_before_has_its_working_set_in_the_base_first_or_fails_naming_the_chunk() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    running_memfill(&store, "p", MEM, 9);
    let offsets = [0x20_0000u64, 0x50_0000, 0x60_0000, 0x90_0000];
    let list: Vec<(String, u64)> = offsets.iter().map(|&o| ("pc.ram".to_string(), o)).collect();
    let attach = |name: &str| {
        store
            .put_attachment(name, snapshot::restore::PREFETCH_ATTACHMENT, &snapshot::restore::encode_prefetch(&list))
            .expect("attachment")
    };
    attach("p");
    let bases = BaseRegistry::new();
    // A plain lazy clone makes the base: no list, no background fill, nothing filled.
    let (first, _) =
        snapshot::restore(&store, "p", clone_opts(&bases, &SharedOutput::default(), false)).expect("first");
    let base = base_of(&first);
    assert_eq!(base.stats().chunks_filled, 0);
    let before =
        RestoreOptions { mode: RestoreMode::LazyPrefetchBefore, ..clone_opts(&bases, &SharedOutput::default(), false) };
    let (second, report) = snapshot::restore(&store, "p", before).expect("prefetch-before clone");
    assert!(Arc::ptr_eq(&base, &base_of(&second)), "the second clone shares the first one's base");
    let filled = base.stats().chunks_filled;
    assert!(
        filled >= offsets.len() as u64,
        "the working set ({} chunks, {} listed) is in the base before the restore returns: {filled} chunks filled",
        offsets.len(),
        report.prefetch_chunks
    );
    assert_blocks_match(&second, &store, "p", "the prefetch-before clone");
    drop((first, second, base));

    // A damaged chunk in the list: the restore fails and names it.
    running_memfill(&store, "q", MEM, 10);
    attach("q");
    let _repair = damage(&store, "q", 0x60_0000);
    let before =
        RestoreOptions { mode: RestoreMode::LazyPrefetchBefore, ..clone_opts(&bases, &SharedOutput::default(), false) };
    let err = match snapshot::restore(&store, "q", before) {
        Ok(_) => panic!("a prefetch-before clone of a snapshot whose working set has a corrupt chunk was restored"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("pc.ram") && err.contains("0x600000"), "{err}");
    // The failed restore left no base, mapping or pin behind.
    assert_eq!(memfds(), (0, 0), "no base of a failed restore is left");
    assert!(bases.live().is_empty());
    store.delete("q").expect("nothing pins q");
}

/// A clone that only reads (never started; its memory read by the host, as a snapshot or a
/// migration would) sees the snapshot's bytes throughout, while two clones of the same base
/// rewrite every page, with and without a background fill.
#[test]
fn a_reading_clone_sees_the_snapshot_while_its_siblings_rewrite_every_shared_page() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    running_memfill(&store, "r", MEM, 21);
    for fill in [false, true] {
        let bases = BaseRegistry::new();
        let mut writers = Vec::new();
        for _ in 0..2 {
            let out = SharedOutput::default();
            let (mut w, _) = snapshot::restore(&store, "r", clone_opts(&bases, &out, fill)).expect("writer");
            w.start().expect("start writer");
            writers.push((w, out));
        }
        let (reader, _) =
            snapshot::restore(&store, "r", clone_opts(&bases, &SharedOutput::default(), fill)).expect("reader");
        for round in 0..5 {
            assert_blocks_match(&reader, &store, "r", &format!("fill {fill}, round {round}: the reading clone"));
        }
        for (w, out) in &mut writers {
            let n = passes(&out.text()).len();
            let deadline = Instant::now() + Duration::from_secs(120);
            while passes(&out.text()).len() < n + 2 && w.control().exit_reason().is_none() && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let p = passes(&out.text());
            assert!(p.len() >= n + 2 && p.iter().all(|&(_, _, m)| m == 0), "fill {fill}: a writer: {}", out.text());
            w.stop("test done");
        }
        assert_blocks_match(&reader, &store, "r", &format!("fill {fill}: the reading clone at the end"));
    }
}

/// A clone whose base failed a chunk the clone never touched: an incremental snapshot of it
/// (which reads only what it wrote) succeeds and restores to its memory; a full one, which
/// must read the bad chunk, fails naming it and commits nothing, and never a snapshot with
/// zeros where the chunk was.
#[test]
fn snapshots_of_a_clone_whose_base_failed_a_chunk_it_never_touched_commit_nothing_wrong() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    common::touch::touch_snapshot(&store, "t", MEM, 5);
    let offset = 0x20_0000;
    let _repair = damage(&store, "t", offset);
    let bases = BaseRegistry::new();
    let (mut vm, _) =
        snapshot::restore(&store, "t", clone_opts(&bases, &SharedOutput::default(), true)).expect("clone");
    vm.start().expect("start");
    let base = base_of(&vm);
    assert!(base.wait_settled(Duration::from_secs(120)), "the base settles");
    assert_eq!(base.stats().chunks_failed, 1);
    let ram = vm.registry().get("pc.ram").expect("pc.ram");
    ram.write(0x40_0000, &[0x5a; 4096]).expect("host write");
    let inc = snapshot::save(&vm, &store, "inc", &SaveOptions { stay_paused: true, ..Default::default() }, &|_| {})
        .expect("incremental snapshot");
    assert!(inc.incremental, "{inc:?}");
    vm.resume();
    assert_eq!(vm.control().exit_reason(), None, "the incremental snapshot read nothing bad");
    let full = SaveOptions { incremental: false, ..Default::default() };
    let err = snapshot::save(&vm, &store, "full", &full, &|_| {}).expect_err("a full snapshot reads the bad chunk");
    assert!(err.to_string().contains("0x200000"), "{err}");
    assert!(store.manifest("full").is_err(), "nothing committed");
    // Reading the chunk stopped the clone, as any touch of it does (and as for a private lazy
    // restore): its memory there cannot be had.
    let reason = vm.control().exit_reason();
    assert!(matches!(&reason, Some(ExitReason::Crash { detail }) if detail.contains("0x200000")), "{reason:?}");
    // The incremental one holds the clone's write and refers to the (still damaged) chunk.
    let m = store.manifest("inc").expect("inc");
    let t = store.manifest("t").expect("t");
    let ci = (offset / u64::from(m.chunk_size)) as usize;
    assert_eq!(m.block("pc.ram").expect("pc.ram").chunks[ci], t.block("pc.ram").expect("pc.ram").chunks[ci]);
    let (r, _) =
        snapshot::restore(&store, "inc", RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default())))
            .expect("restore inc");
    let mut word = [0u8; 8];
    r.registry().get("pc.ram").expect("pc.ram").read(0x40_0000, &mut word).expect("read");
    assert_eq!(word, [0x5a; 8]);
}

/// A clone whose base is complete but which has not run yet is started and snapshotted in the
/// background at once: as it rewrites its memory, its copy thread (privatize.rs) makes every
/// page its own during the snapshot, through the write protection. The snapshot holds the
/// memory of the pause, and the clone runs on intact.
#[test]
fn a_clone_made_private_while_a_background_snapshot_protects_it_snapshots_the_pause() {
    const MEM: u64 = 64;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    running_memfill(&store, "v", MEM, 50);
    let bases = BaseRegistry::new();
    for round in 0..3 {
        let out = SharedOutput::default();
        let (mut vm, _) = snapshot::restore(&store, "v", clone_opts(&bases, &out, true)).expect("clone");
        assert!(snapshot::restore::wait_resident(&vm, Duration::from_secs(120)), "the base completes");
        vm.start().expect("start");
        let seen: AtPause = Arc::default();
        let opts = SaveOptions {
            // Full but once: an incremental one of a clone that has written nothing yet protects
            // nothing (no first fault to wait for).
            hooks: SaveHooks { copy_after_first_fault: round < 2, ..capture_hook(&seen) },
            incremental: round == 2,
            ..Default::default()
        };
        let name = format!("v{round}");
        let before = passes(&out.text()).len();
        let report = snapshot::save(&vm, &store, &name, &opts, &|_| {}).expect("background snapshot");
        assert_eq!(report.mode, SaveMode::Background, "{:?}", report.mode_reason);
        eprintln!(
            "round {round}: {:?} passes {before} -> {} total_ms {}",
            report.wp,
            passes(&out.text()).len(),
            report.total_ms
        );
        let ram = seen.lock().expect("lock").take().expect("the hook ran");
        // What the guest wrote is what the host reads: paused, every word is the pattern of
        // the last complete pass or the one in progress.
        let deadline = Instant::now() + Duration::from_secs(120);
        while passes(&out.text()).is_empty() && vm.control().exit_reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(vm.pause(), "pause");
        let last = passes(&out.text()).last().map(|p| p.0);
        let ranges = hypervisor::guests::BootInfo::fill_ranges(&hypervisor::memory::e820_map(MEM << 20));
        let block = vm.registry().get("pc.ram").expect("pc.ram");
        let mut word = [0u8; 8];
        let mut stale = 0u64;
        let mut first = None;
        for &(s, e) in &ranges {
            for a in (s..e).step_by(4096) {
                block.read(a, &mut word).expect("read");
                let w = u64::from_le_bytes(word);
                let ok = last
                    .is_some_and(|p| [p, p + 1].iter().any(|&q| w == hypervisor::guests::memfill::pattern(a, 50 + q)));
                if !ok {
                    stale += 1;
                    first.get_or_insert(a);
                }
            }
        }
        vm.resume();
        assert_eq!(
            stale, 0,
            "round {round}: pages whose host view is not the guest's last pass {last:?} (first at {first:x?})"
        );
        restore_every_way(&store, &name, &ram, &format!("round {round}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        while passes(&out.text()).len() < 3 && vm.control().exit_reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let p = passes(&out.text());
        assert!(p.len() >= 3 && p.iter().all(|&(_, _, m)| m == 0), "round {round}: {}", out.text());
        vm.stop("test done");
    }
}

/// `lazy-prefetch` on a shared clone whose base an earlier clone made without a list (and
/// without a background fill): the clone's own working set is loaded into the base all the
/// same, alongside its first instructions.
#[test]
fn a_shared_clone_restored_lazy_prefetch_loads_its_working_set_into_a_base_made_without_one() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    running_memfill(&store, "a", MEM, 11);
    let offsets = [0x30_0000u64, 0x70_0000, 0xa0_0000];
    let list: Vec<(String, u64)> = offsets.iter().map(|&o| ("pc.ram".to_string(), o)).collect();
    store
        .put_attachment("a", snapshot::restore::PREFETCH_ATTACHMENT, &snapshot::restore::encode_prefetch(&list))
        .expect("attachment");
    let bases = BaseRegistry::new();
    let (first, _) =
        snapshot::restore(&store, "a", clone_opts(&bases, &SharedOutput::default(), false)).expect("first");
    let base = base_of(&first);
    let opts =
        RestoreOptions { mode: RestoreMode::LazyPrefetch, ..clone_opts(&bases, &SharedOutput::default(), false) };
    let (second, _) = snapshot::restore(&store, "a", opts).expect("prefetching clone");
    assert!(Arc::ptr_eq(&base, &base_of(&second)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while base.stats().chunks_filled < offsets.len() as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(base.stats().chunks_filled, offsets.len() as u64, "the second clone's working set is in the base");
    assert_blocks_match(&second, &store, "a", "the prefetching clone");
}
