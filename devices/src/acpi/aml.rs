//! The AML tables: the DSDT describing the machine, and the VMGenID SSDT.
//!
//! DSDT namespace (revision 2, 64-bit integers):
//!
//! ```text
//! \_S5  Package {0, 0, 0, 0}          S5 is SLP_TYP 0 in PM1a_CNT, as on QEMU's PIIX4 PM
//! \_SB.PCI0   PNP0A03 host bridge; _CRS: bus 0-0xff, the config ports, I/O 0-0xcf7 and
//!             0xd00-0xffff, the VGA window 0xa0000-0xbffff, the 32-bit PCI window
//! \_SB.PCI0.COM1  PNP0501, _CRS IO + IRQ               (when the machine has COM1)
//! \_SB.PCI0.FWCF  "QEMU0002", _STA 0xB, _CRS IO at the fw_cfg port, 0x0c ports
//! \_SB.PCI0.PMIO  PNP0C02 reserving the PM1a event/control, PM timer and GPE0 blocks
//! \_SB.Cxxx   ACPI0007 processor devices, _UID = index = MADT processor UID (xxx in hex)
//! ```
//!
//! SSDT "VGEN" (QEMU's vmgenid layout):
//!
//! ```text
//! Name (VGIA, DWord 0)   patched by the loader to the address of etc/vmgenid_guid
//! \_SB.VGEN  _HID "QEMUVGID", _CID/_DDN "VM_Gen_Counter",
//!            ADDR() returns Package {VGIA + 0x28, 0}: the GUID's address, low and high
//! \_GPE._E05 Notify (\_SB.VGEN, 0x80)
//! ```
//!
//! The crate's AML integers take their shortest encoding, so `VGIA` is written by hand as a
//! DWordConst: the loader's 4-byte ADD_POINTER needs those four bytes to exist whatever the
//! value, at [`VGIA_OFFSET`] in the SSDT.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Local, Method, Name, Notify, Package, Path,
    ResourceTemplate, Return, Scope, Store, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::tables::{HEADER_LEN, OEM_ID, OEM_REVISION};
use super::{AcpiConfig, AcpiError, VMGENID_GPE_BIT, VMGENID_GUID_OFFSET};

const NAMEOP: u8 = 0x08;
const DWORDPREFIX: u8 = 0x0c;
/// Offset of VGIA's four value bytes in the VGEN SSDT: header, NameOp, "VGIA", DWordPrefix.
pub const VGIA_OFFSET: u32 = HEADER_LEN as u32 + 1 + 4 + 1;

/// fw_cfg's I/O footprint, as QEMU describes it.
const FW_CFG_IO_LEN: u8 = 0x0c;

fn table(sig: &[u8; 4], table_id: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut t = Sdt::new(*sig, HEADER_LEN as u32, 2, OEM_ID, *table_id, OEM_REVISION);
    t.append_slice(body);
    t.as_slice().to_vec()
}

fn port_range(port: u16, len: u8) -> IO {
    IO::new(port, port, 1, len)
}

/// The DSDT for `cfg`.
pub fn dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let (mmio_start, mmio_end) = cfg.pci_mmio32;
    let mmio = match (u32::try_from(mmio_start), u32::try_from(mmio_end.saturating_sub(1))) {
        (Ok(s), Ok(e)) if mmio_start < mmio_end => (s, e),
        _ => {
            return Err(AcpiError::BadConfig(format!(
                "32-bit PCI window {mmio_start:#x}..{mmio_end:#x} is empty or above 4 GiB"
            )))
        }
    };
    let cfg_port = cfg.pci_config_port;
    let bus = AddressSpace::<u16>::new_bus_number(0, 0xff);
    let cfg_io = port_range(cfg_port, 8);
    let io_lo = AddressSpace::<u16>::new_io(0, cfg_port.saturating_sub(1), None);
    let io_hi = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let vga = AddressSpace::<u32>::new_memory(AddressSpaceCacheable::Cacheable, true, 0xa_0000, 0xb_ffff, None);
    let win = AddressSpace::<u32>::new_memory(AddressSpaceCacheable::NotCacheable, true, mmio.0, mmio.1, None);
    let pci_crs = ResourceTemplate::new(vec![&bus, &cfg_io, &io_lo, &io_hi, &vga, &win]);
    let pci_hid = Name::new("_HID".into(), &EISAName::new("PNP0A03"));
    let pci_adr = Name::new("_ADR".into(), &aml::ZERO);
    let pci_uid = Name::new("_UID".into(), &aml::ZERO);
    let pci_crs = Name::new("_CRS".into(), &pci_crs);

    // COM1.
    let com_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com_uid = Name::new("_UID".into(), &aml::ONE);
    let (com_port, com_irq) = cfg.serial.unwrap_or((0x3f8, 4));
    let com_io = port_range(com_port, 8);
    let com_int = Interrupt::new(true, true, false, false, com_irq.into());
    let com_res = ResourceTemplate::new(vec![&com_io, &com_int]);
    let com_crs = Name::new("_CRS".into(), &com_res);
    let com1 = Device::new("COM1".into(), vec![&com_hid, &com_uid, &com_crs]);

    // fw_cfg.
    let fw_hid = Name::new("_HID".into(), &"QEMU0002");
    let fw_sta = Name::new("_STA".into(), &0x0bu8);
    let fw_io = port_range(cfg.fw_cfg_port, FW_CFG_IO_LEN);
    let fw_res = ResourceTemplate::new(vec![&fw_io]);
    let fw_crs = Name::new("_CRS".into(), &fw_res);
    let fwcf = Device::new("FWCF".into(), vec![&fw_hid, &fw_sta, &fw_crs]);

    // The PM blocks the FADT names.
    let pm_hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let pm_uid = Name::new("_UID".into(), &"PMIO");
    let pm_evt = port_range(cfg.pm1a_evt, 4);
    let pm_cnt = port_range(cfg.pm1a_cnt, 2);
    let pm_tmr = port_range(cfg.pm_tmr, 4);
    let gpe0 = port_range(cfg.gpe0, cfg.gpe0_len);
    let pm_res = ResourceTemplate::new(vec![&pm_evt, &pm_cnt, &pm_tmr, &gpe0]);
    let pm_crs = Name::new("_CRS".into(), &pm_res);
    let pmio = Device::new("PMIO".into(), vec![&pm_hid, &pm_uid, &pm_crs]);

    let mut pci_children: Vec<&dyn Aml> = vec![&pci_hid, &pci_adr, &pci_uid, &pci_crs];
    if cfg.serial.is_some() {
        pci_children.push(&com1);
    }
    pci_children.extend([&fwcf as &dyn Aml, &pmio]);
    let pci0 = Device::new("PCI0".into(), pci_children);

    // Processors.
    let cpu_hid = Name::new("_HID".into(), &"ACPI0007");
    let cpu_uids: Vec<Name> = (0..cfg.vcpus).map(|i| Name::new("_UID".into(), &i)).collect();
    let cpus: Vec<Device> = cpu_uids
        .iter()
        .enumerate()
        .map(|(i, uid)| Device::new(Path::new(&format!("C{i:03X}")), vec![&cpu_hid, uid]))
        .collect();

    let mut sb: Vec<&dyn Aml> = vec![&pci0];
    sb.extend(cpus.iter().map(|c| c as &dyn Aml));
    let sb = Scope::new("\\_SB_".into(), sb);
    let s5 = Name::new("\\_S5_".into(), &Package::new(vec![&aml::ZERO, &aml::ZERO, &aml::ZERO, &aml::ZERO]));

    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    sb.to_aml_bytes(&mut body);
    Ok(table(b"DSDT", b"SNAPVPC ", &body))
}

