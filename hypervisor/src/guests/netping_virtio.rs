//! netping's virtio-net driver: the modern PCI transport through the virtio BAR (common
//! configuration, device configuration and notifications at the offsets of
//! [`devices::virtio`]'s contract), split virtqueues in guest RAM, polled.
//!
//! Initialisation follows virtio 1.x section 3.1.1: reset (write 0, wait until the status
//! reads 0), ACKNOWLEDGE|DRIVER, read both feature words, accept VERSION_1 and MAC (and
//! nothing else: the 12-byte header is then all zeros on transmit), FEATURES_OK and check it
//! stuck, set up queue 0 (receive) and queue 1 (transmit) with [`QUEUE_SIZE`] entries and
//! no MSI-X vector (`0xffff`), DRIVER_OK, then read the MAC from the device configuration.
//! Every failure prints a line naming what was read and exits with status 5.
//!
//! Receive: all 256 buffers are posted at start; a used buffer is handled and posted again.
//! Transmit: descriptor `i` always points at buffer `i`; frame `n` goes in slot `n % 256`,
//! so a slot is free again once the device's used index has passed it (the device completes
//! transmit chains in order, as the contract's tap backend does).
//!
//! [`QUEUE_SIZE`]: super::netping::QUEUE_SIZE

use iced_x86::code_asm::*;

use super::asm::{print, Runtime, Strings};
use super::netping::*;
use devices::virtio::{DEVICE_CFG_OFFSET, NOTIFY_OFFSET};

// virtio_pci_common_cfg (virtio 1.x, 4.1.4.3).
const DEVICE_FEATURE_SELECT: i32 = 0x00;
const DEVICE_FEATURE: i32 = 0x04;
const DRIVER_FEATURE_SELECT: i32 = 0x08;
const DRIVER_FEATURE: i32 = 0x0c;
const DEVICE_STATUS: i32 = 0x14;
const QUEUE_SELECT: i32 = 0x16;
const QUEUE_SIZE_REG: i32 = 0x18;
const QUEUE_MSIX_VECTOR: i32 = 0x1a;
const QUEUE_ENABLE: i32 = 0x1c;
const QUEUE_NOTIFY_OFF: i32 = 0x1e;
const QUEUE_DESC: i32 = 0x20;
const QUEUE_DRIVER: i32 = 0x28;
const QUEUE_DEVICE: i32 = 0x30;

// Device status bits.
pub const ACKNOWLEDGE: u32 = 1;
pub const DRIVER: u32 = 2;
pub const DRIVER_OK: u32 = 4;
pub const FEATURES_OK: u32 = 8;
pub const DEVICE_NEEDS_RESET: u32 = 0x40;

// Feature bits.
const F_MAC: u32 = 1 << 5;
/// VIRTIO_F_VERSION_1 is bit 32: bit 0 of feature word 1.
const F_VERSION_1_HI: u32 = 1;

// Descriptor flags and the used ring's "no notify" flag.
const DESC_NEXT: u32 = 1;
const DESC_WRITE: u32 = 2;
const USED_NO_NOTIFY: u32 = 1;

/// How many polls of a used ring (a PAUSE and a RAM read each: seconds) a wait for the device
/// to consume transmit chains may take before the guest gives up.
const SPIN_LIMIT: u32 = 1 << 26;

/// Labels of the driver's routines.
pub struct Driver {
    /// Initialises the device as above; exits the guest on failure.
    pub init: CodeLabel,
    /// The next received frame: RDI = its address (0 when none), RCX = its length, EBX = its
    /// descriptor (for `rx_release`).
    pub rx_next: CodeLabel,
    /// Posts receive descriptor EBX again (the device learns of it at `rx_kick`).
    pub rx_release: CodeLabel,
    /// Notifies the receive queue unless the device asked not to be.
    pub rx_kick: CodeLabel,
    /// EAX = 1 if a transmit slot is free now, else 0.
    pub tx_room: CodeLabel,
    /// Waits for a free transmit slot: RDI = where its frame goes, its first 64 bytes zeroed.
    pub tx_slot: CodeLabel,
    /// Makes the slot `tx_slot` gave available with a frame of RCX bytes.
    pub tx_send: CodeLabel,
    /// Notifies the transmit queue unless the device asked not to be.
    pub tx_kick: CodeLabel,
    /// Waits until the device has used every transmit chain made available.
    pub tx_drain: CodeLabel,
    /// Reads the MAC from the device configuration again: EAX = 1 (and a line printed) if it
    /// changed, as it does when a snapshot is cloned with a new MAC.
    pub refresh_mac: CodeLabel,
}

