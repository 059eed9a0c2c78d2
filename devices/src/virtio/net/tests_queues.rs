//! Data-path tests: transmit, receive with and without MRG_RXBUF, untrusted descriptors,
//! dirty tracking, the I/O thread, and a real tap.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::core::*;
use super::features::*;
use super::test_util::*;

/// Header and frame in two descriptors, as iPXE sends them.
#[test]
fn tx_header_and_frame_in_two_descriptors() {
    let mut r = rig();
    r.init(ALL);
    r.enable_msix();
    let f = frame(60, 1);
    r.mem.write_slice(&f[..12], GuestAddress(BUF)).expect("w");
    r.mem.write_slice(&f[12..], GuestAddress(BUF + 0x1000)).expect("w");
    r.add(TXQ, &[(BUF, 12, NEXT, 1), (BUF + 0x1000, 60, 0, 0)], 0);
    r.core().process_tx();
    assert_eq!(r.net.sent(), vec![f], "header and frame, unchanged, as one frame");
    assert_eq!(r.used(TXQ), (1, vec![(0, 0)]));
    assert_eq!(r.routes.take(), vec![2], "the tx vector");
    assert!(r.dev.error().is_none());
}

#[test]
fn tx_interrupt_suppressed_by_no_interrupt_flag() {
    let mut r = rig();
    r.init(ALL);
    r.enable_msix();
    r.set_avail_flags(TXQ, 1);
    r.add(TXQ, &[(BUF, 72, 0, 0)], 0);
    r.core().process_tx();
    assert_eq!(r.net.sent().len(), 1);
    assert!(r.routes.take().is_empty(), "VRING_AVAIL_F_NO_INTERRUPT");
}

#[test]
fn rx_without_mrg_rxbuf() {
    let mut r = rig();
    r.init(VERSION_1 | MAC);
    r.enable_msix();
    r.add(RXQ, &[(BUF, 2048, WRITE, 0)], 0);
    let f = frame(100, 3);
    r.net.push_rx(f.clone());
    r.core().process_rx();
    let mut got = vec![0u8; f.len()];
    r.mem.read_slice(&mut got, GuestAddress(BUF)).expect("r");
    let mut want = f.clone();
    want[10] = 1; // num_buffers
    assert_eq!(got, want);
    assert_eq!(r.used(RXQ), (1, vec![(0, f.len() as u32)]));
    assert_eq!(r.routes.take(), vec![1], "the rx vector");
}

#[test]
fn rx_with_mrg_rxbuf_spans_buffers() {
    let r = rig();
    r.init(ALL);
    for i in 0..3u16 {
        r.add(RXQ, &[(BUF + 0x1000 * u64::from(i), 1500, WRITE, 0)], i);
    }
    let f = frame(2500, 5);
    r.net.push_rx(f.clone());
    r.core().process_rx();
    assert_eq!(r.used(RXQ), (2, vec![(0, 1500), (1, f.len() as u32 - 1500)]));
    let mut a = vec![0u8; 1500];
    r.mem.read_slice(&mut a, GuestAddress(BUF)).expect("r");
    assert_eq!(u16::from_le_bytes([a[10], a[11]]), 2, "num_buffers");
    assert_eq!(a[12..], f[12..1500]);
    let mut b = vec![0u8; f.len() - 1500];
    r.mem.read_slice(&mut b, GuestAddress(BUF + 0x1000)).expect("r");
    assert_eq!(b, f[1500..]);
}

#[test]
fn rx_waits_for_buffers_without_losing_the_frame() {
    let r = rig();
    r.init(ALL);
    let f = frame(64, 9);
    r.net.push_rx(f.clone());
    r.core().process_rx();
    assert!(r.core().rx_starved, "no buffers: starved");
    assert_eq!(r.core().rx_pending, f.len(), "the frame waits in the device");
    r.add(RXQ, &[(BUF, 2048, WRITE, 0)], 0);
    r.core().rx_starved = false;
    r.core().process_rx();
    assert_eq!(r.used(RXQ), (1, vec![(0, f.len() as u32)]));
}

#[test]
fn rx_too_small_buffer_drops_the_frame_only() {
    let r = rig();
    r.init(VERSION_1);
    r.add(RXQ, &[(BUF, 64, WRITE, 0)], 0);
    r.net.push_rx(frame(1000, 1));
    r.net.push_rx(frame(20, 2));
    r.core().process_rx();
    assert!(r.dev.error().is_none());
    assert_eq!(r.used(RXQ), (1, vec![(0, 32)]), "the big frame dropped, the small one delivered");
}

