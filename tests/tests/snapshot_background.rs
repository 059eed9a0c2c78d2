//! Background snapshots (userfaultfd write protection) on real KVM: the snapshot holds memory
//! exactly as it was at the pause although the guest (and devices) kept writing it, full and
//! incremental, restored eagerly and lazily; a resize cancels one with the VM running on; a
//! process killed in the middle leaves the store as it was; a lazily restored VM still being
//! filled gets its fill finished first (a cancel ends that wait), falls back to stop-and-copy
//! and says so when nothing fills it, and snapshots in the background once it is resident.
//!
//! "At the pause" is seen through the `after_protect` hook, which runs with the vCPUs still
//! paused right after RAM was write-protected: every RAM block is copied there and compared
//! with the restored VM's, byte for byte.

mod common;

use common::memfill::{check_continues, wait_lines};
use common::ram::{assert_same_ram, ram_of, Ram};

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{snapvisor, snapvisor_bin, start_builtin};
use devices::bus::BusDevice;
use devices::fw_cfg::{DMA_CTL_READ, DMA_CTL_SELECT, PORT_BASE, PORT_DMA};
use hypervisor::guests::{idle, touch, Builtin, MemfillMode};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveHooks, SaveMode, SaveOptions, SnapshotError};
use hypervisor::vm::{BootSource, BuiltinParams, FwCfgFile, SharedOutput, Vm, VmConfig};

/// What the hook saw at the pause: every block and the guest's output so far.
type AtPause = Arc<Mutex<Option<(Ram, String)>>>;

fn capturing(out: &SharedOutput) -> (SaveOptions, AtPause) {
    let seen: AtPause = Arc::default();
    let (s, o) = (seen.clone(), out.clone());
    let hooks = SaveHooks {
        after_protect: Some(Arc::new(move |vm: &Vm| {
            *s.lock().expect("lock") = Some((ram_of(vm), o.text()));
        })),
        broken_protection: false,
        // The tests below assert that a guest write met a protected chunk; on a loaded host
        // the saver could otherwise finish before the guest ran at all.
        copy_after_first_fault: true,
        ..SaveHooks::NONE
    };
    (SaveOptions { hooks, ..Default::default() }, seen)
}

/// Snapshot `name` of a memfill guest restores, eagerly and lazily, to `ram` (its memory at
/// the pause), and the guest goes on from `before` (its output up to the pause).
fn restores_to_the_pause(store: &storage::Store, name: &str, ram: &Ram, before: &str, seed: u64, mem: u64) {
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let out = SharedOutput::default();
        let (mut vm, _) =
            snapshot::restore(store, name, RestoreOptions::new(mode, Box::new(out.clone()))).expect("restore");
        assert_same_ram(&ram_of(&vm), ram, &format!("{name} restored {mode:?}"));
        vm.start().expect("start");
        let after = wait_lines(&out, 2, Duration::from_secs(120));
        vm.stop("test done");
        check_continues(before, &after, seed, mem);
    }
}

/// A memfill guest of `mem` MiB rewriting its memory, snapshotted (stop-and-copy) as "a"
/// into `store` once it printed a pass line; returns its output up to the snapshot.
fn memfill_snapshot(store: &storage::Store, mem: u64, seed: u64) -> String {
    let (mut vm, out) = start_builtin(
        Builtin::Memfill,
        mem,
        BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    wait_lines(&out, 1, Duration::from_secs(120));
    let stop = SaveOptions { mode: SaveMode::Stop, stay_paused: true, ..Default::default() };
    snapshot::save(&vm, store, "a", &stop, &|_| {}).expect("snapshot a");
    let before = out.text();
    vm.stop("snapshot taken");
    before
}

/// A 256 MiB touch guest, filled and snapshotted as "a" into `store`, then restored lazily
/// with one fill thread and started: one fill thread loads its 4,096 stored chunks (~65 µs
/// each here, more on a loaded host), so a flag set 20 ms into a snapshot's wait for the
/// fill comes long before the fill ends.
fn filling_touch(store: &storage::Store) -> Vm {
    let (mut vm, _) = start_builtin(Builtin::Touch, 256, BuiltinParams { seed: 9, ..Default::default() });
    vm.control().wait_mark(touch::MARK_FILLED, Duration::from_secs(120)).expect("touch filled its memory");
    let stop = SaveOptions { mode: SaveMode::Stop, stay_paused: true, ..Default::default() };
    snapshot::save(&vm, store, "a", &stop, &|_| {}).expect("snapshot a");
    vm.stop("snapshot taken");
    drop(vm);
    let opts =
        RestoreOptions { fill_threads: 1, ..RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default())) };
    let (mut vm, _) = snapshot::restore(store, "a", opts).expect("lazy restore");
    vm.start().expect("start");
    vm
}

