//! Taking a snapshot: stop-and-copy, or live with KVM's dirty log.
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
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use migrate::ram::{RamBlock, RamBlockListener};
use migrate::snapshot::check::describe;
use migrate::snapshot::format::{serde_bytes_compat::Bytes, VmSnapshot};
use migrate::snapshot::ram_io::{block_specs, save_chunks};
use storage::{SnapshotWriter, Store, WriteStats};

use super::devices::{check_all_saved, persistables};
use super::vcpu_state::{save_vcpu, save_vm, HostVcpuCaps};
use super::SnapshotError;
use crate::control::RunState;
use crate::vm::Vm;

/// How to take a snapshot.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Copy RAM while the guest runs, pausing only at the end.
    pub live: bool,
    /// Live: the most rounds of re-copying dirty chunks before the final pause.
    pub max_rounds: u32,
    /// Live: pause once a round leaves this few dirty chunks.
    pub final_chunks: usize,
    /// Threads compressing chunks.
    pub threads: usize,
    /// Leave the VM paused afterwards (otherwise it resumes if it was running).
    pub stay_paused: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { live: false, max_rounds: 8, final_chunks: 64, threads: 2, stay_paused: false }
    }
}

/// Progress of a snapshot, after each round of copying.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct SaveProgress {
    pub round: u32,
    pub chunks_copied: u64,
    pub bytes_copied: u64,
    /// Chunks found dirty for the next round.
    pub dirty_chunks: u64,
}

/// What a snapshot took.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SaveReport {
    pub name: String,
    pub live: bool,
    pub rounds: u32,
    pub total_ms: f64,
    /// How long the vCPUs were paused for it.
    pub pause_ms: f64,
    pub ram_bytes: u64,
    pub bytes_copied: u64,
    pub store: WriteStats,
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

fn copy_round(
    writer: &SnapshotWriter,
    blocks: &[Arc<RamBlock>],
    chunks: &[Vec<u64>],
    threads: usize,
) -> Result<u64, SnapshotError> {
    let mut bytes = 0;
    for (b, c) in blocks.iter().zip(chunks) {
        bytes += save_chunks(writer, b, c, threads)?;
    }
    Ok(bytes)
}

/// Snapshots `vm` into `store` as `name`. `progress` is called after each round.
pub fn save(
    vm: &Vm,
    store: &Store,
    name: &str,
    opts: &SaveOptions,
    progress: &dyn Fn(&SaveProgress),
) -> Result<SaveReport, SnapshotError> {
    let t0 = Instant::now();
    let was_running = vm.control().state() == RunState::Running;
    if vm.control().exit_reason().is_some() {
        return Err(SnapshotError::NotRunning);
    }
    let watch = Arc::new(ResizeWatch::default());
    let mut cleanup =
        Cleanup { vm, resume: false, watch: Some(vm.registry().add_listener(watch.clone())), dirty_log: false };
    let blocks = vm.registry().blocks();
    let chunk = u64::from(store.options().chunk_size);
    let all: Vec<Vec<u64>> = blocks.iter().map(|b| (0..b.used_length().div_ceil(chunk)).collect()).collect();
    let ram_bytes: u64 = blocks.iter().map(|b| b.used_length()).sum();
    let mut rounds = 0;
    let mut bytes_copied = 0;

    // Live: the writer and the chunks still dirty when the copying rounds stopped.
    let live = if opts.live && was_running {
        vm.slots().set_dirty_logging(true)?;
        cleanup.dirty_log = true;
        // Start both dirty records afresh: everything is copied in round 0 anyway.
        dirty_chunks(vm, &blocks, chunk)?;
        let writer = store.begin(name, block_specs(&blocks))?;
        let mut todo = all.clone();
        loop {
            bytes_copied += copy_round(&writer, &blocks, &todo, opts.threads)?;
            let copied: u64 = todo.iter().map(|c| c.len() as u64).sum();
            todo = dirty_chunks(vm, &blocks, chunk)?;
            let dirty: u64 = todo.iter().map(|c| c.len() as u64).sum();
            progress(&SaveProgress { round: rounds, chunks_copied: copied, bytes_copied, dirty_chunks: dirty });
            rounds += 1;
            watch.check()?;
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

    let paused_at = Instant::now();
    if !vm.pause() {
        return Err(SnapshotError::NotRunning);
    }
    cleanup.resume = was_running && !opts.stay_paused;
    watch.check()?;
    let writer = match live {
        Some((w, pending)) => {
            // What the last round left dirty, and what the guest dirtied until it paused.
            let last: Vec<Vec<u64>> = pending
                .into_iter()
                .zip(dirty_chunks(vm, &blocks, chunk)?)
                .map(|(a, b)| a.into_iter().chain(b).collect::<BTreeSet<u64>>().into_iter().collect())
                .collect();
            bytes_copied += copy_round(&w, &blocks, &last, opts.threads)?;
            w
        }
        None => {
            let w = store.begin(name, block_specs(&blocks))?;
            bytes_copied += copy_round(&w, &blocks, &all, opts.threads)?;
            w
        }
    };
    let state = capture_state(vm)?;
    watch.check()?;
    // A lazy restore that failed meanwhile has let go of the memory it could not serve (it
    // reads as zeros now): nothing copied from it may be committed.
    if let Some(e) = vm.page_server().and_then(|s| s.error()) {
        return Err(SnapshotError::LazyFailed(e.to_string()));
    }
    let stats = writer.stats();
    writer.commit(state.encode()?)?;
    let pause = paused_at.elapsed();
    drop(cleanup);
    progress(&SaveProgress { round: rounds, chunks_copied: 0, bytes_copied, dirty_chunks: 0 });
    Ok(SaveReport {
        name: name.to_string(),
        live: opts.live && was_running,
        rounds,
        total_ms: ms(t0.elapsed()),
        pause_ms: ms(pause),
        ram_bytes,
        bytes_copied,
        store: stats,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
