//! Capacity limits: the guest memory budget and the size of request bodies.
//!
//! The budget (`--max-guest-memory`, by default [`DEFAULT_SHARE_PERCENT`] % of the host's
//! RAM) caps the sum of the memory of every VM the daemon holds. A VM's memory is reserved
//! when it is defined (create, restore, clone) and released when it is deleted, so a defined
//! VM can always start; a request that would pass the budget gets `409` with the budget, what
//! is held and what was asked. VMs found in the state directory at start are counted even if
//! together they pass a budget that was lowered since: they exist already.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::daemon::Daemon;
use super::error::ApiError;
use crate::net::NetSpec;
use crate::snapshot::SnapshotError;
use crate::vm::MachineSpec;

/// The default budget: this share of the host's RAM (the rest is for the host, the daemon's
/// own caches and page tables).
pub const DEFAULT_SHARE_PERCENT: u64 = 75;

/// The largest JSON request body; larger ones get `413 Payload Too Large`.
pub const MAX_JSON_BODY: usize = 64 * 1024;

/// Errors parsing `--max-guest-memory`.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("--max-guest-memory {value:?}: expected MiB (1024), a size (512M, 16G, 1T) or a share of host RAM (75%)")]
    Parse { value: String },
    #[error("--max-guest-memory {value:?}: a share of host RAM must be 1% to 100%")]
    Percent { value: String },
    #[error("--max-guest-memory: reading the host's RAM: {0}")]
    Host(String),
}

/// Parses `--max-guest-memory` into MiB: `1024`, `512M`, `16G`, `1T` or `75%` of `host_mib`.
pub fn parse_budget(value: &str, host_mib: u64) -> Result<u64, LimitError> {
    let v = value.trim();
    let bad = || LimitError::Parse { value: value.to_string() };
    if let Some(p) = v.strip_suffix('%') {
        let p: u64 = p.trim().parse().map_err(|_| bad())?;
        if !(1..=100).contains(&p) {
            return Err(LimitError::Percent { value: value.to_string() });
        }
        return Ok(host_mib.saturating_mul(p) / 100);
    }
    let (num, mult) = match v.char_indices().last() {
        Some((i, 'M' | 'm')) => (&v[..i], 1),
        Some((i, 'G' | 'g')) => (&v[..i], 1024),
        Some((i, 'T' | 't')) => (&v[..i], 1024 * 1024),
        _ => (v, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(mult).filter(|&m| m > 0).ok_or_else(bad)
}

/// The default budget on this host, in MiB.
pub fn default_budget() -> Result<u64, LimitError> {
    let host = crate::memory::host_mem_mib().map_err(|e| LimitError::Host(e.to_string()))?;
    Ok(host * DEFAULT_SHARE_PERCENT / 100)
}

/// The guest memory budget: MiB reserved per VM name.
#[derive(Debug)]
pub struct MemoryBudget {
    limit_mib: u64,
    /// MiB per VM name, and per pending restore under a key no VM name can have.
    held: Mutex<BTreeMap<String, u64>>,
    pending: AtomicU64,
}

/// A reservation refused: the budget, what is held and what was asked.
#[derive(Debug, thiserror::Error)]
#[error("VM '{vm}' needs {asked} MiB of guest memory but the daemon's budget (--max-guest-memory) is {limit} MiB and {held} MiB of it are held by {count} VM(s): delete VMs or raise the budget")]
pub struct OverBudget {
    pub vm: String,
    pub asked: u64,
    pub limit: u64,
    pub held: u64,
    pub count: usize,
}

impl MemoryBudget {
    pub fn new(limit_mib: u64) -> MemoryBudget {
        MemoryBudget { limit_mib, held: Mutex::new(BTreeMap::new()), pending: AtomicU64::new(0) }
    }

    pub fn limit_mib(&self) -> u64 {
        self.limit_mib
    }

    /// MiB held by every VM together.
    pub fn held_mib(&self) -> u64 {
        saturating_sum(self.held.lock().unwrap_or_else(PoisonError::into_inner).values())
    }

    /// Reserves `mib` for VM `vm` if the budget has room (replacing what `vm` held).
    pub fn reserve(&self, vm: &str, mib: u64) -> Result<(), OverBudget> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let others = saturating_sum(held.iter().filter(|(n, _)| n.as_str() != vm).map(|(_, m)| m));
        if others.saturating_add(mib) > self.limit_mib {
            return Err(OverBudget {
                vm: vm.to_string(),
                asked: mib,
                limit: self.limit_mib,
                held: others,
                count: held.keys().filter(|n| n.as_str() != vm).count(),
            });
        }
        held.insert(vm.to_string(), mib);
        Ok(())
    }

    /// Counts a VM that exists already (found at start), whatever the budget says.
    pub fn force(&self, vm: &str, mib: u64) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.insert(vm.to_string(), mib);
        let total = saturating_sum(held.values());
        if total > self.limit_mib {
            tracing::warn!(
                vm,
                total_mib = total,
                budget_mib = self.limit_mib,
                "VMs found at start exceed the memory budget"
            );
        }
    }

    /// Releases what VM `vm` held.
    pub fn release(&self, vm: &str) {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).remove(vm);
    }

    /// Reserves `mib` for a VM being restored as `vm`, under a key of its own until
    /// [`Pending::keep`] gives it the VM's name.
    fn reserve_pending(self: &Arc<Self>, vm: &str, mib: u64) -> Result<Pending, OverBudget> {
        // A NUL never occurs in a VM name.
        let key = format!("{vm}\0restore-{}", self.pending.fetch_add(1, Ordering::Relaxed));
        self.reserve(&key, mib).map_err(|e| OverBudget { vm: vm.to_string(), ..e })?;
        Ok(Pending { budget: self.clone(), key, vm: vm.to_string(), mib })
    }
}

