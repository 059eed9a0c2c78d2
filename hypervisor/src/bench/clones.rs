//! `snapvisor bench clones`: many lazy restores of one snapshot at once, with and without a
//! shared cache of decompressed chunks, side by side in one run.
//!
//! A `touch` guest is snapshotted after filling its memory; then `count` clones are restored
//! lazily together (each on its own thread), told *go*, and left to touch their working set
//! and become resident. Reported: time until every clone ran its first instruction, until
//! every clone touched its working set, until all were resident, and the bytes read and
//! decompressed from the store in total.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use migrate::lazy::ChunkCache;

use crate::cli::run::{snapshot_error, vm_error};
use crate::cli::CliError;
use crate::guests::{touch, Builtin};
use crate::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use crate::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};

#[derive(Debug, Args)]
pub struct ClonesBenchArgs {
    /// Clones restored at once.
    #[arg(long, default_value_t = 8)]
    pub count: usize,
    /// Guest memory of each, MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// Size of the shared chunk cache, MiB.
    #[arg(long, default_value_t = 512)]
    pub cache_mib: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ClonesRun {
    pub cache: bool,
    pub count: usize,
    pub all_first_instruction_ms: f64,
    pub all_working_set_ms: f64,
    pub all_resident_ms: f64,
    pub bytes_read: u64,
    pub cache_hits: u64,
}

const TIMEOUT: Duration = Duration::from_secs(300);

/// One clone's first instruction, working set done, resident, bytes read, and the VM.
type CloneResult = Result<(Instant, Instant, Instant, u64, Vm), CliError>;

fn internal(what: String) -> CliError {
    CliError::Internal(format!("bench clones: {what}"))
}

fn one_round(
    store: &storage::Store,
    name: &str,
    args: &ClonesBenchArgs,
    cache: Option<Arc<ChunkCache>>,
) -> Result<ClonesRun, CliError> {
    let t0 = Instant::now();
    let results: Vec<CloneResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.count)
            .map(|_| {
                let cache = cache.clone();
                s.spawn(move || {
                    let opts = RestoreOptions {
                        cache,
                        ..RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default()))
                    };
                    let (mut vm, _) = snapshot::restore(store, name, opts).map_err(snapshot_error)?;
                    vm.devices().go.store(true, Ordering::Release);
                    vm.start().map_err(vm_error)?;
                    let ws = vm
                        .control()
                        .wait_mark(touch::MARK_TOUCHED, TIMEOUT)
                        .ok_or_else(|| internal("a clone never touched its working set".into()))?;
                    let first = vm.control().first_exit().ok_or_else(|| internal("a clone never ran".into()))?;
                    if !snapshot::restore::wait_resident(&vm, TIMEOUT) {
                        return Err(internal("a clone never became resident".into()));
                    }
                    let resident = Instant::now();
                    let read = snapshot::restore::lazy_stats(&vm).map_or(0, |s| s.bytes_stored_read);
                    Ok((first, ws, resident, read, vm))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(internal("a clone thread panicked".into()))))
            .collect()
    });
    let mut run = ClonesRun {
        cache: cache.is_some(),
        count: args.count,
        all_first_instruction_ms: 0.0,
        all_working_set_ms: 0.0,
        all_resident_ms: 0.0,
        bytes_read: 0,
        cache_hits: cache.as_ref().map_or(0, |c| c.counters().0),
    };
    let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
    for r in results {
        let (first, ws, resident, read, mut vm) = r?;
        run.all_first_instruction_ms = run.all_first_instruction_ms.max(ms(first));
        run.all_working_set_ms = run.all_working_set_ms.max(ms(ws));
        run.all_resident_ms = run.all_resident_ms.max(ms(resident));
        run.bytes_read += read;
        vm.stop("measured");
    }
    Ok(run)
}

pub fn run(args: ClonesBenchArgs) -> Result<(), CliError> {
    // A fresh directory, removed however the run ends (a pid-named one could hold the store of
    // an earlier run with the same pid, whose snapshot "base" then already existed).
    let tmp = super::scratch_dir("clones")?;
    let dir = tmp.path().join("store");
    let store =
        storage::Store::open(&dir).map_err(|e| CliError::Input(format!("opening store {}: {e}", dir.display())))?;
    let result = (|| {
        let params = BuiltinParams { seed: 99, ..Default::default() };
        let mut vm = Vm::new(VmConfig::new(
            args.mem_mib,
            1,
            BootSource::Builtin { guest: Builtin::Touch, params },
            Box::new(SharedOutput::default()),
        ))
        .map_err(vm_error)?;
        vm.start().map_err(vm_error)?;
        vm.control()
            .wait_mark(touch::MARK_FILLED, TIMEOUT)
            .ok_or_else(|| internal("the guest never filled its memory".into()))?;
        snapshot::save(&vm, &store, "base", &SaveOptions::default(), &|_| {}).map_err(snapshot_error)?;
        vm.stop("snapshot taken");
        let without = one_round(&store, "base", &args, None)?;
        let with = one_round(&store, "base", &args, Some(ChunkCache::new(args.cache_mib << 20)))?;
        Ok::<_, CliError>(vec![without, with])
    })();
    drop(store);
    let runs = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runs).map_err(|e| internal(e.to_string()))?);
        return Ok(());
    }
    println!("{} clones of a {} MiB guest restored lazily at once", args.count, args.mem_mib);
    println!(
        "{:<14} {:>16} {:>16} {:>16} {:>12} {:>12}",
        "cache", "all 1st ins ms", "all ws done ms", "all resident ms", "read MiB", "cache hits"
    );
    for r in &runs {
        println!(
            "{:<14} {:>16.1} {:>16.1} {:>16.1} {:>12.1} {:>12}",
            if r.cache { "shared" } else { "none" },
            r.all_first_instruction_ms,
            r.all_working_set_ms,
            r.all_resident_ms,
            r.bytes_read as f64 / (1 << 20) as f64,
            r.cache_hits
        );
    }
    Ok(())
}
