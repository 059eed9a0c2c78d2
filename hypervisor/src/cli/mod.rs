//! Command-line interface: argument parsing and dispatch to the subcommands.
//!
//! Exit status of commands that run a guest (`run`, `restore`):
//!
//! | status | meaning |
//! |---|---|
//! | 0..=255 | the status the guest wrote to the exit device (clamped to 255) |
//! | 0 | the guest powered off |
//! | 2 | bad input: arguments, files, sizes (one line on stderr names the problem) |
//! | 124 | `--timeout` passed before the guest ended |
//! | 125 | snapvisor itself failed (KVM, threads, the store) |
//! | 126 | the guest crashed: triple fault, reset, or an instruction KVM could not run |

pub mod acpi;
pub mod guest_args;
pub mod restore;
pub mod run;
pub mod store;
pub mod store_codec;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use thiserror::Error;

/// snapvisor: a KVM hypervisor that snapshots VMs into a deduplicated store and restores them lazily.
#[derive(Debug, Parser)]
#[command(name = "snapvisor", version, about)]
pub struct Cli {
    /// More logging on stderr (-v info, -vv debug, -vvv trace); SNAPVISOR_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a built-in guest or a Linux kernel in the foreground; serial output on stdout.
    Run(run::RunArgs),
    /// Restore a snapshot into a new VM and run it in the foreground.
    Restore(restore::RestoreArgs),
    /// Inspect and maintain a snapshot store.
    Store(store::StoreArgs),
    /// Run the daemon: many VMs behind a REST API on a unix socket.
    Serve(crate::service::ServeArgs),
    /// Manage the daemon's VMs.
    Vm {
        #[command(flatten)]
        client: crate::service::client::ClientArgs,
        #[command(subcommand)]
        cmd: crate::service::client::VmCommand,
    },
    /// Manage the daemon's snapshots.
    Snapshot {
        #[command(flatten)]
        client: crate::service::client::ClientArgs,
        #[command(subcommand)]
        cmd: crate::service::client::SnapshotCommand,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// ACPI tools.
    #[command(subcommand)]
    Acpi(acpi::AcpiCommand),
}

/// A failed command: the message and the process exit status.
#[derive(Debug, Error)]
pub enum CliError {
    /// Bad input from the user: arguments, files, sizes.
    #[error("{0}")]
    Input(String),
    /// snapvisor itself failed.
    #[error("{0}")]
    Internal(String),
    /// A failure with its own exit status.
    #[error("{message}")]
    Status { message: String, code: u8 },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            CliError::Internal(_) => 125,
            CliError::Status { code, .. } => *code,
        }
    }
}

/// Sets up `tracing`: journald under systemd, stderr otherwise.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAPVISOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Under systemd (stderr connected to the journal) log to journald with structured fields.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = tracing_subscriber::registry().with(filter).with(journald).try_init();
            return;
        }
    }
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Runs a parsed command line.
pub fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Restore(args) => restore::run(args),
        Command::Serve(args) => crate::service::run(args).map(|()| ExitCode::SUCCESS),
        Command::Vm { client, cmd } => crate::service::client::vm(client, cmd).map(|()| ExitCode::SUCCESS),
        Command::Snapshot { client, cmd } => crate::service::client::snapshot(client, cmd).map(|()| ExitCode::SUCCESS),
        Command::Store(args) => store::run(args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| CliError::Status { message: e.to_string(), code: e.exit_code() }),
        Command::Bench(cmd) => crate::bench::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Acpi(cmd) => acpi::run(cmd).map(|()| ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// The snapshot mode of `run` is reachable next to the guest's mode. Both were `--mode`
    /// (one flattened in from `SnapshotArgs`): clap, whose duplicate check runs only in debug
    /// builds, parsed `--mode stop` as the guest's mode and refused it, so the README's
    /// `run ... --snapshot-after-ms N --mode stop` never worked.
    #[test]
    fn run_takes_a_snapshot_mode_and_a_guest_mode() {
        let args = ["snapvisor", "run", "--builtin", "memfill", "--mem-mib", "16", "--mode", "verify"];
        let snap = ["--snapshot-after-ms", "5", "--store", "S", "--name", "n", "--snapshot-mode", "stop"];
        let cli = super::Cli::try_parse_from(args.iter().chain(snap.iter())).expect("parses");
        let super::Command::Run(run) = cli.command else { panic!("not run") };
        assert_eq!(run.mode, Some(super::guest_args::GuestMode::Verify));
        assert_eq!(run.snapshot.mode, Some(crate::snapshot::SaveMode::Stop));
    }
}
