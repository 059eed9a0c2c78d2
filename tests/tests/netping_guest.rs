//! The `netping` guest on real KVM against a stand-in virtio-net device with a scripted peer
//! ([`common::mock_net`]): its driver, its ARP/IPv4/ICMP and its modes, independent of the
//! real device (which `net_ping.rs` tests with a kernel on the other side of a tap).

mod common;

use std::time::{Duration, Instant};

use common::mock_net::{self, csum, GUEST_MAC, PEER_IP, PEER_MAC};
use hypervisor::control::ExitReason;
use hypervisor::guests::{Builtin, NetMode, NetParams};
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};

fn params(mode: NetMode, count: u64) -> BuiltinParams {
    BuiltinParams {
        net: NetParams { mode, ip: [10, 77, 0, 2], prefix: 24, peer: PEER_IP, count, frame_size: 1514, interval_ms: 0 },
        ..Default::default()
    }
}

/// A netping VM with a mock NIC, started.
fn start(p: BuiltinParams) -> (Vm, SharedOutput, std::sync::Arc<std::sync::Mutex<mock_net::MockNet>>) {
    let out = SharedOutput::default();
    let mut vm = Vm::new(VmConfig::new(
        16,
        1,
        BootSource::Builtin { guest: Builtin::Netping, params: p },
        Box::new(out.clone()),
    ))
    .expect("create VM");
    let nic = mock_net::attach(&vm);
    vm.start().expect("start");
    (vm, out, nic)
}

fn wait_for(out: &SharedOutput, needle: &str) -> String {
    let t0 = Instant::now();
    while !out.text().contains(needle) && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    out.text()
}