/// A flag, and the thread that sets it 20 ms from now.
fn set_in_20_ms() -> (Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>) {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        f.store(true, std::sync::atomic::Ordering::Release);
    });
    (flag, setter)
}

#[test]
fn a_background_snapshot_of_a_guest_rewriting_all_memory_restores_to_the_pause_full_and_incremental() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mem, seed) = (128, 31);
    let (mut vm, out) = start_builtin(
        Builtin::Memfill,
        mem,
        BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    wait_lines(&out, 1, Duration::from_secs(60));
    let mut taken = Vec::new();
    for name in ["full", "incremental"] {
        let (opts, seen) = capturing(&out);
        let report = snapshot::save(&vm, &store, name, &opts, &|_| {}).expect("background snapshot");
        assert_eq!(report.mode, SaveMode::Background, "{:?}", report.mode_reason);
        assert_eq!(report.incremental, name == "incremental", "{:?}", report.full_reason);
        // The guest wrote memory the snapshot had not saved yet: the protection was exercised.
        let wp = report.wp.expect("write-protect stats");
        assert!(wp.faults > 0, "{name}: no write met a protected chunk: {wp:?}");
        taken.push((name, seen.lock().expect("lock").take().expect("the hook ran")));
    }
    // The guest ran on after each snapshot.
    assert!(vm.control().exit_reason().is_none());
    vm.stop("snapshots taken");
    drop(vm);

    for (name, (ram, before)) in &taken {
        for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
            let out2 = SharedOutput::default();
            let (mut vm2, _) =
                snapshot::restore(&store, name, RestoreOptions::new(mode, Box::new(out2.clone()))).expect("restore");
            assert_same_ram(&ram_of(&vm2), ram, &format!("{name} restored {mode:?}"));
            vm2.start().expect("start");
            let after = wait_lines(&out2, 2, Duration::from_secs(60));
            vm2.stop("test done");
            check_continues(before, &after, seed, mem);
        }
    }
}

const FILE: &str = "opt/snapvisor/blob";
const DESC: u64 = 0x40_0000;
const BUF: u64 = 0x50_0000;

