//! `netping`: a CPL3 guest that drives NIC 0 (virtio-net, modern PCI transport) through the
//! MMIO BARs snapvisor places when no firmware runs ([`crate::net::builtin_bars`]), and speaks
//! just enough ARP, IPv4 and ICMP to ping and be pinged. The data-path tests' and `snapvisor
//! bench net`'s guest.
//!
//! The guest does the protocol work itself: it resolves the peer's MAC with ARP, builds echo
//! requests (IP and ICMP checksums computed in the guest), matches replies by id, sequence and
//! payload, and answers ARP requests for its own address in every mode. The driver part
//! ([`super::netping_virtio`]) polls the used rings: MSI-X stays disabled and vectors at
//! `0xffff`; `rx` mode waits for the device's interrupt on the VM's interrupt line.
//!
//! Modes ([`NetMode`], `--mode`):
//! - `ping`: ARP who-has the peer (retried every [`RETRY_MS`] ms), then echo requests, one
//!   at a time, `--ping-interval-ms` apart; prints `64 bytes from A.B.C.D: icmp_seq=N reply`
//!   per reply and exits 0 after `--count` replies (0: never). An unanswered request is
//!   resent with the next sequence number after [`RETRY_MS`]; after [`MAX_TRIES`] silent
//!   tries in a row it prints `netping: no ARP reply ...` (status 2) or `netping: no echo
//!   reply ...` (status 3) and exits.
//! - `echo`: answers ICMP echo requests to its address and reflects every other frame to its
//!   sender (MACs swapped); exits 0 after `--count` answered frames (0: never).
//! - `evil`: posts malformed chains on the transmit queue (a descriptor loop, an address
//!   outside RAM, an address + length that wraps, a chain longer than the queue), notifies,
//!   prints what it did and the device status it then reads, and exits 0.
//! - `tx`: sends `--count` frames of `--frame-size` bytes (broadcast, ethertype 0x88b5) as
//!   fast as the ring allows, waits until the device has consumed them all and prints
//!   `netping tx: frames N bytes B tsc T`.
//! - `rx`: counts received frames of ethertype 0x88b5 (others are dropped); after `--count`
//!   frames, or [`RX_IDLE_MS`] ms without a frame once one arrived, prints `netping rx: frames
//!   N bytes B tsc T` (T: TSC cycles from the first frame to the last) and exits 0. Between
//!   bursts it waits for the device's interrupt as an interrupt-driven driver halts (the exit
//!   device's interrupt-wait register), instead of spinning on the used ring.
//!
//! Guest memory (all below the RAM the other guests fill is left alone; netping needs 4 MiB):
//!
//! ```text
//! NET_BASE + 0x00000  rx descriptor table (256 x 16 bytes)
//!          + 0x01000  rx available ring
//!          + 0x02000  rx used ring
//!          + 0x04000  tx descriptor table, + 0x05000 available ring, + 0x06000 used ring
//!          + 0x08000  driver state (the S_* fields)
//!          + 0x10000  256 rx buffers of 2 KiB (12-byte virtio-net header + frame)
//!          + 0x90000  256 tx buffers of 2 KiB; descriptor i always points at buffer i
//! ```

use iced_x86::code_asm::*;

use super::asm::{begin, load_boot_info, print, Io, Runtime, Strings};
use super::netping_proto as proto;
use super::netping_virtio as drv;
use super::{INFO_NET_COUNT, INFO_NET_FRAME, INFO_NET_INTERVAL, INFO_NET_MODE, INFO_NET_TSC_MS, INFO_NET_VIRTIO_BAR};

