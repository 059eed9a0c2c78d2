//! The fill gate: when a page server's fill threads may start loading.
//!
//! A restore's first instruction waits on one core's worth of work: the restoring thread
//! (memory slots, state), then the vCPU and the fault thread serving its first pages. Fill
//! threads started with the server take the cores from both: on the 2-core machines here,
//! `bench restore --mem-mib 4096` had lazy+prefetch's first instruction at 16 ms against
//! lazy's 8 ms. With a hold-off ([`super::ServerOptions::fill_hold_off`]) the fill threads
//! wait at the gate until the owner opens it (the VM's first exit to the VMM: the guest is
//! running), until the hold-off passes (a guest that is halted or never exits still gets its
//! memory), or until the server stops, fails, or is asked to load the prefetch list now.
//!
//! The first `fill_ungated` fill threads may be let start with the server (0 by default):
//! the first instruction needs one core, and on the others a fill thread would take nothing
//! from it and start the prefetch list while the restore still loads device and vCPU state.
//! Measured on the 2-core machines under load 5-8 from other work, the wall clocks of
//! `bench restore --ungated-fill-threads 0|1` and `--no-fill-gate` did not tell the three
//! apart (each ranged 2-3x from run to run; the gate was never shown to help or hurt the
//! working set); the CPU to the first instruction was 3-5 ms gated, 6-8 ms with one thread
//! ungated (the list's first chunks), 7-20 ms ungated. Until a quiet host shows a gain, the
//! default stays as it was.
//!
//! The gate only delays loading that nobody waits for: faults are served from the start,
//! and every chunk still goes through the claims of serving.rs, so what the guest sees is
//! the same whether the gate is open or not.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

/// Opened once; fill threads wait for it.
#[derive(Debug, Default)]
pub struct FillGate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl FillGate {
    /// A gate that is already open (no hold-off).
    pub(super) fn new_open() -> Self {
        FillGate { open: Mutex::new(true), opened: Condvar::new() }
    }

    /// Lets the fill threads start. Idempotent.
    pub fn open(&self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if !*open {
            *open = true;
            self.opened.notify_all();
        }
    }

    pub fn is_open(&self) -> bool {
        *self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the gate is open or `until` has passed; opens it in the second case.
    pub(super) fn wait(&self, until: Instant) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        while !*open {
            let now = Instant::now();
            if now >= until {
                *open = true;
                self.opened.notify_all();
                break;
            }
            open = self.opened.wait_timeout(open, until - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn wait_returns_when_opened_or_at_the_deadline() {
        let g = Arc::new(FillGate::default());
        assert!(!g.is_open());
        let g2 = g.clone();
        let t = std::thread::spawn(move || g2.wait(Instant::now() + Duration::from_secs(600)));
        g.open();
        t.join().expect("waiter");
        assert!(g.is_open());
        let late = FillGate::default();
        late.wait(Instant::now() + Duration::from_millis(5));
        assert!(late.is_open(), "the hold-off passed: the gate opens by itself");
        assert!(FillGate::new_open().is_open());
    }
}