#[test]
fn fw_cfg_dma_during_a_background_snapshot_lands_in_the_vm_and_the_snapshot_keeps_the_bytes_of_the_pause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i * 7 + 1) as u8).collect();
    let out = SharedOutput::default();
    let mut cfg = VmConfig::new(
        16,
        1,
        BootSource::Builtin { guest: Builtin::Idle, params: BuiltinParams::default() },
        Box::new(out.clone()),
    );
    cfg.fw_cfg_files = vec![FwCfgFile { name: FILE.into(), data: data.clone() }];
    let mut vm = Vm::new(cfg).expect("vm");
    vm.start().expect("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.text() != idle::READY {
        assert!(Instant::now() < deadline, "the idle guest never got ready: {:?}", out.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    let fw_cfg = vm.devices().fw_cfg.clone();
    let key = fw_cfg.lock().expect("fw_cfg").file(FILE).expect("listed").0;
    let ram = vm.ram().block().clone();
    let at_pause: Arc<Mutex<Option<Ram>>> = Arc::default();
    let seen = at_pause.clone();
    let (dma_data, dma_ram) = (data.clone(), ram.clone());
    let hooks = SaveHooks {
        after_protect: Some(Arc::new(move |vm: &Vm| {
            *seen.lock().expect("lock") = Some(ram_of(vm));
            // With RAM write-protected, the device fills the buffer by DMA, as a guest's request
            // would have it do: its writes fault and wait until their chunks are saved.
            let mut desc = Vec::new();
            desc.extend_from_slice(&((u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_READ).to_be_bytes());
            desc.extend_from_slice(&(dma_data.len() as u32).to_be_bytes());
            desc.extend_from_slice(&BUF.to_be_bytes());
            dma_ram.write(DESC, &desc).expect("descriptor");
            let mut f = vm.devices().fw_cfg.lock().expect("fw_cfg");
            f.write(PORT_BASE, PORT_DMA, &0u32.to_be_bytes());
            f.write(PORT_BASE, PORT_DMA + 4, &(DESC as u32).to_be_bytes());
        })),
        broken_protection: false,
        ..SaveHooks::NONE
    };
    let report =
        snapshot::save(&vm, &store, "bg", &SaveOptions { hooks, ..Default::default() }, &|_| {}).expect("snapshot");
    assert_eq!(report.mode, SaveMode::Background, "{:?}", report.mode_reason);
    // The VM has the new bytes: the DMA completed (zero status) into its buffer.
    let mut status = [0xffu8; 4];
    ram.read(DESC, &mut status).expect("status");
    assert_eq!(status, [0; 4], "DMA succeeded");
    let mut got = vec![0u8; data.len()];
    ram.read(BUF, &mut got).expect("buffer");
    assert_eq!(got, data, "the VM's buffer holds the file");
    vm.stop("snapshot taken");
    drop(vm);
    let at_pause = at_pause.lock().expect("lock").take().expect("the hook ran");
    let pc_ram = &at_pause.iter().find(|(n, _)| n == "pc.ram").expect("pc.ram").1;
    assert!(pc_ram[BUF as usize..][..data.len()] != data[..], "the buffer did not hold the file at the pause");
    // The snapshot has the bytes of the pause, not the DMA's.
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let (vm2, _) = snapshot::restore(&store, "bg", RestoreOptions::new(mode, Box::new(SharedOutput::default())))
            .expect("restore");
        assert_same_ram(&ram_of(&vm2), &at_pause, &format!("restored {mode:?}"));
    }
}

#[test]
fn a_resize_during_a_background_snapshot_cancels_it_and_the_vm_runs_on_unprotected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let out = SharedOutput::default();
    let mut cfg = VmConfig::new(
        64,
        1,
        BootSource::Builtin {
            guest: Builtin::Memfill,
            params: BuiltinParams { seed: 1, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
        },
        Box::new(out.clone()),
    );
    cfg.fw_cfg_files = vec![FwCfgFile { name: FILE.into(), data: vec![5; 5000] }];
    let mut vm = Vm::new(cfg).expect("vm");
    vm.start().expect("start");
    wait_lines(&out, 1, Duration::from_secs(60));
    let hooks = SaveHooks {
        after_protect: Some(Arc::new(|vm: &Vm| {
            vm.registry().resize("/rom@opt/snapvisor/blob", 9000).expect("resize");
        })),
        broken_protection: false,
        ..SaveHooks::NONE
    };
    let err = snapshot::save(&vm, &store, "cancelled", &SaveOptions { hooks, ..Default::default() }, &|_| {})
        .expect_err("the resize must cancel the snapshot");
    assert!(matches!(err, SnapshotError::ResizedDuringSnapshot(_)), "{err}");
    assert_eq!(err.to_string(), "RAM block '/rom@opt/snapvisor/blob' resized during snapshot");
    assert!(store.list().expect("list").is_empty(), "nothing committed");
    // The guest runs on.
    let n = out.text().lines().count();
    wait_lines(&out, n + 1, Duration::from_secs(60));
    assert!(out.text().lines().count() > n, "the guest stopped");
    assert!(vm.control().exit_reason().is_none());
    // Nothing is protected any more: a device write goes through without anyone serving it.
    let (tx, rx) = std::sync::mpsc::channel();
    let mem = vm.ram().device_memory().clone();
    std::thread::spawn(move || {
        let _ = tx.send(mem.write(0x300_0000, &[0xab; 8192]));
    });
    let written = rx.recv_timeout(Duration::from_secs(30)).expect("a device write hung: memory still protected");
    written.expect("device write");
    // And a background snapshot without a resize then succeeds.
    let r = snapshot::save(&vm, &store, "after", &SaveOptions::default(), &|_| {}).expect("snapshot");
    assert_eq!(r.mode, SaveMode::Background);
    vm.stop("done");
}

#[test]
fn a_process_killed_during_a_background_save_leaves_no_snapshot_listed_and_the_store_sound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut child = Command::new(snapvisor_bin())
        .args(["-v", "run", "--builtin", "memfill", "--mem-mib", "1024", "--passes", "0"])
        .args(["--snapshot-after-ms", "300", "--name", "killed", "--store"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvisor");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("stderr line");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("background copy started") {
            break;
        }
        assert!(!line.contains("committed"), "committed before the copy was seen starting:\n{seen}");
    }
    assert!(seen.contains("background copy started"), "no background copy:\n{seen}");
    child.kill().expect("kill");
    child.wait().expect("wait");
    let list = snapvisor(&["store", "list", "--store", store.to_str().expect("utf-8"), "--json"]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{listed}");
    assert!(!listed.contains("killed"), "a half snapshot is listed: {listed}");
    let verify = snapvisor(&["store", "verify", "--store", store.to_str().expect("utf-8")]);
    assert!(verify.status.success(), "verify: {}", String::from_utf8_lossy(&verify.stdout));
}

#[test]
fn a_lazily_restored_vm_not_yet_resident_falls_back_to_stop_and_copy_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mut vm, _) = start_builtin(Builtin::Touch, 64, BuiltinParams { seed: 8, ..Default::default() });
    vm.control().wait_mark(touch::MARK_FILLED, Duration::from_secs(60)).expect("touch filled its memory");
    snapshot::save(
        &vm,
        &store,
        "a",
        &SaveOptions { mode: SaveMode::Stop, stay_paused: true, ..Default::default() },
        &|_| {},
    )
    .expect("snapshot a");
    vm.stop("snapshot taken");
    drop(vm);
    let opts = RestoreOptions {
        background_fill: false,
        ..RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default()))
    };
    let (mut vm2, _) = snapshot::restore(&store, "a", opts).expect("lazy restore");
    vm2.start().expect("start");
    // It waits for its go and touches nothing: most of memory is not resident.
    let server = vm2.page_server().expect("a page server");
    assert!(!server.is_resident());
    let report = snapshot::save(&vm2, &store, "b", &SaveOptions { stay_paused: true, ..Default::default() }, &|_| {})
        .expect("snapshot b");
    assert_eq!(report.mode, SaveMode::Stop);
    let reason = report.mode_reason.clone().expect("a reason");
    assert!(reason.contains("page server") && reason.contains("not yet resident"), "{reason}");
    // The snapshot is right: what the paused VM holds (read through its page server).
    let paused = ram_of(&vm2);
    vm2.stop("snapshot taken");
    drop(vm2);
    let (vm3, _) =
        snapshot::restore(&store, "b", RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default())))
            .expect("restore b");
    assert_same_ram(&ram_of(&vm3), &paused, "b restored eagerly");
}

