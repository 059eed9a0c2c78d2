//! Device models, free of KVM: the bus, COM1, the guest exit device and fw_cfg. They reach
//! guest memory and RAM blocks through `migrate::ram` (guest memory only through
//! `GuestMemory`, whose writes mark pages dirty for live snapshots), and raise interrupts
//! through eventfds, so their unit tests need no /dev/kvm.

pub mod acpi;
pub mod bus;
pub mod debugcon;
pub mod exit;
pub mod fw_cfg;
pub mod serial;
