//! `timer`: arms the local APIC timer again and again and counts the interrupts it raises, in
//! TSC-deadline mode or in one-shot mode (`--timer-mode`): the guest for testing that a
//! restored vCPU's LAPIC timer keeps delivering its interrupts.
//!
//! It runs at CPL0 (port I/O for its output) with an IDT at [`layout::BUILTIN_IDT`] and the
//! LAPIC in xAPIC mode, reached through its MMIO page at 0xfee00000. The timer interrupts on
//! vector [`VECTOR`], whose handler counts it and signals EOI; every other vector goes to a
//! handler that prints `timer: unexpected interrupt or exception` and exits with status 3
//! (without an IDT, kvm_pvm ends the guest with a triple fault at the first tick). For each
//! tick the guest
//!
//! 1. arms the timer: TSC-deadline mode writes `IA32_TSC_DEADLINE` = TSC + [`PERIOD_TSC`];
//!    one-shot mode (divide by 1) writes the initial count [`ONESHOT_COUNT`];
//! 2. waits with interrupts on until the handler has counted the tick, or [`TIMEOUT_TSC`]
//!    TSC cycles have passed (it polls the count rather than halting, so that a lost timer is
//!    reported rather than waited for forever);
//! 3. checks the tick did not come early (TSC-deadline: the TSC is within a quarter period of
//!    the deadline or past it; one-shot: the current count reads 0). In one-shot mode a tick
//!    counted while the armed timer still runs is taken back and the guest waits on: KVM's
//!    KVM_SET_LAPIC restarts a one-shot timer from the saved current count, so a timer that
//!    had expired (count 0) fires once more at restore. KVM keeps an expiry that it has not yet
//!    injected outside the state KVM_GET_LAPIC returns, so that second interrupt is how such
//!    an expiry survives a snapshot; when the guest had already taken it, it is a duplicate
//!    (seen in 2 of 12 restores here) that a guest must tolerate, as on any KVM VMM.
//!
//! Every [`REPORT_EVERY`] ticks it prints `timer: <mode> tick <n>`; after [`TICKS`] ticks it
//! prints `timer: done` and exits with status 0. A tick that does not arrive in time ends the
//! run with `timer: tick <n> (vector 0x20) never arrived` and status 1 (a restore that lost
//! the armed timer); one that arrived early, with status 2.

use iced_x86::code_asm::*;

use super::asm::{begin, load_boot_info, print, Io, Strings};
use super::INFO_TIMER;
use crate::cpu::regs::KERNEL_CS;
use crate::layout;

/// Ticks in a run.
pub const TICKS: u64 = 200;
/// A line every this many ticks.
pub const REPORT_EVERY: u64 = 10;
/// TSC-deadline mode: TSC cycles from arming to the deadline (6.5 ms at 2.59 GHz).
pub const PERIOD_TSC: u32 = 1 << 24;
/// One-shot mode: the initial count, at KVM's 1 GHz APIC bus with divide-by-1 (8 ms).
pub const ONESHOT_COUNT: u32 = 8_000_000;
/// TSC cycles a tick may take before it counts as lost (3.3 s at 2.59 GHz).
pub const TIMEOUT_TSC: u64 = 1 << 33;
/// The timer's interrupt vector.
pub const VECTOR: u32 = 0x20;
/// The spurious-interrupt vector (SVR).
const SPURIOUS_VECTOR: u32 = 0xff;

/// The xAPIC registers used, as offsets in the LAPIC page.
const LAPIC_BASE: u32 = 0xfee0_0000;
const APIC_TPR: i32 = 0x80;
const APIC_EOI: u32 = 0xb0;
const APIC_SVR: i32 = 0xf0;
const APIC_LVTT: i32 = 0x320;
const APIC_TMICT: i32 = 0x380;
const APIC_TMCCT: i32 = 0x390;
const APIC_TDCR: i32 = 0x3e0;
/// SVR bit 8: APIC software-enabled.
const SVR_ENABLE: u32 = 0x100;
/// LVT Timer mode bits 18:17 = 2: TSC-deadline.
const LVTT_TSC_DEADLINE: u32 = 2 << 17;
/// TDCR value for divide by 1.
const TDCR_DIV_1: u32 = 0xb;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// A 64-bit interrupt gate, present, DPL0 (bits 8..16 of the gate's second dword).
const GATE_INTERRUPT: u32 = 0x8e00;

/// How the timer is armed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimerMode {
    /// LVT Timer in TSC-deadline mode, armed through the IA32_TSC_DEADLINE MSR.
    #[default]
    TscDeadline,
    /// LVT Timer in one-shot mode, armed through the initial-count register.
    Oneshot,
}

impl TimerMode {
    /// The word the guest reads from the boot info.
    pub fn word(self) -> u64 {
        match self {
            TimerMode::TscDeadline => 0,
            TimerMode::Oneshot => 1,
        }
    }

    /// The name in the guest's lines, as `--timer-mode` spells it.
    pub fn name(self) -> &'static str {
        match self {
            TimerMode::TscDeadline => "tsc-deadline",
            TimerMode::Oneshot => "oneshot",
        }
    }
}

