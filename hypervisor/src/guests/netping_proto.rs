//! netping's protocol part: Ethernet, ARP (RFC 826), IPv4 and ICMP echo (RFC 792), built and
//! parsed in the guest.
//!
//! Frames netping sends:
//! - ARP who-has the peer (broadcast) and ARP replies to who-has for its own address, padded
//!   to 60 bytes;
//! - echo requests: 98 bytes (14 Ethernet + 20 IPv4 + 8 ICMP + 56 payload), IP id = ICMP
//!   sequence, DF set, TTL 64, ICMP id [`ICMP_ID`], payload byte `i` = `seq + i`, both
//!   checksums computed by the guest;
//! - in `echo` mode: echo replies (the request with addresses swapped, type 0, both checksums
//!   recomputed) and reflected frames (MACs swapped; a multicast destination is replaced by
//!   the guest's MAC as source).
//!
//! A reply counts only if it is an IPv4 ICMP echo reply to the guest's address with netping's
//! id, the sequence number of the outstanding request, the 56-byte payload it sent and a
//! valid ICMP checksum. Frames are untrusted: every offset read is checked against the length
//! the device reported first.

use iced_x86::code_asm::*;

use super::asm::{print, Runtime, Strings};
use super::netping::*;
use super::netping_virtio::Driver;
use super::{INFO_NET_COUNT, INFO_NET_IP, INFO_NET_MODE, INFO_NET_PEER};

/// Ethertypes and ARP words as a little-endian 16/32-bit load of the wire bytes reads them.
const ETH_ARP: u32 = 0x0608;
const ETH_IPV4: u32 = 0x0008;
/// htype 1, ptype 0x0800.
const ARP_ETH_IPV4: u32 = 0x0008_0100;
/// hlen 6, plen 4.
const ARP_LENS: u32 = 0x0406;
const ARP_REQUEST: u32 = 0x0100;
const ARP_REPLY: u32 = 0x0200;

/// Labels of the print helpers.
pub struct Printers {
    /// Prints the 6 bytes at RSI as `aa:bb:cc:dd:ee:ff`.
    pub print_mac: CodeLabel,
    /// Prints EAX (an address as it lies in a packet) as `a.b.c.d`.
    pub print_ip: CodeLabel,
}

/// Labels of the protocol routines.
pub struct Proto {
    /// Handles every received frame, posts the buffers again and notifies the device.
    pub poll: CodeLabel,
    /// Broadcasts ARP who-has the peer.
    pub send_arp_request: CodeLabel,
    /// Sends the next echo request and marks it outstanding.
    pub send_echo: CodeLabel,
}

/// Copies `n` (4 or 6) bytes from `src` to `dst` through EAX.
fn copy(a: &mut CodeAssembler, dst: AsmMemoryOperand, src: AsmMemoryOperand, n: i32) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(src))?;
    a.mov(dword_ptr(dst), eax)?;
    if n == 6 {
        a.mov(ax, word_ptr(src + 4))?;
        a.mov(word_ptr(dst + 4), ax)?;
    }
    Ok(())
}

