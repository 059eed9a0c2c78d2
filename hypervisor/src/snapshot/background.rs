//! Background snapshots: RAM protected before the pause, and the copy that runs after the
//! guest has resumed.
//!
//! Before the pause, with the guest running, [`pre_protect`] write-protects the chunks the
//! snapshot will likely save (all of RAM for a full snapshot; for an incremental one those
//! dirtied since the parent) with the fault thread in its track phase, where a write only
//! unprotects its chunk and marks it; rounds re-protect the marked chunks while their number
//! shrinks ([`migrate::ram::wp`] has the protocol). Write-protecting is what costs: every page
//! table entry of the range is walked and KVM drops its mappings, ~0.2 µs per 4 KiB page, so
//! doing it while the guest runs leaves the pause only the chunks written in the last round.
//! [`super::save`] then pauses the VM, captures vCPU and device state, and calls [`arm`] (or,
//! without pre-protection, [`protect`]) so that exactly the chunks to save are protected,
//! with the fault thread copying before write; it resumes the guest and calls [`copy`], which
//! feeds those chunks to the store's pipeline in order, each taken through the protection (so
//! each holds the bytes of the pause). The commit follows, with the guest running.
//!
//! Repeat snapshots. A copy that took every chunk ends with [`finish`]: nothing is protected
//! any more, so instead of unprotecting and unregistering all of RAM (each a walk of every
//! page table entry and a drop of all KVM's mappings, ~40 ms per GiB) the VM keeps the
//! registration ([`Vm::keep_wp_registration`]) and the next background snapshot protects on
//! it. Incremental snapshots do not depend on it: the chunks written since a snapshot come
//! from KVM's dirty log and the blocks' bitmaps, read at its pause, as before.
//!
//! Failures. Pre-protection that fails (the fault thread, a round) is dropped, which
//! unprotects everything, and RAM is protected at the pause as without it; arming that fails
//! falls back to stop-and-copy while still paused. A resize during pre-protection cancels the
//! snapshot with the VM running. Whatever ends the copy early (a resize, a store error, a
//! fault-thread error) drops the protection too: the VM runs on and nothing is committed.

use std::sync::Arc;

use migrate::ram::wp::{WpBlock, WpError, WpTestFaults, WriteProtect};
use migrate::ram::RamBlock;
use storage::{ChunkJob, PipelineStats, SnapshotWriter};

use super::mode::{PreProtectFault, SaveHooks};
use super::SnapshotError;
use crate::vm::Vm;

fn wp_blocks(blocks: &[Arc<RamBlock>], chunks: &[Vec<u64>]) -> Vec<WpBlock> {
    blocks.iter().zip(chunks).map(|(b, c)| WpBlock { block: b.clone(), chunks: c.clone() }).collect()
}

/// How pre-protection ended: tracking RAM, or not (and why not).
pub(super) enum PreProtect {
    Tracking(WriteProtect),
    Failed(String),
}

/// Pre-protects `chunks[i]` of `blocks[i]` with the VM running, then re-protects what the
/// guest writes in rounds while their number shrinks by a tenth, down to `final_chunks`, at
/// most `max_rounds`. `cancelled` is asked after every round (a resize cancels the snapshot:
/// the only error returned; a failure of the protection itself comes back as `Failed`, with
/// nothing left protected).
#[allow(clippy::too_many_arguments)]
pub(super) fn pre_protect(
    vm: &Vm,
    blocks: &[Arc<RamBlock>],
    chunks: &[Vec<u64>],
    chunk: u64,
    buffer_bytes: u64,
    (max_rounds, final_chunks): (u32, usize),
    hooks: &SaveHooks,
    cancelled: &dyn Fn() -> Result<(), SnapshotError>,
) -> Result<PreProtect, SnapshotError> {
    let test = WpTestFaults {
        skip_copy: hooks.broken_protection,
        arm_skips_redirtied: hooks.pre_protect_fault == Some(PreProtectFault::ArmSkipsRedirtied),
        fail_on_track_fault: hooks.pre_protect_fault == Some(PreProtectFault::FaultThread),
    };
    let kept = vm.take_wp_registration();
    let wp = match WriteProtect::start_tracking_on(kept, wp_blocks(blocks, chunks), chunk, buffer_bytes, test) {
        Ok(wp) => wp,
        Err(e) => return Ok(PreProtect::Failed(e.to_string())),
    };
    cancelled()?;
    let mut last = u64::MAX;
    for round in 0..max_rounds {
        let n = match wp.retrack() {
            Ok(_) if round == 0 && hooks.pre_protect_fault == Some(PreProtectFault::Round) => {
                Err(WpError::Fault("injected failure of a re-protection round (test)".into()))
            }
            r => r,
        };
        // Dropping `wp` unprotects everything.
        let n = match n {
            Ok(n) => n,
            Err(e) => return Ok(PreProtect::Failed(e.to_string())),
        };
        cancelled()?;
        tracing::debug!(round, rechunks = n, "pre-protection round");
        if n as usize <= final_chunks || n.saturating_mul(10) >= last.saturating_mul(9) {
            break;
        }
        last = n;
    }
    if let Some(h) = &hooks.during_pre_protect {
        h(vm);
    }
    cancelled()?;
    if let Some(e) = wp.error() {
        return Ok(PreProtect::Failed(e.to_string()));
    }
    Ok(PreProtect::Tracking(wp))
}