#[test]
fn ping_resolves_the_peer_and_counts_matching_replies() {
    let (mut vm, out, nic) = start(params(NetMode::Ping, 5));
    let reason = vm.wait(Some(Duration::from_secs(60)));
    let text = out.text();
    assert_eq!(reason, ExitReason::GuestExit { status: 0 }, "{text}");
    assert!(text.contains("netping: virtio-net ready, mac 52:54:00:12:34:56\n"), "{text}");
    assert!(text.contains("netping: 10.77.0.1 is at 02:00:00:00:00:01\n"), "{text}");
    for seq in 1..=5 {
        assert!(text.contains(&format!("64 bytes from 10.77.0.1: icmp_seq={seq} reply\n")), "{text}");
    }
    assert!(text.ends_with("netping: 5 replies, done\n"), "{text}");

    let sent = nic.lock().expect("lock").sent.lock().expect("lock").clone();
    // First an ARP who-has 10.77.0.1 from the guest's MAC and address, broadcast.
    let arp = &sent[0];
    assert_eq!(arp.len(), 60);
    assert_eq!(&arp[0..6], &[0xff; 6]);
    assert_eq!(&arp[6..12], &GUEST_MAC);
    assert_eq!(&arp[12..22], &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    assert_eq!(&arp[22..28], &GUEST_MAC);
    assert_eq!(&arp[28..32], &[10, 77, 0, 2]);
    assert_eq!(&arp[38..42], &PEER_IP);
    // Then five echo requests to the peer's MAC with valid checksums, seq 1..=5, payload seq+i.
    let echoes: Vec<&Vec<u8>> = sent[1..].iter().collect();
    assert_eq!(echoes.len(), 5);
    for (i, e) in echoes.iter().enumerate() {
        let seq = i as u16 + 1;
        assert_eq!(e.len(), 98);
        assert_eq!(&e[0..6], &PEER_MAC);
        assert_eq!(&e[12..14], &[0x08, 0x00]);
        assert_eq!(csum(&e[14..34]), 0, "IP checksum of echo {seq}");
        assert_eq!(csum(&e[34..98]), 0, "ICMP checksum of echo {seq}");
        assert_eq!((e[34], e[35]), (8, 0));
        assert_eq!(u16::from_be_bytes([e[40], e[41]]), seq);
        assert!(e[42..98].iter().enumerate().all(|(k, b)| *b == (seq as usize + k) as u8));
    }
}

#[test]
fn ping_gives_up_when_the_peer_is_silent() {
    let out = SharedOutput::default();
    let mut vm = Vm::new(VmConfig::new(
        16,
        1,
        BootSource::Builtin { guest: Builtin::Netping, params: params(NetMode::Ping, 5) },
        Box::new(out.clone()),
    ))
    .expect("create VM");
    let nic = mock_net::attach(&vm);
    nic.lock().expect("lock").answer = false;
    vm.start().expect("start");
    let reason = vm.wait(Some(Duration::from_secs(60)));
    assert_eq!(reason, ExitReason::GuestExit { status: 2 }, "{}", out.text());
    assert!(out.text().contains("netping: no ARP reply from the peer after 20 tries, giving up\n"));
    let arps = nic.lock().expect("lock").sent.lock().expect("lock").len();
    assert_eq!(arps, 20, "one ARP per try");
}

#[test]
fn echo_mode_answers_arp_and_pings_and_reflects_other_frames() {
    let (mut vm, out, nic) = start(params(NetMode::Echo, 2));
    let ready = wait_for(&out, "virtio-net ready");
    assert!(ready.contains("virtio-net ready"), "{ready}");
    let host = [0x02, 0, 0, 0, 0, 9];
    // ARP who-has 10.77.0.2.
    let mut arp = vec![0u8; 60];
    arp[0..6].fill(0xff);
    arp[6..12].copy_from_slice(&host);
    arp[12..22].copy_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp[22..28].copy_from_slice(&host);
    arp[28..32].copy_from_slice(&[10, 77, 0, 9]);
    arp[38..42].copy_from_slice(&[10, 77, 0, 2]);
    // An echo request to 10.77.0.2 with a 5-byte payload (odd length: the checksum's tail).
    let mut ping = vec![0u8; 14 + 20 + 8 + 5];
    ping[0..6].copy_from_slice(&GUEST_MAC);
    ping[6..12].copy_from_slice(&host);
    ping[12..14].copy_from_slice(&[0x08, 0x00]);
    ping[14..26].copy_from_slice(&[0x45, 0, 0, 33, 0, 1, 0x40, 0, 64, 1, 0, 0]);
    ping[26..30].copy_from_slice(&[10, 77, 0, 9]);
    ping[30..34].copy_from_slice(&[10, 77, 0, 2]);
    let c = csum(&ping[14..34]);
    ping[24..26].copy_from_slice(&c.to_be_bytes());
    ping[34..42].copy_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0, 7]);
    ping[42..].copy_from_slice(b"hello");
    let c = csum(&ping[34..]);
    ping[36..38].copy_from_slice(&c.to_be_bytes());
    // Anything else: reflected.
    let mut other = vec![0u8; 64];
    other[0..6].copy_from_slice(&GUEST_MAC);
    other[6..12].copy_from_slice(&host);
    other[12..14].copy_from_slice(&[0x88, 0xb5]);
    other[20] = 0x5a;
    {
        let mut n = nic.lock().expect("lock");
        assert!(n.receive(&arp) && n.receive(&ping) && n.receive(&other));
    }
    let reason = vm.wait(Some(Duration::from_secs(30)));
    let text = out.text();
    assert_eq!(reason, ExitReason::GuestExit { status: 0 }, "{text}");
    assert!(text.ends_with("netping: 2 frames answered, done\n"), "{text}");
    let sent = nic.lock().expect("lock").sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 3, "ARP reply, echo reply, reflection");
    let a = &sent[0];
    assert_eq!((&a[0..6], &a[6..12], &a[20..22]), (&host[..], &GUEST_MAC[..], &[0u8, 2][..]));
    assert_eq!((&a[28..32], &a[32..38], &a[38..42]), (&[10u8, 77, 0, 2][..], &host[..], &[10u8, 77, 0, 9][..]));
    let r = &sent[1];
    assert_eq!(r.len(), ping.len());
    assert_eq!((&r[0..6], &r[6..12]), (&host[..], &GUEST_MAC[..]));
    assert_eq!((&r[26..30], &r[30..34]), (&[10u8, 77, 0, 2][..], &[10u8, 77, 0, 9][..]));
    assert_eq!((r[34], csum(&r[14..34]), csum(&r[34..])), (0, 0, 0), "echo reply with valid checksums");
    assert_eq!(&r[38..], &ping[38..], "id, sequence and payload kept");
    let f = &sent[2];
    assert_eq!((&f[0..6], &f[6..12], &f[12..]), (&host[..], &GUEST_MAC[..], &other[12..]));
}

