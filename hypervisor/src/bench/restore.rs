//! `snapvisor bench restore`: how fast a snapshot comes back, by mode, side by side.
//!
//! For each memory size, a `touch` guest fills its memory and waits for *go*; it is
//! snapshotted there (stop-and-copy) and then restored four ways, one after another in the
//! same run so that the ratios hold on a noisy machine:
//!
//! - `resident`: an eager restore whose clock starts once memory is loaded — the floor;
//! - `eager`: every page read before the vCPUs start;
//! - `lazy`: pages served by userfaultfd on touch, the rest streamed in the background;
//! - `lazy+prefetch`: lazy, loading the working set recorded by an earlier lazy run first,
//!   alongside the first instructions;
//! - `lazy+prefetch-before`: lazy, loading that working set before the first instruction.
//!
//! The two prefetch modes trade the first instruction against the working set: the table has
//! both, and `ws/floor` (working set done against the resident floor) for each. Both are
//! measured again *warm* (`lazy+prefetch warm`, `lazy+prefetch-before warm`): with the
//! working set already decompressed in a chunk cache, as in a daemon that restored the
//! snapshot before, so that a chunk costs a copy and no store read, decompression or hash.
//! Only while the working set fits the cache ([`SHARED_CACHE_BYTES`]): at 4 GiB (410 MiB of
//! working set) the cache keeps the list's tail, the restore reads it from the front, and
//! every chunk misses and is inserted again (`read MiB` shows the whole memory read): the
//! warm rows are then cold rows that also pay for filling the cache.
//!
//! Cold rows restore into an empty chunk cache of the default size, as a default restore
//! does (since December 2026; before, they ran without a cache and so did not pay for
//! keeping each chunk read).
//!
//! Restored VMs are built on pre-built VM shells as the daemon builds them (crate::shell,
//! `shell` column; `--no-shell-pool` builds every one afresh), and `lazy no-shell` is the
//! lazy row built afresh, side by side. Before each restore on a shell the bench waits,
//! untimed and at most 10 s, for the shell the restore before asked for: a daemon restoring
//! one guest after another has it ready, and a row is not left to whether the idle-priority
//! builder got a core in time (the first restore of a size has none, `shell` says so). With `--repeat N` a row is the run with the earliest
//! working set done, and `best 1st` the earliest first instruction of its N runs.
//!
//! Each restored guest is told *go* and touches its working set (`span` bytes every `stride`
//! bytes: 10% of memory by default). Reported per run: request to first guest instruction
//! (its first exit, the go poll), request to working set done, request to fully resident,
//! faults served and bytes read from the store. The guest's checksum is checked every time.
//! Also the process's CPU time (every thread) from the request to the first instruction and
//! to working set done: on a loaded host the wall clock grows with the others' work, this
//! does not, and on an idle host with `c` cores the wall time cannot beat it over `c`.
//! `list cpu µs`: the CPU time the prefetch list's loaders (their own threads) spent per
//! chunk they loaded from it, the per-chunk cost that bounds a prefetch mode on few cores.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::run::{snapshot_error, vm_error};
use crate::cli::CliError;
use crate::guests::{touch, BootInfo, Builtin};
use crate::snapshot::restore::{record_working_set, SHARED_CACHE_BYTES};
use crate::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use crate::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};
use migrate::lazy::ChunkCache;

