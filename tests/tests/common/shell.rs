//! Pre-built VM shells (hypervisor's shell.rs) in tests: waiting for the pool to hold one, and
//! the memfill snapshot the shell tests restore.

use std::time::{Duration, Instant};

use hypervisor::guests::{Builtin, MemfillMode};
use hypervisor::shell::{self, Shape};
use hypervisor::snapshot::{self, SaveOptions};
use hypervisor::vm::BuiltinParams;
use storage::Store;

/// Waits (at most 60 s: the builder runs at idle priority, so on a loaded host it waits for a
/// core nothing else wants) until the pool holds a shell of `shape`.
pub fn wait_ready(shape: Shape, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while shell::ready_shape() != Some(shape) {
        assert!(Instant::now() < deadline, "{what}: no shell of {shape:?} was built: {:?}", shell::ready_shape());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Snapshots (stop-and-copy) a 1-vCPU memfill guest of `mem` MiB seeded `seed` as `name`
/// after its first pass line; returns the guest's output then.
pub fn snapshot_memfill(store: &Store, name: &str, mem: u64, seed: u64) -> String {
    let params = BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() };
    let (mut vm, out) = super::start_builtin(Builtin::Memfill, mem, params);
    super::memfill::wait_lines(&out, 1, Duration::from_secs(60));
    snapshot::save(&vm, store, name, &SaveOptions { stay_paused: true, ..Default::default() }, &|_| {})
        .expect("snapshot");
    let before = out.text();
    vm.stop("snapshot taken");
    before
}
