//! The guest-physical memory map of a snapvisor x86 PC.
//!
//! ```text
//! 0x0000_0500  boot GDT (null, code0, data0, code3, data3)
//! 0x0000_1000  IDT of built-in guests that take interrupts (256 gates, 4 KiB)
//! 0x0000_6000  built-in guest boot info (see guests::BootInfo)
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 PDs identity-mapping the first 4 GiB (2 MiB pages)
//! 0x0002_0000  Linux command line; for built-in guests: PDs for RAM above 4 GiB
//! 0x0008_0000  built-in guests' stack top
//! 0x0009_fc00  EBDA (reserved in e820) .. 0x10_0000 legacy hole (reserved)
//! 0x0010_0000  kernel / built-in guest code (1 MiB)
//! 0xc000_0000  end of low RAM: 3 GiB .. 4 GiB is the 32-bit PCI and platform hole
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC (in-kernel)
//! 0xfef0_0000  guest exit device (MMIO alias of port 0x501)
//! 0xfef0_1000  serial MMIO alias of port 0x3f8 (CPL3 code cannot use port I/O)
//! 0xfeff_c000  KVM identity-map page, 0xfeff_d000 KVM TSS (three pages)
//! 0xff00_0000  firmware image (pc.bios), up to 16 MiB ending at 4 GiB (SeaBIOS: 0xfffe_0000)
//! 0x1_0000_0000  RAM above 4 GiB (the rest of pc.ram)
//! ```

/// Boot GDT.
pub const BOOT_GDT: u64 = 0x500;
/// IDT of built-in guests that take interrupts (the `timer` guest).
pub const BUILTIN_IDT: u64 = 0x1000;
/// Boot information for built-in guests.
pub const BUILTIN_INFO: u64 = 0x6000;
/// Linux boot_params.
pub const ZERO_PAGE: u64 = 0x7000;
/// Top-level page table.
pub const PML4: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// Page directories for the first 4 GiB.
pub const PD_LOW: u64 = 0xb000;
/// Linux command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Page directories for RAM above 4 GiB (built-in guests only).
pub const PD_HIGH: u64 = 0x2_0000;
/// Space for PD_HIGH page directories: each maps 1 GiB.
pub const PD_HIGH_END: u64 = 0x7_0000;
/// Stack top for built-in guests.
pub const BUILTIN_STACK: u64 = 0x8_0000;
/// Start of the EBDA, reserved in e820.
pub const EBDA_START: u64 = 0x9_fc00;
/// 1 MiB: kernels and built-in guest code are loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit hole; low RAM ends here at the latest.
pub const PCI_HOLE_START: u64 = 0xc000_0000;
/// RAM above the hole starts at 4 GiB.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// The exit device's MMIO alias.
pub const EXIT_MMIO: u64 = 0xfef0_0000;
/// The serial port's MMIO alias.
pub const SERIAL_MMIO: u64 = 0xfef0_1000;
/// Port of the exit device.
pub const EXIT_PORT: u16 = 0x501;
/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// CMOS/RTC index and data ports (0x70, 0x71).
pub const CMOS_PORT: u16 = 0x70;
/// PCI configuration mechanism #1: address at 0xcf8, data at 0xcfc..0xcff.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// The firmware debug console (QEMU's isa-debugcon default).
pub const DEBUGCON_PORT: u16 = 0x402;
/// ACPI PM1a event block (4 bytes: status, enable), as on QEMU's PIIX4 PM.
pub const ACPI_PM1A_EVT: u16 = 0x600;
/// ACPI PM1a control block (2 bytes).
pub const ACPI_PM1A_CNT: u16 = 0x604;
/// ACPI PM timer (4 bytes, 24-bit counter at 3.579545 MHz).
pub const ACPI_PM_TMR: u16 = 0x608;
/// ACPI GPE0 block (4 bytes: 2 status, 2 enable), as on QEMU's PIIX4 PM.
pub const ACPI_GPE0: u16 = 0xafe0;
/// Length of the GPE0 block.
pub const ACPI_GPE0_LEN: u16 = 4;
/// The ACPI SCI's ISA interrupt (level-triggered, active high).
pub const ACPI_SCI_IRQ: u32 = 9;
/// 32-bit PCI memory window: from the end of low RAM's hole start up to the IOAPIC.
pub const PCI_MMIO32_START: u64 = PCI_HOLE_START;
/// End (exclusive) of the 32-bit PCI memory window.
pub const PCI_MMIO32_END: u64 = 0xfec0_0000;
/// PCI I/O window firmware assigns I/O BARs from (SeaBIOS starts at 0xc000).
pub const PCI_IO_START: u16 = 0xc000;
/// The IOAPIC (in-kernel).
pub const IOAPIC: u64 = 0xfec0_0000;
/// The local APICs (in-kernel).
pub const LAPIC: u64 = 0xfee0_0000;
/// COM1's interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// KVM's identity-map page (at `KVM_TSS - 0x1000`) and TSS (three pages), just below the
/// 16 MiB a firmware image may take under 4 GiB, as QEMU places them.
pub const KVM_TSS: u64 = 0xfeff_d000;
/// KVM's identity-map page.
pub const KVM_IDENTITY_MAP: u64 = 0xfeff_c000;
