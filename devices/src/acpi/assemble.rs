//! Lays the tables out in `etc/acpi/tables` and writes the loader script that links them,
//! in QEMU's order.
//!
//! Blob layout (each table starts on a 64-byte boundary; FACS requires it):
//! FACS, DSDT, FADT, MADT, [SSDT "VGEN"], operator tables, XSDT; then zero padding to a
//! multiple of [`TABLES_STEP`]. The RSDP is its own 36-byte blob.
//!
//! Script:
//! 1. ALLOCATE `etc/acpi/tables` (align 64, high); [ALLOCATE `etc/vmgenid_guid` (align 4096,
//!    high)];
//! 2. ADD_POINTER FADT.FIRMWARE_CTRL (4) and FADT.DSDT (4) and FADT.X_DSDT (8); XSDT entries
//!    (8 each); [SSDT VGIA (4) <- `etc/vmgenid_guid`]; [WRITE_POINTER `etc/vmgenid_addr` (8)
//!    <- `etc/vmgenid_guid` + 40];
//! 3. ADD_CHECKSUM of every table but the FACS (which has none);
//! 4. ALLOCATE `etc/acpi/rsdp` (align 16, FSEG); ADD_POINTER RSDP.XSDT (8); ADD_CHECKSUM of
//!    the first 20 bytes, then of all 36.

use super::aml::{dsdt, vmgenid_ssdt, VGIA_OFFSET};
use super::loader::{LoaderBuilder, Zone};
use super::tables::{
    check_extra, facs, fadt, madt, rsdp, xsdt, CHECKSUM_OFFSET, FADT_DSDT, FADT_FIRMWARE_CTRL, FADT_X_DSDT,
    RSDP_CHECKSUM, RSDP_EXT_CHECKSUM, RSDP_LEN, RSDP_V1_LEN, RSDP_XSDT_ADDR, XSDT_ENTRIES,
};
use super::{
    AcpiBlobs, AcpiConfig, AcpiError, LOADER_MAX, LOADER_STEP, RSDP_FILE, TABLES_FILE, TABLES_MAX, TABLES_STEP,
    VMGENID_ADDR_FILE, VMGENID_GUID_FILE, VMGENID_GUID_OFFSET,
};

/// Alignment of every table in the blob.
pub const TABLE_ALIGN: usize = 64;
/// Alignment firmware gives each allocation.
const TABLES_ALLOC_ALIGN: u32 = 64;
const VMGENID_ALLOC_ALIGN: u32 = 4096;
const RSDP_ALLOC_ALIGN: u32 = 16;

struct Blob {
    bytes: Vec<u8>,
    /// (offset, length) of every table that gets a checksum.
    checksummed: Vec<(u32, u32)>,
}

impl Blob {
    fn push(&mut self, table: &[u8], checksum: bool) -> Result<u32, AcpiError> {
        let start = self.bytes.len().div_ceil(TABLE_ALIGN) * TABLE_ALIGN;
        let end = start + table.len();
        if end as u64 > TABLES_MAX {
            return Err(AcpiError::TooLarge { len: end as u64, max: TABLES_MAX });
        }
        self.bytes.resize(start, 0);
        self.bytes.extend_from_slice(table);
        if checksum {
            self.checksummed.push((start as u32, table.len() as u32));
        }
        Ok(start as u32)
    }
}

pub fn build(cfg: &AcpiConfig) -> Result<AcpiBlobs, AcpiError> {
    if cfg.vcpus == 0 {
        return Err(AcpiError::BadConfig("0 vCPUs".into()));
    }
    let extras = cfg.extra_tables.iter().enumerate().map(|(i, t)| check_extra(i, t)).collect::<Result<Vec<_>, _>>()?;
    let mut blob = Blob { bytes: Vec::new(), checksummed: Vec::new() };
    let facs_off = blob.push(&facs(), false)?;
    let dsdt_off = blob.push(&dsdt(cfg)?, true)?;
    let fadt_off = blob.push(&fadt(cfg, facs_off, dsdt_off), true)?;
    let mut entries = vec![fadt_off, blob.push(&madt(cfg), true)?];
    let ssdt_off = if cfg.vmgenid {
        let off = blob.push(&vmgenid_ssdt(), true)?;
        entries.push(off);
        Some(off)
    } else {
        None
    };
    for t in &extras {
        entries.push(blob.push(t, true)?);
    }
    let xsdt_off = blob.push(&xsdt(&entries), true)?;

    let mut l = LoaderBuilder::new();
    l.allocate(TABLES_FILE, TABLES_ALLOC_ALIGN, Zone::High);
    if cfg.vmgenid {
        l.allocate(VMGENID_GUID_FILE, VMGENID_ALLOC_ALIGN, Zone::High);
    }
    l.add_pointer(TABLES_FILE, fadt_off + FADT_FIRMWARE_CTRL, 4, TABLES_FILE);
    l.add_pointer(TABLES_FILE, fadt_off + FADT_DSDT, 4, TABLES_FILE);
    l.add_pointer(TABLES_FILE, fadt_off + FADT_X_DSDT, 8, TABLES_FILE);
    for i in 0..entries.len() as u32 {
        l.add_pointer(TABLES_FILE, xsdt_off + XSDT_ENTRIES + 8 * i, 8, TABLES_FILE);
    }
    if let Some(off) = ssdt_off {
        l.add_pointer(TABLES_FILE, off + VGIA_OFFSET, 4, VMGENID_GUID_FILE);
        l.write_pointer(VMGENID_ADDR_FILE, 0, 8, VMGENID_GUID_FILE, VMGENID_GUID_OFFSET as u32);
    }
    for &(off, len) in &blob.checksummed {
        l.add_checksum(TABLES_FILE, off + CHECKSUM_OFFSET, off, len);
    }
    l.allocate(RSDP_FILE, RSDP_ALLOC_ALIGN, Zone::FSeg);
    l.add_pointer(RSDP_FILE, RSDP_XSDT_ADDR, 8, TABLES_FILE);
    l.add_checksum(RSDP_FILE, RSDP_CHECKSUM, 0, RSDP_V1_LEN);
    l.add_checksum(RSDP_FILE, RSDP_EXT_CHECKSUM, 0, RSDP_LEN as u32);
    let loader = l.encode(LOADER_STEP, LOADER_MAX)?;

    let mut tables = blob.bytes;
    let padded = (tables.len() as u64).div_ceil(TABLES_STEP) * TABLES_STEP;
    tables.resize(padded as usize, 0);
    Ok(AcpiBlobs { tables, rsdp: rsdp(xsdt_off), loader })
}