#[derive(Debug, Args)]
pub struct RestoreBenchArgs {
    /// Guest memory sizes to measure, MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    pub mem_mib: Vec<u64>,
    /// Working set: bytes touched at each stride.
    #[arg(long, default_value_t = 64 * 1024)]
    pub span: u64,
    /// Working set: distance between touched spans (span/stride = the fraction touched).
    #[arg(long, default_value_t = 640 * 1024)]
    pub stride: u64,
    /// Store directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Threads loading the prefetch list and the rest of memory (default: one per core).
    #[arg(long)]
    pub fill_threads: Option<usize>,
    /// Restore each way this many times and keep the run with the earliest working set done
    /// (best of N: the machine's other work only ever adds time).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Measure only these rows (labels as in the table, e.g. `lazy,lazy+prefetch`); the
    /// `resident` floor is always measured. Default: every row.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Start the fill threads with the page server instead of at the guest's first exit (the
    /// behaviour before the fill gate), to compare the two in one run.
    #[arg(long)]
    pub no_fill_gate: bool,
    /// Fill threads that start with the page server despite the gate (default 0: all wait
    /// for the first exit), to compare in separate runs.
    #[arg(long)]
    pub ungated_fill_threads: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Compress the snapshot's chunks with LZ4 (chunk codec 3, `--store-codec lz4`) instead
    /// of zstd: decompression is most of a cold chunk's cost, so this shows what the codec
    /// does to the working set (compare with a run without it).
    #[arg(long)]
    pub lz4: bool,
    /// Also draw the results as an SVG bar chart into this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Build every restored VM afresh instead of taking a pre-built VM shell (shell.rs),
    /// which the bench otherwise keeps ready as the daemon does; `lazy no-shell` is that
    /// row's side-by-side baseline either way.
    #[arg(long)]
    pub no_shell_pool: bool,
}

/// One restore.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Run {
    pub mem_mib: u64,
    pub mode: &'static str,
    pub first_instruction_ms: f64,
    /// The earliest first instruction of the row's runs (`--repeat`); the row's other figures
    /// are those of the run with the earliest working set done.
    pub best_first_instruction_ms: f64,
    pub working_set_ms: f64,
    pub resident_ms: f64,
    /// Working set done against the resident floor of the same size in the same run.
    pub ws_floor: f64,
    /// CPU time of the whole process from the request to the first instruction, ms: what
    /// the restore and the threads it started spent before the guest ran (the fill threads
    /// wait at their gate until then).
    pub first_cpu_ms: f64,
    /// CPU time of the whole process (every thread: restore, vCPU, fault and fill threads)
    /// from the request to working set done, ms: unlike the wall clock, it does not grow
    /// while other work on the host has the cores. On an idle host with `c` cores the wall
    /// time is at least this over `c`, and at least the vCPU's own share.
    pub ws_cpu_ms: f64,
    /// `ws_cpu_ms` against the resident floor's.
    pub cpu_floor: f64,
    pub faults: u64,
    /// Chunks the fault thread loaded (for a prefetch mode: the fill threads were behind).
    pub chunks_on_fault: u64,
    pub bytes_read: u64,
    pub prefetch_chunks: usize,
    /// Mean per working-set chunk (on a fault or prefetched): reading it from the store
    /// (read, decompress, hash check; a copy from the cache when warm), µs.
    pub source_us: f64,
    /// Mean per working-set chunk: placing it into guest memory (`UFFDIO_COPY`), µs.
    pub place_us: f64,
    /// CPU time (the loaders' own threads) per chunk the prefetch list's loaders loaded, µs:
    /// reading, decompressing, checking and placing it, whatever else the host runs.
    pub list_cpu_us: f64,
    /// The VM was built from a pre-built shell (shell.rs).
    pub prebuilt_shell: bool,
}

/// One size's snapshot.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Snap {
    pub mem_mib: u64,
    pub snapshot_ms: f64,
    pub bytes_stored: u64,
    pub working_set_pages: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreBenchReport {
    pub snapshots: Vec<Snap>,
    pub runs: Vec<Run>,
    /// Fill threads per lazy restore.
    pub fill_threads: usize,
    /// Runs per row (the best is reported).
    pub repeat: usize,
    /// The 1-minute load average before and after the runs (other work on the machine).
    pub load_average: (f64, f64),
}

/// The 1-minute load average (0 where /proc/loadavg cannot be read).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

const TIMEOUT: Duration = Duration::from_secs(300);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn internal(what: &str) -> CliError {
    CliError::Internal(format!("bench restore: {what}"))
}

