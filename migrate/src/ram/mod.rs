//! RAM blocks, as QEMU models them: named regions of host memory holding guest RAM, option
//! ROMs and firmware blobs, each with a used length inside a reservation of `max_length`.
//!
//! A snapshot records each block's used length; loading compares it with the destination and
//! resizes blocks that are *resizeable* (firmware blobs whose size can change between
//! versions), telling the owner through its `resized` hook. The [`RamRegistry`] keeps a VM's
//! blocks and the [`RamBlockListener`]s that follow them (the KVM slot map, a snapshot in
//! progress, a lazy restore).
//!
//! Devices reach guest RAM only through [`GuestMemory`], whose writes mark the blocks' dirty
//! bitmaps (see its module); [`GuestMemory::tracked`] gives rust-vmm crates a vm-memory view
//! of it whose writes mark them too.
//!
//! Lock order: the registry's mutex is never held while listeners or hooks run; a resize
//! holds only the block's own resize lock across them. Hooks may therefore call into devices
//! that themselves call the registry, as long as they do not resize the same block again.

mod block;
mod error;
mod guest;
mod present;
mod registry;
#[cfg(test)]
mod tests;
mod vm_view;
pub mod wp;

pub use block::{live_ram_ranges, RamBlock, RamBlockConfig, ResizedHook};
pub use error::RamError;
pub use guest::{GuestMemory, GuestMemoryError, GuestRegion};
pub use present::used_pages;
pub use registry::{ListenerId, RamBlockListener, RamRegistry};
pub use vm_view::{BlockDirty, TrackedMemory, VmViewError};
