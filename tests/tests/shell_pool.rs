//! Pre-built VM shells (hypervisor's shell.rs): a restore of the shape the pool holds takes
//! the shell, and the VM built on it holds the snapshot's bytes and runs on exactly as the
//! snapshot left it, in every restore mode; its kvmclock starts at the restore, not when the
//! shell was built; a restore of another shape, a restore that opts out and a VM that boots
//! never take one; the pool keeps at most one shell, and turning it off drops it.
//!
//! One test: the pool is the process's, and the steps depend on what it holds.

mod common;

use std::time::{Duration, Instant};

use common::memfill::{check_continues, wait_lines};
use common::ram::assert_blocks_match;
use hypervisor::guests::Builtin;
use hypervisor::shell::{self, Shape};
use hypervisor::snapshot::restore::{encode_prefetch, PREFETCH_ATTACHMENT};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions};
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};
use storage::Store;

/// The kvmclock a restore of `name` starts from (the VM state's), read through a restore
/// built afresh.
fn store_clock(store: &Store, name: &str) -> u64 {
    let opts =
        RestoreOptions { prebuilt_shell: false, ..RestoreOptions::new(RestoreMode::Eager, Box::new(std::io::sink())) };
    let (vm, _) = snapshot::restore(store, name, opts).expect("restore");
    vm.fd().get_clock().expect("KVM_GET_CLOCK").clock
}

fn shape(mem: u64) -> Shape {
    Shape { mem_bytes: mem << 20, vcpus: 1 }
}

fn taken() -> u64 {
    shell::counts().0
}

/// Restores `name`, checks it against the store and lets it run two passes on.
fn restore_and_check(store: &Store, name: &str, mode: RestoreMode, before: &str, seed: u64, mem: u64, what: &str) {
    let out = SharedOutput::default();
    let (mut vm, _) = snapshot::restore(store, name, RestoreOptions::new(mode, Box::new(out.clone())))
        .unwrap_or_else(|e| panic!("{what}: restore: {e}"));
    assert_blocks_match(&vm, store, name, what);
    vm.start().expect("start");
    let after = wait_lines(&out, 2, Duration::from_secs(60));
    vm.stop("test done");
    check_continues(before, &after, seed, mem);
}

