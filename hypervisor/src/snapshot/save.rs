//! Taking a snapshot: background (userfaultfd write protection), stop-and-copy, or live with
//! KVM's dirty log; full, or incremental against the VM's parent snapshot (see
//! [`super::lineage`]). [`super::mode`] says which mode runs when.
//!
//! Background: the vCPUs pause, the chunks to save are chosen (all, or those dirtied since
//! the parent), vCPU and device state are captured and those chunks write-protected; the
//! guest resumes and the chunks are copied into the pipeline while it runs, each holding the
//! bytes of the pause ([`super::background`]). The commit follows with the guest running. The
//! pause reported is from the pause to the resume.
//!
//! RAM goes through the store's chunk pipeline ([`storage::put_pipelined`]): `threads`
//! workers each copy chunks out of guest memory, zero-check, hash, compress and store them,
//! the packs in chunk order. `SaveOptions::pipeline = false` keeps the previous path (each of
//! `threads` threads reads, hashes, compresses and appends its own chunks, in no set order)
//! as the benchmark's baseline.
//!
//! Live: dirty logging is switched on, every chunk is copied while the guest runs (round 0),
//! then the chunks dirtied meanwhile are copied again, round after round, until few remain,
//! a round fails to shrink the dirty set (the guest dirties memory as fast as it is copied)
//! or the round limit is reached; the vCPUs are then paused, the last dirty chunks and all device
//! and vCPU state are copied, the snapshot is committed and the vCPUs resume. The pause is
//! what the guest notices and is reported.
//!
//! A RAM block resized while this runs (the guest rebuilt its ACPI tables, say) would make the
//! copy inconsistent, so a listener on the RAM-block registry notes it and the snapshot is
//! cancelled: nothing is committed (the writer is dropped; GC reclaims its chunks) and the VM
//! keeps running.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use migrate::ram::wp::WpStats;
use migrate::ram::{RamBlock, RamBlockListener};
use migrate::snapshot::check::describe;
use migrate::snapshot::format::{serde_bytes_compat::Bytes, VmSnapshot};
use migrate::snapshot::ram_io::{block_specs, save_chunks};
use storage::{ChunkJob, PipelineStats, SnapshotWriter, Store, StoreError, WriteStats};

use super::background::{self, PreProtect};
use super::devices::{check_all_saved, persistables};
use super::mode::{resolve, wait_for_fill, EndFillWait, FillWait, SaveHooks, SaveMode};
use super::vcpu_state::{save_vcpu, save_vm, HostVcpuCaps};
use super::SnapshotError;
use crate::control::RunState;
use crate::vm::Vm;

/// How to take a snapshot.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// How to copy memory (see [`super::mode`]); the default, background, gives the shortest
    /// pause.
    pub mode: SaveMode,
    /// The old flag for `mode: Live`; when set, it wins over `mode`.
    pub live: bool,
    /// Live: the most rounds of re-copying dirty chunks before the final pause; background:
    /// the most rounds of re-protecting written chunks before the pause.
    pub max_rounds: u32,
    /// Live: pause once a round leaves this few dirty chunks; background: once a round
    /// re-protects this few.
    pub final_chunks: usize,
    /// Threads compressing chunks.
    pub threads: usize,
    /// Leave the VM paused afterwards (otherwise it resumes if it was running).
    pub stay_paused: bool,
    /// Stop-and-copy: copy only the chunks dirtied since the VM's parent snapshot and take the
    /// rest from the parent's manifest, when the VM has a usable parent.
    pub incremental: bool,
    /// Copy through the ordered chunk pipeline (workers that store in chunk order); `false`
    /// is the previous path, kept as the benchmark's baseline.
    pub pipeline: bool,
    /// Background: the most bytes of chunks copied ahead of the saver on a write fault.
    pub wp_buffer_bytes: u64,
    /// Background: write-protect RAM while the guest still runs, so the pause only
    /// re-protects what it wrote since ([`super::background`]); `false` protects all of it in
    /// the pause (the benchmark's baseline).
    pub pre_protect: bool,
    /// Set from another thread to cancel the snapshot (the daemon does when the VM is
    /// deleted): it fails with [`SnapshotError::Cancelled`] at the next check, between live
    /// rounds, after every chunk of a background copy and before the commit, and nothing is
    /// committed. A stop-and-copy round under way finishes its copy first.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Background, the VM lazily restored and still being filled: how long to wait, the
    /// guest running, for the fill to finish so that the snapshot can run in the background
    /// (a page server's ranges cannot be write-protected); stop-and-copy after that, or at
    /// once with zero. See [`super::mode`].
    pub fill_wait: Duration,
    /// Asked from the wait for a lazy fill ([`SaveOptions::fill_wait`]): once it says so, the
    /// wait ends without cancelling the snapshot, which goes on stop-and-copy. The daemon
    /// ends it when it stops, so that the shutdown's own snapshot, queued behind this one, is
    /// not kept waiting, and while a client's pause, resume or stop of the VM is queued.
    pub end_fill_wait: Option<EndFillWait>,
    /// Test hooks.
    pub hooks: SaveHooks,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            mode: SaveMode::Background,
            live: false,
            max_rounds: 8,
            final_chunks: 64,
            threads: 2,
            stay_paused: false,
            incremental: true,
            pipeline: true,
            wp_buffer_bytes: DEFAULT_WP_BUFFER,
            pre_protect: true,
            cancel: None,
            fill_wait: DEFAULT_FILL_WAIT,
            end_fill_wait: None,
            hooks: SaveHooks::NONE,
        }
    }
}

