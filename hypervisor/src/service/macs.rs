//! MACs of the daemon's VMs: kept in their definitions, claimed while they run, never twice.
//!
//! A NIC defined without a MAC gets one when the VM is defined (`POST /vms`), and the MAC is
//! written into the stored definition (`STATE_DIR/vms/NAME.json`, the `net[i].mac` field), so
//! the VM keeps its address across stop/start and daemon restarts, as a PC keeps its NIC's.
//! Definitions written before MACs were kept (no `mac`) still load: the daemon gives their
//! NICs a MAC at load (the one a VM resumed from its shutdown snapshot has, or a new one) and
//! saves it.
//!
//! No two running (or paused) VMs of one daemon ever have one MAC: every way a VM comes to
//! run (start, restore, clone, the daemon resuming a VM at its start) first claims all its
//! MACs in the daemon-wide registry ([`super::mac_claims`]), atomically, and the VM gives the
//! claim back when it stops, ends or is deleted, or when its start fails. A MAC another VM
//! holds is a 409 naming the MAC, the NIC (`net[i]`) and the VM that holds it, and nothing of
//! the refused VM is made (no VM record, no tap, no memory).
//!
//! A defined but stopped VM's MAC is **not reserved**: only frames on the wire can collide,
//! and a stopped VM sends none. So `POST /vms` with a stopped VM's MAC is allowed (and so is
//! a clone or restore override with it); whichever of the two starts second gets the 409.
//! Reserving it instead would let a VM that is never started again block its MAC for good,
//! and would make a plain restore of a stopped VM's snapshot (which keeps the snapshot's MAC)
//! fail for no frame ever sent. What the daemon *picks* (a NIC defined without a MAC, a clone
//! without a MAC override) is stricter: never a MAC a VM holds, nor one any definition has
//! ([`crate::net::mac::pick_free`] and [`super::mac_claims::MacClaims::claim`]), so picking
//! never creates a conflict that would show at a later start.
//!
//! One clone request giving one MAC to two clones is refused up front (400, naming both
//! clones), and so is one `new_tap` given to two clones, before anything is restored.

use std::collections::HashSet;

use super::daemon::Daemon;
use super::error::ApiError;
use super::mac_claims::{MacClaim, MacError};
use super::vm_def::VmDef;
use crate::net::overrides::NetOverride;
use crate::net::{mac, Mac};

impl From<MacError> for ApiError {
    fn from(e: MacError) -> ApiError {
        match e {
            MacError::Taken { .. } => ApiError::Conflict(e.to_string()),
            MacError::Twice { .. } => ApiError::BadRequest(e.to_string()),
        }
    }
}

impl Daemon {
    /// Every MAC a VM of the daemon has or is defined with, and the VM.
    fn defined_macs(&self) -> Vec<(Mac, String)> {
        let mut all = Vec::new();
        for (name, h) in self.lock().iter() {
            let p = h.published.borrow();
            let info = &p.info;
            for m in info.def.net.iter().filter_map(|n| n.mac).chain(info.macs.iter().copied()) {
                all.push((m, name.clone()));
            }
        }
        all
    }

    /// Claims MAC `macs[i]` for NIC i of VM `vm` (a `None` gets a MAC picked now, one no VM
    /// holds and no definition has), all or none: 409 naming the holder of a taken one.
    pub(super) fn claim_macs(&self, vm: &str, macs: &[Option<Mac>]) -> Result<MacClaim, ApiError> {
        let avoid: HashSet<Mac> = if macs.iter().any(Option::is_none) {
            self.defined_macs().into_iter().map(|(m, _)| m).collect()
        } else {
            HashSet::new()
        };
        let claim = self.macs.claim(vm, macs, &avoid)?;
        Ok(claim)
    }

    /// Gives every NIC of `def` without a MAC one that no VM of the daemon has (nor another
    /// NIC of `def`); `keep` offers MACs to keep instead, by NIC index (a resumed VM's).
    pub(super) fn assign_macs(&self, def: &mut VmDef, keep: &[Option<Mac>]) {
        if def.net.iter().all(|n| n.mac.is_some()) {
            return;
        }
        let mut taken: Vec<Mac> = self.defined_macs().into_iter().map(|(m, _)| m).collect();
        taken.extend(self.macs.claimed());
        taken.extend(def.net.iter().filter_map(|n| n.mac));
        for (i, nic) in def.net.iter_mut().enumerate() {
            if nic.mac.is_none() {
                let m = keep.get(i).copied().flatten().unwrap_or_else(|| mac::pick_free(|m| taken.contains(&m)));
                tracing::info!(vm = %def.name, nic = i, mac = %m, "MAC assigned and kept in the definition");
                taken.push(m);
                nic.mac = Some(m);
            }
        }
    }

