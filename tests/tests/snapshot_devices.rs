//! Every device on the machine's buses must be saved by a snapshot fragment: a device without
//! one fails the snapshot, naming it, and nothing is committed.

mod common;

use std::sync::{Arc, Mutex};

use common::{start_builtin, Scratch};
use hypervisor::guests::Builtin;
use hypervisor::machine::BusKind;
use hypervisor::snapshot::{self, SaveOptions, SnapshotError};
use hypervisor::vm::BuiltinParams;

#[test]
fn a_device_without_a_snapshot_fragment_fails_the_snapshot_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("open store");
    let (mut vm, _out) = start_builtin(Builtin::Idle, 16, BuiltinParams::default());
    let opts = SaveOptions::default();
    snapshot::save(&vm, &store, "before", &opts, &|_| {}).expect("the machine as built snapshots");

    vm.add_device("scratch register", Arc::new(Mutex::new(Scratch(7))), BusKind::Mmio, 0xfef0_2000, 0x10)
        .expect("add a device");
    let err = snapshot::save(&vm, &store, "after", &opts, &|_| {}).expect_err("a device with no fragment");
    assert!(matches!(err, SnapshotError::DeviceNotSaved { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("'scratch register'") && msg.contains("MMIO 0xfef02000"), "{msg}");
    assert_eq!(store.list().expect("list"), vec!["before".to_string()], "nothing committed");
    vm.stop("test over");
}
