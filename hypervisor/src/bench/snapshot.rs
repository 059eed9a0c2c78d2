//! `snapvisor bench snapshot`: what a snapshot costs, per mode and size, with today's path as
//! the baseline in the same run.
//!
//! Two guests per size:
//! - `touch`, waiting for its go with all memory filled (the memfill pattern in every fourth
//!   word, zeros between: compressible, as real memory is):
//!   `baseline` (stop-and-copy on the previous copy path: `threads` threads each reading,
//!   hashing, compressing and appending their own chunks), `full` (stop-and-copy through the
//!   pipeline), and `incremental-1pct` (the next snapshot after 1% of memory, every 100th
//!   chunk above 16 MiB, was rewritten with random bytes by the VMM through device memory);
//!   `background` (write-protect, resume, copy beside the running guest; full),
//!   `background-in-pause` (the same without pre-protection: all RAM write-protected in the
//!   pause, the path before it, as the baseline for the pause) and
//!   `background-inc-1pct` (the same 1% rewritten again, then a background incremental);
//!   then eager and lazy restores of the full snapshot to the first guest instruction
//!   (`restore-eager`, `restore-lazy`: `total_ms` is that time); then a snapshot taken at
//!   once after a lazy restore of it, while its background fill runs: `after-lazy-stop`
//!   (no wait for the fill: stop-and-copy, what such a snapshot did before December 2026)
//!   and `after-lazy-bg` (the default: the fill finishes with the guest running, then a
//!   background snapshot; `fill_wait_ms` is that wait, part of `total_ms`).
//! - `memfill`, rewriting all of its memory with incompressible words the whole time:
//!   `baseline`, `full`, `live` (dirty-log pre-copy; the worst case for it), `background-in-pause`
//!   and `background` (the guest's writes fault and copy their chunk first; the worst case
//!   for it too; pre-protection's rounds race the guest's writes).
//!
//! Background rows also break the pause down (`stop_vcpus_ms`, `prep_ms`, `state_ms`,
//! `protect_ms`) and say what pre-protection did before it (`pre_protect_ms`, `track_rounds`,
//! `armed_chunks`: the chunks the pause itself had to protect; `track_faults`: the writes
//! that met pre-protected memory, a measure of how far the guest got meanwhile).
//!
//! `pause_vs_full` is a row's pause over the stop-and-copy pipeline's (`full`) pause, same guest
//! and size: how much shorter the pause is than stop-and-copy's in the same run.
//!
//! Each full snapshot goes into an emptied store (the one before it is deleted and collected,
//! outside the timing), so none deduplicates against another. `pause_ms` is how long the
//! vCPUs were stopped, `total_ms` the whole call; bytes read (out of guest memory), hashed
//! (non-zero chunks), compressed (chunks the store lacked) and written (compressed values
//! appended to packs); `read_ms`/`work_ms`/`write_ms` are the pipeline's stages summed over
//! their threads (wall time, waits and preemption included); `cpu_ms` (added December 2026)
//! the CPU time of the pipeline's workers, summed, which a busy machine inflates far less;
//! `commit_ms` the store commit (pack and index syncs, manifest).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::run::{snapshot_error, vm_error};
use crate::cli::CliError;
use crate::guests::{touch, Builtin};
use crate::snapshot::{self, RestoreMode, RestoreOptions, SaveHooks, SaveMode, SaveOptions, SaveReport};
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
    /// Back the guests' RAM with transparent huge pages (`MADV_HUGEPAGE` before the first
    /// touch, as QEMU does): write-protecting RAM then works on 2 MiB entries, not 4 KiB ones.
    #[arg(long)]
    pub thp: bool,
    /// Compress new chunks with LZ4 (chunk codec 3) instead of zstd, to compare the two in
    /// one run against a run without it.
    #[arg(long)]
    pub lz4: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotRow {
    pub mode: String,
    /// The snapshot mode that ran (background, stop, live); empty for restores.
    pub save_mode: &'static str,
    pub guest: &'static str,
    pub mem_mib: u64,
    pub pause_ms: f64,
    pub total_ms: f64,
    pub bytes_read: u64,
    pub bytes_hashed: u64,
    pub bytes_compressed: u64,
    pub bytes_written: u64,
    pub zero_chunks: u64,
    pub inherited_chunks: u64,
    pub read_ms: f64,
    pub work_ms: f64,
    pub write_ms: f64,
    /// CPU time of the pipeline's workers, summed (thread CPU clocks): the stages' cost
    /// without waits and preemption, so it holds on a busy machine. 0 for the baseline.
    pub cpu_ms: f64,
    pub commit_ms: f64,
    /// `total_ms` over the baseline's, same guest and size (1.0 for the baseline).
    pub vs_baseline: Option<f64>,
    /// `pause_ms` over the stop-and-copy pipeline's (`full`), same guest and size.
    pub pause_vs_full: Option<f64>,
    /// Within the pause: reading the dirty records and preparing the copy (stop: and the
    /// copy itself), saving vCPU and device state, write-protecting RAM (background).
    pub prep_ms: f64,
    pub state_ms: f64,
    pub protect_ms: f64,
    /// Background: write faults taken, and chunks they copied ahead of the saver.
    pub wp_faults: u64,
    pub wp_chunks_copied: u64,
    /// Background: stopping the vCPUs, within the pause.
    pub stop_vcpus_ms: f64,
    /// Background: pre-protecting RAM and its rounds, before the pause (guest running).
    pub pre_protect_ms: f64,
    /// Background: pre-protection's rounds, and the chunks the pause itself protected.
    pub track_rounds: u64,
    pub armed_chunks: u64,
    /// Background: write faults while RAM was pre-protected (the guest's writes then).
    pub track_faults: u64,
    /// Waiting for a lazy restore's fill to finish before a background snapshot (guest
    /// running; part of `total_ms`).
    pub fill_wait_ms: f64,
}

