//! The saved state of a vCPU and of the VM's in-kernel devices (PIC, IOAPIC, PIT, kvmclock).
//!
//! Saved with the vCPU out of `KVM_RUN` (paused). The kvm-bindings structures carry their own
//! serde encoding (their bytes); the kernel validates register contents when they are set, and
//! this module validates what the kernel cannot: the MSR list against the host's, the number
//! of entries, and the size of the XSAVE area against what this host's KVM takes.
//!
//! Order on save: MP state first (reading other state can change it), events last.
//!
//! Order on restore, each step for a reason KVM has:
//! 1. CPUID (set when the vCPU is created, before this module runs);
//! 2. the TSC frequency (`KVM_SET_TSC_KHZ`), before anything KVM converts between TSC cycles
//!    and time: the TSC MSR and the LAPIC timer;
//! 3. special registers, registers, XSAVE (`KVM_SET_XSAVE` with KVM_CAP_XSAVE2's size when
//!    it exceeds 4096 bytes), XCRs, debug registers;
//! 4. the LAPIC: KVM ignores a write of `IA32_TSC_DEADLINE` unless LVT Timer is already in
//!    TSC-deadline mode, and a freshly created LAPIC is in one-shot mode, masked;
//! 5. the MSRs, `IA32_TSC_DEADLINE` last (it is a TSC value, so after `IA32_TSC`);
//! 6. pending events (exceptions, interrupts, NMI, SIPI vector);
//! 7. the MP state, last: setting the LAPIC or events must not leave it changed.
//!
//! The vCPU fragment's format: fields added since the first version (`tsc_khz`,
//! `xsave_extra`) have serde defaults, so older snapshots load (their TSC frequency is then
//! not set, and their XSAVE area is the 4096-byte one).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::xsave::{read_xsave, write_xsave, xsave_restore_words, XSAVE_LEGACY_SIZE, XSAVE_MAX_SIZE};
use crate::cpu;
use crate::cpu::msr::MSR_IA32_TSC_DEADLINE;

/// Errors saving or restoring KVM state.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("{what} on vCPU {vcpu}: {source}")]
    Vcpu { vcpu: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("{what}: {source}")]
    Vm { what: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {vcpu}: {reason}")]
    Invalid { vcpu: u8, reason: String },
    #[error(
        "vCPU {vcpu}: the snapshot's TSC runs at {saved_khz} kHz and this host's KVM cannot set it \
         (this host's: {host}): {source}"
    )]
    TscKhz { vcpu: u8, saved_khz: u32, host: String, source: kvm_ioctls::Error },
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
}

/// What this host's KVM offers that decides how vCPU state is saved and restored.
#[derive(Clone, Debug)]
pub struct HostVcpuCaps {
    /// KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores.
    pub msr_indices: Vec<u32>,
    /// KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM: bytes of XSAVE state KVM_GET_XSAVE2
    /// returns and KVM_SET_XSAVE reads (0 when the capability is absent).
    pub xsave_size: usize,
}

impl HostVcpuCaps {
    pub fn query(kvm: &Kvm, vm: &VmFd) -> Result<HostVcpuCaps, StateError> {
        let msr_indices = cpu::msr::index_list(kvm)?;
        let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        if xsave_size > XSAVE_MAX_SIZE {
            return Err(StateError::Invalid {
                vcpu: 0,
                reason: format!(
                    "KVM reports an XSAVE area of {xsave_size} bytes, more than the {XSAVE_MAX_SIZE} supported"
                ),
            });
        }
        Ok(HostVcpuCaps { msr_indices, xsave_size })
    }

