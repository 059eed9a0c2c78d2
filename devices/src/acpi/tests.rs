//! Tests of `build()` through the loader executor: the tables as a guest sees them.

use super::guest_view::{load, GuestTable};
use super::loader::{parse, Command, Zone};
use super::loader_exec::Executed;
use super::tables::byte_sum;
use super::*;

/// A machine like the hypervisor's PC with `vcpus` vCPUs and 128 MiB.
pub(super) fn cfg(vcpus: u8) -> AcpiConfig {
    AcpiConfig {
        vcpus,
        ram_below_4g: 128 << 20,
        ram_above_4g: 0,
        pci_mmio32: (0xc000_0000, 0xfec0_0000),
        pci_config_port: 0xcf8,
        pm1a_evt: 0x600,
        pm1a_cnt: 0x604,
        pm_tmr: 0x608,
        gpe0: 0xafe0,
        gpe0_len: 4,
        sci_irq: 9,
        ioapic_addr: 0xfec0_0000,
        lapic_addr: 0xfee0_0000,
        serial: Some((0x3f8, 4)),
        fw_cfg_port: 0x510,
        vmgenid: true,
        extra_tables: Vec::new(),
    }
}

const TOP: u64 = 0x800_0000;

fn seabios_like() -> impl FnMut(&str, u64, u32, Zone) -> Result<u64, String> {
    let mut high = TOP;
    let mut fseg = 0xf_0000u64;
    move |_, len, align, zone| {
        let align = u64::from(align);
        match zone {
            Zone::High => {
                high = (high - len) & !(align - 1);
                Ok(high)
            }
            Zone::FSeg => {
                let a = fseg.div_ceil(align) * align;
                fseg = a + len;
                Ok(a)
            }
        }
    }
}

fn guest(c: &AcpiConfig) -> (AcpiBlobs, Executed, Vec<GuestTable>) {
    let blobs = build(c).expect("build");
    let (exec, tables) = load(&blobs, &mut seabios_like()).expect("load");
    (blobs, exec, tables)
}

fn u32_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[o..o + 4].try_into().expect("4")))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8"))
}

fn find<'a>(tables: &'a [GuestTable], name: &str) -> &'a GuestTable {
    tables.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no {name} in {:?}", names(tables)))
}

fn names(tables: &[GuestTable]) -> Vec<&str> {
    tables.iter().map(|t| t.name.as_str()).collect()
}

#[test]
fn every_table_reachable_with_valid_checksum_and_length() {
    let (_, _, tables) = guest(&cfg(2));
    assert_eq!(names(&tables), ["RSDP", "XSDT", "FACP", "FACS", "DSDT", "APIC", "SSDT"]);
    for t in &tables {
        match t.name.as_str() {
            "RSDP" => {
                assert_eq!(&t.bytes[..8], b"RSD PTR ");
                assert_eq!(t.bytes[15], 2, "revision");
                assert_eq!(byte_sum(&t.bytes[..20]), 0, "RSDP checksum");
                assert_eq!(byte_sum(&t.bytes), 0, "RSDP extended checksum");
                assert_eq!(u32_at(&t.bytes, 16), 0, "no RSDT");
            }
            "FACS" => assert_eq!(u32_at(&t.bytes, 4), 64),
            name => {
                assert_eq!(byte_sum(&t.bytes), 0, "{name} checksum");
                assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len(), "{name} length");
            }
        }
    }
}

#[test]
fn pointer_fields_point_at_the_right_tables() {
    let (_, exec, tables) = guest(&cfg(1));
    let base = exec.file(TABLES_FILE).expect("tables").addr;
    let rsdp = find(&tables, "RSDP");
    assert_eq!(exec.file(RSDP_FILE).expect("rsdp").addr, 0xf_0000);
    let xsdt = find(&tables, "XSDT");
    assert_eq!(u64_at(&rsdp.bytes, 24), xsdt.addr);
    let fadt = find(&tables, "FACP");
    let (facs, dsdt) = (find(&tables, "FACS"), find(&tables, "DSDT"));
    assert_eq!(u32_at(&fadt.bytes, 36), facs.addr);
    assert_eq!(u32_at(&fadt.bytes, 40), dsdt.addr);
    assert_eq!(u64_at(&fadt.bytes, 140), dsdt.addr);
    let entries: Vec<u64> = (36..xsdt.bytes.len()).step_by(8).map(|o| u64_at(&xsdt.bytes, o)).collect();
    let expect: Vec<u64> = ["FACP", "APIC", "SSDT"].iter().map(|n| find(&tables, n).addr).collect();
    assert_eq!(entries, expect);
    for t in &tables[1..] {
        assert!(t.addr >= base && t.addr < TOP, "{} at {:#x}", t.name, t.addr);
        assert_eq!(t.addr % 64, 0, "{} aligned", t.name);
    }
}

