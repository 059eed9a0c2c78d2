//! The tables as a guest finds them after the loader ran: start at the RSDP, follow its XSDT
//! address, then every XSDT entry, and the FADT's FACS and DSDT pointers, reading each table
//! through the addresses the loader patched in (not through offsets known to the builder).
//! `snapvisor acpi dump` writes what this returns; the unit tests check pointers and
//! checksums with it.
//!
//! Every address is resolved against the allocated files of an [`Executed`] script; one that
//! lands outside them, or a table whose length field runs past its file, is an error.

use std::collections::BTreeMap;

use thiserror::Error;

use super::loader::LoaderError;
use super::loader_exec::{execute, Allocator, Executed};
use super::tables::{FADT_DSDT, FADT_FIRMWARE_CTRL, HEADER_LEN, RSDP_LEN, RSDP_XSDT_ADDR, XSDT_ENTRIES};
use super::{AcpiBlobs, RSDP_FILE, TABLES_FILE, VMGENID_ADDR_FILE, VMGENID_GUID_FILE, VMGENID_GUID_FILE_LEN};

/// Errors following the guest's pointers.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GuestViewError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("the loader did not allocate '{0}'")]
    Missing(&'static str),
    #[error("{what} at {addr:#x} ({len:#x} bytes) is not inside any allocated file")]
    Unmapped { what: String, addr: u64, len: u64 },
}

/// One table in guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestTable {
    /// File name for a dump: the signature, numbered from the second of a kind (`SSDT1`), or
    /// `RSDP`.
    pub name: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// The fw_cfg files the script refers to: the three blobs plus VMGenID's two files.
pub fn fw_cfg_files(blobs: &AcpiBlobs) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    m.insert(TABLES_FILE.to_string(), blobs.tables.clone());
    m.insert(RSDP_FILE.to_string(), blobs.rsdp.clone());
    m.insert(VMGENID_GUID_FILE.to_string(), vec![0u8; VMGENID_GUID_FILE_LEN]);
    m.insert(VMGENID_ADDR_FILE.to_string(), vec![0u8; 8]);
    m
}

/// Runs the blobs' loader script with `alloc` and walks the result.
pub fn load(blobs: &AcpiBlobs, alloc: &mut Allocator) -> Result<(Executed, Vec<GuestTable>), GuestViewError> {
    let exec = execute(&blobs.loader, &fw_cfg_files(blobs), alloc)?;
    let tables = walk(&exec)?;
    Ok((exec, tables))
}

fn read(exec: &Executed, what: &str, addr: u64, len: u64) -> Result<Vec<u8>, GuestViewError> {
    for f in &exec.files {
        let end = f.addr.checked_add(f.bytes.len() as u64);
        if let (true, Some(end)) = (addr >= f.addr, end) {
            if addr.checked_add(len).is_some_and(|e| e <= end) {
                let start = (addr - f.addr) as usize;
                return Ok(f.bytes[start..start + len as usize].to_vec());
            }
        }
    }
    Err(GuestViewError::Unmapped { what: what.into(), addr, len })
}

fn le(bytes: &[u8], at: usize, size: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw[..size].copy_from_slice(&bytes[at..at + size]);
    u64::from_le_bytes(raw)
}

fn table_at(exec: &Executed, what: &str, addr: u64) -> Result<Vec<u8>, GuestViewError> {
    let header = read(exec, what, addr, HEADER_LEN as u64)?;
    let len = le(&header, 4, 4).max(HEADER_LEN as u64);
    read(exec, what, addr, len)
}

/// The tables reachable from the RSDP, RSDP first, then XSDT, then each XSDT entry in order
/// with FACS and DSDT after the FADT.
pub fn walk(exec: &Executed) -> Result<Vec<GuestTable>, GuestViewError> {
    exec.file(TABLES_FILE).ok_or(GuestViewError::Missing(TABLES_FILE))?;
    let rsdp = exec.file(RSDP_FILE).ok_or(GuestViewError::Missing(RSDP_FILE))?;
    let rsdp_bytes = read(exec, "RSDP", rsdp.addr, RSDP_LEN as u64)?;
    let mut out = vec![GuestTable { name: "RSDP".into(), addr: rsdp.addr, bytes: rsdp_bytes.clone() }];
    let xsdt_addr = le(&rsdp_bytes, RSDP_XSDT_ADDR as usize, 8);
    let xsdt = table_at(exec, "XSDT", xsdt_addr)?;
    let entries: Vec<u64> = (XSDT_ENTRIES as usize..xsdt.len())
        .step_by(8)
        .filter(|o| o + 8 <= xsdt.len())
        .map(|o| le(&xsdt, o, 8))
        .collect();
    out.push(GuestTable { name: "XSDT".into(), addr: xsdt_addr, bytes: xsdt });
    for (i, addr) in entries.into_iter().enumerate() {
        let t = table_at(exec, &format!("XSDT entry {i}"), addr)?;
        let is_fadt = &t[..4] == b"FACP";
        let (facs, dsdt) = if is_fadt && t.len() >= 44 {
            (le(&t, FADT_FIRMWARE_CTRL as usize, 4), le(&t, FADT_DSDT as usize, 4))
        } else {
            (0, 0)
        };
        out.push(GuestTable { name: String::new(), addr, bytes: t });
        if is_fadt {
            for (what, a) in [("FACS", facs), ("DSDT", dsdt)] {
                if a != 0 {
                    out.push(GuestTable { name: String::new(), addr: a, bytes: table_at(exec, what, a)? });
                }
            }
        }
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for t in out.iter_mut().skip(1) {
        let sig: String =
            t.bytes[..4].iter().map(|&b| if b.is_ascii_alphanumeric() { b as char } else { '_' }).collect();
        let n = seen.entry(sig.clone()).or_insert(0);
        t.name = if *n == 0 { sig } else { format!("{sig}{n}") };
        *n += 1;
    }
    Ok(out)
}
