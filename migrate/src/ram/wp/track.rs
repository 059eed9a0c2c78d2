//! Pre-protection: write-protecting RAM while the guest runs, so that the pause only has to
//! re-protect what the guest wrote since (see the module doc of [`super`] for the protocol).

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use super::{
    set_run, Shared, WpBlock, WpError, WpRegistration, WpTestFaults, WriteProtect, DONE, PHASE_COPY, PHASE_TRACK,
    PROTECTED, REDIRTIED, TRACK_RUN,
};

/// Consecutive chunks of one block that get the same change, applied with one call.
struct Runs<'a> {
    s: &'a Shared,
    bi: usize,
    run: Option<(u64, u64, bool)>,
}

impl<'a> Runs<'a> {
    fn new(s: &'a Shared, bi: usize) -> Runs<'a> {
        Runs { s, bi, run: None }
    }

    /// Adds chunk `ci`, to be protected (`protect`) or unprotected.
    fn push(&mut self, ci: u64, protect: bool) -> Result<(), WpError> {
        match self.run {
            // At most `TRACK_RUN` chunks a call: the guest stalls on the range being changed.
            Some((first, last, p)) if p == protect && last + 1 == ci && ci - first < TRACK_RUN => {
                self.run = Some((first, ci, p))
            }
            _ => {
                self.flush()?;
                self.run = Some((ci, ci, protect));
            }
        }
        Ok(())
    }

    /// Applies the run so far.
    fn flush(&mut self) -> Result<(), WpError> {
        if let Some((first, last, protect)) = self.run.take() {
            set_run(self.s, self.bi, first, last, protect)?;
        }
        Ok(())
    }
}

impl Shared {
    /// A write fault in the track phase (`phase_lock` held): unprotect the chunk, then mark it
    /// re-dirtied. A chunk already marked is unprotected again: it may have been re-protected
    /// since (a late fault), and its writer must not fault for ever.
    pub(super) fn track_fault(&self, bi: usize, ci: u64, _phase: &MutexGuard<'_, ()>) -> Result<(), WpError> {
        self.track_faults.fetch_add(1, Ordering::Relaxed);
        if self.test.fail_on_track_fault {
            return Err(WpError::Fault("injected failure at a track-phase fault (test)".into()));
        }
        let st = &self.blocks[bi].state[ci as usize];
        if st.load(Ordering::Acquire) == DONE {
            // Not tracked: never protected by us; only the writer needs waking.
            return Ok(());
        }
        let (start, len) = self.range(bi, ci);
        self.uffd.write_protect(start, len, false)?;
        st.store(REDIRTIED, Ordering::Release);
        Ok(())
    }

    fn check_failed(&self) -> Result<(), WpError> {
        match self.failed.get() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// After protecting: had the fault thread failed meanwhile, nobody serves faults any more,
    /// so unprotect everything and report its error.
    fn undo_if_failed(&self) -> Result<(), WpError> {
        if let Some(e) = self.failed.get() {
            self.unprotect_all();
            return Err(e.clone());
        }
        Ok(())
    }
}

impl WriteProtect {
    /// Registers `blocks` and write-protects their listed chunks with the fault thread in the
    /// track phase: a write only unprotects its chunk and marks it re-dirtied. Call it with
    /// the VM running; then [`WriteProtect::retrack`] while that helps, and
    /// [`WriteProtect::arm`] with the VM paused.
    pub fn start_tracking(blocks: Vec<WpBlock>, chunk: u64, buffer_bytes: u64) -> Result<WriteProtect, WpError> {
        Self::start_tracking_with_faults(blocks, chunk, buffer_bytes, WpTestFaults::default())
    }

    /// `start_tracking` with injected faults: for tests only.
    #[doc(hidden)]
    pub fn start_tracking_with_faults(
        blocks: Vec<WpBlock>,
        chunk: u64,
        buffer_bytes: u64,
        test: WpTestFaults,
    ) -> Result<WriteProtect, WpError> {
        Self::start_inner(blocks, chunk, buffer_bytes, PHASE_TRACK, test, None)
    }

    /// `start_tracking_with_faults` on a kept registration (see [`WriteProtect::start_on`]).
    pub fn start_tracking_on(
        kept: Option<WpRegistration>,
        blocks: Vec<WpBlock>,
        chunk: u64,
        buffer_bytes: u64,
        test: WpTestFaults,
    ) -> Result<WriteProtect, WpError> {
        Self::start_inner(blocks, chunk, buffer_bytes, PHASE_TRACK, test, kept)
    }

    /// Track phase: re-protects the chunks written since the last call (or since tracking
    /// started); returns how many. The VM may run.
    pub fn retrack(&self) -> Result<u64, WpError> {
        let s = &self.shared;
        s.check_failed()?;
        if s.phase.load(Ordering::Acquire) != PHASE_TRACK {
            return Err(WpError::Fault("retrack after the protection was armed".into()));
        }
        let mut n = 0;
        for (bi, b) in s.blocks.iter().enumerate() {
            let mut runs = Runs::new(s, bi);
            for (ci, st) in b.state.iter().enumerate() {
                // Only a marked chunk: the fault thread marks it after unprotecting it.
                if st.compare_exchange(REDIRTIED, PROTECTED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    runs.push(ci as u64, true)?;
                    n += 1;
                }
            }
            runs.flush()?;
        }
        s.undo_if_failed()?;
        s.track_rounds.fetch_add(1, Ordering::Relaxed);
        s.retracked.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// With the VM paused: makes the protected chunks exactly `want[i]` of block `i` (indexes
    /// as given to `start_tracking`; re-dirtied chunks and chunks new to the set are
    /// protected, chunks not wanted unprotected) and switches the fault thread to copy before
    /// write. Returns the chunks it protected. On an error the caller drops the protection,
    /// which unprotects everything.
    pub fn arm(&self, want: &[Vec<u64>]) -> Result<u64, WpError> {
        let s = &self.shared;
        // No track-phase fault is half handled while this runs.
        let phase = s.lock_phase();
        s.check_failed()?;
        if s.phase.load(Ordering::Acquire) != PHASE_TRACK {
            return Err(WpError::Fault("the protection was armed twice".into()));
        }
        let mut n = 0;
        for (bi, b) in s.blocks.iter().enumerate() {
            let mut wanted = vec![false; b.state.len()];
            for &c in want.get(bi).map(Vec::as_slice).unwrap_or_default() {
                if let Some(w) = wanted.get_mut(c as usize) {
                    *w = true;
                }
            }
            let mut runs = Runs::new(s, bi);
            for (ci, st) in b.state.iter().enumerate() {
                let ci = ci as u64;
                match (wanted[ci as usize], st.load(Ordering::Acquire)) {
                    (true, REDIRTIED) if s.test.arm_skips_redirtied => {
                        // The bug the tests must catch: marked protected, left writable.
                        st.store(PROTECTED, Ordering::Release);
                        runs.flush()?;
                    }
                    (true, REDIRTIED | DONE) => {
                        st.store(PROTECTED, Ordering::Release);
                        runs.push(ci, true)?;
                        n += 1;
                    }
                    (false, PROTECTED) => {
                        st.store(DONE, Ordering::Release);
                        runs.push(ci, false)?;
                    }
                    (false, _) => {
                        st.store(DONE, Ordering::Release);
                        runs.flush()?;
                    }
                    // Wanted and protected since its last write.
                    (true, _) => runs.flush()?,
                }
            }
            runs.flush()?;
        }
        s.phase.store(PHASE_COPY, Ordering::Release);
        drop(phase);
        s.undo_if_failed()?;
        s.armed.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}
