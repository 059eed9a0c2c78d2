//! Where a VM's exits to the VMM go: a count and the time spent handling them, per port and
//! per MMIO page, for `snapvisor bench boot --firmware` (firmware spends its boot in port I/O,
//! and this shows which ports cost the most).
//!
//! Off by default: when off, a vCPU pays one relaxed atomic load per exit. When on, each exit
//! takes two clock reads and a mutex held for a map update; the time recorded is from the
//! moment the vCPU thread saw the exit to the moment its handler returned (the VMM's share;
//! KVM's own exit and entry cost is not in it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What an exit was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitKind {
    Pio,
    Mmio,
}

/// Exits of one kind at one address (a port, or an MMIO page).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExitSite {
    pub kind: ExitKind,
    pub addr: u64,
    pub count: u64,
    pub handling_ns: u64,
}

/// Per-site exit counts and handling times.
#[derive(Default)]
pub struct ExitProfile {
    on: AtomicBool,
    sites: Mutex<BTreeMap<(ExitKind, u64), (u64, u64)>>,
}

impl ExitProfile {
    /// Starts (or stops) recording.
    pub fn enable(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// The start of an exit's handling, when recording.
    pub fn start(&self) -> Option<Instant> {
        self.on.load(Ordering::Relaxed).then(Instant::now)
    }

    /// Records an exit whose handling began at `t0` (from [`ExitProfile::start`]). MMIO
    /// addresses are recorded by page.
    pub fn record(&self, kind: ExitKind, addr: u64, t0: Option<Instant>) {
        let Some(t0) = t0 else { return };
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let addr = if kind == ExitKind::Mmio { addr & !0xfff } else { addr };
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        let e = sites.entry((kind, addr)).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(ns);
    }

    /// Every site, the most expensive first.
    pub fn sites(&self) -> Vec<ExitSite> {
        let sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<ExitSite> = sites
            .iter()
            .map(|(&(kind, addr), &(count, handling_ns))| ExitSite { kind, addr, count, handling_ns })
            .collect();
        v.sort_by(|a, b| b.handling_ns.cmp(&a.handling_ns).then(b.count.cmp(&a.count)));
        v
    }

    /// Total handling time recorded.
    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.sites().iter().map(|s| s.handling_ns).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_on_and_groups_mmio_by_page() {
        let p = ExitProfile::default();
        p.record(ExitKind::Pio, 0x402, p.start());
        assert!(p.sites().is_empty());
        p.enable(true);
        for _ in 0..3 {
            p.record(ExitKind::Pio, 0x402, p.start());
        }
        p.record(ExitKind::Mmio, 0xfef0_1004, p.start());
        p.record(ExitKind::Mmio, 0xfef0_1ff8, p.start());
        let s = p.sites();
        assert_eq!(s.len(), 2);
        let pio = s.iter().find(|s| s.kind == ExitKind::Pio).expect("pio site");
        assert_eq!((pio.addr, pio.count), (0x402, 3));
        let mmio = s.iter().find(|s| s.kind == ExitKind::Mmio).expect("mmio site");
        assert_eq!((mmio.addr, mmio.count), (0xfef0_1000, 2));
    }
}
