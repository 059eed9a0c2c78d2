//! Transport tests: driver init, reset, features, MSI-X, the PCI_CFG window, state.

use super::core::*;
use super::features::*;
use super::state::StateError;
use super::test_util::*;
use crate::pci::PciDevice;
use crate::virtio::msix::NO_VECTOR;
use crate::virtio::{MsiMessage, MODERN_BAR, MSIX_BAR, MSIX_PBA_OFFSET};

#[test]
fn identity_and_capabilities() {
    let mut r = rig();
    let mut b = [0u8; 4];
    r.dev.read_config(0, &mut b);
    assert_eq!(b, [0xf4, 0x1a, 0x41, 0x10]);
    // Walk the capability chain: five vendor caps (types 1, 3, 4, 2, 5) and MSI-X.
    let mut types = Vec::new();
    let mut p = r.dev.config().bytes()[0x34] as usize;
    while p != 0 {
        let c = &r.dev.config().bytes()[p..];
        if c[0] == 0x09 {
            types.push(c[3]);
            if c[3] == 2 {
                assert_eq!(u32::from_le_bytes([c[16], c[17], c[18], c[19]]), 4, "notify_off_multiplier");
                assert_eq!(u32::from_le_bytes([c[8], c[9], c[10], c[11]]), 0x3000);
            }
        } else {
            assert_eq!(c[0], 0x11);
            assert_eq!(u16::from_le_bytes([c[2], c[3]]) & 0x7ff, 2, "3 vectors");
        }
        p = c[1] as usize;
    }
    assert_eq!(types, vec![1, 3, 4, 2, 5]);
    assert!(r.dev.bar_memory(6).is_none());
    let ev = r.dev.ioevents(MODERN_BAR);
    assert_eq!(ev.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![0x3000, 0x3004]);
}

#[test]
fn driver_init_sequence_and_record() {
    let r = rig();
    r.init(ALL);
    assert_eq!(r.status(), 0x0f);
    assert_eq!(r.r(0x12, 2), 2, "num_queues");
    let rec = r.dev.driver_record();
    assert!(rec.read_mac());
    assert_eq!(rec.status_bits, 0x0f);
    assert_eq!(rec.feature_words_read, vec![0, 1]);
    assert_eq!(rec.features_accepted, ALL);
    assert_eq!(rec.queues_enabled, vec![0, 1]);
    assert_eq!(r.net.offloads.lock().expect("l").last().copied(), Some(0x3), "GUEST_CSUM + TSO4 to the tap");
    // Queue registers read back.
    r.w16(0x16, 1);
    assert_eq!(r.r(0x18, 2), 256);
    assert_eq!(r.r(0x1c, 2), 1);
    assert_eq!(r.r(0x1e, 2), 1, "notify offset of queue 1");
    assert_eq!(r.r(0x20, 8), TXQ);
    // Queue 7 does not exist: size 0.
    r.w16(0x16, 7);
    assert_eq!(r.r(0x18, 2), 0);
    // A driver reading a thousand feature words does not grow the record without bound.
    for sel in 0..1000u32 {
        r.w32(0x00, sel);
        r.r(0x04, 4);
    }
    assert_eq!(r.dev.driver_record().feature_words_read.len(), 64);
}

#[test]
fn features_ok_needs_version_1_and_only_offered_bits_stick() {
    let r = rig_with(0);
    r.w8(0x14, 0);
    r.w8(0x14, 3);
    r.w32(0x08, 0);
    r.w32(0x0c, 0xffff_ffff);
    assert_eq!(r.r(0x0c, 4), r.core().offered & 0xffff_ffff, "unoffered bits dropped");
    assert_eq!(r.core().offered & GUEST_CSUM, 0, "a backend without offloads: no GUEST_CSUM");
    r.w8(0x14, 3 | STATUS_FEATURES_OK);
    assert_eq!(r.status(), 3, "without VERSION_1 FEATURES_OK does not stick");
}

