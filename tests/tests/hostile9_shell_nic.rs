//! Hostile checks of the pre-built VM shell pool (hypervisor's shell.rs) with a NIC: a memfill
//! VM with a virtio-net NIC on a tap, restored on a shell (eager and lazy), has its NIC with
//! the snapshot's MAC and BAR placement, holds the snapshot's bytes and runs on intact; its
//! tap is released when it goes, so the next restore on a shell opens it again.
//!
//! One test: the pool is the process's.

mod common;

use std::time::{Duration, Instant};

use common::memfill::{check_continues, wait_lines};
use common::ram::assert_blocks_match;
use hypervisor::guests::{Builtin, MemfillMode};
use hypervisor::net::{NetSpec, RomChoice};
use hypervisor::shell::{self, Shape};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};
use storage::Store;

const MEM: u64 = 16;

#[test]
fn a_vm_with_a_nic_restored_on_a_shell_has_its_nic_and_runs_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    // A tap of this process's own (created on open, as root; gone with its last user).
    let tap = format!("h9n{}", std::process::id() % 100_000);
    let seed = 8;
    let params = BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() };
    let out = SharedOutput::default();
    let mut cfg = VmConfig::new(MEM, 1, BootSource::Builtin { guest: Builtin::Memfill, params }, Box::new(out.clone()));
    cfg.net = vec![NetSpec { tap: tap.clone(), mac: None, rom: RomChoice::None, romsize: None }];
    let mut vm = Vm::new(cfg).expect("VM with a NIC");
    let want_nic = vm.devices().nics[0].spec.clone();
    vm.start().expect("start");
    wait_lines(&out, 1, Duration::from_secs(60));
    snapshot::save(&vm, &store, "n", &SaveOptions { stay_paused: true, ..Default::default() }, &|_| {})
        .expect("snapshot");
    let before = out.text();
    vm.stop("snapshot taken");
    drop(vm);

    shell::enable(true);
    let shape = Shape { mem_bytes: MEM << 20, vcpus: 1 };
    for (on_shell, mode) in [(false, RestoreMode::Eager), (true, RestoreMode::Eager), (true, RestoreMode::Lazy)] {
        let what = format!("{mode:?}, on a shell: {on_shell}");
        if on_shell {
            let deadline = Instant::now() + Duration::from_secs(60);
            while shell::ready_shape() != Some(shape) {
                assert!(Instant::now() < deadline, "{what}: no shell was built: {:?}", shell::ready_shape());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let taken = shell::counts().0;
        let out = SharedOutput::default();
        let (mut vm, _) = snapshot::restore(&store, "n", RestoreOptions::new(mode, Box::new(out.clone())))
            .unwrap_or_else(|e| panic!("{what}: restore: {e}"));
        assert_eq!(shell::counts().0, taken + u64::from(on_shell), "{what}: shells taken");
        assert_eq!(vm.devices().nics.len(), 1, "{what}: NICs");
        assert_eq!(vm.devices().nics[0].spec, want_nic, "{what}: the NIC");
        assert_blocks_match(&vm, &store, "n", &what);
        vm.start().expect("start");
        let after = wait_lines(&out, 2, Duration::from_secs(60));
        vm.stop("test done");
        check_continues(&before, &after, seed, MEM);
    }
}