/// One way of restoring, as measured.
struct Case {
    mode: RestoreMode,
    /// The clock starts once memory is loaded (the floor).
    resident: bool,
    /// A chunk cache holding the working set decompressed, as a daemon's has once it has
    /// restored the snapshot before (clones); `None`: cold, every chunk read from the store
    /// into a fresh, empty cache of the default size, which is what a default restore fills.
    warm: Option<Arc<ChunkCache>>,
    /// Build the VM afresh even when a pre-built shell is ready (the baseline for shells).
    no_shell: bool,
}

impl Case {
    fn cold(mode: RestoreMode) -> Case {
        Case { mode, resident: false, warm: None, no_shell: false }
    }

    fn label(&self) -> &'static str {
        match (self.mode, self.resident, self.warm.is_some()) {
            (_, true, _) => "resident",
            (RestoreMode::Eager, _, _) => "eager",
            (RestoreMode::Lazy, _, _) if self.no_shell => "lazy no-shell",
            (RestoreMode::Lazy, _, _) => "lazy",
            (RestoreMode::LazyPrefetch, _, false) => "lazy+prefetch",
            (RestoreMode::LazyPrefetchBefore, _, false) => "lazy+prefetch-before",
            (RestoreMode::LazyPrefetch, _, true) => "lazy+prefetch warm",
            (RestoreMode::LazyPrefetchBefore, _, true) => "lazy+prefetch-before warm",
        }
    }
}

/// A chunk cache holding the recorded working set of `name`, decompressed: what a restore
/// that loaded it leaves behind (the VM is never started).
fn warm_cache(store: &storage::Store, name: &str) -> Result<Arc<ChunkCache>, CliError> {
    let cache = ChunkCache::new(SHARED_CACHE_BYTES);
    let opts = RestoreOptions {
        cache: Some(cache.clone()),
        background_fill: false,
        ..RestoreOptions::new(RestoreMode::LazyPrefetchBefore, Box::new(SharedOutput::default()))
    };
    drop(snapshot::restore(store, name, opts).map_err(snapshot_error)?);
    Ok(cache)
}

/// vCPUs of the benchmark's guest.
const VCPUS: u8 = 1;
/// How long a measurement waits for the shell asked for by the one before (the builder runs
/// at idle priority: on a busy host it waits for a free core).
const SHELL_WAIT: Duration = Duration::from_secs(10);

/// How the lazy restores' fill threads run: how many, gated or not, how many ungated.
#[derive(Clone, Copy)]
struct FillSetup {
    threads: usize,
    gate: bool,
    ungated: Option<usize>,
}

