//! The option-ROM cases of item 4 (issue 12) against a registry, as a restore meets them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;
use crate::ram::RamBlockConfig;

const ROM: &str = "0000:00:03.0/virtio-net-pci.rom";

fn desc(idstr: &str, used: u64) -> RamBlockDesc {
    RamBlockDesc {
        idstr: idstr.into(),
        used_length: used,
        unaligned_length: used,
        max_length: used,
        page_size: 4096,
        resizeable: false,
    }
}

/// A destination with `pc.ram` and, if given, a ROM block (`romsize` pins it, resizeable).
fn dest(rom: Option<u64>, romsize: Option<u64>) -> Arc<RamRegistry> {
    let reg = RamRegistry::new();
    let cfg = |idstr: &str, size, max_size, resizeable| RamBlockConfig {
        idstr: idstr.into(),
        size,
        max_size,
        page_size: 0,
        resizeable,
    };
    reg.add(cfg("pc.ram", 1 << 20, 1 << 20, false)).expect("pc.ram");
    match (rom, romsize) {
        (Some(_), Some(r)) => reg.add(cfg(ROM, r, r, true)).map(drop).expect("pinned rom"),
        (Some(n), None) => reg.add(cfg(ROM, n, n, false)).map(drop).expect("rom"),
        (None, _) => {}
    }
    reg
}

fn snapshot(rom: Option<u64>) -> Vec<RamBlockDesc> {
    let mut v = vec![desc("pc.ram", 1 << 20)];
    v.extend(rom.map(|n| desc(ROM, n)));
    v
}

fn refused(snap: &[RamBlockDesc], reg: &RamRegistry) -> String {
    let before: Vec<_> = reg.blocks().iter().map(|b| (b.idstr().to_string(), b.used_length())).collect();
    let e = check_ram(snap, reg).expect_err("refused").to_string();
    let after: Vec<_> = reg.blocks().iter().map(|b| (b.idstr().to_string(), b.used_length())).collect();
    assert_eq!(before, after, "a refused check changes nothing");
    e
}

#[test]
fn a_smaller_snapshot_rom_than_the_destinations_is_refused_with_both_fixes() {
    let e = refused(&snapshot(Some(0x1000)), &dest(Some(0x20000), None));
    assert!(e.contains(&format!("Size mismatch: {ROM}: 0x1000 != 0x20000")), "{e}");
    assert!(e.contains("romsize=0x20000") && e.contains("romfile= the ROM the snapshot"), "{e}");
    assert!(e.contains("0000:00:03.0"), "{e}");
}

#[test]
fn a_larger_snapshot_rom_names_its_size_as_the_romsize() {
    let e = refused(&snapshot(Some(0x40000)), &dest(Some(0x20000), None));
    assert!(e.contains(&format!("Size mismatch: {ROM}: 0x40000 != 0x20000")), "{e}");
    assert!(e.contains("romsize=0x40000"), "{e}");
    let e = refused(&snapshot(Some(0x40000)), &dest(Some(0x20000), Some(0x20000)));
    assert!(e.contains(&format!("Size too large: {ROM}: 0x40000 > 0x20000")), "{e}");
    assert!(e.contains("romsize=0x40000") && e.contains("romsize=0x20000"), "{e}");
}

#[test]
fn a_snapshot_rom_without_a_destination_rom_is_refused_with_the_fix() {
    let e = refused(&snapshot(Some(0x1000)), &dest(None, None));
    assert!(e.contains(&format!("Unknown ramblock \"{ROM}\" (snapshot has 0x1000 bytes)")), "{e}");
    assert!(e.contains("romfile=none") && e.contains("romfile= the ROM") && e.contains("romsize=0x1000"), "{e}");
}

#[test]
fn a_destination_rom_the_snapshot_lacks_is_kept() {
    let reg = dest(Some(0x20000), None);
    let plan = check_ram(&snapshot(None), &reg).expect("accepted, as QEMU does");
    assert!(plan.0.is_empty(), "{plan:?}");
    assert_eq!(reg.get(ROM).map(|b| b.used_length()), Some(0x20000));
    // Other blocks the snapshot lacks are still refused.
    let reg = dest(None, None);
    reg.add(RamBlockConfig {
        idstr: "/rom@opt/x.rom".into(),
        size: 0x1000,
        max_size: 0x1000,
        page_size: 0,
        resizeable: false,
    })
    .expect("fw_cfg file block");
    let e = check_ram(&snapshot(None), &reg).expect_err("a fw_cfg file is not an option ROM").to_string();
    assert!(e.contains("\"/rom@opt/x.rom\" (0x1000 bytes) is not in the snapshot"), "{e}");
}

#[test]
fn a_pinned_romsize_takes_a_smaller_snapshot_rom_and_calls_the_hook() {
    let reg = dest(Some(0x20000), Some(0x40000));
    let hooked = Arc::new(AtomicU64::new(0));
    let h = hooked.clone();
    reg.get(ROM).expect("rom").set_resized_hook(Box::new(move |_, len| h.store(len, Ordering::SeqCst)));
    let plan = check_ram(&snapshot(Some(0x1000)), &reg).expect("fits under romsize");
    assert_eq!(plan.0, vec![(ROM.to_string(), 0x1000)]);
    apply_resizes(&plan, &reg).expect("resize");
    let b = reg.get(ROM).expect("rom");
    assert_eq!((b.used_length(), b.max_length()), (0x1000, 0x40000));
    assert_eq!(hooked.load(Ordering::SeqCst), 0x1000, "the resized hook ran");
    // The same size as romsize: nothing to resize.
    let reg = dest(Some(0x20000), Some(0x40000));
    assert!(check_ram(&snapshot(Some(0x40000)), &reg).expect("equal").0.is_empty());
}
