//! `snapvisor bench snapshot`: snapshot creation of running `memfill` guests, stop-and-copy
//! and live, and eager and lazy restore to the first guest instruction.
//!
//! `memfill` rewrites all of its memory continuously, so a live snapshot here is the worst
//! case: every round finds the whole working set dirty again. The first-instruction time of a
//! restore is its first exit to the VMM: the `touch` guest polls the exit device's go register
//! right after it resumes.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::run::{snapshot_error, vm_error};
use crate::cli::CliError;
use crate::guests::{touch, Builtin};
use crate::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use crate::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};

#[derive(Debug, Args)]
pub struct SnapshotBenchArgs {
    /// Guest memory sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    pub mem_mib: Vec<u64>,
    /// Store directory (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotRow {
    pub mem_mib: u64,
    pub stop_and_copy_ms: f64,
    pub stop_and_copy_bytes_stored: u64,
    pub live_ms: f64,
    pub live_pause_ms: f64,
    pub live_rounds: u32,
    pub live_bytes_stored: u64,
    pub eager_first_instruction_ms: f64,
    pub lazy_first_instruction_ms: f64,
}

const TIMEOUT: Duration = Duration::from_secs(300);

fn internal(what: String) -> CliError {
    CliError::Internal(format!("bench snapshot: {what}"))
}

fn first_instruction(store: &storage::Store, name: &str, mode: RestoreMode) -> Result<f64, CliError> {
    let t0 = Instant::now();
    let opts = RestoreOptions { cache: None, ..RestoreOptions::new(mode, Box::new(SharedOutput::default())) };
    let (mut vm, _) = snapshot::restore(store, name, opts).map_err(snapshot_error)?;
    vm.devices().go.store(true, Ordering::Release);
    vm.start().map_err(vm_error)?;
    vm.control().wait_mark(touch::MARK_GO, TIMEOUT).ok_or_else(|| internal(format!("{mode:?} restore never ran")))?;
    let first = vm.control().first_exit().ok_or_else(|| internal("no first exit".into()))?;
    vm.stop("measured");
    Ok(first.saturating_duration_since(t0).as_secs_f64() * 1e3)
}

fn row(store: &storage::Store, mem_mib: u64) -> Result<SnapshotRow, CliError> {
    let params = BuiltinParams { seed: 3, passes: 0, ..Default::default() };
    let out = SharedOutput::default();
    let mut vm = Vm::new(VmConfig::new(
        mem_mib,
        1,
        BootSource::Builtin { guest: Builtin::Memfill, params },
        Box::new(out.clone()),
    ))
    .map_err(vm_error)?;
    vm.start().map_err(vm_error)?;
    let deadline = Instant::now() + TIMEOUT;
    while !out.text().contains('\n') && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = snapshot::save(&vm, store, &format!("sc-{mem_mib}"), &SaveOptions::default(), &|_| {})
        .map_err(snapshot_error)?;
    let live = snapshot::save(
        &vm,
        store,
        &format!("live-{mem_mib}"),
        &SaveOptions { live: true, ..Default::default() },
        &|_| {},
    )
    .map_err(snapshot_error)?;
    vm.stop("measured");

    // Restore timing on a guest whose first instruction is observable.
    let tparams = BuiltinParams { seed: 4, ..Default::default() };
    let mut t = Vm::new(VmConfig::new(
        mem_mib,
        1,
        BootSource::Builtin { guest: Builtin::Touch, params: tparams },
        Box::new(SharedOutput::default()),
    ))
    .map_err(vm_error)?;
    t.start().map_err(vm_error)?;
    t.control().wait_mark(touch::MARK_FILLED, TIMEOUT).ok_or_else(|| internal("touch never filled".into()))?;
    let tname = format!("touch-{mem_mib}");
    snapshot::save(&t, store, &tname, &SaveOptions::default(), &|_| {}).map_err(snapshot_error)?;
    t.stop("snapshot taken");
    let eager = first_instruction(store, &tname, RestoreMode::Eager)?;
    let lazy = first_instruction(store, &tname, RestoreMode::Lazy)?;
    for n in [format!("sc-{mem_mib}"), format!("live-{mem_mib}"), tname] {
        let _ = store.delete(&n);
    }
    let _ = store.gc();
    Ok(SnapshotRow {
        mem_mib,
        stop_and_copy_ms: stop.total_ms,
        stop_and_copy_bytes_stored: stop.store.bytes_stored,
        live_ms: live.total_ms,
        live_pause_ms: live.pause_ms,
        live_rounds: live.rounds,
        live_bytes_stored: live.store.bytes_stored,
        eager_first_instruction_ms: eager,
        lazy_first_instruction_ms: lazy,
    })
}

pub fn run(args: SnapshotBenchArgs) -> Result<(), CliError> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("snapvisor-bench-snapshot-{}", std::process::id())));
    let store =
        storage::Store::open(&dir).map_err(|e| CliError::Input(format!("opening store {}: {e}", dir.display())))?;
    let rows: Result<Vec<SnapshotRow>, CliError> = args.mem_mib.iter().map(|&m| row(&store, m)).collect();
    drop(store);
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let rows = rows?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows).map_err(|e| internal(e.to_string()))?);
        return Ok(());
    }
    println!(
        "{:>8} {:>14} {:>12} {:>10} {:>10} {:>7} {:>12} {:>14} {:>13}",
        "mem MiB",
        "stop+copy ms",
        "stored MiB",
        "live ms",
        "pause ms",
        "rounds",
        "stored MiB",
        "eager 1st ms",
        "lazy 1st ms"
    );
    for r in &rows {
        println!(
            "{:>8} {:>14.0} {:>12.1} {:>10.0} {:>10.0} {:>7} {:>12.1} {:>14.1} {:>13.1}",
            r.mem_mib,
            r.stop_and_copy_ms,
            r.stop_and_copy_bytes_stored as f64 / (1 << 20) as f64,
            r.live_ms,
            r.live_pause_ms,
            r.live_rounds,
            r.live_bytes_stored as f64 / (1 << 20) as f64,
            r.eager_first_instruction_ms,
            r.lazy_first_instruction_ms
        );
    }
    Ok(())
}
