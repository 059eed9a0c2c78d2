//! Cloning a snapshot into many VMs in one request, all or nothing.
//!
//! Every name (`<prefix><i>`) is checked before anything is restored: an invalid or taken
//! name fails the request with nothing made. The restores then run concurrently; if any
//! fails (a name taken meanwhile, the store, KVM), the clones already made are deleted again
//! and the error names the clone that failed, why, and the clones that were made and removed.
//! A daemon killed in the middle removes the clones made at its next start (pending.rs).
//!
//! Lazy clones share the snapshot's memory by default ([`CloneMemory::Shared`]): one base
//! per snapshot, mapped copy-on-write by every clone; `"memory": "private"` gives each clone
//! its own copy, as before (the benchmark's baseline). Eager clones always get their own.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::actor::VmInfo;
use super::daemon::{validate_name, Daemon};
use super::error::ApiError;
use super::ops::OpHandle;
use super::restore::RestoreAs;
use crate::snapshot::RestoreMode;

/// How lazy clones hold the snapshot's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneMemory {
    /// One copy of the snapshot's memory, decompressed once into a base every clone maps
    /// copy-on-write (snapshot/shared_base.rs).
    #[default]
    Shared,
    /// Every clone gets its own copy of every page (the page server copies each in).
    Private,
}

impl Daemon {
    /// Restores `count` clones of `snapshot` as `<prefix>0`..; all of them or none; each restored
    /// in `mode`, lazy ones with `memory` shared or private.
    pub async fn clone_snapshot(
        self: &Arc<Self>,
        snapshot: &str,
        prefix: &str,
        count: usize,
        (mode, memory): (RestoreMode, CloneMemory),
        network_overrides: Vec<Vec<crate::net::overrides::NetOverride>>,
        op: Option<&OpHandle>,
    ) -> Result<Vec<VmInfo>, ApiError> {
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
        for n in &names {
            validate_name("VM", n)?;
        }
        // Held until every clone is in `vms` or removed again: a second clone of the same
        // prefix (or a create or restore of one of the names) fails here, not both requests.
        let _names = self.claim_names(&names).map_err(|t| {
            let taken = t.name();
            t.api_error(format!("clone '{taken}' of snapshot '{snapshot}': {}; nothing was cloned", t.message()))
        })?;
        self.check_clone_macs(&names, &network_overrides)?;
        super::net_api::check_clone_taps(&names, &network_overrides)?;
        // Until this request ends, a daemon killed in it removes its clones at the next start.
        let _record = {
            let (dir, names) = (self.state_dir().to_path_buf(), names.clone());
            tokio::task::spawn_blocking(move || super::pending::PendingClone::record(&dir, &names))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??
        };
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        let mut overrides = network_overrides.into_iter();
        for vm in &names {
            let (d, snap, vm, done, op) = (self.clone(), snapshot.to_string(), vm.clone(), done.clone(), op.cloned());
            let net = overrides.next().unwrap_or_default();
            tasks.push(tokio::spawn(async move {
                // A clone is a new identity: it gets a new VMGenID generation (firmware VMs) and
                // new MACs (unless its overrides give them).
                let how =
                    RestoreAs { mode, clone: true, share_memory: memory == CloneMemory::Shared, net_overrides: net };
                let r = d.restore_claimed(&snap, &vm, how).await;
                let n = done.fetch_add(1, Relaxed) + 1;
                if let Some(op) = &op {
                    op.progress(progress(n, count));
                }
                r
            }));
        }
        let mut made = Vec::new();
        let mut failed: Option<(String, ApiError)> = None;
        for (name, t) in names.iter().zip(tasks) {
            match t.await.map_err(|e| ApiError::Internal(e.to_string())).and_then(|r| r) {
                Ok(info) => made.push(info),
                Err(e) => {
                    if failed.is_none() {
                        failed = Some((name.clone(), e));
                    }
                }
            }
        }
        let Some((name, e)) = failed else { return Ok(made) };
        let mut removed = Vec::new();
        for info in &made {
            if self.delete(&info.def.name).await.is_ok() {
                removed.push(info.def.name.clone());
            }
        }
        let msg = format!(
            "clone '{name}' of snapshot '{snapshot}' failed: {e}; {} made and removed again{}",
            match removed.len() {
                1 => "1 clone was".to_string(),
                n => format!("{n} clones were"),
            },
            if removed.is_empty() { String::new() } else { format!(" ({})", removed.join(", ")) }
        );
        tracing::warn!("{msg}");
        Err(match e {
            ApiError::BadRequest(_) => ApiError::BadRequest(msg),
            ApiError::NotFound(_) => ApiError::NotFound(msg),
            ApiError::Conflict(_) | ApiError::OverBudget(_) => ApiError::Conflict(msg),
            ApiError::TooLarge(_) => ApiError::TooLarge(msg),
            ApiError::Busy(_) => ApiError::Busy(msg),
            ApiError::Timeout(_) => ApiError::Timeout(msg),
            ApiError::StoreFull(_) => ApiError::StoreFull(msg),
            ApiError::Internal(_) | ApiError::SlowClient(_) => ApiError::Internal(msg),
        })
    }
}

/// A clone operation's progress: clones restored so far (made or failed) of how many.
fn progress(restored: usize, of: impl serde::Serialize) -> serde_json::Value {
    serde_json::json!({ "restored": restored, "of": of })
}

/// A clone operation's progress before any clone is restored (the shape every later report has).
pub fn initial_progress(count: impl serde::Serialize) -> serde_json::Value {
    progress(0, count)
}
