//! `memfill`: fills RAM with a seeded pattern from CPL3 and prints checksums.
//!
//! The word at guest-physical address `a` for seed `s` is `x ^ (x >> 29)` with
//! `x = (a ^ s) * 0x9e37_79b9_7f4a_7c15` (wrapping), so any word can be checked on its own.
//! Pass `p` writes the pattern of seed `seed + p` over every range in the [`BootInfo`],
//! checking on the way that pass `p - 1`'s pattern is still there, and prints
//! `memfill pass <p> seed 0x<s> checksum 0x<sum> mismatches <n>` (the checksum is the
//! wrapping sum of the words written). A VM snapshotted mid-run and restored therefore proves
//! its memory came back: its next pass finds the previous pattern intact. With `passes = 0`
//! it runs until stopped. Verify mode only checks seed `seed` and prints
//! `memfill verify seed 0x<s> checksum 0x<sum> mismatches <n>`. Mismatching lines end with
//! ` first 0x<addr>` and the guest exits with status 1; otherwise it exits 0.
//!
//! [`BootInfo`]: super::BootInfo

use iced_x86::code_asm::*;

use super::asm::{begin, for_each_range, load_boot_info, print, Io, Runtime, Strings};
use super::{INFO_MODE, INFO_PASSES, INFO_SEED};

/// The pattern's multiplier (2^64 / golden ratio).
pub const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// The pattern word at `addr` for `seed`, as the guest computes it.
pub fn pattern(addr: u64, seed: u64) -> u64 {
    let x = (addr ^ seed).wrapping_mul(MULTIPLIER);
    x ^ (x >> 29)
}

/// The checksum a pass with `seed` prints over `ranges`.
pub fn checksum(ranges: &[(u64, u64)], seed: u64) -> u64 {
    ranges.iter().flat_map(|&(s, e)| (s..e).step_by(8)).fold(0u64, |sum, a| sum.wrapping_add(pattern(a, seed)))
}

/// rax = pattern(rdi, seed_reg); clobbers rdx.
pub(super) fn emit_pattern(a: &mut CodeAssembler, seed: AsmRegister64) -> Result<(), IcedError> {
    a.mov(rax, rdi)?;
    a.xor(rax, seed)?;
    a.imul_2(rax, r15)?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 29)?;
    a.xor(rax, rdx)
}

/// Compares [rdi] with rax; counts a mismatch in r10 and keeps the first address in r11.
fn emit_check(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    let mut counted = a.create_label();
    a.cmp(qword_ptr(rdi), rax)?;
    a.je(ok)?;
    a.test(r10, r10)?;
    a.jnz(counted)?;
    a.mov(r11, rdi)?;
    a.set_label(&mut counted)?;
    a.inc(r10)?;
    a.set_label(&mut ok)
}

#[derive(Clone, Copy)]
enum Sweep {
    Fill,
    CheckAndFill,
    Check,
}

/// One sweep over every range: r14 = seed to write/check, r8 = previous seed; r13 = checksum.
fn emit_sweep(a: &mut CodeAssembler, sweep: Sweep) -> Result<(), IcedError> {
    for_each_range(a, &mut |a| {
        let mut word = a.create_label();
        let mut end = a.create_label();
        a.cmp(rdi, rsi)?;
        a.jae(end)?;
        a.set_label(&mut word)?;
        match sweep {
            Sweep::Fill => {}
            Sweep::CheckAndFill => {
                emit_pattern(a, r8)?;
                emit_check(a)?;
            }
            Sweep::Check => {
                emit_pattern(a, r14)?;
                emit_check(a)?;
                a.add(r13, rax)?;
            }
        }
        if !matches!(sweep, Sweep::Check) {
            emit_pattern(a, r14)?;
            a.mov(qword_ptr(rdi), rax)?;
            a.add(r13, rax)?;
        }
        a.add(rdi, 8)?;
        a.cmp(rdi, rsi)?;
        a.jb(word)?;
        a.set_label(&mut end)?;
        a.nop()
    })
}

