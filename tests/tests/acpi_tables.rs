//! `snapvisor acpi dump` checked by a tool nobody here wrote: ACPICA's `iasl -d` (package
//! acpica-tools) disassembles every table the dump writes without an error or warning, and
//! the disassemblies describe the machine (PCI root, COM1, fw_cfg, VMGenID, one local APIC
//! per vCPU). The RSDP, which this iasl cannot read from a file, is checked by hand.

mod common;

use std::path::Path;

use common::iasl::{iasl, problems};
use common::snapvisor;
use serde_json::Value;

/// Runs `acpi dump` into `dir` and returns its JSON listing.
fn dump(dir: &Path, extra: &[&str]) -> Vec<Value> {
    let out = dir.to_str().expect("utf-8 path");
    let mut args = vec!["acpi", "dump", "--mem-mib", "128", "--out", out, "--json"];
    args.extend_from_slice(extra);
    let o = snapvisor(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "acpi dump {args:?} failed: {err}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON listing");
    v.as_array().expect("array").clone()
}

/// Disassembles every table in `dir` and returns the disassemblies by name.
fn disassemble_all(dir: &Path, listing: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in listing {
        let name = t["name"].as_str().expect("name").to_string();
        let bytes = std::fs::read(dir.join(format!("{name}.dat"))).expect("table file");
        assert_eq!(Some(bytes.len() as u64), t["length"].as_u64(), "{name}: length listed");
        if name == "RSDP" {
            assert_eq!(&bytes[..8], b"RSD PTR ");
            assert_eq!(bytes[..20].iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0, "RSDP checksum");
            assert_eq!(bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0, "RSDP extended checksum");
            continue;
        }
        let (ok, text, dsl) = iasl(dir, &name);
        assert!(ok, "iasl -d {name}.dat failed:\n{text}");
        assert!(problems(&text).is_empty(), "iasl -d {name}.dat reported {:?}", problems(&text));
        assert!(!dsl.is_empty(), "no {name}.dsl");
        out.push((name, dsl));
    }
    out
}

fn dsl<'a>(all: &'a [(String, String)], name: &str) -> &'a str {
    &all.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
}

fn local_apics(madt: &str) -> usize {
    madt.lines().filter(|l| l.contains("Subtable Type") && l.contains("[Processor Local APIC]")).count()
}

#[test]
fn one_vcpu_tables_disassemble_cleanly_and_describe_the_machine() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("acpi");
    let listing = dump(&dir, &["--vcpus", "1"]);
    let names: Vec<&str> = listing.iter().map(|t| t["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["RSDP", "XSDT", "FACP", "FACS", "DSDT", "APIC", "SSDT"]);
    let all = disassemble_all(&dir, &listing);

    let dsdt = dsl(&all, "DSDT");
    for needle in ["Device (PCI0)", "PNP0A03", "Device (COM1)", "PNP0501", "Device (FWCF)", "\"QEMU0002\"", "ACPI0007"]
    {
        assert!(dsdt.contains(needle), "DSDT lacks {needle}:\n{dsdt}");
    }
    let ssdt = dsl(&all, "SSDT");
    for needle in ["Device (VGEN)", "\"QEMUVGID\"", "VGIA", "Method (ADDR", "_E05"] {
        assert!(ssdt.contains(needle), "SSDT lacks {needle}:\n{ssdt}");
    }
    assert_eq!(local_apics(dsl(&all, "APIC")), 1);
    let fadt = dsl(&all, "FACP");
    assert!(fadt.contains("SCI Interrupt : 0009"), "{fadt}");
}

#[test]
fn four_vcpus_give_four_local_apics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let listing = dump(tmp.path(), &["--vcpus", "4"]);
    let all = disassemble_all(tmp.path(), &listing);
    assert_eq!(local_apics(dsl(&all, "APIC")), 4, "{}", dsl(&all, "APIC"));
    let dsdt = dsl(&all, "DSDT");
    assert_eq!(dsdt.matches("\"ACPI0007\"").count(), 4, "{dsdt}");
}

#[test]
fn an_operator_table_is_listed_and_disassembles() {
    let tmp = tempfile::tempdir().expect("tmp");
    // A table of our own (an SSDT with one Name), checksum left wrong on purpose: dump fixes it.
    let mut t = b"SSDT\0\0\0\0\x02\0OPERTROPTABLE1\x01\0\0\0TEST\x01\0\0\0".to_vec();
    t.extend_from_slice(&[0x08, b'X', b'X', b'X', b'X', 0x0a, 0x2a]);
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    let file = tmp.path().join("op.aml");
    std::fs::write(&file, &t).expect("table");
    let out = tmp.path().join("out");
    let listing = dump(&out, &["--vcpus", "2", "--acpi-table", file.to_str().expect("utf-8")]);
    let names: Vec<&str> = listing.iter().map(|t| t["name"].as_str().expect("name")).collect();
    assert_eq!(names.last(), Some(&"SSDT1"), "{names:?}");
    let all = disassemble_all(&out, &listing);
    assert!(dsl(&all, "SSDT1").contains("Name (XXXX, 0x2A)"), "{}", dsl(&all, "SSDT1"));
}

#[test]
fn a_bad_operator_table_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("facp.dat");
    let mut t = vec![0u8; 36];
    t[..4].copy_from_slice(b"FACP");
    t[4] = 36;
    std::fs::write(&file, &t).expect("table");
    let out = tmp.path().join("out");
    let o = snapvisor(&[
        "acpi",
        "dump",
        "--out",
        out.to_str().expect("utf-8"),
        "--acpi-table",
        file.to_str().expect("utf-8"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("extra ACPI table 0") && err.contains("FACP"), "{err}");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn the_iasl_check_catches_a_bad_checksum() {
    // The clean-disassembly check above is only worth something if iasl's complaints reach it.
    let tmp = tempfile::tempdir().expect("tmp");
    dump(tmp.path(), &["--vcpus", "1"]);
    let path = tmp.path().join("APIC.dat");
    let mut b = std::fs::read(&path).expect("APIC");
    b[9] = b[9].wrapping_add(1);
    std::fs::write(&path, b).expect("write");
    let (_, text, _) = iasl(tmp.path(), "APIC");
    assert!(!problems(&text).is_empty(), "iasl said nothing about a bad checksum:\n{text}");
}
