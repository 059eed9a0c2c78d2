use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// 2026-12-01 21:23:18 UTC, a Tuesday.
const T0: u64 = 1_796_160_198;

fn fixed(secs: u64, nanos: u32) -> Clock {
    Arc::new(move || Duration::new(secs, nanos))
}

fn cfg(mem: u64, vcpus: u8) -> CmosConfig {
    let below = mem.min(3 << 30);
    CmosConfig { below_4g: below, above_4g: mem - below, vcpus }
}

fn cmos_at(secs: u64) -> Cmos {
    Cmos::with_clock(cfg(128 << 20, 1), fixed(secs, 0))
}

/// Reads a register through the ports, as firmware does.
fn rd(c: &mut Cmos, reg: u8) -> u8 {
    c.write(0x70, 0, &[reg]);
    let mut b = [0u8];
    c.read(0x70, 1, &mut b);
    b[0]
}

fn wr(c: &mut Cmos, reg: u8, v: u8) {
    c.write(0x70, 0, &[reg]);
    c.write(0x70, 1, &[v]);
}

#[test]
fn clock_reads_bcd_24h_by_default() {
    let mut c = cmos_at(T0);
    assert_eq!(rd(&mut c, REG_SECONDS), 0x18);
    assert_eq!(rd(&mut c, REG_MINUTES), 0x23);
    assert_eq!(rd(&mut c, REG_HOURS), 0x21);
    assert_eq!(rd(&mut c, REG_WEEKDAY), 3, "Tuesday");
    assert_eq!(rd(&mut c, REG_DAY), 0x01);
    assert_eq!(rd(&mut c, REG_MONTH), 0x12);
    assert_eq!(rd(&mut c, REG_YEAR), 0x26);
    assert_eq!(rd(&mut c, REG_CENTURY), 0x20);
}

#[test]
fn clock_reads_binary_and_12_hour_as_status_b_says() {
    let mut c = cmos_at(T0);
    wr(&mut c, REG_STATUS_B, STATUS_B_BINARY | STATUS_B_24H);
    assert_eq!(rd(&mut c, REG_HOURS), 21);
    assert_eq!(rd(&mut c, REG_MINUTES), 23);
    assert_eq!(rd(&mut c, REG_YEAR), 26);
    assert_eq!(rd(&mut c, REG_CENTURY), 20);
    wr(&mut c, REG_STATUS_B, 0);
    assert_eq!(rd(&mut c, REG_HOURS), 0x80 | 0x09, "9 PM in BCD with the PM bit");
    let mut morning = Cmos::with_clock(cfg(128 << 20, 1), fixed(1_796_115_900, 0));
    wr(&mut morning, REG_STATUS_B, 0);
    assert_eq!(rd(&mut morning, REG_HOURS), 0x09);
}

#[test]
fn clock_follows_the_host_clock() {
    let now = Arc::new(AtomicU64::new(T0));
    let n = now.clone();
    let mut c = Cmos::with_clock(cfg(128 << 20, 1), Arc::new(move || Duration::from_secs(n.load(Ordering::SeqCst))));
    assert_eq!(rd(&mut c, REG_SECONDS), 0x18);
    now.store(T0 + 61, Ordering::SeqCst);
    assert_eq!(rd(&mut c, REG_SECONDS), 0x19);
    assert_eq!(rd(&mut c, REG_MINUTES), 0x24);
}

#[test]
fn guest_writes_move_the_clock_by_an_offset() {
    let now = Arc::new(AtomicU64::new(T0));
    let n = now.clone();
    let mut c = Cmos::with_clock(cfg(128 << 20, 1), Arc::new(move || Duration::from_secs(n.load(Ordering::SeqCst))));
    wr(&mut c, REG_STATUS_B, 0x80 | STATUS_B_24H);
    wr(&mut c, REG_YEAR, 0x99);
    wr(&mut c, REG_CENTURY, 0x19);
    wr(&mut c, REG_MONTH, 0x12);
    wr(&mut c, REG_DAY, 0x31);
    wr(&mut c, REG_HOURS, 0x23);
    wr(&mut c, REG_MINUTES, 0x59);
    wr(&mut c, REG_SECONDS, 0x59);
    wr(&mut c, REG_STATUS_B, STATUS_B_24H);
    assert_eq!(c.state().clock_offset_secs, 946_684_799 - T0 as i64);
    now.store(T0 + 1, Ordering::SeqCst);
    assert_eq!(rd(&mut c, REG_YEAR), 0x00, "the clock runs on from the guest's time into 2000");
    assert_eq!(rd(&mut c, REG_CENTURY), 0x20);
    assert_eq!(rd(&mut c, REG_MONTH), 0x01);
    // Invalid BCD is ignored.
    let before = c.state().clock_offset_secs;
    wr(&mut c, REG_MINUTES, 0x7a);
    assert_eq!(c.state().clock_offset_secs, before);
}

