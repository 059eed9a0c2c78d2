use super::*;
use crate::irq::RecordingIrq;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const PORTS: PmPorts = PmPorts { pm1a_evt: 0x600, pm1a_cnt: 0x604, pm_tmr: 0x608, gpe0: 0xafe0 };

fn dev() -> (Pm, Arc<RecordingIrq>, Arc<AtomicU32>) {
    let sci = Arc::new(RecordingIrq::default());
    let offs = Arc::new(AtomicU32::new(0));
    let o = offs.clone();
    let pm = Pm::new(PORTS, sci.clone(), Arc::new(move || _ = o.fetch_add(1, Ordering::SeqCst)));
    (pm, sci, offs)
}

fn rd(pm: &mut Pm, base: u64, offset: u64, len: usize) -> u32 {
    let mut b = [0u8; 4];
    pm.read(base, offset, &mut b[..len]);
    u32::from_le_bytes(b)
}

#[test]
fn sci_en_is_set_at_power_on() {
    let (mut pm, sci, _) = dev();
    assert_eq!(rd(&mut pm, PORTS.pm1a_cnt, 0, 2), u32::from(SCI_EN));
    assert!(!sci.level());
}

#[test]
fn gpe_raises_sci_only_when_enabled_and_clears_on_write_one() {
    let (mut pm, sci, _) = dev();
    pm.raise_gpe(5).expect("bit 5");
    assert_eq!(rd(&mut pm, PORTS.gpe0, 0, 2), 0x20);
    assert!(!sci.level(), "GPE 5 is not enabled yet");
    pm.write(PORTS.gpe0, 2, &[0x20]);
    assert!(sci.level());
    assert_eq!(rd(&mut pm, PORTS.gpe0, 0, 4), 0x0020_0020);
    pm.write(PORTS.gpe0, 0, &[0x10]);
    assert!(sci.level(), "writing 1 to another bit leaves bit 5");
    pm.write(PORTS.gpe0, 0, &[0x20]);
    assert!(!sci.level());
    assert_eq!(rd(&mut pm, PORTS.gpe0, 0, 2), 0);
    assert_eq!(pm.raise_gpe(16), Err(PmError::GpeBit { bit: 16 }));
}

#[test]
fn pm1_status_is_write_one_to_clear_and_enable_is_masked() {
    let (mut pm, sci, _) = dev();
    pm.pm1_sts = 0x0100;
    pm.write(PORTS.pm1a_evt, 2, &[0x00, 0x01]);
    assert!(sci.level(), "power button status with its enable set");
    assert_eq!(rd(&mut pm, PORTS.pm1a_evt, 0, 4), 0x0100_0100);
    pm.write(PORTS.pm1a_evt, 0, &[0x00, 0x01, 0x00, 0x01]);
    assert!(!sci.level());
    pm.write(PORTS.pm1a_evt, 2, &[0xff, 0xff]);
    assert_eq!(rd(&mut pm, PORTS.pm1a_evt, 2, 2), u32::from(PM1_EN_MASK));
}

#[test]
fn s5_powers_off_and_other_sleep_types_do_not() {
    let (mut pm, _, offs) = dev();
    let s3 = (1u16 << 10) | SLP_EN | SCI_EN;
    pm.write(PORTS.pm1a_cnt, 0, &s3.to_le_bytes());
    assert_eq!(offs.load(Ordering::SeqCst), 0);
    assert_eq!(rd(&mut pm, PORTS.pm1a_cnt, 0, 2) & u32::from(SLP_EN), 0, "SLP_EN reads 0");
    let s5 = (SLP_TYP_S5 << 10) | SLP_EN | SCI_EN;
    pm.write(PORTS.pm1a_cnt, 0, &s5.to_le_bytes());
    assert_eq!(offs.load(Ordering::SeqCst), 1);
}

#[test]
fn timer_runs_at_3_58_mhz_in_24_bits() {
    let (mut pm, _, _) = dev();
    let a = rd(&mut pm, PORTS.pm_tmr, 0, 4);
    std::thread::sleep(Duration::from_millis(20));
    let b = rd(&mut pm, PORTS.pm_tmr, 0, 4);
    let ticks = b.wrapping_sub(a) & 0xff_ffff;
    // 20 ms is 71,591 ticks; allow for a slow, shared machine.
    assert!((71_000..3_579_545).contains(&ticks), "{ticks} ticks in 20+ ms");
    assert!(b <= 0xff_ffff);
    pm.timer_base = 0xff_fff0;
    pm.timer_start = Instant::now() - Duration::from_micros(10);
    assert!(pm.timer() < 0x100, "wraps at 24 bits: {:#x}", pm.timer());
}

#[test]
fn state_round_trips_and_is_validated() {
    let (mut pm, _, _) = dev();
    pm.write(PORTS.gpe0, 2, &[0x20]);
    pm.raise_gpe(5).expect("raise");
    let s = pm.state();
    let (mut q, sci, _) = dev();
    q.restore(&s).expect("restore");
    assert!(sci.level(), "the restored SCI level follows the state");
    let t = q.state();
    assert_eq!(PmState { timer: s.timer, ..t }, s);
    assert!(t.timer.wrapping_sub(s.timer) & 0xff_ffff < 3_579_545, "the timer continues from the saved count");
    assert_eq!(q.restore(&PmState { timer: 0x100_0000, ..s }), Err(PmError::Timer { value: 0x100_0000 }));
    assert_eq!(q.restore(&PmState { pm1_cnt: SLP_EN, ..s }), Err(PmError::Control { value: SLP_EN }));
}
