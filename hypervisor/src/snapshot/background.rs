//! Background snapshots: the RAM copy that runs after the guest has resumed.
//!
//! [`super::save`] pauses the VM, captures vCPU and device state, and calls [`protect`] to
//! write-protect the chunks the snapshot saves ([`migrate::ram::wp`] has the protocol); it
//! then resumes the guest and calls [`copy`], which feeds those chunks to the store's pipeline
//! in order, each taken through the protection (so each holds the bytes of the pause). The
//! commit follows, with the guest running. Whatever ends the copy early (a resize, a store
//! error, a fault-thread error) drops the protection, which unprotects everything: the VM
//! runs on and nothing is committed.

use std::sync::Arc;

use migrate::ram::wp::{WpBlock, WriteProtect};
use migrate::ram::RamBlock;
use storage::{ChunkJob, PipelineStats, SnapshotWriter};

use super::SnapshotError;

/// Write-protects `chunks[i]` of `blocks[i]`. The VM is paused.
pub(super) fn protect(
    blocks: &[Arc<RamBlock>],
    chunks: &[Vec<u64>],
    chunk: u64,
    buffer_bytes: u64,
    broken: bool,
) -> Result<WriteProtect, SnapshotError> {
    let wp: Vec<WpBlock> =
        blocks.iter().zip(chunks).map(|(b, c)| WpBlock { block: b.clone(), chunks: c.clone() }).collect();
    let r = if broken {
        WriteProtect::start_broken_for_tests(wp, chunk, buffer_bytes)
    } else {
        WriteProtect::start(wp, chunk, buffer_bytes)
    };
    Ok(r?)
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
    Ok(st.bytes_read)
}
