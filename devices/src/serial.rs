//! COM1: vm-superio's 8250 UART as a bus device, raising its interrupt through an eventfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The UART's interrupt line: an eventfd the hypervisor wires to an irqfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}

type Uart = Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// Errors of the serial device.
#[derive(Debug, Error)]
pub enum SerialError {
    #[error("serial state holds {len} input bytes, the FIFO holds {max}")]
    FifoOverflow { len: usize, max: usize },
    #[error("serial device: {0}")]
    Device(String),
}

/// The saved state of the UART's registers and input FIFO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The 8250 UART.
pub struct SerialDevice {
    uart: Uart,
    /// Whether an output error was already logged (the guest keeps writing; log it once).
    output_failed: bool,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice { uart: Serial::new(EventFdTrigger(irq), out), output_failed: false }
    }

    /// Queues input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize, SerialError> {
        self.uart.enqueue_raw_bytes(input).map_err(|e| SerialError::Device(format!("{e:?}")))
    }

    pub fn state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Replaces the registers and FIFO with `state` (untrusted), keeping the output and
    /// interrupt line.
    pub fn restore(&mut self, state: &SerialDeviceState) -> Result<(), SerialError> {
        let max = self.uart.fifo_capacity() + self.uart.state().in_buffer.len();
        if state.in_buffer.len() > max.max(64) {
            return Err(SerialError::FifoOverflow { len: state.in_buffer.len(), max: max.max(64) });
        }
        let trigger = self.uart.interrupt_evt().try_clone().map_err(|e| SerialError::Device(e.to_string()))?;
        let placeholder_trigger =
            self.uart.interrupt_evt().try_clone().map_err(|e| SerialError::Device(e.to_string()))?;
        let old = std::mem::replace(&mut self.uart, Serial::new(placeholder_trigger, Box::new(std::io::sink())));
        let st = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        self.uart = Serial::from_state(&st, trigger, NoEvents, old.into_writer())
            .map_err(|e| SerialError::Device(format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if off < 8 => data[0] = self.uart.read(off),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // Byte accesses only; wider ones (as from a 32-bit MMIO store) use their low byte.
        if let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) {
            if off < 8 {
                if let Err(e) = self.uart.write(off, v) {
                    if !self.output_failed {
                        tracing::warn!("serial: write of {v:#x} to register {off}: {e:?} (further errors not logged)");
                        self.output_failed = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, Out, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let out = Out::default();
        (SerialDevice::new(irq.try_clone().expect("clone"), Box::new(out.clone())), out, irq)
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut d, out, _irq) = device();
        for c in b"hi" {
            d.write(0x3f8, 0, &[*c]);
        }
        assert_eq!(out.0.lock().expect("lock").as_slice(), b"hi");
    }

    #[test]
    fn state_round_trips_and_keeps_output() {
        let (mut d, out, irq) = device();
        d.write(0, 7, &[0x5a]); // scratch register
        d.write(0, 1, &[0x01]); // enable RX interrupt
        d.enqueue_input(b"ab").expect("input");
        let s = d.state();
        assert_eq!(s.scratch, 0x5a);
        let (mut d2, out2, _irq2) = device();
        d2.restore(&s).expect("restore");
        assert_eq!(d2.state(), s);
        let mut b = [0u8];
        d2.read(0, 0, &mut b);
        assert_eq!(b[0], b'a');
        d2.write(0, 0, b"x");
        assert_eq!(out2.0.lock().expect("lock").as_slice(), b"x");
        assert!(out.0.lock().expect("lock").is_empty());
        assert!(irq.read().is_ok(), "the interrupt fired for the queued input");
    }

    #[test]
    fn an_oversized_fifo_is_refused() {
        let (mut d, _, _) = device();
        let mut s = d.state();
        s.in_buffer = vec![0; 4096];
        assert!(matches!(d.restore(&s), Err(SerialError::FifoOverflow { .. })));
        d.write(0, 0, b"y");
    }
}
