//! `hello`: one line on COM1, exit status 0.

use iced_x86::code_asm::*;

use super::asm::{begin, print, Io, Strings};

/// The line `hello` prints.
pub const GREETING: &str = "Hello from the snapvisor hello guest\n";

pub fn emit(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let rt = begin(a, Io::Port)?;
    let mut strs = Strings::default();
    let greeting = strs.add(a, GREETING);
    print(a, &rt, greeting)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)?;
    strs.emit(a)
}
