//! The ACPI tables a guest finds, read out of guest memory after real SeaBIOS ran the
//! table-loader: the RSDP in the F segment, the XSDT and every table it lists, the FADT's DSDT
//! and FACS. Every checksum holds, ACPICA's `iasl -d` disassembles each table without a
//! problem, the DSDT describes the PCI root, COM1 and fw_cfg, the SSDT VMGenID, the MADT one
//! local APIC per vCPU, and the tables without pointers are byte for byte what
//! `snapvisor acpi dump` writes for the same machine.

mod common;

use std::time::{Duration, Instant};

use common::iasl::{iasl, problems};
use common::snapvisor;
use hypervisor::vm::{BootSource, SharedOutput, Vm, VmConfig};

const VCPUS: u64 = 2;
const MEM_MIB: u64 = 128;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
}

fn read(vm: &Vm, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    vm.ram().device_memory().read(gpa, &mut b).unwrap_or_else(|e| panic!("guest memory at {gpa:#x}+{len:#x}: {e}"));
    b
}

fn u32_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// The table at `gpa`, its length from its header; its checksum must hold.
fn table(vm: &Vm, gpa: u64) -> Vec<u8> {
    let head = read(vm, gpa, 36);
    let len = u32_at(&head, 4) as usize;
    assert!((36..1 << 20).contains(&len), "table at {gpa:#x}: length {len}");
    let t = read(vm, gpa, len);
    let sig = String::from_utf8_lossy(&t[..4]).into_owned();
    assert_eq!(sum(&t), 0, "{sig} at {gpa:#x}: checksum");
    t
}

#[test]
fn the_tables_seabios_loaded_are_whole_and_describe_the_machine() {
    let image = hypervisor::cli::run::read_firmware("seabios").expect("SeaBIOS");
    let debugcon = SharedOutput::default();
    let mut cfg = VmConfig::new(MEM_MIB, VCPUS, BootSource::Firmware, Box::new(SharedOutput::default()));
    cfg.firmware = Some(image);
    cfg.debugcon_out = Some(Box::new(debugcon.clone()));
    let mut vm = Vm::new(cfg).expect("firmware VM");
    vm.start().expect("start");
    // The loader runs early in POST; by the e820 dump SeaBIOS has copied everything it keeps.
    let t0 = Instant::now();
    while !debugcon.text().contains("e820 map") {
        assert!(t0.elapsed() < Duration::from_secs(180), "SeaBIOS did not get far:\n{}", debugcon.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(vm.pause(), "pause");

    // The RSDP: 16-byte aligned in 0xe0000..0x100000, where SeaBIOS allocates it (FSEG).
    let seg = read(&vm, 0xe_0000, 0x2_0000);
    let at = (0..seg.len() - 36)
        .step_by(16)
        .find(|&o| &seg[o..o + 8] == b"RSD PTR " && sum(&seg[o..o + 20]) == 0)
        .unwrap_or_else(|| panic!("no RSDP in the F segment; debugcon:\n{}", debugcon.text()));
    let rsdp = &seg[at..at + 36];
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
    let xsdt = table(&vm, u64_at(rsdp, 24));
    assert_eq!(&xsdt[..4], b"XSDT");

    let dir = tempfile::tempdir().expect("tmp");
    let mut found = vec![("XSDT".to_string(), xsdt.clone())];
    for i in 0..(xsdt.len() - 36) / 8 {
        let t = table(&vm, u64_at(&xsdt, 36 + 8 * i));
        let sig = String::from_utf8_lossy(&t[..4]).into_owned();
        if sig == "FACP" {
            let dsdt = table(&vm, u64_at(&t, 140).max(u32_at(&t, 40)));
            assert_eq!(&dsdt[..4], b"DSDT");
            found.push(("DSDT".into(), dsdt));
            let facs_at = u32_at(&t, 36).max(u64_at(&t, 132));
            let facs = read(&vm, facs_at, 64);
            assert_eq!(&facs[..4], b"FACS", "the FADT's FACS at {facs_at:#x}");
        }
        found.push((sig, t));
    }
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    for sig in ["XSDT", "FACP", "DSDT", "APIC", "SSDT"] {
        assert!(names.contains(&sig), "the guest finds no {sig}: {names:?}");
    }

    let mut dsl = Vec::new();
    for (name, bytes) in &found {
        std::fs::write(dir.path().join(format!("{name}.dat")), bytes).expect("write table");
        let (ok, text, d) = iasl(dir.path(), name);
        assert!(ok && problems(&text).is_empty(), "iasl -d {name}: {text}");
        dsl.push((name.clone(), d));
    }
    let text = |n: &str| dsl.iter().find(|(x, _)| x == n).map(|(_, d)| d.clone()).unwrap_or_default();
    for needle in ["PNP0A03", "PNP0501", "QEMU0002"] {
        assert!(text("DSDT").contains(needle), "the DSDT lacks {needle}");
    }
    assert!(text("SSDT").contains("VGEN") && text("SSDT").contains("QEMUVGID"), "the SSDT lacks VMGenID");
    let lapics = text("APIC").lines().filter(|l| l.contains("[Processor Local APIC]")).count();
    assert_eq!(lapics as u64, VCPUS, "one local APIC per vCPU in the MADT");

    // Tables without pointers are what `acpi dump` builds for the same machine.
    let out = dir.path().join("dump");
    let (v, m) = (VCPUS.to_string(), MEM_MIB.to_string());
    let o = snapvisor(&["acpi", "dump", "--vcpus", &v, "--mem-mib", &m, "--out", out.to_str().expect("utf-8")]);
    assert!(o.status.success(), "acpi dump: {}", String::from_utf8_lossy(&o.stderr));
    for name in ["DSDT", "APIC"] {
        let dumped = std::fs::read(out.join(format!("{name}.dat"))).expect("dumped table");
        let guest = &found.iter().find(|(n, _)| n == name).expect("found").1;
        assert_eq!(&dumped, guest, "{name}: the guest's differs from `acpi dump`'s");
    }
    vm.stop("test done");
}
