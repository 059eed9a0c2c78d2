//! Hostile checks of kept write-protect registrations (background snapshots ending with
//! `finish`): a lazily restored guest snapshotted in the background again and again, with
//! stop-and-copy and live snapshots in between, never keeps a protected page, never stalls,
//! leaks no descriptor, and each background snapshot restores to its pause byte for byte.

mod common;

use common::memfill::wait_lines;
use common::ram::{assert_same_ram, protected_pages, ram_of, Ram};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::start_builtin;
use hypervisor::guests::{Builtin, MemfillMode};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveHooks, SaveMode, SaveOptions};
use hypervisor::vm::{BuiltinParams, SharedOutput, Vm};

/// Open descriptors other than the store's pack files (a new pack opens as packs fill).
fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).map_or(true, |p| p.extension().is_none_or(|x| x != "pack")))
        .count()
}

type AtPause = Arc<Mutex<Option<Ram>>>;

fn background() -> (SaveOptions, AtPause) {
    let seen: AtPause = Arc::default();
    let s = seen.clone();
    let hooks = SaveHooks {
        after_protect: Some(Arc::new(move |vm: &Vm| *s.lock().expect("lock") = Some(ram_of(vm)))),
        copy_after_first_fault: true,
        ..SaveHooks::NONE
    };
    (SaveOptions { hooks, ..Default::default() }, seen)
}

#[test]
fn a_lazily_restored_guest_snapshotted_in_the_background_among_stop_and_live_snapshots_stays_unprotected_and_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let params = BuiltinParams { seed: 11, passes: 0, mode: MemfillMode::Fill, ..Default::default() };
    let (mut vm, out) = start_builtin(Builtin::Memfill, 128, params);
    wait_lines(&out, 1, Duration::from_secs(60));
    let (opts, _) = background();
    snapshot::save(&vm, &store, "base", &opts, &|_| {}).expect("base snapshot");
    vm.stop("base taken");
    drop(vm);

    let out = SharedOutput::default();
    let (mut vm, _) =
        snapshot::restore(&store, "base", RestoreOptions::new(RestoreMode::Lazy, Box::new(out.clone()))).expect("lazy");
    vm.start().expect("start");
    wait_lines(&out, 1, Duration::from_secs(60));
    let fds0 = fds();
    let mut taken = Vec::new();
    let mut counts = Vec::new();
    let modes = [
        SaveMode::Background,
        SaveMode::Background,
        SaveMode::Stop,
        SaveMode::Background,
        SaveMode::Live,
        SaveMode::Background,
        SaveMode::Background,
    ];
    for (i, mode) in modes.into_iter().enumerate() {
        let name = format!("s{i}");
        let (mut opts, seen) = background();
        opts.mode = mode;
        let report = snapshot::save(&vm, &store, &name, &opts, &|_| {}).expect("snapshot");
        assert_eq!(protected_pages(&vm), 0, "{name} ({mode:?}): pages left write-protected");
        counts.push(fds());
        let n = out.text().lines().count();
        wait_lines(&out, n + 1, Duration::from_secs(60));
        if report.mode == SaveMode::Background {
            if let Some(ram) = seen.lock().expect("lock").take() {
                taken.push((name, ram));
            }
        }
    }
    // The kept registration holds a userfaultfd and the last fault thread's eventfd; beyond
    // the first snapshot, no snapshot may add descriptors for good. The count is the whole
    // process's, taken while other threads open and close files (a descriptor closed a moment
    // later was seen once in CI), so it must come back to the level after the second
    // snapshot, not stay there at every sample: a leak of one per snapshot never does.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut now = fds();
    while now > counts[1] && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = fds();
    }
    assert!(now <= counts[1], "descriptors from {fds0}: {counts:?}, now {now}");
    assert!(vm.control().exit_reason().is_none());
    vm.stop("snapshots taken");
    drop(vm);
    assert!(!taken.is_empty(), "no background snapshot of the lazily restored guest");
    for (name, ram) in &taken {
        let (vm2, _) =
            snapshot::restore(&store, name, RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default())))
                .expect("restore");
        assert_same_ram(&ram_of(&vm2), ram, &format!("{name} restored"));
    }
}

/// A clone on a shared base (its RAM a private mapping of the base's memfd) snapshotted in
/// the background again and again on its kept registration, the host writing between and
/// right after snapshots: nothing stays protected, no write stalls, each snapshot holds the
/// clone's bytes at its pause.
#[test]
fn a_shared_base_clone_snapshotted_in_the_background_repeatedly_stays_writable_and_exact() {
    use common::touch::touch_snapshot;
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    touch_snapshot(&store, "t", 64, 77);
    let bases = migrate::lazy::BaseRegistry::new();
    let opts = RestoreOptions {
        shared_base: Some(bases.clone()),
        new_generation: true,
        ..RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default()))
    };
    let (mut vm, _) = snapshot::restore(&store, "t", opts).expect("clone");
    vm.start().expect("start");
    assert!(snapshot::restore::wait_resident(&vm, Duration::from_secs(120)), "resident");
    let ram = vm.registry().get("pc.ram").expect("pc.ram");
    let mut taken = Vec::new();
    for i in 0..5u64 {
        // Host writes over shared pages (a fresh private copy each) and over earlier ones,
        // from a thread: a write that stalled on a page left protected would never return.
        let r = ram.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for off in (0..r.used_length()).step_by((MIB / 2) as usize) {
                r.write(off + 0x800 + i * 8, &(0xc10e_u64 + off + i).to_le_bytes()).expect("write");
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(30)).expect("a host write stalled");
        let name = format!("c{i}");
        let (opts, seen) = background();
        let report = snapshot::save(&vm, &store, &name, &opts, &|_| {}).expect("snapshot of the clone");
        assert_eq!(report.mode, SaveMode::Background, "{name}: {:?}", report.mode_reason);
        assert_eq!(protected_pages(&vm), 0, "{name}: pages left write-protected");
        taken.push((name, seen.lock().expect("lock").take().expect("the hook ran")));
    }
    assert!(vm.control().exit_reason().is_none(), "the clone runs on");
    vm.stop("test done");
    drop(vm);
    for (name, ram) in &taken {
        let (vm2, _) =
            snapshot::restore(&store, name, RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default())))
                .expect("restore");
        assert_same_ram(&ram_of(&vm2), ram, &format!("{name} restored"));
    }
}
