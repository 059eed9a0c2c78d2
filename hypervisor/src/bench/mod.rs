//! `snapvisor bench ...`: benchmarks that print a table (or JSON with `--json`).
//!
//! Benchmarks measure; they never assert timings. Ratios are taken side by side in one run
//! because the machines they run on are shared and noisy.

pub mod boot;
pub mod clones;
pub mod firmware;
pub mod fleet;
pub mod net;
pub mod plot;
pub mod restore;
pub mod snapshot;
pub mod stats;
pub mod store;

use clap::Subcommand;

use crate::cli::CliError;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// VM creation, time to first guest exit and to guest exit for `hello`; idle VM density.
    Boot(boot::BootBenchArgs),
    /// Snapshot creation (stop-and-copy, live) and restore to first instruction.
    Snapshot(snapshot::SnapshotBenchArgs),
    /// Many lazy clones of one snapshot at once, with and without a shared chunk cache.
    Clones(clones::ClonesBenchArgs),
    /// Lazy clones through the daemon, 10, 50 and 100 at once; idle density.
    Fleet(fleet::FleetBenchArgs),
    /// Restore by mode (resident, eager, lazy, lazy with prefetch), side by side.
    Restore(restore::RestoreBenchArgs),
    /// virtio-net throughput with `netping` (guest to host, host to guest) against the raw
    /// tap limit, at 64 and 1500 bytes.
    Net(net::NetBenchArgs),
    /// Snapshot store throughput, compression, random reads and dedup of clones.
    Store(store::BenchStoreArgs),
}

pub fn run(cmd: BenchCommand) -> Result<(), CliError> {
    match cmd {
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Restore(args) => restore::run(args),
        BenchCommand::Clones(args) => clones::run(args),
        BenchCommand::Fleet(args) => fleet::run(args),
        BenchCommand::Net(args) => net::run(args),
        BenchCommand::Snapshot(args) => snapshot::run(args),
        BenchCommand::Store(args) => store::run(args).map_err(|e| CliError::Internal(e.to_string())),
    }
}

/// A fresh temporary directory (a random name, mode 0700, never an existing one: a pid-named
/// one in the shared temporary directory could be made beforehand by another user, as a
/// symlink to a directory of theirs), removed on drop.
pub(crate) fn scratch_dir(what: &str) -> Result<tempfile::TempDir, CliError> {
    tempfile::Builder::new()
        .prefix(&format!("snapvisor-bench-{what}-"))
        .tempdir()
        .map_err(|e| CliError::Input(format!("creating a temporary directory: {e}")))
}
