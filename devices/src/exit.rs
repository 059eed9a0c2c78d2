//! The guest exit device: a guest ends its run by writing a status (1, 2 or 4 bytes,
//! little-endian) at offset 0. Mapped at port 0x501 and at an MMIO alias (for CPL3 code).
//!
//! Four more registers serve benchmarks and tests: reading offset 4 gives the VMM's *go*
//! flag (1 once the VMM has set it), so a guest can wait for the VMM; writing a value at
//! offset 8 reports a progress *mark* to the VMM, which timestamps it; reading offset 12
//! (*wait*) gives the go flag too, but parks the reading vCPU thread in the VMM until the go
//! arrives, the VM is asked to pause or stop (the [`ExitDevice::set_wait_while`] predicate
//! turns false), or [`WAIT_MAX`] has passed, whichever is first; reading offset 16
//! (*interrupt wait*) parks the same way until a device of the VM raises an interrupt that
//! has no MSI-X vector to go to (the VM's interrupt line, [`ExitDevice::set_irq_line`]), and
//! gives 1 if one was raised (consuming it: the next read waits for the next one), 0 after a
//! pause, a stop or [`WAIT_MAX`].
//!
//! ```text
//! +0  write  exit status    +4  read  go flag    +8  write  progress mark
//! +12 read   wait for go (MMIO only)             +16 read   wait for an interrupt (MMIO only)
//! ```
//!
//! Why *wait*: a CPL3 guest cannot halt on this machine's KVM (HLT faults), so a guest that
//! polled *go* took an MMIO exit per poll and kept a host core busy for as long as it waited:
//! a hundred waiting clones queued every restore behind them. A read of *wait* costs one exit
//! per [`WAIT_MAX`] at most, and the go wakes the waiter at once ([`Go::store`] notifies).
//! The bound keeps a lost wake-up harmless: the guest reads *wait* again in its loop.
//!
//! Why *interrupt wait*: it is the halt of an interrupt-driven guest for CPL3 code, which can
//! take no interrupts here. netping's receive loop polls its used ring while frames come,
//! then clears `VRING_AVAIL_F_NO_INTERRUPT`, looks at the ring once more and reads this
//! register, as a NAPI driver re-enables its interrupt and halts; it does not spin on a host
//! core the device's I/O thread needs. The device raises its queue interrupt after it
//! publishes used entries, and only if the driver has not suppressed it; with MSI-X disabled
//! that interrupt sets the VM's line (what an INTx line and the ISR bit would be).
//!
//! Parking never holds the device's lock (see [`crate::latch`]): while one vCPU waits here,
//! another's exit status, marks and reads go through at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::BusDevice;
pub use crate::latch::WaitWhile;
use crate::latch::{Latch, Park};

/// Told the status when the guest exits.
pub type ExitCallback = Arc<dyn Fn(u32) + Send + Sync>;
/// Told each progress mark.
pub type MarkCallback = Arc<dyn Fn(u32) + Send + Sync>;

/// Register offsets.
pub const REG_STATUS: u64 = 0;
pub const REG_GO: u64 = 4;
pub const REG_MARK: u64 = 8;
pub const REG_WAIT: u64 = 12;
pub const REG_IRQ_WAIT: u64 = 16;
/// Bytes the device decodes on the port bus (fw_cfg follows at 0x510: no room for *wait*).
pub const LEN: u64 = 12;
/// Bytes the device decodes at its MMIO alias: with the two waits, which CPL3 guests read.
pub const MMIO_LEN: u64 = 20;
/// The longest a read of [`REG_WAIT`] or [`REG_IRQ_WAIT`] parks its vCPU thread.
pub const WAIT_MAX: Duration = Duration::from_millis(100);

/// The go flag: set by the VMM, read (or waited for) by the guest. `store(true, _)` wakes the
/// vCPUs parked in [`REG_WAIT`].
pub type Go = Latch;

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
    /// The VM's interrupt line, for [`REG_IRQ_WAIT`]; None: no device raises it.
    irq_line: Option<Arc<Latch>>,
    /// None: reads of [`REG_WAIT`] and [`REG_IRQ_WAIT`] do not park (nothing could interrupt
    /// them for a pause).
    wait_while: Option<WaitWhile>,
    /// How long a parked read waits at most ([`WAIT_MAX`]).
    wait_max: Duration,
    /// The park the last read asked for, for the bus to run ([`BusDevice::take_park`]).
    park: Option<Park>,
    status: Option<u32>,
}

