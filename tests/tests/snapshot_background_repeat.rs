//! Repeat background snapshots on real KVM, each ending without lifting protection from all of
//! RAM (the VM keeps the userfaultfd registration for the next one): after every snapshot no
//! page is left write-protected and a write needs nobody to serve it; a chain of background
//! incrementals restores byte-exact to each pause; and writes made while a snapshot ends and
//! right after it are in the next incremental snapshot.

mod common;

use common::memfill::wait_lines;
use common::ram::{assert_same_ram, protected_pages, ram_of, Ram};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::start_builtin;
use hypervisor::guests::{Builtin, MemfillMode};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveHooks, SaveMode, SaveOptions};
use hypervisor::vm::{BuiltinParams, SharedOutput, Vm};

type AtPause = Arc<Mutex<Option<Ram>>>;

fn options(copy_after_first_fault: bool) -> (SaveOptions, AtPause) {
    let seen: AtPause = Arc::default();
    let s = seen.clone();
    let hooks = SaveHooks {
        after_protect: Some(Arc::new(move |vm: &Vm| *s.lock().expect("lock") = Some(ram_of(vm)))),
        copy_after_first_fault,
        ..SaveHooks::NONE
    };
    (SaveOptions { hooks, ..Default::default() }, seen)
}

fn restore_and_compare(store: &storage::Store, taken: &[(String, Ram)]) {
    for (name, ram) in taken {
        let (vm2, _) =
            snapshot::restore(store, name, RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default())))
                .expect("restore");
        assert_same_ram(&ram_of(&vm2), ram, &format!("{name} restored"));
    }
}

#[test]
fn a_chain_of_background_snapshots_of_a_guest_rewriting_memory_restores_to_each_pause_and_leaves_nothing_protected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mut vm, out) = start_builtin(
        Builtin::Memfill,
        128,
        BuiltinParams { seed: 7, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    wait_lines(&out, 1, Duration::from_secs(60));
    let mut taken = Vec::new();
    for i in 0..4 {
        let name = format!("s{i}");
        let (opts, seen) = options(true);
        let report = snapshot::save(&vm, &store, &name, &opts, &|_| {}).expect("background snapshot");
        assert_eq!(report.mode, SaveMode::Background, "{:?}", report.mode_reason);
        assert_eq!(report.incremental, i > 0, "{name}: {:?}", report.full_reason);
        let wp = report.wp.expect("write-protect stats");
        assert!(wp.faults > 0, "{name}: no guest write met a protected chunk: {wp:?}");
        assert_eq!(protected_pages(&vm), 0, "{name}: pages left write-protected after the snapshot");
        // The guest goes on writing all of its memory: nothing stalls it.
        let n = out.text().lines().count();
        wait_lines(&out, n + 1, Duration::from_secs(60));
        taken.push((name, seen.lock().expect("lock").take().expect("the hook ran")));
    }
    assert!(vm.control().exit_reason().is_none());
    vm.stop("snapshots taken");
    drop(vm);
    restore_and_compare(&store, &taken);
}

#[test]
fn device_writes_while_a_background_snapshot_ends_and_right_after_it_are_in_the_next_incremental() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    // The idle guest writes nothing: what changes between snapshots is only what the VMM
    // writes, so a write the dirty records missed would restore as the parent's bytes.
    let (mut vm, _out) = start_builtin(Builtin::Idle, 64, BuiltinParams::default());
    let mem = vm.ram().device_memory().clone();
    // A device thread rewrites chunks above 32 MiB the whole time (through the protection
    // during a copy, then on the kept registration with no fault thread), each write a new
    // counter value, one 64 KiB chunk after the other.
    // The VM's pause does not stop a device thread: the writer parks from right before the
    // pause until the memory at the pause has been captured (then its writes go through the
    // protection), so that capture is what the snapshot must hold.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let (hold, parked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let writer = {
        let (stop, writes, mem) = (stop.clone(), writes.clone(), mem.clone());
        let (hold, parked) = (hold.clone(), parked.clone());
        std::thread::spawn(move || {
            let mut k: u64 = 0;
            while !stop.load(Ordering::Acquire) {
                if hold.load(Ordering::Acquire) {
                    parked.store(true, Ordering::Release);
                    while hold.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    parked.store(false, Ordering::Release);
                    continue;
                }
                let addr = 0x200_0000 + (k % 256) * 0x1_0000 + (k / 256 % 16) * 0x1000;
                mem.write(addr, &k.to_le_bytes().repeat(512)).expect("device write");
                writes.fetch_add(1, Ordering::Release);
                k += 1;
                if k.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };
    let mut taken = Vec::new();
    for i in 0..4 {
        let name = format!("s{i}");
        // Writes right after the previous snapshot ended (and the writer's, which never stop).
        mem.write(0x100_0000 + i * 0x1_0000, &[0xc0 + i as u8; 4096]).expect("write after the snapshot");
        let seen: AtPause = Arc::default();
        let s = seen.clone();
        let (h1, p1, h2) = (hold.clone(), parked.clone(), hold.clone());
        let hooks = SaveHooks {
            during_pre_protect: Some(Arc::new(move |_: &Vm| {
                h1.store(true, Ordering::Release);
                while !p1.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_micros(100));
                }
            })),
            after_protect: Some(Arc::new(move |vm: &Vm| {
                *s.lock().expect("lock") = Some(ram_of(vm));
                h2.store(false, Ordering::Release);
            })),
            ..SaveHooks::NONE
        };
        let opts = SaveOptions { hooks, ..Default::default() };
        let report = snapshot::save(&vm, &store, &name, &opts, &|_| {}).expect("background snapshot");
        assert_eq!(report.mode, SaveMode::Background, "{:?}", report.mode_reason);
        assert_eq!(report.incremental, i > 0, "{name}: {:?}", report.full_reason);
        assert!(report.pre_protect_note.is_none(), "{name}: {:?}", report.pre_protect_note);
        assert_eq!(protected_pages(&vm), 0, "{name}: pages left write-protected after the snapshot");
        // The writer is never stalled for long: it makes progress after every snapshot.
        let before = writes.load(Ordering::Acquire);
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while writes.load(Ordering::Acquire) < before + 100 {
            assert!(std::time::Instant::now() < until, "{name}: the device writer stalled after the snapshot");
            std::thread::sleep(Duration::from_millis(1));
        }
        taken.push((name, seen.lock().expect("lock").take().expect("the hook ran")));
    }
    stop.store(true, Ordering::Release);
    writer.join().expect("writer");
    vm.stop("snapshots taken");
    drop(vm);
    restore_and_compare(&store, &taken);
}