/// Restores `name` as `case` says, lets it touch its working set, and measures.
fn measure(
    store: &storage::Store,
    name: &str,
    mem_mib: u64,
    case: Case,
    expect: &str,
    fill: &FillSetup,
) -> Result<Run, CliError> {
    let FillSetup { threads: fill_threads, gate, ungated } = *fill;
    let (mode, resident) = (case.mode, case.resident);
    // A shell ready as in a daemon restoring one guest after another: the builder runs at
    // idle priority between restores, so the measurement gives it the time, before the
    // clocks start (not timed).
    if !case.no_shell && crate::shell::enabled() {
        crate::shell::wait_ready(crate::shell::Shape { mem_bytes: mem_mib << 20, vcpus: VCPUS }, SHELL_WAIT);
    }
    let out = SharedOutput::default();
    let cpu0 = crate::control::process_cpu_ms();
    let t0 = Instant::now();
    // Each mode is measured cold unless `case` says: a chunk cache of its own, empty, as a
    // default restore has (it keeps every chunk it reads for later restores, and that costs).
    let cache = case.warm.clone().unwrap_or_else(|| ChunkCache::new(SHARED_CACHE_BYTES));
    let mut opts = RestoreOptions {
        cache: Some(cache),
        fill_threads,
        prebuilt_shell: !case.no_shell,
        ..RestoreOptions::new(mode, Box::new(out.clone()))
    };
    let shells_taken = crate::shell::counts().0;
    if !gate {
        opts.fill_hold_off = None;
    }
    if let Some(n) = ungated {
        opts.fill_ungated = n;
    }
    let (mut vm, report) = snapshot::restore(store, name, opts).map_err(snapshot_error)?;
    let prebuilt_shell = crate::shell::counts().0 > shells_taken;
    let t0 = if resident { Instant::now() } else { t0 };
    let cpu0 = if resident { crate::control::process_cpu_ms() } else { cpu0 };
    let loaded_at = Instant::now();
    let cpu_ready = crate::control::process_cpu_ms();
    vm.devices().go.store(true, Ordering::Release);
    vm.start().map_err(vm_error)?;
    let (started_at, cpu_started) = (Instant::now(), crate::control::process_cpu_ms());
    let touched = vm
        .control()
        .wait_mark(touch::MARK_TOUCHED, TIMEOUT)
        .ok_or_else(|| internal("the working set was never touched"))?;
    let first = vm.control().first_exit().ok_or_else(|| internal("the guest never ran"))?;
    let first_cpu_ms = vm.control().first_exit_cpu_ms().map_or(0.0, |c| c - cpu0);
    // Where the time to the first instruction went: the restore, starting the vCPUs, and
    // from there to the guest's first exit (`SNAPVISOR_LOG=snapvisor::bench=debug`).
    tracing::debug!(
        target: "snapvisor::bench",
        mode = case.label(),
        restore_ms = ms(loaded_at.saturating_duration_since(t0)),
        restore_cpu_ms = cpu_ready - cpu0,
        start_ms = ms(started_at.saturating_duration_since(loaded_at)),
        start_cpu_ms = cpu_started - cpu_ready,
        to_first_exit_ms = ms(first.saturating_duration_since(started_at)),
        to_first_exit_cpu_ms = vm.control().first_exit_cpu_ms().map_or(0.0, |c| c - cpu_started),
        "restore to first instruction (ms)"
    );
    let ws_cpu_ms = vm.control().mark_cpu_ms(touch::MARK_TOUCHED).map_or(0.0, |c| c - cpu0);
    let stats = snapshot::restore::lazy_stats(&vm);
    let resident_at = if snapshot::restore::wait_resident(&vm, TIMEOUT) {
        stats.as_ref().map_or(loaded_at, |_| Instant::now())
    } else {
        return Err(internal("memory never became resident"));
    };
    let reason = vm.wait(Some(Duration::from_secs(30)));
    if out.text() != expect {
        return Err(internal(&format!(
            "{mode:?} restore: guest printed {:?}, expected {expect:?} ({reason})",
            out.text()
        )));
    }
    let stats = snapshot::restore::lazy_stats(&vm).or(stats);
    Ok(Run {
        mem_mib,
        mode: case.label(),
        first_instruction_ms: ms(first.saturating_duration_since(t0)),
        best_first_instruction_ms: ms(first.saturating_duration_since(t0)),
        working_set_ms: ms(touched.saturating_duration_since(t0)),
        resident_ms: ms(resident_at.saturating_duration_since(t0)),
        ws_floor: 0.0,
        first_cpu_ms,
        ws_cpu_ms,
        cpu_floor: 0.0,
        faults: stats.as_ref().map_or(0, |s| s.faults),
        chunks_on_fault: stats.as_ref().map_or(0, |s| s.chunks_on_fault),
        bytes_read: stats.as_ref().map_or(report.bytes_loaded, |s| s.bytes_stored_read),
        prefetch_chunks: report.prefetch_chunks,
        source_us: stats.as_ref().map_or(0.0, |s| s.mean_source_us),
        place_us: stats.as_ref().map_or(0.0, |s| s.mean_place_us),
        list_cpu_us: stats
            .as_ref()
            .filter(|s| s.chunks_prefetched > 0)
            .map_or(0.0, |s| s.list_cpu_ms * 1e3 / s.chunks_prefetched as f64),
        prebuilt_shell,
    })
}