/// Where the rings, state and buffers live (guest-physical; 2 MiB, where the fill guests'
/// ranges start: netping fills nothing).
pub const NET_BASE: u64 = 0x20_0000;
pub const RX_DESC: i32 = 0;
pub const RX_AVAIL: i32 = 0x1000;
pub const RX_USED: i32 = 0x2000;
pub const TX_DESC: i32 = 0x4000;
pub const TX_AVAIL: i32 = 0x5000;
pub const TX_USED: i32 = 0x6000;
pub const STATE: i32 = 0x8000;
pub const RX_BUFS: i32 = 0x1_0000;
pub const TX_BUFS: i32 = 0x9_0000;
pub const NET_END: i32 = 0x11_0000;
/// Queue size the driver uses (the contract's device offers at least this many).
pub const QUEUE_SIZE: u32 = 256;
/// Bytes per buffer.
pub const BUF_SIZE: u32 = 2048;
/// The virtio-net header (virtio 1.x: always 12 bytes, `num_buffers` included).
pub const NET_HDR: u32 = 12;
/// Smallest and largest frame `--frame-size` accepts (Ethernet without FCS).
pub const MIN_FRAME: u64 = 60;
pub const MAX_FRAME: u64 = 1514;
/// Least guest memory netping needs.
pub const MIN_MEM: u64 = NET_BASE + NET_END as u64;

/// Resend ARP or an echo request after this long without an answer.
pub const RETRY_MS: u64 = 500;
/// Give up after this many unanswered tries in a row.
pub const MAX_TRIES: u64 = 20;
/// `rx`: stop this long after the last frame.
pub const RX_IDLE_MS: u64 = 1000;
/// The ICMP identifier of netping's echo requests.
pub const ICMP_ID: u16 = 0x4e50;
/// Payload bytes of an echo request (byte `i` = `seq + i`): 64-byte ICMP messages, as ping's.
pub const PING_PAYLOAD: u32 = 56;
/// Ethertype of `tx` frames (IEEE local experimental).
pub const TX_ETHERTYPE: u16 = 0x88b5;

// Driver state, at NET_BASE + STATE + S_*.
pub(super) const S_MAC: i32 = STATE;
pub(super) const S_PEER_MAC: i32 = STATE + 8;
pub(super) const S_PEER_KNOWN: i32 = STATE + 16;
pub(super) const S_TX_AVAIL: i32 = STATE + 24;
pub(super) const S_RX_USED: i32 = STATE + 32;
pub(super) const S_RX_AVAIL: i32 = STATE + 40;
pub(super) const S_SEQ: i32 = STATE + 48;
pub(super) const S_OUTSTANDING: i32 = STATE + 56;
pub(super) const S_LAST_TX_TSC: i32 = STATE + 64;
pub(super) const S_LAST_REPLY_TSC: i32 = STATE + 72;
pub(super) const S_REPLIES: i32 = STATE + 80;
pub(super) const S_TRIES: i32 = STATE + 88;
pub(super) const S_NOTIFY_RX: i32 = STATE + 96;
pub(super) const S_NOTIFY_TX: i32 = STATE + 104;
pub(super) const S_FRAMES: i32 = STATE + 112;
pub(super) const S_BYTES: i32 = STATE + 120;
pub(super) const S_FIRST_TSC: i32 = STATE + 128;
pub(super) const S_LAST_RX_TSC: i32 = STATE + 136;
pub(super) const S_RETRY_TSC: i32 = STATE + 144;
pub(super) const S_INTERVAL_TSC: i32 = STATE + 152;
pub(super) const S_IDLE_TSC: i32 = STATE + 160;
pub(super) const S_RELEASED: i32 = STATE + 168;
pub(super) const S_ANSWERED: i32 = STATE + 176;
/// Scratch for the MAC read again (8 bytes, the last two zero like S_MAC's).
pub(super) const S_NEW_MAC: i32 = STATE + 184;

/// What netping does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    #[default]
    Ping,
    Echo,
    Evil,
    Tx,
    Rx,
}

impl NetMode {
    pub fn word(self) -> u64 {
        match self {
            NetMode::Ping => 0,
            NetMode::Echo => 1,
            NetMode::Evil => 2,
            NetMode::Tx => 3,
            NetMode::Rx => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NetMode::Ping => "ping",
            NetMode::Echo => "echo",
            NetMode::Evil => "evil",
            NetMode::Tx => "tx",
            NetMode::Rx => "rx",
        }
    }
}

/// netping's parameters, as the boot info carries them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetParams {
    pub mode: NetMode,
    pub ip: [u8; 4],
    pub prefix: u8,
    pub peer: [u8; 4],
    /// Replies (ping), answered frames (echo), frames (tx, rx); 0 = no limit.
    pub count: u64,
    /// Ethernet frame bytes without FCS (tx).
    pub frame_size: u64,
    /// ping: wait this long after a reply before the next request.
    pub interval_ms: u64,
}

