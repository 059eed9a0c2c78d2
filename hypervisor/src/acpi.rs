//! ACPI for a snapvisor PC: what [`devices::acpi::build`] is told about the machine
//! ([`acpi_config`]; `layout` has the addresses), and the wiring of the run-time devices of a
//! firmware VM ([`attach`]): the ACPI blobs (`devices::acpi::runtime`, three resizeable RAM
//! blocks served through fw_cfg and rebuilt on the first select after a reset) and VMGenID
//! (`devices::acpi::vmgenid`). [`new_generation`] gives a VM a new generation ID (clones,
//! `restore --new-generation`); [`reset`] is what a machine reset must call for them.
//! [`attach_smbios`] gives a firmware VM its SMBIOS tables (`devices::smbios`), which SeaBIOS
//! copies instead of building its own.
//!
//! Extra tables (`--acpi-table`) are operator files, read as untrusted input (regular files of
//! at most [`MAX_TABLE_FILE`] bytes, at most [`MAX_TABLES`]) and kept in the VM's
//! `MachineSpec`, so a restore builds the same tables unless told otherwise; the builder
//! checks their headers.

use devices::acpi::AcpiConfig;

use crate::layout;
use crate::memory::pc_ram_layout;

/// The machine a VM of `vcpus` vCPUs and `mem_bytes` of RAM is, for its ACPI tables.
pub fn acpi_config(vcpus: u8, mem_bytes: u64, extra_tables: Vec<Vec<u8>>) -> AcpiConfig {
    let parts = pc_ram_layout(mem_bytes);
    let below = parts.iter().filter(|p| p.gpa < layout::HIGH_RAM_START).map(|p| p.len).sum();
    let above = parts.iter().filter(|p| p.gpa >= layout::HIGH_RAM_START).map(|p| p.len).sum();
    AcpiConfig {
        vcpus,
        ram_below_4g: below,
        ram_above_4g: above,
        // The window the platform's PCI bus accepts BARs in: from the end of low RAM up to
        // the IOAPIC, as QEMU's PC describes its PCI hole.
        pci_mmio32: crate::platform::pci_windows(mem_bytes).mmio32,
        pci_config_port: layout::PCI_CONFIG_PORT,
        pm1a_evt: layout::ACPI_PM1A_EVT,
        pm1a_cnt: layout::ACPI_PM1A_CNT,
        pm_tmr: layout::ACPI_PM_TMR,
        gpe0: layout::ACPI_GPE0,
        gpe0_len: layout::ACPI_GPE0_LEN as u8,
        sci_irq: layout::ACPI_SCI_IRQ as u8,
        ioapic_addr: layout::IOAPIC as u32,
        lapic_addr: layout::LAPIC as u32,
        serial: Some((layout::SERIAL_PORT, layout::SERIAL_IRQ as u8)),
        fw_cfg_port: devices::fw_cfg::PORT_BASE as u16,
        vmgenid: true,
        extra_tables,
    }
}

/// An extra ACPI table (`--acpi-table`): a whole table with its header, as read from a file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiTable {
    /// Where it came from, for people.
    pub name: String,
    pub data: migrate::snapshot::format::serde_bytes_compat::Bytes,
}

/// Largest `--acpi-table` file.
pub const MAX_TABLE_FILE: u64 = 1 << 20;
/// Most `--acpi-table` files per VM.
pub const MAX_TABLES: usize = 16;