/// Prints ` seed 0x.. checksum 0x.. mismatches n[ first 0x..]\n`.
fn emit_report(a: &mut CodeAssembler, rt: &Runtime, s: &mut Strings) -> Result<(), IcedError> {
    let s_seed = s.add(a, " seed ");
    let s_sum = s.add(a, " checksum ");
    let s_mis = s.add(a, " mismatches ");
    let s_first = s.add(a, " first ");
    let s_nl = s.add(a, "\n");
    print(a, rt, s_seed)?;
    a.mov(rax, r14)?;
    a.call(rt.put_hex)?;
    print(a, rt, s_sum)?;
    a.mov(rax, r13)?;
    a.call(rt.put_hex)?;
    print(a, rt, s_mis)?;
    a.mov(rax, r10)?;
    a.call(rt.put_dec)?;
    let mut clean = a.create_label();
    a.test(r10, r10)?;
    a.jz(clean)?;
    print(a, rt, s_first)?;
    a.mov(rax, r11)?;
    a.call(rt.put_hex)?;
    a.set_label(&mut clean)?;
    print(a, rt, s_nl)
}

pub fn emit(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let rt = begin(a, Io::Mmio)?;
    let mut s = Strings::default();
    let s_bad = s.add(a, "memfill: no boot info\n");
    let s_pass = s.add(a, "memfill pass ");
    let s_verify = s.add(a, "memfill verify");
    let mut bad_info = a.create_label();
    let mut verify = a.create_label();
    let mut pass = a.create_label();
    let mut first_pass = a.create_label();
    let mut swept = a.create_label();
    let mut fail = a.create_label();

    load_boot_info(a, bad_info)?;
    a.mov(r15, MULTIPLIER)?;
    a.xor(r12d, r12d)?;
    a.cmp(qword_ptr(rbp + INFO_MODE), 1)?;
    a.je(verify)?;

    a.set_label(&mut pass)?;
    a.mov(r14, qword_ptr(rbp + INFO_SEED))?;
    a.add(r14, r12)?;
    a.lea(r8, qword_ptr(r14 - 1))?;
    a.xor(r13d, r13d)?;
    a.xor(r10d, r10d)?;
    a.xor(r11d, r11d)?;
    a.test(r12, r12)?;
    a.jz(first_pass)?;
    emit_sweep(a, Sweep::CheckAndFill)?;
    a.jmp(swept)?;
    a.set_label(&mut first_pass)?;
    emit_sweep(a, Sweep::Fill)?;
    a.set_label(&mut swept)?;
    print(a, &rt, s_pass)?;
    a.mov(rax, r12)?;
    a.call(rt.put_dec)?;
    emit_report(a, &rt, &mut s)?;
    a.test(r10, r10)?;
    a.jnz(fail)?;
    a.inc(r12)?;
    a.mov(rax, qword_ptr(rbp + INFO_PASSES))?;
    a.test(rax, rax)?;
    a.jz(pass)?;
    a.cmp(r12, rax)?;
    a.jb(pass)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)?;

    a.set_label(&mut verify)?;
    a.mov(r14, qword_ptr(rbp + INFO_SEED))?;
    a.xor(r13d, r13d)?;
    a.xor(r10d, r10d)?;
    a.xor(r11d, r11d)?;
    emit_sweep(a, Sweep::Check)?;
    print(a, &rt, s_verify)?;
    emit_report(a, &rt, &mut s)?;
    a.test(r10, r10)?;
    a.jnz(fail)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)?;

    a.set_label(&mut fail)?;
    a.mov(eax, 1u32)?;
    a.jmp(rt.exit)?;
    a.set_label(&mut bad_info)?;
    print(a, &rt, s_bad)?;
    a.mov(eax, 4u32)?;
    a.jmp(rt.exit)?;
    s.emit(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_on_address_and_seed() {
        assert_ne!(pattern(0x20_0000, 1), pattern(0x20_0008, 1));
        assert_ne!(pattern(0x20_0000, 1), pattern(0x20_0000, 2));
        assert_eq!(checksum(&[(0, 16)], 3), pattern(0, 3).wrapping_add(pattern(8, 3)));
    }
}
