use super::*;

fn header() -> PciHeader {
    PciHeader {
        vendor: 0x1af4,
        device: 0x1041,
        revision: 1,
        class: (0x02, 0x00, 0x00),
        subsystem_vendor: 0x1af4,
        subsystem: 0x1100,
        interrupt_pin: 1,
    }
}

fn r32(c: &PciConfig, at: usize) -> u32 {
    let mut b = [0u8; 4];
    c.read(at, &mut b);
    u32::from_le_bytes(b)
}

fn w32(c: &mut PciConfig, at: usize, v: u32) {
    c.write(at, &v.to_le_bytes());
}

#[test]
fn identity_is_read_only_and_masks_apply() {
    let mut c = PciConfig::new(header());
    assert_eq!(r32(&c, 0), 0x1041_1af4);
    w32(&mut c, 0, 0);
    assert_eq!(r32(&c, 0), 0x1041_1af4);
    assert_eq!(r32(&c, 8), 0x0200_0001);
    w32(&mut c, 8, 0xffff_ffff);
    assert_eq!(r32(&c, 8), 0x0200_0001);
    // COMMAND: only its defined bits stick.
    c.write(COMMAND, &[0xff, 0xff]);
    assert_eq!(c.command(), 0x0547);
    // Interrupt line is writable, the pin is not.
    c.write(INTERRUPT_LINE, &[0x0b, 0x04]);
    let mut b = [0u8; 2];
    c.read(INTERRUPT_LINE, &mut b);
    assert_eq!(b, [0x0b, 1]);
    // Past 256 bytes reads 0.
    c.read(0x100, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn status_error_bits_are_write_one_to_clear() {
    let mut c = PciConfig::new(header());
    c.bytes[STATUS + 1] = 0xf9;
    c.write(STATUS, &[0xff, 0x20]);
    assert_eq!(c.bytes[STATUS + 1], 0xd9, "only the written 1 (received master abort) cleared");
    c.write(STATUS, &[0x00, 0x00]);
    assert_eq!(c.bytes[STATUS + 1], 0xd9, "writing 0 leaves bits");
}

#[test]
fn bar_sizing_for_every_kind() {
    let mut c = PciConfig::new(header());
    c.add_bar(0, BarKind::Io, 0x20).expect("io");
    c.add_bar(1, BarKind::Mem32 { prefetchable: false }, 0x1000).expect("mem32");
    c.add_bar(2, BarKind::Mem64 { prefetchable: true }, 0x4000).expect("mem64");
    c.add_bar(4, BarKind::Mem32 { prefetchable: true }, 0x10_0000).expect("mem32 pf");
    c.add_bar(ROM_BAR, BarKind::Rom, 0x4_0000).expect("rom");
    for at in (0x10..0x28).step_by(4).chain([0x30]) {
        w32(&mut c, at, 0xffff_ffff);
    }
    assert_eq!(r32(&c, 0x10), 0xffff_ffe1, "I/O: size 0x20, bit 0 set");
    assert_eq!(r32(&c, 0x14), 0xffff_f000, "mem32 4 KiB");
    assert_eq!(r32(&c, 0x18), 0xffff_c00c, "mem64 prefetchable low half");
    assert_eq!(r32(&c, 0x1c), 0xffff_ffff, "mem64 high half");
    assert_eq!(r32(&c, 0x20), 0xfff0_0008, "mem32 prefetchable 1 MiB");
    assert_eq!(r32(&c, 0x24), 0, "BAR 5 not implemented");
    assert_eq!(r32(&c, 0x30), 0xfffc_0001, "ROM 256 KiB with its enable bit");
    w32(&mut c, 0x18, 0xe000_0000);
    w32(&mut c, 0x1c, 0x1);
    assert_eq!(c.bar_address(2), Some(0x1_e000_0000));
    assert_eq!(c.bar(3), None, "the upper half is no BAR of its own");
}

#[test]
fn bad_bars_are_refused() {
    let mut c = PciConfig::new(header());
    assert!(c.add_bar(0, BarKind::Io, 0x30).is_err(), "not a power of two");
    assert!(c.add_bar(0, BarKind::Mem32 { prefetchable: false }, 8).is_err(), "below 16 bytes");
    assert!(c.add_bar(5, BarKind::Mem64 { prefetchable: false }, 0x1000).is_err(), "no room for the upper half");
    assert!(c.add_bar(6, BarKind::Io, 0x10).is_err(), "BAR 6 is the ROM");
    assert!(c.add_bar(0, BarKind::Rom, 0x1000).is_err(), "the ROM is BAR 6");
    assert!(c.add_bar(ROM_BAR, BarKind::Rom, 0x400).is_err(), "ROM below 2 KiB");
    c.add_bar(0, BarKind::Mem64 { prefetchable: false }, 0x1000).expect("mem64");
    assert!(c.add_bar(1, BarKind::Io, 0x10).is_err(), "BAR 1 is BAR 0's upper half");
    assert!(c.add_bar(0, BarKind::Io, 0x10).is_err(), "already declared");
}

#[test]
fn decoding_follows_command_and_rom_enable() {
    let mut c = PciConfig::new(header());
    c.add_bar(0, BarKind::Io, 0x20).expect("io");
    c.add_bar(1, BarKind::Mem32 { prefetchable: false }, 0x1000).expect("mem");
    c.add_bar(ROM_BAR, BarKind::Rom, 0x800).expect("rom");
    w32(&mut c, 0x10, 0xc000);
    w32(&mut c, 0x14, 0xfebf_0000);
    w32(&mut c, 0x30, 0xfeb8_0000);
    assert_eq!(c.bar_region(0), None, "I/O decoding off");
    c.write(COMMAND, &[0x01, 0]);
    assert_eq!(c.bar_region(0), Some(BarRegion { space: BarSpace::Pio, addr: 0xc000, len: 0x20 }));
    assert_eq!(c.bar_region(1), None);
    c.write(COMMAND, &[0x03, 0]);
    assert_eq!(c.bar_region(1), Some(BarRegion { space: BarSpace::Mmio, addr: 0xfebf_0000, len: 0x1000 }));
    assert_eq!(c.bar_region(ROM_BAR), None, "ROM enable bit clear");
    w32(&mut c, 0x30, 0xfeb8_0001);
    assert_eq!(c.bar_region(ROM_BAR), Some(BarRegion { space: BarSpace::Mmio, addr: 0xfeb8_0000, len: 0x800 }));
    w32(&mut c, 0x14, 0);
    assert_eq!(c.bar_region(1), None, "address 0 is unassigned");
}

#[test]
fn capabilities_chain_from_0x34() {
    let mut c = PciConfig::new(header());
    let a = c.add_capability(0x11, &[0; 10]).expect("msi-x");
    let b = c.add_capability(0x09, &[1, 2, 3]).expect("vendor");
    assert_eq!(a, 0x40);
    assert_eq!(b, 0x4c, "aligned to 4 after 12 bytes");
    assert_eq!(c.bytes[CAPABILITY_LIST], 0x40);
    assert_eq!(&c.bytes[0x40..0x42], &[0x11, 0x4c]);
    assert_eq!(&c.bytes[0x4c..0x51], &[0x09, 0x00, 1, 2, 3]);
    assert_ne!(c.bytes[STATUS] & STATUS_CAP_LIST as u8, 0);
    c.set_wmask(usize::from(a) + 3, &[0xc0]).expect("mask");
    c.write(usize::from(a) + 3, &[0xff]);
    assert_eq!(c.bytes[usize::from(a) + 3], 0xc0);
    c.reset();
    assert_eq!(c.bytes[usize::from(a) + 3], 0, "reset returns to the built bytes");
    assert_eq!(c.bytes[CAPABILITY_LIST], 0x40, "and keeps the chain");
    assert!(matches!(c.add_capability(0x10, &[0; 200]), Err(PciError::CapabilitySpace { .. })));
}

#[test]
fn restore_checks_identity_and_takes_guest_bits() {
    let mut c = PciConfig::new(header());
    c.add_bar(1, BarKind::Mem32 { prefetchable: false }, 0x1000).expect("mem");
    w32(&mut c, 0x14, 0xfebf_0000);
    c.write(COMMAND, &[0x02, 0]);
    let saved = c.bytes().to_vec();
    let mut d = PciConfig::new(header());
    d.add_bar(1, BarKind::Mem32 { prefetchable: false }, 0x1000).expect("mem");
    d.restore(&saved).expect("restore");
    assert_eq!(d.bytes().to_vec(), saved);
    let mut other = saved.clone();
    other[2] = 0x00;
    assert!(matches!(d.restore(&other), Err(PciError::Identity { offset: 0, .. })));
    assert_eq!(d.restore(&saved[..100]), Err(PciError::StateLength { len: 100 }));
    // Read-only bytes in the snapshot do not override the device's.
    let mut forged = saved.clone();
    forged[INTERRUPT_PIN] = 4;
    d.restore(&forged).expect("restore");
    assert_eq!(d.bytes()[INTERRUPT_PIN], 1);
}

#[test]
fn the_rom_bar_can_be_resized_for_a_restored_rom_block() {
    let mut c = PciConfig::new(header());
    assert!(c.resize_rom_bar(0x1000).is_err(), "no ROM BAR declared");
    c.add_bar(ROM_BAR, BarKind::Rom, 0x4_0000).expect("rom");
    w32(&mut c, ROM_ADDRESS, 0xffff_ffff);
    assert_eq!(r32(&c, ROM_ADDRESS), 0xfffc_0001, "256 KiB");
    c.resize_rom_bar(0x1000).expect("4 KiB");
    w32(&mut c, ROM_ADDRESS, 0xffff_f800);
    assert_eq!(r32(&c, ROM_ADDRESS), 0xffff_f000, "sizing now says 4 KiB");
    w32(&mut c, ROM_ADDRESS, 0xfebf_1001);
    assert_eq!(c.bar(ROM_BAR), Some((BarKind::Rom, 0x1000)));
    assert_eq!(c.bar_address(ROM_BAR), Some(0xfebf_1000));
    c.resize_rom_bar(0x4_0000).expect("back to 256 KiB");
    assert_eq!(r32(&c, ROM_ADDRESS), 0xfebc_0001, "address bits below the size are cleared, enable kept");
    assert!(c.resize_rom_bar(0x3000).is_err(), "not a power of two");
    assert!(c.resize_rom_bar(0x400).is_err(), "below 2 KiB");
}
