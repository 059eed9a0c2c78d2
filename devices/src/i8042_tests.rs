use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

fn dev() -> (I8042, Arc<AtomicU32>) {
    let resets = Arc::new(AtomicU32::new(0));
    let r = resets.clone();
    (I8042::new(Arc::new(move || _ = r.fetch_add(1, Ordering::SeqCst))), resets)
}

fn inb(d: &mut I8042, port: u64) -> u8 {
    let mut b = [0u8];
    d.read(port, 0, &mut b);
    b[0]
}

fn drain(d: &mut I8042) -> Vec<(u8, bool)> {
    let mut out = Vec::new();
    while inb(d, STATUS_PORT) & STR_OBF != 0 {
        let aux = inb(d, STATUS_PORT) & STR_AUXDATA != 0;
        out.push((inb(d, DATA_PORT), aux));
    }
    out
}

#[test]
fn empty_controller_has_nothing_to_flush() {
    let (mut d, _) = dev();
    assert_eq!(inb(&mut d, STATUS_PORT) & (STR_OBF | 0x02), 0, "no output, ready for input");
}

#[test]
fn controller_commands_seabios_sends() {
    let (mut d, _) = dev();
    d.write(STATUS_PORT, 0, &[0xaa]);
    assert_eq!(drain(&mut d), vec![(0x55, false)]);
    assert_ne!(inb(&mut d, STATUS_PORT) & STR_SYS, 0);
    d.write(STATUS_PORT, 0, &[0xab]);
    d.write(STATUS_PORT, 0, &[0xa9]);
    assert_eq!(drain(&mut d), vec![(0, false), (0, false)]);
    d.write(STATUS_PORT, 0, &[0x60]);
    d.write(DATA_PORT, 0, &[0x30]);
    d.write(STATUS_PORT, 0, &[0x20]);
    assert_eq!(drain(&mut d), vec![(0x30, false)]);
    d.write(STATUS_PORT, 0, &[0xae]);
    d.write(STATUS_PORT, 0, &[0xa8]);
    d.write(STATUS_PORT, 0, &[0x20]);
    assert_eq!(drain(&mut d), vec![(0x00, false)]);
    d.write(STATUS_PORT, 0, &[0xad]);
    d.write(STATUS_PORT, 0, &[0xa7]);
    d.write(STATUS_PORT, 0, &[0x20]);
    assert_eq!(drain(&mut d), vec![(0x30, false)]);
}

#[test]
fn keyboard_commands() {
    let (mut d, _) = dev();
    d.write(DATA_PORT, 0, &[0xff]);
    assert_eq!(drain(&mut d), vec![(0xfa, false), (0xaa, false)]);
    d.write(DATA_PORT, 0, &[0xf5]);
    d.write(DATA_PORT, 0, &[0xf0]);
    d.write(DATA_PORT, 0, &[0x02]);
    d.write(DATA_PORT, 0, &[0xf4]);
    assert_eq!(drain(&mut d), vec![(0xfa, false); 4]);
    d.write(DATA_PORT, 0, &[0xf2]);
    assert_eq!(drain(&mut d), vec![(0xfa, false), (0xab, false), (0x83, false)]);
}

#[test]
fn aux_port_answers_as_a_mouse_and_is_marked() {
    let (mut d, _) = dev();
    d.write(STATUS_PORT, 0, &[0xd4]);
    d.write(DATA_PORT, 0, &[0xff]);
    assert_eq!(drain(&mut d), vec![(0xfa, true), (0xaa, true), (0x00, true)]);
    d.write(STATUS_PORT, 0, &[0xd4]);
    d.write(DATA_PORT, 0, &[0xf2]);
    assert_eq!(drain(&mut d), vec![(0xfa, true), (0x00, true)]);
}

#[test]
fn resets_through_0xfe_and_port_92() {
    let (mut d, resets) = dev();
    d.write(STATUS_PORT, 0, &[0xff]);
    assert_eq!(resets.load(Ordering::SeqCst), 0, "0xff pulses no line");
    d.write(STATUS_PORT, 0, &[0xfe]);
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    let a = inb(&mut d, PORT_A);
    assert_eq!(a & 1, 0);
    d.write(PORT_A, 0, &[a | 0x02]);
    assert_eq!(resets.load(Ordering::SeqCst), 1, "setting A20 does not reset");
    d.write(PORT_A, 0, &[0x03]);
    assert_eq!(resets.load(Ordering::SeqCst), 2);
    assert_eq!(inb(&mut d, PORT_A), 0x02);
}

#[test]
fn state_round_trips_and_is_validated() {
    let (mut d, _) = dev();
    d.write(DATA_PORT, 0, &[0xff]);
    d.write(STATUS_PORT, 0, &[0x60]);
    let s = d.state();
    let (mut e, _) = dev();
    e.restore(&s).expect("restore");
    assert_eq!(e.state(), s);
    e.write(DATA_PORT, 0, &[0x45]);
    assert_eq!(drain(&mut e), vec![(0xfa, false), (0xaa, false)]);
    let bad = I8042State { queue: vec![OutByte { data: 0, aux: false }; 17], ..s.clone() };
    assert_eq!(e.restore(&bad), Err(I8042Error::Queue { len: 17 }));
    let bad = I8042State { pending: Some(0x20), ..s };
    assert_eq!(e.restore(&bad), Err(I8042Error::Pending { cmd: 0x20 }));
}
