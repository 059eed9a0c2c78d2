//! `snapvisor restore`: a snapshot back into a VM, in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::run::{debugcon_file, finish, fw_cfg_files, snapshot_error};
use super::CliError;
use crate::snapshot::{self, RestoreMode, RestoreOptions};

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// The snapshot to restore.
    pub name: String,
    /// Serve memory lazily through userfaultfd as the guest touches it.
    #[arg(long)]
    pub lazy: bool,
    /// With --lazy: load the working set a previous lazy restore recorded first.
    #[arg(long, requires = "lazy")]
    pub prefetch: bool,
    /// With --lazy: load that working set before the guest's first instruction, on every
    /// core (later first instruction, working set done sooner; `bench restore` has both).
    #[arg(long, requires = "lazy")]
    pub prefetch_before: bool,
    /// With --lazy: after this many milliseconds, record the order in which the guest
    /// faulted memory in as the snapshot's working set (for --prefetch).
    #[arg(long, requires = "lazy")]
    pub record_working_set_ms: Option<u64>,
    /// Build the destination with this much memory instead of the snapshot's.
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// Build the destination with these fw_cfg files (NAME=PATH) instead of the snapshot's.
    #[arg(long = "fw-cfg-file", value_name = "NAME=PATH")]
    pub fw_cfg_files: Vec<String>,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Save what the guest writes to the debug console (port 0x402) in FILE.
    #[arg(long, value_name = "FILE")]
    pub debugcon: Option<PathBuf>,
    /// Build the destination with these extra ACPI tables instead of the snapshot's
    /// (repeatable; the restore still gives the guest the snapshot's tables).
    #[arg(long = "acpi-table", value_name = "FILE")]
    pub acpi_tables: Vec<PathBuf>,
    /// Give the restored VM a new generation ID (VMGenID), as a clone gets: written where the
    /// firmware put the old one, and the guest notified.
    #[arg(long)]
    pub new_generation: bool,
    /// Start dirty tracking at the restore, so that the VM's first snapshot is incremental on
    /// this one. It slows the guest's first writes (measured in the README); without it the
    /// first snapshot is full and tracking starts there.
    #[arg(long)]
    pub track_dirty: bool,
    /// Put the restored VM's NICs on other taps and/or MACs: one per NIC of the snapshot, in
    /// PCI order (tap=NAME[,mac=..][,romfile=..][,romsize=..]); a NIC without mac= keeps the
    /// snapshot's. A different NIC count is refused.
    #[arg(long = "net", value_name = "SPEC", value_parser = super::run::parse_net)]
    pub net: Vec<crate::net::NetSpec>,
}

pub fn run(args: RestoreArgs) -> Result<ExitCode, CliError> {
    let store = storage::Store::open_existing(&args.store)
        .map_err(|e| CliError::Input(format!("opening store {}: {e}", args.store.display())))?;
    let mode = match (args.lazy, args.prefetch, args.prefetch_before) {
        (false, _, _) => RestoreMode::Eager,
        (true, _, true) => RestoreMode::LazyPrefetchBefore,
        (true, true, false) => RestoreMode::LazyPrefetch,
        (true, false, false) => RestoreMode::Lazy,
    };
    let mut opts = RestoreOptions::new(mode, Box::new(std::io::stdout()));
    opts.mem_mib = args.mem_mib;
    opts.debugcon_out = debugcon_file(args.debugcon.as_deref())?;
    if !args.fw_cfg_files.is_empty() {
        opts.fw_cfg_files = Some(fw_cfg_files(&args.fw_cfg_files)?);
    }
    if !args.acpi_tables.is_empty() {
        opts.acpi_tables =
            Some(crate::acpi::read_tables(&args.acpi_tables).map_err(|e| CliError::Input(e.to_string()))?);
    }
    opts.new_generation = args.new_generation;
    opts.track_dirty = args.track_dirty;
    if !args.net.is_empty() {
        opts.net = Some(args.net.clone());
    }
    let timeout = args
        .timeout
        .map(|t| {
            Duration::try_from_secs_f64(t)
                .map_err(|_| CliError::Input(format!("--timeout {t}: not a number of seconds")))
        })
        .transpose()?;
    let (mut vm, report) = snapshot::restore(&store, &args.name, opts).map_err(snapshot_error)?;
    for (idstr, size) in &report.resized {
        eprintln!("snapvisor: resized RAM block {idstr} to the snapshot's {size:#x} bytes");
    }
    match &report.new_generation {
        Some((guid, addr)) => eprintln!("snapvisor: new VM generation ID {guid} (guest address {addr:#x})"),
        None if args.new_generation => {
            return Err(CliError::Input(format!(
                "--new-generation: snapshot '{}' boots no firmware, so it has no VMGenID device",
                args.name
            )))
        }
        None => {}
    }
    tracing::info!(ready_ms = report.ready_ms, mode = ?report.mode, "restored");
    vm.start().map_err(super::run::vm_error)?;
    if let Some(ms) = args.record_working_set_ms {
        if vm.control().wait_exit(Some(Duration::from_millis(ms))).is_none() || vm.page_server().is_some() {
            let n = snapshot::restore::record_working_set(&vm, &store, &args.name).map_err(snapshot_error)?;
            eprintln!("snapvisor: recorded a working set of {n} chunks for '{}'", args.name);
        }
    }
    Ok(finish(&mut vm, timeout))
}
