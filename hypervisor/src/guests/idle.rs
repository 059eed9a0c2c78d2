//! `idle`: prints one line, then halts with interrupts off until the VMM stops it.

use iced_x86::code_asm::*;

use super::asm::{begin, print, Io, Strings};

pub const READY: &str = "idle guest ready\n";

pub fn emit(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let rt = begin(a, Io::Port)?;
    let mut strs = Strings::default();
    let ready = strs.add(a, READY);
    print(a, &rt, ready)?;
    let mut halt = a.create_label();
    a.cli()?;
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    strs.emit(a)
}
