//! Pre-protection of background snapshots on real KVM: RAM is write-protected while the guest
//! still runs, so the pause only re-protects what was written since the last round.
//!
//! What is checked, on a guest rewriting all of its memory the whole time (memfill):
//! - at the pause (the `after_protect` hook, vCPUs stopped, right after arming) every page of
//!   every RAM block is write-protected, read from `/proc/self/pagemap`'s uffd-wp bit: the
//!   protected set is exactly all of RAM, including chunks a device wrote after the last round
//!   (written in the `during_pre_protect` hook through device memory, as a NIC does);
//! - the snapshot restores (eager and lazy) to exactly the memory at the pause, and memfill's
//!   own verify finds no mismatch when it runs on;
//! - an arming that leaves the chunks written since the last round writable is caught;
//! - a resize during pre-protection cancels the snapshot, the VM runs on, nothing protected;
//! - a failure in any phase (a round, the fault thread while tracking, arming) leaves the VM
//!   running with nothing protected, and the snapshot falls back (protect in the pause, or
//!   stop-and-copy) and still holds the memory it should.

mod common;

use common::memfill::{check_continues, wait_lines};
use common::ram::{assert_same_ram, ram_of, Ram};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::start_builtin;
use hypervisor::guests::{Builtin, MemfillMode};
use hypervisor::snapshot::{
    self, PreProtectFault, RestoreMode, RestoreOptions, SaveHooks, SaveMode, SaveOptions, SaveReport, SnapshotError,
};
use hypervisor::vm::{BootSource, BuiltinParams, FwCfgFile, SharedOutput, Vm, VmConfig};

/// (write-protected pages, all pages) over every RAM block's used length.
fn protected_pages(vm: &Vm) -> (u64, u64) {
    let all = vm.registry().blocks().iter().map(|b| b.used_length() / 4096).sum();
    (common::ram::protected_pages(vm), all)
}

/// Offsets of the chunks the "device" writes after the last pre-protection round.
const DEVICE_CHUNKS: [u64; 8] =
    [0x100_0000, 0x110_0000, 0x120_0000, 0x130_0000, 0x200_0000, 0x210_0000, 0x220_0000, 0x230_0000];

/// What the hook saw at the pause: every block, the guest's output so far, and the
/// (protected, all) page counts.
type AtPause = Arc<Mutex<Option<(Ram, String, (u64, u64))>>>;

fn hooks(out: &SharedOutput, fault: Option<PreProtectFault>) -> (SaveOptions, AtPause) {
    let seen: AtPause = Arc::default();
    let (s, o) = (seen.clone(), out.clone());
    let hooks = SaveHooks {
        after_protect: Some(Arc::new(move |vm: &Vm| {
            let protected = protected_pages(vm);
            *s.lock().expect("lock") = Some((ram_of(vm), o.text(), protected));
        })),
        during_pre_protect: Some(Arc::new(|vm: &Vm| {
            // A device writing guest memory after the last round: these chunks must be
            // protected again in the pause, with the bytes written here.
            // Each writes back the word it reads (memfill checks its memory: new bytes would
            // show as mismatches); the write faults all the same.
            for off in DEVICE_CHUNKS {
                let mut word = [0u8; 8];
                vm.ram().device_memory().read(off, &mut word).expect("device read");
                vm.ram().device_memory().write(off, &word).expect("device write");
            }
        })),
        pre_protect_fault: fault,
        ..SaveHooks::NONE
    };
    // Full snapshots: every page of RAM is to be saved, so every page must be protected.
    (SaveOptions { hooks, incremental: false, ..Default::default() }, seen)
}

