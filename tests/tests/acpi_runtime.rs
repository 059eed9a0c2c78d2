//! ACPI at run time with real SeaBIOS: the blobs' RAM blocks across snapshots (QEMU's
//! `/rom@etc/acpi/tables` resize scenario, both directions, and the limit), and VMGenID
//! (the address SeaBIOS reports, the GUID in guest memory, new generations).
//!
//! The VMs run in this process (the library), so the tests can read fw_cfg and guest memory
//! directly; the CLI is checked where it reports (`store inspect`, `restore`).

mod common;

use std::path::Path;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use devices::acpi::vmgenid::Guid;
use devices::acpi::{TABLES_FILE, VMGENID_ADDR_FILE, VMGENID_GUID_FILE};
use devices::bus::BusDevice;
use hypervisor::acpi::AcpiTable;
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, RestoreReport, SaveOptions};
use hypervisor::vm::{SharedOutput, Vm};
use migrate::ram::RamBlockConfig;
use migrate::snapshot::format::serde_bytes_compat::Bytes;

use common::daemon::Daemon;
use common::seabios_vm::{firmware_vm, guest_read, run_loader};
use common::snapvisor;

const TABLES_BLOCK: &str = "/rom@etc/acpi/tables";

/// A valid extra table (`OEMT`) of `len` bytes; the builder fixes its checksum.
fn table(len: usize) -> AcpiTable {
    let mut t = vec![0u8; len];
    t[0..4].copy_from_slice(b"OEMT");
    t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    t[8] = 1;
    t[10..16].copy_from_slice(b"SNAPVI");
    AcpiTable { name: format!("oemt-{len}"), data: Bytes(t) }
}

/// Large enough that `etc/acpi/tables` takes two 0x20000 steps.
fn big_table() -> AcpiTable {
    table(0x2_0000)
}

/// The size fw_cfg's directory gives for `name`.
fn dir_size(vm: &Vm, name: &str) -> u64 {
    let fw = vm.devices().fw_cfg.lock().unwrap_or_else(PoisonError::into_inner);
    let d = fw.directory();
    let count = u32::from_be_bytes(d[0..4].try_into().expect("count")) as usize;
    (0..count)
        .map(|i| &d[4 + 64 * i..4 + 64 * (i + 1)])
        .find(|e| {
            let n = &e[8..];
            &n[..n.iter().position(|&c| c == 0).unwrap_or(n.len())] == name.as_bytes()
        })
        .map(|e| u64::from(u32::from_be_bytes(e[0..4].try_into().expect("size"))))
        .unwrap_or_else(|| panic!("{name} is not in fw_cfg's directory"))
}

/// Reads fw_cfg file `name` through the data port, as a guest would (the VM is paused).
fn fw_cfg_read(vm: &Vm, name: &str, len: usize) -> Vec<u8> {
    let mut fw = vm.devices().fw_cfg.lock().unwrap_or_else(PoisonError::into_inner);
    let (key, _) = fw.file(name).unwrap_or_else(|| panic!("no fw_cfg file {name}"));
    fw.select(key);
    (0..len)
        .map(|_| {
            let mut b = [0u8];
            fw.read(devices::fw_cfg::PORT_BASE, devices::fw_cfg::PORT_DATA, &mut b);
            b[0]
        })
        .collect()
}

fn block_bytes(vm: &Vm, idstr: &str) -> Vec<u8> {
    let b = vm.registry().get(idstr).unwrap_or_else(|| panic!("no block {idstr}"));
    let mut v = vec![0u8; b.unaligned_length() as usize];
    b.read(0, &mut v).expect("read block");
    v
}

fn save(vm: &Vm, store: &storage::Store, name: &str) {
    snapshot::save(vm, store, name, &SaveOptions::default(), &|_| {}).expect("snapshot");
}

fn restore(
    store: &storage::Store,
    name: &str,
    mode: RestoreMode,
    f: impl FnOnce(&mut RestoreOptions),
) -> (Vm, RestoreReport) {
    let mut opts = RestoreOptions::new(mode, Box::new(SharedOutput::default()));
    f(&mut opts);
    snapshot::restore(store, name, opts).expect("restore")
}

/// The guest selects `etc/acpi/tables` again, as SeaBIOS does at its next run.
fn guest_selects_tables(vm: &Vm) {
    let mut fw = vm.devices().fw_cfg.lock().unwrap_or_else(PoisonError::into_inner);
    let (key, _) = fw.file(TABLES_FILE).expect("tables file");
    fw.select(key);
}

