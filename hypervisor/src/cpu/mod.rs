//! x86_64 vCPU set-up: CPUID and MSRs derived from what KVM reports, and the register state
//! for the two ways a guest starts (64-bit entry for kernels and built-in guests).
//!
//! The hosts snapvisor runs on may expose far fewer CPU features through KVM than the CPU
//! has (a nested, paravirtual KVM in particular), so nothing here assumes a feature: CPUID
//! starts from `KVM_GET_SUPPORTED_CPUID` and only the topology leaves are rewritten, and MSRs
//! are written only when they appear in `KVM_GET_MSR_INDEX_LIST`.

pub mod cpuid;
pub mod msr;
pub mod regs;

use thiserror::Error;

/// Errors while configuring a vCPU.
#[derive(Debug, Error)]
pub enum CpuError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 on vCPU {vcpu} failed: {source}")]
    SetCpuid { vcpu: u8, source: kvm_ioctls::Error },
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    MsrIndexList(kvm_ioctls::Error),
    #[error("building the MSR list for vCPU {vcpu}: {reason}")]
    MsrList { vcpu: u8, reason: String },
    #[error("KVM_SET_MSRS on vCPU {vcpu} wrote {written} of {wanted} MSRs (first refused: {refused:#x})")]
    SetMsrs { vcpu: u8, written: usize, wanted: usize, refused: u32 },
    #[error("{what} on vCPU {vcpu} failed: {source}")]
    Ioctl { vcpu: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("writing boot structures into guest memory at {addr:#x}: {reason}")]
    GuestMemory { addr: u64, reason: String },
}
