//! The daemon-wide MAC claim: which VM each MAC is on the wire for, taken atomically.
//!
//! A VM claims the MACs of all its NICs, all or none, under one lock, before anything of it is
//! built (no tap opened, no memory allocated): at `start`, at a restore, at each clone's
//! restore and when the daemon resumes a VM at its start. A MAC another VM holds refuses the
//! whole claim ([`MacError::Taken`], a 409 naming the MAC, the NIC and the holder). The claim
//! ([`MacClaim`]) lives beside the VM in its actor and is released when the VM stops (by
//! request or on its own: guest exit, crash, failed lazy restore), when its start or restore
//! fails (the guard drops on the error path), and when the VM is deleted or the daemon ends
//! (the actor and with it the guard go). Each claim carries a token, so a guard that drops
//! late (an actor thread that ended after its VM was deleted and the name reused) releases
//! only its own entries, never a newer VM's.
//!
//! Check and take are one step: two requests that want one MAC cannot both pass a check and
//! then both take it, which is how duplicates got through when the daemon only looked at its
//! running VMs' MACs.
//!
//! MACs the daemon picks for clones are picked under the same lock ([`MacClaims::claim`] with
//! a NIC whose MAC is `None`): never one held by a claim, by a live NIC of the process, by a
//! definition the caller names, or by another NIC of the same claim.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use rand::Rng;

use crate::net::{mac, Mac};

/// Why a claim was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error(
        "MAC {mac} of VM '{vm}' net[{nic}] is in use by running VM '{holder}' (its net[{holder_nic}]); \
         stop or delete '{holder}', or give '{vm}' another MAC"
    )]
    Taken { mac: Mac, vm: String, nic: usize, holder: String, holder_nic: usize },
    #[error("MAC {mac} is given to two NICs of VM '{vm}' (net[{first}] and net[{second}]); each NIC needs its own")]
    Twice { mac: Mac, vm: String, first: usize, second: usize },
}

/// Who holds a MAC.
#[derive(Clone, Debug)]
struct Holder {
    vm: String,
    nic: usize,
    token: u64,
}

#[derive(Default)]
struct Table {
    next_token: u64,
    by_mac: HashMap<Mac, Holder>,
}

/// The registry: MAC -> the VM (and NIC) it is claimed for.
#[derive(Default)]
pub struct MacClaims {
    table: Mutex<Table>,
}

/// A VM's claim on its NICs' MACs; dropping it releases them.
#[derive(Debug)]
pub struct MacClaim {
    claims: Arc<MacClaims>,
    token: u64,
    macs: Vec<Mac>,
}

impl MacClaim {
    /// The claimed MACs, in NIC order.
    pub fn macs(&self) -> &[Mac] {
        &self.macs
    }
}

impl Drop for MacClaim {
    fn drop(&mut self) {
        let mut t = self.claims.table.lock().unwrap_or_else(PoisonError::into_inner);
        for m in &self.macs {
            if t.by_mac.get(m).is_some_and(|h| h.token == self.token) {
                t.by_mac.remove(m);
            }
        }
    }
}

impl std::fmt::Debug for MacClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("MacClaims").field("claimed", &t.by_mac.len()).finish()
    }
}