fn status(a: &mut CodeAssembler, value: u32) -> Result<(), IcedError> {
    a.mov(byte_ptr(r14 + DEVICE_STATUS), value)
}

/// R8 = the TSC a second from now (a device wait's deadline: waits that read device
/// registers cost an exit per read, so they are bounded in time, not in reads). Clobbers RAX,
/// RDX.
fn deadline(a: &mut CodeAssembler) -> Result<(), IcedError> {
    super::netping::rdtsc64(a)?;
    a.mov(r8, qword_ptr(r15 + S_RETRY_TSC))?;
    a.lea(r8, qword_ptr(rax + r8 * 2))
}

/// Compares the TSC with the deadline in R8: `jb` continues while it has not passed.
/// Clobbers RDX and RAX (but keeps the flags of the comparison).
fn past_deadline(a: &mut CodeAssembler) -> Result<(), IcedError> {
    super::netping::rdtsc64(a)?;
    a.cmp(rax, r8)
}

/// Prints `s`, then RAX in hex, a newline, and exits with status 5.
fn fail_hex(a: &mut CodeAssembler, rt: &Runtime, s: CodeLabel, nl: CodeLabel) -> Result<(), IcedError> {
    a.push(rax)?;
    print(a, rt, s)?;
    a.pop(rax)?;
    a.call(rt.put_hex)?;
    print(a, rt, nl)?;
    a.mov(eax, 5u32)?;
    a.jmp(rt.exit)
}

/// Sets up queue `q` at NET_BASE + `desc` (ring pages follow it). Jumps to `small` with RAX =
/// the device's maximum when that is below [`QUEUE_SIZE`].
fn setup_queue(a: &mut CodeAssembler, q: u32, desc: i32, notify: i32, small: CodeLabel) -> Result<(), IcedError> {
    a.mov(word_ptr(r14 + QUEUE_SELECT), q)?;
    a.movzx(eax, word_ptr(r14 + QUEUE_SIZE_REG))?;
    a.cmp(eax, QUEUE_SIZE)?;
    a.jb(small)?;
    a.mov(word_ptr(r14 + QUEUE_SIZE_REG), QUEUE_SIZE)?;
    a.mov(word_ptr(r14 + QUEUE_MSIX_VECTOR), 0xffffu32)?;
    // 64-bit fields as two 32-bit writes, which every device must accept.
    for (reg, off) in [(QUEUE_DESC, desc), (QUEUE_DRIVER, desc + 0x1000), (QUEUE_DEVICE, desc + 0x2000)] {
        a.lea(rax, qword_ptr(r15 + off))?;
        a.mov(dword_ptr(r14 + reg), eax)?;
        a.shr(rax, 32)?;
        a.mov(dword_ptr(r14 + reg + 4), eax)?;
    }
    a.movzx(eax, word_ptr(r14 + QUEUE_NOTIFY_OFF))?;
    a.imul_3(eax, eax, devices::virtio::NOTIFY_OFF_MULTIPLIER as i32)?;
    a.lea(rax, qword_ptr(r14 + rax + NOTIFY_OFFSET as i32))?;
    a.mov(qword_ptr(r15 + notify), rax)?;
    a.mov(word_ptr(r14 + QUEUE_ENABLE), 1u32)
}

/// Notifies queue `q` through the address in `notify` unless the used ring at `used` says
/// not to.
fn kick(a: &mut CodeAssembler, q: u32, notify: i32, used: i32) -> Result<(), IcedError> {
    let mut skip = a.create_label();
    a.test(word_ptr(r15 + used), USED_NO_NOTIFY)?;
    a.jnz(skip)?;
    a.mov(rax, qword_ptr(r15 + notify))?;
    a.mov(word_ptr(rax), q)?;
    a.set_label(&mut skip)?;
    a.ret()
}