/// Background snapshots' default bound on waiting for a lazy restore's fill
/// ([`SaveOptions::fill_wait`]): a 4 GiB guest fills in 4-8 s on the test machine.
pub const DEFAULT_FILL_WAIT: Duration = Duration::from_secs(60);

/// Background snapshots' default bound of chunks copied on write faults ahead of the saver.
pub const DEFAULT_WP_BUFFER: u64 = 64 << 20;

/// Progress of a snapshot: reported after each round of copying (live), once an incremental
/// snapshot knows which chunks it takes from its parent, and at the end. Every field is always
/// there (it is also the JSON of a snapshot operation's progress, see service/progress.rs).
/// When the snapshot is done, `chunks_copied + chunks_inherited == chunks_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SaveProgress {
    /// Live copying rounds finished before this report (0 in the other modes).
    pub round: u32,
    /// Chunks of all RAM blocks.
    pub chunks_total: u64,
    /// Chunks of this snapshot copied so far, each counted once: a live snapshot's later
    /// rounds copy dirty chunks again, which shows in `bytes_copied` and `dirty_chunks`.
    pub chunks_copied: u64,
    /// Chunks an incremental snapshot takes by reference from its parent (never copied).
    pub chunks_inherited: u64,
    /// Bytes read out of guest memory so far, every round.
    pub bytes_copied: u64,
    /// Live: chunks found dirty for the next round; 0 otherwise.
    pub dirty_chunks: u64,
}

/// What a snapshot took.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SaveReport {
    pub name: String,
    /// The mode that ran.
    pub mode: SaveMode,
    /// Why it is not the mode asked for, if it is not.
    pub mode_reason: Option<String>,
    /// Live (kept for the old API): `mode == live`.
    pub live: bool,
    pub rounds: u32,
    pub total_ms: f64,
    /// How long the vCPUs were paused for it (background: until they resumed, before the
    /// copy and the commit).
    pub pause_ms: f64,
    pub ram_bytes: u64,
    /// Bytes read out of guest memory (every round).
    pub bytes_copied: u64,
    pub store: WriteStats,
    /// Copied only what changed since `parent`.
    pub incremental: bool,
    /// The parent snapshot the unchanged chunks were taken from.
    pub parent: Option<String>,
    /// Why a snapshot that could have been incremental was full (also logged).
    pub full_reason: Option<String>,
    /// Where the pipeline spent its time (summed over its threads), all rounds.
    pub pipeline: PipelineStats,
    /// Copying RAM while paused (stop-and-copy: all of it; live: the last round).
    pub paused_copy_ms: f64,
    /// Saving vCPU and device state.
    pub state_ms: f64,
    /// The store commit (syncs, manifest).
    pub commit_ms: f64,
    /// Background: write-protecting RAM, within the pause (with pre-protection: arming it).
    pub protect_ms: f64,
    /// Background: pre-protecting RAM and its rounds, before the pause, the guest running.
    pub pre_protect_ms: f64,
    /// Background: why RAM was not pre-protected, when it was asked for (also logged).
    pub pre_protect_note: Option<String>,
    /// Stopping the vCPUs (and NICs): the start of the pause.
    pub stop_vcpus_ms: f64,
    /// Background: what the write-fault thread did.
    pub wp: Option<WpStats>,
    /// Background: ending the write protection after the copy, the guest running (stopping
    /// the fault thread; the registration is kept for the next snapshot). Part of `total_ms`.
    pub wp_end_ms: f64,
    /// Background: the wait for a lazy restore's fill before anything else, the guest
    /// running ([`SaveOptions::fill_wait`]). Part of `total_ms`.
    pub fill_wait: Option<FillWait>,
}

