//! fw_cfg through its ports and DMA, as firmware drives it; no KVM needed.

use std::sync::{Arc, Mutex};

use migrate::ram::{GuestMemory, RamBlock, RamBlockConfig, RamRegistry};

use super::*;

/// 1 MiB of guest RAM in one block at guest address 0.
fn mem_block() -> (GuestMemory, Arc<RamBlock>) {
    let reg = RamRegistry::new();
    let b = reg
        .add(RamBlockConfig {
            idstr: "pc.ram".into(),
            size: 1 << 20,
            max_size: 1 << 20,
            page_size: 0,
            resizeable: false,
        })
        .expect("guest memory");
    (GuestMemory::flat(b.clone()), b)
}

fn mem() -> GuestMemory {
    mem_block().0
}

fn select(f: &mut FwCfg, key: u16) {
    f.write(PORT_BASE, PORT_SELECTOR, &key.to_le_bytes());
}

fn read(f: &mut FwCfg, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let mut b = [0u8];
            f.read(PORT_BASE, PORT_DATA, &mut b);
            b[0]
        })
        .collect()
}

/// Runs a DMA request: descriptor at 0x1000, buffer at `addr`. Returns the status word.
fn dma(f: &mut FwCfg, m: &GuestMemory, control: u32, len: u32, addr: u64) -> u32 {
    let mut d = Vec::new();
    d.extend_from_slice(&control.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&addr.to_be_bytes());
    m.write(0x1000, &d).expect("descriptor");
    f.write(PORT_BASE, PORT_DMA, &0u32.to_be_bytes());
    f.write(PORT_BASE, PORT_DMA + 4, &0x1000u32.to_be_bytes());
    let mut s = [0u8; 4];
    m.read(0x1000, &mut s).expect("status");
    u32::from_be_bytes(s)
}

#[test]
fn signature_and_features_over_ports() {
    let mut f = FwCfg::new(mem());
    select(&mut f, FW_CFG_SIGNATURE);
    assert_eq!(read(&mut f, 6), b"QEMU\0\0", "reads past the end give zeros");
    select(&mut f, FW_CFG_ID);
    assert_eq!(read(&mut f, 4), 3u32.to_le_bytes());
    let mut sig = [0u8; 8];
    f.read(PORT_BASE, PORT_DMA, &mut sig);
    assert_eq!(&sig, b"QEMU CFG");
    let mut nodma = FwCfg::without_dma();
    select(&mut nodma, FW_CFG_ID);
    assert_eq!(read(&mut nodma, 4), 1u32.to_le_bytes());
}

#[test]
fn directory_is_sorted_by_name_with_current_sizes() {
    let mut f = FwCfg::new(mem());
    f.add_file("opt/z", vec![1; 10]).expect("add");
    f.add_file("etc/e820", vec![2; 40]).expect("add");
    f.add_file("bootorder", vec![3; 3]).expect("add");
    select(&mut f, FW_CFG_FILE_DIR);
    let count = u32::from_be_bytes(read(&mut f, 4).try_into().expect("4"));
    assert_eq!(count, 3);
    let mut names = Vec::new();
    for i in 0..3u16 {
        let e = read(&mut f, DIR_ENTRY_LEN);
        let size = u32::from_be_bytes(e[0..4].try_into().expect("4"));
        let key = u16::from_be_bytes([e[4], e[5]]);
        let name: String = e[8..].iter().take_while(|b| **b != 0).map(|b| *b as char).collect();
        assert_eq!(key, FW_CFG_FILE_FIRST + i);
        select(&mut f, key);
        assert_eq!(read(&mut f, size as usize).len(), size as usize);
        select(&mut f, FW_CFG_FILE_DIR);
        read(&mut f, 4 + DIR_ENTRY_LEN * (i as usize + 1));
        names.push((name, size));
    }
    assert_eq!(names, vec![("bootorder".into(), 3), ("etc/e820".into(), 40), ("opt/z".into(), 10)]);
    assert_eq!(f.file("etc/e820"), Some((0x21, 40)));
}