pub fn emit_routines(
    a: &mut CodeAssembler,
    rt: &Runtime,
    pr: &super::netping_proto::Printers,
    s: &mut Strings,
) -> Result<Driver, IcedError> {
    let mut d = Driver {
        init: a.create_label(),
        rx_next: a.create_label(),
        rx_release: a.create_label(),
        rx_kick: a.create_label(),
        tx_room: a.create_label(),
        tx_slot: a.create_label(),
        tx_send: a.create_label(),
        tx_kick: a.create_label(),
        tx_drain: a.create_label(),
        refresh_mac: a.create_label(),
    };
    let nl = s.add(a, "\n");
    let s_reset = s.add(a, "netping: virtio reset did not complete, device status ");
    let s_v1 = s.add(a, "netping: the device does not offer VERSION_1 and MAC: features ");
    let s_fok = s.add(a, "netping: the device did not accept the features, device status ");
    let s_small = s.add(a, "netping: the device's queue is smaller than 256 entries: ");
    let s_ready = s.add(a, "netping: virtio-net ready, mac ");
    let s_new_mac = s.add(a, "netping: the device's mac is now ");
    let s_stuck = s.add(a, "netping: the device stopped consuming transmit chains, used index ");

    // ---- init ----
    a.set_label(&mut d.init)?;
    let mut reset_wait = a.create_label();
    let mut reset_fail = a.create_label();
    let mut v1_fail = a.create_label();
    let mut fok_fail = a.create_label();
    let mut small = a.create_label();
    status(a, 0)?;
    deadline(a)?;
    a.set_label(&mut reset_wait)?;
    a.movzx(eax, byte_ptr(r14 + DEVICE_STATUS))?;
    a.test(eax, eax)?;
    let mut reset_done = a.create_label();
    a.jz(reset_done)?;
    a.pause()?;
    past_deadline(a)?;
    a.jb(reset_wait)?;
    a.jmp(reset_fail)?;
    a.set_label(&mut reset_done)?;
    status(a, ACKNOWLEDGE)?;
    status(a, ACKNOWLEDGE | DRIVER)?;
    a.mov(dword_ptr(r14 + DEVICE_FEATURE_SELECT), 1u32)?;
    a.mov(eax, dword_ptr(r14 + DEVICE_FEATURE))?;
    a.shl(rax, 32)?;
    a.mov(dword_ptr(r14 + DEVICE_FEATURE_SELECT), 0u32)?;
    a.mov(ebx, dword_ptr(r14 + DEVICE_FEATURE))?;
    a.or(rax, rbx)?;
    a.bt(rax, 32)?;
    a.jnc(v1_fail)?;
    a.test(eax, F_MAC)?;
    a.jz(v1_fail)?;
    a.mov(dword_ptr(r14 + DRIVER_FEATURE_SELECT), 0u32)?;
    a.mov(dword_ptr(r14 + DRIVER_FEATURE), F_MAC)?;
    a.mov(dword_ptr(r14 + DRIVER_FEATURE_SELECT), 1u32)?;
    a.mov(dword_ptr(r14 + DRIVER_FEATURE), F_VERSION_1_HI)?;
    status(a, ACKNOWLEDGE | DRIVER | FEATURES_OK)?;
    a.movzx(eax, byte_ptr(r14 + DEVICE_STATUS))?;
    a.test(eax, FEATURES_OK)?;
    a.jz(fok_fail)?;

    // Rings: receive descriptors writable, each its own buffer, all available.
    a.xor(ecx, ecx)?;
    let mut fill = a.create_label();
    a.set_label(&mut fill)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 11)?;
    a.lea(rax, qword_ptr(r15 + rax + RX_BUFS))?;
    a.mov(edx, ecx)?;
    a.shl(edx, 4)?;
    a.mov(qword_ptr(r15 + rdx + RX_DESC), rax)?;
    a.mov(dword_ptr(r15 + rdx + RX_DESC + 8), BUF_SIZE)?;
    a.mov(word_ptr(r15 + rdx + RX_DESC + 12), DESC_WRITE)?;
    a.add(rax, TX_BUFS - RX_BUFS)?;
    a.mov(qword_ptr(r15 + rdx + TX_DESC), rax)?;
    a.mov(word_ptr(r15 + rcx * 2 + RX_AVAIL + 4), cx)?;
    a.inc(ecx)?;
    a.cmp(ecx, QUEUE_SIZE)?;
    a.jb(fill)?;
    a.mov(word_ptr(r15 + RX_AVAIL + 2), QUEUE_SIZE)?;
    a.mov(qword_ptr(r15 + S_RX_AVAIL), QUEUE_SIZE as i32)?;

    setup_queue(a, 0, RX_DESC, S_NOTIFY_RX, small)?;
    setup_queue(a, 1, TX_DESC, S_NOTIFY_TX, small)?;
    status(a, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)?;
    a.mov(rax, qword_ptr(r15 + S_NOTIFY_RX))?;
    a.mov(word_ptr(rax), 0u32)?;
    read_mac(a, S_MAC)?;
    print(a, rt, s_ready)?;
    a.lea(rsi, qword_ptr(r15 + S_MAC))?;
    a.call(pr.print_mac)?;
    print(a, rt, nl)?;
    a.ret()?;

    a.set_label(&mut reset_fail)?;
    a.movzx(eax, byte_ptr(r14 + DEVICE_STATUS))?;
    fail_hex(a, rt, s_reset, nl)?;
    a.set_label(&mut v1_fail)?;
    fail_hex(a, rt, s_v1, nl)?;
    a.set_label(&mut fok_fail)?;
    fail_hex(a, rt, s_fok, nl)?;
    a.set_label(&mut small)?;
    fail_hex(a, rt, s_small, nl)?;

    // ---- rx_next ----
    a.set_label(&mut d.rx_next)?;
    let mut none = a.create_label();
    a.movzx(eax, word_ptr(r15 + RX_USED + 2))?;
    a.movzx(edx, word_ptr(r15 + S_RX_USED))?;
    a.cmp(eax, edx)?;
    a.je(none)?;
    a.and(edx, QUEUE_SIZE - 1)?;
    a.mov(ebx, dword_ptr(r15 + rdx * 8 + RX_USED + 4))?;
    a.mov(ecx, dword_ptr(r15 + rdx * 8 + RX_USED + 8))?;
    a.inc(qword_ptr(r15 + S_RX_USED))?;
    // A used id the driver never posted: skip the entry.
    a.cmp(ebx, QUEUE_SIZE)?;
    a.jae(none)?;
    // The length covers the header; clamp what the device claims to the buffer.
    a.mov(eax, BUF_SIZE)?;
    a.cmp(ecx, eax)?;
    a.cmova(ecx, eax)?;
    a.sub(ecx, NET_HDR)?;
    let mut len_ok = a.create_label();
    a.jae(len_ok)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut len_ok)?;
    a.mov(edi, ebx)?;
    a.shl(edi, 11)?;
    a.lea(rdi, qword_ptr(r15 + rdi + RX_BUFS + NET_HDR as i32))?;
    a.ret()?;
    a.set_label(&mut none)?;
    a.xor(edi, edi)?;
    a.ret()?;

    // ---- rx_release ----
    a.set_label(&mut d.rx_release)?;
    a.movzx(eax, word_ptr(r15 + S_RX_AVAIL))?;
    a.mov(edx, eax)?;
    a.and(edx, QUEUE_SIZE - 1)?;
    a.mov(word_ptr(r15 + rdx * 2 + RX_AVAIL + 4), bx)?;
    a.inc(eax)?;
    a.mov(word_ptr(r15 + S_RX_AVAIL), ax)?;
    a.mov(word_ptr(r15 + RX_AVAIL + 2), ax)?;
    a.mov(qword_ptr(r15 + S_RELEASED), 1)?;
    a.ret()?;

    // ---- rx_kick ----
    a.set_label(&mut d.rx_kick)?;
    a.mov(qword_ptr(r15 + S_RELEASED), 0)?;
    kick(a, 0, S_NOTIFY_RX, RX_USED)?;

    // ---- tx_room ----
    a.set_label(&mut d.tx_room)?;
    a.movzx(eax, word_ptr(r15 + S_TX_AVAIL))?;
    a.movzx(edx, word_ptr(r15 + TX_USED + 2))?;
    a.sub(eax, edx)?;
    a.and(eax, 0xffff)?;
    a.cmp(eax, QUEUE_SIZE)?;
    a.setb(al)?;
    a.movzx(eax, al)?;
    a.ret()?;

    // ---- tx_slot ----
    a.set_label(&mut d.tx_slot)?;
    let mut wait = a.create_label();
    let mut free = a.create_label();
    let mut stuck = a.create_label();
    a.mov(ebx, SPIN_LIMIT)?;
    a.set_label(&mut wait)?;
    a.call(d.tx_room)?;
    a.test(eax, eax)?;
    a.jnz(free)?;
    a.pause()?;
    a.dec(ebx)?;
    a.jnz(wait)?;
    a.jmp(stuck)?;
    a.set_label(&mut free)?;
    a.movzx(edi, word_ptr(r15 + S_TX_AVAIL))?;
    a.and(edi, QUEUE_SIZE - 1)?;
    a.shl(edi, 11)?;
    a.lea(rdi, qword_ptr(r15 + rdi + TX_BUFS))?;
    a.xor(eax, eax)?;
    a.mov(ecx, (NET_HDR + 64) / 4)?;
    a.rep().stosd()?;
    a.sub(rdi, 64)?;
    a.ret()?;

    // ---- tx_send ----
    a.set_label(&mut d.tx_send)?;
    a.movzx(eax, word_ptr(r15 + S_TX_AVAIL))?;
    a.mov(edx, eax)?;
    a.and(edx, QUEUE_SIZE - 1)?;
    a.mov(ebx, edx)?;
    a.shl(ebx, 4)?;
    a.add(ecx, NET_HDR)?;
    a.mov(dword_ptr(r15 + rbx + TX_DESC + 8), ecx)?;
    a.mov(word_ptr(r15 + rdx * 2 + TX_AVAIL + 4), dx)?;
    a.inc(eax)?;
    a.mov(word_ptr(r15 + S_TX_AVAIL), ax)?;
    a.mov(word_ptr(r15 + TX_AVAIL + 2), ax)?;
    a.ret()?;

    // ---- tx_kick ----
    a.set_label(&mut d.tx_kick)?;
    kick(a, 1, S_NOTIFY_TX, TX_USED)?;

    // ---- tx_drain ----
    a.set_label(&mut d.tx_drain)?;
    let mut drain = a.create_label();
    let mut drained = a.create_label();
    a.mov(ebx, SPIN_LIMIT)?;
    a.set_label(&mut drain)?;
    a.movzx(eax, word_ptr(r15 + S_TX_AVAIL))?;
    a.cmp(ax, word_ptr(r15 + TX_USED + 2))?;
    a.je(drained)?;
    a.pause()?;
    a.dec(ebx)?;
    a.jnz(drain)?;
    a.jmp(stuck)?;
    a.set_label(&mut drained)?;
    a.ret()?;

    // ---- refresh_mac ----
    a.set_label(&mut d.refresh_mac)?;
    let mut same = a.create_label();
    read_mac(a, S_NEW_MAC)?;
    a.mov(rax, qword_ptr(r15 + S_NEW_MAC))?;
    a.cmp(rax, qword_ptr(r15 + S_MAC))?;
    a.je(same)?;
    a.mov(qword_ptr(r15 + S_MAC), rax)?;
    print(a, rt, s_new_mac)?;
    a.lea(rsi, qword_ptr(r15 + S_MAC))?;
    a.call(pr.print_mac)?;
    print(a, rt, nl)?;
    a.mov(eax, 1u32)?;
    a.ret()?;
    a.set_label(&mut same)?;
    a.xor(eax, eax)?;
    a.ret()?;

    a.set_label(&mut stuck)?;
    a.movzx(eax, word_ptr(r15 + TX_USED + 2))?;
    fail_hex(a, rt, s_stuck, nl)?;
    Ok(d)
}

