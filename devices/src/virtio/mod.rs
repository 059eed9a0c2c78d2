//! virtio 1.x devices on PCI: the modern transport and virtio-net.
//!
//! CONTRACT (shared by the device, the machine wiring, the option ROM and the built-in guest;
//! change it only together with all of them):
//!
//! - Identity: vendor 0x1af4, device 0x1041 (modern-only virtio-net), class 0x020000,
//!   subsystem 0x1af4:0x1100, revision 1.
//! - BAR [`MSIX_BAR`] (32-bit memory, [`MSIX_BAR_SIZE`]): the MSI-X table at
//!   [`MSIX_TABLE_OFFSET`], the PBA at [`MSIX_PBA_OFFSET`].
//! - BAR [`MODERN_BAR`] (64-bit prefetchable memory, [`MODERN_BAR_SIZE`]): common
//!   configuration at [`COMMON_OFFSET`], ISR at [`ISR_OFFSET`], device configuration at
//!   [`DEVICE_CFG_OFFSET`], notifications at [`NOTIFY_OFFSET`] with
//!   [`NOTIFY_OFF_MULTIPLIER`] (queue `i` is notified at `NOTIFY_OFFSET + 4 * i`).
//! - BAR 6: the option ROM, when the device has one ([`PciDevice::bar_memory`]).
//! - Interrupts: MSI-X only, through [`MsiRoutes`] (the machine: KVM GSI routes + irqfds).
//! - Notifications: [`PciDevice::ioevents`] lists one eventfd per queue in the notify area;
//!   the machine registers them with KVM (ioeventfd) wherever the BAR is placed, and a
//!   notify write that reaches the device as an MMIO exit signals the same eventfd.

pub use crate::pci::bus::IoEvent;

pub mod msix;
pub mod net;

/// PCI identity of virtio-net (modern).
pub const VENDOR_ID: u16 = 0x1af4;
pub const NET_DEVICE_ID: u16 = 0x1041;

/// The BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: usize = 1;
pub const MSIX_BAR_SIZE: u64 = 0x1000;
pub const MSIX_TABLE_OFFSET: u64 = 0;
pub const MSIX_PBA_OFFSET: u64 = 0x800;

/// The BAR holding the virtio structures.
pub const MODERN_BAR: usize = 4;
pub const MODERN_BAR_SIZE: u64 = 0x4000;
pub const COMMON_OFFSET: u64 = 0;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// Largest queue the device offers (a power of two).
pub const QUEUE_MAX_SIZE: u16 = 256;

/// An MSI message as the guest programmed it in an MSI-X table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// The machine's side of a device's MSI-X vectors (KVM GSI routes with one irqfd each).
pub trait MsiRoutes: Send + Sync {
    /// Vector `index` now delivers `msg`; `None` when it is masked or MSI-X is off.
    fn set_route(&self, index: u16, msg: Option<MsiMessage>) -> Result<(), String>;
    /// Raises vector `index` (writes its irqfd). Called from the device's I/O thread.
    fn trigger(&self, index: u16);
    /// Raises the function's interrupt while MSI-X is disabled: the VM's paravirtual
    /// interrupt line (what INTx would be; CPL3 guests wait for it through the exit device's
    /// interrupt-wait register). Called from the device's I/O thread and vCPU threads; must
    /// be cheap (it runs on every receive pass the driver wants to hear of).
    fn raise_line(&self);
}
