//! VMGenID driven as SeaBIOS drives it (fw_cfg DMA WRITE of the address), no KVM.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use migrate::ram::{GuestMemory, RamBlockConfig, RamRegistry};

use super::*;
use crate::bus::BusDevice;
use crate::fw_cfg::{DMA_CTL_READ, DMA_CTL_SELECT, DMA_CTL_WRITE, PORT_BASE, PORT_DMA};

const RAM: u64 = 1 << 20;
const GUID_A: &str = "324e6eaf-d1d1-4bf6-bf41-b9bb6c91fb87";
const GUID_B: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

fn guid(s: &str) -> Guid {
    s.parse().expect("guid")
}

fn mem() -> GuestMemory {
    let reg = RamRegistry::new();
    let b = reg
        .add(RamBlockConfig { idstr: "pc.ram".into(), size: RAM, max_size: RAM, page_size: 0, resizeable: false })
        .expect("guest memory");
    GuestMemory::flat(b)
}

/// fw_cfg with the device registered; the notify callback counts.
fn setup(g: Guid) -> (GuestMemory, Arc<VmGenId>, FwCfg, Arc<AtomicUsize>) {
    let m = mem();
    let dev = VmGenId::new(m.clone(), g);
    let mut fw = FwCfg::new(m.clone());
    dev.register(&mut fw).expect("register");
    let notified = Arc::new(AtomicUsize::new(0));
    let n = notified.clone();
    dev.set_notify(Box::new(move || {
        n.fetch_add(1, Ordering::SeqCst);
    }));
    (m, dev, fw, notified)
}

/// One fw_cfg DMA request (descriptor at 0x1000, buffer at 0x2000); returns the status.
fn dma(fw: &mut FwCfg, m: &GuestMemory, file: &str, control: u32, buf: &[u8]) -> (u32, Vec<u8>) {
    let (key, _) = fw.file(file).expect("file");
    m.write(0x2000, buf).expect("buffer");
    let mut d = Vec::new();
    d.extend_from_slice(&((u32::from(key) << 16) | DMA_CTL_SELECT | control).to_be_bytes());
    d.extend_from_slice(&(buf.len() as u32).to_be_bytes());
    d.extend_from_slice(&0x2000u64.to_be_bytes());
    m.write(0x1000, &d).expect("descriptor");
    fw.write(PORT_BASE, PORT_DMA, &0u32.to_be_bytes());
    fw.write(PORT_BASE, PORT_DMA + 4, &0x1000u32.to_be_bytes());
    let mut s = [0u8; 4];
    m.read(0x1000, &mut s).expect("status");
    let mut out = vec![0u8; buf.len()];
    m.read(0x2000, &mut out).expect("buffer");
    (u32::from_be_bytes(s), out)
}

/// What the firmware does: copy the GUID file into guest memory at `page` and report
/// `page + 40` through `etc/vmgenid_addr`.
fn firmware_places(fw: &mut FwCfg, m: &GuestMemory, page: u64) -> u32 {
    let (st, file) = dma(fw, m, VMGENID_GUID_FILE, DMA_CTL_READ, &vec![0; VMGENID_GUID_FILE_LEN]);
    assert_eq!(st, 0);
    m.write(page, &file).expect("allocate");
    dma(fw, m, VMGENID_ADDR_FILE, DMA_CTL_WRITE, &(page + VMGENID_GUID_OFFSET).to_le_bytes()).0
}

fn guest_guid(m: &GuestMemory, addr: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    m.read(addr, &mut b).expect("read");
    b
}

#[test]
fn guid_text_and_guest_byte_order() {
    let g = guid(GUID_A);
    assert_eq!(g.to_string(), GUID_A);
    // QEMU's docs/specs/vmgenid.rst example: the first three fields byte-swapped.
    assert_eq!(
        g.guest_bytes(),
        [0xaf, 0x6e, 0x4e, 0x32, 0xd1, 0xd1, 0xf6, 0x4b, 0xbf, 0x41, 0xb9, 0xbb, 0x6c, 0x91, 0xfb, 0x87]
    );
    assert!("324e6eaf-d1d1-4bf6-bf41".parse::<Guid>().is_err());
    assert!("324e6eaf-d1d1-4bf6-bf41-b9bb6c91fbzz".parse::<Guid>().is_err());
    let r1 = Guid::random().expect("random");
    let r2 = Guid::random().expect("random");
    assert_ne!(r1, r2);
    assert_eq!(r1.0[6] >> 4, 4, "version 4");
}