/// With the VM paused: makes the protected chunks of a pre-protection exactly `chunks[i]` of
/// block `i` and switches it to copy before write. On an error the protection is dropped
/// (nothing stays protected).
pub(super) fn arm(wp: WriteProtect, chunks: &[Vec<u64>], hooks: &SaveHooks) -> Result<WriteProtect, SnapshotError> {
    wp.arm(chunks)?;
    if hooks.pre_protect_fault == Some(PreProtectFault::Arm) {
        return Err(WpError::Fault("injected failure at arm (test)".into()).into());
    }
    Ok(wp)
}

/// Write-protects `chunks[i]` of `blocks[i]`, on the VM's kept registration if it has one.
/// The VM is paused.
pub(super) fn protect(
    vm: &Vm,
    blocks: &[Arc<RamBlock>],
    chunks: &[Vec<u64>],
    chunk: u64,
    buffer_bytes: u64,
    broken: bool,
) -> Result<WriteProtect, SnapshotError> {
    let wp = wp_blocks(blocks, chunks);
    let kept = vm.take_wp_registration();
    let r = if broken {
        drop(kept);
        WriteProtect::start_broken_for_tests(wp, chunk, buffer_bytes)
    } else {
        WriteProtect::start_on(kept, wp, chunk, buffer_bytes, WpTestFaults::default())
    };
    Ok(r?)
}

/// After a copy that took every chunk: stops the protection and keeps its registration with
/// the VM for the next background snapshot (or, should a chunk still be protected, lifts it
/// from all of RAM and unregisters; see [`WriteProtect::finish`]).
pub(super) fn finish(vm: &Vm, wp: WriteProtect) {
    if let Some(reg) = wp.finish() {
        vm.keep_wp_registration(reg);
    }
}

/// Saves `chunks[i]` of `blocks[i]` through `wp` into the writer; returns the bytes read.
/// `cancelled` is asked after every chunk (a resize cancels the snapshot).
pub(super) fn copy(
    writer: &SnapshotWriter,
    blocks: &[Arc<RamBlock>],
    chunks: &[Vec<u64>],
    wp: &WriteProtect,
    threads: usize,
    cancelled: &(dyn Fn() -> Result<(), SnapshotError> + Sync),
    stats: &mut PipelineStats,
) -> Result<u64, SnapshotError> {
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
        let bi = blocks.iter().position(|b| b.idstr() == idstr).ok_or_else(|| format!("no RAM block '{idstr}'"))?;
        wp.take_chunk(bi, offset / cs, buf).map_err(|e| e.to_string())?;
        cancelled().map_err(|e| e.to_string())
    };
    let res = storage::put_pipelined(writer, &jobs, threads, &read);
    // A cancellation reads as a source error in the pipeline: report it as itself.
    cancelled()?;
    if let Some(e) = wp.error() {
        return Err(e.into());
    }
    let st = res?;
    stats.chunks += st.chunks;
    stats.bytes_read += st.bytes_read;
    stats.read_ns += st.read_ns;
    stats.work_ns += st.work_ns;
    stats.write_ns += st.write_ns;
    stats.cpu_ns += st.cpu_ns;
    Ok(st.bytes_read)
}