#[test]
fn a_lazily_restored_vm_once_resident_snapshots_in_the_background_to_the_pause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mem, seed) = (64, 12);
    let before_a = memfill_snapshot(&store, mem, seed);

    // Restored lazily with the background fill: it becomes resident while it runs.
    let out2 = SharedOutput::default();
    let (mut vm2, _) = snapshot::restore(&store, "a", RestoreOptions::new(RestoreMode::Lazy, Box::new(out2.clone())))
        .expect("lazy restore");
    vm2.start().expect("start");
    let server = vm2.page_server().expect("a page server");
    assert!(server.wait_resident(Duration::from_secs(60)), "never resident: {:?}", server.error());
    wait_lines(&out2, 1, Duration::from_secs(60));
    let (opts, seen) = capturing(&out2);
    let report = snapshot::save(&vm2, &store, "b", &opts, &|_| {}).expect("snapshot b");
    assert_eq!(report.mode, SaveMode::Background, "{:?}", report.mode_reason);
    let wp = report.wp.expect("write-protect stats");
    assert!(wp.faults > 0, "no write met a protected chunk: {wp:?}");
    // A second one takes the ranges the first found free.
    let (opts, _) = capturing(&out2);
    let again = snapshot::save(&vm2, &store, "c", &opts, &|_| {}).expect("snapshot c");
    assert_eq!(again.mode, SaveMode::Background, "{:?}", again.mode_reason);
    assert!(vm2.control().exit_reason().is_none(), "the restored VM runs on");
    vm2.stop("snapshots taken");
    drop(vm2);

    let (ram, after_restore) = seen.lock().expect("lock").take().expect("the hook ran");
    restores_to_the_pause(&store, "b", &ram, &format!("{before_a}{after_restore}"), seed, mem);
}