/// The sum of `mib`, at most `u64::MAX`: a definition found at start may hold any amount.
fn saturating_sum<'a>(mib: impl Iterator<Item = &'a u64>) -> u64 {
    mib.fold(0, |sum, m| sum.saturating_add(*m))
}

/// Memory reserved for a restore in progress: given back unless [`Pending::keep`] is called.
#[derive(Debug)]
pub struct Pending {
    budget: Arc<MemoryBudget>,
    key: String,
    vm: String,
    mib: u64,
}

impl Pending {
    /// The restore succeeded: the VM now holds the memory under its name.
    pub fn keep(self) {
        let mut held = self.budget.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.remove(&self.key);
        held.insert(self.vm.clone(), self.mib);
        drop(held);
        std::mem::forget(self);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.budget.release(&self.key);
    }
}

/// Reads the machine shape of snapshot `snap` (no memory) and reserves its memory for VM `vm`;
/// returns the reservation and the snapshot's NICs.
pub async fn reserve_for_restore(d: &Daemon, snap: &str, vm: &str) -> Result<(Pending, Vec<NetSpec>), ApiError> {
    let (store, name) = (d.store.clone(), snap.to_string());
    let spec = tokio::task::spawn_blocking(move || snapshot_spec(&store, &name))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::from_snapshot(&e))?;
    Ok((d.budget.reserve_pending(vm, spec.mem_mib)?, spec.net))
}

/// The machine spec snapshot `snap` was taken of (snapshot bytes: untrusted).
pub fn snapshot_spec(store: &storage::Store, snap: &str) -> Result<MachineSpec, SnapshotError> {
    let reader = store.reader(snap)?;
    let state = migrate::snapshot::format::VmSnapshot::decode(&reader.manifest().state)?;
    Ok(state.get("machine")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse() {
        assert_eq!(parse_budget("1024", 8192).ok(), Some(1024));
        assert_eq!(parse_budget("512M", 8192).ok(), Some(512));
        assert_eq!(parse_budget("16G", 8192).ok(), Some(16384));
        assert_eq!(parse_budget("50%", 8192).ok(), Some(4096));
        for bad in ["", "0", "x", "101%", "0%", "-1", "99999999999999999999T"] {
            assert!(parse_budget(bad, 8192).is_err(), "{bad:?}");
        }
    }

    /// A definition found at start is untrusted: one of `u64::MAX` MiB (valid JSON; its start
    /// fails, "more than this host can give") is counted as held, not wrapped around with the
    /// others to a small sum that let every later request pass the budget.
    #[test]
    fn a_huge_vm_found_at_start_holds_the_budget() {
        let b = MemoryBudget::new(1024);
        b.force("huge", u64::MAX);
        b.force("small", 16);
        assert_eq!(b.held_mib(), u64::MAX);
        let e = b.reserve("new", 16).expect_err("a reservation past a VM that holds more than the budget");
        assert_eq!((e.held, e.count), (u64::MAX, 2));
    }

    #[test]
    fn reservations_stay_within_the_budget() {
        let b = MemoryBudget::new(100);
        b.reserve("a", 60).expect("fits");
        let e = b.reserve("b", 50).expect_err("over");
        assert_eq!((e.held, e.limit, e.asked, e.count), (60, 100, 50, 1));
        b.reserve("b", 40).expect("fits exactly");
        b.release("a");
        b.reserve("c", 60).expect("room again");
        assert_eq!(b.held_mib(), 100);
        let b = Arc::new(MemoryBudget::new(100));
        let p = b.reserve_pending("r", 70).expect("fits");
        assert!(b.reserve_pending("r", 40).is_err(), "the pending restore holds its memory");
        drop(p);
        b.reserve_pending("r", 70).expect("given back").keep();
        assert!(b.reserve("s", 40).is_err(), "kept under the VM's name");
        b.release("r");
        assert_eq!(b.held_mib(), 0);
    }
}
