//! Device models, free of KVM: the bus, COM1, the guest exit device and fw_cfg. They reach
//! guest memory through vm-memory and RAM blocks through `migrate::ram`, and raise interrupts
//! through eventfds, so their unit tests need no /dev/kvm.

pub mod bus;
pub mod exit;
pub mod fw_cfg;
pub mod serial;