/// The run with the earliest working set done of `repeat` (at least one).
/// Also keeps the earliest first instruction of the `repeat` runs in it.
fn best(repeat: usize, mut run: impl FnMut() -> Result<Run, CliError>) -> Result<Run, CliError> {
    let mut best = run()?;
    let mut first = best.first_instruction_ms;
    for _ in 1..repeat {
        let r = run()?;
        first = first.min(r.first_instruction_ms);
        if r.working_set_ms < best.working_set_ms {
            best = r;
        }
    }
    best.best_first_instruction_ms = first;
    Ok(best)
}

fn bench_size(
    store: &storage::Store,
    mem_mib: u64,
    args: &RestoreBenchArgs,
    threads: usize,
) -> Result<(Snap, Vec<Run>), CliError> {
    let seed = 0x5eed + mem_mib;
    let params = BuiltinParams { seed, stride: args.stride, span: args.span, ..Default::default() };
    let mut vm = Vm::new(VmConfig::new(
        mem_mib,
        VCPUS.into(),
        BootSource::Builtin { guest: Builtin::Touch, params },
        Box::new(SharedOutput::default()),
    ))
    .map_err(vm_error)?;
    vm.start().map_err(vm_error)?;
    vm.control().wait_mark(touch::MARK_FILLED, TIMEOUT).ok_or_else(|| internal("the guest never filled its memory"))?;
    let name = format!("touch-{mem_mib}");
    let save = snapshot::save(&vm, store, &name, &SaveOptions::default(), &|_| {}).map_err(snapshot_error)?;
    vm.stop("snapshot taken");
    let ranges = BootInfo::fill_ranges(&crate::memory::e820_map(mem_mib << 20));
    let (sum, pages) = touch::checksum(&ranges, seed, args.stride, args.span);
    let expect = format!("touch: working set of {pages} pages done, checksum {sum:#x}\n");

    let rep = args.repeat;
    let fill = FillSetup { threads, gate: !args.no_fill_gate, ungated: args.ungated_fill_threads };
    let wanted = |c: &Case| c.resident || args.only.is_empty() || args.only.iter().any(|l| l == c.label());
    let floor = || Case { mode: RestoreMode::Eager, resident: true, warm: None, no_shell: false };
    let mut runs = vec![best(rep, || measure(store, &name, mem_mib, floor(), &expect, &fill))?];
    let no_shell = || Case { no_shell: true, ..Case::cold(RestoreMode::Lazy) };
    for case in [|| Case::cold(RestoreMode::Eager), || Case::cold(RestoreMode::Lazy), no_shell] {
        if wanted(&case()) {
            runs.push(best(rep, || measure(store, &name, mem_mib, case(), &expect, &fill))?);
        }
    }
    // Record the working set with a lazy run, then measure with it.
    let (mut rec, _) = snapshot::restore(
        store,
        &name,
        RestoreOptions {
            background_fill: false,
            cache: None,
            ..RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default()))
        },
    )
    .map_err(snapshot_error)?;
    rec.devices().go.store(true, Ordering::Release);
    rec.start().map_err(vm_error)?;
    rec.control()
        .wait_mark(touch::MARK_TOUCHED, TIMEOUT)
        .ok_or_else(|| internal("recording run never touched its working set"))?;
    record_working_set(&rec, store, &name).map_err(snapshot_error)?;
    rec.stop("working set recorded");
    for mode in [RestoreMode::LazyPrefetch, RestoreMode::LazyPrefetchBefore] {
        if wanted(&Case::cold(mode)) {
            runs.push(best(rep, || measure(store, &name, mem_mib, Case::cold(mode), &expect, &fill))?);
        }
    }
    // The same with the working set already decompressed in memory (a daemon's chunk cache
    // after an earlier restore of the snapshot), each with a cache of its own.
    for mode in [RestoreMode::LazyPrefetch, RestoreMode::LazyPrefetchBefore] {
        let shape = Case { mode, resident: false, warm: Some(ChunkCache::new(0)), no_shell: false };
        if !wanted(&shape) {
            continue;
        }
        runs.push(best(rep, || {
            let warm = Some(warm_cache(store, &name)?);
            measure(store, &name, mem_mib, Case { mode, resident: false, warm, no_shell: false }, &expect, &fill)
        })?);
    }
    let floor = runs[0].working_set_ms.max(1e-3);
    let cpu_floor = runs[0].ws_cpu_ms.max(1e-3);
    for r in &mut runs {
        r.ws_floor = r.working_set_ms / floor;
        r.cpu_floor = r.ws_cpu_ms / cpu_floor;
    }
    Ok((
        Snap { mem_mib, snapshot_ms: save.total_ms, bytes_stored: save.store.bytes_stored, working_set_pages: pages },
        runs,
    ))
}