impl NetParams {
    /// The netmask as the guest compares it (network byte order in memory).
    pub fn netmask(&self) -> [u8; 4] {
        let bits = u32::MAX.checked_shl(32 - u32::from(self.prefix.min(32))).unwrap_or(0);
        bits.to_be_bytes()
    }
}

/// An IPv4 address as a boot-info word: its bytes in memory are the address in network order,
/// so the guest compares it with a packet's field in one load.
pub fn ip_word(ip: [u8; 4]) -> u64 {
    u64::from(u32::from_le_bytes(ip))
}

/// The host's TSC cycles per millisecond (KVM guests see the host's TSC rate unless it is
/// scaled, which snapvisor does only to restore a snapshot from another host), measured over
/// 20 ms. netping only uses it for retry timers and the rate it reports.
pub fn host_tsc_per_ms() -> u64 {
    fn tsc() -> u64 {
        // SAFETY: RDTSC reads a counter; it has no memory effects and is available on every
        // x86-64 CPU KVM runs on.
        #[allow(unused_unsafe)]
        unsafe {
            std::arch::x86_64::_rdtsc()
        }
    }
    let t0 = std::time::Instant::now();
    let c0 = tsc();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let c1 = tsc();
    let us = t0.elapsed().as_micros().max(1) as u64;
    (c1.wrapping_sub(c0).saturating_mul(1000) / us).max(1)
}