const TIMEOUT: Duration = Duration::from_secs(300);

fn internal(what: String) -> CliError {
    CliError::Internal(format!("bench snapshot: {what}"))
}

fn row(mode: &str, guest: &'static str, mem_mib: u64, r: &SaveReport) -> SnapshotRow {
    let ns = |n: u64| n as f64 / 1e6;
    SnapshotRow {
        mode: mode.to_string(),
        save_mode: r.mode.as_str(),
        guest,
        mem_mib,
        pause_ms: r.pause_ms,
        total_ms: r.total_ms,
        bytes_read: r.bytes_copied,
        bytes_hashed: r.store.bytes_hashed,
        bytes_compressed: r.store.bytes_compressed_in,
        bytes_written: r.store.bytes_stored,
        zero_chunks: r.store.zero_chunks,
        inherited_chunks: r.store.inherited_chunks,
        read_ms: ns(r.pipeline.read_ns),
        work_ms: ns(r.pipeline.work_ns),
        write_ms: ns(r.pipeline.write_ns),
        cpu_ms: ns(r.pipeline.cpu_ns),
        commit_ms: r.commit_ms,
        vs_baseline: None,
        pause_vs_full: None,
        prep_ms: r.paused_copy_ms,
        state_ms: r.state_ms,
        protect_ms: r.protect_ms,
        wp_faults: r.wp.map_or(0, |w| w.faults),
        wp_chunks_copied: r.wp.map_or(0, |w| w.chunks_copied_on_fault),
        stop_vcpus_ms: r.stop_vcpus_ms,
        pre_protect_ms: r.pre_protect_ms,
        track_rounds: r.wp.map_or(0, |w| w.track_rounds),
        armed_chunks: r.wp.map_or(0, |w| w.armed_chunks),
        track_faults: r.wp.map_or(0, |w| w.track_faults),
        fill_wait_ms: r.fill_wait.map_or(0.0, |w| w.ms),
    }
}

fn restore_row(mode: &str, mem_mib: u64, first_ms: f64) -> SnapshotRow {
    SnapshotRow {
        mode: mode.to_string(),
        save_mode: "",
        guest: "touch",
        mem_mib,
        pause_ms: 0.0,
        total_ms: first_ms,
        bytes_read: 0,
        bytes_hashed: 0,
        bytes_compressed: 0,
        bytes_written: 0,
        zero_chunks: 0,
        inherited_chunks: 0,
        read_ms: 0.0,
        work_ms: 0.0,
        write_ms: 0.0,
        cpu_ms: 0.0,
        commit_ms: 0.0,
        vs_baseline: None,
        pause_vs_full: None,
        prep_ms: 0.0,
        state_ms: 0.0,
        protect_ms: 0.0,
        wp_faults: 0,
        wp_chunks_copied: 0,
        stop_vcpus_ms: 0.0,
        pre_protect_ms: 0.0,
        track_rounds: 0,
        armed_chunks: 0,
        track_faults: 0,
        fill_wait_ms: 0.0,
    }
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

/// Restores `name` lazily (the default way: background fill, the fill threads starting at
/// the guest's first exit), starts it and snapshots it at once with `opts` into an empty
/// store beside `store`.
fn after_lazy(store: &storage::Store, name: &str, opts: SaveOptions) -> Result<SaveReport, CliError> {
    let (mut vm, _) =
        snapshot::restore(store, name, RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default())))
            .map_err(snapshot_error)?;
    vm.start().map_err(vm_error)?;
    let to = fresh_store(store, "after-lazy")?;
    let report = save(&vm, &to, "after-lazy", opts);
    vm.stop("measured");
    drop(to);
    std::fs::remove_dir_all(beside(store, "after-lazy")).map_err(|e| internal(format!("removing the store: {e}")))?;
    report
}