#[test]
fn a_lazily_restored_vm_still_filling_gets_its_fill_finished_and_snapshots_in_the_background_to_the_pause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mem, seed) = (256, 14);
    let before_a = memfill_snapshot(&store, mem, seed);

    // Restored lazily with one fill thread, and snapshotted at once: 256 MiB are far from
    // resident. Before, this fell back to stop-and-copy (the guest paused for all of it).
    let out2 = SharedOutput::default();
    let opts = RestoreOptions { fill_threads: 1, ..RestoreOptions::new(RestoreMode::Lazy, Box::new(out2.clone())) };
    let (mut vm2, _) = snapshot::restore(&store, "a", opts).expect("lazy restore");
    vm2.start().expect("start");
    let server = vm2.page_server().expect("a page server");
    assert!(!server.is_resident(), "resident at once: nothing to wait for");
    let (opts, seen) = capturing(&out2);
    let report = snapshot::save(&vm2, &store, "b", &opts, &|_| {}).expect("snapshot b");
    assert_eq!(report.mode, SaveMode::Background, "{:?}", report.mode_reason);
    let waited = report.fill_wait.expect("it waited for the fill");
    assert!(waited.resident && waited.chunks > 0, "{waited:?}");
    assert!(vm2.page_server().expect("a page server").is_resident());
    let wp = report.wp.expect("write-protect stats");
    assert!(wp.faults > 0, "no write met a protected chunk: {wp:?}");
    assert!(vm2.control().exit_reason().is_none(), "the restored VM runs on");
    vm2.stop("snapshot taken");
    drop(vm2);

    let (ram, after_restore) = seen.lock().expect("lock").take().expect("the hook ran");
    restores_to_the_pause(&store, "b", &ram, &format!("{before_a}{after_restore}"), seed, mem);
}

#[test]
fn a_cancelled_wait_for_a_lazy_fill_commits_nothing_and_the_vm_runs_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    // The cancel, 20 ms into the wait, comes long before the fill ends.
    let mut vm2 = filling_touch(&store);
    let (cancel, canceller) = set_in_20_ms();
    let opts = SaveOptions { cancel: Some(cancel), ..Default::default() };
    let err = snapshot::save(&vm2, &store, "b", &opts, &|_| {}).expect_err("cancelled");
    let server = vm2.page_server().expect("a page server");
    let left = server.chunks_left();
    canceller.join().expect("canceller");
    assert!(matches!(err, SnapshotError::Cancelled), "{err}");
    assert!(left > 0, "the snapshot waited for the whole fill: the cancel did not end its wait");
    assert!(store.manifest("b").is_err(), "a cancelled snapshot was committed");
    assert!(vm2.control().exit_reason().is_none(), "the VM runs on");
    assert!(server.wait_resident(Duration::from_secs(120)), "the fill went on: {:?}", server.error());
    vm2.stop("test done");
}

