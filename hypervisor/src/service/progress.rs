//! Progress of a background snapshot operation while it copies.
//!
//! `snapshot::save` reports progress only between rounds (live) and at the end; a stop-and-copy
//! or background snapshot of a big guest copies for seconds in one go. So while a snapshot
//! runs as an operation, a small thread reads the store writer's counters every
//! [`TICK`] (`Store::writing_stats`, atomics the copy threads update anyway) and shows them on
//! the operation: `chunks_copied` (chunks put so far: zero, deduplicated and new ones, never
//! those an incremental snapshot takes from its parent), `chunks_total` (chunks of all RAM
//! blocks) and `bytes_copied`. The thread ends when the snapshot does (the guard drops).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::ops::OpHandle;
use crate::vm::Vm;

/// How often the counters are read.
const TICK: Duration = Duration::from_millis(50);

/// The progress thread of one snapshot; dropping it stops the thread.
pub struct SnapshotProgress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SnapshotProgress {
    pub fn start(vm: &Vm, store: &storage::Store, name: &str, op: OpHandle) -> SnapshotProgress {
        let chunk = u64::from(store.options().chunk_size).max(1);
        let chunks_total: u64 = vm.registry().blocks().iter().map(|b| b.used_length().div_ceil(chunk)).sum();
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, store, snap) = (stop.clone(), store.clone(), name.to_string());
        let thread = std::thread::Builder::new()
            .name("snapshot-progress".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    if let Some(s) = store.writing_stats(&snap) {
                        op.progress(serde_json::json!({
                            "chunks_copied": s.chunks_put(),
                            "chunks_total": chunks_total,
                            "bytes_copied": s.bytes_in,
                        }));
                    }
                    std::thread::park_timeout(TICK);
                }
            })
            .map_err(|e| tracing::warn!(snapshot = name, "no progress thread: {e}"))
            .ok();
        SnapshotProgress { stop, thread }
    }
}

impl Drop for SnapshotProgress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