#[test]
fn dma_read_skip_select_and_zero_fill() {
    let m = mem();
    let mut f = FwCfg::new(m.clone());
    f.add_file("a", (0..100u8).collect()).expect("add");
    let key = u32::from(f.file("a").expect("file").0);
    assert_eq!(dma(&mut f, &m, (key << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP, 10, 0), 0);
    assert_eq!(dma(&mut f, &m, DMA_CTL_READ, 5, 0x2000), 0);
    let mut got = [0u8; 5];
    m.read(0x2000, &mut got).expect("read");
    assert_eq!(got, [10, 11, 12, 13, 14]);
    // Reading past the end zero-fills the rest.
    m.write(0x3000, &[0xff; 100]).expect("fill");
    assert_eq!(dma(&mut f, &m, DMA_CTL_READ, 100, 0x3000), 0);
    let mut tail = [0u8; 100];
    m.read(0x3000, &mut tail).expect("read");
    assert_eq!(tail[..85].to_vec(), (15..100u8).collect::<Vec<_>>());
    assert!(tail[85..].iter().all(|b| *b == 0));
    // The same directory by DMA as by port.
    assert_eq!(dma(&mut f, &m, (u32::from(FW_CFG_FILE_DIR) << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 68, 0x4000), 0);
    let mut dir = vec![0u8; 68];
    m.read(0x4000, &mut dir).expect("read");
    assert_eq!(dir, f.directory());
}

#[test]
fn dma_errors() {
    let m = mem();
    let mut f = FwCfg::new(m.clone());
    f.add_file("ro", vec![0; 16]).expect("add");
    let key = u32::from(f.file("ro").expect("file").0);
    // A write to a read-only file.
    assert_eq!(dma(&mut f, &m, (key << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 4, 0x2000), DMA_CTL_ERROR);
    // A read into memory the guest does not have.
    assert_eq!(dma(&mut f, &m, (key << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 16, 0x10_0000 - 8), DMA_CTL_ERROR);
    assert_eq!(dma(&mut f, &m, (key << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 16, u64::MAX - 4), DMA_CTL_ERROR);
    // A descriptor outside guest memory is ignored, not a crash.
    f.write(PORT_BASE, PORT_DMA, &0xffff_ffffu32.to_be_bytes());
    f.write(PORT_BASE, PORT_DMA + 4, &0u32.to_be_bytes());
}

#[test]
fn dma_write_to_a_writable_file_calls_back_but_never_grows_it() {
    let m = mem();
    let mut f = FwCfg::new(m.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    f.add_file_with_callbacks(
        "w",
        vec![0; 8],
        None,
        Some(Box::new(move |off, d| s.lock().expect("lock").push((off, d.to_vec())))),
    )
    .expect("add");
    let key = u32::from(f.file("w").expect("file").0);
    m.write(0x2000, &[1, 2, 3, 4]).expect("data");
    assert_eq!(dma(&mut f, &m, (key << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP, 2, 0), 0);
    assert_eq!(dma(&mut f, &m, DMA_CTL_WRITE, 4, 0x2000), 0);
    assert_eq!(*seen.lock().expect("lock"), vec![(2, vec![1, 2, 3, 4])]);
    select(&mut f, key as u16);
    assert_eq!(read(&mut f, 8), vec![0, 0, 1, 2, 3, 4, 0, 0]);
    assert_eq!(dma(&mut f, &m, (key << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 9, 0x2000), DMA_CTL_ERROR);
    assert_eq!(f.file("w").map(|x| x.1), Some(8));
}

#[test]
fn select_callbacks_run_on_every_select() {
    let mut f = FwCfg::new(mem());
    let n = Arc::new(Mutex::new(0));
    let c = n.clone();
    f.add_file_with_callbacks("cb", vec![1], Some(Box::new(move || *c.lock().expect("lock") += 1)), None).expect("add");
    let key = f.file("cb").expect("file").0;
    select(&mut f, key);
    select(&mut f, key);
    assert_eq!(*n.lock().expect("lock"), 2);
}

#[test]
fn ram_block_files_follow_resizes() {
    let reg = RamRegistry::new();
    let block = reg
        .add(RamBlockConfig {
            idstr: "/rom@etc/acpi/tables".into(),
            size: 5000,
            max_size: 2 << 20,
            page_size: 0,
            resizeable: true,
        })
        .expect("block");
    block.write(0, &[0xab; 5000]).expect("write");
    let mut f = FwCfg::new(mem());
    f.add_ram_block_file("etc/acpi/tables", block).expect("add");
    assert_eq!(f.file("etc/acpi/tables").map(|x| x.1), Some(5000));
    reg.resize("/rom@etc/acpi/tables", 9000).expect("grow");
    assert_eq!(f.file("etc/acpi/tables").map(|x| x.1), Some(9000));
    select(&mut f, FW_CFG_FILE_DIR);
    let dir = read(&mut f, 4 + DIR_ENTRY_LEN);
    assert_eq!(u32::from_be_bytes(dir[4..8].try_into().expect("4")), 9000);
    reg.resize("/rom@etc/acpi/tables", 100).expect("shrink");
    select(&mut f, FW_CFG_FILE_FIRST);
    assert_eq!(read(&mut f, 101), [vec![0xab; 100], vec![0]].concat());
}

#[test]
fn bad_configuration_is_refused() {
    let mut f = FwCfg::new(mem());
    assert_eq!(f.add_bytes(FW_CFG_SIGNATURE, vec![]), Err(FwCfgError::BadKey { key: 0 }));
    assert_eq!(f.add_bytes(0x25, vec![]), Err(FwCfgError::BadKey { key: 0x25 }));
    f.add_bytes(FW_CFG_RAM_SIZE, vec![0; 8]).expect("add");
    assert_eq!(f.add_bytes(FW_CFG_RAM_SIZE, vec![]), Err(FwCfgError::DuplicateKey { key: 3 }));
    f.add_file("x", vec![]).expect("add");
    assert!(matches!(f.add_file("x", vec![]), Err(FwCfgError::DuplicateFile { .. })));
    assert!(matches!(f.add_file(&"n".repeat(56), vec![]), Err(FwCfgError::NameTooLong { .. })));
    assert_eq!(f.add_file("", vec![]), Err(FwCfgError::BadName));
}

#[test]
fn state_round_trip_and_validation() {
    let mut f = FwCfg::new(mem());
    f.add_file("a", vec![7; 20]).expect("add");
    let key = f.file("a").expect("file").0;
    select(&mut f, key);
    read(&mut f, 5);
    f.write(PORT_BASE, PORT_DMA, &0x1234u32.to_be_bytes());
    let s = f.state();
    assert_eq!(s, FwCfgState { selector: Some(key), offset: 5, dma_high: 0x1234 });
    let mut g = FwCfg::new(mem());
    g.add_file("a", vec![7; 20]).expect("add");
    g.restore(&s).expect("restore");
    assert_eq!(g.state(), s);
    assert_eq!(g.restore(&FwCfgState { selector: Some(0x99), ..s }), Err(FwCfgError::NoSuchItem { key: 0x99 }));
    assert!(matches!(g.restore(&FwCfgState { offset: 21, ..s }), Err(FwCfgError::BadOffset { .. })));
    g.restore(&FwCfgState { selector: None, offset: 0, dma_high: 0 }).expect("nothing selected");
}

#[test]
fn e820_encoding() {
    let e = encode_e820(&[E820Entry { addr: 0x1000, size: 0x2000, kind: 1 }]);
    assert_eq!(e.len(), 20);
    assert_eq!(&e[0..8], &0x1000u64.to_le_bytes());
    assert_eq!(&e[16..20], &1u32.to_le_bytes());
}

#[test]
fn dma_writes_to_guest_memory_mark_the_block_dirty() {
    let (m, block) = mem_block();
    let mut f = FwCfg::new(m.clone());
    f.add_file("opt/blob", vec![0x5a; 3 * 4096]).expect("add");
    let key = f.file("opt/blob").expect("listed").0;
    block.take_dirty();
    // The descriptor is written through the same path as the device's writes; forget it.
    let status = dma(&mut f, &m, (u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 3 * 4096, 0x8_0000);
    assert_eq!(status, 0);
    let dirty = block.take_dirty();
    // Pages 0x80..0x83 hold the file, page 1 the descriptor and its status word.
    assert_eq!(dirty, vec![1, 0x80, 0x81, 0x82], "every page DMA wrote is dirty");
}