impl MacClaims {
    /// Claims MAC `macs[i]` for NIC i of VM `vm`, all or none; a NIC with `None` gets a MAC
    /// picked now (locally administered, held by nobody, not in `avoid`, e.g. the MACs of
    /// the daemon's definitions). Returns the claim; its [`MacClaim::macs`] are the MACs.
    pub fn claim(self: &Arc<Self>, vm: &str, macs: &[Option<Mac>], avoid: &HashSet<Mac>) -> Result<MacClaim, MacError> {
        for (i, m) in macs.iter().enumerate() {
            let Some(m) = m else { continue };
            if let Some(first) = macs[..i].iter().position(|x| x == &Some(*m)) {
                return Err(MacError::Twice { mac: *m, vm: vm.to_string(), first, second: i });
            }
        }
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, m) in macs.iter().enumerate() {
            let Some(m) = m else { continue };
            if let Some(h) = t.by_mac.get(m) {
                return Err(MacError::Taken {
                    mac: *m,
                    vm: vm.to_string(),
                    nic: i,
                    holder: h.vm.clone(),
                    holder_nic: h.nic,
                });
            }
        }
        let mut chosen: Vec<Mac> = Vec::with_capacity(macs.len());
        let mut rng = rand::thread_rng();
        for m in macs {
            let m = match m {
                Some(m) => *m,
                // 2^24 addresses: a free one turns up at once unless millions are in use.
                None => loop {
                    let r: [u8; 3] = rng.gen();
                    let c = Mac([mac::PREFIX[0], mac::PREFIX[1], mac::PREFIX[2], r[0], r[1], r[2]]);
                    let given = macs.contains(&Some(c)) || chosen.contains(&c);
                    if !given && !t.by_mac.contains_key(&c) && !avoid.contains(&c) && !mac::is_held(c) {
                        break c;
                    }
                },
            };
            chosen.push(m);
        }
        t.next_token += 1;
        let token = t.next_token;
        for (nic, m) in chosen.iter().enumerate() {
            t.by_mac.insert(*m, Holder { vm: vm.to_string(), nic, token });
        }
        tracing::debug!(vm, macs = ?chosen, "MACs claimed");
        Ok(MacClaim { claims: self.clone(), token, macs: chosen })
    }

    /// The VM (and its NIC index) that holds `m`, if any.
    pub fn holder(&self, m: Mac) -> Option<(String, usize)> {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.by_mac.get(&m).map(|h| (h.vm.clone(), h.nic))
    }

    /// Every claimed MAC.
    pub fn claimed(&self) -> HashSet<Mac> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).by_mac.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(last: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, last])
    }

    #[test]
    fn a_claimed_mac_is_refused_naming_the_holder_until_released() {
        let c = Arc::new(MacClaims::default());
        let a = c.claim("a", &[Some(m(1)), Some(m(2))], &HashSet::new()).expect("a");
        let e = c.claim("b", &[Some(m(3)), Some(m(2))], &HashSet::new()).expect_err("taken");
        assert_eq!(
            e.to_string().split(';').next(),
            Some("MAC 52:54:00:00:00:02 of VM 'b' net[1] is in use by running VM 'a' (its net[1])")
        );
        assert_eq!(c.holder(m(3)), None, "a refused claim takes nothing");
        drop(a);
        assert!(c.claimed().is_empty());
        c.claim("b", &[Some(m(3)), Some(m(2))], &HashSet::new()).expect("free again");
    }

    #[test]
    fn picked_macs_avoid_claimed_given_and_defined_ones() {
        let c = Arc::new(MacClaims::default());
        let _held = c.claim("x", &[Some(m(1))], &HashSet::new()).expect("x");
        let avoid: HashSet<Mac> = [m(9)].into();
        let mut seen = HashSet::new();
        let mut keep = Vec::new();
        for i in 0..500 {
            let claim = c.claim(&format!("v{i}"), &[None, Some(m(4)).filter(|_| i == 0), None], &avoid).expect("claim");
            for mm in claim.macs() {
                assert!(seen.insert(*mm), "{mm} picked twice");
                assert!(*mm != m(1) && *mm != m(9));
            }
            keep.push(claim);
        }
        let e = c.claim("y", &[Some(m(5)), Some(m(5))], &avoid).expect_err("twice");
        assert!(matches!(e, MacError::Twice { first: 0, second: 1, .. }), "{e}");
    }

    #[test]
    fn a_late_guard_releases_only_its_own_claim() {
        let c = Arc::new(MacClaims::default());
        let old = c.claim("v", &[Some(m(1))], &HashSet::new()).expect("old");
        // The old guard's entry is gone (released) and a new VM took the MAC: dropping the old
        // guard again must not free the new one's.
        c.table.lock().expect("lock").by_mac.clear();
        let _new = c.claim("v", &[Some(m(1))], &HashSet::new()).expect("new");
        drop(old);
        assert_eq!(c.holder(m(1)), Some(("v".into(), 0)));
    }
}
