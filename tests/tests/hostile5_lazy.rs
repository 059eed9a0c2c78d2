//! Hostile round 5, lazily restored single VMs and recorded working sets: a memfill guest
//! restored lazily is snapshotted (background, stop, live, incremental) while its page server
//! still fills it and after, each snapshot restored in every mode and compared byte for byte
//! with the guest at the pause; the incremental chain survives its middle parents being
//! deleted and collected. A hostile working-set list on a shared clone's base (and a huge one
//! everywhere) changes no byte.

mod common;
use common::at_pause::{self, restore_every_way, restore_opts, running_memfill, MODES};
use common::memfill::passes;
use common::ram::{assert_blocks_match, Ram};

use std::time::{Duration, Instant};

use hypervisor::snapshot::restore::{encode_prefetch, PREFETCH_ATTACHMENT};
use hypervisor::snapshot::{self, RestoreMode, SaveMode};
use hypervisor::vm::{SharedOutput, Vm};

/// Snapshots `vm` as `name`; its memory at the pause (read by the `after_protect` hook in the
/// background, else with the VM kept paused and resumed after).
fn snapshot_at_pause(vm: &Vm, store: &storage::Store, name: &str, mode: SaveMode, incremental: bool) -> (Ram, String) {
    let resident = vm.page_server().is_none_or(|s| s.is_resident());
    let background = mode == SaveMode::Background && resident;
    let (ram, report) = at_pause::snapshot_at_pause(vm, store, name, mode, incremental, background);
    let how = format!(
        "{name}: asked {mode:?}, ran {:?}, incremental {} (parent {:?}), {}",
        report.mode,
        report.incremental,
        report.parent,
        if resident { "resident" } else { "still filling" }
    );
    eprintln!("{how}");
    (ram, how)
}

#[test]
fn snapshots_of_a_lazily_restored_writer_while_it_fills_and_after_restore_to_the_pause_and_survive_their_middle_parents(
) {
    const MEM: u64 = 128;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    running_memfill(&store, "src", MEM, 60);
    for (label, mode, shared) in MODES {
        let out = SharedOutput::default();
        let mut opts = restore_opts(mode, shared, &out);
        opts.track_dirty = true;
        let (mut vm, _) = snapshot::restore(&store, "src", opts).expect("restore src");
        vm.start().expect("start");
        let p = |s: &str| format!("{}-{s}", label.replace(' ', "-"));
        let plan = [
            (p("bg1"), SaveMode::Background, true),
            (p("stop2"), SaveMode::Stop, true),
            (p("live3"), SaveMode::Live, true),
            (p("stop4"), SaveMode::Stop, true),
            (p("bg5"), SaveMode::Background, true),
            (p("bg6"), SaveMode::Background, true),
        ];
        let mut taken = Vec::new();
        for (i, (name, m, inc)) in plan.iter().enumerate() {
            if i == 4 {
                if let Some(s) = vm.page_server() {
                    assert!(s.wait_resident(Duration::from_secs(120)), "{label}: resident: {:?}", s.error());
                }
            }
            taken.push((name.clone(), snapshot_at_pause(&vm, &store, name, *m, *inc)));
            assert!(vm.control().exit_reason().is_none(), "{label}: {name}: the VM runs on: {}", out.text());
        }
        // The middle of the chain goes: stop4 and bg5 are parents of bg6, live3 of stop4.
        for gone in [p("stop4"), p("bg5"), p("live3")] {
            store.delete(&gone).expect("delete a middle parent");
        }
        if mode == RestoreMode::Eager {
            store.delete("src").expect("delete src (nothing holds it after an eager restore)");
        }
        store.gc().expect("gc");
        for (name, (ram, how)) in &taken {
            if store.manifest(name).is_ok() {
                assert!(store.verify(name).expect("verify").ok(), "{name}");
                restore_every_way(&store, name, ram, how);
            }
        }
        let n = passes(&out.text()).len();
        let deadline = Instant::now() + Duration::from_secs(120);
        while passes(&out.text()).len() < n + 2 && vm.control().exit_reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = out.text();
        let all = passes(&text);
        assert!(all.len() >= n + 2 && all.iter().all(|&(_, _, m)| m == 0), "{label}: the guest goes on intact: {text}");
        vm.stop("test done");
        if mode == RestoreMode::Eager {
            // The rest of the rounds restore from nothing: put src back.
            running_memfill(&store, "src", MEM, 60);
        }
    }
}

