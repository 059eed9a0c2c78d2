//! A minimal PS/2 controller (i8042) at ports 0x60 (data) and 0x64 (status/command), and the
//! PC's system control port A at 0x92, enough for firmware to find a controller, test it,
//! reset the keyboard and reboot the machine.
//!
//! The controller answers its commands (read/write the configuration byte 0x20/0x60, self
//! test 0xaa -> 0x55, port tests 0xab/0xa9 -> 0, disable/enable ports 0xad/0xae/0xa7/0xa8,
//! write to the aux port 0xd4, output port 0xd0/0xd1, echo 0xd2/0xd3, pulse output lines
//! 0xf0-0xff where a low bit 0 resets the machine). Bytes written to port 0x60 that are not a
//! command's parameter go to the keyboard, which acknowledges each with 0xfa, answers reset
//! (0xff) with 0xfa 0xaa and identify (0xf2) with 0xfa 0xab 0x83. The aux port has a mouse
//! that answers as QEMU's does with no movement: 0xfa for every byte, reset -> 0xfa 0xaa 0x00,
//! identify -> 0xfa 0x00, status request (0xe9) -> 0xfa 0 0 0. Bytes from the aux port set
//! status bit 5, which SeaBIOS uses to tell them apart.
//!
//! No interrupts are raised: no key is ever pressed, and SeaBIOS (src/hw/ps2port.c) turns the
//! controller's interrupts off while it sends a command and polls for the answer, so every
//! byte the controller queues is one it is waiting for.
//!
//! Port 0x92: bit 1 is the A20 gate (stored; A20 is always on here), writing bit 0 as 1
//! resets the machine. Bit 0 always reads 0, so a read-modify-write of the A20 bit (SeaBIOS's
//! `set_a20`) never resets.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::BusDevice;

/// The data port.
pub const DATA_PORT: u64 = 0x60;
/// The status (read) and command (write) port.
pub const STATUS_PORT: u64 = 0x64;
/// System control port A.
pub const PORT_A: u64 = 0x92;

/// Status bits.
const STR_OBF: u8 = 0x01;
const STR_SYS: u8 = 0x04;
const STR_CMD: u8 = 0x08;
const STR_UNLOCKED: u8 = 0x10;
const STR_AUXDATA: u8 = 0x20;
/// Configuration byte bits.
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
/// Configuration byte at power-on (as QEMU's: both port interrupts on, system flag clear).
const CTR_RESET: u8 = 0x03;
/// Output port at power-on: reset line high (not in reset), A20 on.
const OUTPUT_RESET: u8 = 0x03;
/// Bytes the output queue holds; more are dropped.
pub const QUEUE_MAX: usize = 16;

const ACK: u8 = 0xfa;

/// Errors of the PS/2 controller.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum I8042Error {
    #[error("i8042 state queues {len} bytes, at most {QUEUE_MAX}")]
    Queue { len: usize },
    #[error("i8042 state waits for a parameter of unknown command {cmd:#x}")]
    Pending { cmd: u8 },
}

/// A queued output byte and whether it came from the aux port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutByte {
    pub data: u8,
    pub aux: bool,
}

/// The saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub ctr: u8,
    pub output_port: u8,
    /// Status bits the guest's accesses set (system flag, last write was a command).
    pub status: u8,
    /// Controller command waiting for its parameter byte on port 0x60.
    pub pending: Option<u8>,
    /// Keyboard command waiting for its parameter byte.
    pub kbd_pending: Option<u8>,
    pub queue: Vec<OutByte>,
    pub port_a: u8,
}

/// Called when the guest resets the machine.
pub type ResetCallback = Arc<dyn Fn() + Send + Sync>;

/// The controller, its keyboard and mouse, and port 0x92.
pub struct I8042 {
    ctr: u8,
    output_port: u8,
    status: u8,
    pending: Option<u8>,
    kbd_pending: Option<u8>,
    queue: VecDeque<OutByte>,
    port_a: u8,
    reset: ResetCallback,
}

/// Controller commands that take a parameter byte on port 0x60.
const PARAM_COMMANDS: [u8; 4] = [0x60, 0xd1, 0xd2, 0xd3];
/// The one with an aux-port parameter.
const CMD_AUX_SEND: u8 = 0xd4;
/// Keyboard commands that take a parameter byte.
const KBD_PARAM_COMMANDS: [u8; 3] = [0xed, 0xf0, 0xf3];

impl I8042 {
    pub fn new(reset: ResetCallback) -> Self {
        I8042 {
            ctr: CTR_RESET,
            output_port: OUTPUT_RESET,
            status: STR_UNLOCKED,
            pending: None,
            kbd_pending: None,
            queue: VecDeque::new(),
            port_a: 0x02,
            reset,
        }
    }