#[test]
fn status_registers() {
    let mut c = cmos_at(T0);
    assert_eq!(rd(&mut c, REG_STATUS_A), 0x26);
    assert_eq!(rd(&mut c, REG_STATUS_B), 0x02);
    assert_eq!(rd(&mut c, REG_STATUS_D), 0x80);
    let mut late = Cmos::with_clock(cfg(128 << 20, 1), fixed(T0, 999_900_000));
    assert_eq!(rd(&mut late, REG_STATUS_A), 0xa6, "update in progress near the second's end");
    c.regs[usize::from(REG_STATUS_C)] = 0x90;
    assert_eq!(rd(&mut c, REG_STATUS_C), 0x90);
    assert_eq!(rd(&mut c, REG_STATUS_C), 0, "reading C clears it");
    wr(&mut c, REG_SHUTDOWN, 0x0a);
    assert_eq!(rd(&mut c, REG_SHUTDOWN), 0x0a);
}

#[test]
fn index_port_ignores_the_nmi_bit() {
    let mut c = Cmos::with_clock(cfg(128 << 20, 4), fixed(T0, 0));
    assert_eq!(rd(&mut c, 0x80 | REG_NB_CPUS), 3);
}

#[test]
fn registers_firmware_reads() {
    let mut c = Cmos::with_clock(cfg(32 << 20, 2), fixed(T0, 0));
    assert_eq!(rd(&mut c, REG_FLOPPY), 0, "no floppy");
    assert_eq!(rd(&mut c, REG_EQUIPMENT), 0x06);
    assert_eq!(u16::from_le_bytes([rd(&mut c, 0x15), rd(&mut c, 0x16)]), 640);
    // 32 MiB: 31 MiB above 1 MiB in KiB; 16 MiB above 16 MiB in 64 KiB units.
    assert_eq!(u16::from_le_bytes([rd(&mut c, 0x17), rd(&mut c, 0x18)]), 31 * 1024);
    assert_eq!(u16::from_le_bytes([rd(&mut c, 0x30), rd(&mut c, 0x31)]), 31 * 1024);
    assert_eq!(u16::from_le_bytes([rd(&mut c, 0x34), rd(&mut c, 0x35)]), 16 * 16);
    assert_eq!([rd(&mut c, 0x5b), rd(&mut c, 0x5c), rd(&mut c, 0x5d)], [0, 0, 0]);
    assert_eq!(rd(&mut c, REG_BOOT_ORDER_1), 0);
    assert_eq!(rd(&mut c, REG_BOOT_ORDER_2), 0);
    assert_eq!(rd(&mut c, REG_NB_CPUS), 1);
    let sum: u16 = (0x10..=0x2d).map(|r| u16::from(rd(&mut c, r))).sum();
    assert_eq!(u16::from_be_bytes([rd(&mut c, 0x2e), rd(&mut c, 0x2f)]), sum);
}

#[test]
fn large_memory_sizes_saturate_and_go_above_4g() {
    // 8 GiB: 3 GiB below 4 GiB, 5 GiB above.
    let mut c = Cmos::with_clock(cfg(8 << 30, 1), fixed(T0, 0));
    assert_eq!(u16::from_le_bytes([rd(&mut c, 0x17), rd(&mut c, 0x18)]), 0xffff);
    assert_eq!(u16::from_le_bytes([rd(&mut c, 0x34), rd(&mut c, 0x35)]), (3072 - 16) * 16);
    let above = u32::from_le_bytes([rd(&mut c, 0x5b), rd(&mut c, 0x5c), rd(&mut c, 0x5d), 0]);
    assert_eq!(u64::from(above), (5u64 << 30) / 0x1_0000);
}

#[test]
fn state_round_trips_and_is_validated() {
    let mut c = cmos_at(T0);
    wr(&mut c, 0x40, 0x5a);
    wr(&mut c, REG_MINUTES, 0x00);
    let s = c.state();
    let mut d = cmos_at(T0);
    d.restore(&s).expect("restore");
    assert_eq!(rd(&mut d, 0x40), 0x5a);
    assert_eq!(rd(&mut d, REG_MINUTES), 0x00);
    assert_eq!(d.state(), CmosState { index: REG_MINUTES, ..s.clone() });
    let bad = CmosState { regs: vec![0; 64], ..s.clone() };
    assert_eq!(d.restore(&bad), Err(CmosError::Registers { len: 64 }));
    let bad = CmosState { index: 0x80, ..s.clone() };
    assert_eq!(d.restore(&bad), Err(CmosError::Index { index: 0x80 }));
    let bad = CmosState { clock_offset_secs: i64::MIN, ..s };
    assert!(matches!(d.restore(&bad), Err(CmosError::Offset { .. })));
}

#[test]
fn calendar_conversions() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(days_from_civil(2000, 2, 29), 11_016);
    assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    assert_eq!(DateTime::from_secs(T0 as i64).weekday(), 3);
    let t = DateTime::from_secs(946_684_799);
    assert_eq!((t.year, t.month, t.day, t.hour, t.minute, t.second), (1999, 12, 31, 23, 59, 59));
    assert_eq!(t.to_secs(), 946_684_799);
}
