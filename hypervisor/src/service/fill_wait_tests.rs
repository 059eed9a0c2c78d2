//! A client's pause or stop of a VM whose snapshot waits for a lazy restore's fill: the wait
//! ends, so the request waits only for the snapshot's copy, not for the fill (up to a
//! minute: before, it queued behind the wait and the client got 504 after 30 s).

use std::sync::Arc;
use std::time::Duration;

use super::actor::{Cmd, Reply, VmState};
use super::daemon::{test_daemon, Daemon, Logs};
use super::vm_def::VmDef;
use crate::guests::{touch, Builtin};
use crate::snapshot::{self, RestoreMode, RestoreOptions, SaveMode, SaveOptions, SaveReport};
use crate::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};

/// VM `v` in `d`: a 256 MiB `touch` guest with all its memory filled, snapshotted as `a` and
/// restored lazily with one fill thread, running (the fill takes a few hundred ms at least).
fn filling_vm(d: &Arc<Daemon>) {
    let boot = BootSource::Builtin { guest: Builtin::Touch, params: BuiltinParams { seed: 5, ..Default::default() } };
    let mut vm = Vm::new(VmConfig::new(256, 1, boot, Box::new(SharedOutput::default()))).expect("create VM");
    vm.start().expect("start");
    vm.control().wait_mark(touch::MARK_FILLED, Duration::from_secs(120)).expect("touch filled its memory");
    let stop = SaveOptions { mode: SaveMode::Stop, stay_paused: true, ..Default::default() };
    snapshot::save(&vm, &d.store, "a", &stop, &|_| {}).expect("snapshot a");
    vm.stop("snapshot taken");
    drop(vm);
    let logs = Logs::new();
    let opts = RestoreOptions { fill_threads: 1, ..logs.restore_options(RestoreMode::Lazy, "VM 'v'".into()) };
    let (mut vm, _) = snapshot::restore(&d.store, "a", opts).expect("lazy restore");
    vm.start().expect("start the restored VM");
    let def = VmDef::restored("v", "a", vm.spec());
    let claim = d.claim_macs("v", &[]).expect("no MACs to claim");
    let h = d.spawn_actor(def, Some((vm, logs, claim)), None);
    d.lock().insert("v".into(), h);
}

/// Takes background snapshot `b` of `v` with `then` queued behind it; both answers.
async fn snapshot_with(d: &Arc<Daemon>, then: Cmd) -> (SaveReport, VmState) {
    let snap = {
        let d = d.clone();
        tokio::spawn(async move {
            let cmd = Cmd::Snapshot { name: "b".into(), live: false, mode: SaveMode::Background, progress: None };
            d.call("v", cmd).await
        })
    };
    // The snapshot is queued first (the actor takes requests in order); the fill goes on
    // for far longer than this.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let state = match d.call("v", then).await {
        Ok(Reply::Info(info)) => info.state,
        Ok(_) => panic!("not a VM's status"),
        Err(e) => panic!("the request behind the snapshot failed: {e}"),
    };
    let report = match snap.await.expect("snapshot task") {
        Ok(Reply::Snapshot(r)) => *r,
        Ok(_) => panic!("not a snapshot report"),
        Err(e) => panic!("snapshot b failed: {e}"),
    };
    (report, state)
}

/// Restores `b` eagerly and checks it holds the guest `a` held (the touch guest wrote
/// nothing since: it waits for its go).
fn b_is_a(d: &Arc<Daemon>) {
    let same = |name: &str| {
        let m = d.store.manifest(name).expect("manifest");
        m.blocks.iter().map(|b| (b.idstr.clone(), b.chunks.clone())).collect::<Vec<_>>()
    };
    assert!(same("a") == same("b"), "snapshot b does not hold a's memory");
    let opts = RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default()));
    let (vm, _) = snapshot::restore(&d.store, "b", opts).expect("restore b");
    drop(vm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_queued_behind_a_snapshot_waiting_for_a_lazy_fill_ends_the_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = test_daemon(dir.path());
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || filling_vm(&d2)).await.expect("setup");
    let (report, state) = snapshot_with(&d, Cmd::Stop).await;
    let waited = report.fill_wait.expect("the snapshot began to wait for the fill");
    // With the wait not ended, the snapshot waits for the whole fill and runs in the
    // background: the stop waited for all of it.
    assert!(!waited.resident, "the snapshot waited for the fill with a stop queued behind it");
    assert_eq!(report.mode, SaveMode::Stop, "{:?}", report.mode_reason);
    assert_eq!(state, VmState::Stopped);
    b_is_a(&d);
    assert!(d.forget("v", "test done").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_queued_behind_a_snapshot_waiting_for_a_lazy_fill_ends_the_wait_and_is_counted_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = test_daemon(dir.path());
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || filling_vm(&d2)).await.expect("setup");
    let (report, state) = snapshot_with(&d, Cmd::Pause).await;
    assert!(!report.fill_wait.expect("it waited").resident, "a pause queued behind did not end the wait");
    assert_eq!(report.mode, SaveMode::Stop, "{:?}", report.mode_reason);
    assert_eq!(state, VmState::Paused);
    b_is_a(&d);
    // Every request taken was counted off: a count left over would end every later wait.
    assert!(matches!(d.call("v", Cmd::Resume).await, Ok(Reply::Info(_))));
    assert_eq!(d.controls_queued("v"), 0);
    assert!(d.forget("v", "test done").await);
}
