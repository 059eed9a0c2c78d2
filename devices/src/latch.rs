//! Parking a vCPU thread in the VMM until a flag is set: the [`Latch`], and the [`Park`] a
//! bus read asks for.
//!
//! A CPL3 guest cannot halt on this machine's KVM (HLT faults), so guests that must wait for
//! the VMM (the exit device's go, an interrupt) read a register whose read parks the vCPU
//! thread instead ([`crate::exit`]). Such a read must not park while holding its device's
//! lock: every other vCPU's access to the device would wait behind it. So the device only
//! says what to wait for ([`crate::bus::BusDevice::take_park`]) and the bus parks after it
//! has released the device ([`Park::finish`]).
//!
//! Two uses of one latch type: the go flag, set once and waited for without being consumed
//! ([`Latch::wait`]), and the VM's paravirtual interrupt line, set by a device's interrupt
//! path and consumed by the wait that sees it ([`Latch::wait_take`]), as a level interrupt
//! is acknowledged.
//!
//! Setting is cheap when nobody waits: one atomic swap and one atomic load, no lock (the
//! device's I/O thread sets the interrupt line on every receive pass the driver wants to hear
//! of). The waiter announces itself in `waiters` before it looks at the flag, and the setter
//! stores the flag before it looks at `waiters`, both sequentially consistent: either the
//! waiter sees the flag, or the setter sees the waiter and notifies it under the lock the
//! waiter holds until it sleeps. No wake-up is lost.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Told whether a vCPU parked on a latch may keep waiting (false once its VM is pausing or
/// stopping). Called with the latch's lock held: it must not block or take a lock that is
/// held while calling [`Latch::wake`].
pub type WaitWhile = Arc<dyn Fn() -> bool + Send + Sync>;

