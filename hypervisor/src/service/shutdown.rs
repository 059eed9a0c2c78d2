//! Stopping the daemon: every VM at once, within one deadline.
//!
//! On SIGTERM each VM gets its own task. With `--on-shutdown snapshot` a running or paused VM
//! is snapshotted (stop-and-copy) under a fresh name in the daemon's reserved namespace
//! (`__shutdown-<unix ms>-<n>-<vm>`: the API refuses user snapshot names starting with `__`,
//! so no user snapshot is ever overwritten, and the name fits the store's 64 characters for
//! any VM name). The VM's definition names the snapshot before it is taken (`resume_from`,
//! and `resume_paused` for a paused VM, which then comes back paused), so a daemon killed at
//! any moment leaves a definition naming either a committed snapshot, which the next start
//! resumes from, or one that never committed, and the VM comes back stopped (a snapshot that
//! fails names none again). Only once the new snapshot is committed is the previous shutdown
//! snapshot of that VM deleted. A resumed VM deletes the snapshot it came from as soon as all
//! its memory is resident (or it ends). Shutdown snapshots no definition names (left by a
//! crash) are deleted when the daemon starts, except one that may be the snapshot of a VM
//! whose definition is damaged (defs.rs): repairing the definition resumes the VM from it.
//!
//! Then every actor is ended (which stops its VM). Whatever is not done by the deadline is
//! left behind: the daemon exits anyway, and a snapshot cut short was never committed.
//!
//! A client waiting for a snapshot learns the truth: its connection stays open past the
//! usual grace while the snapshot runs ([`OwedAnswer`], [`Daemon::answers_given`]), until the
//! snapshot is done or the deadline, so a snapshot committed during the shutdown is answered
//! with success. One whose client is gone by the time it commits (the deadline cut the
//! connection, or the request timed out) is deleted again by its VM's actor: a client that
//! was told "failed" never finds the snapshot afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::actor::{Cmd, Reply, VmState};
use super::daemon::Daemon;
use super::error::ApiError;
use super::vm_def::VmDef;

/// The namespace of snapshots the daemon takes for itself.
pub const RESERVED_PREFIX: &str = "__";
const SHUTDOWN_PREFIX: &str = "__shutdown-";

/// Refuses user snapshot names in the daemon's reserved namespace.
pub fn check_user_snapshot_name(name: &str) -> Result<(), ApiError> {
    if name.starts_with(RESERVED_PREFIX) {
        return Err(ApiError::BadRequest(format!(
            "snapshot name {name:?}: names starting with {RESERVED_PREFIX:?} are reserved for the daemon"
        )));
    }
    Ok(())
}

/// A fresh shutdown snapshot name for VM `vm`: unique in this store, at most 64 characters.
fn shutdown_name(vm: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut name = format!("{SHUTDOWN_PREFIX}{unix_ms}-{n}-{vm}");
    // VM names are ASCII: cutting at a byte count is cutting at a character.
    name.truncate(64);
    name
}

/// Whether shutdown snapshot `snap` may be VM `vm`'s: [`shutdown_name`] ends in the VM's
/// name, cut short to fit 64 characters.
fn may_be_of(snap: &str, vm: &str) -> bool {
    let Some(rest) = snap.strip_prefix(SHUTDOWN_PREFIX) else { return false };
    let mut parts = rest.splitn(3, '-');
    let (Some(_unix_ms), Some(_n), Some(named)) = (parts.next(), parts.next(), parts.next()) else { return false };
    named == vm || (snap.len() == 64 && vm.starts_with(named))
}

/// Deletes shutdown snapshots nothing will resume from (`keep` are in use). One that may be
/// the snapshot of a VM in `damaged` (its definition unreadable, defs.rs) is kept: it may be
/// all that is left of that guest, and a repaired definition resumes from it; it is swept at
/// a start that finds no damaged definition it may belong to.
pub fn sweep_shutdown_snapshots(store: &storage::Store, keep: &[String], damaged: &[String]) {
    let names = match store.list() {
        Ok(n) => n,
        Err(e) => return tracing::warn!("listing snapshots to sweep old shutdown snapshots: {e}"),
    };
    for name in names.iter().filter(|n| n.starts_with(SHUTDOWN_PREFIX) && !keep.contains(n)) {
        if let Some(vm) = damaged.iter().find(|vm| may_be_of(name, vm)) {
            tracing::warn!(
                snapshot = %name,
                vm = %vm,
                "kept a shutdown snapshot no loaded VM resumes from: it may be that of VM '{vm}', whose \
                 definition is damaged"
            );
            continue;
        }
        match store.delete(name) {
            Ok(()) => tracing::info!(snapshot = %name, "deleted a shutdown snapshot no VM resumes from"),
            Err(e) => tracing::warn!(snapshot = %name, "deleting an old shutdown snapshot: {e}"),
        }
    }
}

/// A request whose answer a client is owed; the count drops when the answer is given (or
/// the request is dropped).
pub struct OwedAnswer {
    owed: tokio::sync::watch::Sender<usize>,
}