fn memfill(mem: u64, seed: u64) -> (Vm, SharedOutput) {
    let (vm, out) = start_builtin(
        Builtin::Memfill,
        mem,
        BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    wait_lines(&out, 1, Duration::from_secs(60));
    (vm, out)
}

/// The guest prints more lines (it was not left blocked on a protected page), nothing is
/// write-protected, and a device write goes through.
fn runs_on_unprotected(vm: &Vm, out: &SharedOutput, what: &str) {
    assert_eq!(protected_pages(vm).0, 0, "{what}: pages still write-protected");
    let n = out.text().lines().count();
    wait_lines(out, n + 1, Duration::from_secs(60));
    assert!(
        vm.control().exit_reason().is_none(),
        "{what}: the VM exited: {:?}: {}",
        vm.control().exit_reason(),
        out.text()
    );
    assert!(out.text().lines().count() > n, "{what}: the guest stopped: {}", out.text());
    // The word read is written back: memfill checks its memory, new bytes would be mismatches.
    let (tx, rx) = std::sync::mpsc::channel();
    let mem = vm.ram().device_memory().clone();
    std::thread::spawn(move || {
        let mut word = [0u8; 8];
        let _ = tx.send(mem.read(0x300_0000, &mut word).and_then(|()| mem.write(0x300_0000, &word)));
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("a device write hung: memory still protected").expect("write");
}

fn wp_of(r: &SaveReport) -> migrate::ram::wp::WpStats {
    r.wp.expect("write-protect stats")
}

#[test]
fn pre_protection_leaves_all_ram_protected_at_the_pause_and_the_snapshot_restores_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mem, seed) = (128, 41);
    let (mut vm, out) = memfill(mem, seed);
    let (opts, seen) = hooks(&out, None);
    let report = snapshot::save(&vm, &store, "bg", &opts, &|_| {}).expect("background snapshot");
    assert_eq!(report.mode, SaveMode::Background, "{:?}", report.mode_reason);
    assert_eq!(report.pre_protect_note, None);
    let wp = wp_of(&report);
    assert!(wp.track_rounds >= 1, "no pre-protection round ran: {wp:?}");
    assert!(wp.track_faults > 0, "the guest wrote nothing while RAM was pre-protected: {wp:?}");
    assert!(wp.armed_chunks >= DEVICE_CHUNKS.len() as u64, "the device's chunks were not re-protected: {wp:?}");
    let (ram, before, (protected, all)) = seen.lock().expect("lock").take().expect("the hook ran");
    assert_eq!(protected, all, "at the pause, {} of {all} RAM pages were not write-protected", all - protected);
    runs_on_unprotected(&vm, &out, "after the snapshot");
    vm.stop("snapshot taken");
    drop(vm);
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let out2 = SharedOutput::default();
        let (mut vm2, _) =
            snapshot::restore(&store, "bg", RestoreOptions::new(mode, Box::new(out2.clone()))).expect("restore");
        assert_same_ram(&ram_of(&vm2), &ram, &format!("restored {mode:?}"));
        vm2.start().expect("start");
        let after = wait_lines(&out2, 2, Duration::from_secs(60));
        vm2.stop("test done");
        check_continues(&before, &after, seed, mem);
    }
}

#[test]
fn an_arming_that_leaves_chunks_written_since_the_last_round_writable_is_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mut vm, out) = memfill(64, 43);
    let (opts, seen) = hooks(&out, Some(PreProtectFault::ArmSkipsRedirtied));
    snapshot::save(&vm, &store, "broken", &opts, &|_| {}).expect("background snapshot");
    let (_, _, (protected, all)) = seen.lock().expect("lock").take().expect("the hook ran");
    assert!(
        all - protected >= DEVICE_CHUNKS.len() as u64 * 16,
        "the broken arming should have left at least the device's chunks writable ({protected} of {all} protected)"
    );
    vm.stop("done");
}