/// Notes resizes while a snapshot runs.
#[derive(Default)]
struct ResizeWatch(Mutex<Option<String>>);

impl RamBlockListener for ResizeWatch {
    fn block_resized(&self, b: &RamBlock, _old: u64, _new: u64) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(|| b.idstr().to_string());
    }
}

impl ResizeWatch {
    fn check(&self) -> Result<(), SnapshotError> {
        match &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(idstr) => Err(SnapshotError::ResizedDuringSnapshot(idstr.clone())),
            None => Ok(()),
        }
    }
}

/// Resumes the VM when dropped (unless told to stay paused), so an error never leaves it
/// paused; removes the resize watch and turns dirty logging off.
struct Cleanup<'a> {
    vm: &'a Vm,
    resume: bool,
    watch: Option<migrate::ram::ListenerId>,
    dirty_log: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.dirty_log {
            if let Err(e) = self.vm.slots().set_dirty_logging(false) {
                tracing::error!("turning dirty logging off after a snapshot: {e}");
            }
        }
        if let Some(id) = self.watch.take() {
            self.vm.registry().remove_listener(id);
        }
        if self.resume {
            self.vm.resume();
        }
    }
}

/// The VM's state file: machine shape, RAM table, KVM and device state. The VM is paused.
pub fn capture_state(vm: &Vm) -> Result<VmSnapshot, SnapshotError> {
    check_all_saved(vm.devices())?;
    let mut snap = VmSnapshot { ram: describe(vm.registry()), ..Default::default() };
    snap.put("machine", vm.spec())?;
    let caps = HostVcpuCaps::query(vm.kvm(), vm.fd())?;
    for (i, fd) in vm.vcpu_fds().iter().enumerate() {
        let fd = fd.lock().unwrap_or_else(PoisonError::into_inner);
        snap.put(&format!("vcpu/{i}"), &save_vcpu(&fd, i as u8, &caps)?)?;
    }
    snap.put("kvm/vm", &save_vm(vm.fd())?)?;
    for p in persistables(vm.devices()) {
        snap.fragments.insert(p.persist_name(), Bytes(p.save_state()?));
    }
    Ok(snap)
}

/// Chunks of each block dirtied since the last call: KVM's dirty log for guest writes, the
/// block's own bitmap for writes by the VMM.
fn dirty_chunks(vm: &Vm, blocks: &[Arc<RamBlock>], chunk: u64) -> Result<Vec<Vec<u64>>, SnapshotError> {
    let mut out = Vec::with_capacity(blocks.len());
    for b in blocks {
        let mut set = BTreeSet::new();
        for (slot, placement, len) in vm.slots().slots_of(b.idstr()) {
            if len == 0 {
                continue;
            }
            let bitmap =
                vm.fd().get_dirty_log(slot, len as usize).map_err(|source| SnapshotError::DirtyLog { slot, source })?;
            for (w, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let page = (w * 64) as u64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    set.insert((placement.block_offset + page * 4096) / chunk);
                }
            }
        }
        for page in b.take_dirty() {
            set.insert(page * b.page_size() / chunk);
        }
        out.push(set.into_iter().collect());
    }
    Ok(out)
}

/// `a[i]` and `b[i]` merged, per block, sorted.
fn union(a: Vec<Vec<u64>>, b: Vec<Vec<u64>>) -> Vec<Vec<u64>> {
    a.into_iter().zip(b).map(|(a, b)| a.into_iter().chain(b).collect::<BTreeSet<u64>>().into_iter().collect()).collect()
}

