use super::*;

const UUID: [u8; 16] = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x4d, 0xef, 0x80, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07];

fn cfg(vcpus: u8, below: u64, above: u64) -> SmbiosConfig {
    SmbiosConfig {
        uuid: UUID,
        vcpus,
        ram_below_4g: below,
        ram_above_4g: above,
        bios_vendor: "SeaBIOS".into(),
        bios_version: "bios.bin".into(),
        bios_date: "04/01/2014".into(),
        bios_size: 128 << 10,
        product: "snapvisor VM".into(),
        product_version: "1".into(),
    }
}

fn built(vcpus: u8, below: u64, above: u64) -> (SmbiosBlobs, Vec<Parsed>) {
    let b = build(&cfg(vcpus, below, above)).expect("build");
    let p = parse(&b.tables).expect("every structure parses");
    (b, p)
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("test"))
}

fn of(p: &[Parsed], kind: u8) -> Vec<&Parsed> {
    p.iter().filter(|s| s.kind == kind).collect()
}

#[test]
fn anchor_is_a_valid_2_8_entry_point() {
    let (b, p) = built(2, 64 << 20, 0);
    let a = &b.anchor;
    // SeaBIOS takes the files only if the anchor is exactly its 31-byte entry point struct.
    assert_eq!(a.len(), 31);
    assert_eq!(&a[0..4], b"_SM_");
    assert_eq!(a[5], 0x1f);
    assert_eq!((a[6], a[7]), (2, 8));
    assert_eq!(&a[0x10..0x15], b"_DMI_");
    assert_eq!(le32(a, 0x18), 0, "table address is the firmware's to fill");
    assert_eq!(a[0x1e], 0x28);
    // Both checksums.
    assert_eq!(sum(&a[..0x10]), 0, "entry point checksum");
    assert_eq!(sum(&a[0x10..]), 0, "intermediate checksum");
    // Table length and structure count as the anchor says; the largest structure.
    assert_eq!(usize::from(le16(a, 0x16)), b.tables.len());
    assert_eq!(usize::from(le16(a, 0x1c)), p.len());
    let mut sizes = Vec::new();
    let mut buf = Vec::new();
    for s in &p {
        let before = buf.len();
        buf.extend_from_slice(&s.formatted);
        for st in &s.strings {
            buf.extend_from_slice(st.as_bytes());
            buf.push(0);
        }
        buf.push(0);
        if s.strings.is_empty() {
            buf.push(0);
        }
        sizes.push(buf.len() - before);
    }
    assert_eq!(buf, b.tables, "re-encoding the parsed structures gives the table back");
    assert_eq!(usize::from(le16(a, 8)), *sizes.iter().max().expect("test"));
}

#[test]
fn structures_parse_have_unique_handles_and_end_with_type_127() {
    let (_, p) = built(4, 3 << 30, 3 << 30);
    let kinds: Vec<u8> = p.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [0, 1, 3, 4, 4, 4, 4, 16, 17, 19, 19, 32, 127]);
    let mut handles: Vec<u16> = p.iter().map(|s| s.handle).collect();
    handles.sort_unstable();
    handles.dedup();
    assert_eq!(handles.len(), p.len(), "handles are unique");
    // Formatted lengths as SMBIOS 2.8 gives them.
    for (kind, len) in
        [(0, 0x18), (1, 0x1b), (3, 0x16), (4, 0x2a), (16, 0x17), (17, 0x28), (19, 0x1f), (32, 0x0b), (127, 4)]
    {
        for s in of(&p, kind) {
            assert_eq!(s.formatted.len(), len, "type {kind}");
        }
    }
    // Type 32 and 127 have no strings: double NUL, which parse accepted.
    assert!(of(&p, 127)[0].strings.is_empty());
}

#[test]
fn bios_information_as_qemu_sets_it() {
    let (_, p) = built(1, 64 << 20, 0);
    let t0 = of(&p, 0)[0];
    assert_eq!(t0.string_at(4), Some("SeaBIOS"));
    assert_eq!(t0.string_at(5), Some("bios.bin"));
    assert_eq!(t0.string_at(8), Some("04/01/2014"));
    assert_eq!(t0.formatted[9], 1, "128 KiB = 64 KiB * (1 + 1)");
    assert_eq!(t0.formatted[0x0a], 0x08, "characteristics not supported");
    assert_eq!(t0.formatted[0x13], 0x04, "targeted content distribution");
}