/// An empty store in the directory beside `store`'s, named with `-{sub}` appended.
fn fresh_store(store: &storage::Store, sub: &str) -> Result<storage::Store, CliError> {
    let dir = beside(store, sub);
    let _ = std::fs::remove_dir_all(&dir);
    storage::Store::open_with(&dir, store.options().clone())
        .map_err(|e| internal(format!("opening {}: {e}", dir.display())))
}

fn beside(store: &storage::Store, sub: &str) -> PathBuf {
    let mut name = store.path().as_os_str().to_owned();
    name.push(format!("-{sub}"));
    PathBuf::from(name)
}

/// Deletes `name` and collects its chunks, so the next full snapshot deduplicates nothing.
fn discard(store: &storage::Store, name: &str) -> Result<(), CliError> {
    store.delete(name).map_err(|e| internal(format!("deleting {name}: {e}")))?;
    store.gc().map_err(|e| internal(format!("gc: {e}")))?;
    Ok(())
}

fn save(vm: &Vm, store: &storage::Store, name: &str, opts: SaveOptions) -> Result<SaveReport, CliError> {
    snapshot::save(vm, store, name, &opts, &|_| {}).map_err(snapshot_error)
}

const BASELINE: SaveOptions = SaveOptions {
    mode: SaveMode::Stop,
    live: false,
    max_rounds: 8,
    final_chunks: 64,
    threads: 2,
    stay_paused: false,
    incremental: false,
    pipeline: false,
    wp_buffer_bytes: snapshot::save::DEFAULT_WP_BUFFER,
    pre_protect: true,
    cancel: None,
    fill_wait: snapshot::save::DEFAULT_FILL_WAIT,
    end_fill_wait: None,
    hooks: SaveHooks::NONE,
};
const FULL: SaveOptions = SaveOptions { pipeline: true, ..BASELINE };
const BACKGROUND: SaveOptions = SaveOptions { mode: SaveMode::Background, ..FULL };
const IN_PAUSE: SaveOptions = SaveOptions { pre_protect: false, ..BACKGROUND };

/// Rewrites 1% of the guest's memory (every 100th 64 KiB chunk above 16 MiB) with random
/// bytes through device memory, as a device would.
fn write_one_percent(vm: &Vm, seed: u64) -> Result<u64, CliError> {
    let size = vm.ram().size().min(crate::layout::PCI_HOLE_START);
    let mut x = seed | 1;
    let mut chunk = vec![0u8; 64 << 10];
    let mut written = 0;
    let mut off = 16u64 << 20;
    while off + chunk.len() as u64 <= size {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        vm.ram().device_memory().write(off, &chunk).map_err(|e| internal(format!("writing guest memory: {e}")))?;
        written += chunk.len() as u64;
        off += 100 * chunk.len() as u64;
    }
    Ok(written)
}