/// The VMGenID SSDT ("VGEN"), its VGIA at [`VGIA_OFFSET`].
pub fn vmgenid_ssdt() -> Vec<u8> {
    let mut body = vec![NAMEOP, b'V', b'G', b'I', b'A', DWORDPREFIX, 0, 0, 0, 0];

    let hid = Name::new("_HID".into(), &"QEMUVGID");
    let cid = Name::new("_CID".into(), &"VM_Gen_Counter");
    let ddn = Name::new("_DDN".into(), &"VM_Gen_Counter");
    // ADDR: Local0 = Package {0, 0}; Local0[0] = VGIA + 0x28; Return (Local0)
    let pkg = Package::new(vec![&aml::ZERO, &aml::ZERO]);
    let init = Store::new(&Local(0), &pkg);
    let vgia = Path::new("VGIA");
    let offset = VMGENID_GUID_OFFSET as u8;
    let sum = aml::Add::new(&aml::ZERO, &vgia, &offset);
    let slot = aml::Index::new(&aml::ZERO, &Local(0), &aml::ZERO);
    let set = Store::new(&slot, &sum);
    let ret = Return::new(&Local(0));
    let addr = Method::new("ADDR".into(), 0, true, vec![&init, &set, &ret]);
    let vgen = Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr]);
    let sb = Scope::new("\\_SB_".into(), vec![&vgen]);

    let target = Path::new("\\_SB_.VGEN");
    let notify = Notify::new(&target, &0x80u8);
    let e05 = Method::new(Path::new(&format!("_E{VMGENID_GPE_BIT:02X}")), 0, false, vec![&notify]);
    let gpe = Scope::new("\\_GPE".into(), vec![&e05]);

    sb.to_aml_bytes(&mut body);
    gpe.to_aml_bytes(&mut body);
    table(b"SSDT", b"VMGENID ", &body)
}

#[cfg(test)]
mod tests {
    use super::super::tables::byte_sum;
    use super::*;

    #[test]
    fn vgia_is_a_dword_at_its_offset() {
        let t = vmgenid_ssdt();
        let o = VGIA_OFFSET as usize;
        assert_eq!(&t[o - 6..o], &[NAMEOP, b'V', b'G', b'I', b'A', DWORDPREFIX]);
        assert_eq!(&t[o..o + 4], &[0, 0, 0, 0]);
        assert_eq!(byte_sum(&t), 0);
    }

    #[test]
    fn dsdt_names_devices() {
        let cfg = super::super::tests::cfg(2);
        let d = dsdt(&cfg).expect("dsdt");
        assert_eq!(byte_sum(&d), 0);
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        for name in [&b"PCI0"[..], b"COM1", b"FWCF", b"QEMU0002", b"C000", b"C001", b"ACPI0007", b"_S5_"] {
            assert!(has(name), "DSDT lacks {}", String::from_utf8_lossy(name));
        }
        assert!(!has(b"C002"));
    }

    #[test]
    fn dsdt_rejects_bad_window() {
        let mut cfg = super::super::tests::cfg(1);
        cfg.pci_mmio32 = (0xc000_0000, 0x1_0000_0001);
        assert!(matches!(dsdt(&cfg), Err(AcpiError::BadConfig(_))));
    }
}