fn lapics(madt: &[u8]) -> Vec<(u8, u8, u32)> {
    let mut out = Vec::new();
    let mut o = 44;
    while o + 2 <= madt.len() {
        let (ty, len) = (madt[o], madt[o + 1] as usize);
        assert!(len >= 2, "MADT structure at {o} has length {len}");
        if ty == 0 {
            out.push((madt[o + 2], madt[o + 3], u32_at(madt, o + 4) as u32));
        }
        o += len;
    }
    out
}

#[test]
fn madt_has_one_enabled_lapic_per_vcpu() {
    for n in [1u8, 2, 255] {
        let (_, _, tables) = guest(&cfg(n));
        let madt = find(&tables, "APIC");
        let l = lapics(&madt.bytes);
        assert_eq!(l.len(), n as usize, "vcpus {n}");
        for (i, (uid, id, flags)) in l.into_iter().enumerate() {
            assert_eq!((uid as usize, id as usize, flags), (i, i, 1));
        }
        let dsdt = find(&tables, "DSDT");
        let last = format!("C{:03X}", n - 1);
        assert!(dsdt.bytes.windows(4).any(|w| w == last.as_bytes()), "DSDT lacks {last}");
    }
}

#[test]
fn blob_sizes_are_padded() {
    let (blobs, _, _) = guest(&cfg(255));
    assert_eq!(blobs.tables.len() as u64 % TABLES_STEP, 0);
    assert!(!blobs.tables.is_empty());
    assert_eq!(blobs.loader.len() as u64 % LOADER_STEP, 0);
    assert!(!blobs.loader.is_empty());
    assert_eq!(blobs.rsdp.len(), 36);
}

#[test]
fn vgia_plus_0x28_is_the_guid_and_write_pointer_reports_it() {
    let (_, exec, tables) = guest(&cfg(1));
    let guid = exec.file(VMGENID_GUID_FILE).expect("guid file");
    assert_eq!(guid.addr % 4096, 0);
    let ssdt = find(&tables, "SSDT");
    let vgia = u32_at(&ssdt.bytes, aml::VGIA_OFFSET as usize);
    assert_eq!(vgia + 0x28, guid.addr + VMGENID_GUID_OFFSET);
    assert_eq!(exec.writes.len(), 1);
    let w = &exec.writes[0];
    assert_eq!((w.file.as_str(), w.offset, w.size), (VMGENID_ADDR_FILE, 0, 8));
    assert_eq!(w.value, guid.addr + VMGENID_GUID_OFFSET);
    assert_eq!(w.value % 0x1000, 0x28);
}

#[test]
fn without_vmgenid_no_ssdt_and_no_guid_file() {
    let mut c = cfg(1);
    c.vmgenid = false;
    let (blobs, exec, tables) = guest(&c);
    assert_eq!(names(&tables), ["RSDP", "XSDT", "FACP", "FACS", "DSDT", "APIC"]);
    assert!(exec.file(VMGENID_GUID_FILE).is_none());
    assert!(exec.writes.is_empty());
    let cmds = parse(&blobs.loader).expect("parse");
    assert!(!cmds.iter().any(|(_, c)| matches!(c, Command::WritePointer { .. })));
}

