//! Hostile checks of the pre-built VM shell pool (hypervisor's shell.rs), in process: VMs of
//! 2 and 4 vCPUs restored on a shell hold the snapshot's bytes and run on exactly; snapshots
//! taken of such a VM (background, then incremental, then stop) restore byte-exact, on a
//! fresh VM and on a shell; a shell's memory holds nothing (no VM's bytes) when it is taken,
//! after VMs of its shape ran and wrote all of theirs.
//!
//! One test: the pool is the process's.

mod common;

use std::time::Duration;

use common::memfill::{check_continues, wait_lines};
use common::ram::assert_blocks_match;
use hypervisor::guests::{Builtin, MemfillMode};
use hypervisor::shell::{self, Shape};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveMode, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};
use storage::Store;

const MEM: u64 = 16;

fn taken() -> u64 {
    shell::counts().0
}

fn paused(mode: SaveMode) -> SaveOptions {
    SaveOptions { mode, stay_paused: true, ..Default::default() }
}

/// Snapshots a memfill guest of `vcpus` vCPUs after its first pass line; its output then.
fn snapshot_memfill(store: &Store, name: &str, vcpus: u64, seed: u64) -> String {
    let out = SharedOutput::default();
    let params = BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() };
    let mut vm = Vm::new(VmConfig::new(
        MEM,
        vcpus,
        BootSource::Builtin { guest: Builtin::Memfill, params },
        Box::new(out.clone()),
    ))
    .expect("create VM");
    vm.start().expect("start");
    wait_lines(&out, 1, Duration::from_secs(60));
    snapshot::save(&vm, store, name, &paused(SaveMode::Stop), &|_| {}).expect("snapshot");
    let before = out.text();
    vm.stop("snapshot taken");
    before
}

/// Restores `name` (on a shell when `shell_of` names the shape the pool must hold and give),
/// checks its bytes and returns it with its output, not started.
fn restore(store: &Store, name: &str, mode: RestoreMode, shell_of: Option<Shape>, what: &str) -> (Vm, SharedOutput) {
    if let Some(s) = shell_of {
        common::shell::wait_ready(s, "");
    }
    let t = taken();
    let out = SharedOutput::default();
    let opts = RestoreOptions { track_dirty: true, ..RestoreOptions::new(mode, Box::new(out.clone())) };
    let (vm, _) = snapshot::restore(store, name, opts).unwrap_or_else(|e| panic!("{what}: restore: {e}"));
    assert_eq!(taken(), t + u64::from(shell_of.is_some()), "{what}: shells taken");
    assert_blocks_match(&vm, store, name, what);
    (vm, out)
}

#[test]
fn multi_vcpu_vms_restored_on_shells_run_on_and_their_snapshots_restore_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    shell::enable(true);
    for (vcpus, seed) in [(2u64, 21), (4, 23)] {
        let shape = Shape { mem_bytes: MEM << 20, vcpus: vcpus as u8 };
        let name = format!("m{vcpus}");
        let before = snapshot_memfill(&store, &name, vcpus, seed);
        // The first restore of this shape builds its VM and asks for a shell.
        drop(restore(&store, &name, RestoreMode::Eager, None, &format!("{vcpus} vCPUs, first restore")));
        for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
            let what = format!("{vcpus} vCPUs, {mode:?} on a shell");
            let (mut vm, out) = restore(&store, &name, mode, Some(shape), &what);
            vm.start().expect("start");
            let after = wait_lines(&out, 2, Duration::from_secs(60));
            vm.stop("test done");
            check_continues(&before, &after, seed, MEM);
        }

        // Snapshots of a VM restored on a shell: background, incremental, stop.
        let what = format!("{vcpus} vCPUs, the VM snapshotted");
        let (mut vm, out) = restore(&store, &name, RestoreMode::Lazy, Some(shape), &what);
        vm.start().expect("start");
        wait_lines(&out, 1, Duration::from_secs(60));
        let bg = format!("{name}-bg");
        snapshot::save(&vm, &store, &bg, &paused(SaveMode::Background), &|_| {}).expect("background snapshot");
        assert_blocks_match(&vm, &store, &bg, &format!("{what}: background"));
        vm.resume();
        wait_lines(&out, 2, Duration::from_secs(60));
        let inc = format!("{name}-inc");
        let r = snapshot::save(&vm, &store, &inc, &paused(SaveMode::Stop), &|_| {}).expect("incremental snapshot");
        assert!(r.incremental, "{what}: not incremental on {bg}: {:?}", r.full_reason);
        assert_blocks_match(&vm, &store, &inc, &format!("{what}: incremental"));
        let before_inc = format!("{before}{}", out.text());
        vm.stop("snapshots taken");

        // The incremental snapshot restores exactly on a fresh VM (a shell of the shape is
        // ready: the pool is bypassed) and on a shell.
        let out = SharedOutput::default();
        let opts =
            RestoreOptions { prebuilt_shell: false, ..RestoreOptions::new(RestoreMode::Eager, Box::new(out.clone())) };
        let t = taken();
        let (mut vm, _) = snapshot::restore(&store, &inc, opts).expect("fresh restore");
        assert_eq!(taken(), t, "a restore asking for a fresh VM took a shell");
        assert_blocks_match(&vm, &store, &inc, &format!("{what}: incremental on a fresh VM"));
        vm.start().expect("start");
        let after = wait_lines(&out, 2, Duration::from_secs(60));
        vm.stop("test done");
        check_continues(&before_inc, &after, seed, MEM);
        for mode in [RestoreMode::LazyPrefetch, RestoreMode::Eager] {
            let (mut vm, out) = restore(&store, &inc, mode, Some(shape), &format!("{what}: incremental, {mode:?}"));
            vm.start().expect("start");
            let after = wait_lines(&out, 2, Duration::from_secs(60));
            vm.stop("test done");
            check_continues(&before_inc, &after, seed, MEM);
        }
    }

    // A shell taken straight from the pool holds no VM's bytes: every page reads zero.
    let last = Shape { mem_bytes: MEM << 20, vcpus: 4 };
    common::shell::wait_ready(last, "");
    let sh = shell::take(last).expect("the ready shell");
    let block = sh.ram.block();
    // SAFETY: the block's mapping is `size` bytes and lives as long as `block`.
    let bytes = unsafe { std::slice::from_raw_parts(block.host_addr().cast_const(), sh.ram.size() as usize) };
    assert!(bytes.iter().all(|b| *b == 0), "a pre-built shell's memory holds bytes");
}