/// rax = TSC; clobbers rdx.
pub(super) fn rdtsc64(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// Prints `s` and exits with `status`.
pub(super) fn fail(a: &mut CodeAssembler, rt: &Runtime, s: CodeLabel, status: u32) -> Result<(), IcedError> {
    print(a, rt, s)?;
    a.mov(eax, status)?;
    a.jmp(rt.exit)
}

/// Register use throughout: RBP the boot info, R15 [`NET_BASE`], R14 the virtio BAR; R12/R13
/// a received frame and its length while it is handled. Routines clobber RAX, RBX, RCX, RDX,
/// RSI, RDI and R8-R11; loop state lives in the S_* fields.
pub fn emit(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let rt = begin(a, Io::Mmio)?;
    let mut s = Strings::default();
    let s_bad = s.add(a, "netping: no boot info\n");
    let mut bad_info = a.create_label();

    load_boot_info(a, bad_info)?;
    a.mov(r15, NET_BASE)?;
    a.mov(r14, qword_ptr(rbp + INFO_NET_VIRTIO_BAR))?;
    // Zero rings and state (RAM may hold anything, e.g. after a reset).
    a.mov(rdi, r15)?;
    a.mov(ecx, (RX_BUFS / 8) as u32)?;
    a.xor(eax, eax)?;
    a.rep().stosq()?;
    // Timers in TSC cycles.
    a.mov(rax, qword_ptr(rbp + INFO_NET_TSC_MS))?;
    a.imul_3(rdx, rax, RETRY_MS as i32)?;
    a.mov(qword_ptr(r15 + S_RETRY_TSC), rdx)?;
    a.imul_3(rdx, rax, RX_IDLE_MS as i32)?;
    a.mov(qword_ptr(r15 + S_IDLE_TSC), rdx)?;
    a.imul_2(rax, qword_ptr(rbp + INFO_NET_INTERVAL))?;
    a.mov(qword_ptr(r15 + S_INTERVAL_TSC), rax)?;

    // The routines are only called: jump over them.
    let mut main = a.create_label();
    a.jmp(main)?;
    let pr = proto::emit_printers(a, &rt)?;
    let d = drv::emit_routines(a, &rt, &pr, &mut s)?;
    let p = proto::emit_routines(a, &rt, &pr, &d, &mut s)?;
    a.set_label(&mut main)?;
    a.call(d.init)?;

    let mut echo = a.create_label();
    let mut evil = a.create_label();
    let mut tx = a.create_label();
    let mut rx = a.create_label();
    a.mov(rax, qword_ptr(rbp + INFO_NET_MODE))?;
    a.cmp(rax, NetMode::Echo.word() as i32)?;
    a.je(echo)?;
    a.cmp(rax, NetMode::Evil.word() as i32)?;
    a.je(evil)?;
    a.cmp(rax, NetMode::Tx.word() as i32)?;
    a.je(tx)?;
    a.cmp(rax, NetMode::Rx.word() as i32)?;
    a.je(rx)?;
    emit_ping_loop(a, &rt, &d, &p, &mut s)?;

    a.set_label(&mut echo)?;
    a.call(p.poll)?;
    a.pause()?;
    a.jmp(echo)?;

    a.set_label(&mut evil)?;
    drv::emit_evil(a, &rt, &mut s)?;
    a.set_label(&mut tx)?;
    emit_tx(a, &rt, &d, &mut s)?;
    a.set_label(&mut rx)?;
    emit_rx(a, &rt, &d, &mut s)?;

    a.set_label(&mut bad_info)?;
    fail(a, &rt, s_bad, 4)?;
    s.emit(a)
}

/// ARP for the peer, then echo requests one at a time; never returns.
fn emit_ping_loop(
    a: &mut CodeAssembler,
    rt: &Runtime,
    d: &drv::Driver,
    p: &proto::Proto,
    s: &mut Strings,
) -> Result<(), IcedError> {
    let s_no_arp = s.add(a, "netping: no ARP reply from the peer after 20 tries, giving up\n");
    let s_no_echo = s.add(a, "netping: no echo reply from the peer after 20 tries, giving up\n");
    let s_timeout = s.add(a, "netping: icmp_seq=");
    let s_timeout2 = s.add(a, " timeout\n");
    let mut top = a.create_label();
    let mut have_peer = a.create_label();
    let mut waiting = a.create_label();
    let mut send = a.create_label();
    let mut arp_fail = a.create_label();
    let mut echo_fail = a.create_label();

    a.set_label(&mut top)?;
    a.call(p.poll)?;
    rdtsc64(a)?;
    a.mov(rdx, rax)?;
    a.sub(rdx, qword_ptr(r15 + S_LAST_TX_TSC))?;
    a.cmp(qword_ptr(r15 + S_PEER_KNOWN), 0)?;
    a.jne(have_peer)?;
    // Resolving the peer: ARP every RETRY_MS (at once the first time: the last TX TSC is 0).
    a.cmp(rdx, qword_ptr(r15 + S_RETRY_TSC))?;
    a.jb(top)?;
    a.cmp(qword_ptr(r15 + S_TRIES), MAX_TRIES as i32)?;
    a.jae(arp_fail)?;
    a.inc(qword_ptr(r15 + S_TRIES))?;
    a.mov(qword_ptr(r15 + S_LAST_TX_TSC), rax)?;
    a.call(d.refresh_mac)?;
    a.call(p.send_arp_request)?;
    a.jmp(top)?;

    a.set_label(&mut have_peer)?;
    a.cmp(qword_ptr(r15 + S_OUTSTANDING), 0)?;
    a.jne(waiting)?;
    // Idle: the next request once the interval since the last reply has passed.
    a.mov(rdx, rax)?;
    a.sub(rdx, qword_ptr(r15 + S_LAST_REPLY_TSC))?;
    a.cmp(rdx, qword_ptr(r15 + S_INTERVAL_TSC))?;
    a.jb(top)?;
    a.jmp(send)?;

    a.set_label(&mut waiting)?;
    a.cmp(rdx, qword_ptr(r15 + S_RETRY_TSC))?;
    a.jb(top)?;
    a.cmp(qword_ptr(r15 + S_TRIES), MAX_TRIES as i32)?;
    a.jae(echo_fail)?;
    print(a, rt, s_timeout)?;
    a.movzx(eax, word_ptr(r15 + S_SEQ))?;
    a.call(rt.put_dec)?;
    print(a, rt, s_timeout2)?;
    // The peer may have moved (a restore onto another tap): resolve it again.
    a.mov(qword_ptr(r15 + S_PEER_KNOWN), 0)?;
    a.mov(qword_ptr(r15 + S_OUTSTANDING), 0)?;
    a.mov(qword_ptr(r15 + S_LAST_TX_TSC), 0)?;
    a.jmp(top)?;

    // A new MAC (a clone given its own): announce it by resolving the peer again.
    a.set_label(&mut send)?;
    let mut same_mac = a.create_label();
    a.call(d.refresh_mac)?;
    a.test(eax, eax)?;
    a.jz(same_mac)?;
    a.mov(qword_ptr(r15 + S_PEER_KNOWN), 0)?;
    a.mov(qword_ptr(r15 + S_LAST_TX_TSC), 0)?;
    a.jmp(top)?;
    a.set_label(&mut same_mac)?;
    a.inc(qword_ptr(r15 + S_TRIES))?;
    rdtsc64(a)?;
    a.mov(qword_ptr(r15 + S_LAST_TX_TSC), rax)?;
    a.call(p.send_echo)?;
    a.jmp(top)?;

    a.set_label(&mut arp_fail)?;
    fail(a, rt, s_no_arp, 2)?;
    a.set_label(&mut echo_fail)?;
    fail(a, rt, s_no_echo, 3)
}

/// Prints `<prefix>frames N bytes B tsc T\n` from S_FRAMES, S_BYTES and R13 and exits 0.
fn emit_report(a: &mut CodeAssembler, rt: &Runtime, s: &mut Strings, prefix: &str) -> Result<(), IcedError> {
    let s_pre = s.add(a, prefix);
    let s_bytes = s.add(a, " bytes ");
    let s_tsc = s.add(a, " tsc ");
    let s_nl = s.add(a, "\n");
    print(a, rt, s_pre)?;
    a.mov(rax, qword_ptr(r15 + S_FRAMES))?;
    a.call(rt.put_dec)?;
    print(a, rt, s_bytes)?;
    a.mov(rax, qword_ptr(r15 + S_BYTES))?;
    a.call(rt.put_dec)?;
    print(a, rt, s_tsc)?;
    a.mov(rax, r13)?;
    a.call(rt.put_dec)?;
    print(a, rt, s_nl)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)
}

