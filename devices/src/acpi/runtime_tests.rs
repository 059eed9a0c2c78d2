//! Unit tests of the ACPI runtime with fake blobs: no table builder, no KVM.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use migrate::ram::{RamBlock, RamBlockListener, RamRegistry};

use super::*;
use crate::acpi::{AcpiBlobs, LOADER_FILE, RSDP_FILE, TABLES_FILE};

/// A builder whose tables are `tables_len` bytes of the build number; counts its calls.
struct Fake {
    calls: Arc<AtomicUsize>,
    tables_len: Arc<AtomicU64>,
    rsdp_len: Arc<AtomicU64>,
}

fn fake(tables_len: u64) -> (Fake, TableBuilder) {
    let calls = Arc::new(AtomicUsize::new(0));
    let len = Arc::new(AtomicU64::new(tables_len));
    let rsdp_len = Arc::new(AtomicU64::new(36));
    let (c, l, r) = (calls.clone(), len.clone(), rsdp_len.clone());
    let builder: TableBuilder = Box::new(move || {
        let n = c.fetch_add(1, Ordering::SeqCst) as u8 + 1;
        Ok(AcpiBlobs {
            tables: vec![n; l.load(Ordering::SeqCst) as usize],
            rsdp: vec![n; r.load(Ordering::SeqCst) as usize],
            loader: vec![n; 0x1000],
        })
    });
    (Fake { calls, tables_len: len, rsdp_len }, builder)
}

fn setup(tables_len: u64) -> (Arc<RamRegistry>, Arc<AcpiRuntime>, FwCfg, Fake) {
    let registry = RamRegistry::new();
    let (f, builder) = fake(tables_len);
    let rt = AcpiRuntime::new(registry.clone(), builder).expect("runtime");
    let mut fw = FwCfg::without_dma();
    rt.register(&mut fw).expect("register");
    (registry, rt, fw, f)
}

fn select(fw: &mut FwCfg, name: &str) {
    let (key, _) = fw.file(name).expect("file exists");
    fw.select(key);
}

fn first_byte(registry: &RamRegistry, file: &str) -> u8 {
    let mut b = [0u8; 1];
    registry.get(&block_idstr(file)).expect("block").read(0, &mut b).expect("read");
    b[0]
}

/// The size fw_cfg's directory gives for `name`.
fn dir_size(fw: &FwCfg, name: &str) -> u64 {
    let d = fw.directory();
    let count = u32::from_be_bytes(d[0..4].try_into().expect("count")) as usize;
    for i in 0..count {
        let e = &d[4 + 64 * i..4 + 64 * (i + 1)];
        let n = &e[8..];
        let n = &n[..n.iter().position(|&c| c == 0).unwrap_or(n.len())];
        if n == name.as_bytes() {
            return u64::from(u32::from_be_bytes(e[0..4].try_into().expect("size")));
        }
    }
    panic!("{name} not in the directory");
}

#[test]
fn rebuilds_on_first_select_only() {
    let (registry, _rt, mut fw, f) = setup(0x2_0000);
    assert_eq!(f.calls.load(Ordering::SeqCst), 1, "one build at assembly");
    select(&mut fw, TABLES_FILE);
    assert_eq!(f.calls.load(Ordering::SeqCst), 2, "the first select rebuilds");
    assert_eq!(first_byte(&registry, TABLES_FILE), 2);
    select(&mut fw, LOADER_FILE);
    select(&mut fw, RSDP_FILE);
    select(&mut fw, TABLES_FILE);
    assert_eq!(f.calls.load(Ordering::SeqCst), 2, "patched: later selects do not rebuild");
    assert_eq!(first_byte(&registry, RSDP_FILE), 2, "one rebuild refreshes all three");
}

#[test]
fn reset_rearms_the_rebuild() {
    let (_registry, rt, mut fw, f) = setup(0x2_0000);
    select(&mut fw, LOADER_FILE);
    assert!(rt.state().patched);
    rt.reset();
    assert!(!rt.state().patched);
    select(&mut fw, RSDP_FILE);
    assert_eq!(f.calls.load(Ordering::SeqCst), 3);
    assert!(rt.state().patched);
}

#[derive(Default)]
struct Resizes(std::sync::Mutex<Vec<(String, u64, u64)>>);

impl RamBlockListener for Resizes {
    fn block_resized(&self, b: &RamBlock, old: u64, new: u64) {
        self.0.lock().expect("lock").push((b.idstr().to_string(), old, new));
    }
}