    /// u32 words of XSAVE state past the legacy 4096 bytes on this host.
    pub fn xsave_extra_words(&self) -> usize {
        self.xsave_size.saturating_sub(XSAVE_LEGACY_SIZE).div_ceil(4)
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The first 4096 bytes of the XSAVE area.
    pub xsave: kvm_xsave,
    /// The XSAVE area past its first 4096 bytes, in u32 words (KVM_GET_XSAVE2); empty when
    /// the host's KVM_CAP_XSAVE2 size is 4096 or less.
    #[serde(default)]
    pub xsave_extra: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency (KVM_GET_TSC_KHZ); None in older snapshots, or when the host
    /// could not tell (an unstable TSC).
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// The VM-wide in-kernel device state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// MSRs read per KVM_GET_MSRS call.
const MSR_BATCH: usize = 64;

/// Reads every MSR in `indices` that the vCPU can return.
fn read_msrs(vcpu: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    for batch in indices.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Invalid { vcpu: id, reason: format!("MSR list: {e:?}") })?;
        let n =
            vcpu.get_msrs(&mut msrs).map_err(|source| StateError::Vcpu { vcpu: id, what: "KVM_GET_MSRS", source })?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: read the rest one by one, skipping it.
        for &index in batch.iter().skip(n + 1) {
            let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
                .map_err(|e| StateError::Invalid { vcpu: id, reason: format!("MSR list: {e:?}") })?;
            if vcpu.get_msrs(&mut one).map_err(|source| StateError::Vcpu { vcpu: id, what: "KVM_GET_MSRS", source })?
                == 1
            {
                out.push(one.as_slice()[0]);
            }
        }
    }
    Ok(out)
}

/// Writes `entries`, every one of which KVM must accept.
fn write_msrs(vcpu: &VcpuFd, id: u8, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    for batch in entries.chunks(MSR_BATCH) {
        let msrs = Msrs::from_entries(batch)
            .map_err(|err| StateError::Invalid { vcpu: id, reason: format!("MSR list: {err:?}") })?;
        let n = vcpu.set_msrs(&msrs).map_err(|source| StateError::Vcpu { vcpu: id, what: "KVM_SET_MSRS", source })?;
        if n != batch.len() {
            return Err(StateError::Invalid {
                vcpu: id,
                reason: format!("KVM refused MSR {:#x} (value {:#x})", batch[n].index, batch[n].data),
            });
        }
    }
    Ok(())
}

/// Saves a paused vCPU.
pub fn save_vcpu(vcpu: &VcpuFd, id: u8, caps: &HostVcpuCaps) -> Result<VcpuState, StateError> {
    let e = |what| move |source| StateError::Vcpu { vcpu: id, what, source };
    let mp_state = vcpu.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let tsc_khz = match vcpu.get_tsc_khz() {
        Ok(khz) if khz > 0 => Some(khz),
        Ok(_) => None,
        Err(err) => {
            tracing::warn!("vCPU {id}: KVM_GET_TSC_KHZ: {err}; the snapshot records no TSC frequency");
            None
        }
    };
    let regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let (xsave, xsave_extra) = read_xsave(vcpu, id, caps)?;
    let xcrs = vcpu.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
    let msrs = read_msrs(vcpu, id, &caps.msr_indices)?;
    let debug_regs = vcpu.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let events = vcpu.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState { id, mp_state, regs, sregs, xsave, xsave_extra, xcrs, msrs, debug_regs, lapic, events, tsc_khz })
}

/// Restores a vCPU that has not run yet (its CPUID already set), in the order the module
/// documentation gives. MSRs not in this host's list are refused by name rather than silently
/// dropped, and everything is checked before the first ioctl.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState, caps: &HostVcpuCaps) -> Result<(), StateError> {
    let id = state.id;
    let msr_indices = &caps.msr_indices;
    if state.msrs.len() > msr_indices.len() {
        return Err(StateError::Invalid {
            vcpu: id,
            reason: format!("snapshot holds {} MSRs, this host's KVM knows {}", state.msrs.len(), msr_indices.len()),
        });
    }
    if let Some(m) = state.msrs.iter().find(|m| !msr_indices.contains(&m.index)) {
        return Err(StateError::Invalid {
            vcpu: id,
            reason: format!("MSR {:#x} is not supported by this host's KVM", m.index),
        });
    }
    let xsave_words = xsave_restore_words(state.xsave_extra.len(), caps)
        .map_err(|reason| StateError::Invalid { vcpu: id, reason })?;
    let e = |what| move |source| StateError::Vcpu { vcpu: id, what, source };

    if let Some(saved_khz) = state.tsc_khz {
        vcpu.set_tsc_khz(saved_khz).map_err(|source| StateError::TscKhz {
            vcpu: id,
            saved_khz,
            host: vcpu.get_tsc_khz().map_or_else(|e| format!("unknown, {e}"), |k| format!("{k} kHz")),
            source,
        })?;
    }
    vcpu.set_sregs(&state.sregs).map_err(e("KVM_SET_SREGS"))?;
    vcpu.set_regs(&state.regs).map_err(e("KVM_SET_REGS"))?;
    write_xsave(vcpu, state, xsave_words)?;
    vcpu.set_xcrs(&state.xcrs).map_err(e("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs).map_err(e("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic).map_err(e("KVM_SET_LAPIC"))?;
    let (deadline, msrs): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) =
        state.msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    write_msrs(vcpu, id, &msrs)?;
    write_msrs(vcpu, id, &deadline)?;
    vcpu.set_vcpu_events(&state.events).map_err(e("KVM_SET_VCPU_EVENTS"))?;
    vcpu.set_mp_state(state.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    Ok(())
}

