//! The debug console on port 0x402 (QEMU's `isa-debugcon` as firmware expects it): reading
//! the port gives 0xe9, which is how SeaBIOS tells that a debug console exists; every byte the
//! guest writes there goes to the sink, unchanged. A write of several bytes (`outw`, `outl`,
//! `rep outsb`) passes every byte on, lowest address first.
//!
//! The device counts what it passed on; that count is its saved state, so a restored VM's log
//! continues where the snapshot's stopped (the bytes themselves belong to the file, not to
//! the VM).

use std::io::Write;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::BusDevice;

/// What a read of the port returns.
pub const READBACK: u8 = 0xe9;
/// Ports the device decodes.
pub const LEN: u64 = 1;

/// Errors of the debug console.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DebugconError {}

/// The saved state: bytes written so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugconState {
    pub written: u64,
}

/// The debug console.
pub struct Debugcon {
    out: Option<Box<dyn Write + Send>>,
    written: u64,
    failed: bool,
}

impl Debugcon {
    /// A console writing to `out`, or dropping what it gets when there is none.
    pub fn new(out: Option<Box<dyn Write + Send>>) -> Self {
        Debugcon { out, written: 0, failed: false }
    }

    pub fn state(&self) -> DebugconState {
        DebugconState { written: self.written }
    }

    pub fn restore(&mut self, s: &DebugconState) -> Result<(), DebugconError> {
        self.written = s.written;
        Ok(())
    }
}

impl BusDevice for Debugcon {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = READBACK;
        }
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        self.written += data.len() as u64;
        let Some(out) = self.out.as_mut() else { return };
        // Firmware logs a line at a time; flush at each newline so a reader sees whole lines.
        let res = out.write_all(data).and_then(|()| if data.contains(&b'\n') { out.flush() } else { Ok(()) });
        if let Err(e) = res {
            if !self.failed {
                tracing::warn!("debug console: writing the guest's output failed, dropping the rest: {e}");
                self.failed = true;
            }
            self.out = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reads_e9_and_passes_every_byte_on() {
        let sink = Sink::default();
        let mut d = Debugcon::new(Some(Box::new(sink.clone())));
        let mut b = [0u8; 2];
        d.read(0x402, 0, &mut b);
        assert_eq!(b, [0xe9, 0]);
        d.write(0x402, 0, b"Se");
        d.write(0x402, 0, b"a\n");
        assert_eq!(&*sink.0.lock().expect("lock"), b"Sea\n");
        assert_eq!(d.state(), DebugconState { written: 4 });
        let mut e = Debugcon::new(None);
        e.restore(&d.state()).expect("restore");
        e.write(0x402, 0, b"x");
        assert_eq!(e.state().written, 5);
    }
}