#[test]
fn guid_file_holds_the_guid_at_40() {
    let (m, _dev, mut fw, _) = setup(guid(GUID_A));
    let (st, file) = dma(&mut fw, &m, VMGENID_GUID_FILE, DMA_CTL_READ, &vec![0; VMGENID_GUID_FILE_LEN]);
    assert_eq!(st, 0);
    assert_eq!(file[40..56], guid(GUID_A).guest_bytes());
    assert!(file[..40].iter().chain(&file[56..]).all(|&b| b == 0));
}

#[test]
fn firmware_write_pointer_records_the_address() {
    let (m, dev, mut fw, notified) = setup(guid(GUID_A));
    assert_eq!(dev.addr(), 0);
    assert_eq!(firmware_places(&mut fw, &m, 0x8_0000), 0, "the DMA write succeeds");
    assert_eq!(dev.addr(), 0x8_0028);
    assert_eq!(guest_guid(&m, 0x8_0028), guid(GUID_A).guest_bytes());
    assert_eq!(notified.load(Ordering::SeqCst), 0, "placing it is no new generation");
}

#[test]
fn addresses_outside_guest_ram_are_ignored() {
    let (m, dev, mut fw, _) = setup(guid(GUID_A));
    assert_eq!(firmware_places(&mut fw, &m, 0x8_0000), 0);
    for bad in [RAM - 8, RAM, u64::MAX - 4, 0xffff_ffff_0000] {
        let (st, _) = dma(&mut fw, &m, VMGENID_ADDR_FILE, DMA_CTL_WRITE, &bad.to_le_bytes());
        assert_eq!(st, 0, "fw_cfg accepts the write");
        assert_eq!(dev.addr(), 0x8_0028, "{bad:#x} is not taken");
    }
    // A write past the file's 8 bytes is refused by fw_cfg itself.
    let (st, _) = dma(&mut fw, &m, VMGENID_ADDR_FILE, DMA_CTL_WRITE, &[1u8; 9]);
    assert_eq!(st, crate::fw_cfg::DMA_CTL_ERROR);
    assert_eq!(dev.addr(), 0x8_0028);
}

#[test]
fn new_generation_writes_the_guid_and_notifies() {
    let (m, dev, mut fw, notified) = setup(guid(GUID_A));
    firmware_places(&mut fw, &m, 0x8_0000);
    assert!(dev.new_generation(guid(GUID_B)).expect("new generation"));
    assert_eq!(guest_guid(&m, 0x8_0028), guid(GUID_B).guest_bytes());
    assert_eq!(notified.load(Ordering::SeqCst), 1);
    dev.sync_fw_cfg(&mut fw).expect("sync");
    let (_, file) = dma(&mut fw, &m, VMGENID_GUID_FILE, DMA_CTL_READ, &vec![0; VMGENID_GUID_FILE_LEN]);
    assert_eq!(file[40..56], guid(GUID_B).guest_bytes(), "a firmware run after a reset sees the new GUID");
}

#[test]
fn new_generation_before_the_firmware_ran_only_stores_it() {
    let (m, dev, mut fw, notified) = setup(guid(GUID_A));
    assert!(!dev.new_generation(guid(GUID_B)).expect("new generation"));
    assert_eq!(notified.load(Ordering::SeqCst), 0);
    dev.sync_fw_cfg(&mut fw).expect("sync");
    firmware_places(&mut fw, &m, 0x9_0000);
    assert_eq!(guest_guid(&m, 0x9_0028), guid(GUID_B).guest_bytes());
}

#[test]
fn state_round_trip_and_validation() {
    let (m, dev, mut fw, _) = setup(guid(GUID_A));
    firmware_places(&mut fw, &m, 0x8_0000);
    let s = dev.state();
    assert_eq!(s, VmGenIdState { guid: guid(GUID_A), addr: 0x8_0028 });
    let (m2, other, mut fw2, _) = setup(guid(GUID_B));
    other.restore(&s).expect("restore");
    assert_eq!(other.state(), s);
    other.sync_fw_cfg(&mut fw2).expect("sync");
    let (_, addr) = dma(&mut fw2, &m2, VMGENID_ADDR_FILE, DMA_CTL_READ, &[0; 8]);
    assert_eq!(addr, 0x8_0028u64.to_le_bytes(), "fw_cfg's copy of the address is restored too");
    let bad = VmGenIdState { addr: RAM - 4, ..s };
    assert!(matches!(other.restore(&bad), Err(VmGenIdError::BadAddr { .. })));
    assert_eq!(other.state(), s, "a rejected state changes nothing");
    other.reset();
    assert_eq!(other.addr(), 0);
}