/// Reads the MAC from the device configuration into the state field at `at`, byte by byte
/// (device configuration fields have no wider access guarantee). Clobbers AL.
fn read_mac(a: &mut CodeAssembler, at: i32) -> Result<(), IcedError> {
    for i in 0..6 {
        a.mov(al, byte_ptr(r14 + DEVICE_CFG_OFFSET as i32 + i))?;
        a.mov(byte_ptr(r15 + at + i), al)?;
    }
    Ok(())
}

/// Writes transmit descriptor `i`: address in RAX, `len`, `flags`, `next`.
fn desc(a: &mut CodeAssembler, i: u32, len: u32, flags: u32, next: u32) -> Result<(), IcedError> {
    let off = TX_DESC + (i * 16) as i32;
    a.mov(qword_ptr(r15 + off), rax)?;
    a.mov(dword_ptr(r15 + off + 8), len)?;
    a.mov(word_ptr(r15 + off + 12), flags)?;
    a.mov(word_ptr(r15 + off + 14), next)
}

/// `evil`: four malformed chains on the transmit queue, one notification, then the device
/// status after up to about a second; exits 0.
pub fn emit_evil(a: &mut CodeAssembler, rt: &Runtime, s: &mut Strings) -> Result<(), IcedError> {
    let s_loop = s.add(a, "netping evil: posted a descriptor loop (0 -> 1 -> 0)\n");
    let s_out = s.add(a, "netping evil: posted a descriptor at 0x10000000000, outside RAM\n");
    let s_wrap = s.add(a, "netping evil: posted a descriptor at 0xfffffffffffff000 of 0x2000 bytes, wrapping\n");
    let s_long = s.add(a, "netping evil: posted a chain longer than the queue (4 -> ... -> 255 -> 4)\n");
    let s_kick = s.add(a, "netping evil: notified the transmit queue\n");
    let s_status = s.add(a, "netping evil: device status ");
    let s_done = s.add(a, "\nnetping evil: done\n");

    a.lea(rax, qword_ptr(r15 + TX_BUFS))?;
    desc(a, 0, 64, DESC_NEXT, 1)?;
    desc(a, 1, 64, DESC_NEXT, 0)?;
    a.mov(rax, 1u64 << 40)?;
    desc(a, 2, 64, 0, 0)?;
    a.mov(rax, 0xffff_ffff_ffff_f000u64)?;
    desc(a, 3, 0x2000, 0, 0)?;
    // Descriptors 4..=255, each chained to the next and the last back to 4.
    let mut chain = a.create_label();
    a.lea(rax, qword_ptr(r15 + TX_BUFS))?;
    a.mov(ecx, 4u32)?;
    a.set_label(&mut chain)?;
    a.mov(edx, ecx)?;
    a.shl(edx, 4)?;
    a.mov(qword_ptr(r15 + rdx + TX_DESC), rax)?;
    a.mov(dword_ptr(r15 + rdx + TX_DESC + 8), 64u32)?;
    a.mov(word_ptr(r15 + rdx + TX_DESC + 12), DESC_NEXT)?;
    a.lea(ebx, dword_ptr(rcx + 1))?;
    a.cmp(ebx, QUEUE_SIZE)?;
    let mut linked = a.create_label();
    a.jb(linked)?;
    a.mov(ebx, 4u32)?;
    a.set_label(&mut linked)?;
    a.mov(word_ptr(r15 + rdx + TX_DESC + 14), bx)?;
    a.inc(ecx)?;
    a.cmp(ecx, QUEUE_SIZE)?;
    a.jb(chain)?;
    for (slot, head) in [0u32, 2, 3, 4].into_iter().enumerate() {
        a.mov(word_ptr(r15 + TX_AVAIL + 4 + 2 * slot as i32), head)?;
    }
    a.mov(word_ptr(r15 + TX_AVAIL + 2), 4u32)?;
    a.mov(qword_ptr(r15 + S_TX_AVAIL), 4)?;
    for l in [s_loop, s_out, s_wrap, s_long] {
        print(a, rt, l)?;
    }
    a.mov(rax, qword_ptr(r15 + S_NOTIFY_TX))?;
    a.mov(word_ptr(rax), 1u32)?;
    print(a, rt, s_kick)?;

    // Wait (bounded) for DEVICE_NEEDS_RESET, then report the status either way.
    let mut wait = a.create_label();
    let mut report = a.create_label();
    deadline(a)?;
    a.set_label(&mut wait)?;
    a.movzx(eax, byte_ptr(r14 + DEVICE_STATUS))?;
    a.test(eax, DEVICE_NEEDS_RESET)?;
    a.jnz(report)?;
    a.pause()?;
    past_deadline(a)?;
    a.jb(wait)?;
    a.movzx(eax, byte_ptr(r14 + DEVICE_STATUS))?;
    a.set_label(&mut report)?;
    a.push(rax)?;
    print(a, rt, s_status)?;
    a.pop(rax)?;
    a.call(rt.put_hex)?;
    print(a, rt, s_done)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)
}
