//! The fixed-format ACPI tables of the snapvisor PC: FACS, FADT, MADT, XSDT and RSDP, built
//! with the `acpi_tables` crate where it has the table, plus the checks on operator-supplied
//! tables.
//!
//! Every pointer a table holds (FADT to FACS and DSDT, XSDT to each table, RSDP to XSDT) is
//! written here as the target's *offset* in `etc/acpi/tables`; the loader script's
//! ADD_POINTER adds the blob's guest address to it. Checksums are patched by ADD_CHECKSUM
//! after the pointers, so the checksum bytes built here are only a starting point.
//!
//! Choices, following QEMU's PC where it matters to a guest:
//! - FADT revision 6 (the crate's layout, 276 bytes): PM1a event/control, PM timer and GPE0
//!   in both the 32-bit block fields and the X_ generic addresses (system I/O); `SMI_CMD` 0,
//!   so the OS finds ACPI already enabled (no SMM here); `FIRMWARE_CTRL` and `DSDT` point at
//!   FACS and DSDT, `X_DSDT` at the DSDT as well, and `X_FIRMWARE_CTRL` stays 0 as QEMU leaves
//!   it (the spec forbids both FACS fields being set); the PM timer is 24 bits (no
//!   TMR_VAL_EXT); century at CMOS 0x32; IAPC boot flags: an 8042 is present.
//! - MADT: one enabled Processor Local APIC per vCPU (ACPI processor UID = APIC ID = index),
//!   the IOAPIC (id 0, GSI base 0), overrides IRQ0 -> GSI2 (edge, conforming) and the SCI
//!   (level, active high), and a LAPIC NMI on LINT1 for all processors; PCAT_COMPAT set.

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::{AcpiConfig, AcpiError};

/// OEM ID and table ID written in every table header.
pub const OEM_ID: [u8; 6] = *b"SNAPVR";
pub const OEM_TABLE_ID: [u8; 8] = *b"SNAPVPC ";
pub const OEM_REVISION: u32 = 1;

/// Size of the common table header.
pub const HEADER_LEN: usize = 36;
/// Offset of the checksum byte in a table header.
pub const CHECKSUM_OFFSET: u32 = 9;

/// FADT fields the loader patches.
pub const FADT_FIRMWARE_CTRL: u32 = 36;
pub const FADT_DSDT: u32 = 40;
pub const FADT_X_DSDT: u32 = 140;

/// RSDP fields: its XSDT address, the first (20-byte) checksum and the extended checksum.
pub const RSDP_LEN: usize = 36;
pub const RSDP_XSDT_ADDR: u32 = 24;
pub const RSDP_CHECKSUM: u32 = 8;
pub const RSDP_V1_LEN: u32 = 20;
pub const RSDP_EXT_CHECKSUM: u32 = 32;

/// Offset of the first entry of the XSDT.
pub const XSDT_ENTRIES: u32 = HEADER_LEN as u32;

/// Signatures an operator's table may not have: the tables built here.
pub const RESERVED_SIGNATURES: [&[u8; 4]; 7] = [b"RSD ", b"RSDT", b"XSDT", b"FACP", b"FACS", b"DSDT", b"APIC"];

/// CMOS register holding the century (as QEMU's RTC).
const RTC_CENTURY: u8 = 0x32;
/// IAPC_BOOT_ARCH: an 8042 keyboard controller is present.
const IAPC_8042: u16 = 1 << 1;

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Sets the checksum byte of a table so its bytes sum to zero.
pub fn fix_checksum(table: &mut [u8]) {
    if table.len() < HEADER_LEN {
        return;
    }
    table[CHECKSUM_OFFSET as usize] = 0;
    let sum = table.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    table[CHECKSUM_OFFSET as usize] = 0u8.wrapping_sub(sum);
}

/// The sum of all bytes: 0 for a table whose checksum is right.
pub fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

pub fn facs() -> Vec<u8> {
    aml_bytes(&FACS::new())
}