pub fn emit_printers(a: &mut CodeAssembler, rt: &Runtime) -> Result<Printers, IcedError> {
    let mut p = Printers { print_mac: a.create_label(), print_ip: a.create_label() };
    let mut nibble = a.create_label();
    let mut hex2 = a.create_label();

    // nibble: prints the low 4 bits of AL as a hex digit.
    a.set_label(&mut nibble)?;
    let mut digit = a.create_label();
    let mut out = a.create_label();
    a.and(al, 0xf)?;
    a.cmp(al, 10)?;
    a.jb(digit)?;
    a.add(al, (b'a' - 10) as i32)?;
    a.jmp(out)?;
    a.set_label(&mut digit)?;
    a.add(al, b'0' as i32)?;
    a.set_label(&mut out)?;
    a.jmp(rt.putc)?;

    // hex2: prints AL as two hex digits.
    a.set_label(&mut hex2)?;
    a.push(rax)?;
    a.shr(al, 4)?;
    a.call(nibble)?;
    a.pop(rax)?;
    a.jmp(nibble)?;

    a.set_label(&mut p.print_mac)?;
    let mut byte = a.create_label();
    let mut mac_done = a.create_label();
    a.push(rcx)?;
    a.push(rdi)?;
    a.mov(rdi, rsi)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut byte)?;
    a.movzx(eax, byte_ptr(rdi + rcx))?;
    a.call(hex2)?;
    a.inc(ecx)?;
    a.cmp(ecx, 6)?;
    a.je(mac_done)?;
    a.mov(al, b':' as i32)?;
    a.call(rt.putc)?;
    a.jmp(byte)?;
    a.set_label(&mut mac_done)?;
    a.pop(rdi)?;
    a.pop(rcx)?;
    a.ret()?;

    a.set_label(&mut p.print_ip)?;
    let mut octet = a.create_label();
    let mut ip_done = a.create_label();
    a.push(r8)?;
    a.push(rcx)?;
    a.mov(r8d, eax)?;
    a.mov(ecx, 4)?;
    a.set_label(&mut octet)?;
    a.movzx(eax, r8b)?;
    a.call(rt.put_dec)?;
    a.shr(r8d, 8)?;
    a.dec(ecx)?;
    a.jz(ip_done)?;
    a.mov(al, b'.' as i32)?;
    a.call(rt.putc)?;
    a.jmp(octet)?;
    a.set_label(&mut ip_done)?;
    a.pop(rcx)?;
    a.pop(r8)?;
    a.ret()?;
    Ok(p)
}

/// `lea rsi, [base + off]; mov ecx, len; call csum`: EAX = the Internet checksum to store
/// (a little-endian store of it puts the right bytes on the wire).
fn checksum(a: &mut CodeAssembler, csum: CodeLabel, at: AsmMemoryOperand, len: Option<u32>) -> Result<(), IcedError> {
    a.lea(rsi, at)?;
    if let Some(len) = len {
        a.mov(ecx, len)?;
    }
    a.call(csum)
}

/// ECX = the IPv4 total length of the frame at R12 (byte-swapped from the header).
fn ip_total_len(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.movzx(ecx, word_ptr(r12 + 16))?;
    a.rol(cx, 8)
}