pub fn measure_all(args: &RestoreBenchArgs) -> Result<RestoreBenchReport, CliError> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = super::scratch_dir("restore")?;
            tmp.path().join("store")
        }
    };
    let opts = storage::StoreOptions { lz4: args.lz4, ..Default::default() };
    let store = storage::Store::open_with(&dir, opts)
        .map_err(|e| CliError::Input(format!("opening store {}: {e}", dir.display())))?;
    let threads = args.fill_threads.unwrap_or_else(migrate::lazy::default_fill_threads).max(1);
    // The pool as the daemon keeps it, for this measurement only.
    let _pool = ShellPoolFor::measurement(!args.no_shell_pool);
    let mut report = RestoreBenchReport {
        snapshots: Vec::new(),
        runs: Vec::new(),
        fill_threads: threads,
        repeat: args.repeat.max(1),
        load_average: (0.0, 0.0),
    };
    report.load_average.0 = load_average();
    for &mem in &args.mem_mib {
        let (snap, runs) = bench_size(&store, mem, args, threads)?;
        report.snapshots.push(snap);
        report.runs.extend(runs);
        let _ = store.delete(&format!("touch-{mem}"));
        let _ = store.gc();
    }
    report.load_average.1 = load_average();
    Ok(report)
}

/// The shell pool on or off for a measurement, and as it was again afterwards.
struct ShellPoolFor(bool);
impl ShellPoolFor {
    fn measurement(on: bool) -> ShellPoolFor {
        let was = crate::shell::enabled();
        crate::shell::enable(on);
        ShellPoolFor(was)
    }
}
impl Drop for ShellPoolFor {
    fn drop(&mut self) {
        crate::shell::enable(self.0);
    }
}