#[test]
fn tx_mode_sends_count_frames_of_the_frame_size() {
    let mut p = params(NetMode::Tx, 1000);
    p.net.frame_size = 1514;
    let (mut vm, out, nic) = start(p);
    let reason = vm.wait(Some(Duration::from_secs(60)));
    let text = out.text();
    assert_eq!(reason, ExitReason::GuestExit { status: 0 }, "{text}");
    let report = hypervisor::bench::net::parse_report(&text, "tx").expect("tx report");
    assert_eq!((report.0, report.1), (1000, 1000 * 1514), "{text}");
    let sent = nic.lock().expect("lock").sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 1000);
    assert!(sent.iter().all(|f| f.len() == 1514 && f[12..14] == [0x88, 0xb5] && f[6..12] == GUEST_MAC));
    let seqs: Vec<u64> = sent.iter().map(|f| u64::from_le_bytes(f[14..22].try_into().expect("8"))).collect();
    assert_eq!(seqs, (0..1000).collect::<Vec<_>>());
}

#[test]
fn rx_mode_counts_frames_until_idle() {
    let (mut vm, out, nic) = start(params(NetMode::Rx, 0));
    let ready = wait_for(&out, "netping rx: ready");
    assert!(ready.contains("netping rx: ready"), "{ready}");
    // 600 frames: more than the 256 receive buffers, so the guest must give them back. Every
    // third is not the benchmark's ethertype: dropped, not counted.
    let mut frame = [0x11u8; 100];
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    let mut foreign = frame;
    foreign[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut delivered = 0;
    let t0 = Instant::now();
    while delivered < 900 && t0.elapsed() < Duration::from_secs(20) {
        let f = if delivered % 3 == 2 { &foreign } else { &frame };
        if nic.lock().expect("lock").receive(f) {
            delivered += 1;
        } else {
            std::thread::yield_now();
        }
    }
    assert_eq!(delivered, 900);
    let reason = vm.wait(Some(Duration::from_secs(30)));
    let text = out.text();
    assert_eq!(reason, ExitReason::GuestExit { status: 0 }, "{text}");
    let report = hypervisor::bench::net::parse_report(&text, "rx").expect("rx report");
    assert_eq!((report.0, report.1), (600, 600 * 100), "{text}");
}

#[test]
fn evil_mode_posts_its_chains_and_reports_the_status() {
    let (mut vm, out, nic) = start(params(NetMode::Evil, 0));
    // The mock has no error state: the guest must still report and exit after its bounded wait.
    nic.lock().expect("lock").answer = false;
    let reason = vm.wait(Some(Duration::from_secs(60)));
    let text = out.text();
    assert_eq!(reason, ExitReason::GuestExit { status: 0 }, "{text}");
    for l in ["a descriptor loop", "outside RAM", "wrapping", "longer than the queue", "notified the transmit queue"] {
        assert!(text.contains(l), "{l}: {text}");
    }
    assert!(text.contains("netping evil: device status 0xf\nnetping evil: done\n"), "{text}");
}