#[test]
fn grown_tables_keep_their_size_and_bytes_in_a_vm_whose_tables_are_smaller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let mut vm = firmware_vm(vec![big_table()]);
    assert_eq!(dir_size(&vm, TABLES_FILE), 0x4_0000, "the extra table makes the tables two steps");
    run_loader(&mut vm);
    let bytes = block_bytes(&vm, TABLES_BLOCK);
    assert_eq!(bytes.len(), 0x4_0000);
    save(&vm, &store, "big");
    drop(vm);

    assert_eq!(dir_size(&firmware_vm(Vec::new()), TABLES_FILE), 0x2_0000, "fresh tables without it: one step");
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let (vm2, report) = restore(&store, "big", mode, |o| o.acpi_tables = Some(Vec::new()));
        assert!(
            report.resized.contains(&(TABLES_BLOCK.to_string(), 0x4_0000)),
            "{mode:?}: the report lists the resize: {:?}",
            report.resized
        );
        assert_eq!(dir_size(&vm2, TABLES_FILE), 0x4_0000, "{mode:?}: fw_cfg reports the snapshot's size");
        assert!(block_bytes(&vm2, TABLES_BLOCK) == bytes, "{mode:?}: the block holds the snapshot's bytes");
        guest_selects_tables(&vm2);
        assert_eq!(dir_size(&vm2, TABLES_FILE), 0x4_0000, "{mode:?}: patched: a select does not rebuild");
        assert!(fw_cfg_read(&vm2, TABLES_FILE, 0x4_0000) == bytes, "{mode:?}: the guest reads the snapshot's tables");
    }

    // The CLI (the store is this process's until dropped): `store inspect` lists the three
    // blocks, `restore` reports the resize.
    drop(store);
    let out = snapvisor(&["store", "inspect", "--store", dir.path().to_str().expect("utf-8"), "big", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let size = |idstr: &str| {
        doc["blocks"].as_array().expect("blocks").iter().find(|b| b["idstr"] == idstr).map(|b| b["used_length"].clone())
    };
    assert_eq!(size(TABLES_BLOCK), Some(0x4_0000.into()));
    assert_eq!(size("/rom@etc/table-loader"), Some(0x1000.into()));
    assert_eq!(size("/rom@etc/acpi/rsdp"), Some(0x1000.into()), "the 36-byte RSDP in one page");
    let small = dir.path().join("small.dat");
    std::fs::write(&small, &table(64).data.0).expect("write table");
    let out = snapvisor(&[
        "restore",
        "--store",
        dir.path().to_str().expect("utf-8"),
        "big",
        "--acpi-table",
        small.to_str().expect("utf-8"),
        "--timeout",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resized RAM block /rom@etc/acpi/tables to the snapshot's 0x40000 bytes"), "{err}");
}

#[test]
fn smaller_tables_shrink_the_block_of_a_vm_whose_tables_are_larger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let mut vm = firmware_vm(Vec::new());
    run_loader(&mut vm);
    let bytes = block_bytes(&vm, TABLES_BLOCK);
    assert_eq!(bytes.len(), 0x2_0000);
    save(&vm, &store, "small");
    drop(vm);

    let (vm2, report) = restore(&store, "small", RestoreMode::Eager, |o| o.acpi_tables = Some(vec![big_table()]));
    assert!(report.resized.contains(&(TABLES_BLOCK.to_string(), 0x2_0000)), "{:?}", report.resized);
    assert_eq!(dir_size(&vm2, TABLES_FILE), 0x2_0000);
    assert_eq!(vm2.registry().get(TABLES_BLOCK).expect("block").used_length(), 0x2_0000);
    guest_selects_tables(&vm2);
    assert!(fw_cfg_read(&vm2, TABLES_FILE, 0x2_0000) == bytes, "the guest reads the snapshot's tables");
}

#[test]
fn tables_restored_before_the_firmware_read_them_are_rebuilt_by_the_destination() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    // Snapshotted before its first instruction: nothing selected, not patched.
    save(&firmware_vm(Vec::new()), &store, "fresh");
    let (mut vm2, _) = restore(&store, "fresh", RestoreMode::Eager, |o| o.acpi_tables = Some(vec![big_table()]));
    assert_eq!(dir_size(&vm2, TABLES_FILE), 0x2_0000, "the snapshot's size until the guest selects");
    run_loader(&mut vm2);
    assert_eq!(dir_size(&vm2, TABLES_FILE), 0x4_0000, "SeaBIOS's select rebuilt the destination's tables");
    let tables = block_bytes(&vm2, TABLES_BLOCK);
    assert!(tables.windows(4).any(|w| w == b"OEMT"), "the destination's extra table is served");
}

#[test]
fn tables_larger_than_the_destination_allows_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let vm = firmware_vm(Vec::new());
    // A snapshot whose tables block claims 3 MiB (a build with a larger limit would make one).
    vm.registry().remove(TABLES_BLOCK).expect("remove");
    vm.registry()
        .add(RamBlockConfig {
            idstr: TABLES_BLOCK.into(),
            size: 0x30_0000,
            max_size: 0x40_0000,
            page_size: 0,
            resizeable: true,
        })
        .expect("larger block");
    save(&vm, &store, "huge");
    drop(store);
    let out = snapvisor(&["restore", "--store", dir.path().to_str().expect("utf-8"), "huge", "--timeout", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("Size too large: /rom@etc/acpi/tables: 0x300000 > 0x200000"), "{err}");
    assert!(err.contains("restore it with that build"), "{err}");
}

#[test]
fn vmgenid_guid_is_where_seabios_reported_and_a_new_generation_changes_only_the_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path()).expect("store");
    let mut vm = firmware_vm(Vec::new());
    run_loader(&mut vm);
    let dev = vm.devices().vmgenid.clone().expect("vmgenid");
    let (guid, addr) = (dev.guid(), dev.addr());
    assert_eq!(addr % 0x1000, 0x28, "the GUID 40 bytes into the page SeaBIOS allocated: {addr:#x}");
    assert_eq!(fw_cfg_read(&vm, VMGENID_ADDR_FILE, 8), addr.to_le_bytes(), "etc/vmgenid_addr holds it");
    assert_eq!(guest_read(&vm, addr, 16), guid.guest_bytes(), "guest memory holds the VM's GUID");
    save(&vm, &store, "g");

    let (same, report) = restore(&store, "g", RestoreMode::Eager, |_| {});
    assert_eq!(report.new_generation, None);
    assert_eq!(guest_read(&same, addr, 16), guid.guest_bytes(), "a plain restore keeps the generation");

    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let (clone, report) = restore(&store, "g", mode, |o| o.new_generation = true);
        let (new, at) = report.new_generation.expect("a new generation");
        let new: Guid = new.parse().expect("guid");
        assert_eq!(at, addr, "written where the firmware put the old one");
        assert_ne!(new, guid);
        assert_eq!(guest_read(&clone, addr, 16), new.guest_bytes(), "{mode:?}: the clone sees its new GUID");
        assert_eq!(clone.devices().vmgenid.as_ref().expect("vmgenid").guid(), new);
        let gpe = clone.devices().platform.pm.lock().unwrap_or_else(PoisonError::into_inner).state().gpe_sts;
        assert_ne!(gpe & (1 << devices::acpi::VMGENID_GPE_BIT), 0, "{mode:?}: GPE bit 5 raised: {gpe:#x}");
        assert_eq!(fw_cfg_read(&clone, VMGENID_GUID_FILE, 56)[40..], new.guest_bytes(), "fw_cfg's copy too");
        assert_eq!(guest_read(&vm, addr, 16), guid.guest_bytes(), "the original keeps its own");
    }
    drop((same, store));

    let out = snapvisor(&[
        "restore",
        "--store",
        dir.path().to_str().expect("utf-8"),
        "g",
        "--new-generation",
        "--timeout",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("(guest address {addr:#x})")), "{err}");
    assert!(err.contains("new VM generation ID") && !err.contains(&guid.to_string()), "{err}");
}

