//! The guest exit device: a guest ends its run by writing a status (1, 2 or 4 bytes,
//! little-endian) at offset 0. Mapped at port 0x501 and at an MMIO alias (for CPL3 code).
//!
//! Three more registers serve benchmarks and tests: reading offset 4 gives the VMM's *go*
//! flag (1 once the VMM has set it), so a guest can wait for the VMM; writing a value at
//! offset 8 reports a progress *mark* to the VMM, which timestamps it; reading offset 12
//! (*wait*) gives the go flag too, but parks the reading vCPU thread in the VMM until the go
//! arrives, the VM is asked to pause or stop (the [`ExitDevice::set_wait_while`] predicate
//! turns false), or [`WAIT_MAX`] has passed, whichever is first.
//!
//! ```text
//! +0  write  exit status    +4  read  go flag    +8  write  progress mark    +12 read  wait (MMIO only)
//! ```
//!
//! Why *wait*: a CPL3 guest cannot halt on this machine's KVM (HLT faults), so a guest that
//! polled *go* took an MMIO exit per poll and kept a host core busy for as long as it waited:
//! a hundred waiting clones queued every restore behind them. A read of *wait* costs one exit
//! per [`WAIT_MAX`] at most, and the go wakes the waiter at once ([`Go::store`] notifies).
//! The bound keeps a lost wake-up harmless: the guest reads *wait* again in its loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::BusDevice;

/// Told the status when the guest exits.
pub type ExitCallback = Arc<dyn Fn(u32) + Send + Sync>;
/// Told each progress mark.
pub type MarkCallback = Arc<dyn Fn(u32) + Send + Sync>;

/// Register offsets.
pub const REG_STATUS: u64 = 0;
pub const REG_GO: u64 = 4;
pub const REG_MARK: u64 = 8;
pub const REG_WAIT: u64 = 12;
/// Bytes the device decodes on the port bus (fw_cfg follows at 0x510: no room for *wait*).
pub const LEN: u64 = 12;
/// Bytes the device decodes at its MMIO alias: with *wait*, which CPL3 guests read.
pub const MMIO_LEN: u64 = 16;
/// The longest a read of [`REG_WAIT`] parks its vCPU thread.
pub const WAIT_MAX: Duration = Duration::from_millis(100);

/// Told whether a vCPU parked in a read of [`REG_WAIT`] may keep waiting (false once its VM
/// is pausing or stopping).
pub type WaitWhile = Arc<dyn Fn() -> bool + Send + Sync>;

