//! A tiny runtime shared by the built-in guests: console output and exit, emitted into a
//! guest's code with iced-x86's assembler.
//!
//! Two flavours: at CPL0 the guest talks to the serial port and exit device with port I/O;
//! at CPL3 (where port I/O faults on some hosts) it uses their MMIO aliases.
//!
//! Calling convention of the routines: `putc` prints AL; `puts` prints the NUL-terminated
//! string at RSI; `put_hex` prints RAX as `0x…` without leading zeros; `put_dec` prints RAX
//! in decimal; `exit` ends the guest with status EAX. All preserve every register but RAX,
//! RSI and flags; each needs a stack.

use iced_x86::code_asm::*;

use crate::layout;

/// How the guest reaches its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    Port,
    Mmio,
}

/// Labels of the emitted routines.
pub struct Runtime {
    pub putc: CodeLabel,
    pub puts: CodeLabel,
    pub put_hex: CodeLabel,
    pub put_dec: CodeLabel,
    pub exit: CodeLabel,
}

/// Starts a guest: a jump over the runtime, the runtime, and the label the guest's own code
/// follows. Returns the runtime's labels.
pub fn begin(a: &mut CodeAssembler, io: Io) -> Result<Runtime, IcedError> {
    let mut main = a.create_label();
    a.jmp(main)?;
    let rt = emit_runtime(a, io)?;
    a.set_label(&mut main)?;
    Ok(rt)
}

/// Emits the runtime at the current position of `a` (the routines are only reached by `call`).
fn emit_runtime(a: &mut CodeAssembler, io: Io) -> Result<Runtime, IcedError> {
    let mut rt = Runtime {
        putc: a.create_label(),
        puts: a.create_label(),
        put_hex: a.create_label(),
        put_dec: a.create_label(),
        exit: a.create_label(),
    };

    a.set_label(&mut rt.putc)?;
    match io {
        Io::Port => {
            a.push(rdx)?;
            a.mov(dx, u32::from(layout::SERIAL_PORT))?;
            a.out(dx, al)?;
            a.pop(rdx)?;
        }
        Io::Mmio => {
            a.push(rbx)?;
            a.mov(rbx, layout::SERIAL_MMIO)?;
            a.mov(byte_ptr(rbx), al)?;
            a.pop(rbx)?;
        }
    }
    a.ret()?;

    a.set_label(&mut rt.puts)?;
    let mut done = a.create_label();
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.call(rt.putc)?;
    a.inc(rsi)?;
    a.jmp(rt.puts)?;
    a.set_label(&mut done)?;
    a.ret()?;

    // put_hex: r9 = value, ecx = shift, r8d = "a digit was printed".
    a.set_label(&mut rt.put_hex)?;
    for r in [rcx, r8, r9] {
        a.push(r)?;
    }
    a.mov(r9, rax)?;
    a.mov(al, b'0' as u32)?;
    a.call(rt.putc)?;
    a.mov(al, b'x' as u32)?;
    a.call(rt.putc)?;
    a.mov(ecx, 60u32)?;
    a.xor(r8d, r8d)?;
    let mut digit = a.create_label();
    let mut emit = a.create_label();
    let mut skip = a.create_label();
    let mut dec = a.create_label();
    let mut out = a.create_label();
    a.set_label(&mut digit)?;
    a.mov(rax, r9)?;
    a.shr(rax, cl)?;
    a.and(eax, 0xfu32)?;
    a.test(r8d, r8d)?;
    a.jnz(emit)?;
    a.test(eax, eax)?;
    a.jnz(emit)?;
    a.test(ecx, ecx)?;
    a.jnz(skip)?;
    a.set_label(&mut emit)?;
    a.mov(r8d, 1u32)?;
    a.cmp(al, 10u32)?;
    a.jb(dec)?;
    a.add(al, (b'a' - 10) as u32)?;
    a.jmp(out)?;
    a.set_label(&mut dec)?;
    a.add(al, b'0' as u32)?;
    a.set_label(&mut out)?;
    a.call(rt.putc)?;
    a.set_label(&mut skip)?;
    a.sub(ecx, 4u32)?;
    a.jns(digit)?;
    for r in [r9, r8, rcx] {
        a.pop(r)?;
    }
    a.ret()?;

    // put_dec: push digits (as characters) then pop and print them; r8 counts.
    a.set_label(&mut rt.put_dec)?;
    for r in [rcx, rdx, r8] {
        a.push(r)?;
    }
    a.xor(r8d, r8d)?;
    a.mov(ecx, 10u32)?;
    let mut divide = a.create_label();
    let mut print = a.create_label();
    a.set_label(&mut divide)?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.add(edx, b'0' as u32)?;
    a.push(rdx)?;
    a.inc(r8)?;
    a.test(rax, rax)?;
    a.jnz(divide)?;
    a.set_label(&mut print)?;
    a.pop(rax)?;
    a.call(rt.putc)?;
    a.dec(r8)?;
    a.jnz(print)?;
    for r in [r8, rdx, rcx] {
        a.pop(r)?;
    }
    a.ret()?;

    a.set_label(&mut rt.exit)?;
    match io {
        Io::Port => {
            a.mov(dx, u32::from(layout::EXIT_PORT))?;
            a.out(dx, eax)?;
        }
        Io::Mmio => {
            a.mov(rbx, layout::EXIT_MMIO)?;
            a.mov(dword_ptr(rbx), eax)?;
        }
    }
    // The VMM stops the vCPU on the exit write; should it ever come back, spin.
    let mut spin = a.create_label();
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(spin)?;
    Ok(rt)
}

