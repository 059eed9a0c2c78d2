//! Hostile checks of the pre-built VM shell pool with firmware: a SeaBIOS VM snapshotted after
//! its table-loader ran, restored on a shell (eager and lazy), holds the same bytes as one
//! restored afresh, and a guest reset
//! of it afterwards runs SeaBIOS again to its table-loader (the GUID placed again), as a
//! reset of the same snapshot restored on a fresh VM does: the power-on state a reset goes
//! back to is the shell's vCPUs' and VM's as created, which were made earlier than the
//! restore.
//!
//! One test: the pool is the process's.

mod common;

use std::time::{Duration, Instant};

use common::ram::{assert_same_ram, ram_of};
use common::seabios_vm::{firmware_vm, guest_read, run_loader};
use hypervisor::shell::{self, Shape};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use hypervisor::vm::{SharedOutput, Vm};

/// Resets `vm` (paused) and runs it until SeaBIOS placed the GUID again and the tables are
/// patched; checks the GUID's bytes.
fn reset_reruns_the_firmware(vm: &mut Vm, what: &str) {
    let rt = vm.devices().acpi.clone().expect("ACPI runtime");
    let dev = vm.devices().vmgenid.clone().expect("vmgenid");
    let guid = dev.guid();
    vm.control().request_reset("test".into());
    let t0 = Instant::now();
    while vm.control().resets() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: the reset was not carried out");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(dev.addr(), 0, "{what}: the GUID's address survived the reset");
    vm.resume();
    let t0 = Instant::now();
    while !(dev.addr() != 0 && rt.state().patched) {
        assert!(vm.control().exit_reason().is_none(), "{what}: the VM ended: {:?}", vm.control().exit_reason());
        assert!(t0.elapsed() < Duration::from_secs(90), "{what}: SeaBIOS did not run its loader again after the reset");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(vm.pause());
    assert_eq!(guest_read(vm, dev.addr(), 16), guid.guest_bytes(), "{what}: the GUID after the reset");
}

#[test]
fn a_seabios_vm_restored_on_a_shell_resets_as_one_restored_afresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let mut vm = firmware_vm(Vec::new());
    run_loader(&mut vm);
    snapshot::save(&vm, &store, "fw", &SaveOptions::default(), &|_| {}).expect("snapshot");
    drop(vm);

    shell::enable(true);
    let shape = Shape { mem_bytes: 128 << 20, vcpus: 1 };
    // KVM writes the guest's kvmclock page (SeaBIOS uses kvmclock) when the restore sets the
    // vCPU's state, so the VM's RAM is compared with a restore of the same snapshot built
    // afresh rather than with the store.
    let mut fresh = None;
    for (on_shell, mode) in [(false, RestoreMode::Eager), (true, RestoreMode::Eager), (true, RestoreMode::Lazy)] {
        let what = if on_shell { "restored on a shell" } else { "restored afresh" };
        if on_shell {
            let deadline = Instant::now() + Duration::from_secs(60);
            while shell::ready_shape() != Some(shape) {
                assert!(Instant::now() < deadline, "no shell was built: {:?}", shell::ready_shape());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let taken = shell::counts().0;
        let opts = RestoreOptions::new(mode, Box::new(SharedOutput::default()));
        let (mut vm, _) = snapshot::restore(&store, "fw", opts).expect("restore");
        assert_eq!(shell::counts().0, taken + u64::from(on_shell), "{what}: shells taken");
        let ram = ram_of(&vm);
        match &fresh {
            None => fresh = Some(ram),
            Some(want) => assert_same_ram(&ram, want, &format!("{what}, {mode:?}")),
        }
        // Running on from the snapshot, then reset.
        vm.start().expect("start");
        std::thread::sleep(Duration::from_millis(200));
        assert!(vm.pause(), "{what}: pause");
        reset_reruns_the_firmware(&mut vm, what);
        vm.stop("test done");
    }
}