    /// Refuses one clone's override MACs that a running VM holds (409), early: a quick answer
    /// before anything is restored (the claim at each clone's restore is what decides).
    /// `clone` is the clone's index in the request, whose `network_overrides` is a list per
    /// clone: the error names the field as the client wrote it.
    fn check_override_macs(&self, vm: &str, clone: usize, overrides: &[NetOverride]) -> Result<(), ApiError> {
        for (k, o) in overrides.iter().enumerate() {
            let Some(m) = o.mac else { continue };
            if let Some((holder, nic)) = self.macs.holder(m) {
                return Err(ApiError::Conflict(format!(
                    "VM '{vm}': network_overrides[{clone}][{k}].mac {m} is the MAC of running VM '{holder}' (its net[{nic}]); give another"
                )));
            }
        }
        Ok(())
    }

    /// A clone request's MACs, before anything is restored: one MAC given to two clones is a
    /// bad request naming both; a running VM's MAC a conflict naming it.
    pub(super) fn check_clone_macs(&self, names: &[String], overrides: &[Vec<NetOverride>]) -> Result<(), ApiError> {
        let mut given: Vec<(Mac, usize, usize)> = Vec::new();
        for (c, list) in overrides.iter().enumerate() {
            for (k, o) in list.iter().enumerate() {
                let Some(m) = o.mac else { continue };
                if let Some(&(_, c0, k0)) = given.iter().find(|(g, _, _)| *g == m) {
                    let name = |i: usize| names.get(i).map_or("?", String::as_str);
                    let (a, b) = (name(c0), name(c));
                    let whom =
                        if c0 == c { format!("two NICs of clone '{a}'") } else { format!("clones '{a}' and '{b}'") };
                    return Err(ApiError::BadRequest(format!(
                        "MAC {m} is given to {whom} (network_overrides[{c0}][{k0}].mac and \
                         network_overrides[{c}][{k}].mac); each NIC needs its own; nothing was cloned"
                    )));
                }
                given.push((m, c, k));
            }
        }
        for (c, list) in overrides.iter().enumerate() {
            self.check_override_macs(names.get(c).map_or("?", String::as_str), c, list)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::net_api::ApiNic;

    fn nic(tap: &str, mac: Option<Mac>) -> ApiNic {
        ApiNic { tap: tap.into(), mac, romfile: None, romsize: None }
    }

    fn daemon(dir: &std::path::Path) -> std::sync::Arc<Daemon> {
        let images = super::super::images::ImageDir::open(&dir.join("images"), 1 << 20).expect("images");
        Daemon::open(
            &dir.join("state"),
            super::super::daemon::DaemonConfig {
                images,
                max_guest_mib: 1024,
                store: Default::default(),
                hold_snapshot_copy: false,
            },
        )
        .expect("daemon")
    }

    #[test]
    fn missing_macs_are_assigned_and_given_ones_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let given = Mac([0x52, 0x54, 0, 1, 2, 3]);
        let kept = Mac([0x52, 0x54, 0, 9, 9, 9]);
        let mut def: VmDef =
            serde_json::from_value(serde_json::json!({"name": "v", "guest": "idle", "mem_mib": 16})).expect("def");
        def.net = vec![nic("a", None), nic("b", Some(given)), nic("c", None), nic("d", None)];
        d.assign_macs(&mut def, &[None, None, Some(kept)]);
        let macs: Vec<Mac> = def.net.iter().map(|n| n.mac.expect("assigned")).collect();
        assert_eq!(macs[1], given);
        assert_eq!(macs[2], kept, "an offered MAC is kept");
        for m in [macs[0], macs[3]] {
            assert_eq!(m.0[..3], mac::PREFIX);
            assert!(m != given && m != kept);
        }
        assert_ne!(macs[0], macs[3]);
    }

    #[test]
    fn one_mac_for_two_clones_is_refused_naming_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let names: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
        let o = |mac: &str| -> Vec<NetOverride> {
            serde_json::from_value(serde_json::json!([{"nic": 0, "mac": mac}])).expect("override")
        };
        let ok = [o("52:54:00:00:00:01"), o("52:54:00:00:00:02"), o("52:54:00:00:00:03")];
        d.check_clone_macs(&names, &ok).expect("distinct MACs");
        let dup = [o("52:54:00:00:00:01"), o("52:54:00:00:00:02"), o("52:54:00:00:00:01")];
        let e = d.check_clone_macs(&names, &dup).expect_err("duplicate");
        assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("MAC 52:54:00:00:00:01 is given to clones 'c0' and 'c2'"), "{e}");
        assert!(e.contains("network_overrides[0][0].mac and network_overrides[2][0].mac"), "{e}");
    }
}