fn get_chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(|source| StateError::Vm { what, source })?;
    Ok(chip)
}

/// Saves the in-kernel PIC, IOAPIC, PIT and kvmclock.
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, StateError> {
    Ok(VmKvmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: vm.get_pit2().map_err(|source| StateError::Vm { what: "KVM_GET_PIT2", source })?,
        clock: vm.get_clock().map_err(|source| StateError::Vm { what: "KVM_GET_CLOCK", source })?,
    })
}

/// Restores the in-kernel devices; chip ids in the snapshot must match their slots.
pub fn restore_vm(vm: &VmFd, s: &VmKvmState) -> Result<(), StateError> {
    for (chip, id, what) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER, "KVM_SET_IRQCHIP (PIC master)"),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "KVM_SET_IRQCHIP (PIC slave)"),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC, "KVM_SET_IRQCHIP (IOAPIC)"),
    ] {
        if chip.chip_id != id {
            return Err(StateError::Invalid {
                vcpu: 0,
                reason: format!("{what}: chip id {} where {id} belongs", chip.chip_id),
            });
        }
        vm.set_irqchip(chip).map_err(|source| StateError::Vm { what, source })?;
    }
    vm.set_pit2(&s.pit).map_err(|source| StateError::Vm { what: "KVM_SET_PIT2", source })?;
    // Only the clock value is restored; flags such as KVM_CLOCK_TSC_STABLE are the host's.
    let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(|source| StateError::Vm { what: "KVM_SET_CLOCK", source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate::snapshot::format::{from_cbor, to_cbor};

    /// The vCPU fragment as snapvisor wrote it before `tsc_khz` and `xsave_extra` existed.
    #[derive(Serialize)]
    struct VcpuStateV1 {
        id: u8,
        mp_state: kvm_mp_state,
        regs: kvm_regs,
        sregs: kvm_sregs,
        xsave: kvm_xsave,
        xcrs: kvm_xcrs,
        msrs: Vec<kvm_msr_entry>,
        debug_regs: kvm_debugregs,
        lapic: kvm_lapic_state,
        events: kvm_vcpu_events,
    }

    #[test]
    fn vcpu_fragments_without_tsc_khz_or_xsave2_still_load() {
        let old = VcpuStateV1 {
            id: 3,
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs { rip: 0x10_0000, ..Default::default() },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            msrs: vec![kvm_msr_entry { index: MSR_IA32_TSC_DEADLINE, data: 42, ..Default::default() }],
            debug_regs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            events: kvm_vcpu_events::default(),
        };
        let bytes = to_cbor(&old).expect("encode");
        let state: VcpuState = from_cbor(&bytes, "vcpu/3").expect("an older fragment decodes");
        assert_eq!((state.id, state.regs.rip, state.msrs[0].data), (3, 0x10_0000, 42));
        assert_eq!(state.tsc_khz, None, "no TSC frequency to set");
        assert!(state.xsave_extra.is_empty(), "the legacy XSAVE area");
    }
}