/// A hostile working-set list: duplicates, offsets past RAM and inside the last chunk, the
/// wrong block, non-page offsets, a million repeats; the snapshot's memory is what every
/// prefetch mode and every shared clone sees, and the guest runs on intact.
#[test]
fn a_hostile_or_huge_working_set_list_changes_no_byte_in_any_prefetching_restore_or_shared_clone() {
    const MEM: u64 = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    running_memfill(&store, "w", MEM, 70);
    let m = store.manifest("w").expect("manifest");
    let len = m.block("pc.ram").expect("pc.ram").used_length;
    let ram = |off: u64| ("pc.ram".to_string(), off);
    let mut list = vec![
        ram(len - 1),
        ram(len),
        ram(len + 4096),
        ram(u64::MAX),
        ram(u64::MAX - 4095),
        ram(0x12_3457),
        ram(0),
        ("/rom@etc/acpi/tables".to_string(), 1 << 40),
        ("pc.ram ".to_string(), 0),
        ("".to_string(), 0),
        ("pc.ram\u{0}".to_string(), 0),
    ];
    list.extend((0..1_000_000u64).map(|i| ram((i * 0x1_0000) % (len + 0x10_0000))));
    let mut bytes = encode_prefetch(&list);
    bytes.extend_from_slice(b"-1 pc.ram\n0x10 pc.ram\n1ffffffffffffffff pc.ram\n 10 pc.ram\n10  pc.ram\n10\tpc.ram\n");
    store.put_attachment("w", PREFETCH_ATTACHMENT, &bytes).expect("attachment");
    for (label, mode, shared) in
        [MODES[2], MODES[3], ("shared clone, prefetch", RestoreMode::LazyPrefetch, true), MODES[4]]
    {
        let out = SharedOutput::default();
        let (mut vm, _) = snapshot::restore(&store, "w", restore_opts(mode, shared, &out))
            .unwrap_or_else(|e| panic!("{label}: restore: {e}"));
        assert_blocks_match(&vm, &store, "w", label);
        vm.start().expect("start");
        let deadline = Instant::now() + Duration::from_secs(120);
        while passes(&out.text()).len() < 2 && vm.control().exit_reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = out.text();
        assert!(vm.control().exit_reason().is_none(), "{label}: {:?} {text}", vm.control().exit_reason());
        let p = passes(&text);
        assert!(p.len() >= 2 && p.iter().all(|&(_, _, m)| m == 0), "{label}: {text}");
        vm.stop("test done");
    }
}

/// Each snapshot mode, taken the moment a lazily restored writer starts (its page server, or
/// its shared base, far from done): the snapshot holds the guest at the pause, in every
/// restore mode.
#[test]
fn every_snapshot_mode_of_a_lazily_restored_writer_taken_as_it_starts_restores_to_the_pause() {
    const MEM: u64 = 128;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    running_memfill(&store, "src", MEM, 80);
    let snaps = [
        ("bg-inc", SaveMode::Background, true),
        ("stop-inc", SaveMode::Stop, true),
        ("stop", SaveMode::Stop, false),
        ("live", SaveMode::Live, false),
    ];
    for (label, mode, shared) in [MODES[1], MODES[2], MODES[4]] {
        for (snap, m, inc) in snaps {
            let out = SharedOutput::default();
            let mut opts = restore_opts(mode, shared, &out);
            opts.track_dirty = true;
            let (mut vm, _) = snapshot::restore(&store, "src", opts).expect("restore src");
            vm.start().expect("start");
            let name = format!("{}-{snap}", label.replace(' ', "-"));
            let (ram, how) = snapshot_at_pause(&vm, &store, &name, m, inc);
            restore_every_way(&store, &name, &ram, &how);
            let deadline = Instant::now() + Duration::from_secs(120);
            while passes(&out.text()).len() < 2 && vm.control().exit_reason().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let text = out.text();
            let p = passes(&text);
            assert!(p.len() >= 2 && p.iter().all(|&(_, _, m)| m == 0), "{name}: the guest goes on intact: {text}");
            vm.stop("test done");
        }
    }
}

/// Chunks of the working-set list stored with `name`, as a set.
fn recorded(store: &storage::Store, name: &str) -> std::collections::BTreeSet<(String, u64)> {
    let bytes = store.attachment(name, PREFETCH_ATTACHMENT).expect("attachment").expect("a list");
    snapshot::restore::decode_prefetch(&bytes).into_iter().map(|(n, o)| (n.to_string(), o)).collect()
}

/// A working set recorded again from a restore that prefetched the last recording (the CLI's
/// `restore --lazy --prefetch --record-working-set-ms`) still holds the whole working set:
/// chunks the prefetch loaded never fault, and must not drop out of the list.
#[test]
fn a_working_set_recorded_again_from_a_prefetching_restore_keeps_the_whole_working_set() {
    use std::sync::atomic::Ordering;
    const MEM: u64 = 64;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let expect = common::touch::touch_snapshot(&store, "t", MEM, 33);
    let run = |mode: RestoreMode| {
        let out = SharedOutput::default();
        let (mut vm, _) = snapshot::restore(&store, "t", restore_opts(mode, false, &out)).expect("restore");
        vm.start().expect("start");
        if mode == RestoreMode::LazyPrefetch {
            // Let the list load before the go (chunks the waiting guest touches itself fault).
            let want = vm.page_server().map_or(0, |s| s.prefetch_len()) as u64;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let s = snapshot::restore::lazy_stats(&vm).expect("lazy");
                if s.chunks_prefetched + s.chunks_on_fault >= want || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        vm.devices().go.store(true, Ordering::Release);
        let reason = vm.wait(Some(Duration::from_secs(60)));
        assert_eq!(reason, hypervisor::control::ExitReason::GuestExit { status: 0 }, "{mode:?}");
        assert_eq!(out.text(), expect, "{mode:?}");
        snapshot::restore::record_working_set(&vm, &store, "t").expect("record")
    };
    let first = run(RestoreMode::Lazy);
    let ws = recorded(&store, "t");
    assert!(first > 4 && ws.len() == first, "a working set of {first} chunks recorded");
    for round in 0..2 {
        run(RestoreMode::LazyPrefetch);
        let again = recorded(&store, "t");
        let lost: Vec<_> = ws.difference(&again).collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} of the {} working-set chunks dropped out of the list",
            lost.len(),
            ws.len()
        );
    }
}
