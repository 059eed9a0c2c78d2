//! `touch`: the lazy-restore benchmark's guest, at CPL3.
//!
//! 1. Fills every range in the [`BootInfo`] with data: the memfill pattern of `seed` in every
//!    fourth word, zeros between (compressible, as real memory is), then reports mark
//!    [`MARK_FILLED`].
//! 2. Reads the exit device's *wait* register until it gives the go (a snapshot taken here
//!    restores into a VM whose first guest action is that read), then reports [`MARK_GO`].
//!    The read parks the vCPU thread in the VMM until the go (or a pause) comes, as a halt
//!    would: a waiting clone costs no CPU.
//! 3. Touches its working set: `span` bytes, page by page (a read and a write back), every
//!    `stride` bytes through all ranges, then reports [`MARK_TOUCHED`], prints
//!    `touch: working set of <n> pages done, checksum 0x<sum>` and exits with status 0.
//!
//! [`BootInfo`]: super::BootInfo

use iced_x86::code_asm::*;

use super::asm::{begin, for_each_range, load_boot_info, print, Io, Strings};
use super::memfill::{emit_pattern, MULTIPLIER};
use super::{INFO_SEED, INFO_SPAN, INFO_STRIDE};
use crate::layout;

pub const MARK_FILLED: u32 = 1;
pub const MARK_GO: u32 = 2;
pub const MARK_TOUCHED: u32 = 3;

/// The checksum `touch` prints: the wrapping sum of the first word of every touched page.
pub fn checksum(ranges: &[(u64, u64)], seed: u64, stride: u64, span: u64) -> (u64, u64) {
    let mut sum = 0u64;
    let mut pages = 0;
    for &(start, end) in ranges {
        let mut a = start;
        while a < end {
            let mut p = a;
            while p < (a + span).min(end) {
                // Every fourth word holds the pattern; a page's first word is one of them.
                sum = sum.wrapping_add(super::memfill::pattern(p, seed));
                pages += 1;
                p += 4096;
            }
            a += stride;
        }
    }
    (sum, pages)
}

fn mark(a: &mut CodeAssembler, value: u32) -> Result<(), IcedError> {
    a.mov(rbx, layout::EXIT_MMIO)?;
    a.mov(dword_ptr(rbx + devices::exit::REG_MARK as i32), value)
}

pub fn emit(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let rt = begin(a, Io::Mmio)?;
    let mut s = Strings::default();
    let s_bad = s.add(a, "touch: no boot info\n");
    let s_done = s.add(a, "touch: working set of ");
    let s_pages = s.add(a, " pages done, checksum ");
    let s_nl = s.add(a, "\n");
    let mut bad_info = a.create_label();

    load_boot_info(a, bad_info)?;
    a.mov(r15, MULTIPLIER)?;
    a.mov(r14, qword_ptr(rbp + INFO_SEED))?;

    // 1. Fill: the pattern in every fourth word.
    for_each_range(a, &mut |a| {
        let mut word = a.create_label();
        let mut end = a.create_label();
        a.cmp(rdi, rsi)?;
        a.jae(end)?;
        a.set_label(&mut word)?;
        emit_pattern(a, r14)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.add(rdi, 32)?;
        a.cmp(rdi, rsi)?;
        a.jb(word)?;
        a.set_label(&mut end)?;
        a.nop()
    })?;
    mark(a, MARK_FILLED)?;

    // 2. Wait for go.
    let mut poll = a.create_label();
    let mut go = a.create_label();
    a.set_label(&mut poll)?;
    a.mov(rbx, layout::EXIT_MMIO)?;
    a.mov(eax, dword_ptr(rbx + devices::exit::REG_WAIT as i32))?;
    a.test(eax, eax)?;
    a.jnz(go)?;
    a.jmp(poll)?;
    a.set_label(&mut go)?;
    mark(a, MARK_GO)?;

    // 3. Touch `span` bytes every `stride` bytes, a page at a time; r13 = sum, r12 = pages.
    a.xor(r13d, r13d)?;
    a.xor(r12d, r12d)?;
    for_each_range(a, &mut |a| {
        let mut chunk = a.create_label();
        let mut page = a.create_label();
        let mut next_chunk = a.create_label();
        let mut end = a.create_label();
        a.set_label(&mut chunk)?;
        a.cmp(rdi, rsi)?;
        a.jae(end)?;
        a.mov(r8, rdi)?;
        a.mov(r10, rdi)?;
        a.add(r10, qword_ptr(rbp + INFO_SPAN))?;
        a.cmp(r10, rsi)?;
        a.cmova(r10, rsi)?;
        a.set_label(&mut page)?;
        a.cmp(r8, r10)?;
        a.jae(next_chunk)?;
        a.mov(rax, qword_ptr(r8))?;
        a.add(r13, rax)?;
        a.mov(qword_ptr(r8), rax)?;
        a.inc(r12)?;
        a.add(r8, 4096)?;
        a.jmp(page)?;
        a.set_label(&mut next_chunk)?;
        a.add(rdi, qword_ptr(rbp + INFO_STRIDE))?;
        a.jmp(chunk)?;
        a.set_label(&mut end)?;
        a.nop()
    })?;
    mark(a, MARK_TOUCHED)?;
    print(a, &rt, s_done)?;
    a.mov(rax, r12)?;
    a.call(rt.put_dec)?;
    print(a, &rt, s_pages)?;
    a.mov(rax, r13)?;
    a.call(rt.put_hex)?;
    print(a, &rt, s_nl)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)?;

    a.set_label(&mut bad_info)?;
    print(a, &rt, s_bad)?;
    a.mov(eax, 4u32)?;
    a.jmp(rt.exit)?;
    s.emit(a)
}