/// Restores `name` from a store (eagerly, not started) and gives its generation and what guest
/// memory holds at the address the firmware reported.
fn generation_in(store: &storage::Store, name: &str) -> (Guid, u64, Vec<u8>) {
    let (vm, _) = restore(store, name, RestoreMode::Eager, |_| {});
    let dev = vm.devices().vmgenid.clone().expect("vmgenid");
    let (guid, addr) = (dev.guid(), dev.addr());
    assert_ne!(addr, 0, "{name}: the firmware reported the GUID's address");
    (guid, addr, guest_read(&vm, addr, 16))
}

#[test]
fn daemon_clones_get_a_new_generation_and_the_original_keeps_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(serde_json::json!({"name": "fw", "firmware": "seabios", "mem_mib": 64, "start": true})));
    // SeaBIOS scans for a VGA ROM after its platform setup, which runs the table-loader.
    let t0 = Instant::now();
    loop {
        let (_, v) = d.call("GET", "/vms/fw/debugcon", None);
        if v.as_str().unwrap_or_default().contains("Scan for VGA option rom") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "SeaBIOS did not get past its platform setup: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    d.ok("POST", "/vms/fw/snapshot", Some(serde_json::json!({"name": "fw-snap"})));
    d.ok("POST", "/snapshots/fw-snap/clone", Some(serde_json::json!({"prefix": "c", "count": 1, "mode": "lazy"})));
    d.ok("POST", "/vms/c0/snapshot", Some(serde_json::json!({"name": "c0-snap"})));
    d.ok("POST", "/vms/fw/snapshot", Some(serde_json::json!({"name": "fw-after"})));
    let (status, _) = d.terminate_within(Duration::from_secs(60));
    assert!(status.is_some(), "the daemon stopped");

    let store = storage::Store::open(d.state.join("store")).expect("the daemon's store");
    let (orig, addr, mem) = generation_in(&store, "fw-snap");
    assert_eq!(addr % 0x1000, 0x28, "{addr:#x}");
    assert_eq!(mem, orig.guest_bytes());
    let (clone, clone_addr, clone_mem) = generation_in(&store, "c0-snap");
    assert_ne!(clone, orig, "the clone has a new generation");
    assert_eq!(clone_addr, addr);
    assert_eq!(clone_mem, clone.guest_bytes(), "written into the clone's memory");
    let (after, _, after_mem) = generation_in(&store, "fw-after");
    assert_eq!((after, after_mem), (orig, orig.guest_bytes().to_vec()), "the original keeps its own");
}

