//! Hostile checks of the pre-built VM shell pool (hypervisor's shell.rs) when shells cannot be
//! built: a shape KVM or the host refuses (a memory size no address space holds) fails in the
//! builder, which warns once and ends (no retry, no spin, no thread left); restores go on
//! working and their own shape's shell is built after. Over many restore rounds no thread
//! or descriptor is left behind beyond the one shell kept.
//!
//! One test: the pool is the process's.

mod common;

use std::time::{Duration, Instant};

use common::ram::assert_blocks_match;
use hypervisor::shell::{self, Shape};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions};
use storage::Store;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).expect("/proc/self/task")
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).expect("/proc/self/fd")
}

/// Waits until the process has at most `n` threads (threads that end do so on their own
/// time); returns the count.
fn settle_threads(n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    while threads() > n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    threads()
}

#[test]
fn shells_that_cannot_be_built_leave_restores_working_and_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    common::shell::snapshot_memfill(&store, "s", 16, 6);
    let good = Shape { mem_bytes: 16 << 20, vcpus: 1 };
    let base_threads = threads();

    shell::enable(true);
    let restore = |what: &str| {
        let opts = RestoreOptions::new(RestoreMode::Lazy, Box::new(std::io::sink()));
        let (vm, _) = snapshot::restore(&store, "s", opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_blocks_match(&vm, &store, "s", what);
    };
    restore("first restore");
    common::shell::wait_ready(good, "");
    assert_eq!(settle_threads(base_threads), base_threads, "threads after the first restore");
    let base_fds = fds();

    // 1 PiB: more than a 47-bit address space maps. The builder fails, once.
    let impossible = Shape { mem_bytes: 1 << 50, vcpus: 1 };
    let built = shell::counts().1;
    for _ in 0..3 {
        shell::request(impossible, || true);
        assert_eq!(settle_threads(base_threads), base_threads, "the failing builder did not end");
    }
    assert_eq!(shell::counts().1, built, "a shell of 1 PiB was built");
    // The failed builds replaced nothing; the good shape's restore takes its shell.
    assert_eq!(shell::ready_shape(), Some(good));
    let taken = shell::counts().0;
    restore("after the failed builds");
    assert_eq!(shell::counts().0, taken + 1);

    // Rounds: each restore takes a shell, the next is built; nothing accumulates.
    for round in 0..20 {
        common::shell::wait_ready(good, "");
        restore(&format!("round {round}"));
    }
    common::shell::wait_ready(good, "");
    assert_eq!(settle_threads(base_threads), base_threads, "threads after 20 rounds");
    assert!(fds() <= base_fds, "descriptors after 20 rounds: {} (were {base_fds})", fds());
}