/// `tx`: `count` frames of `frame_size` bytes, kicking the device every 32 frames and when
/// the ring is full.
fn emit_tx(a: &mut CodeAssembler, rt: &Runtime, d: &drv::Driver, s: &mut Strings) -> Result<(), IcedError> {
    let s_go = s.add(a, "netping tx: sending\n");
    let mut top = a.create_label();
    let mut room = a.create_label();
    let mut no_kick = a.create_label();
    let mut done = a.create_label();
    print(a, rt, s_go)?;
    rdtsc64(a)?;
    a.mov(qword_ptr(r15 + S_FIRST_TSC), rax)?;
    a.set_label(&mut top)?;
    a.mov(rax, qword_ptr(r15 + S_FRAMES))?;
    a.cmp(rax, qword_ptr(rbp + INFO_NET_COUNT))?;
    a.jae(done)?;
    // A full ring: kick before waiting for room.
    a.call(d.tx_room)?;
    a.test(eax, eax)?;
    a.jnz(room)?;
    a.call(d.tx_kick)?;
    a.set_label(&mut room)?;
    a.call(d.tx_slot)?;
    a.mov(dword_ptr(rdi), -1)?;
    a.mov(word_ptr(rdi + 4), 0xffff)?;
    a.mov(eax, dword_ptr(r15 + S_MAC))?;
    a.mov(dword_ptr(rdi + 6), eax)?;
    a.mov(ax, word_ptr(r15 + S_MAC + 4))?;
    a.mov(word_ptr(rdi + 10), ax)?;
    a.mov(word_ptr(rdi + 12), u32::from(TX_ETHERTYPE.swap_bytes()))?;
    a.mov(rax, qword_ptr(r15 + S_FRAMES))?;
    a.mov(qword_ptr(rdi + 14), rax)?;
    a.mov(rcx, qword_ptr(rbp + INFO_NET_FRAME))?;
    a.add(qword_ptr(r15 + S_BYTES), rcx)?;
    a.call(d.tx_send)?;
    a.inc(qword_ptr(r15 + S_FRAMES))?;
    a.test(qword_ptr(r15 + S_FRAMES), 31)?;
    a.jnz(no_kick)?;
    a.call(d.tx_kick)?;
    a.set_label(&mut no_kick)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.call(d.tx_kick)?;
    a.call(d.tx_drain)?;
    rdtsc64(a)?;
    a.sub(rax, qword_ptr(r15 + S_FIRST_TSC))?;
    a.mov(r13, rax)?;
    emit_report(a, rt, s, "netping tx: frames ")
}