/// Copies `chunks[i]` of `blocks[i]` into the writer; returns the bytes read.
fn copy_round(
    writer: &SnapshotWriter,
    blocks: &[Arc<RamBlock>],
    chunks: &[Vec<u64>],
    opts: &SaveOptions,
    stats: &mut PipelineStats,
) -> Result<u64, SnapshotError> {
    if !opts.pipeline {
        let mut bytes = 0;
        for (b, c) in blocks.iter().zip(chunks) {
            bytes += save_chunks(writer, b, c, opts.threads)?;
        }
        return Ok(bytes);
    }
    let cs = u64::from(writer.chunk_size());
    let mut jobs = Vec::new();
    for (b, c) in blocks.iter().zip(chunks) {
        let used = b.used_length();
        jobs.extend(
            c.iter()
                .map(|i| i * cs)
                .filter(|off| *off < used)
                .map(|offset| ChunkJob { block: b.idstr().to_string(), offset }),
        );
    }
    let read = |idstr: &str, offset: u64, buf: &mut [u8]| -> Result<(), String> {
        let b = blocks.iter().find(|b| b.idstr() == idstr).ok_or_else(|| format!("no RAM block '{idstr}'"))?;
        b.read(offset, buf).map_err(|e| e.to_string())
    };
    let st = storage::put_pipelined(writer, &jobs, opts.threads, &read)?;
    stats.chunks += st.chunks;
    stats.bytes_read += st.bytes_read;
    stats.read_ns += st.read_ns;
    stats.work_ns += st.work_ns;
    stats.write_ns += st.write_ns;
    stats.cpu_ns += st.cpu_ns;
    Ok(st.bytes_read)
}

/// Starts dirty tracking at this moment (the VM is paused or not yet started): KVM's dirty
/// log on every slot, and every dirty record so far consumed. From here on the VM's memory
/// differs from the snapshot it now equals only in the chunks the records will show.
pub(super) fn start_tracking(vm: &Vm, chunk: u64) -> Result<(), SnapshotError> {
    vm.slots().set_dirty_logging(true)?;
    dirty_chunks(vm, &vm.registry().blocks(), chunk)?;
    Ok(())
}

/// Why a VM that has stopped cannot be snapshotted: the failure of its lazy restore, naming
/// the chunk, when that is what stopped it (its fill met a chunk it could not read, perhaps
/// while the snapshot waited for the fill); else just that it has stopped.
fn not_running(vm: &Vm) -> SnapshotError {
    match vm.page_server().and_then(|s| s.error()) {
        Some(e) => SnapshotError::LazyFailed(e.to_string()),
        None => SnapshotError::NotRunning,
    }
}