#[test]
fn rebuild_resizes_through_the_registry_and_the_directory_follows() {
    let (registry, _rt, mut fw, f) = setup(0x2_0000);
    let seen = Arc::new(Resizes::default());
    registry.add_listener(seen.clone());
    assert_eq!(dir_size(&fw, TABLES_FILE), 0x2_0000);
    f.tables_len.store(0x4_0000, Ordering::SeqCst);
    select(&mut fw, TABLES_FILE);
    assert_eq!(dir_size(&fw, TABLES_FILE), 0x4_0000, "the resized hook updated fw_cfg");
    let block = registry.get("/rom@etc/acpi/tables").expect("block");
    assert_eq!(block.used_length(), 0x4_0000);
    let mut last = [0u8; 1];
    block.read(0x3_ffff, &mut last).expect("read");
    assert_eq!(last[0], 2, "the new bytes are in the grown block");
    assert_eq!(
        *seen.0.lock().expect("lock"),
        vec![("/rom@etc/acpi/tables".to_string(), 0x2_0000, 0x4_0000)],
        "listeners (a live snapshot, the slot map) were told"
    );
}

#[test]
fn rebuild_that_does_not_fit_changes_nothing() {
    let (registry, rt, mut fw, f) = setup(0x2_0000);
    f.tables_len.store(crate::acpi::TABLES_MAX + 1, Ordering::SeqCst);
    let err = rt.rebuild().expect_err("too large");
    assert!(err.to_string().contains("etc/acpi/tables"), "{err}");
    // The last blob too large: the first two must not be rebuilt either (checked up front).
    f.tables_len.store(0x4_0000, Ordering::SeqCst);
    f.rsdp_len.store(0x2000, Ordering::SeqCst);
    let err = rt.rebuild().expect_err("RSDP too large");
    assert!(err.to_string().contains("etc/acpi/rsdp"), "{err}");
    select(&mut fw, TABLES_FILE);
    assert_eq!(dir_size(&fw, TABLES_FILE), 0x2_0000);
    assert_eq!(first_byte(&registry, TABLES_FILE), 1, "no block was touched");
    assert_eq!(first_byte(&registry, LOADER_FILE), 1, "no block was touched");
}

/// What a restore does to the blocks: resize to the snapshot's length, load its bytes.
fn load_snapshot_bytes(registry: &RamRegistry, file: &str, len: u64, byte: u8) {
    let idstr = block_idstr(file);
    registry.resize(&idstr, len).expect("resize");
    registry.get(&idstr).expect("block").write(0, &vec![byte; len as usize]).expect("write");
}

#[test]
fn restore_with_patched_keeps_the_snapshots_bytes() {
    let (registry, rt, mut fw, f) = setup(0x2_0000);
    load_snapshot_bytes(&registry, TABLES_FILE, 0x4_0000, 0xaa);
    rt.restore(&AcpiRuntimeState { patched: true }).expect("restore");
    select(&mut fw, TABLES_FILE);
    assert_eq!(f.calls.load(Ordering::SeqCst), 1, "nothing rebuilt over the snapshot");
    assert_eq!(dir_size(&fw, TABLES_FILE), 0x4_0000);
    assert_eq!(first_byte(&registry, TABLES_FILE), 0xaa);
}

#[test]
fn restore_without_patched_rebuilds_on_the_next_select() {
    let (registry, rt, mut fw, f) = setup(0x2_0000);
    load_snapshot_bytes(&registry, TABLES_FILE, 0x4_0000, 0xaa);
    rt.restore(&AcpiRuntimeState { patched: false }).expect("restore");
    assert_eq!(first_byte(&registry, TABLES_FILE), 0xaa, "nothing rebuilt before the guest selects");
    select(&mut fw, RSDP_FILE);
    assert_eq!(f.calls.load(Ordering::SeqCst), 2);
    assert_eq!(dir_size(&fw, TABLES_FILE), 0x2_0000, "the destination's own tables, resized back");
    assert_eq!(first_byte(&registry, TABLES_FILE), 2);
}

#[test]
fn blocks_have_qemus_names_and_limits() {
    let (registry, _rt, _fw, _f) = setup(0x2_0000);
    let t = registry.get("/rom@etc/acpi/tables").expect("tables");
    let l = registry.get("/rom@etc/table-loader").expect("loader");
    let r = registry.get("/rom@etc/acpi/rsdp").expect("rsdp");
    assert!(t.resizeable() && l.resizeable() && r.resizeable());
    assert_eq!(t.max_length(), crate::acpi::TABLES_MAX);
    assert_eq!(l.max_length(), crate::acpi::LOADER_MAX);
    assert_eq!(r.unaligned_length(), 36);
    assert_eq!(r.max_length(), r.page_size(), "the RSDP's exact size, page-aligned");
}