fn io_gas(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

/// The FADT with FACS and DSDT at `facs_off` and `dsdt_off` in the tables blob.
pub fn fadt(cfg: &AcpiConfig, facs_off: u32, dsdt_off: u32) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::RtcS4)
        .flag(Flags::UsePlatformClock)
        .gpe_info(cfg.gpe0.into(), 0, cfg.gpe0_len, 0, 0);
    f.firmware_ctrl = facs_off.into();
    f.dsdt = dsdt_off.into();
    f.x_dsdt = u64::from(dsdt_off).into();
    f.sci_int = u16::from(cfg.sci_irq).into();
    f.pm1a_evt_blk = u32::from(cfg.pm1a_evt).into();
    f.pm1a_cnt_blk = u32::from(cfg.pm1a_cnt).into();
    f.pm_tmr_blk = u32::from(cfg.pm_tmr).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    // C2/C3 not supported.
    f.p_lvl2_lat = 0xfff.into();
    f.p_lvl3_lat = 0xfff.into();
    f.century = RTC_CENTURY;
    f.iapc_boot_arch = IAPC_8042.into();
    f.x_pm1a_evt_blk = io_gas(cfg.pm1a_evt, 32, AccessSize::WordAccess);
    f.x_pm1a_cnt_blk = io_gas(cfg.pm1a_cnt, 16, AccessSize::WordAccess);
    f.x_pm_tmr_blk = io_gas(cfg.pm_tmr, 32, AccessSize::DwordAccess);
    f.x_gpe0_blk = io_gas(cfg.gpe0, cfg.gpe0_len.saturating_mul(8), AccessSize::ByteAccess);
    aml_bytes(&f.finalize())
}

/// MADT structure types the crate does not have.
const MADT_ISO: u8 = 2;
const MADT_LAPIC_NMI: u8 = 4;
/// MPS INTI flags: active high, level triggered.
const INTI_LEVEL_HIGH: u16 = 0x1 | (0x3 << 2);
/// MADT flags: the machine also has dual 8259s.
const MADT_PCAT_COMPAT: u32 = 1;

fn iso(irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut v = vec![MADT_ISO, 10, 0, irq];
    v.extend_from_slice(&gsi.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

pub fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut m = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(cfg.lapic_addr));
    for i in 0..cfg.vcpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, cfg.ioapic_addr, 0));
    let mut t = aml_bytes(&m);
    // Structures the crate lacks are appended by hand; length, flags and checksum follow.
    t.extend(iso(0, 2, 0));
    t.extend(iso(cfg.sci_irq, cfg.sci_irq.into(), INTI_LEVEL_HIGH));
    // LAPIC NMI: all processors (UID 0xff), flags 0 (conforming), LINT1.
    t.extend([MADT_LAPIC_NMI, 6, 0xff, 0, 0, 1]);
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut t);
    t
}

/// The XSDT listing the tables at `entries` (offsets in the tables blob).
pub fn xsdt(entries: &[u32]) -> Vec<u8> {
    let mut x = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &e in entries {
        x.add_entry(e.into());
    }
    aml_bytes(&x)
}

/// The RSDP (revision 2) with the XSDT at `xsdt_off` in the tables blob.
pub fn rsdp(xsdt_off: u32) -> Vec<u8> {
    aml_bytes(&Rsdp::new(OEM_ID, xsdt_off.into()))
}