pub fn run(args: RestoreBenchArgs) -> Result<(), CliError> {
    let r = measure_all(&args)?;
    if let Some(path) = &args.plot {
        std::fs::write(path, super::plot::svg(&r))
            .map_err(|e| CliError::Input(format!("writing {}: {e}", path.display())))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).map_err(|e| internal(&e.to_string()))?);
        return Ok(());
    }
    for s in &r.snapshots {
        println!(
            "{} MiB: snapshot {:.0} ms, {:.1} MiB stored, working set {} pages ({:.0}%)",
            s.mem_mib,
            s.snapshot_ms,
            s.bytes_stored as f64 / (1 << 20) as f64,
            s.working_set_pages,
            100.0 * args.span as f64 / args.stride as f64
        );
    }
    println!(
        "{} fill threads per lazy restore; best of {} per row; load average {:.2} before, {:.2} after",
        r.fill_threads, r.repeat, r.load_average.0, r.load_average.1
    );
    println!(
        "{:>8} {:<21} {:>5} {:>12} {:>8} {:>9} {:>12} {:>12} {:>8} {:>9} {:>9} {:>7} {:>9} {:>10} {:>10} {:>9} {:>11}",
        "mem MiB",
        "mode",
        "shell",
        "first ins ms",
        "best 1st",
        "1st cpu",
        "ws done ms",
        "resident ms",
        "ws/floor",
        "ws cpu ms",
        "cpu/floor",
        "faults",
        "on fault",
        "read MiB",
        "source µs",
        "place µs",
        "list cpu µs"
    );
    for run in &r.runs {
        println!(
            "{:>8} {:<21} {:>5} {:>12.2} {:>8.2} {:>9.2} {:>12.2} {:>12.2} {:>7.2}x {:>9.2} {:>8.2}x {:>7} {:>9} {:>10.1} {:>10.1} {:>9.1} {:>11.1}",
            run.mem_mib,
            run.mode,
            if run.prebuilt_shell { "yes" } else { "no" },
            run.first_instruction_ms,
            run.best_first_instruction_ms,
            run.first_cpu_ms,
            run.working_set_ms,
            run.resident_ms,
            run.ws_floor,
            run.ws_cpu_ms,
            run.cpu_floor,
            run.faults,
            run.chunks_on_fault,
            run.bytes_read as f64 / (1 << 20) as f64,
            run.source_us,
            run.place_us,
            run.list_cpu_us
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait for a shell is not part of a row's times: with a builder that never finishes
    /// (held in its `ran` check) the bench waits all of [`SHELL_WAIT`] and then restores
    /// without a shell, and the times it reports fit in what the call took after that wait.
    /// (The clock used to start before the wait, so a row counted it as restore time.)
    #[test]
    fn the_shell_wait_is_not_timed() {
        let mem_mib = 32;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = storage::Store::open_with(dir.path(), storage::StoreOptions::default()).expect("store");
        let (stride, span) = (640 * 1024, 64 * 1024);
        let params = BuiltinParams { seed: 7, stride, span, ..Default::default() };
        let boot = BootSource::Builtin { guest: Builtin::Touch, params };
        let mut vm =
            Vm::new(VmConfig::new(mem_mib, VCPUS.into(), boot, Box::new(SharedOutput::default()))).expect("vm");
        vm.start().expect("start");
        assert!(vm.control().wait_mark(touch::MARK_FILLED, TIMEOUT).is_some(), "the guest never filled its memory");
        snapshot::save(&vm, &store, "touch", &SaveOptions::default(), &|_| {}).expect("snapshot");
        vm.stop("snapshot taken");
        let ranges = BootInfo::fill_ranges(&crate::memory::e820_map(mem_mib << 20));
        let (sum, pages) = touch::checksum(&ranges, 7, stride, span);
        let expect = format!("touch: working set of {pages} pages done, checksum {sum:#x}\n");

        crate::shell::enable(true);
        let shape = crate::shell::Shape { mem_bytes: mem_mib << 20, vcpus: VCPUS };
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = std::sync::Mutex::new(held);
        crate::shell::request(shape, move || {
            let _ = held.lock().map(|h| h.recv());
            true
        });
        let fill = FillSetup { threads: 1, gate: true, ungated: None };
        let t = Instant::now();
        let run = measure(&store, "touch", mem_mib, Case::cold(RestoreMode::Lazy), &expect, &fill).expect("measure");
        let after_wait = t.elapsed().saturating_sub(SHELL_WAIT);
        let _ = release.send(());
        crate::shell::enable(false);
        assert!(!run.prebuilt_shell, "no shell was ever built, yet the row ran on one");
        // The row's times are measured after the wait, so they fit in what followed it
        // (rounded to a microsecond for the conversion to milliseconds).
        let fits = |ms: f64| Duration::from_secs_f64(ms / 1e3) <= after_wait + Duration::from_micros(1);
        assert!(
            fits(run.first_instruction_ms),
            "first instruction {} ms includes the shell wait",
            run.first_instruction_ms
        );
        assert!(
            fits(run.resident_ms),
            "resident {} ms includes the shell wait ({after_wait:?} after it)",
            run.resident_ms
        );
    }
}