impl ExitDevice {
    pub fn new(on_exit: ExitCallback) -> Self {
        ExitDevice {
            on_exit,
            on_mark: None,
            go: Arc::new(Go::default()),
            irq_line: None,
            wait_while: None,
            wait_max: WAIT_MAX,
            park: None,
            status: None,
        }
    }

    /// Lets reads of [`REG_WAIT`] and [`REG_IRQ_WAIT`] park while `keep_waiting` holds;
    /// whoever makes it false must then call [`Latch::wake`] on the go flag and on the
    /// interrupt line.
    pub fn set_wait_while(&mut self, keep_waiting: WaitWhile) {
        self.wait_while = Some(keep_waiting);
    }

    /// The VM's interrupt line, which reads of [`REG_IRQ_WAIT`] wait for and consume.
    pub fn set_irq_line(&mut self, line: Arc<Latch>) {
        self.irq_line = Some(line);
    }

    /// Bounds parked reads by `max` instead of [`WAIT_MAX`] (tests that must tell a parked
    /// read from one that timed out).
    pub fn set_wait_max(&mut self, max: Duration) {
        self.wait_max = max;
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
        self.park = None;
        let set = match (offset, &self.wait_while, &self.irq_line) {
            (REG_GO, _, _) | (REG_WAIT, None, _) => self.go.load(Ordering::Acquire),
            (REG_WAIT, Some(keep_waiting), _) => {
                self.park = Some(Park::wait(self.go.clone(), keep_waiting.clone(), self.wait_max));
                false
            }
            (REG_IRQ_WAIT, None, Some(line)) => line.take(),
            (REG_IRQ_WAIT, Some(keep_waiting), Some(line)) => {
                self.park = Some(Park::wait_take(line.clone(), keep_waiting.clone(), self.wait_max));
                false
            }
            _ => false,
        };
        if set {
            if let Some(b) = data.first_mut() {
                *b = 1;
            }
        }
    }

