//! Snapshots compared with the guest at their pause, and every way of restoring them: shared
//! by the tests that take snapshots of running guests in every mode (hostile5_*).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypervisor::guests::{Builtin, MemfillMode};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveHooks, SaveMode, SaveOptions, SaveReport};
use hypervisor::vm::{BuiltinParams, SharedOutput, Vm};
use migrate::lazy::BaseRegistry;

use super::memfill::wait_lines;
use super::ram::{assert_same_ram, ram_of, Ram};

/// A memfill guest of `mem` MiB rewriting its memory for ever, snapshotted (stop-and-copy)
/// as `name` once it printed a pass line.
pub fn running_memfill(store: &storage::Store, name: &str, mem: u64, seed: u64) {
    let (mut vm, out) = super::start_builtin(
        Builtin::Memfill,
        mem,
        BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    wait_lines(&out, 1, Duration::from_secs(60));
    let stop = SaveOptions { mode: SaveMode::Stop, stay_paused: true, ..Default::default() };
    snapshot::save(&vm, store, name, &stop, &|_| {}).expect("snapshot of the memfill guest");
    vm.stop("snapshot taken");
}

/// Every way a snapshot comes back: (label, mode, as a shared clone).
pub const MODES: [(&str, RestoreMode, bool); 5] = [
    ("eager", RestoreMode::Eager, false),
    ("lazy", RestoreMode::Lazy, false),
    ("lazy-prefetch", RestoreMode::LazyPrefetch, false),
    ("lazy-prefetch-before", RestoreMode::LazyPrefetchBefore, false),
    ("shared clone", RestoreMode::Lazy, true),
];

/// Restore options for `mode` without a background fill or a chunk cache (so that what the
/// restored VM holds is what was served), a shared clone on a registry of its own.
pub fn restore_opts(mode: RestoreMode, shared: bool, out: &SharedOutput) -> RestoreOptions {
    let mut opts = RestoreOptions::new(mode, Box::new(out.clone()));
    opts.background_fill = false;
    opts.cache = None;
    if shared {
        opts.shared_base = Some(BaseRegistry::new());
    }
    opts
}

/// Every restore mode of snapshot `name` holds exactly `want`.
pub fn restore_every_way(store: &storage::Store, name: &str, want: &Ram, what: &str) {
    for (label, mode, shared) in MODES {
        let (vm, _) = snapshot::restore(store, name, restore_opts(mode, shared, &SharedOutput::default()))
            .unwrap_or_else(|e| panic!("{what}: restore {label}: {e}"));
        assert_same_ram(&ram_of(&vm), want, &format!("{what}, restored {label}"));
        if let Some(s) = vm.page_server() {
            assert_eq!(s.error(), None, "{what}, restored {label}");
        }
    }
}

/// What `after_protect` saw: every block at the pause.
pub type AtPause = Arc<Mutex<Option<Ram>>>;

/// Hooks that copy every block into `seen` at the pause of a background snapshot.
pub fn capture_hook(seen: &AtPause) -> SaveHooks {
    let s = seen.clone();
    SaveHooks {
        after_protect: Some(Arc::new(move |vm: &Vm| *s.lock().expect("lock") = Some(ram_of(vm)))),
        ..SaveHooks::NONE
    }
}

/// Snapshots `vm` in `mode` as `name`; returns its memory at the pause and the report. With
/// `background` the `after_protect` hook reads the memory (the snapshot must run in the
/// background); otherwise the VM stays paused after the snapshot, is read, and resumed.
pub fn snapshot_at_pause(
    vm: &Vm,
    store: &storage::Store,
    name: &str,
    mode: SaveMode,
    incremental: bool,
    background: bool,
) -> (Ram, SaveReport) {
    let seen: AtPause = Arc::default();
    let opts = SaveOptions {
        mode,
        incremental,
        stay_paused: !background,
        hooks: if background { capture_hook(&seen) } else { SaveHooks::NONE },
        ..Default::default()
    };
    let report = snapshot::save(vm, store, name, &opts, &|_| {}).unwrap_or_else(|e| panic!("snapshot {name}: {e}"));
    let ram = if background {
        assert_eq!(report.mode, SaveMode::Background, "{name}: {:?}", report.mode_reason);
        seen.lock().expect("lock").take().expect("the hook ran")
    } else {
        let ram = ram_of(vm);
        vm.resume();
        ram
    };
    (ram, report)
}

/// Descriptors and mappings of shared bases (`memfd:snapvisor-base`) this process holds.
pub fn memfds() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("/memfd:snapvisor-base"))
        .count();
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    (fds, maps.lines().filter(|l| l.contains("/memfd:snapvisor-base")).count())
}
