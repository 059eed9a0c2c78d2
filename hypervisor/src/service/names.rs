//! Names of VMs being made: a request that makes VMs (create, restore, clone) claims their
//! names before it builds anything, and a second request for a name that is claimed or taken
//! fails at once with 409. Without it two requests for one name both built a VM and the later
//! one failed only when it tried to insert it; two clones of one prefix each took some of the
//! names and both failed, rolling back everything they made.
//!
//! Lock order: `Daemon::vms` before `Daemon::making`; neither is held across blocking work.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};

use super::daemon::Daemon;

/// Names claimed by one request; released when it drops (by then the VMs are in `vms`, or
/// were never made).
pub(super) struct NameClaim {
    daemon: Arc<Daemon>,
    names: Vec<String>,
}

/// Why a claim failed: the first name already used, and how.
pub(super) enum NameTaken {
    /// A VM of that name exists.
    Exists(String),
    /// Another request is making a VM of that name.
    Making(String),
}

impl NameTaken {
    /// What a client is told.
    pub(super) fn message(&self) -> String {
        match self {
            NameTaken::Exists(n) => format!("a VM named '{n}' already exists"),
            NameTaken::Making(n) => format!("a VM named '{n}' is being made by another request"),
        }
    }

    pub(super) fn name(&self) -> &str {
        match self {
            NameTaken::Exists(n) | NameTaken::Making(n) => n,
        }
    }
}

impl Daemon {
    /// Claims `names` for one request, all or none: none may name a VM or a claim of another
    /// request.
    pub(super) fn claim_names(self: &Arc<Self>, names: &[String]) -> Result<NameClaim, NameTaken> {
        let vms = self.lock();
        let mut making = self.making();
        for n in names {
            if vms.contains_key(n) {
                return Err(NameTaken::Exists(n.clone()));
            }
            if making.contains(n) {
                return Err(NameTaken::Making(n.clone()));
            }
        }
        making.extend(names.iter().cloned());
        Ok(NameClaim { daemon: self.clone(), names: names.to_vec() })
    }

    fn making(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.making.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for NameClaim {
    fn drop(&mut self) {
        let mut making = self.daemon.making();
        for n in &self.names {
            making.remove(n);
        }
    }
}
