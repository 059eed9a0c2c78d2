//! Network devices of a VM: what `--net` (and the API's `net` list) asks for, and where each
//! NIC sits.
//!
//! NIC `i` (in the order given) is virtio-net-pci at PCI address `0000:00:(3+i).0`, as QEMU
//! puts the first NIC of a PC at 00:03.0; its option ROM is the RAM block
//! `0000:00:0N.0/virtio-net-pci.rom`. Without firmware, snapvisor places the BARs itself
//! ([`builtin_bars`]) so that built-in guests and kernels find the device at fixed addresses.

pub mod mac;
pub mod nic;
pub mod overrides;
pub mod spec;

pub use spec::{Mac, NetSpec, RomChoice, SpecError};

use devices::pci::Bdf;

/// PCI slot of the first NIC.
pub const FIRST_NIC_SLOT: u8 = 3;
/// At most this many NICs per VM.
pub const MAX_NICS: usize = 8;

/// The PCI address of NIC `index`.
pub fn nic_bdf(index: usize) -> Bdf {
    Bdf::new(FIRST_NIC_SLOT + index as u8, 0)
}

/// The RAM block holding the option ROM of the device at `bdf`.
pub fn rom_block_name(bdf: Bdf) -> String {
    format!("{bdf}/virtio-net-pci.rom")
}

/// Where snapvisor places NIC `index`'s BARs when no firmware runs: (MSI-X BAR, virtio BAR),
/// 64 KiB apart from the start of the 32-bit PCI window.
pub fn builtin_bars(index: usize) -> (u64, u64) {
    let base = crate::layout::PCI_MMIO32_START + (index as u64) * 0x1_0000;
    (base, base + 0x8000)
}
