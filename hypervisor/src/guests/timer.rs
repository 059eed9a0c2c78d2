//! `timer`: arms the local APIC timer again and again and checks that every tick arrives, in
//! TSC-deadline mode or in one-shot mode (`--timer-mode`): the guest for testing that a
//! restored vCPU's LAPIC timer keeps running.
//!
//! It runs at CPL0 (port I/O for its output) with the LAPIC in xAPIC mode, reached through
//! its MMIO page at 0xfee00000, and with interrupts *disabled*: hosts whose KVM is the
//! paravirtual kvm_pvm deliver an interrupt only to a guest that registered PVM's event entry
//! and triple-fault any other, so the guest does not take the interrupts, it watches them
//! arrive. Tick `n` (from 0) uses vector `0x20 + n`:
//!
//! 1. it programs LVT Timer with that vector and arms the timer: TSC-deadline mode writes
//!    `IA32_TSC_DEADLINE` = TSC + [`PERIOD_TSC`]; one-shot mode (divide by 1) writes the
//!    initial count [`ONESHOT_COUNT`];
//! 2. it polls the LAPIC's IRR until the vector's bit is set: the LAPIC accepted the timer's
//!    interrupt (with IF clear it stays pending there, which is why every tick needs a vector
//!    of its own and a run is at most [`TICKS`] ticks);
//! 3. it checks the tick did not come early (TSC-deadline: the TSC is within a quarter period
//!    of the deadline or past it; one-shot: the current count reads 0).
//!
//! Every [`REPORT_EVERY`] ticks it prints `timer: <mode> tick <n>`; after [`TICKS`] ticks it
//! prints `timer: done` and exits with status 0. A tick that does not arrive within
//! [`TIMEOUT_TSC`] TSC cycles ends the run with `timer: tick <n> (vector 0x..) never arrived`
//! and status 1 (a restore that lost the armed timer); a tick that arrived early with status 2.

use iced_x86::code_asm::*;

use super::asm::{begin, load_boot_info, print, Io, Strings};
use super::INFO_TIMER;

/// Ticks in a run: one vector each, from 0x20.
pub const TICKS: u64 = 200;
/// A line every this many ticks.
pub const REPORT_EVERY: u64 = 10;
/// TSC-deadline mode: TSC cycles from arming to the deadline (~6 ms at 2.8 GHz).
pub const PERIOD_TSC: u32 = 1 << 24;
/// One-shot mode: the initial count, at KVM's 1 GHz APIC bus with divide-by-1 (8 ms).
pub const ONESHOT_COUNT: u32 = 8_000_000;
/// TSC cycles a tick may take before it counts as lost (~3 s at 2.8 GHz).
pub const TIMEOUT_TSC: u64 = 1 << 33;
/// First vector used.
pub const FIRST_VECTOR: u64 = 0x20;

/// The xAPIC registers used, as offsets in the LAPIC page.
const LAPIC_BASE: u32 = 0xfee0_0000;
const APIC_TPR: i32 = 0x80;
const APIC_SVR: i32 = 0xf0;
const APIC_IRR: i32 = 0x200;
const APIC_LVTT: i32 = 0x320;
const APIC_TMICT: i32 = 0x380;
const APIC_TMCCT: i32 = 0x390;
const APIC_TDCR: i32 = 0x3e0;
/// SVR: APIC software-enabled, spurious vector 0xff.
const SVR_ENABLE: u32 = 0x1ff;
/// LVT Timer mode bits 18:17 = 2: TSC-deadline.
const LVTT_TSC_DEADLINE: u32 = 2 << 17;
/// TDCR value for divide by 1.
const TDCR_DIV_1: u32 = 0xb;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

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

/// Register use: RBP boot info, RBX the LAPIC page, R12 ticks done, R13 the mode word,
/// R14 this tick's vector, R15 the deadline (TSC-deadline) or the arming TSC (one-shot),
/// R10 the TSC at which the tick counts as lost.
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
    let s_nl = s.add(a, "\n");
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
    a.mov(ebx, LAPIC_BASE)?;
    a.mov(dword_ptr(rbx + APIC_SVR), SVR_ENABLE)?;
    a.mov(dword_ptr(rbx + APIC_TPR), 0u32)?;
    a.mov(dword_ptr(rbx + APIC_TDCR), TDCR_DIV_1)?;
    a.cmp(r13, 1)?;
    a.je(start_oneshot)?;
    print(a, &rt, s_start_deadline)?;
    a.jmp(started)?;
    a.set_label(&mut start_oneshot)?;
    print(a, &rt, s_start_oneshot)?;
    a.set_label(&mut started)?;
    a.xor(r12d, r12d)?;

    // Arm the timer for tick R12 on vector R14.
    a.set_label(&mut tick)?;
    a.lea(r14, qword_ptr(r12 + FIRST_VECTOR as i32))?;
    a.mov(eax, r14d)?;
    a.cmp(r13, 1)?;
    a.je(arm_oneshot)?;
    a.or(eax, LVTT_TSC_DEADLINE)?;
    a.mov(dword_ptr(rbx + APIC_LVTT), eax)?;
    rdtsc64(a)?;
    a.add(rax, PERIOD_TSC as i32)?;
    a.mov(r15, rax)?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 32)?;
    a.mov(ecx, MSR_IA32_TSC_DEADLINE)?;
    a.wrmsr()?;
    a.jmp(wait)?;
    a.set_label(&mut arm_oneshot)?;
    a.mov(dword_ptr(rbx + APIC_LVTT), eax)?;
    rdtsc64(a)?;
    a.mov(r15, rax)?;
    a.mov(dword_ptr(rbx + APIC_TMICT), ONESHOT_COUNT)?;

    // Poll IRR[vector] until it is set or the tick is overdue.
    a.set_label(&mut wait)?;
    a.mov(r10, TIMEOUT_TSC)?;
    a.add(r10, r15)?;
    a.set_label(&mut poll)?;
    a.mov(ecx, r14d)?;
    a.shr(ecx, 5)?;
    a.shl(ecx, 4)?;
    a.mov(eax, dword_ptr(rbx + rcx + APIC_IRR))?;
    a.mov(ecx, r14d)?;
    a.and(ecx, 31)?;
    a.bt(eax, ecx)?;
    a.jc(fired)?;
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
    a.jne(early)?;

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
    print(a, &rt, s_done)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)?;

    // `timer: tick <n> (vector 0x..` then the reason; n counts from 1 as the lines do.
    for (label, reason, status) in [(&mut lost, s_lost, 1u32), (&mut early, s_early, 2)] {
        a.set_label(label)?;
        print(a, &rt, s_tick)?;
        a.lea(rax, qword_ptr(r12 + 1))?;
        a.call(rt.put_dec)?;
        print(a, &rt, s_vector)?;
        a.mov(rax, r14)?;
        a.call(rt.put_hex)?;
        print(a, &rt, reason)?;
        a.mov(eax, status)?;
        a.jmp(rt.exit)?;
    }

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
    fn every_tick_has_a_vector_of_its_own() {
        assert!(FIRST_VECTOR >= 0x20, "vectors below 0x20 are the CPU's exceptions");
        assert!(FIRST_VECTOR + TICKS - 1 < 0xff, "0xff is the spurious vector");
        assert_eq!(TICKS % REPORT_EVERY, 0, "the last tick is reported");
    }
}
