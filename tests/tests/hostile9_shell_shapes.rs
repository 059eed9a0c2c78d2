//! Hostile checks of the pre-built VM shell pool (hypervisor's shell.rs) across shapes: the
//! shell kept is for the shape of the restore that completed last, also when that restore
//! completed while the builder was still building a shell for the one before (a daemon
//! alternating between two shapes kept the first one's shell, and its next restore of the
//! second shape found none); a restore of the kept shape then takes it.
//!
//! One test: the pool is the process's.

mod common;

use hypervisor::shell::{self, Shape};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions};
use storage::Store;

#[test]
fn the_shell_kept_is_for_the_shape_restored_last_even_while_another_was_being_built() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    common::shell::snapshot_memfill(&store, "s", 16, 2);

    shell::enable(true);
    let small = Shape { mem_bytes: 16 << 20, vcpus: 1 };
    // Shapes asked for one right after the other, as restores of alternating shapes
    // completing together do: a large one (its build takes a while), then the snapshot's.
    for (round, first) in [(0, 2048u64), (1, 1024)].into_iter() {
        let big = Shape { mem_bytes: first << 20, vcpus: 2 };
        shell::request(big, || true);
        shell::request(small, || true);
        common::shell::wait_ready(small, &format!("round {round}"));
        let taken = shell::counts().0;
        let opts = RestoreOptions::new(RestoreMode::Lazy, Box::new(std::io::sink()));
        let (vm, _) = snapshot::restore(&store, "s", opts).expect("restore");
        assert_eq!(shell::counts().0, taken + 1, "round {round}: the restore took no shell");
        drop(vm);
    }
}