/// Checks an operator-supplied table and returns it with its checksum recomputed.
pub fn check_extra(index: usize, table: &[u8]) -> Result<Vec<u8>, AcpiError> {
    let bad = |reason: String| AcpiError::ExtraTable { index, reason };
    if table.len() < HEADER_LEN {
        return Err(bad(format!("{} bytes is shorter than the {HEADER_LEN}-byte table header", table.len())));
    }
    let mut sig = [0u8; 4];
    sig.copy_from_slice(&table[..4]);
    if !sig.iter().all(|b| b.is_ascii_graphic() || *b == b' ') || sig == *b"    " {
        return Err(bad(format!("signature {sig:02x?} is not 4 printable ASCII characters")));
    }
    let shown = String::from_utf8_lossy(&sig).into_owned();
    if RESERVED_SIGNATURES.iter().any(|r| **r == sig) {
        return Err(bad(format!("signature '{shown}' is a table snapvisor builds itself")));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&table[4..8]);
    let len = u32::from_le_bytes(len);
    if len as usize != table.len() {
        return Err(bad(format!("'{shown}' header says {len} bytes but the table has {}", table.len())));
    }
    let mut t = table.to_vec();
    fix_checksum(&mut t);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(sig: &[u8; 4], len: usize) -> Vec<u8> {
        let mut t = vec![0u8; len];
        t[..4].copy_from_slice(sig);
        t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        t[9] = 0x55;
        t
    }

    #[test]
    fn extra_table_accepted_with_checksum_fixed() {
        let t = check_extra(0, &table(b"SSDT", 40)).expect("valid");
        assert_eq!(byte_sum(&t), 0);
    }

    #[test]
    fn extra_table_too_short() {
        let e = check_extra(3, &[0u8; 20]).expect_err("short");
        assert!(matches!(e, AcpiError::ExtraTable { index: 3, .. }), "{e}");
        assert!(e.to_string().contains("20 bytes"), "{e}");
    }

    #[test]
    fn extra_table_length_mismatch() {
        let mut t = table(b"OEM1", 40);
        t.push(0);
        let e = check_extra(1, &t).expect_err("length");
        assert!(e.to_string().contains("header says 40 bytes but the table has 41"), "{e}");
    }

    #[test]
    fn extra_table_bad_signature() {
        let e = check_extra(0, &table(b"AB\x01C", 36)).expect_err("sig");
        assert!(e.to_string().contains("printable"), "{e}");
    }

    #[test]
    fn extra_table_reserved_signatures() {
        for sig in RESERVED_SIGNATURES {
            let e = check_extra(2, &table(sig, 36)).expect_err("reserved");
            assert!(matches!(e, AcpiError::ExtraTable { index: 2, .. }));
            assert!(e.to_string().contains("builds itself"), "{e}");
        }
    }

    #[test]
    fn fadt_fields() {
        let cfg = super::super::tests::cfg(1);
        let f = fadt(&cfg, 0x40, 0x80);
        assert_eq!(&f[..4], b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(byte_sum(&f), 0);
        let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().expect("4"));
        assert_eq!(u32_at(FADT_FIRMWARE_CTRL as usize), 0x40);
        assert_eq!(u32_at(FADT_DSDT as usize), 0x80);
        assert_eq!(u32_at(FADT_X_DSDT as usize), 0x80);
        assert_eq!(u32_at(132), 0, "X_FIRMWARE_CTRL stays 0");
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), 9);
        assert_eq!((u32_at(56), u32_at(64), u32_at(76), u32_at(80)), (0x600, 0x604, 0x608, 0xafe0));
        assert_eq!((f[88], f[89], f[91], f[92]), (4, 2, 4, 4));
    }

    #[test]
    fn madt_structures() {
        let cfg = super::super::tests::cfg(3);
        let m = madt(&cfg);
        assert_eq!(byte_sum(&m), 0);
        assert_eq!(u32::from_le_bytes(m[4..8].try_into().expect("4")) as usize, m.len());
        // 44-byte header, 3 LAPICs, IOAPIC, 2 ISOs, NMI.
        assert_eq!(m.len(), 44 + 3 * 8 + 12 + 2 * 10 + 6);
        assert_eq!(&m[44..52], &[0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&m[60..68], &[0, 8, 2, 2, 1, 0, 0, 0]);
        assert_eq!(&m[80..90], &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(&m[90..100], &[2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]);
    }
}