#[test]
fn a_resize_during_pre_protection_cancels_the_snapshot_and_the_vm_runs_on_unprotected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let out = SharedOutput::default();
    let mut cfg = VmConfig::new(
        64,
        1,
        BootSource::Builtin {
            guest: Builtin::Memfill,
            params: BuiltinParams { seed: 2, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
        },
        Box::new(out.clone()),
    );
    cfg.fw_cfg_files = vec![FwCfgFile { name: "opt/snapvisor/blob".into(), data: vec![5; 5000] }];
    let mut vm = Vm::new(cfg).expect("vm");
    vm.start().expect("start");
    wait_lines(&out, 1, Duration::from_secs(60));
    let resized_while_tracking = Arc::new(Mutex::new(None));
    let r = resized_while_tracking.clone();
    let hooks = SaveHooks {
        during_pre_protect: Some(Arc::new(move |vm: &Vm| {
            // RAM is pre-protected now and the guest runs.
            *r.lock().expect("lock") = Some(protected_pages(vm));
            vm.registry().resize("/rom@opt/snapvisor/blob", 9000).expect("resize");
        })),
        ..SaveHooks::NONE
    };
    let err = snapshot::save(&vm, &store, "cancelled", &SaveOptions { hooks, ..Default::default() }, &|_| {})
        .expect_err("the resize must cancel the snapshot");
    assert!(matches!(err, SnapshotError::ResizedDuringSnapshot(_)), "{err}");
    assert_eq!(err.to_string(), "RAM block '/rom@opt/snapvisor/blob' resized during snapshot");
    let (protected, _) = resized_while_tracking.lock().expect("lock").take().expect("the hook ran");
    assert!(protected > 0, "the resize did not happen during pre-protection");
    assert!(store.list().expect("list").is_empty(), "nothing committed");
    runs_on_unprotected(&vm, &out, "after the cancelled snapshot");
    let r = snapshot::save(&vm, &store, "after", &SaveOptions::default(), &|_| {}).expect("snapshot");
    assert_eq!(r.mode, SaveMode::Background);
    runs_on_unprotected(&vm, &out, "after the next snapshot");
    vm.stop("done");
}

#[test]
fn a_failure_in_any_pre_protection_phase_leaves_the_vm_running_unprotected_and_the_snapshot_falls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mem, seed) = (64, 47);
    let (mut vm, out) = memfill(mem, seed);
    let mut taken = Vec::new();
    for fault in [PreProtectFault::Round, PreProtectFault::FaultThread, PreProtectFault::Arm] {
        let name = format!("{fault:?}");
        let (opts, seen) = hooks(&out, Some(fault));
        let report = snapshot::save(&vm, &store, &name, &opts, &|_| {})
            .unwrap_or_else(|e| panic!("{name}: the snapshot should fall back: {e}: {}", out.text()));
        if fault == PreProtectFault::Arm {
            // Still paused when arming failed: stop-and-copy.
            assert_eq!(report.mode, SaveMode::Stop, "{name}");
            assert!(
                report.mode_reason.as_deref().is_some_and(|r| r.contains("injected failure at arm")),
                "{name}: {:?}",
                report.mode_reason
            );
        } else {
            // Pre-protection dropped; RAM protected in the pause instead.
            assert_eq!(report.mode, SaveMode::Background, "{name}: {:?}", report.mode_reason);
            assert!(report.pre_protect_note.as_deref().is_some_and(|n| n.contains("injected")), "{name}: {report:?}");
            let (ram, before, (protected, all)) = seen.lock().expect("lock").take().expect("the hook ran");
            assert_eq!(protected, all, "{name}: not all RAM protected at the pause");
            taken.push((name.clone(), ram, before));
        }
        runs_on_unprotected(&vm, &out, &name);
    }
    vm.stop("done");
    drop(vm);
    for (name, ram, before) in &taken {
        let out2 = SharedOutput::default();
        let (mut vm2, _) =
            snapshot::restore(&store, name, RestoreOptions::new(RestoreMode::Eager, Box::new(out2.clone())))
                .expect("restore");
        assert_same_ram(&ram_of(&vm2), ram, &format!("{name} restored"));
        vm2.start().expect("start");
        let after = wait_lines(&out2, 2, Duration::from_secs(60));
        vm2.stop("test done");
        check_continues(before, &after, seed, mem);
    }
}
