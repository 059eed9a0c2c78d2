//! MAC addresses of this process's NICs.
//!
//! Every NIC holds a [`MacLease`] for as long as it exists: explicit MACs (`mac=`) and the ones
//! snapvisor picks. A picked MAC is locally administered, `52:54:00:xx:xx:xx` (QEMU's prefix,
//! which has the locally administered bit set), its last three octets random, and never one a
//! live NIC of this process (daemon) holds. An explicit MAC may be given to NICs of different
//! VMs (the operator's choice, e.g. VMs on separate bridges), never twice within one VM.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use rand::Rng;

use super::Mac;

/// The prefix of picked MACs.
pub const PREFIX: [u8; 3] = [0x52, 0x54, 0x00];

/// MACs held by live NICs of this process, with how many NICs hold each.
fn in_use() -> &'static Mutex<HashMap<Mac, usize>> {
    static USED: std::sync::OnceLock<Mutex<HashMap<Mac, usize>>> = std::sync::OnceLock::new();
    USED.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A NIC's hold on its MAC; dropping it frees the MAC for others.
#[derive(Debug)]
pub struct MacLease {
    mac: Mac,
}

impl MacLease {
    /// Holds `mac` (given explicitly).
    pub fn hold(mac: Mac) -> MacLease {
        *in_use().lock().unwrap_or_else(PoisonError::into_inner).entry(mac).or_insert(0) += 1;
        MacLease { mac }
    }

    /// Picks a MAC no live NIC of this process holds, and holds it.
    pub fn pick() -> MacLease {
        let mut used = in_use().lock().unwrap_or_else(PoisonError::into_inner);
        let mut rng = rand::thread_rng();
        loop {
            let r: [u8; 3] = rng.gen();
            let mac = Mac([PREFIX[0], PREFIX[1], PREFIX[2], r[0], r[1], r[2]]);
            // 2^24 addresses: a free one turns up at once unless millions of NICs exist.
            if let std::collections::hash_map::Entry::Vacant(e) = used.entry(mac) {
                e.insert(1);
                return MacLease { mac };
            }
        }
    }

    pub fn mac(&self) -> Mac {
        self.mac
    }
}

impl Drop for MacLease {
    fn drop(&mut self) {
        let mut used = in_use().lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = used.get_mut(&self.mac) {
            *n -= 1;
            if *n == 0 {
                used.remove(&self.mac);
            }
        }
    }
}

/// A MAC for a NIC that will exist later (a daemon VM's definition, which keeps it across
/// restarts): locally administered with [`PREFIX`], held by no live NIC of this process, and
/// for which `taken` (the MACs of other definitions) says no. Nothing is held: the NIC takes
/// its lease when it is built.
pub fn pick_free(taken: impl Fn(Mac) -> bool) -> Mac {
    let mut rng = rand::thread_rng();
    loop {
        let r: [u8; 3] = rng.gen();
        let mac = Mac([PREFIX[0], PREFIX[1], PREFIX[2], r[0], r[1], r[2]]);
        if !is_held(mac) && !taken(mac) {
            return mac;
        }
    }
}

/// Whether a live NIC of this process holds `mac`.
pub fn is_held(mac: Mac) -> bool {
    in_use().lock().unwrap_or_else(PoisonError::into_inner).contains_key(&mac)
}

/// The first MAC that appears twice in `macs`, if any.
pub fn duplicate(macs: &[Mac]) -> Option<Mac> {
    macs.iter().enumerate().find(|(i, m)| macs[..*i].contains(m)).map(|(_, m)| *m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_macs_are_local_unicast_unique_and_freed() {
        let leases: Vec<MacLease> = (0..2000).map(|_| MacLease::pick()).collect();
        let mut macs: Vec<Mac> = leases.iter().map(MacLease::mac).collect();
        for m in &macs {
            assert_eq!(m.0[..3], PREFIX);
            assert_eq!(m.0[0] & 0x03, 0x02, "locally administered unicast: {m}");
        }
        macs.sort_by_key(|m| m.0);
        macs.dedup();
        assert_eq!(macs.len(), 2000);
        let m = leases[0].mac();
        assert!(is_held(m));
        drop(leases);
        assert!(!is_held(m));
    }

    #[test]
    fn free_picks_avoid_held_and_taken_macs() {
        let held = MacLease::pick();
        for _ in 0..2000 {
            let m = pick_free(|m| m.0[5] % 2 == 0);
            assert_eq!(m.0[..3], PREFIX);
            assert_ne!(m, held.mac());
            assert_eq!(m.0[5] % 2, 1, "a taken MAC was picked: {m}");
            assert!(!is_held(m), "picking holds nothing");
        }
    }

    #[test]
    fn explicit_macs_are_counted() {
        let m = Mac([0x02, 0, 0, 0, 0, 0x77]);
        let a = MacLease::hold(m);
        let b = MacLease::hold(m);
        drop(a);
        assert!(is_held(m));
        drop(b);
        assert!(!is_held(m));
        assert_eq!(duplicate(&[m, Mac([2, 0, 0, 0, 0, 1]), m]), Some(m));
        assert_eq!(duplicate(&[m]), None);
    }
}