/// Available-ring flag `VRING_AVAIL_F_NO_INTERRUPT`: the driver does not want the used-buffer
/// interrupt.
const AVAIL_NO_INTERRUPT: u32 = 1;

/// `rx`: counts frames until `count` (if non-zero) or until idle after the first frame.
///
/// It waits for frames as an interrupt-driven driver does (NAPI), not by spinning: while
/// frames come it polls the used ring with the device's interrupt suppressed
/// (`VRING_AVAIL_F_NO_INTERRUPT`); when the ring is empty it gives its buffers back, allows
/// the interrupt, looks at the used index once more (a frame published before the flag was
/// seen raised no interrupt: without this look it would wait for the next frame) and reads
/// the exit device's interrupt-wait register, which parks its vCPU until the device raises
/// the interrupt (or a pause, or `WAIT_MAX`, after which it looks again); awake, it
/// suppresses the interrupt again.
fn emit_rx(a: &mut CodeAssembler, rt: &Runtime, d: &drv::Driver, s: &mut Strings) -> Result<(), IcedError> {
    let s_go = s.add(a, "netping rx: ready\n");
    let mut top = a.create_label();
    let mut frame = a.create_label();
    let mut not_first = a.create_label();
    let mut done = a.create_label();
    let mut no_release = a.create_label();
    let mut foreign = a.create_label();
    let mut park = a.create_label();
    let mut awake = a.create_label();
    print(a, rt, s_go)?;
    a.mov(word_ptr(r15 + RX_AVAIL), AVAIL_NO_INTERRUPT)?;
    a.set_label(&mut top)?;
    a.call(d.rx_next)?;
    a.test(rdi, rdi)?;
    a.jnz(frame)?;
    // Nothing pending: give back what was taken, then check for the end.
    a.cmp(qword_ptr(r15 + S_RELEASED), 0)?;
    a.je(no_release)?;
    a.call(d.rx_kick)?;
    a.set_label(&mut no_release)?;
    a.cmp(qword_ptr(r15 + S_FRAMES), 0)?;
    a.je(park)?;
    rdtsc64(a)?;
    a.sub(rax, qword_ptr(r15 + S_LAST_RX_TSC))?;
    a.cmp(rax, qword_ptr(r15 + S_IDLE_TSC))?;
    a.jae(done)?;
    // Allow the interrupt, look again (the store must be visible before the load: MFENCE;
    // the device fences between publishing and reading the flag), and wait for it.
    a.set_label(&mut park)?;
    a.mov(word_ptr(r15 + RX_AVAIL), 0u32)?;
    a.mfence()?;
    a.movzx(eax, word_ptr(r15 + RX_USED + 2))?;
    a.cmp(ax, word_ptr(r15 + S_RX_USED))?;
    a.jne(awake)?;
    a.mov(rbx, crate::layout::EXIT_MMIO)?;
    a.mov(eax, dword_ptr(rbx + devices::exit::REG_IRQ_WAIT as i32))?;
    a.set_label(&mut awake)?;
    a.mov(word_ptr(r15 + RX_AVAIL), AVAIL_NO_INTERRUPT)?;
    a.jmp(top)?;

    // Only the benchmark's frames count (ethertype 0x88b5): not what the host's stack sends
    // on its own when the tap comes up (IPv6 router solicitations and the like).
    a.set_label(&mut frame)?;
    let mut ours = a.create_label();
    a.cmp(ecx, 14)?;
    a.jb(foreign)?;
    a.cmp(word_ptr(rdi + 12), u32::from(TX_ETHERTYPE.swap_bytes()))?;
    a.je(ours)?;
    a.set_label(&mut foreign)?;
    a.call(d.rx_release)?;
    a.jmp(top)?;
    a.set_label(&mut ours)?;
    a.add(qword_ptr(r15 + S_BYTES), rcx)?;
    a.call(d.rx_release)?;
    rdtsc64(a)?;
    a.mov(qword_ptr(r15 + S_LAST_RX_TSC), rax)?;
    a.cmp(qword_ptr(r15 + S_FRAMES), 0)?;
    a.jne(not_first)?;
    a.mov(qword_ptr(r15 + S_FIRST_TSC), rax)?;
    a.set_label(&mut not_first)?;
    a.inc(qword_ptr(r15 + S_FRAMES))?;
    a.mov(rax, qword_ptr(rbp + INFO_NET_COUNT))?;
    a.test(rax, rax)?;
    a.jz(top)?;
    a.cmp(qword_ptr(r15 + S_FRAMES), rax)?;
    a.jae(done)?;
    a.jmp(top)?;

    a.set_label(&mut done)?;
    a.mov(r13, qword_ptr(r15 + S_LAST_RX_TSC))?;
    a.sub(r13, qword_ptr(r15 + S_FIRST_TSC))?;
    emit_report(a, rt, s, "netping rx: frames ")
}

