//! The ACPI description of a snapvisor PC: what [`devices::acpi::build`] is told about the
//! machine (`layout` has the addresses).

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
        pci_mmio32: (layout::PCI_MMIO32_START, layout::PCI_MMIO32_END),
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
