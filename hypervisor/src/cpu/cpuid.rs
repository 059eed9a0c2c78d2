//! CPUID for a vCPU: KVM's supported table with this vCPU's topology filled in.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::CpuError;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT, "the logical processor count in EBX[23:16] is valid".
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// The CPUID table KVM supports on this host. Asked of KVM once per process (it depends only
/// on the host's CPU and the KVM module, and the ioctl was ~0.3 ms of every VM's creation on
/// the nested hosts these restores are measured on); a failure is not kept, so the next VM
/// asks again.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuError> {
    static SUPPORTED: std::sync::OnceLock<CpuId> = std::sync::OnceLock::new();
    if let Some(c) = SUPPORTED.get() {
        return Ok(c.clone());
    }
    let c = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(CpuError::SupportedCpuid)?;
    Ok(SUPPORTED.get_or_init(|| c).clone())
}

/// Returns the CPUID table for vCPU `id` of `count`: one socket of `count` cores, one thread
/// each, APIC ID = vCPU index.
pub fn for_vcpu(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            // Extended topology: x2APIC ID in EDX for every sub-leaf.
            0xb | 0x1f => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        // Core level: `count` cores, APIC ID shift wide enough for them.
                        e.eax = u32::BITS - u32::from(count.max(1) - 1).leading_zeros();
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            // Deterministic cache parameters: EAX[31:26] = cores per package - 1.
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(count.max(1) - 1) << 26);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn table() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0xdead_0800, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 0, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 1, ..Default::default() },
        ];
        CpuId::from_entries(&entries).expect("three entries fit")
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let c = for_vcpu(&table(), 3, 4);
        let l1 = c.as_slice()[0];
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size and brand index are kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_describes_cores() {
        let c = for_vcpu(&table(), 2, 4);
        let core = c.as_slice()[2];
        assert_eq!(core.edx, 2);
        assert_eq!(core.eax, 2, "4 cores need a 2-bit APIC ID shift");
        assert_eq!(core.ebx, 4);
        assert_eq!(core.ecx >> 8, 2);
    }
}
