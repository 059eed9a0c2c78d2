//! Hostile checks of the pre-built VM shell pool (hypervisor's shell.rs): a restore that is
//! refused (here a memory size that the snapshot's pc.ram does not have, one of them 16 GiB,
//! refused after its VM was built) leaves the pool as it was: the shell ready for the good
//! shape stays and is taken by the next restore, and no shell of the refused shape is built
//! (an idle shell of a shape chosen by a bad request or snapshot would sit in the daemon,
//! evicting the useful one; one of 16 GiB holds ~40 MiB of kernel memory for its slots).
//!
//! One test: the pool is the process's.

mod common;

use std::time::Duration;

use common::ram::assert_blocks_match;
use hypervisor::shell::{self, Shape};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions};
use storage::Store;

const MEM: u64 = 16;

#[test]
fn a_refused_restore_neither_evicts_the_ready_shell_nor_builds_one_of_its_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    common::shell::snapshot_memfill(&store, "s", MEM, 4);

    shell::enable(true);
    let good = Shape { mem_bytes: MEM << 20, vcpus: 1 };
    drop(snapshot::restore(&store, "s", RestoreOptions::new(RestoreMode::Eager, Box::new(std::io::sink()))));
    common::shell::wait_ready(good, "");
    let (taken, built) = shell::counts();
    for mib in [64, 16 << 10] {
        for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
            let opts = RestoreOptions { mem_mib: Some(mib), ..RestoreOptions::new(mode, Box::new(std::io::sink())) };
            let err = snapshot::restore(&store, "s", opts).err().expect("a restore at another memory size");
            assert!(err.to_string().contains("pc.ram"), "{mib} MiB, {mode:?}: {err}");
            // A builder asked for the refused shape runs at idle priority: leave it a core.
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(shell::ready_shape(), Some(good), "{mib} MiB, {mode:?}: the ready shell was replaced");
            assert_eq!(shell::counts(), (taken, built), "{mib} MiB, {mode:?}: a shell was taken or built");
        }
    }
    // The good shape's next restore takes the shell kept for it.
    let (vm, _) = snapshot::restore(&store, "s", RestoreOptions::new(RestoreMode::Lazy, Box::new(std::io::sink())))
        .expect("restore");
    assert_eq!(shell::counts().0, taken + 1, "the restore after the refused ones found no shell");
    assert_blocks_match(&vm, &store, "s", "restore after the refused ones");
}
