//! ACPI for the snapvisor PC: the tables a guest's OS reads, built in Rust, and the
//! bios-linker-loader script (`etc/table-loader`) with which firmware places them in guest
//! memory and patches their pointers and checksums.
//!
//! The three blobs QEMU serves through fw_cfg are served the same way here, each from a
//! resizeable RAM block: `etc/acpi/tables` (every table, padded to [`TABLES_STEP`] steps, at
//! most [`TABLES_MAX`]), `etc/acpi/rsdp` (the RSDP, exact size) and `etc/table-loader`
//! (128-byte commands, padded to [`LOADER_STEP`], at most [`LOADER_MAX`]).
//!
//! [`build`] is the contract between the table builder and the rest of the machine: it takes
//! an [`AcpiConfig`] describing the machine and returns the three blobs.
//!
//! Where things are:
//! - [`tables`]: the fixed-format tables (FACS, FADT, MADT, XSDT, RSDP) and the checks on
//!   operator tables;
//! - [`aml`]: the DSDT and the VMGenID SSDT;
//! - [`assemble`]: the blob layout and the loader script (the body of [`build`]);
//! - [`loader`]: the bios-linker-loader format, its encoder and its parser;
//! - [`loader_exec`]: runs a script as SeaBIOS does, on byte buffers;
//! - [`guest_view`]: follows the patched pointers from the RSDP, as a guest OS does.

pub mod aml;
pub mod assemble;
pub mod guest_view;
pub mod loader;
pub mod loader_exec;
pub mod runtime;
pub mod tables;
#[cfg(test)]
mod tests;
pub mod vmgenid;

use thiserror::Error;

/// fw_cfg file of the tables.
pub const TABLES_FILE: &str = "etc/acpi/tables";
/// fw_cfg file of the RSDP.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
/// fw_cfg file of the loader script.
pub const LOADER_FILE: &str = "etc/table-loader";
/// VMGenID: the page holding the generation ID.
pub const VMGENID_GUID_FILE: &str = "etc/vmgenid_guid";
/// VMGenID: where the firmware writes the GUID's guest address (8 bytes, little-endian).
pub const VMGENID_ADDR_FILE: &str = "etc/vmgenid_addr";
/// Size of `etc/vmgenid_guid`.
pub const VMGENID_GUID_FILE_LEN: usize = 4096;
/// Offset of the GUID inside `etc/vmgenid_guid` (the address the firmware reports points here).
pub const VMGENID_GUID_OFFSET: u64 = 40;
/// GPE0 status bit whose event (`\_GPE._E05`) notifies the VMGenID device.
pub const VMGENID_GPE_BIT: u8 = 5;

/// Largest `etc/acpi/tables`, and the step its size is padded to.
pub const TABLES_MAX: u64 = 0x20_0000;
pub const TABLES_STEP: u64 = 0x2_0000;
/// Largest `etc/table-loader`, and the step its size is padded to.
pub const LOADER_MAX: u64 = 0x1_0000;
pub const LOADER_STEP: u64 = 0x1000;

/// Errors building ACPI tables.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI tables of {len:#x} bytes do not fit in {max:#x}")]
    TooLarge { len: u64, max: u64 },
    #[error("extra ACPI table {index}: {reason}")]
    ExtraTable { index: usize, reason: String },
    #[error("ACPI machine description: {0}")]
    BadConfig(String),
    #[error("ACPI loader script: {0}")]
    Loader(#[from] loader::LoaderError),
}

/// What the tables describe: the machine as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs: one processor object and one MADT local APIC each (APIC IDs 0..vcpus).
    pub vcpus: u8,
    /// RAM below 4 GiB and above it, in bytes.
    pub ram_below_4g: u64,
    pub ram_above_4g: u64,
    /// The PCI host bridge's 32-bit memory window (start, end exclusive) for its _CRS.
    pub pci_mmio32: (u64, u64),
    /// PCI config mechanism #1 ports (0xcf8, 8 ports), reserved in the host bridge's _CRS.
    pub pci_config_port: u16,
    /// ACPI PM blocks, as the FADT names them.
    pub pm1a_evt: u16,
    pub pm1a_cnt: u16,
    pub pm_tmr: u16,
    pub gpe0: u16,
    pub gpe0_len: u8,
    /// The SCI's ISA interrupt (level, active high; the MADT overrides its polarity).
    pub sci_irq: u8,
    /// IOAPIC and local APIC addresses for the MADT.
    pub ioapic_addr: u32,
    pub lapic_addr: u32,
    /// COM1 (port, ISA IRQ), described in the DSDT.
    pub serial: Option<(u16, u8)>,
    /// fw_cfg's port base, described in the DSDT as `QEMU0002`.
    pub fw_cfg_port: u16,
    /// Whether to describe the VMGenID device (SSDT `VGEN`, loader commands for
    /// [`VMGENID_GUID_FILE`] and [`VMGENID_ADDR_FILE`]).
    pub vmgenid: bool,
    /// Tables the operator adds (`--acpi-table`), whole tables with their headers.
    pub extra_tables: Vec<Vec<u8>>,
}

/// The three blobs served through fw_cfg.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiBlobs {
    /// `etc/acpi/tables`, padded to a multiple of [`TABLES_STEP`].
    pub tables: Vec<u8>,
    /// `etc/acpi/rsdp`.
    pub rsdp: Vec<u8>,
    /// `etc/table-loader`, padded to a multiple of [`LOADER_STEP`].
    pub loader: Vec<u8>,
}

/// Builds the tables, the RSDP and the loader script for `cfg`.
pub fn build(cfg: &AcpiConfig) -> Result<AcpiBlobs, AcpiError> {
    assemble::build(cfg)
}
