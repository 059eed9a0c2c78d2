//! Progress of a background snapshot operation while it copies.
//!
//! The operation's `progress` has one shape from the moment the operation exists until it
//! ends: [`SaveProgress`] (`round`, `chunks_total`, `chunks_copied`, `chunks_inherited`,
//! `bytes_copied`, `dirty_chunks`, every key always present), so a client parses it one way.
//! It starts as all zeros ([`initial`]), and two sources fill it in:
//!
//! * `snapshot::save` reports after each live round, once an incremental snapshot has taken
//!   its parent's chunks, and at the end; these reports are taken as they are;
//! * a stop-and-copy or background snapshot of a big guest copies for seconds in one go, so a
//!   small thread reads the store writer's counters every [`TICK`] (`Store::writing_stats`,
//!   atomics the copy threads update anyway) and moves `chunks_copied` and `bytes_copied`
//!   forward between the reports; it never moves them back, and never counts a chunk
//!   copied again (a live round's) twice.
//!
//! When the snapshot is done, `chunks_copied + chunks_inherited == chunks_total`. The thread
//! ends when the snapshot does (the guard drops).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::ops::OpHandle;
use crate::snapshot::SaveProgress;
use crate::vm::Vm;

/// How often the counters are read.
const TICK: Duration = Duration::from_millis(50);

/// The progress of a snapshot operation before anything was copied: the shape every later
/// report has.
pub fn initial() -> serde_json::Value {
    serde_json::json!(SaveProgress::default())
}

/// The last progress shown, and the operation showing it.
struct Shown {
    op: OpHandle,
    last: Mutex<SaveProgress>,
}

impl Shown {
    /// Changes the progress and shows it (under the lock, so updates show in order).
    fn update(&self, f: impl FnOnce(&mut SaveProgress)) {
        let mut g = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut g);
        self.op.progress(serde_json::json!(*g));
    }
}

/// The progress of one snapshot; dropping it stops its thread.
pub struct SnapshotProgress {
    shown: Arc<Shown>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SnapshotProgress {
    pub fn start(vm: &Vm, store: &storage::Store, name: &str, op: OpHandle) -> SnapshotProgress {
        let chunk = u64::from(store.options().chunk_size).max(1);
        let chunks_total: u64 = vm.registry().blocks().iter().map(|b| b.used_length().div_ceil(chunk)).sum();
        let shown = Arc::new(Shown { op, last: Mutex::new(SaveProgress { chunks_total, ..Default::default() }) });
        shown.update(|_| {});
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, store, snap, ticker) = (stop.clone(), store.clone(), name.to_string(), shown.clone());
        let thread = std::thread::Builder::new()
            .name("snapshot-progress".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    if let Some(s) = store.writing_stats(&snap) {
                        ticker.update(|p| {
                            // Chunks put again (a live round's) are not new chunks.
                            let copied = s.chunks_put().min(p.chunks_total.saturating_sub(p.chunks_inherited));
                            p.chunks_copied = p.chunks_copied.max(copied);
                            p.bytes_copied = p.bytes_copied.max(s.bytes_in);
                        });
                    }
                    std::thread::park_timeout(TICK);
                }
            })
            .map_err(|e| tracing::warn!(snapshot = name, "no progress thread: {e}"))
            .ok();
        SnapshotProgress { shown, stop, thread }
    }

    /// Shows a report of `snapshot::save`; the counts the thread moved further stay.
    pub fn report(&self, p: &SaveProgress) {
        self.shown.update(|last| {
            *last = SaveProgress {
                chunks_copied: p.chunks_copied.max(last.chunks_copied),
                bytes_copied: p.bytes_copied.max(last.bytes_copied),
                ..*p
            }
        });
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
