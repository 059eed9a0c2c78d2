//! Restoring a snapshot as a new VM of the daemon: the memory is reserved and the NICs'
//! MACs claimed before anything is mapped, the restore itself runs on a blocking thread, and
//! the VM gets an actor and a definition only once it runs. A failure at any step gives back
//! what the steps before it took.

use std::sync::Arc;
use std::time::Instant;

use super::actor::VmInfo;
use super::daemon::{validate_name, Daemon, Logs};
use super::error::ApiError;
use super::mac_claims::MacClaim;
use super::vm_def::VmDef;
use crate::snapshot::{self, RestoreMode, RestoreOptions};

/// How a snapshot becomes a new VM, beyond the snapshot's and the VM's names.
#[derive(Debug, Default)]
pub struct RestoreAs {
    pub mode: RestoreMode,
    /// A clone: a new VMGenID generation, and new MACs for its NICs unless an override sets one.
    pub clone: bool,
    /// Lazy clones: the snapshot's memory is mapped from a base shared with its other clones.
    pub share_memory: bool,
    /// NICs moved to other taps and/or MACs (`crate::net::overrides`).
    pub net_overrides: Vec<crate::net::overrides::NetOverride>,
}

impl Daemon {
    /// Restores `snapshot_name` as a new running VM `name`.
    pub async fn restore_as(
        self: &Arc<Self>,
        snapshot_name: &str,
        name: &str,
        how: RestoreAs,
    ) -> Result<VmInfo, ApiError> {
        validate_name("VM", name)?;
        let _name = self.claim_names(&[name.to_string()]).map_err(|t| t.api_error(t.message()))?;
        self.restore_claimed(snapshot_name, name, how).await
    }

    /// [`Self::restore_as`] of a VM whose name the caller has claimed ([`Self::claim_names`]).
    pub(super) async fn restore_claimed(
        self: &Arc<Self>,
        snapshot_name: &str,
        name: &str,
        how: RestoreAs,
    ) -> Result<VmInfo, ApiError> {
        let RestoreAs { mode, clone, share_memory, net_overrides } = how;
        validate_name("VM", name)?;
        validate_name("snapshot", snapshot_name)?;
        // The memory is held from here; a failure below gives it back when `held` drops.
        let t_req = Instant::now();
        let (held, saved_nics) = super::limits::reserve_for_restore(self, snapshot_name, name).await?;
        // The NICs as they will be (overrides applied, checked as untrusted), then their MACs
        // claimed (a clone's picked now): a MAC a running VM holds refuses the restore here,
        // before a tap is opened or memory mapped. The restore builds exactly these NICs.
        let nics = snapshot::restore::restore_nics(snapshot_name, &saved_nics, None, &net_overrides, clone)
            .map_err(|e| ApiError::from_snapshot(&e))?;
        let claim = self.claim_macs(name, &nics.iter().map(|n| n.mac).collect::<Vec<_>>())?;
        let nics = claimed_nics(&nics, &claim);
        let t0 = Instant::now();
        let this = self.clone();
        let (snap, vm_name) = (snapshot_name.to_string(), name.to_string());
        let pin_holder = format!("VM '{name}'");
        let (vm, logs, spec, t_blocking) = tokio::task::spawn_blocking(move || {
            let t_blocking = t0.elapsed();
            let logs = Logs::new();
            let opts = RestoreOptions {
                new_generation: clone,
                net: Some(nics),
                shared_base: share_memory.then(snapshot::shared_base::shared_bases),
                ..logs.restore_options(mode, pin_holder)
            };
            let (mut vm, _) = snapshot::restore(&this.store, &snap, opts).map_err(|e| ApiError::from_snapshot(&e))?;
            vm.start().map_err(|e| ApiError::Internal(e.to_string()))?;
            let spec = vm.spec().clone();
            Ok::<_, ApiError>((vm, logs, spec, t_blocking))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        let t_restored = t0.elapsed();
        self.metrics.restore_done(t_restored);
        let def = VmDef::restored(&vm_name, snapshot_name, &spec);
        // The definition is on disk before the VM can be found: a delete that finds it also
        // finds its definition to remove (saved after the insert, a definition could land
        // after a delete had removed it, and the deleted VM came back at the next start).
        self.save_def(def.clone()).await?;
        let t_saved = t0.elapsed();
        {
            let mut vms = self.lock();
            if vms.contains_key(&vm_name) {
                // Not reached: the name is claimed (names.rs), so nothing else made it.
                return Err(ApiError::Conflict(format!("a VM named '{vm_name}' already exists")));
            }
            held.keep();
            let h = self.spawn_actor(def.clone(), Some((vm, logs, claim)), None);
            vms.insert(vm_name.clone(), h);
        }
        // Where a request's time goes, per VM (the fleet profile; the restore's own phases are
        // logged by snapshot::restore).
        tracing::debug!(
            target: "snapvisor::restore",
            vm = %vm_name,
            reserve_ms = (t0 - t_req).as_secs_f64() * 1e3,
            queued_ms = t_blocking.as_secs_f64() * 1e3,
            restore_start_ms = (t_restored - t_blocking).as_secs_f64() * 1e3,
            save_def_ms = (t_saved - t_restored).as_secs_f64() * 1e3,
            actor_ms = (t0.elapsed() - t_saved).as_secs_f64() * 1e3,
            "restore request phases"
        );
        self.event(&vm_name, "restored", serde_json::json!({ "snapshot": snapshot_name, "mode": mode }));
        self.info(&vm_name).await
    }
}

/// `nics` with the MACs of `claim` (one per NIC, in order).
pub(super) fn claimed_nics(nics: &[crate::net::NetSpec], claim: &MacClaim) -> Vec<crate::net::NetSpec> {
    nics.iter().zip(claim.macs()).map(|(n, m)| crate::net::NetSpec { mac: Some(*m), ..n.clone() }).collect()
}
