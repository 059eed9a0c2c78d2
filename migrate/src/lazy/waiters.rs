//! Waiting for a chunk another thread is loading.
//!
//! A chunk takes tens of microseconds to load, so a thread that finds it claimed first yields
//! for up to [`SPIN`]: in the common case the chunk arrives within that time, as fast as a
//! pure spin would see it. Past that it sleeps on a condition variable that every loader
//! signals when it gives up a claim, instead of yielding for as long as the load takes: a
//! loader at a lower priority (the background fill runs at nice 10) or a slow store read
//! would otherwise have every waiting thread (a fault thread per clone, all on one chunk)
//! burn the cores the loader needs.
//!
//! Wake-ups are not lost: a sleeper counts itself in `sleepers` and then checks its condition
//! under the lock; a loader changes the state, then reads `sleepers` (both sides with a
//! sequentially consistent fence between) and, if any sleep, takes the lock before it
//! notifies. A sleeper also wakes every [`NAP`] to look again, so a state change made
//! without [`Waiters::wake`] (a stop, a failure recorded elsewhere) is still seen.

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a waiter yields before it sleeps.
const SPIN: Duration = Duration::from_micros(50);
/// The longest a sleeper sleeps before it looks again without being woken.
const NAP: Duration = Duration::from_millis(1);

#[derive(Default)]
pub(super) struct Waiters {
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Waiters {
    /// Returns once `busy()` is false.
    pub(super) fn wait_while(&self, busy: impl Fn() -> bool) {
        let start = Instant::now();
        while busy() {
            if start.elapsed() < SPIN {
                std::thread::yield_now();
                continue;
            }
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            while busy() {
                guard = self.cv.wait_timeout(guard, NAP).unwrap_or_else(PoisonError::into_inner).0;
            }
            drop(guard);
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }

    /// Wakes the sleepers: call after every change a waiter's `busy()` depends on.
    pub(super) fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            drop(self.lock.lock().unwrap_or_else(PoisonError::into_inner));
            self.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// Waiters past their spin sleep instead of yielding (a yielding waiter on a 2-core host
    /// under load still gets a third of a core or more: 150 ms of CPU in this test's 500 ms),
    /// and every one returns once the state changes and `wake` is called.
    #[test]
    fn sleepers_use_next_to_no_cpu_and_all_return_when_woken() {
        let w = Arc::new(Waiters::default());
        let busy = Arc::new(AtomicBool::new(true));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (w, busy) = (w.clone(), busy.clone());
                std::thread::spawn(move || {
                    let cpu0 = thread_cpu();
                    w.wait_while(|| busy.load(Ordering::Acquire));
                    thread_cpu() - cpu0
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(w.sleepers.load(Ordering::SeqCst), 2, "the waiters are not asleep");
        busy.store(false, Ordering::Release);
        w.wake();
        for t in threads {
            let cpu = t.join().expect("waiter");
            assert!(cpu < Duration::from_millis(20), "a waiter used {cpu:?} of CPU while it waited");
        }
        assert_eq!(w.sleepers.load(Ordering::SeqCst), 0);
    }

    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec, which `ts` is.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}