pub fn emit_routines(
    a: &mut CodeAssembler,
    rt: &Runtime,
    pr: &Printers,
    d: &Driver,
    s: &mut Strings,
) -> Result<Proto, IcedError> {
    let mut p = Proto { poll: a.create_label(), send_arp_request: a.create_label(), send_echo: a.create_label() };
    let mut csum = a.create_label();
    let mut handle = a.create_label();
    let mut arp_reply = a.create_label();
    let s_is_at = s.add(a, "netping: ");
    let s_is_at2 = s.add(a, " is at ");
    let nl = s.add(a, "\n");
    let s_from = s.add(a, "64 bytes from ");
    let s_seq = s.add(a, ": icmp_seq=");
    let s_reply = s.add(a, " reply\n");
    let s_done = s.add(a, "netping: ");
    let s_done2 = s.add(a, " replies, done\n");
    let s_answered = s.add(a, " frames answered, done\n");
    let s_bad_payload = s.add(a, "netping: a reply with a wrong payload or checksum for icmp_seq=");

    // ---- csum(RSI, ECX) -> EAX; clobbers RCX, RDX, RSI ----
    a.set_label(&mut csum)?;
    let mut word = a.create_label();
    let mut tail = a.create_label();
    let mut fold = a.create_label();
    a.xor(edx, edx)?;
    a.set_label(&mut word)?;
    a.cmp(ecx, 2)?;
    a.jb(tail)?;
    a.movzx(eax, word_ptr(rsi))?;
    a.add(edx, eax)?;
    a.add(rsi, 2)?;
    a.sub(ecx, 2)?;
    a.jmp(word)?;
    a.set_label(&mut tail)?;
    a.test(ecx, ecx)?;
    a.jz(fold)?;
    a.movzx(eax, byte_ptr(rsi))?;
    a.add(edx, eax)?;
    a.set_label(&mut fold)?;
    for _ in 0..2 {
        a.mov(eax, edx)?;
        a.shr(eax, 16)?;
        a.and(edx, 0xffff)?;
        a.add(edx, eax)?;
    }
    a.not(edx)?;
    a.movzx(eax, dx)?;
    a.ret()?;

    // ---- send_arp_request ----
    a.set_label(&mut p.send_arp_request)?;
    a.call(d.tx_slot)?;
    a.mov(dword_ptr(rdi), -1)?;
    a.mov(word_ptr(rdi + 4), 0xffffu32)?;
    copy(a, rdi + 6, r15 + S_MAC, 6)?;
    a.mov(word_ptr(rdi + 12), ETH_ARP)?;
    a.mov(dword_ptr(rdi + 14), ARP_ETH_IPV4)?;
    a.mov(word_ptr(rdi + 18), ARP_LENS)?;
    a.mov(word_ptr(rdi + 20), ARP_REQUEST)?;
    copy(a, rdi + 22, r15 + S_MAC, 6)?;
    copy(a, rdi + 28, rbp + INFO_NET_IP, 4)?;
    copy(a, rdi + 38, rbp + INFO_NET_PEER, 4)?;
    a.mov(ecx, 60u32)?;
    a.call(d.tx_send)?;
    a.jmp(d.tx_kick)?;

    // ---- arp_reply: answers the who-has at R12 ----
    a.set_label(&mut arp_reply)?;
    a.call(d.tx_slot)?;
    copy(a, rdi + 0, r12 + 22, 6)?;
    copy(a, rdi + 6, r15 + S_MAC, 6)?;
    a.mov(word_ptr(rdi + 12), ETH_ARP)?;
    a.mov(dword_ptr(rdi + 14), ARP_ETH_IPV4)?;
    a.mov(word_ptr(rdi + 18), ARP_LENS)?;
    a.mov(word_ptr(rdi + 20), ARP_REPLY)?;
    copy(a, rdi + 22, r15 + S_MAC, 6)?;
    copy(a, rdi + 28, rbp + INFO_NET_IP, 4)?;
    copy(a, rdi + 32, r12 + 22, 6)?;
    copy(a, rdi + 38, r12 + 28, 4)?;
    a.mov(ecx, 60u32)?;
    a.call(d.tx_send)?;
    a.jmp(d.tx_kick)?;

    // ---- send_echo ----
    a.set_label(&mut p.send_echo)?;
    a.inc(word_ptr(r15 + S_SEQ))?;
    a.call(d.tx_slot)?;
    a.mov(rbx, rdi)?;
    copy(a, rbx + 0, r15 + S_PEER_MAC, 6)?;
    copy(a, rbx + 6, r15 + S_MAC, 6)?;
    a.mov(word_ptr(rbx + 12), ETH_IPV4)?;
    a.mov(byte_ptr(rbx + 14), 0x45u32)?;
    a.mov(word_ptr(rbx + 16), u32::from((20u16 + 8 + PING_PAYLOAD as u16).swap_bytes()))?;
    a.movzx(eax, word_ptr(r15 + S_SEQ))?;
    a.rol(ax, 8)?;
    a.mov(word_ptr(rbx + 18), ax)?;
    a.mov(word_ptr(rbx + 40), ax)?;
    a.mov(word_ptr(rbx + 20), 0x0040u32)?;
    a.mov(byte_ptr(rbx + 22), 64u32)?;
    a.mov(byte_ptr(rbx + 23), 1u32)?;
    copy(a, rbx + 26, rbp + INFO_NET_IP, 4)?;
    copy(a, rbx + 30, rbp + INFO_NET_PEER, 4)?;
    checksum(a, csum, rbx + 14, Some(20))?;
    a.mov(word_ptr(rbx + 24), ax)?;
    a.mov(byte_ptr(rbx + 34), 8u32)?;
    a.mov(word_ptr(rbx + 38), u32::from(ICMP_ID.swap_bytes()))?;
    let mut fill = a.create_label();
    a.movzx(eax, word_ptr(r15 + S_SEQ))?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut fill)?;
    a.lea(edx, dword_ptr(rax + rcx))?;
    a.mov(byte_ptr(rbx + rcx + 42), dl)?;
    a.inc(ecx)?;
    a.cmp(ecx, PING_PAYLOAD)?;
    a.jb(fill)?;
    checksum(a, csum, rbx + 34, Some(8 + PING_PAYLOAD))?;
    a.mov(word_ptr(rbx + 36), ax)?;
    a.mov(ecx, 42 + PING_PAYLOAD)?;
    a.call(d.tx_send)?;
    a.call(d.tx_kick)?;
    a.mov(qword_ptr(r15 + S_OUTSTANDING), 1)?;
    a.ret()?;

    // ---- poll ----
    a.set_label(&mut p.poll)?;
    let mut empty = a.create_label();
    let mut no_kick = a.create_label();
    a.call(d.rx_next)?;
    a.test(rdi, rdi)?;
    a.jz(empty)?;
    a.mov(r12, rdi)?;
    a.mov(r13d, ecx)?;
    a.push(rbx)?;
    a.call(handle)?;
    a.pop(rbx)?;
    a.call(d.rx_release)?;
    a.jmp(p.poll)?;
    a.set_label(&mut empty)?;
    a.cmp(qword_ptr(r15 + S_RELEASED), 0)?;
    a.je(no_kick)?;
    a.call(d.rx_kick)?;
    a.set_label(&mut no_kick)?;
    a.ret()?;

    // ---- handle: the frame at R12, R13D bytes ----
    a.set_label(&mut handle)?;
    let mut done = a.create_label();
    let mut arp = a.create_label();
    let mut ipv4 = a.create_label();
    let mut other = a.create_label();
    let mut arp_req = a.create_label();
    let mut icmp_req = a.create_label();
    let mut icmp_reply = a.create_label();
    let mut answered = a.create_label();
    let mut bad_payload = a.create_label();
    a.cmp(r13d, 14)?;
    a.jb(done)?;
    a.movzx(eax, word_ptr(r12 + 12))?;
    a.cmp(eax, ETH_ARP)?;
    a.je(arp)?;
    a.cmp(eax, ETH_IPV4)?;
    a.je(ipv4)?;
    a.jmp(other)?;

    a.set_label(&mut arp)?;
    a.cmp(r13d, 42)?;
    a.jb(done)?;
    a.cmp(dword_ptr(r12 + 14), ARP_ETH_IPV4)?;
    a.jne(done)?;
    a.cmp(word_ptr(r12 + 18), ARP_LENS)?;
    a.jne(done)?;
    a.movzx(eax, word_ptr(r12 + 20))?;
    a.cmp(eax, ARP_REQUEST)?;
    a.je(arp_req)?;
    a.cmp(eax, ARP_REPLY)?;
    a.jne(done)?;
    a.cmp(qword_ptr(r15 + S_PEER_KNOWN), 0)?;
    a.jne(done)?;
    a.mov(eax, dword_ptr(r12 + 28))?;
    a.cmp(eax, dword_ptr(rbp + INFO_NET_PEER))?;
    a.jne(done)?;
    copy(a, r15 + S_PEER_MAC, r12 + 22, 6)?;
    // S_TRIES runs on: only a reply to an echo request proves the path and resets it.
    a.mov(qword_ptr(r15 + S_PEER_KNOWN), 1)?;
    print(a, rt, s_is_at)?;
    a.mov(eax, dword_ptr(rbp + INFO_NET_PEER))?;
    a.call(pr.print_ip)?;
    print(a, rt, s_is_at2)?;
    a.lea(rsi, qword_ptr(r15 + S_PEER_MAC))?;
    a.call(pr.print_mac)?;
    print(a, rt, nl)?;
    a.ret()?;
    a.set_label(&mut arp_req)?;
    a.mov(eax, dword_ptr(r12 + 38))?;
    a.cmp(eax, dword_ptr(rbp + INFO_NET_IP))?;
    a.jne(done)?;
    a.jmp(arp_reply)?;

    a.set_label(&mut ipv4)?;
    a.cmp(r13d, 42)?;
    a.jb(other)?;
    a.cmp(byte_ptr(r12 + 14), 0x45)?;
    a.jne(other)?;
    a.mov(eax, dword_ptr(r12 + 30))?;
    a.cmp(eax, dword_ptr(rbp + INFO_NET_IP))?;
    a.jne(other)?;
    a.cmp(byte_ptr(r12 + 23), 1)?;
    a.jne(other)?;
    ip_total_len(a)?;
    a.cmp(ecx, 28)?;
    a.jb(other)?;
    a.lea(eax, dword_ptr(rcx + 14))?;
    a.cmp(eax, r13d)?;
    a.ja(other)?;
    a.movzx(eax, byte_ptr(r12 + 34))?;
    a.cmp(eax, 8)?;
    a.je(icmp_req)?;
    a.test(eax, eax)?;
    a.je(icmp_reply)?;
    a.jmp(other)?;

    // An echo request to the guest (echo mode): answer it.
    a.set_label(&mut icmp_req)?;
    a.cmp(qword_ptr(rbp + INFO_NET_MODE), NetMode::Echo.word() as i32)?;
    a.jne(done)?;
    a.call(d.tx_slot)?;
    a.mov(rbx, rdi)?;
    a.mov(rsi, r12)?;
    a.mov(ecx, r13d)?;
    a.rep().movsb()?;
    copy(a, rbx + 0, r12 + 6, 6)?;
    copy(a, rbx + 6, r15 + S_MAC, 6)?;
    copy(a, rbx + 30, r12 + 26, 4)?;
    copy(a, rbx + 26, rbp + INFO_NET_IP, 4)?;
    a.mov(byte_ptr(rbx + 22), 64u32)?;
    a.mov(word_ptr(rbx + 24), 0u32)?;
    checksum(a, csum, rbx + 14, Some(20))?;
    a.mov(word_ptr(rbx + 24), ax)?;
    a.mov(byte_ptr(rbx + 34), 0u32)?;
    a.mov(word_ptr(rbx + 36), 0u32)?;
    ip_total_len(a)?;
    a.sub(ecx, 20)?;
    checksum(a, csum, rbx + 34, None)?;
    a.mov(word_ptr(rbx + 36), ax)?;
    a.mov(ecx, r13d)?;
    a.call(d.tx_send)?;
    a.call(d.tx_kick)?;
    a.jmp(answered)?;

    // An echo reply (ping mode): the outstanding request's?
    a.set_label(&mut icmp_reply)?;
    a.cmp(qword_ptr(rbp + INFO_NET_MODE), NetMode::Ping.word() as i32)?;
    a.jne(done)?;
    a.cmp(qword_ptr(r15 + S_OUTSTANDING), 0)?;
    a.je(done)?;
    a.cmp(word_ptr(r12 + 38), u32::from(ICMP_ID.swap_bytes()))?;
    a.jne(done)?;
    a.movzx(eax, word_ptr(r12 + 40))?;
    a.rol(ax, 8)?;
    a.cmp(ax, word_ptr(r15 + S_SEQ))?;
    a.jne(done)?;
    ip_total_len(a)?;
    a.cmp(ecx, 28 + PING_PAYLOAD)?;
    a.jne(bad_payload)?;
    let mut check = a.create_label();
    a.movzx(eax, word_ptr(r15 + S_SEQ))?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut check)?;
    a.lea(edx, dword_ptr(rax + rcx))?;
    a.cmp(byte_ptr(r12 + rcx + 42), dl)?;
    a.jne(bad_payload)?;
    a.inc(ecx)?;
    a.cmp(ecx, PING_PAYLOAD)?;
    a.jb(check)?;
    // A valid checksum sums (with itself) to 0xffff: csum() returns 0.
    checksum(a, csum, r12 + 34, Some(8 + PING_PAYLOAD))?;
    a.test(eax, eax)?;
    a.jnz(bad_payload)?;
    print(a, rt, s_from)?;
    a.mov(eax, dword_ptr(r12 + 26))?;
    a.call(pr.print_ip)?;
    print(a, rt, s_seq)?;
    a.movzx(eax, word_ptr(r15 + S_SEQ))?;
    a.call(rt.put_dec)?;
    print(a, rt, s_reply)?;
    a.mov(qword_ptr(r15 + S_OUTSTANDING), 0)?;
    a.mov(qword_ptr(r15 + S_TRIES), 0)?;
    super::netping::rdtsc64(a)?;
    a.mov(qword_ptr(r15 + S_LAST_REPLY_TSC), rax)?;
    a.inc(qword_ptr(r15 + S_REPLIES))?;
    a.mov(rax, qword_ptr(rbp + INFO_NET_COUNT))?;
    a.test(rax, rax)?;
    a.jz(done)?;
    a.cmp(qword_ptr(r15 + S_REPLIES), rax)?;
    a.jb(done)?;
    print(a, rt, s_done)?;
    a.mov(rax, qword_ptr(r15 + S_REPLIES))?;
    a.call(rt.put_dec)?;
    print(a, rt, s_done2)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)?;

    a.set_label(&mut bad_payload)?;
    print(a, rt, s_bad_payload)?;
    a.movzx(eax, word_ptr(r15 + S_SEQ))?;
    a.call(rt.put_dec)?;
    print(a, rt, nl)?;
    a.ret()?;

    // Anything else (echo mode): reflect it to its sender; never from a multicast source.
    a.set_label(&mut other)?;
    let mut unicast_dst = a.create_label();
    let mut sent = a.create_label();
    a.cmp(qword_ptr(rbp + INFO_NET_MODE), NetMode::Echo.word() as i32)?;
    a.jne(done)?;
    a.test(byte_ptr(r12 + 6), 1)?;
    a.jnz(done)?;
    a.call(d.tx_slot)?;
    a.mov(rbx, rdi)?;
    a.mov(rsi, r12)?;
    a.mov(ecx, r13d)?;
    a.rep().movsb()?;
    copy(a, rbx + 0, r12 + 6, 6)?;
    a.test(byte_ptr(r12), 1)?;
    a.jz(unicast_dst)?;
    copy(a, rbx + 6, r15 + S_MAC, 6)?;
    a.jmp(sent)?;
    a.set_label(&mut unicast_dst)?;
    copy(a, rbx + 6, r12 + 0, 6)?;
    a.set_label(&mut sent)?;
    a.mov(ecx, r13d)?;
    a.call(d.tx_send)?;
    a.call(d.tx_kick)?;

    a.set_label(&mut answered)?;
    a.inc(qword_ptr(r15 + S_ANSWERED))?;
    a.mov(rax, qword_ptr(rbp + INFO_NET_COUNT))?;
    a.test(rax, rax)?;
    a.jz(done)?;
    a.cmp(qword_ptr(r15 + S_ANSWERED), rax)?;
    a.jb(done)?;
    print(a, rt, s_done)?;
    a.mov(rax, qword_ptr(r15 + S_ANSWERED))?;
    a.call(rt.put_dec)?;
    print(a, rt, s_answered)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)?;

    a.set_label(&mut done)?;
    a.ret()?;
    Ok(p)
}
