//! Work handed to a helper thread that the thread needing its result does itself if the
//! helper has not begun it.
//!
//! A restore reads and checks its manifest on a thread of its own while it builds the VM
//! (restore.rs). On a busy two-core host that thread was often not scheduled until the VM was
//! built: at 4 GiB it began 1.8-6.6 ms after it was spawned (the VM took 2.2-2.8 ms), and the
//! restore then waited for all of its work. With a [`Handoff`] the restoring thread takes
//! whatever the helper has not begun and waits only for what the helper is doing.
//!
//! Exactly one thread runs each piece of work: whoever takes the closure out of its slot (one
//! mutex). The helper keeps the result (or its panic) for the owner, who waits on a condvar.
//! Everything the work needs (a store handle, names) lives in the closure, so once the owner
//! has taken every piece (run here, or waited for), a helper that starts late holds nothing
//! but empty slots (no store handle, no snapshot pin): the owner never has to join it, and it
//! ends as soon as it runs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

type Work<T> = Box<dyn FnOnce() -> T + Send>;

/// One piece of work, run once by the helper or by the owner (see the module doc).
pub struct Handoff<T> {
    work: Mutex<Option<Work<T>>>,
    result: Mutex<Option<std::thread::Result<T>>>,
    ready: Condvar,
}

impl<T: Send + 'static> Handoff<T> {
    pub fn new(work: impl FnOnce() -> T + Send + 'static) -> Arc<Self> {
        Arc::new(Handoff { work: Mutex::new(Some(Box::new(work))), result: Mutex::new(None), ready: Condvar::new() })
    }

    fn claim(&self) -> Option<Work<T>> {
        self.work.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn results(&self) -> MutexGuard<'_, Option<std::thread::Result<T>>> {
        self.result.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The helper's side: runs the work unless someone has taken it; true if it ran here.
    /// A panic is caught and kept for the owner.
    pub fn run(&self) -> bool {
        let Some(work) = self.claim() else {
            return false;
        };
        let r = catch_unwind(AssertUnwindSafe(work));
        *self.results() = Some(r);
        self.ready.notify_all();
        true
    }

    /// The owner's side: the result, from running the work here if the helper has not begun
    /// it, else from waiting for the helper. `Err` holds the helper's panic.
    pub fn take(&self) -> std::thread::Result<T> {
        if let Some(work) = self.claim() {
            return Ok(work());
        }
        let mut slot = self.results();
        loop {
            if let Some(r) = slot.take() {
                return r;
            }
            slot = self.ready.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn the_owner_runs_work_the_helper_has_not_begun_and_the_helper_then_does_nothing() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let job = Handoff::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
            std::thread::current().id()
        });
        assert_eq!(job.take().expect("no panic"), std::thread::current().id());
        assert!(!job.run(), "a late helper finds the work taken");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_owner_waits_for_work_the_helper_began() {
        let started = Arc::new(Barrier::new(2));
        let release = Arc::new(Barrier::new(2));
        let (s, r) = (started.clone(), release.clone());
        let job = Handoff::new(move || {
            s.wait();
            r.wait();
            std::thread::current().id()
        });
        let helper = {
            let job = job.clone();
            std::thread::spawn(move || job.run())
        };
        started.wait();
        // The helper holds the work: the owner cannot run it too, it must wait.
        let owner = {
            let job = job.clone();
            std::thread::spawn(move || job.take())
        };
        release.wait();
        let helper_id = helper.thread().id();
        assert!(helper.join().expect("helper"), "the helper ran it");
        assert_eq!(owner.join().expect("owner").expect("no panic"), helper_id, "the result is the helper's");
    }

    #[test]
    fn a_panic_in_the_helper_reaches_the_owner_as_an_error() {
        let job: Arc<Handoff<u32>> = Handoff::new(|| panic!("damaged"));
        assert!(job.run());
        let err = job.take().expect_err("the panic is passed on");
        assert_eq!(err.downcast_ref::<&str>(), Some(&"damaged"));
    }

    #[test]
    fn once_the_owner_has_taken_the_work_a_late_helper_holds_nothing_of_it() {
        let held = Arc::new(());
        let h = held.clone();
        let job = Handoff::new(move || Arc::strong_count(&h));
        let late_helper = job.clone();
        assert_eq!(job.take().expect("no panic"), 2, "run here, with its capture");
        assert_eq!(Arc::strong_count(&held), 1, "the closure and its capture are gone");
        assert!(!late_helper.run());
    }
}
