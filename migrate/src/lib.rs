//! snapvisor's state model: RAM blocks with QEMU's resize rules, the [`persist::Persist`]
//! contract for devices and vCPUs, the snapshot state format with the load-time RAM checks,
//! and lazy restore through userfaultfd.

pub mod lazy;
pub mod persist;
pub mod ram;
pub mod snapshot;