#[test]
fn script_order_and_every_command() {
    let blobs = build(&cfg(1)).expect("build");
    let cmds: Vec<Command> = parse(&blobs.loader).expect("parse").into_iter().map(|(_, c)| c).collect();
    assert_eq!(cmds[0], Command::Allocate { file: TABLES_FILE.into(), align: 64, zone: Zone::High });
    assert_eq!(cmds[1], Command::Allocate { file: VMGENID_GUID_FILE.into(), align: 4096, zone: Zone::High });
    let pos = |f: &dyn Fn(&Command) -> bool| cmds.iter().position(f).expect("command present");
    let first_checksum = pos(&|c| matches!(c, Command::AddChecksum { .. }));
    let last_table_pointer = cmds
        .iter()
        .rposition(|c| matches!(c, Command::AddPointer { dest, .. } if dest == TABLES_FILE))
        .expect("pointers");
    let write = pos(&|c| matches!(c, Command::WritePointer { .. }));
    let rsdp_alloc = pos(&|c| matches!(c, Command::Allocate { file, .. } if file == RSDP_FILE));
    assert!(last_table_pointer < first_checksum && write < first_checksum && first_checksum < rsdp_alloc);
    assert_eq!(cmds[rsdp_alloc], Command::Allocate { file: RSDP_FILE.into(), align: 16, zone: Zone::FSeg });
    assert_eq!(
        &cmds[rsdp_alloc + 1..],
        &[
            Command::AddPointer { dest: RSDP_FILE.into(), src: TABLES_FILE.into(), offset: 24, size: 8 },
            Command::AddChecksum { file: RSDP_FILE.into(), offset: 8, start: 0, length: 20 },
            Command::AddChecksum { file: RSDP_FILE.into(), offset: 32, start: 0, length: 36 },
        ]
    );
}

fn oem(sig: &[u8; 4], len: usize) -> Vec<u8> {
    let mut t = vec![0xa5u8; len];
    t[..4].copy_from_slice(sig);
    t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    t
}

#[test]
fn extra_tables_listed_after_ours_with_checksums() {
    let mut c = cfg(1);
    c.extra_tables = vec![oem(b"SSDT", 50), oem(b"OEMX", 40)];
    let (_, _, tables) = guest(&c);
    assert_eq!(names(&tables), ["RSDP", "XSDT", "FACP", "FACS", "DSDT", "APIC", "SSDT", "SSDT1", "OEMX"]);
    for t in &tables[7..] {
        assert_eq!(byte_sum(&t.bytes), 0);
        assert_eq!(t.bytes[20], 0xa5, "body kept");
    }
}

#[test]
fn extra_tables_rejected_by_index() {
    for (bad, what) in [
        (vec![0u8; 10], "shorter"),
        (oem(b"FACP", 36), "builds itself"),
        (oem(b"DSDT", 36), "builds itself"),
        (oem(b"x\ty ", 36), "printable"),
        (
            {
                let mut t = oem(b"OEMY", 40);
                t.truncate(39);
                t
            },
            "header says",
        ),
    ] {
        let mut c = cfg(1);
        c.extra_tables = vec![oem(b"OEMZ", 36), bad];
        let e = build(&c).expect_err(what);
        assert!(matches!(e, AcpiError::ExtraTable { index: 1, .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }
}

#[test]
fn too_many_tables_is_an_error() {
    let mut c = cfg(1);
    c.extra_tables = vec![oem(b"BIG1", TABLES_MAX as usize)];
    assert!(matches!(build(&c), Err(AcpiError::TooLarge { max: TABLES_MAX, .. })));
}

#[test]
fn build_is_deterministic() {
    for n in [1u8, 4] {
        assert_eq!(build(&cfg(n)).expect("a"), build(&cfg(n)).expect("b"));
    }
    assert_ne!(build(&cfg(1)).expect("1").tables, build(&cfg(2)).expect("2").tables);
}

#[test]
fn zero_vcpus_is_an_error() {
    assert!(matches!(build(&cfg(0)), Err(AcpiError::BadConfig(_))));
}

/// A small deterministic generator for the mutation test (no extra dependency).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn mutated_scripts_and_tables_give_errors_not_panics() {
    let good = build(&cfg(2)).expect("build");
    let used = parse(&good.loader).expect("parse").len() * loader::ENTRY_LEN;
    let mut rng = XorShift(0x5eed_ac91);
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..4000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            let v = rng.next() as u8;
            match rng.below(3) {
                0 => {
                    let i = rng.below(used);
                    b.loader[i] = v;
                }
                1 => {
                    let i = rng.below(b.rsdp.len());
                    b.rsdp[i] = v;
                }
                _ => {
                    let i = rng.below(0x400);
                    b.tables[i] = v;
                }
            }
        }
        let mut high = TOP;
        let mut alloc = |_: &str, len: u64, align: u32, zone: Zone| match zone {
            Zone::FSeg => Ok(0xf_0000),
            Zone::High => {
                high = high.checked_sub(len).ok_or("full")? & !(u64::from(align) - 1);
                Ok(high)
            }
        };
        match load(&b, &mut alloc) {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    // Both outcomes occur: the mutations reach the checks, and some leave a loadable script.
    assert!(ok > 0 && failed > 0, "ok {ok} failed {failed}");
}