#[test]
fn device_writes_mark_guest_pages_dirty() {
    let r = rig();
    r.init(ALL);
    r.add(RXQ, &[(BUF + 0x5000, 2048, WRITE, 0)], 0);
    r.block.take_dirty();
    r.net.push_rx(frame(100, 1));
    r.core().process_rx();
    let dirty = r.block.take_dirty();
    let page = |a: u64| a / r.block.page_size();
    assert!(dirty.contains(&page(BUF + 0x5000)), "the frame's page: {dirty:?}");
    assert!(dirty.contains(&page(layout(RXQ).2)), "the used ring's page: {dirty:?}");
}

/// Each bad chain puts the device in its error state, with a config interrupt, and nothing
/// after it is processed.
#[test]
fn bad_descriptors_need_reset() {
    type Setup = Box<dyn Fn(&Rig)>;
    let avail_jump: Setup = Box::new(|r: &Rig| r.set_avail_idx(TXQ, 300));
    let cases: Vec<(&str, usize, Setup, &str)> = vec![
        ("loop", TX, Box::new(|r: &Rig| r.add(TXQ, &[(BUF, 100, NEXT, 1), (BUF, 100, NEXT, 0)], 0)), "loops"),
        ("next past table", TX, Box::new(|r: &Rig| r.add(TXQ, &[(BUF, 100, NEXT, 300)], 0)), "loops"),
        ("outside RAM", TX, Box::new(|r: &Rig| r.add(TXQ, &[(RAM - 8, 100, 0, 0)], 0)), "outside guest RAM"),
        ("write-only in tx", TX, Box::new(|r: &Rig| r.add(TXQ, &[(BUF, 100, WRITE, 0)], 0)), "device-writable"),
        ("read-only in rx", RX, Box::new(|r: &Rig| r.add(RXQ, &[(BUF, 2048, 0, 0)], 0)), "device-readable"),
        ("zero length", TX, Box::new(|r: &Rig| r.add(TXQ, &[(BUF, 12, NEXT, 1), (BUF, 0, 0, 0)], 0)), "length 0"),
        (
            "oversized",
            TX,
            Box::new(|r: &Rig| r.add(TXQ, &[(BUF, 40000, NEXT, 1), (BUF, 40000, 0, 0)], 0)),
            "longer than 65562",
        ),
        ("short", TX, Box::new(|r: &Rig| r.add(TXQ, &[(BUF, 8, 0, 0)], 0)), "shorter than the 12-byte header"),
        ("avail index jump", TX, avail_jump, "available ring"),
    ];
    for (what, q, setup, needle) in cases {
        let mut r = rig();
        r.init(ALL);
        r.enable_msix();
        r.routes.take();
        setup(&r);
        r.add(if q == TX { TXQ } else { RXQ }, &[(BUF, 100, if q == TX { 0 } else { WRITE }, 0)], 10);
        r.net.push_rx(frame(50, 0));
        r.core().process_tx();
        r.core().process_rx();
        let err = r.dev.error().unwrap_or_else(|| panic!("{what}: no error"));
        assert!(err.contains(needle), "{what}: {err}");
        assert!(err.starts_with(if q == TX { "transmit queue 1" } else { "receive queue 0" }), "{what}: {err}");
        assert_eq!(r.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET, "{what}");
        assert_eq!(r.routes.take(), vec![0], "{what}: one config interrupt, nothing else");
        assert!(r.net.sent().is_empty(), "{what}: nothing sent");
        // Stopped: more work does nothing, no second interrupt.
        r.core().process_tx();
        r.core().process_rx();
        assert!(r.routes.take().is_empty(), "{what}");
        // A reset brings it back.
        r.w8(0x14, 0);
        assert!(r.dev.error().is_none(), "{what}");
        assert_eq!(r.status(), 0);
    }
}