#[test]
fn restores_take_a_prebuilt_shell_of_their_shape_and_run_as_on_a_fresh_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    let (a_mem, a_seed, b_mem, b_seed) = (32, 7, 16, 9);
    let a_before = common::shell::snapshot_memfill(&store, "a", a_mem, a_seed);
    let b_before = common::shell::snapshot_memfill(&store, "b", b_mem, b_seed);
    // All of pc.ram as the working set, for the prefetching modes.
    let list: Vec<(String, u64)> = (0..a_mem << 20).step_by(0x10000).map(|o| ("pc.ram".to_string(), o)).collect();
    store.put_attachment("a", PREFETCH_ATTACHMENT, &encode_prefetch(&list)).expect("attachment");

    let a_clock = store_clock(&store, "a");
    shell::enable(true);
    // The first restore finds no shell: built afresh, and a shell of its shape is asked for,
    // built once the VM has run (at most 100 ms later): not while it has not started.
    let t = taken();
    let (vm, _) = snapshot::restore(&store, "a", RestoreOptions::new(RestoreMode::Eager, Box::new(std::io::sink())))
        .expect("restore");
    assert_eq!(taken(), t, "the first restore found a shell in an empty pool");
    std::thread::sleep(Duration::from_millis(40));
    assert_eq!(shell::ready_shape(), None, "a shell was built before the restored VM ran");
    drop(vm);
    common::shell::wait_ready(shape(a_mem), "");
    restore_and_check(&store, "a", RestoreMode::Eager, &a_before, a_seed, a_mem, "restore on a shell");
    assert_eq!(taken(), t + 1, "the ready shell was not taken");

    for mode in [RestoreMode::Eager, RestoreMode::Lazy, RestoreMode::LazyPrefetch, RestoreMode::LazyPrefetchBefore] {
        common::shell::wait_ready(shape(a_mem), "");
        // The shell is older than a VM created by the restore would be: what counts from its
        // creation (kvmclock) reads the snapshot's value all the same.
        std::thread::sleep(Duration::from_millis(400));
        let t = taken();
        let out = SharedOutput::default();
        let (mut vm, _) =
            snapshot::restore(&store, "a", RestoreOptions::new(mode, Box::new(out.clone()))).expect("restore");
        assert_eq!(taken(), t + 1, "{mode:?}: the ready shell of the VM's shape was not taken");
        let clock = vm.fd().get_clock().expect("KVM_GET_CLOCK").clock;
        assert!(clock.abs_diff(a_clock) < 200_000_000, "{mode:?}: kvmclock {clock} ns, the snapshot's {a_clock} ns");
        assert_blocks_match(&vm, &store, "a", &format!("{mode:?} restore on a shell"));
        vm.start().expect("start");
        let after = wait_lines(&out, 2, Duration::from_secs(60));
        vm.stop("test done");
        check_continues(&a_before, &after, a_seed, a_mem);
    }

    // Another shape: the ready shell stays unused, and the pool turns to the new shape.
    common::shell::wait_ready(shape(a_mem), "");
    let t = taken();
    restore_and_check(&store, "b", RestoreMode::Lazy, &b_before, b_seed, b_mem, "restore of another shape");
    assert_eq!(taken(), t, "a shell of another shape was taken");
    common::shell::wait_ready(shape(b_mem), "");

    // A VM that boots, of the ready shape, never takes it.
    let t = taken();
    let vm = Vm::new(VmConfig::new(
        b_mem,
        1,
        BootSource::Builtin { guest: Builtin::Memfill, params: BuiltinParams { seed: 1, ..Default::default() } },
        Box::new(SharedOutput::default()),
    ))
    .expect("vm");
    drop(vm);
    assert_eq!(taken(), t, "a booting VM took a shell");
    assert_eq!(shell::ready_shape(), Some(shape(b_mem)));

    // A restore that opts out builds its own.
    let opts =
        RestoreOptions { prebuilt_shell: false, ..RestoreOptions::new(RestoreMode::Eager, Box::new(std::io::sink())) };
    drop(snapshot::restore(&store, "b", opts).expect("restore"));
    assert_eq!(taken(), t, "a restore asking for a fresh VM took a shell");
    assert_eq!(shell::ready_shape(), Some(shape(b_mem)));

    // Off: the ready shell goes, and none is built or taken.
    shell::enable(false);
    assert_eq!(shell::ready_shape(), None, "turning the pool off kept its shell");
    restore_and_check(&store, "b", RestoreMode::Eager, &b_before, b_seed, b_mem, "restore with the pool off");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(taken(), t);
    assert_eq!(shell::ready_shape(), None, "a shell was built with the pool off");
}

/// Through the daemon: its second restore of a shape takes the shell its first asked for,
/// and the VM runs on with its memory intact; `--no-shell-pool` keeps none.
#[test]
fn the_daemon_restores_on_a_prebuilt_shell_unless_told_not_to() {
    use serde_json::json;
    for pool in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let args: &[&str] = if pool { &[] } else { &["--no-shell-pool"] };
        let d = common::daemon::Daemon::start(dir.path(), args);
        d.ok(
            "POST",
            "/vms",
            Some(json!({"name": "m", "guest": "memfill", "mem_mib": 16, "seed": 3, "passes": 0, "start": true})),
        );
        d.wait_serial("m", "memfill pass 1 ", Duration::from_secs(60));
        d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "s", "mode": "stop"})));
        d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "r0", "mode": "lazy"})));
        let deadline = Instant::now() + Duration::from_secs(60);
        while pool && d.metric("snapvisor_vm_shells_ready") == 0 {
            assert!(Instant::now() < deadline, "no shell was built after a restore");
            std::thread::sleep(Duration::from_millis(10));
        }
        d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "r1", "mode": "lazy"})));
        assert_eq!(d.metric("snapvisor_vm_shells_taken_total"), u64::from(pool), "pool {pool}");
        if !pool {
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(d.metric("snapvisor_vm_shells_ready"), 0, "--no-shell-pool built a shell");
            assert_eq!(d.metric("snapvisor_vm_shells_built_total"), 0, "--no-shell-pool built a shell");
        }
        for vm in ["r0", "r1"] {
            // Two complete passes after the restore, each finding the previous one intact.
            d.wait_intact_passes(vm, 2, &format!("pool {pool}"));
        }
    }
}
