//! Snapshots of running VMs into the store, and restores from it.
//!
//! A snapshot is the store's manifest (the RAM-block table and each block's chunks) plus a
//! VM state file ([`migrate::snapshot::format`]) holding named fragments: `machine` (how to
//! build the VM again), `vcpu/<n>`, `kvm/vm` (PIC, IOAPIC, PIT, kvmclock) and one per device.
//!
//! Saving pauses the vCPUs only to capture state and write-protect RAM, then copies RAM while
//! the guest runs (background, the default; [`mode`] says when each mode runs), or pauses the
//! vCPUs for the whole copy (stop-and-copy), or copies RAM while the guest runs and pauses only
//! for the pages dirtied meanwhile (live). Restoring builds a VM of the same shape, checks
//! every RAM block before writing anything, resizes the resizeable blocks, loads pages
//! (eagerly, or lazily through userfaultfd), then device, VM and vCPU state.

mod acpi_state;
mod background;
pub mod devices;
mod handoff;
pub mod lineage;
pub mod mode;
pub mod net_state;
pub mod restore;
pub mod save;
pub mod shared_base;
pub mod vcpu_state;
pub mod xsave;

use thiserror::Error;

pub use mode::{EndFillWait, FillWait, PreProtectFault, SaveHooks, SaveMode};
pub use restore::{restore, RestoreMode, RestoreOptions, RestorePhases, RestoreReport};
pub use save::{save, SaveOptions, SaveProgress, SaveReport};

/// Errors taking or restoring a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("store: {0}")]
    Store(#[from] storage::StoreError),
    #[error("VM state: {0}")]
    Format(#[from] migrate::snapshot::format::FormatError),
    #[error(transparent)]
    Check(#[from] migrate::snapshot::check::CheckError),
    #[error("copying RAM: {0}")]
    RamIo(#[from] migrate::snapshot::ram_io::RamIoError),
    #[error(transparent)]
    Persist(#[from] migrate::persist::PersistError),
    #[error(transparent)]
    State(#[from] vcpu_state::StateError),
    #[error(transparent)]
    Cpu(#[from] crate::cpu::CpuError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error("lazy restore: {0}")]
    Lazy(#[from] migrate::lazy::LazyError),
    #[error("background snapshot: {0}")]
    WriteProtect(#[from] migrate::ram::wp::WpError),
    #[error("RAM block '{0}' resized during snapshot")]
    ResizedDuringSnapshot(String),
    #[error("the snapshot was cancelled (its VM is being deleted); nothing was committed")]
    Cancelled,
    #[error(
        "device '{device}' ({bus} {addr:#x}) has no snapshot fragment, so its state would be lost: \
         give it an adapter in snapshot::devices::fragments"
    )]
    DeviceNotSaved { device: String, bus: String, addr: u64 },
    #[error("new VM generation ID: {0}")]
    NewGeneration(#[from] ::devices::acpi::vmgenid::VmGenIdError),
    #[error("the VM has stopped; there is nothing to snapshot")]
    NotRunning,
    #[error("the VM's lazy restore failed ({0}); nothing was committed")]
    LazyFailed(String),
    #[error("reading KVM's dirty log of slot {slot}: {source}")]
    DirtyLog { slot: u32, source: kvm_ioctls::Error },
    #[error(
        "snapshot '{name}' has {snapshot} NIC(s) but {given} --net option(s) were given: a restore keeps the \
         VM's NICs; give one --net per NIC (in PCI order) or none to use the snapshot's taps"
    )]
    NetCount { name: String, snapshot: usize, given: usize },
    #[error("snapshot '{name}': its NIC list: {reason}")]
    NetSpec { name: String, reason: String },
    #[error("snapshot '{name}': its fw_cfg files: {reason}")]
    FwCfgFiles { name: String, reason: String },
    #[error("snapshot '{name}' was deleted and taken again while it was being restored; restore it again")]
    Replaced { name: String },
    #[error("restoring snapshot '{name}': the thread reading its manifest panicked: {message}")]
    ManifestThread { name: String, message: String },
}
