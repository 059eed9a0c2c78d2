//! Device models, free of KVM: the bus, COM1, the guest exit device, fw_cfg, and the PC
//! platform firmware needs (CMOS/RTC, i8042, ACPI PM, the PCI bus and host bridge, SMBIOS). They reach
//! guest memory and RAM blocks through `migrate::ram` (guest memory only through
//! `GuestMemory`, whose writes mark pages dirty for live snapshots), and raise interrupts
//! through eventfds, so their unit tests need no /dev/kvm.

pub mod acpi;
pub mod bus;
pub mod cmos;
pub mod debugcon;
pub mod exit;
pub mod fw_cfg;
pub mod i8042;
pub mod irq;
pub mod latch;
pub mod net;
pub mod pci;
pub mod pm;
pub mod serial;
pub mod smbios;
pub mod virtio;