/// String constants of a guest: labels handed out while emitting code, bytes emitted at the end.
#[derive(Default)]
pub struct Strings {
    pending: Vec<(CodeLabel, String)>,
}

impl Strings {
    /// A label that will point at `s`, NUL-terminated.
    pub fn add(&mut self, a: &mut CodeAssembler, s: &str) -> CodeLabel {
        let l = a.create_label();
        self.pending.push((l, s.to_string()));
        l
    }

    /// Emits every string added so far.
    pub fn emit(self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        for (mut l, s) in self.pending {
            a.set_label(&mut l)?;
            let mut bytes = s.into_bytes();
            bytes.push(0);
            a.db(&bytes)?;
        }
        Ok(())
    }
}

/// `lea rsi, [s]; call puts`.
pub fn print(a: &mut CodeAssembler, rt: &Runtime, s: CodeLabel) -> Result<(), IcedError> {
    a.lea(rsi, ptr(s))?;
    a.call(rt.puts)
}

/// Loops over the boot info's RAM ranges (RBP = the boot info): for each, RDI = start and
/// RSI = end, then `body`. Clobbers RCX and R9; `body` must keep R9 and RBP.
pub fn for_each_range(
    a: &mut CodeAssembler,
    body: &mut dyn FnMut(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut range = a.create_label();
    let mut done = a.create_label();
    a.xor(r9d, r9d)?;
    a.set_label(&mut range)?;
    a.cmp(r9, qword_ptr(rbp + super::INFO_NRANGES))?;
    a.jae(done)?;
    a.mov(rcx, r9)?;
    a.shl(rcx, 4)?;
    a.mov(rdi, qword_ptr(rbp + rcx + super::INFO_RANGES))?;
    a.mov(rsi, qword_ptr(rbp + rcx + super::INFO_RANGES + 8))?;
    body(a)?;
    a.inc(r9)?;
    a.jmp(range)?;
    a.set_label(&mut done)?;
    // A label needs an instruction of its own: the caller may place another one next.
    a.nop()
}

/// Points RBP at the boot info and jumps to `bad` unless it carries the magic. Clobbers RAX.
pub fn load_boot_info(a: &mut CodeAssembler, bad: CodeLabel) -> Result<(), IcedError> {
    a.mov(ebp, layout::BUILTIN_INFO as u32)?;
    a.mov(rax, super::BOOT_INFO_MAGIC)?;
    a.cmp(qword_ptr(rbp), rax)?;
    a.jne(bad)
}