#[test]
fn bad_queue_setup_needs_reset() {
    for (what, size, desc, needle) in [
        ("size not a power of two", 100u16, RXQ, "size 100"),
        ("size zero", 0, RXQ, "size 0"),
        ("ring outside RAM", 256, RAM - 0x100, "outside guest RAM"),
        ("misaligned ring", 256, RXQ + 8, "16-byte aligned"),
    ] {
        let r = rig();
        r.w8(0x14, 0);
        r.w8(0x14, 3);
        r.w16(0x16, 0);
        r.w16(0x18, size);
        r.w32(0x20, desc as u32);
        r.w32(0x28, 0x3_0000);
        r.w32(0x30, 0x3_1000);
        r.w16(0x1c, 1);
        let err = r.dev.error().unwrap_or_else(|| panic!("{what}: no error"));
        assert!(err.contains(needle), "{what}: {err}");
        assert_ne!(r.status() & STATUS_NEEDS_RESET, 0, "{what}");
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// The I/O thread moves frames both ways on notifications and backend readiness, and stops
/// polling the backend while the receive queue has no buffers.
#[test]
fn io_thread_moves_frames_and_sleeps_when_starved() {
    let mut r = rig();
    r.dev.start().expect("start");
    r.init(ALL);
    // Receive with no buffers: one frame waits in the device, one in the backend (whose fd
    // stays readable), and the thread sleeps (no busy loop).
    r.net.push_rx(frame(64, 1));
    r.net.push_rx(frame(64, 2));
    wait_for("starved", || r.core().rx_starved);
    let before = r.core().rounds;
    std::thread::sleep(Duration::from_millis(300));
    let rounds = r.core().rounds - before;
    eprintln!("I/O thread rounds while starved: {rounds} in 300 ms");
    assert!(rounds <= 2, "the thread must not spin while the queue is starved ({rounds} rounds in 300 ms)");
    r.add(RXQ, &[(BUF, 2048, WRITE, 0), (BUF + 0x1000, 2048, WRITE, 0)], 0);
    r.notify(0);
    wait_for("rx used", || r.used(RXQ).0 == 2);
    // Another frame from the backend is delivered on readiness alone.
    r.add(RXQ, &[(BUF + 0x2000, 2048, WRITE, 0)], 2);
    r.notify(0);
    std::thread::sleep(Duration::from_millis(20));
    r.net.push_rx(frame(64, 3));
    wait_for("third rx", || r.used(RXQ).0 == 3);
    // Transmit on notify.
    r.add(TXQ, &[(BUF + 0x4000, 12, NEXT, 1), (BUF + 0x5000, 60, 0, 0)], 0);
    r.notify(1);
    wait_for("tx", || r.net.sent().len() == 1);
    // Paused: nothing moves; resumed: it does.
    r.dev.pause();
    r.add(TXQ, &[(BUF + 0x4000, 72, 0, 0)], 2);
    r.notify(1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.net.sent().len(), 1, "paused");
    assert_eq!(r.dev.state().queues[TX].next_avail, 1);
    r.dev.resume();
    wait_for("tx after resume", || r.net.sent().len() == 2);
    r.dev.shutdown();
}

#[test]
fn dropping_the_device_joins_its_thread_and_closes_its_fds() {
    let before = fd_count();
    for _ in 0..3 {
        let d = {
            let r = rig();
            let net = super::VirtioNet::new(super::NetConfig {
                mac: MAC_ADDR,
                backend: Box::new(FakeBackend::new(0).0),
                mem: migrate::ram::GuestMemory::flat(r.block.clone()),
                msi: r.routes.clone(),
                rom: None,
            })
            .expect("device");
            drop(r);
            net
        };
        drop(d);
    }
    assert_eq!(fd_count(), before, "no fds left behind");
}

/// A long run of chains is sent in batches, releasing the device mutex in between.
#[test]
fn tx_works_in_batches() {
    let r = rig();
    r.init(ALL);
    for i in 0..256u16 {
        r.add(TXQ, &[(BUF, 72, 0, 0)], i);
    }
    assert!(r.core().process_tx(), "a full batch sent: the caller comes back");
    assert_eq!(r.net.sent().len(), super::queues::BATCH);
    // The driver refills meanwhile (chains reuse table entries).
    for i in 0..44u16 {
        r.add(TXQ, &[(BUF, 72, 0, 0)], i);
    }
    assert!(!r.core().process_tx());
    assert_eq!(r.net.sent().len(), 300);
    assert!(r.dev.error().is_none());
}

/// The used ring's flags word (`VRING_USED_F_NO_NOTIFY` is bit 0).
fn used_flags(r: &Rig) -> u16 {
    let (_, _, used) = layout(RXQ);
    r.mem.read_obj::<u16>(GuestAddress(used)).expect("used flags")
}

/// While the receive queue has buffers the driver is told not to notify (no vCPU exit per
/// refilled buffer); once the device runs out it asks again, and buffers the driver added
/// while notifications were off are taken without one.
#[test]
fn rx_notifications_are_off_while_buffers_last() {
    let r = rig();
    r.init(VERSION_1 | MAC);
    r.add(RXQ, &[(BUF, 2048, WRITE, 0)], 0);
    r.add(RXQ, &[(BUF + 0x1000, 2048, WRITE, 0)], 1);
    r.net.push_rx(frame(100, 1));
    r.core().process_rx();
    assert_eq!(used_flags(&r) & 1, 1, "buffers left: no notifications wanted");
    r.net.push_rx(frame(100, 2));
    r.net.push_rx(frame(100, 3));
    r.core().process_rx();
    assert_eq!(used_flags(&r) & 1, 0, "out of buffers: the driver must notify");
    assert!(r.core().rx_starved);
    assert_eq!(r.used(RXQ).0, 2);
}