/// Snapshots `vm` into `store` as `name`. `progress` is called after each round, once an
/// incremental snapshot has taken its parent's chunks, and at the end ([`SaveProgress`]).
pub fn save(
    vm: &Vm,
    store: &Store,
    name: &str,
    opts: &SaveOptions,
    progress: &dyn Fn(&SaveProgress),
) -> Result<SaveReport, SnapshotError> {
    let t0 = Instant::now();
    let was_running = vm.control().state() == RunState::Running;
    let cancelled = || opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Acquire));
    if vm.control().exit_reason().is_some() {
        // A VM deleted before its snapshot got here is stopped after the snapshot is
        // cancelled: say that.
        return Err(if cancelled() { SnapshotError::Cancelled } else { not_running(vm) });
    }
    let wait_ended = || cancelled() || opts.end_fill_wait.as_ref().is_some_and(EndFillWait::ended);
    let fill_wait = wait_for_fill(vm, opts.mode, opts.live, was_running, opts.stay_paused, opts.fill_wait, &wait_ended);
    if cancelled() {
        return Err(SnapshotError::Cancelled);
    }
    // Taken out for good: this snapshot consumes the dirty records, so unless it commits (and
    // becomes the new parent) the next one must be full. See lineage.rs.
    let parent = vm.lineage().take();
    let (mut mode, mut mode_reason) = resolve(vm, opts.mode, opts.live, was_running, opts.stay_paused);
    if let (Some(w), Some(r)) = (fill_wait.filter(|w| !w.resident), &mut mode_reason) {
        *r = format!("{r} (waited {:.0} ms for its fill, {} chunks left then)", w.ms, w.chunks);
    }
    if let Some(r) = &mode_reason {
        tracing::info!(snapshot = name, mode = mode.as_str(), "{r}");
    }
    let live_mode = mode == SaveMode::Live;
    let mut full_reason = match (&parent, opts.incremental, live_mode) {
        (_, false, _) => Some("incremental snapshots are switched off for this snapshot".to_string()),
        (_, _, true) => Some("a live snapshot copies all memory".to_string()),
        (None, _, _) => Some(
            "the VM has no parent snapshot (none taken or restored since it started, or the last one failed)"
                .to_string(),
        ),
        (Some(_), true, false) => None,
    };
    let parent = if full_reason.is_none() { parent } else { None };
    let watch = Arc::new(ResizeWatch::default());
    // Every cancellation point: a resize of a RAM block, or a cancel from outside.
    let check = || -> Result<(), SnapshotError> {
        watch.check()?;
        match &opts.cancel {
            Some(c) if c.load(Ordering::Acquire) => Err(SnapshotError::Cancelled),
            _ => Ok(()),
        }
    };
    let mut cleanup =
        Cleanup { vm, resume: false, watch: Some(vm.registry().add_listener(watch.clone())), dirty_log: false };
    let blocks = vm.registry().blocks();
    let chunk = u64::from(store.options().chunk_size);
    let all: Vec<Vec<u64>> = blocks.iter().map(|b| (0..b.used_length().div_ceil(chunk)).collect()).collect();
    let ram_bytes: u64 = blocks.iter().map(|b| b.used_length()).sum();
    let chunks_total: u64 = all.iter().map(|c| c.len() as u64).sum();
    let mut chunks_inherited = 0;
    let mut rounds = 0;
    let mut bytes_copied = 0;
    let mut pstats = PipelineStats::default();

    // Live: the writer and the chunks still dirty when the copying rounds stopped.
    let live = if live_mode {
        vm.slots().set_dirty_logging(true)?;
        cleanup.dirty_log = true;
        // Start both dirty records afresh: everything is copied in round 0 anyway.
        dirty_chunks(vm, &blocks, chunk)?;
        let writer = store.begin(name, block_specs(&blocks))?;
        let mut todo = all.clone();
        loop {
            bytes_copied += copy_round(&writer, &blocks, &todo, opts, &mut pstats)?;
            let copied: u64 = todo.iter().map(|c| c.len() as u64).sum();
            todo = dirty_chunks(vm, &blocks, chunk)?;
            let dirty: u64 = todo.iter().map(|c| c.len() as u64).sum();
            // Round 0 copies every chunk: later rounds copy some of them again.
            progress(&SaveProgress {
                round: rounds,
                chunks_total,
                chunks_copied: chunks_total,
                chunks_inherited: 0,
                bytes_copied,
                dirty_chunks: dirty,
            });
            rounds += 1;
            check()?;
            // Stop when few chunks remain, when out of rounds, or when a round did not shrink
            // the dirty set by a tenth: the guest dirties memory as fast as it is copied, and
            // more rounds would only copy it again.
            let converging = rounds == 1 || dirty * 10 < copied * 9;
            if dirty as usize <= opts.final_chunks || rounds >= opts.max_rounds || !converging {
                break;
            }
        }
        Some((writer, todo))
    } else {
        None
    };

    // Background: protect RAM while the guest still runs; the pause re-protects what it
    // wrote since. Dirty records so far are read now and after the rounds (kept for an
    // incremental snapshot), so the pause reads only the last ones.
    let pre_start = Instant::now();
    let mut tracking = None;
    let mut early_dirty = None;
    let mut pre_protect_note = None;
    if mode == SaveMode::Background && opts.pre_protect {
        vm.slots().set_dirty_logging(true)?;
        cleanup.dirty_log = true;
        let early = dirty_chunks(vm, &blocks, chunk)?;
        let set = if parent.is_some() { &early } else { &all };
        let rounds = (opts.max_rounds, opts.final_chunks);
        let cancelled = || check();
        match background::pre_protect(vm, &blocks, set, chunk, opts.wp_buffer_bytes, rounds, &opts.hooks, &cancelled)? {
            PreProtect::Tracking(wp) => tracking = Some(wp),
            PreProtect::Failed(e) => {
                let note = format!("pre-protection failed ({e}): RAM protected in the pause");
                tracing::warn!(snapshot = name, "{note}");
                pre_protect_note = Some(note);
            }
        }
        // Once more after the rounds, so the pause reads only what was dirtied since.
        let late = dirty_chunks(vm, &blocks, chunk)?;
        early_dirty = Some(union(early, late));
    }
    let pre_protect_time = pre_start.elapsed();

    let paused_at = Instant::now();
    if !vm.pause() {
        // Likewise for a VM deleted meanwhile.
        check()?;
        return Err(not_running(vm));
    }
    let stop_vcpus = paused_at.elapsed();
    cleanup.resume = was_running && !opts.stay_paused;
    check()?;
    let copy_start = Instant::now();
    let mut incremental = false;
    let mut background_todo = None;
    let writer = match live {
        Some((w, pending)) => {
            // What the last round left dirty, and what the guest dirtied until it paused.
            let last: Vec<Vec<u64>> = pending
                .into_iter()
                .zip(dirty_chunks(vm, &blocks, chunk)?)
                .map(|(a, b)| a.into_iter().chain(b).collect::<BTreeSet<u64>>().into_iter().collect())
                .collect();
            bytes_copied += copy_round(&w, &blocks, &last, opts, &mut pstats)?;
            w
        }
        None => {
            // Tracking restarts at this point; with a parent, what it recorded since the parent
            // is what this snapshot must copy.
            vm.slots().set_dirty_logging(true)?;
            cleanup.dirty_log = true;
            let mut dirty = dirty_chunks(vm, &blocks, chunk)?;
            if let Some(early) = early_dirty.take() {
                dirty = union(dirty, early);
            }
            let w = store.begin(name, block_specs(&blocks))?;
            let mut todo = all.clone();
            if let Some(p) = &parent {
                match w.inherit(p) {
                    Ok(taken) => {
                        for (i, b) in blocks.iter().enumerate() {
                            if taken.iter().any(|t| t == b.idstr()) {
                                todo[i] = dirty[i].clone();
                            } else {
                                tracing::info!(
                                    snapshot = name,
                                    parent = %p.name,
                                    block = b.idstr(),
                                    "block copied whole: new or resized since the parent"
                                );
                            }
                        }
                        incremental = true;
                        chunks_inherited = chunks_total - todo.iter().map(|c| c.len() as u64).sum::<u64>();
                        progress(&SaveProgress {
                            round: 0,
                            chunks_total,
                            chunks_copied: 0,
                            chunks_inherited,
                            bytes_copied,
                            dirty_chunks: 0,
                        });
                    }
                    Err(e @ StoreError::ParentChanged { .. }) => {
                        tracing::info!(snapshot = name, "full snapshot: {e}");
                        full_reason = Some(e.to_string());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if mode == SaveMode::Background {
                background_todo = Some(todo);
            } else {
                bytes_copied += copy_round(&w, &blocks, &todo, opts, &mut pstats)?;
            }
            w
        }
    };
    let paused_copy = copy_start.elapsed();
    let state_start = Instant::now();
    let state = capture_state(vm)?;
    let state_time = state_start.elapsed();
    check()?;
    let mut protect_time = Duration::ZERO;
    let mut wp_stats = None;
    let mut finish_time = Duration::ZERO;
    let mut resumed_at = None;
    if let Some(todo) = background_todo {
        let protect_start = Instant::now();
        let armed = match tracking.take() {
            Some(wp) => background::arm(wp, &todo, &opts.hooks),
            None => background::protect(vm, &blocks, &todo, chunk, opts.wp_buffer_bytes, opts.hooks.broken_protection),
        };
        match armed {
            Ok(wp) => {
                protect_time = protect_start.elapsed();
                if let Some(h) = &opts.hooks.after_protect {
                    h(vm);
                }
                // The guest runs from here; the copy and the commit go on beside it.
                if cleanup.resume {
                    vm.resume();
                    cleanup.resume = false;
                }
                resumed_at = Some(Instant::now());
                tracing::info!(snapshot = name, pause_ms = ms(paused_at.elapsed()), "background copy started");
                if opts.hooks.hold_copy {
                    let until = Instant::now() + std::time::Duration::from_secs(60);
                    while check().is_ok() && Instant::now() < until {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                if opts.hooks.copy_after_first_fault {
                    let until = Instant::now() + std::time::Duration::from_secs(10);
                    while wp.stats().faults == 0 && Instant::now() < until {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                let cancelled = || check();
                bytes_copied += background::copy(&writer, &blocks, &todo, &wp, opts.threads, &cancelled, &mut pstats)?;
                wp_stats = Some(wp.stats());
                // Every chunk was taken: nothing is protected; the VM keeps the registration.
                let finish_start = Instant::now();
                background::finish(vm, wp);
                finish_time = finish_start.elapsed();
            }
            Err(e) => {
                // Still paused: copy it all now.
                let reason = format!("write protection could not start ({e}): stop-and-copy");
                tracing::warn!(snapshot = name, "{reason}");
                mode = SaveMode::Stop;
                mode_reason = Some(reason);
                bytes_copied += copy_round(&writer, &blocks, &todo, opts, &mut pstats)?;
            }
        }
        check()?;
    }
    // A lazy restore that failed meanwhile has let go of the memory it could not serve (it
    // reads as zeros now): nothing copied from it may be committed.
    if let Some(e) = vm.page_server().and_then(|s| s.error()) {
        return Err(SnapshotError::LazyFailed(e.to_string()));
    }
    check()?;
    let stats = writer.stats();
    let commit_start = Instant::now();
    let manifest = writer.commit(state.encode()?)?;
    let commit_time = commit_start.elapsed();
    // Committed: the VM's memory equals this snapshot plus what the dirty records show from
    // the pause on. Dirty logging stays on.
    vm.lineage().set(Arc::new(manifest));
    cleanup.dirty_log = false;
    let pause = resumed_at.unwrap_or_else(Instant::now).saturating_duration_since(paused_at);
    drop(cleanup);
    tracing::info!(
        snapshot = name,
        mode = mode.as_str(),
        incremental,
        parent = parent.as_ref().filter(|_| incremental).map(|p| p.name.as_str()),
        full_reason = full_reason.as_deref().filter(|_| !incremental),
        pause_ms = ms(pause),
        paused_copy_ms = ms(paused_copy),
        state_ms = ms(state_time),
        protect_ms = ms(protect_time),
        pre_protect_ms = ms(pre_protect_time),
        stop_vcpus_ms = ms(stop_vcpus),
        commit_ms = ms(commit_time),
        wp_end_ms = ms(finish_time),
        bytes_copied,
        read_ms = pstats.read_ns as f64 / 1e6,
        work_ms = pstats.work_ns as f64 / 1e6,
        write_ms = pstats.write_ns as f64 / 1e6,
        "snapshot taken"
    );
    // Commit took every chunk: the ones not inherited were all copied.
    progress(&SaveProgress {
        round: rounds,
        chunks_total,
        chunks_copied: chunks_total - chunks_inherited,
        chunks_inherited,
        bytes_copied,
        dirty_chunks: 0,
    });
    Ok(SaveReport {
        name: name.to_string(),
        mode,
        mode_reason,
        live: live_mode,
        rounds,
        total_ms: ms(t0.elapsed()),
        pause_ms: ms(pause),
        ram_bytes,
        bytes_copied,
        store: stats,
        incremental,
        parent: if incremental { parent.map(|p| p.name.clone()) } else { None },
        full_reason: if incremental { None } else { full_reason },
        pipeline: pstats,
        paused_copy_ms: ms(paused_copy),
        state_ms: ms(state_time),
        commit_ms: ms(commit_time),
        protect_ms: ms(protect_time),
        pre_protect_ms: ms(pre_protect_time),
        pre_protect_note,
        stop_vcpus_ms: ms(stop_vcpus),
        wp: wp_stats,
        wp_end_ms: ms(finish_time),
        fill_wait,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