    fn take_park(&mut self) -> Option<Park> {
        self.park.take()
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
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use std::time::Instant;

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

    /// The device on a bus at 0, as the machine maps it (parks run by the bus).
    fn on_bus(d: ExitDevice) -> (crate::bus::Bus, Arc<Mutex<ExitDevice>>) {
        let bus = crate::bus::Bus::new();
        let d = Arc::new(Mutex::new(d));
        bus.insert(d.clone(), 0, MMIO_LEN).expect("insert");
        (bus, d)
    }

    fn read(bus: &crate::bus::Bus, offset: u64) -> [u8; 4] {
        let mut b = [9u8; 4];
        bus.read(offset, &mut b).expect("read");
        b
    }

    #[test]
    fn the_wait_register_parks_for_the_go() {
        let d = ExitDevice::new(Arc::new(|_| {}));
        let go = d.go_flag();
        let (bus, d) = on_bus(d);
        // Nothing could wake a parked vCPU for a pause: no parking.
        assert_eq!(read(&bus, REG_WAIT), [0; 4]);
        d.lock().expect("lock").set_wait_while(Arc::new(|| true));
        let t0 = Instant::now();
        assert_eq!(read(&bus, REG_WAIT), [0; 4]);
        assert!(t0.elapsed() >= WAIT_MAX, "the wait ended before its bound with no go and no pause");
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            go.store(true, Ordering::Release);
        });
        let t0 = Instant::now();
        let b = read(&bus, REG_WAIT);
        setter.join().expect("setter");
        assert_eq!(b, [1, 0, 0, 0], "the wait register gives the go");
        assert!(t0.elapsed() >= Duration::from_millis(25), "the read returned before the go");
    }

    #[test]
    fn the_interrupt_wait_register_parks_until_the_line_is_raised_and_consumes_it() {
        let line = Arc::new(Latch::default());
        let mut d = ExitDevice::new(Arc::new(|_| {}));
        d.set_irq_line(line.clone());
        let (bus, d) = on_bus(d);
        // Without a way to end the park for a pause, the read only takes the line.
        assert_eq!(read(&bus, REG_IRQ_WAIT), [0; 4]);
        line.set();
        assert_eq!(read(&bus, REG_IRQ_WAIT), [1, 0, 0, 0]);
        assert_eq!(read(&bus, REG_IRQ_WAIT), [0; 4], "the read consumed the interrupt");
        // The port alias has no room for it.
        const { assert!(REG_IRQ_WAIT >= LEN) };

        let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let r = running.clone();
        {
            let mut d = d.lock().expect("lock");
            d.set_wait_while(Arc::new(move || r.load(Ordering::Acquire)));
            d.set_wait_max(LONG);
        }
        let bus = Arc::new(bus);
        let b2 = bus.clone();
        let reader = std::thread::spawn(move || read(&b2, REG_IRQ_WAIT));
        until("the read parking", || line.waiters() == 1);
        line.set();
        assert_eq!(reader.join().expect("reader"), [1, 0, 0, 0], "the interrupt woke the parked read");
        assert!(!line.load(Ordering::SeqCst), "and was consumed");

        // A pause (the predicate false, then a wake) ends the park with 0.
        let b2 = bus.clone();
        let reader = std::thread::spawn(move || {
            let t0 = Instant::now();
            (read(&b2, REG_IRQ_WAIT), t0.elapsed())
        });
        until("the read parking", || line.waiters() == 1);
        running.store(false, Ordering::Release);
        line.wake();
        let (b, waited) = reader.join().expect("reader");
        assert_eq!(b, [0; 4]);
        assert!(waited < LONG / 2, "the pause did not end the park: it waited {waited:?}");
    }

    /// A guest's misuse of the interrupt-wait register: a write neither raises nor takes the
    /// line, an unaligned read inside it neither parks nor takes it, and a 1-byte read takes it
    /// like a 4-byte one. Fails if a write or a stray offset reaches the line.
    #[test]
    fn the_interrupt_wait_register_ignores_writes_and_stray_reads() {
        let line = Arc::new(Latch::default());
        let mut d = ExitDevice::new(Arc::new(|_| {}));
        d.set_irq_line(line.clone());
        d.set_wait_while(Arc::new(|| true));
        d.set_wait_max(LONG);
        let (bus, _d) = on_bus(d);
        bus.write(REG_IRQ_WAIT, &[1, 0, 0, 0]).expect("write");
        assert!(!line.load(Ordering::SeqCst), "a write raised the line");
        line.set();
        bus.write(REG_IRQ_WAIT, &[0, 0, 0, 0]).expect("write");
        assert!(line.load(Ordering::SeqCst), "a write took the line");
        for off in REG_IRQ_WAIT + 1..MMIO_LEN {
            let mut b = [9u8; 1];
            bus.read(off, &mut b).expect("read");
            assert_eq!(b, [0], "offset {off}");
            assert!(line.load(Ordering::SeqCst), "a read at offset {off} took the line");
        }
        let mut b = [9u8; 1];
        bus.read(REG_IRQ_WAIT, &mut b).expect("read");
        assert_eq!(b, [1], "a 1-byte read gives the interrupt");
        assert!(!line.load(Ordering::SeqCst), "and takes it");
    }

    #[test]
    fn a_parked_read_does_not_hold_the_device_for_other_accesses() {
        let marks = Arc::new(Mutex::new(Vec::new()));
        let m = marks.clone();
        let mut d = ExitDevice::new(Arc::new(|_| {}));
        d.set_mark_callback(Arc::new(move |v| m.lock().expect("lock").push(v)));
        d.set_wait_while(Arc::new(|| true));
        d.set_wait_max(LONG);
        let go = d.go_flag();
        let (bus, _d) = on_bus(d);
        let bus = Arc::new(bus);
        let b2 = bus.clone();
        let first = std::thread::spawn(move || read(&b2, REG_WAIT));
        until("the first read parking", || go.waiters() == 1);
        // A second vCPU: a mark and a read of the go flag.
        let (tx, rx) = std::sync::mpsc::channel();
        let b2 = bus.clone();
        let second = std::thread::spawn(move || {
            b2.write(REG_MARK, &[7, 0, 0, 0]).expect("write");
            let _ = tx.send(read(&b2, REG_GO));
        });
        let got = rx.recv_timeout(LONG / 2);
        let still_parked = go.waiters() == 1;
        go.store(true, Ordering::Release);
        assert_eq!(first.join().expect("first"), [1, 0, 0, 0]);
        second.join().expect("second");
        assert_eq!(got, Ok([0, 0, 0, 0]), "the second access waited for the first's park to end");
        assert!(still_parked, "the first read stopped parking before the second access completed");
        assert_eq!(*marks.lock().expect("lock"), vec![7]);
    }

    fn until(what: &str, f: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < LONG, "{what} did not happen");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