/// Errors setting up a VM's ACPI devices.
#[derive(Debug, thiserror::Error)]
pub enum AcpiSetupError {
    #[error("--acpi-table: {0}")]
    File(#[from] crate::boot::files::BootFileError),
    #[error("{count} extra ACPI tables given; at most {MAX_TABLES}")]
    TooManyTables { count: usize },
    #[error("extra ACPI table {name} is {len} bytes; at most {MAX_TABLE_FILE}")]
    TableTooLarge { name: String, len: u64 },
    #[error("ACPI tables: {0}")]
    Runtime(#[from] devices::acpi::runtime::AcpiRuntimeError),
    #[error("VMGenID: {0}")]
    VmGenId(#[from] devices::acpi::vmgenid::VmGenIdError),
    #[error("SMBIOS: {0}")]
    Smbios(#[from] devices::smbios::SmbiosError),
    #[error("SMBIOS: fw_cfg: {0}")]
    SmbiosFwCfg(#[from] devices::fw_cfg::FwCfgError),
}

impl AcpiSetupError {
    /// Whether the error is about what the operator gave (a table file, tables too large).
    pub fn is_input(&self) -> bool {
        use devices::acpi::runtime::AcpiRuntimeError as R;
        use devices::acpi::AcpiError as A;
        matches!(
            self,
            AcpiSetupError::File(_)
                | AcpiSetupError::TooManyTables { .. }
                | AcpiSetupError::TableTooLarge { .. }
                | AcpiSetupError::Runtime(R::TooLarge { .. } | R::Build(A::TooLarge { .. } | A::ExtraTable { .. }))
        )
    }
}

/// Reads `--acpi-table` files: regular files only, each at most [`MAX_TABLE_FILE`] bytes.
pub fn read_tables(paths: &[std::path::PathBuf]) -> Result<Vec<AcpiTable>, AcpiSetupError> {
    if paths.len() > MAX_TABLES {
        return Err(AcpiSetupError::TooManyTables { count: paths.len() });
    }
    paths
        .iter()
        .map(|p| {
            let f = crate::boot::files::BootFile::read_path("ACPI table", p, MAX_TABLE_FILE)?;
            Ok(AcpiTable { name: f.name, data: migrate::snapshot::format::serde_bytes_compat::Bytes(f.data) })
        })
        .collect()
}

/// Gives a firmware VM its ACPI blobs (three resizeable RAM blocks served through fw_cfg,
/// rebuilt on select; see `devices::acpi::runtime`) and its VMGenID device with a fresh
/// generation. Tables come from a snapshot's spec too, so they are checked here again.
pub fn attach(
    devices: &mut crate::machine::Devices,
    registry: &std::sync::Arc<migrate::ram::RamRegistry>,
    ram: &crate::memory::GuestRam,
    vcpus: u8,
    tables: &[AcpiTable],
) -> Result<(), AcpiSetupError> {
    use devices::acpi::runtime::AcpiRuntime;
    use devices::acpi::vmgenid::{Guid, VmGenId};

    if tables.len() > MAX_TABLES {
        return Err(AcpiSetupError::TooManyTables { count: tables.len() });
    }
    if let Some(t) = tables.iter().find(|t| t.data.0.len() as u64 > MAX_TABLE_FILE) {
        return Err(AcpiSetupError::TableTooLarge { name: t.name.clone(), len: t.data.0.len() as u64 });
    }
    let cfg = acpi_config(vcpus, ram.size(), tables.iter().map(|t| t.data.0.clone()).collect());
    let mut fw = devices.fw_cfg.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let rt = AcpiRuntime::new(registry.clone(), Box::new(move || devices::acpi::build(&cfg)))?;
    rt.register(&mut fw)?;
    devices.acpi = Some(rt);
    let vmgenid = VmGenId::new(ram.device_memory().clone(), Guid::random()?);
    // A new generation raises GPE0 bit 5 on the ACPI PM block, whose SCI makes the guest run
    // \_GPE._E05: Notify(\_SB.VGEN, 0x80).
    let pm = devices.platform.pm.clone();
    vmgenid.set_notify(Box::new(move || {
        if let Err(e) =
            pm.lock().unwrap_or_else(std::sync::PoisonError::into_inner).raise_gpe(devices::acpi::VMGENID_GPE_BIT)
        {
            tracing::warn!("VMGenID: raising GPE {}: {e}", devices::acpi::VMGENID_GPE_BIT);
        }
    }));
    vmgenid.register(&mut fw)?;
    devices.vmgenid = Some(vmgenid);
    Ok(())
}

/// What a VM of `vcpus` vCPUs and `mem_bytes` of RAM, booting firmware `bios` (its file name
/// and size), says in its SMBIOS tables; `uuid` in RFC 4122 byte order.
pub fn smbios_config(
    vcpus: u8,
    mem_bytes: u64,
    bios_name: &str,
    bios_size: u64,
    uuid: [u8; 16],
) -> devices::smbios::SmbiosConfig {
    let parts = pc_ram_layout(mem_bytes);
    devices::smbios::SmbiosConfig {
        uuid,
        vcpus,
        ram_below_4g: parts.iter().filter(|p| p.gpa < layout::HIGH_RAM_START).map(|p| p.len).sum(),
        ram_above_4g: parts.iter().filter(|p| p.gpa >= layout::HIGH_RAM_START).map(|p| p.len).sum(),
        bios_vendor: "SeaBIOS".into(),
        // The image's file name (its version is not known here).
        bios_version: std::path::Path::new(bios_name)
            .file_name()
            .map_or_else(|| bios_name.to_string(), |n| n.to_string_lossy().into_owned()),
        // Fixed, so the same machine gets the same bytes (SeaBIOS's own date for QEMU).
        bios_date: "04/01/2014".into(),
        bios_size,
        product: "snapvisor VM".into(),
        product_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Gives a firmware VM its SMBIOS tables (fw_cfg `etc/smbios/smbios-anchor` and
/// `etc/smbios/smbios-tables`) and `uuid` at fw_cfg key 0x02. The files are read-only and
/// rebuilt byte for byte from the `MachineSpec` (which keeps the UUID) at a restore, so a
/// snapshot's fw_cfg state still fits. The UUID is the operator's (`--uuid`) or nil, as in
/// QEMU: a random default would make two boots of the same machine print different
/// `Machine UUID` lines.
pub fn attach_smbios(
    devices: &crate::machine::Devices,
    vcpus: u8,
    mem_bytes: u64,
    bios_name: &str,
    bios_size: u64,
    uuid: [u8; 16],
) -> Result<(), AcpiSetupError> {
    let blobs = devices::smbios::build(&smbios_config(vcpus, mem_bytes, bios_name, bios_size, uuid))?;
    let mut fw = devices.fw_cfg.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    devices::smbios::add_files(&mut fw, &blobs)?;
    fw.add_bytes(devices::fw_cfg::FW_CFG_UUID, uuid.to_vec())?;
    Ok(())
}

/// Gives the VM a new generation ID: written at the address the firmware reported, the guest
/// notified, fw_cfg's copy updated. Returns the GUID and the address (0: the firmware has not
/// placed it yet). Errors if the VM has no VMGenID device.
pub fn new_generation(
    devices: &crate::machine::Devices,
) -> Result<(devices::acpi::vmgenid::Guid, u64), devices::acpi::vmgenid::VmGenIdError> {
    use devices::acpi::vmgenid::{Guid, VmGenIdError};
    let Some(vmgenid) = &devices.vmgenid else {
        return Err(VmGenIdError::Write {
            addr: 0,
            reason: "the VM has no VMGenID device (it boots no firmware)".into(),
        });
    };
    let guid = Guid::random()?;
    vmgenid.new_generation(guid)?;
    // The device's own lock is released here; fw_cfg's is taken alone (see vmgenid's lock order).
    vmgenid.sync_fw_cfg(&mut devices.fw_cfg.lock().unwrap_or_else(std::sync::PoisonError::into_inner))?;
    Ok((guid, vmgenid.addr()))
}

/// A machine reset, for the ACPI devices: tables rebuilt on the next select, the VMGenID
/// address forgotten until the firmware reports it again.
pub fn reset(devices: &crate::machine::Devices) {
    if let Some(rt) = &devices.acpi {
        rt.reset();
    }
    if let Some(v) = &devices.vmgenid {
        v.reset();
        if let Err(e) = v.sync_fw_cfg(&mut devices.fw_cfg.lock().unwrap_or_else(std::sync::PoisonError::into_inner)) {
            tracing::warn!("VMGenID reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smbios_describes_the_pc_ram_layout_and_the_firmware_file() {
        let cfg = smbios_config(2, 6 << 30, "/usr/share/seabios/bios.bin", 128 << 10, [7; 16]);
        // RAM up to the PCI hole at 3 GiB, the rest from 4 GiB.
        assert_eq!((cfg.ram_below_4g, cfg.ram_above_4g), (3 << 30, 3 << 30));
        assert_eq!(cfg.bios_version, "bios.bin");
        let blobs = devices::smbios::build(&cfg).expect("build");
        let parsed = devices::smbios::parse(&blobs.tables).expect("parse");
        let maps: Vec<(u32, u32)> = parsed
            .iter()
            .filter(|s| s.kind == 19)
            .map(|s| {
                let f = &s.formatted;
                (u32::from_le_bytes([f[4], f[5], f[6], f[7]]), u32::from_le_bytes([f[8], f[9], f[10], f[11]]))
            })
            .collect();
        assert_eq!(maps, [(0, (3 << 20) - 1), (4 << 20, (7 << 20) - 1)]);

        let small = smbios_config(1, 64 << 20, "bios.bin", 128 << 10, [7; 16]);
        assert_eq!((small.ram_below_4g, small.ram_above_4g), (64 << 20, 0));
    }
}