/// Asks for transparent huge pages on `vm`'s RAM (not yet touched).
fn advise_huge_pages(vm: &Vm) -> Result<(), CliError> {
    let b = vm.ram().block();
    // SAFETY: the range is pc.ram's whole mapping, which the block owns and keeps mapped for
    // the VM's life; MADV_HUGEPAGE only changes how later faults in it are backed.
    let r = unsafe { libc::madvise(b.host_addr().cast(), b.max_length() as usize, libc::MADV_HUGEPAGE) };
    if r != 0 {
        return Err(internal(format!("MADV_HUGEPAGE on pc.ram: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

fn touch_rows(store: &storage::Store, mem_mib: u64, thp: bool, rows: &mut Vec<SnapshotRow>) -> Result<(), CliError> {
    let params = BuiltinParams { seed: 4, ..Default::default() };
    let mut vm = Vm::new(VmConfig::new(
        mem_mib,
        1,
        BootSource::Builtin { guest: Builtin::Touch, params },
        Box::new(SharedOutput::default()),
    ))
    .map_err(vm_error)?;
    if thp {
        advise_huge_pages(&vm)?;
    }
    vm.start().map_err(vm_error)?;
    vm.control().wait_mark(touch::MARK_FILLED, TIMEOUT).ok_or_else(|| internal("touch never filled".into()))?;
    let base = save(&vm, store, &format!("touch-base-{mem_mib}"), BASELINE)?;
    rows.push(row("baseline", "touch", mem_mib, &base));
    discard(store, &format!("touch-base-{mem_mib}"))?;
    let full_name = format!("touch-full-{mem_mib}");
    let full = save(&vm, store, &full_name, FULL)?;
    rows.push(row("full", "touch", mem_mib, &full));
    write_one_percent(&vm, mem_mib)?;
    let inc_name = format!("touch-inc-{mem_mib}");
    let inc = save(&vm, store, &inc_name, SaveOptions { incremental: true, ..FULL })?;
    if !inc.incremental {
        return Err(internal(format!("the repeat snapshot was full: {:?}", inc.full_reason)));
    }
    rows.push(row("incremental-1pct", "touch", mem_mib, &inc));
    // Background rows go into a store of their own, so they deduplicate nothing against the
    // stop-and-copy snapshots kept for the restores below.
    let bg_store = fresh_store(store, "background")?;
    let in_pause_name = format!("touch-bg-in-pause-{mem_mib}");
    let in_pause = save(&vm, &bg_store, &in_pause_name, IN_PAUSE)?;
    rows.push(row("background-in-pause", "touch", mem_mib, &in_pause));
    discard(&bg_store, &in_pause_name)?;
    let bg_name = format!("touch-bg-{mem_mib}");
    let bg = save(&vm, &bg_store, &bg_name, BACKGROUND)?;
    rows.push(row("background", "touch", mem_mib, &bg));
    write_one_percent(&vm, mem_mib + 1)?;
    let bg_inc_name = format!("touch-bg-inc-{mem_mib}");
    let bg_inc = save(&vm, &bg_store, &bg_inc_name, SaveOptions { incremental: true, ..BACKGROUND })?;
    if !bg_inc.incremental {
        return Err(internal(format!("the repeat background snapshot was full: {:?}", bg_inc.full_reason)));
    }
    rows.push(row("background-inc-1pct", "touch", mem_mib, &bg_inc));
    vm.stop("snapshots taken");
    let eager = first_instruction(store, &full_name, RestoreMode::Eager)?;
    let lazy = first_instruction(store, &full_name, RestoreMode::Lazy)?;
    rows.push(restore_row("restore-eager", mem_mib, eager));
    rows.push(restore_row("restore-lazy", mem_mib, lazy));
    // A snapshot at once after a lazy restore, while its fill runs: stop-and-copy, as it
    // was before, against background after waiting for the fill.
    let now = SaveOptions { fill_wait: Duration::ZERO, ..BACKGROUND };
    rows.push(row("after-lazy-stop", "touch", mem_mib, &after_lazy(store, &full_name, now)?));
    rows.push(row("after-lazy-bg", "touch", mem_mib, &after_lazy(store, &full_name, BACKGROUND)?));
    drop(bg_store);
    std::fs::remove_dir_all(beside(store, "background")).map_err(|e| internal(format!("removing the store: {e}")))?;
    discard(store, &inc_name)?;
    discard(store, &full_name)?;
    Ok(())
}

fn memfill_rows(store: &storage::Store, mem_mib: u64, thp: bool, rows: &mut Vec<SnapshotRow>) -> Result<(), CliError> {
    let params = BuiltinParams { seed: 3, passes: 0, ..Default::default() };
    let out = SharedOutput::default();
    let mut vm = Vm::new(VmConfig::new(
        mem_mib,
        1,
        BootSource::Builtin { guest: Builtin::Memfill, params },
        Box::new(out.clone()),
    ))
    .map_err(vm_error)?;
    if thp {
        advise_huge_pages(&vm)?;
    }
    vm.start().map_err(vm_error)?;
    let deadline = Instant::now() + TIMEOUT;
    while !out.text().contains('\n') && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let base = save(&vm, store, &format!("memfill-base-{mem_mib}"), BASELINE)?;
    rows.push(row("baseline", "memfill", mem_mib, &base));
    discard(store, &format!("memfill-base-{mem_mib}"))?;
    let full = save(&vm, store, &format!("memfill-full-{mem_mib}"), FULL)?;
    rows.push(row("full", "memfill", mem_mib, &full));
    discard(store, &format!("memfill-full-{mem_mib}"))?;
    let live = save(&vm, store, &format!("memfill-live-{mem_mib}"), SaveOptions { live: true, ..FULL })?;
    rows.push(row("live", "memfill", mem_mib, &live));
    discard(store, &format!("memfill-live-{mem_mib}"))?;
    let in_pause = save(&vm, store, &format!("memfill-bg-in-pause-{mem_mib}"), IN_PAUSE)?;
    rows.push(row("background-in-pause", "memfill", mem_mib, &in_pause));
    discard(store, &format!("memfill-bg-in-pause-{mem_mib}"))?;
    let bg = save(&vm, store, &format!("memfill-bg-{mem_mib}"), BACKGROUND)?;
    rows.push(row("background", "memfill", mem_mib, &bg));
    vm.stop("measured");
    discard(store, &format!("memfill-bg-{mem_mib}"))?;
    Ok(())
}

pub fn run(args: SnapshotBenchArgs) -> Result<(), CliError> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = super::scratch_dir("snapshot")?;
            tmp.path().join("store")
        }
    };
    let opts = storage::StoreOptions { lz4: args.lz4, ..Default::default() };
    let store = storage::Store::open_with(&dir, opts)
        .map_err(|e| CliError::Input(format!("opening store {}: {e}", dir.display())))?;
    let mut rows = Vec::new();
    let mut result = Ok(());
    for &m in &args.mem_mib {
        result = touch_rows(&store, m, args.thp, &mut rows).and_then(|()| memfill_rows(&store, m, args.thp, &mut rows));
        if result.is_err() {
            break;
        }
    }
    drop(store);
    result?;
    let baselines: Vec<(&'static str, u64, f64)> =
        rows.iter().filter(|r| r.mode == "baseline").map(|r| (r.guest, r.mem_mib, r.total_ms)).collect();
    for r in rows.iter_mut().filter(|r| !r.mode.starts_with("restore")) {
        if let Some((_, _, b)) = baselines.iter().find(|(g, m, _)| *g == r.guest && *m == r.mem_mib) {
            r.vs_baseline = Some(r.total_ms / b);
        }
    }
    let fulls: Vec<(&'static str, u64, f64)> =
        rows.iter().filter(|r| r.mode == "full").map(|r| (r.guest, r.mem_mib, r.pause_ms)).collect();
    for r in rows.iter_mut().filter(|r| !r.mode.starts_with("restore")) {
        if let Some((_, _, p)) = fulls.iter().find(|(g, m, _)| *g == r.guest && *m == r.mem_mib) {
            r.pause_vs_full = Some(r.pause_ms / p);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows).map_err(|e| internal(e.to_string()))?);
        return Ok(());
    }
    println!(
        "{:<19} {:<8} {:>5} {:>9} {:>8} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "mode",
        "guest",
        "MiB",
        "pause ms",
        "x full",
        "total ms",
        "x base",
        "read MiB",
        "hash MiB",
        "zstd MiB",
        "wrote MiB",
        "read ms",
        "work ms",
        "write ms",
        "cpu ms",
        "commit ms"
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for r in &rows {
        println!(
            "{:<19} {:<8} {:>5} {:>9.1} {:>8} {:>9.1} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.1}",
            r.mode,
            r.guest,
            r.mem_mib,
            r.pause_ms,
            r.pause_vs_full.map(|v| format!("{v:.4}")).unwrap_or_default(),
            r.total_ms,
            r.vs_baseline.map(|v| format!("{v:.3}")).unwrap_or_default(),
            mib(r.bytes_read),
            mib(r.bytes_hashed),
            mib(r.bytes_compressed),
            mib(r.bytes_written),
            r.read_ms,
            r.work_ms,
            r.write_ms,
            r.cpu_ms,
            r.commit_ms
        );
    }
    println!(
        "\n{:<19} {:<8} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>7} {:>7} {:>12} {:>12}",
        "background pause",
        "guest",
        "MiB",
        "pause ms",
        "stop ms",
        "prep ms",
        "state ms",
        "prot ms",
        "pre-prot ms",
        "rounds",
        "armed",
        "track faults",
        "fill wait ms"
    );
    for r in rows.iter().filter(|r| r.save_mode == "background") {
        println!(
            "{:<19} {:<8} {:>5} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>12.1} {:>7} {:>7} {:>12} {:>12.1}",
            r.mode,
            r.guest,
            r.mem_mib,
            r.pause_ms,
            r.stop_vcpus_ms,
            r.prep_ms,
            r.state_ms,
            r.protect_ms,
            r.pre_protect_ms,
            r.track_rounds,
            r.armed_chunks,
            r.track_faults,
            r.fill_wait_ms
        );
    }
    Ok(())
}