#[test]
fn one_processor_per_vcpu() {
    for n in [1u8, 2, 255] {
        let (b, p) = built(n, 64 << 20, 0);
        let cpus = of(&p, 4);
        assert_eq!(cpus.len(), usize::from(n), "{n} vCPUs");
        for (i, c) in cpus.iter().enumerate() {
            assert_eq!(c.string_at(4), Some(format!("CPU {i}").as_str()));
            assert_eq!(c.formatted[0x18], 0x41, "populated and enabled");
        }
        assert_eq!(p.last().map(|s| s.kind), Some(127));
        assert_eq!(usize::from(le16(&b.anchor, 0x1c)), p.len());
    }
    assert_eq!(build(&cfg(0, 64 << 20, 0)), Err(SmbiosError::NoCpus));
}

#[test]
fn memory_64_mib() {
    let (_, p) = built(1, 64 << 20, 0);
    let arr = of(&p, 16)[0];
    assert_eq!(le32(&arr.formatted, 7), 64 << 10, "max capacity in KiB");
    assert_eq!(le16(&arr.formatted, 0x0d), 1);
    let dimms = of(&p, 17);
    assert_eq!(dimms.len(), 1);
    assert_eq!(le16(&dimms[0].formatted, 4), arr.handle);
    assert_eq!(le16(&dimms[0].formatted, 0x0c), 64, "MiB");
    let maps = of(&p, 19);
    assert_eq!(maps.len(), 1, "no RAM above 4 GiB");
    assert_eq!(le32(&maps[0].formatted, 4), 0);
    assert_eq!(le32(&maps[0].formatted, 8), (64 << 10) - 1, "inclusive end, KiB");
}

#[test]
fn memory_6_gib_below_and_above_4_gib() {
    let (_, p) = built(2, 3 << 30, 3 << 30);
    let arr = of(&p, 16)[0];
    assert_eq!(le32(&arr.formatted, 7), 6 << 20, "6 GiB in KiB");
    let dimms = of(&p, 17);
    assert_eq!(dimms.len(), 1);
    assert_eq!(le16(&dimms[0].formatted, 0x0c), 6 << 10, "6144 MiB");
    let maps = of(&p, 19);
    assert_eq!(maps.len(), 2);
    assert_eq!((le32(&maps[0].formatted, 4), le32(&maps[0].formatted, 8)), (0, (3 << 20) - 1));
    assert_eq!((le32(&maps[1].formatted, 4), le32(&maps[1].formatted, 8)), (4 << 20, (7 << 20) - 1));
    for m in maps {
        assert_eq!(le16(&m.formatted, 0x0c), arr.handle);
    }
}

#[test]
fn large_memory_is_split_into_16_gib_devices_with_extended_fields() {
    // 40 GiB: 2 GiB below 4 GiB, 38 above.
    let (_, p) = built(1, 2 << 30, 38 << 30);
    let dimms = of(&p, 17);
    let sizes: Vec<u16> = dimms.iter().map(|d| le16(&d.formatted, 0x0c)).collect();
    assert_eq!(sizes, [16 << 10, 16 << 10, 8 << 10]);
    assert_eq!(le16(&of(&p, 16)[0].formatted, 0x0d), 3);
}

#[test]
fn uuid_in_type_1_first_three_fields_little_endian() {
    let (_, p) = built(1, 64 << 20, 0);
    let t1 = of(&p, 1)[0];
    assert_eq!(t1.string_at(4), Some(MANUFACTURER));
    assert_eq!(
        &t1.formatted[8..24],
        &[0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xef, 0x4d, 0x80, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07]
    );
}

#[test]
fn same_config_same_bytes() {
    assert_eq!(build(&cfg(3, 64 << 20, 0)), build(&cfg(3, 64 << 20, 0)));
}

#[test]
fn parse_rejects_broken_tables() {
    let (b, _) = built(1, 64 << 20, 0);
    // Cut inside the last structure's string set, or inside a header.
    assert!(parse(&b.tables[..b.tables.len() - 1]).is_err());
    assert!(parse(&b.tables[..2]).is_err());
    let mut bad = b.tables.clone();
    bad[1] = 2; // shorter than a header
    assert!(parse(&bad).is_err());
}

#[test]
fn fw_cfg_serves_both_files_at_their_sizes() {
    let (b, _) = built(2, 64 << 20, 0);
    let mut fw = crate::fw_cfg::FwCfg::without_dma();
    add_files(&mut fw, &b).expect("test");
    let (_, alen) = fw.file(ANCHOR_FILE).expect("test");
    let (key, tlen) = fw.file(TABLES_FILE).expect("test");
    assert_eq!(alen, 31);
    assert_eq!(tlen, u64::from(le16(&b.anchor, 0x16)));
    // Read the tables back through the data port.
    use crate::bus::BusDevice;
    fw.select(key);
    let mut got = vec![0u8; tlen as usize];
    for byte in got.iter_mut() {
        let mut one = [0u8];
        fw.read(0, crate::fw_cfg::PORT_DATA, &mut one);
        *byte = one[0];
    }
    assert_eq!(got, b.tables);
}