impl Drop for OwedAnswer {
    fn drop(&mut self) {
        self.owed.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Daemon {
    /// Marks a request whose answer the client must get even while the daemon stops.
    pub fn owe_answer(&self) -> OwedAnswer {
        self.owed.send_modify(|n| *n += 1);
        OwedAnswer { owed: self.owed.clone() }
    }

    /// Resolves once every owed answer is given, or at `deadline`.
    pub async fn answers_given(&self, deadline: Instant) {
        let mut rx = self.owed.subscribe();
        let _ = tokio::time::timeout_at(deadline.into(), rx.wait_for(|n| *n == 0)).await;
    }

    /// Stops every VM, snapshotting running and paused ones first when `snapshot` is set, and
    /// returns by `deadline` whatever is still going on.
    pub async fn shutdown(self: &Arc<Self>, snapshot: bool, deadline: Instant) {
        // No request makes a VM from here on; those making one finish first (names.rs), so
        // their VMs are snapshotted and stopped with the rest.
        self.stopping.send_replace(true);
        // From here a snapshot waiting for a lazy fill (up to a minute) copies at once: the
        // VM's shutdown snapshot queues behind it (actor.rs).
        self.wait_for_claims(deadline).await;
        let names: Vec<String> = self.lock().keys().cloned().collect();
        let mut tasks = tokio::task::JoinSet::new();
        for name in names {
            let d = self.clone();
            tasks.spawn(async move { d.shut_down_vm(&name, snapshot, deadline).await });
        }
        let all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline.into(), all).await.is_err() {
            tracing::warn!("{} VMs had not stopped by the shutdown deadline; exiting anyway", tasks.len());
            tasks.abort_all();
        }
    }

    async fn shut_down_vm(self: &Arc<Self>, name: &str, snapshot: bool, deadline: Instant) {
        if snapshot {
            self.shutdown_snapshot(name, deadline).await;
        }
        let Some(h) = self.lock().remove(name) else { return };
        drop(h.tx);
        while !h.thread.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if h.thread.is_finished() {
            let _ = h.thread.join();
        }
    }
}

impl Daemon {
    /// Snapshots VM `name` for the restart if it runs or is paused. Its definition names the
    /// snapshot *before* it is taken, so a daemon killed at any moment leaves either a
    /// definition naming a committed snapshot (the VM resumes from it) or one naming a
    /// snapshot that never committed (the VM comes back stopped, [`Daemon::open`]); saving
    /// the definition after the commit lost a committed snapshot to a kill in between.
    async fn shutdown_snapshot(self: &Arc<Self>, name: &str, deadline: Instant) {
        let Some(info) = self.lock().get(name).map(|h| h.published.borrow().info.clone()) else { return };
        let was_paused = match info.state {
            VmState::Running => false,
            VmState::Paused => true,
            _ => return,
        };
        let snap = shutdown_name(name);
        let planned = VmDef { resume_from: Some(snap.clone()), resume_paused: was_paused, ..info.def.clone() };
        if let Err(e) = self.save_def(planned).await {
            tracing::error!(vm = name, "no shutdown snapshot: its definition cannot name one: {e}");
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.call_within(name, Cmd::ShutdownSnapshot { name: snap.clone() }, left).await {
            Ok(Reply::ShutdownSnapshot { taken: true, paused, def }) => {
                if paused != was_paused {
                    // Paused or resumed meanwhile (a request already under way).
                    let def = VmDef { resume_from: Some(snap.clone()), resume_paused: paused, ..*def };
                    if let Err(e) = self.save_def(def).await {
                        tracing::warn!(vm = name, "it resumes {}paused: {e}", if was_paused { "" } else { "un" });
                    }
                }
                tracing::info!(vm = name, snapshot = %snap, paused, "resumes from it at the next start");
            }
            other => {
                match other {
                    Err(e) => tracing::error!(vm = name, "snapshot at shutdown failed: {e}"),
                    _ => tracing::info!(vm = name, "not running at its shutdown snapshot: none taken"),
                }
                // Nothing committed, or committed after the deadline gave up on it: the
                // definition names none again (such a late snapshot is swept at the next
                // start, as one no definition names).
                if let Err(e) = self.save_def(VmDef { resume_from: None, resume_paused: false, ..info.def }).await {
                    tracing::warn!(vm = name, "its definition still names shutdown snapshot {snap}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::daemon::test_daemon;

    /// A definition found damaged at start may name a shutdown snapshot: all that is left of
    /// its guest's state (a definition cut short by a power loss while the shutdown wrote it,
    /// a hand edit with a typo). The start keeps that snapshot, so repairing the definition
    /// as the error says brings the VM back; shutdown snapshots no definition can name still
    /// go. A long VM name is cut short in its snapshot's name (`shutdown_name`).
    #[tokio::test]
    async fn a_damaged_definitions_shutdown_snapshot_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let long = "l".repeat(64);
        let (ours, long_ours, stray) = (
            "__shutdown-1700000000000-0-bad".to_string(),
            format!("__shutdown-1700000000000-1-{long}")[..64].to_string(),
            "__shutdown-1700000000000-2-gone".to_string(),
        );
        {
            let store =
                storage::Store::open_with(dir.path().join("store"), storage::StoreOptions::default()).expect("store");
            for n in [&ours, &long_ours, &stray] {
                store.begin(n, Vec::new()).expect("begin").commit(Vec::new()).expect("commit");
            }
        }
        let vms = dir.path().join("vms");
        std::fs::create_dir_all(&vms).expect("vms");
        for (vm, snap) in [("bad", &ours), (long.as_str(), &long_ours)] {
            let cut = format!(
                "{{\"name\": \"{vm}\", \"guest\": \"idle\", \"mem_mib\": 32, \"resume_from\": \"{snap}\", \"res"
            );
            std::fs::write(vms.join(format!("{vm}.json")), cut).expect("a damaged definition");
        }
        let d = test_daemon(dir.path());
        assert_eq!(d.damaged().len(), 2);
        let names = d.store.list().expect("list");
        assert!(names.contains(&ours), "the damaged definition's shutdown snapshot was swept: {names:?}");
        assert!(names.contains(&long_ours), "the long-named damaged definition's snapshot was swept: {names:?}");
        assert!(!names.contains(&stray), "a shutdown snapshot no definition names was kept: {names:?}");
    }
}