/// The go flag: set by the VMM, read (or waited for) by the guest. Its `load` and `store`
/// mirror `AtomicBool`'s; `store` also wakes the vCPUs parked in [`REG_WAIT`].
///
/// Lock order: `lock` is taken last (a waiter's predicate must be lock-free; [`Go::wake`]
/// may be called with other locks held).
#[derive(Default)]
pub struct Go {
    flag: AtomicBool,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Go {
    pub fn load(&self, order: Ordering) -> bool {
        self.flag.load(order)
    }

    /// Sets the flag and wakes every waiter.
    pub fn store(&self, value: bool, order: Ordering) {
        self.flag.store(value, order);
        self.wake();
    }

    /// Wakes every waiter so it looks at the flag and its predicate again.
    pub fn wake(&self) {
        // Taken so that a waiter between its checks and its wait cannot miss the notify.
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.changed.notify_all();
    }

    /// Waits until the flag is set (true), `keep_waiting` returns false, or `max` has passed
    /// (false for both). `keep_waiting` is called with this flag's lock held: it must not
    /// block or take a lock that is held while calling [`Go::wake`].
    pub fn wait(&self, keep_waiting: &dyn Fn() -> bool, max: Duration) -> bool {
        let deadline = Instant::now() + max;
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if self.flag.load(Ordering::Acquire) {
                return true;
            }
            let now = Instant::now();
            if !keep_waiting() || now >= deadline {
                return false;
            }
            g = self.changed.wait_timeout(g, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// Errors of the exit device.
#[derive(Debug, Error)]
pub enum ExitError {}

/// The exit device's saved state: the status written so far, if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitState {
    pub status: Option<u32>,
}

pub struct ExitDevice {
    on_exit: ExitCallback,
    on_mark: Option<MarkCallback>,
    go: Arc<Go>,
    /// None: a read of [`REG_WAIT`] does not park (nothing could interrupt it for a pause).
    wait_while: Option<WaitWhile>,
    status: Option<u32>,
}

impl ExitDevice {
    pub fn new(on_exit: ExitCallback) -> Self {
        ExitDevice { on_exit, on_mark: None, go: Arc::new(Go::default()), wait_while: None, status: None }
    }

    /// Lets reads of [`REG_WAIT`] park while `keep_waiting` holds; whoever makes it false must
    /// then call [`Go::wake`] on [`ExitDevice::go_flag`].
    pub fn set_wait_while(&mut self, keep_waiting: WaitWhile) {
        self.wait_while = Some(keep_waiting);
    }

    /// Reports progress marks to `on_mark`.
    pub fn set_mark_callback(&mut self, on_mark: MarkCallback) {
        self.on_mark = Some(on_mark);
    }

    /// The go flag, for the VMM to set.
    pub fn go_flag(&self) -> Arc<Go> {
        self.go.clone()
    }

    /// The status the guest wrote, if it has.
    pub fn status(&self) -> Option<u32> {
        self.status
    }

    pub fn state(&self) -> ExitState {
        ExitState { status: self.status }
    }

    pub fn restore(&mut self, s: &ExitState) -> Result<(), ExitError> {
        self.status = s.status;
        Ok(())
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let go = match (offset, &self.wait_while) {
            (REG_GO, _) | (REG_WAIT, None) => self.go.load(Ordering::Acquire),
            (REG_WAIT, Some(keep_waiting)) => self.go.wait(keep_waiting.as_ref(), WAIT_MAX),
            _ => false,
        };
        if go {
            if let Some(b) = data.first_mut() {
                *b = 1;
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 1 | 2 | 4) {
            tracing::debug!("exit device: ignoring a {}-byte write at offset {offset}", data.len());
            return;
        }
        let value = data.iter().rev().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        match offset {
            REG_STATUS => {
                self.status = Some(value);
                (self.on_exit)(value);
            }
            REG_MARK => {
                if let Some(cb) = &self.on_mark {
                    cb(value);
                }
            }
            _ => tracing::debug!("exit device: ignoring a write of {value:#x} at offset {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn writes_report_the_status() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut d = ExitDevice::new(Arc::new(move |v| s.lock().expect("lock").push(v)));
        d.write(0x501, 0, &[7]);
        d.write(0x501, 0, &[0x34, 0x12]);
        d.write(0x501, 0, &[1, 0, 0, 0x80]);
        d.write(0x501, 1, &[9]);
        d.write(0x501, 8, &[5]);
        d.write(0x501, 0, &[1, 2, 3]);
        assert_eq!(*seen.lock().expect("lock"), vec![7, 0x1234, 0x8000_0001]);
        assert_eq!(d.state(), ExitState { status: Some(0x8000_0001) });
        let mut b = [9u8; 4];
        d.read(0x501, 0, &mut b);
        assert_eq!(b, [0; 4]);
        d.read(0x501, REG_GO, &mut b);
        assert_eq!(b[0], 0);
        d.go_flag().store(true, Ordering::Release);
        d.read(0x501, REG_GO, &mut b);
        assert_eq!(b[0], 1);
    }

    #[test]
    fn marks_reach_the_callback() {
        let marks = Arc::new(Mutex::new(Vec::new()));
        let m = marks.clone();
        let mut d = ExitDevice::new(Arc::new(|_| {}));
        d.set_mark_callback(Arc::new(move |v| m.lock().expect("lock").push(v)));
        d.write(0, REG_MARK, &[2, 0, 0, 0]);
        d.write(0, REG_MARK, &[3]);
        assert_eq!(*marks.lock().expect("lock"), vec![2, 3]);
        assert_eq!(d.status(), None);
    }

    /// Long enough that a waiter not woken by a notify shows, whatever the load.
    const LONG: Duration = Duration::from_secs(20);

    #[test]
    fn the_go_wakes_a_waiter_at_once() {
        let go = Arc::new(Go::default());
        let g = go.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            g.store(true, Ordering::Release);
        });
        let t0 = Instant::now();
        let got = go.wait(&|| true, LONG);
        let waited = t0.elapsed();
        setter.join().expect("setter");
        assert!(got, "the go was set");
        assert!(waited >= Duration::from_millis(25), "returned before the go, after {waited:?}");
        assert!(waited < LONG / 2, "the go did not wake the waiter: it waited {waited:?}");
    }

    #[test]
    fn a_wake_ends_the_wait_once_the_predicate_fails() {
        let go = Arc::new(Go::default());
        let running = Arc::new(AtomicBool::new(true));
        let (g, r) = (go.clone(), running.clone());
        let pauser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            r.store(false, Ordering::Release);
            g.wake();
        });
        let t0 = Instant::now();
        let got = go.wait(&|| running.load(Ordering::Acquire), LONG);
        let waited = t0.elapsed();
        pauser.join().expect("pauser");
        assert!(!got, "no go was given");
        assert!(waited >= Duration::from_millis(25), "returned before the pause, after {waited:?}");
        assert!(waited < LONG / 2, "the wake did not end the wait: it waited {waited:?}");
    }

    #[test]
    fn the_wait_register_parks_for_the_go() {
        let mut d = ExitDevice::new(Arc::new(|_| {}));
        let mut b = [9u8; 4];
        // Nothing could wake a parked vCPU for a pause: no parking.
        d.read(0, REG_WAIT, &mut b);
        assert_eq!(b, [0; 4]);
        d.set_wait_while(Arc::new(|| true));
        let t0 = Instant::now();
        d.read(0, REG_WAIT, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(t0.elapsed() >= WAIT_MAX, "the wait ended before its bound with no go and no pause");
        let go = d.go_flag();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            go.store(true, Ordering::Release);
        });
        let t0 = Instant::now();
        d.read(0, REG_WAIT, &mut b);
        setter.join().expect("setter");
        assert_eq!(b, [1, 0, 0, 0], "the wait register gives the go");
        assert!(t0.elapsed() >= Duration::from_millis(25), "the read returned before the go");
    }
}