/// RAX = the TSC. Clobbers RDX.
fn rdtsc64(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// Writes an interrupt gate at [RDI] to the handler at RAX. Clobbers RAX and RDX.
fn write_gate(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(edx, eax)?;
    a.and(edx, 0xffff)?;
    a.or(edx, i32::from(KERNEL_CS) << 16)?;
    a.mov(dword_ptr(rdi), edx)?;
    a.mov(edx, eax)?;
    a.and(edx, 0xffff_0000u32 as i32)?;
    a.or(edx, GATE_INTERRUPT as i32)?;
    a.mov(dword_ptr(rdi + 4), edx)?;
    a.shr(rax, 32)?;
    a.mov(qword_ptr(rdi + 8), rax)
}

/// Points the gate of `vector` at `handler`. Clobbers RAX, RDX and RDI.
fn set_gate(a: &mut CodeAssembler, vector: u32, handler: CodeLabel) -> Result<(), IcedError> {
    a.mov(edi, layout::BUILTIN_IDT as u32 + 16 * vector)?;
    a.lea(rax, ptr(handler))?;
    write_gate(a)
}

/// Register use: RBP boot info, RBX the LAPIC page, R12 ticks counted, R13 the mode word,
/// R15 the deadline (TSC-deadline) or the arming TSC (one-shot), R10 the TSC at which the
/// tick counts as lost. The handler counts in memory (`count`).
pub fn emit(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let rt = begin(a, Io::Port)?;
    let mut s = Strings::default();
    let s_bad = s.add(a, "timer: no boot info\n");
    let s_deadline = s.add(a, "timer: tsc-deadline tick ");
    let s_oneshot = s.add(a, "timer: oneshot tick ");
    let s_start_deadline = s.add(a, "timer: tsc-deadline mode\n");
    let s_start_oneshot = s.add(a, "timer: oneshot mode\n");
    let s_done = s.add(a, "timer: done\n");
    let s_tick = s.add(a, "timer: tick ");
    let s_vector = s.add(a, " (vector ");
    let s_lost = s.add(a, ") never arrived\n");
    let s_early = s.add(a, ") arrived before its time\n");
    let s_unexpected = s.add(a, "timer: unexpected interrupt or exception\n");
    let s_nl = s.add(a, "\n");
    let mut idtr = a.create_label();
    let mut count = a.create_label();
    let mut tick_handler = a.create_label();
    let mut spurious = a.create_label();
    let mut unexpected = a.create_label();
    let mut fill = a.create_label();
    let mut bad_info = a.create_label();
    let mut tick = a.create_label();
    let mut arm_oneshot = a.create_label();
    let mut wait = a.create_label();
    let mut poll = a.create_label();
    let mut fired = a.create_label();
    let mut fired_oneshot = a.create_label();
    let mut counted = a.create_label();
    let mut report_oneshot = a.create_label();
    let mut reported = a.create_label();
    let mut next = a.create_label();
    let mut lost = a.create_label();
    let mut early = a.create_label();
    let mut started = a.create_label();
    let mut start_oneshot = a.create_label();

    load_boot_info(a, bad_info)?;
    a.mov(r13, qword_ptr(rbp + INFO_TIMER))?;

    // The IDT: every vector to `unexpected`, then the timer's and the spurious vector.
    a.xor(ecx, ecx)?;
    a.set_label(&mut fill)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 4)?;
    a.lea(rdi, qword_ptr(rax + layout::BUILTIN_IDT as i32))?;
    a.lea(rax, ptr(unexpected))?;
    write_gate(a)?;
    a.inc(ecx)?;
    a.cmp(ecx, 256)?;
    a.jb(fill)?;
    set_gate(a, VECTOR, tick_handler)?;
    set_gate(a, SPURIOUS_VECTOR, spurious)?;
    a.lidt(ptr(idtr))?;

    // The LAPIC: enabled, nothing masked by priority, LVT Timer on VECTOR in the mode asked.
    a.mov(ebx, LAPIC_BASE)?;
    a.mov(dword_ptr(rbx + APIC_SVR), SVR_ENABLE | SPURIOUS_VECTOR)?;
    a.mov(dword_ptr(rbx + APIC_TPR), 0u32)?;
    a.mov(dword_ptr(rbx + APIC_TDCR), TDCR_DIV_1)?;
    a.cmp(r13, 1)?;
    a.je(start_oneshot)?;
    a.mov(dword_ptr(rbx + APIC_LVTT), VECTOR | LVTT_TSC_DEADLINE)?;
    print(a, &rt, s_start_deadline)?;
    a.jmp(started)?;
    a.set_label(&mut start_oneshot)?;
    a.mov(dword_ptr(rbx + APIC_LVTT), VECTOR)?;
    print(a, &rt, s_start_oneshot)?;
    a.set_label(&mut started)?;
    a.xor(r12d, r12d)?;
    a.mov(qword_ptr(count), r12)?;
    a.sti()?;

    // Arm the timer for the next tick.
    a.set_label(&mut tick)?;
    a.cmp(r13, 1)?;
    a.je(arm_oneshot)?;
    rdtsc64(a)?;
    a.add(rax, PERIOD_TSC as i32)?;
    a.mov(r15, rax)?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 32)?;
    a.mov(ecx, MSR_IA32_TSC_DEADLINE)?;
    a.wrmsr()?;
    a.jmp(wait)?;
    a.set_label(&mut arm_oneshot)?;
    rdtsc64(a)?;
    a.mov(r15, rax)?;
    a.mov(dword_ptr(rbx + APIC_TMICT), ONESHOT_COUNT)?;

    // Wait until the handler has counted the tick, or the tick is overdue.
    a.set_label(&mut wait)?;
    a.mov(r10, TIMEOUT_TSC)?;
    a.add(r10, r15)?;
    a.set_label(&mut poll)?;
    a.cmp(qword_ptr(count), r12)?;
    a.ja(fired)?;
    rdtsc64(a)?;
    a.cmp(rax, r10)?;
    a.ja(lost)?;
    a.pause()?;
    a.jmp(poll)?;

    // Arrived: not early?
    a.set_label(&mut fired)?;
    a.cmp(r13, 1)?;
    a.je(fired_oneshot)?;
    rdtsc64(a)?;
    a.add(rax, (PERIOD_TSC / 4) as i32)?;
    a.cmp(rax, r15)?;
    a.jb(early)?;
    a.jmp(counted)?;
    a.set_label(&mut fired_oneshot)?;
    a.cmp(dword_ptr(rbx + APIC_TMCCT), 0)?;
    a.je(counted)?;
    // Counted while the armed timer still runs: the one-shot KVM fires again when it restores
    // a timer that had expired (module docs). Take it back (one instruction, so the handler
    // cannot interleave) and keep waiting for the armed one.
    a.dec(qword_ptr(count))?;
    a.jmp(poll)?;

    a.set_label(&mut counted)?;
    a.inc(r12)?;
    a.mov(rax, r12)?;
    a.xor(edx, edx)?;
    a.mov(ecx, REPORT_EVERY as u32)?;
    a.div(rcx)?;
    a.test(rdx, rdx)?;
    a.jnz(next)?;
    a.cmp(r13, 1)?;
    a.je(report_oneshot)?;
    print(a, &rt, s_deadline)?;
    a.jmp(reported)?;
    a.set_label(&mut report_oneshot)?;
    print(a, &rt, s_oneshot)?;
    a.set_label(&mut reported)?;
    a.mov(rax, r12)?;
    a.call(rt.put_dec)?;
    print(a, &rt, s_nl)?;
    a.set_label(&mut next)?;
    a.cmp(r12, TICKS as i32)?;
    a.jb(tick)?;
    a.cli()?;
    print(a, &rt, s_done)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)?;

    // `timer: tick <n> (vector 0x20` then the reason; n counts from 1 as the lines do.
    for (label, reason, status) in [(&mut lost, s_lost, 1u32), (&mut early, s_early, 2)] {
        a.set_label(label)?;
        a.cli()?;
        print(a, &rt, s_tick)?;
        a.lea(rax, qword_ptr(r12 + 1))?;
        a.call(rt.put_dec)?;
        print(a, &rt, s_vector)?;
        a.mov(eax, VECTOR)?;
        a.call(rt.put_hex)?;
        print(a, &rt, reason)?;
        a.mov(eax, status)?;
        a.jmp(rt.exit)?;
    }

    a.set_label(&mut bad_info)?;
    print(a, &rt, s_bad)?;
    a.mov(eax, 4u32)?;
    a.jmp(rt.exit)?;

    // The timer's handler: count, EOI, return.
    a.set_label(&mut tick_handler)?;
    a.push(rax)?;
    a.inc(qword_ptr(count))?;
    a.mov(eax, LAPIC_BASE + APIC_EOI)?;
    a.mov(dword_ptr(rax), 0u32)?;
    a.pop(rax)?;
    a.iretq()?;
    // Spurious interrupts need no EOI.
    a.set_label(&mut spurious)?;
    a.iretq()?;
    a.set_label(&mut unexpected)?;
    print(a, &rt, s_unexpected)?;
    a.mov(eax, 3u32)?;
    a.jmp(rt.exit)?;

    // Data: the IDT register (limit, base) and the handler's tick count.
    a.set_label(&mut idtr)?;
    let mut pseudo = (256u16 * 16 - 1).to_le_bytes().to_vec();
    pseudo.extend_from_slice(&layout::BUILTIN_IDT.to_le_bytes());
    a.db(&pseudo)?;
    a.set_label(&mut count)?;
    a.db(&[0u8; 8])?;
    s.emit(a)
}

// What the layout and the constants must keep true, checked when this is compiled.
const _: () = assert!(VECTOR >= 0x20, "vectors below 0x20 are the CPU's exceptions");
const _: () = assert!(TICKS.is_multiple_of(REPORT_EVERY), "the last tick is reported");
const _: () = assert!(layout::BUILTIN_IDT + 256 * 16 <= layout::BUILTIN_INFO, "the IDT ends before the boot info");
const _: () = assert!(layout::BUILTIN_IDT >= layout::BOOT_GDT + 5 * 8, "the IDT starts after the GDT");
