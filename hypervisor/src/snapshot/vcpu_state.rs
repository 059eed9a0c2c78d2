//! The saved state of a vCPU and of the VM's in-kernel devices (PIC, IOAPIC, PIT, kvmclock).
//!
//! Saved with the vCPU out of `KVM_RUN` (paused). The kvm-bindings structures carry their own
//! serde encoding (their bytes); the kernel validates register contents when they are set, and
//! this module validates what the kernel cannot: the MSR list against the host's, and the
//! number of entries.
//!
//! Order on save: MP state first (reading other state can change it), events last. Order on
//! restore: CPUID, MP state, registers, special registers, FPU/XSAVE, XCRs, MSRs, debug
//! registers, LAPIC, events — the order in which KVM expects dependent state.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors saving or restoring KVM state.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("{what} on vCPU {vcpu}: {source}")]
    Vcpu { vcpu: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("{what}: {source}")]
    Vm { what: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {vcpu}: {reason}")]
    Invalid { vcpu: u8, reason: String },
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
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

/// Saves a paused vCPU. `msr_indices` is the host's KVM_GET_MSR_INDEX_LIST.
pub fn save_vcpu(vcpu: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    let e = |what| move |source| StateError::Vcpu { vcpu: id, what, source };
    let mp_state = vcpu.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
    let msrs = read_msrs(vcpu, id, msr_indices)?;
    let debug_regs = vcpu.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let events = vcpu.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState { id, mp_state, regs, sregs, xsave, xcrs, msrs, debug_regs, lapic, events })
}

/// Restores a vCPU that has not run yet (its CPUID already set). MSRs not in this host's
/// `msr_indices` are refused by name rather than silently dropped.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState, msr_indices: &[u32]) -> Result<(), StateError> {
    let id = state.id;
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
    let e = |what| move |source| StateError::Vcpu { vcpu: id, what, source };
    vcpu.set_mp_state(state.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(e("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs).map_err(e("KVM_SET_SREGS"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (4096 bytes plus its zero-length tail);
    // KVM_SET_XSAVE reads only that much unless the VM enabled a larger XSAVE size
    // (KVM_CAP_XSAVE2), which snapvisor never does.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(e("KVM_SET_XCRS"))?;
    for batch in state.msrs.chunks(MSR_BATCH) {
        let msrs = Msrs::from_entries(batch)
            .map_err(|err| StateError::Invalid { vcpu: id, reason: format!("MSR list: {err:?}") })?;
        let n = vcpu.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
        if n != batch.len() {
            return Err(StateError::Invalid {
                vcpu: id,
                reason: format!("KVM refused MSR {:#x} (value {:#x})", batch[n].index, batch[n].data),
            });
        }
    }
    vcpu.set_debug_regs(&state.debug_regs).map_err(e("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic).map_err(e("KVM_SET_LAPIC"))?;
    vcpu.set_vcpu_events(&state.events).map_err(e("KVM_SET_VCPU_EVENTS"))?;
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
