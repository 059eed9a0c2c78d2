//! The guest exit device: a guest ends its run by writing a status (1, 2 or 4 bytes,
//! little-endian) at offset 0. Mapped at port 0x501 and at an MMIO alias (for CPL3 code).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::BusDevice;

/// Told the status when the guest exits.
pub type ExitCallback = Arc<dyn Fn(u32) + Send + Sync>;

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
    status: Option<u32>,
}

impl ExitDevice {
    pub fn new(on_exit: ExitCallback) -> Self {
        ExitDevice {
            on_exit,
            status: None,
        }
    }

    /// The status the guest wrote, if it has.
    pub fn status(&self) -> Option<u32> {
        self.status
    }

    pub fn state(&self) -> ExitState {
        ExitState {
            status: self.status,
        }
    }

    pub fn restore(&mut self, s: &ExitState) -> Result<(), ExitError> {
        self.status = s.status;
        Ok(())
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || !matches!(data.len(), 1 | 2 | 4) {
            tracing::debug!(
                "exit device: ignoring a {}-byte write at offset {offset}",
                data.len()
            );
            return;
        }
        let status = data
            .iter()
            .rev()
            .fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        self.status = Some(status);
        (self.on_exit)(status);
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
        d.write(0x501, 0, &[1, 2, 3]);
        assert_eq!(*seen.lock().expect("lock"), vec![7, 0x1234, 0x8000_0001]);
        assert_eq!(
            d.state(),
            ExitState {
                status: Some(0x8000_0001)
            }
        );
        let mut b = [9u8; 4];
        d.read(0x501, 0, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
