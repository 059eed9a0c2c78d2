//! The guest exit device: a guest ends its run by writing a status (1, 2 or 4 bytes,
//! little-endian) at offset 0. Mapped at port 0x501 and at an MMIO alias (for CPL3 code).
//!
//! Two more registers serve benchmarks and tests: reading offset 4 gives the VMM's *go*
//! flag (1 once the VMM has set it), so a guest can wait for the VMM; writing a value at
//! offset 8 reports a progress *mark* to the VMM, which timestamps it.
//!
//! ```text
//! +0  write  exit status        +4  read  go flag        +8  write  progress mark
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
/// Bytes the device decodes.
pub const LEN: u64 = 12;

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
    go: Arc<AtomicBool>,
    status: Option<u32>,
}

impl ExitDevice {
    pub fn new(on_exit: ExitCallback) -> Self {
        ExitDevice { on_exit, on_mark: None, go: Arc::new(AtomicBool::new(false)), status: None }
    }

    /// Reports progress marks to `on_mark`.
    pub fn set_mark_callback(&mut self, on_mark: MarkCallback) {
        self.on_mark = Some(on_mark);
    }

    /// The go flag, for the VMM to set.
    pub fn go_flag(&self) -> Arc<AtomicBool> {
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
        if offset == REG_GO && self.go.load(Ordering::Acquire) {
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
}