    pub fn state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            output_port: self.output_port,
            status: self.status,
            pending: self.pending,
            kbd_pending: self.kbd_pending,
            queue: self.queue.iter().copied().collect(),
            port_a: self.port_a,
        }
    }

    /// Takes `s` (untrusted) as the device's state.
    pub fn restore(&mut self, s: &I8042State) -> Result<(), I8042Error> {
        if s.queue.len() > QUEUE_MAX {
            return Err(I8042Error::Queue { len: s.queue.len() });
        }
        if let Some(cmd) = s.pending.filter(|c| !PARAM_COMMANDS.contains(c) && *c != CMD_AUX_SEND) {
            return Err(I8042Error::Pending { cmd });
        }
        if let Some(cmd) = s.kbd_pending.filter(|c| !KBD_PARAM_COMMANDS.contains(c)) {
            return Err(I8042Error::Pending { cmd });
        }
        self.ctr = s.ctr;
        self.output_port = s.output_port;
        self.status = s.status & (STR_SYS | STR_CMD | STR_UNLOCKED);
        self.pending = s.pending;
        self.kbd_pending = s.kbd_pending;
        self.queue = s.queue.iter().copied().collect();
        self.port_a = s.port_a & !1;
        Ok(())
    }

    fn push(&mut self, data: u8, aux: bool) {
        if self.queue.len() < QUEUE_MAX {
            self.queue.push_back(OutByte { data, aux });
        } else {
            tracing::debug!("i8042: output queue full, dropping {data:#x}");
        }
    }

    fn status(&self) -> u8 {
        let mut s = self.status;
        if let Some(b) = self.queue.front() {
            s |= STR_OBF;
            if b.aux {
                s |= STR_AUXDATA;
            }
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STR_CMD;
        self.pending = None;
        match cmd {
            0x20 => self.push(self.ctr, false),
            0xaa => {
                self.status |= STR_SYS;
                self.push(0x55, false);
            }
            0xab | 0xa9 => self.push(0x00, false),
            0xad => self.ctr |= CTR_KBDDIS,
            0xae => self.ctr &= !CTR_KBDDIS,
            0xa7 => self.ctr |= CTR_AUXDIS,
            0xa8 => self.ctr &= !CTR_AUXDIS,
            0xd0 => self.push(self.output_port, false),
            c if PARAM_COMMANDS.contains(&c) || c == CMD_AUX_SEND => self.pending = Some(c),
            c if c >= 0xf0 => {
                // Pulse output lines: bit 0 low pulses the reset line.
                if c & 1 == 0 {
                    tracing::info!("i8042: the guest pulsed the reset line");
                    (self.reset)();
                }
            }
            c => tracing::debug!("i8042: ignoring controller command {c:#x}"),
        }
    }

    fn data(&mut self, v: u8) {
        self.status &= !STR_CMD;
        match self.pending.take() {
            Some(0x60) => {
                self.ctr = v;
                self.status = (self.status & !STR_SYS) | if v & CTR_SYS != 0 { STR_SYS } else { 0 };
            }
            Some(0xd1) => {
                self.output_port = v;
                if v & 1 == 0 {
                    tracing::info!("i8042: the guest cleared the reset line in the output port");
                    (self.reset)();
                }
            }
            Some(0xd2) => self.push(v, false),
            Some(0xd3) => self.push(v, true),
            Some(CMD_AUX_SEND) => self.mouse(v),
            _ => self.keyboard(v),
        }
    }

    fn keyboard(&mut self, v: u8) {
        if self.kbd_pending.take().is_some() {
            self.push(ACK, false);
            return;
        }
        match v {
            0xff => {
                self.push(ACK, false);
                self.push(0xaa, false);
            }
            0xf2 => {
                self.push(ACK, false);
                self.push(0xab, false);
                self.push(0x83, false);
            }
            0xee => self.push(0xee, false),
            c => {
                if KBD_PARAM_COMMANDS.contains(&c) {
                    self.kbd_pending = Some(c);
                }
                self.push(ACK, false);
            }
        }
    }

    fn mouse(&mut self, v: u8) {
        self.push(ACK, true);
        match v {
            0xff => {
                self.push(0xaa, true);
                self.push(0x00, true);
            }
            0xf2 => self.push(0x00, true),
            0xe9 => {
                for _ in 0..3 {
                    self.push(0x00, true);
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        *b = match base {
            DATA_PORT => self.queue.pop_front().map_or(0, |o| o.data),
            STATUS_PORT => self.status(),
            PORT_A => self.port_a,
            _ => 0xff,
        };
    }

    fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match base {
            DATA_PORT => self.data(v),
            STATUS_PORT => self.command(v),
            PORT_A => {
                self.port_a = v & !1;
                if v & 1 != 0 {
                    tracing::info!("the guest reset the machine through port 0x92");
                    (self.reset)();
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "i8042_tests.rs"]
mod tests;