/// A flag that vCPU threads can park on (see the module doc).
///
/// Lock order: `lock` is taken last (a waiter's predicate must be lock-free; [`Latch::wake`]
/// and [`Latch::set`] may be called with other locks held).
#[derive(Default)]
pub struct Latch {
    flag: AtomicBool,
    waiters: AtomicUsize,
    /// Waits that ended because the flag was set (not a predicate, not the bound).
    hits: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Latch {
    pub fn load(&self, order: Ordering) -> bool {
        self.flag.load(order)
    }

    /// Sets (or clears) the flag; setting it wakes the waiters. Mirrors `AtomicBool::store`
    /// (the ordering is at least the one given: setting is always sequentially consistent).
    pub fn store(&self, value: bool, order: Ordering) {
        if value {
            self.set();
        } else {
            self.flag.store(false, order);
        }
    }

    /// Sets the flag and wakes the waiters, if any.
    pub fn set(&self) {
        self.flag.swap(true, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.wake();
        }
    }

    /// Clears the flag; whether it was set.
    pub fn take(&self) -> bool {
        self.flag.swap(false, Ordering::AcqRel)
    }

    /// Wakes every waiter so that it looks at the flag and its predicate again.
    pub fn wake(&self) {
        // Taken so that a waiter between its checks and its sleep cannot miss the notify.
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.changed.notify_all();
    }

    /// Threads parked on this latch now (for tests and diagnostics).
    pub fn waiters(&self) -> usize {
        self.waiters.load(Ordering::SeqCst)
    }

    /// Waits so far that ended because the flag was set, not because of their predicate or
    /// bound (for tests and diagnostics: whether sets, rather than timeouts, woke the waiters).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// Waits until the flag is set (true; the flag stays set), `keep_waiting` returns false,
    /// or `max` has passed (false for both).
    pub fn wait(&self, keep_waiting: &dyn Fn() -> bool, max: Duration) -> bool {
        self.park(keep_waiting, max, false)
    }

    /// [`Latch::wait`], but a set flag is consumed: cleared by the wait that returns true.
    pub fn wait_take(&self, keep_waiting: &dyn Fn() -> bool, max: Duration) -> bool {
        self.park(keep_waiting, max, true)
    }

    fn park(&self, keep_waiting: &dyn Fn() -> bool, max: Duration, consume: bool) -> bool {
        let deadline = Instant::now() + max;
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let got = loop {
            let set = if consume { self.flag.swap(false, Ordering::SeqCst) } else { self.flag.load(Ordering::SeqCst) };
            if set {
                break true;
            }
            let now = Instant::now();
            if !keep_waiting() || now >= deadline {
                break false;
            }
            g = self.changed.wait_timeout(g, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        drop(g);
        if got {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        got
    }
}

/// A wait a bus read asked for: run by the bus once the device's lock is released.
pub struct Park {
    latch: Arc<Latch>,
    keep_waiting: WaitWhile,
    max: Duration,
    consume: bool,
}

impl Park {
    /// Waits for `latch` to be set ([`Latch::wait`]).
    pub fn wait(latch: Arc<Latch>, keep_waiting: WaitWhile, max: Duration) -> Park {
        Park { latch, keep_waiting, max, consume: false }
    }

    /// Waits for `latch` to be set and consumes it ([`Latch::wait_take`]).
    pub fn wait_take(latch: Arc<Latch>, keep_waiting: WaitWhile, max: Duration) -> Park {
        Park { latch, keep_waiting, max, consume: true }
    }

    /// Parks, then puts the outcome in the read's bytes: 1 in the first if the latch was set,
    /// all zero otherwise.
    pub fn finish(self, data: &mut [u8]) {
        let got = self.latch.park(self.keep_waiting.as_ref(), self.max, self.consume);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = u8::from(got);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough that a waiter not woken by a notify shows, whatever the load.
    const LONG: Duration = Duration::from_secs(20);

    fn until(what: &str, f: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < LONG, "{what} did not happen");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_set_wakes_a_taking_waiter_once_and_is_consumed() {
        let l = Arc::new(Latch::default());
        let l2 = l.clone();
        let waiter = std::thread::spawn(move || l2.wait_take(&|| true, LONG));
        until("the waiter parking", || l.waiters() == 1);
        l.set();
        assert!(waiter.join().expect("waiter"), "the set woke the waiter");
        assert_eq!(l.hits(), 1);
        assert!(!l.load(Ordering::SeqCst), "the wait consumed the flag");
        // A set with nobody waiting is kept for the next wait, which then does not park.
        l.set();
        assert!(l.wait_take(&|| true, LONG));
        assert!(!l.take());
    }

    #[test]
    fn a_wake_ends_a_wait_whose_predicate_fails() {
        let l = Arc::new(Latch::default());
        let running = Arc::new(AtomicBool::new(true));
        let (l2, r2) = (l.clone(), running.clone());
        let waiter = std::thread::spawn(move || {
            let t0 = Instant::now();
            (l2.wait_take(&|| r2.load(Ordering::Acquire), LONG), t0.elapsed())
        });
        until("the waiter parking", || l.waiters() == 1);
        running.store(false, Ordering::Release);
        l.wake();
        let (got, waited) = waiter.join().expect("waiter");
        assert!(!got, "nothing was set");
        assert!(waited < LONG / 2, "the wake did not end the wait: it waited {waited:?}");
        assert_eq!(l.waiters(), 0);
    }

    #[test]
    fn no_set_is_lost_between_many_sets_and_waits() {
        // Each round: the waiter parks (or finds the flag), the setter sets once; every set
        // must end exactly one wait, without any wait running into its bound.
        let l = Arc::new(Latch::default());
        let rounds = 2000;
        let l2 = l.clone();
        let acked = Arc::new(AtomicUsize::new(0));
        let a2 = acked.clone();
        let waiter = std::thread::spawn(move || {
            for _ in 0..rounds {
                assert!(l2.wait_take(&|| true, LONG), "a set was lost");
                a2.fetch_add(1, Ordering::SeqCst);
            }
        });
        for i in 0..rounds {
            l.set();
            until("the waiter taking the set", || acked.load(Ordering::SeqCst) > i);
        }
        waiter.join().expect("waiter");
    }
}