#[test]
fn reset_reads_back_zero_and_clears_queues() {
    let r = rig();
    r.init(ALL);
    r.w8(0x14, 0);
    assert_eq!(r.status(), 0, "iPXE and SeaBIOS spin on this");
    r.w16(0x16, 0);
    assert_eq!(r.r(0x1c, 2), 0, "queue disabled");
    assert_eq!(r.r(0x18, 2), 256, "size back to the maximum");
    assert_eq!(r.r(0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!(r.r(0x20, 8), 0);
    assert!(r.core().queues[0].queue.is_none());
    assert_eq!(r.dev.driver_record().resets, 2);
    assert_eq!(r.net.offloads.lock().expect("l").last().copied(), Some(0));
}

#[test]
fn isr_reads_and_clears() {
    let r = rig();
    r.init(ALL);
    r.core().interrupt_queue(0);
    assert_eq!(r.bar_r(MODERN_BAR, 0x1000, 1), 1);
    assert_eq!(r.bar_r(MODERN_BAR, 0x1000, 1), 0);
}

#[test]
fn msix_masking_pending_and_routes() {
    let mut r = rig();
    r.init(ALL);
    // MSI-X disabled: nothing delivered. (Queue 0 has vector 1, queue 1 vector 2.)
    r.core().interrupt_queue(0);
    assert!(r.routes.take().is_empty());
    r.enable_msix();
    let routes = r.routes.routes.lock().expect("l").clone();
    assert_eq!(routes.get(&1), Some(&Some(MsiMessage { addr: 0xfee0_0000, data: 0x41 })));
    r.core().interrupt_queue(0);
    assert_eq!(r.routes.take(), vec![1]);
    // Mask vector 1: pending, no delivery, route withdrawn.
    r.bar_w(MSIX_BAR, 16 + 12, &1u32.to_le_bytes());
    assert_eq!(r.routes.routes.lock().expect("l").get(&1), Some(&None));
    r.core().interrupt_queue(0);
    assert!(r.routes.take().is_empty());
    assert_eq!(r.bar_r(MSIX_BAR, MSIX_PBA_OFFSET, 4), 0b10);
    // Unmask: delivered once, pending cleared.
    r.bar_w(MSIX_BAR, 16 + 12, &0u32.to_le_bytes());
    assert_eq!(r.routes.take(), vec![1]);
    assert_eq!(r.bar_r(MSIX_BAR, MSIX_PBA_OFFSET, 4), 0);
    // Function mask: pending; clearing it delivers.
    let cap = r.dev.msix_cap;
    r.dev.write_config(cap + 2, &0xc000u16.to_le_bytes());
    r.core().interrupt_queue(1);
    assert!(r.routes.take().is_empty());
    assert_eq!(r.bar_r(MSIX_BAR, MSIX_PBA_OFFSET, 4), 0b100);
    r.dev.write_config(cap + 2, &0x8000u16.to_le_bytes());
    assert_eq!(r.routes.take(), vec![2]);
    // Vector NO_VECTOR and vectors past the table: nothing.
    r.w16(0x16, 0);
    r.w16(0x1a, 3);
    assert_eq!(r.r(0x1a, 2), u64::from(NO_VECTOR), "a vector past the table reads back as none");
    r.core().interrupt_queue(0);
    assert!(r.routes.take().is_empty());
    // Table reads back; odd-sized accesses are ignored.
    assert_eq!(r.bar_r(MSIX_BAR, 16 + 8, 4), 0x41);
    r.bar_w(MSIX_BAR, 16 + 8, &[9]);
    assert_eq!(r.bar_r(MSIX_BAR, 16 + 8, 4), 0x41);
}

#[test]
fn pci_cfg_window_reaches_the_bars() {
    let mut r = rig();
    r.init(ALL);
    let p = r.dev.pci_cfg_cap;
    r.dev.write_config(p + 4, &[MODERN_BAR as u8]);
    r.dev.write_config(p + 8, &0x14u32.to_le_bytes());
    r.dev.write_config(p + 12, &1u32.to_le_bytes());
    let mut b = [0u8; 4];
    r.dev.read_config(p + 16, &mut b);
    assert_eq!(b[0], 0x0f, "device_status through the window");
    r.dev.write_config(p + 16, &[0]);
    assert_eq!(r.status(), 0, "a reset written through the window");
    // A window past the BAR reads 0 and writes nothing.
    r.dev.write_config(p + 8, &0x4000u32.to_le_bytes());
    r.dev.read_config(p + 16, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn unknown_and_unaligned_accesses_are_ignored() {
    let r = rig();
    r.init(ALL);
    r.bar_w(MODERN_BAR, 0x14, &[0, 0]);
    assert_eq!(r.status(), 0x0f, "a 2-byte write to the 1-byte status is ignored");
    r.bar_w(MODERN_BAR, 0x0fff, &[1, 2, 3, 4]);
    r.bar_w(MODERN_BAR, 0x2000, &[1]);
    assert_eq!(r.mac_read(), MAC_ADDR, "device config is read-only");
    assert_eq!(r.bar_r(MODERN_BAR, 0x1234, 4), 0);
    assert_eq!(r.bar_r(MSIX_BAR, 0x7f0, 4), 0);
    r.bar_w(MODERN_BAR, 0x3002, &[1, 0]);
    r.w16(0x18, 100);
    assert_eq!(r.r(0x18, 2), 256, "size of an enabled queue does not change");
}

#[test]
fn link_status_change_raises_config_interrupt() {
    let mut r = rig();
    r.init(ALL);
    r.enable_msix();
    assert_eq!(r.bar_r(MODERN_BAR, 0x2006, 2), 1, "LINK_UP");
    let gen = r.r(0x15, 1);
    r.dev.set_link(false);
    assert_eq!(r.bar_r(MODERN_BAR, 0x2006, 2), 0);
    assert_eq!(r.r(0x15, 1), gen + 1);
    assert_eq!(r.routes.take(), vec![0]);
}

fn traffic(r: &Rig) {
    r.add(TXQ, &[(BUF, 12, NEXT, 1), (BUF + 0x100, 60, 0, 0)], 0);
    r.core().process_tx();
}

#[test]
fn state_round_trip() {
    let mut r = rig();
    r.init(ALL);
    r.enable_msix();
    traffic(&r);
    r.bar_w(MSIX_BAR, 12, &1u32.to_le_bytes());
    r.core().interrupt_queue(1);
    r.bar_w(MSIX_BAR, 12, &1u32.to_le_bytes());
    let s = r.dev.state();
    assert_eq!(s.queues[1].next_avail, 1);
    assert_eq!(s.queues[1].next_used, 1);
    assert!(s.msix_enabled);

    let mut r2 = rig();
    // A restore brings guest RAM back too.
    let mut ram = vec![0u8; RAM as usize];
    r.block.read(0, &mut ram).expect("ram");
    r2.block.write(0, &ram).expect("ram");
    r2.dev.restore(&s).expect("restore");
    assert_eq!(r2.dev.state(), s);
    assert_eq!(r2.status(), 0x0f);
    assert_eq!(r2.mac_read(), MAC_ADDR);
    assert_eq!(r2.net.offloads.lock().expect("l").last().copied(), Some(0x3));
    let ctrl = u16::from_le_bytes([
        r2.dev.config().bytes()[r2.dev.msix_cap + 2],
        r2.dev.config().bytes()[r2.dev.msix_cap + 3],
    ]);
    assert_eq!(ctrl & 0xc000, 0x8000, "the capability says enabled");
    // The restored device goes on where the first stopped: the next chain is used at 1.
    r2.add(TXQ, &[(BUF, 12, NEXT, 3), (BUF + 0x100, 60, 0, 0)], 2);
    r2.core().process_tx();
    assert_eq!(r2.used(TXQ).0, 2);
    assert_eq!(r2.net.sent().len(), 1);
    let _ = &mut r;
}

#[test]
fn restore_keeps_the_configured_mac() {
    let r = rig();
    r.init(ALL);
    let s = r.dev.state();
    let mut r2 = rig();
    r2.dev.core.lock().expect("l").mac = [2, 0, 0, 0, 0, 9];
    r2.dev.restore(&s).expect("restore");
    assert_eq!(r2.mac_read(), [2, 0, 0, 0, 0, 9]);
}

#[test]
fn refused_states_change_nothing() {
    let r = rig();
    r.init(ALL);
    let good = r.dev.state();
    type Mutation = Box<dyn Fn(&mut super::VirtioNetState)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|s| s.queues.pop().map(|_| ()).unwrap_or(())), "1 queues"),
        (Box::new(|s| s.queues[0].size = 100), "size 100"),
        (Box::new(|s| s.queues[1].size = 512), "size 512"),
        (Box::new(|s| s.queues[0].desc = RAM - 16), "outside guest RAM"),
        (Box::new(|s| s.queues[1].used = 0x2_0002), "4-byte aligned"),
        (Box::new(|s| s.queues[1].avail = u64::MAX - 1), "outside guest RAM"),
        (Box::new(|s| s.queues[0].vector = 3), "vector 3"),
        (Box::new(|s| s.config_vector = 7), "vector 7"),
        (Box::new(|s| s.driver_features |= 1 << 40), "0x10000000000"),
        (Box::new(|s| s.driver_features &= !(1 << 32)), "VERSION_1 (bit 32) is not accepted"),
        (Box::new(|s| s.driver_features &= !1), "HOST_TSO4 (bit 11) needs CSUM"),
        (Box::new(|s| s.msix_table.push(Default::default())), "4 entries"),
        (Box::new(|s| s.msix_pba = 0b1000), "0x8"),
        (Box::new(|s| s.error = Some("x".repeat(5000))), "5000 bytes"),
    ];
    let mut r2 = rig();
    r2.init(VERSION_1);
    let before = r2.dev.state();
    for (mutate, needle) in cases {
        let mut s = good.clone();
        mutate(&mut s);
        let e = r2.dev.restore(&s).expect_err(needle);
        assert!(e.to_string().contains(needle), "{e} should name {needle}");
        assert_eq!(r2.dev.state(), before, "{e}: nothing changed");
    }
    assert!(matches!(
        r2.dev.restore(&{
            let mut s = good.clone();
            s.queues.pop();
            s
        }),
        Err(StateError::QueueCount { n: 1 })
    ));
}

#[test]
fn bus_reset_resets_msix_too() {
    let mut r = rig();
    r.init(ALL);
    r.enable_msix();
    PciDevice::reset(&mut r.dev);
    assert_eq!(r.status(), 0);
    assert!(!r.core().msix.enabled());
    assert_eq!(r.bar_r(MSIX_BAR, 12, 4), 1, "vectors masked");
}