#[test]
fn acpi_table_files_are_untrusted_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let huge = dir.path().join("huge.dat");
    std::fs::write(&huge, vec![0u8; (1 << 20) + 1]).expect("write");
    let dsdt = dir.path().join("dsdt.dat");
    let mut t = table(64).data.0;
    t[0..4].copy_from_slice(b"DSDT");
    std::fs::write(&dsdt, t).expect("write");
    let bad_len = dir.path().join("short.dat");
    std::fs::write(&bad_len, &table(64).data.0[..50]).expect("write");
    for (path, why) in [
        (fifo.as_path(), "a FIFO"),
        (Path::new("/dev/zero"), "a device"),
        (dir.path(), "a directory"),
        (huge.as_path(), "1048577 bytes"),
        (dsdt.as_path(), "signature 'DSDT' is a table snapvisor builds itself"),
        (bad_len.as_path(), "header says 64 bytes but the table has 50"),
    ] {
        let out = snapvisor(&[
            "run",
            "--firmware",
            "seabios",
            "--mem-mib",
            "64",
            "--timeout",
            "1",
            "--acpi-table",
            path.to_str().expect("utf-8"),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{why}: {err}");
        assert!(err.contains(why), "{why}: {err}");
    }
}

#[test]
fn a_guest_reset_rearms_the_tables_and_the_firmware_reports_the_guid_again() {
    let mut vm = firmware_vm(Vec::new());
    run_loader(&mut vm);
    let rt = vm.devices().acpi.clone().expect("ACPI runtime");
    let dev = vm.devices().vmgenid.clone().expect("vmgenid");
    let (guid, addr) = (dev.guid(), dev.addr());
    assert!(rt.state().patched);
    // Paused, the reset is carried out and the VM stays paused.
    vm.control().request_reset("test".into());
    let t0 = Instant::now();
    while vm.control().resets() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the reset was not carried out");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!rt.state().patched, "the tables are rebuilt on the firmware's next select");
    assert_eq!(dev.addr(), 0, "the address is forgotten until the firmware reports it again");
    assert_eq!(dev.guid(), guid, "the generation survives a reset");
    vm.resume();
    let t0 = Instant::now();
    while !(dev.addr() != 0 && rt.state().patched) {
        assert!(t0.elapsed() < Duration::from_secs(90), "SeaBIOS did not run the loader again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(vm.pause());
    assert_eq!(dev.addr() % 0x1000, 0x28);
    assert_eq!(guest_read(&vm, dev.addr(), 16), guid.guest_bytes(), "the same GUID, placed again (was at {addr:#x})");
}