#[test]
fn the_daemon_snapshots_in_the_background_by_default_and_in_the_mode_asked_for() {
    use serde_json::json;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = common::daemon::Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 64, "start": true})));
    let serial = d.wait_serial("m", "memfill pass 1 ", Duration::from_secs(60));
    assert!(serial.contains("memfill pass 1 "), "{serial}");
    let r = d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "s1"})));
    assert_eq!(r["mode"], "background", "{r}");
    assert!(r["mode_reason"].is_null(), "{r}");
    let r = d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "s2", "mode": "stop"})));
    assert_eq!(r["mode"], "stop", "{r}");
    let r = d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "s3", "live": true})));
    assert_eq!((&r["mode"], &r["live"]), (&json!("live"), &json!(true)), "{r}");
    let (code, body) = d.call("POST", "/vms/m/snapshot", Some(json!({"name": "s4", "live": true, "mode": "stop"})));
    assert_eq!(code, 400, "{body}");
    let (code, body) = d.call("POST", "/vms/m/snapshot", Some(json!({"name": "s4", "mode": "fast"})));
    assert_eq!(code, 400, "{body}");
}

#[test]
fn bench_snapshot_reports_every_mode_and_a_snapshot_right_after_a_lazy_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let o = snapvisor(&["bench", "snapshot", "--mem-mib", "32", "--json", "--dir", store.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let rows = rows.as_array().expect("rows");
    let find = |mode: &str, guest: &str| {
        rows.iter()
            .find(|r| r["mode"] == mode && r["guest"] == guest)
            .unwrap_or_else(|| panic!("no {mode} row for {guest}: {rows:?}"))
    };
    // `after-lazy-stop` falls back to stop-and-copy only while the fill still runs: 32 MiB
    // may be resident by the time the snapshot starts (a CI run saw it), and then it runs in
    // the background. `after-lazy-bg` waits for the fill, so it always does.
    for (mode, guest, save_modes) in [
        ("baseline", "touch", &["stop"][..]),
        ("full", "touch", &["stop"]),
        ("incremental-1pct", "touch", &["stop"]),
        ("background", "touch", &["background"]),
        ("background-inc-1pct", "touch", &["background"]),
        ("after-lazy-stop", "touch", &["stop", "background"]),
        ("after-lazy-bg", "touch", &["background"]),
        ("live", "memfill", &["live"]),
        ("background", "memfill", &["background"]),
    ] {
        let r = find(mode, guest);
        assert!(save_modes.iter().any(|m| r["save_mode"] == *m), "{save_modes:?}: {r}");
        assert_eq!(r["mem_mib"], 32, "{r}");
        for key in ["pause_ms", "total_ms", "bytes_written", "fill_wait_ms"] {
            assert!(r[key].as_f64().is_some_and(|v| v >= 0.0), "{key}: {r}");
        }
        assert!(r["total_ms"].as_f64() >= r["pause_ms"].as_f64(), "{r}");
    }
    // Both snapshots after the lazy restore stored the whole guest.
    let written = |mode: &str| find(mode, "touch")["bytes_written"].as_u64().expect("bytes");
    assert!(written("after-lazy-stop") > 0 && written("after-lazy-stop") == written("after-lazy-bg"));
}

#[test]
fn a_wait_for_a_lazy_fill_ended_from_outside_falls_back_to_stop_and_copy_and_commits() {
    // The daemon ends the wait when it stops (SIGTERM): its shutdown snapshot queues behind
    // this one, and a wait of up to a minute outlasted the shutdown's 30 s.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let mut vm2 = filling_touch(&store);
    let (end, ender) = set_in_20_ms();
    let opts = SaveOptions { end_fill_wait: Some(snapshot::EndFillWait::when_set(end)), ..Default::default() };
    let report = snapshot::save(&vm2, &store, "b", &opts, &|_| {}).expect("snapshot b");
    ender.join().expect("ender");
    let waited = report.fill_wait.expect("it began to wait for the fill");
    assert!(!waited.resident, "the wait ran to the end of the fill: ending it from outside did nothing");
    assert_eq!(report.mode, SaveMode::Stop, "{:?}", report.mode_reason);
    assert!(store.manifest("b").is_ok(), "the snapshot was not committed");
    assert!(vm2.control().exit_reason().is_none(), "the VM runs on");
    vm2.stop("test done");
    drop(vm2);
    let (vm3, _) =
        snapshot::restore(&store, "b", RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default())))
            .expect("restore b");
    drop(vm3);
}
