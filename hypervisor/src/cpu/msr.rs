//! Boot-time MSR values, written only for MSRs this host's KVM reports.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use super::CpuError;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default memory type write-back (6).
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSRs KVM can save and restore on this host.
pub fn index_list(kvm: &Kvm) -> Result<Vec<u32>, CpuError> {
    kvm.get_msr_index_list().map(|l| l.as_slice().to_vec()).map_err(CpuError::MsrIndexList)
}

/// The boot values snapvisor sets, filtered to the MSRs in `supported`.
pub fn boot_entries(supported: &[u32]) -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .filter(|(index, _)| supported.contains(index))
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

/// Writes the boot MSRs to `vcpu`; every one must be accepted.
pub fn set_boot_msrs(vcpu: &VcpuFd, id: u8, supported: &[u32]) -> Result<(), CpuError> {
    let entries = boot_entries(supported);
    let msrs = Msrs::from_entries(&entries).map_err(|e| CpuError::MsrList { vcpu: id, reason: format!("{e:?}") })?;
    let written = vcpu.set_msrs(&msrs).map_err(|source| CpuError::Ioctl { vcpu: id, what: "KVM_SET_MSRS", source })?;
    if written != entries.len() {
        return Err(CpuError::SetMsrs {
            vcpu: id,
            written,
            wanted: entries.len(),
            refused: entries.get(written).map_or(0, |e| e.index),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_supported_msrs_are_written() {
        let entries = boot_entries(&[MSR_IA32_TSC, MSR_MTRR_DEF_TYPE]);
        let idx: Vec<u32> = entries.iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![MSR_IA32_TSC, MSR_MTRR_DEF_TYPE]);
        assert_eq!(entries[1].data, MTRR_ENABLE_WRITEBACK);
        assert!(boot_entries(&[]).is_empty());
    }
}