/// Checks the own address and peer against the mask: used by the CLI before a VM is built.
pub fn check_params(p: &NetParams) -> Result<(), String> {
    if p.prefix == 0 || p.prefix > 30 {
        return Err(format!("prefix /{} must be in 1..=30", p.prefix));
    }
    if p.mode == NetMode::Ping {
        let m = u32::from_be_bytes(p.netmask());
        let (ip, peer) = (u32::from_be_bytes(p.ip), u32::from_be_bytes(p.peer));
        if ip == peer {
            return Err(format!("the peer {} is the guest's own address", std::net::Ipv4Addr::from(p.peer)));
        }
        if (ip ^ peer) & m != 0 {
            return Err(format!(
                "the peer {} is not on the guest's subnet {}/{}",
                std::net::Ipv4Addr::from(p.peer),
                std::net::Ipv4Addr::from(p.ip),
                p.prefix
            ));
        }
    }
    if p.mode == NetMode::Tx && !(MIN_FRAME..=MAX_FRAME).contains(&p.frame_size) {
        return Err(format!("frame size {} must be in {MIN_FRAME}..={MAX_FRAME}", p.frame_size));
    }
    if p.mode == NetMode::Tx && p.count == 0 {
        return Err("tx needs a frame count above 0".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> NetParams {
        NetParams {
            mode: NetMode::Ping,
            ip: [10, 77, 0, 2],
            prefix: 24,
            peer: [10, 77, 0, 1],
            count: 5,
            frame_size: 1514,
            interval_ms: 0,
        }
    }

    #[test]
    fn layout_fits_below_the_guest_minimum() {
        const { assert!(NET_BASE >= 0x20_0000, "above the built-in guests' code and stack") };
        assert_eq!(RX_BUFS as u32 + QUEUE_SIZE * BUF_SIZE, TX_BUFS as u32);
        assert_eq!(TX_BUFS as u32 + QUEUE_SIZE * BUF_SIZE, NET_END as u32);
        const { assert!(STATE + 256 < RX_BUFS) };
        assert!(u64::from(NET_HDR) + MAX_FRAME <= u64::from(BUF_SIZE));
    }

    #[test]
    fn params_are_checked() {
        assert_eq!(params().netmask(), [255, 255, 255, 0]);
        assert!(check_params(&params()).is_ok());
        let off_link = NetParams { peer: [10, 78, 0, 1], ..params() };
        assert!(check_params(&off_link).expect_err("off link").contains("not on the guest's subnet"));
        assert!(check_params(&NetParams { peer: [10, 77, 0, 2], ..params() }).is_err());
        assert!(check_params(&NetParams { prefix: 0, ..params() }).is_err());
        let tx = NetParams { mode: NetMode::Tx, frame_size: 20, ..params() };
        assert!(check_params(&tx).expect_err("tiny frame").contains("frame size 20"));
        assert_eq!(ip_word([10, 77, 0, 2]).to_le_bytes()[..4], [10, 77, 0, 2]);
    }

    #[test]
    fn host_tsc_rate_is_plausible() {
        let r = host_tsc_per_ms();
        assert!((100_000..20_000_000).contains(&r), "{r} TSC cycles per ms");
    }
}
