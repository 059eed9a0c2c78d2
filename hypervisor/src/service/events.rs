//! Events for `GET /events`: one JSON object per thing that happened to a VM,
//! `{"vm": NAME, "event": WHAT, "detail": {...}, "unix_ms": N}`.
//!
//! API handlers send what a request did (`created`, `start`, `stop`, `snapshot`, `restored`,
//! `deleted`, ...); VM actors send what happened on its own: `guest_exit` (the guest wrote an
//! exit status or powered off), `crashed` (triple fault, reset, an instruction KVM could not
//! run; detail is the exit reason), `lazy_restore_failed` (the store could not give a lazily
//! restored VM its memory; the VM is stopped), `timeout`, `stopped` (the VMM stopped it, e.g. a
//! halt with no way to wake) and `failed` (the daemon's handling of a request panicked).
//! Delivery is best effort: a subscriber that falls more than 1024 events behind gets a
//! `lagged` line with the number lost.

use serde_json::Value;
use tokio::sync::broadcast;

/// Events waiting for a slow subscriber before it starts losing them.
const BACKLOG: usize = 1024;

/// The daemon's event channel; cheap to clone.
#[derive(Clone)]
pub struct Events(broadcast::Sender<Value>);

impl Default for Events {
    fn default() -> Self {
        Events(broadcast::channel(BACKLOG).0)
    }
}

impl Events {
    /// Tells subscribers that `what` happened to VM `vm` (no subscribers: nothing).
    pub fn emit(&self, vm: &str, what: &str, detail: Value) {
        let unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let _ = self.0.send(serde_json::json!({ "vm": vm, "event": what, "detail": detail, "unix_ms": unix_ms }));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.0.subscribe()
    }
}
