//! Guest resets of firmware VMs: the machine goes back to its power-on state in place and the
//! firmware runs again, as on a PC (QEMU's system reset). A VM without firmware has nothing to
//! start again from, so a reset ends it instead (`ExitReason::Reset`).
//!
//! The power-on state is recorded when the VM is built, before anything runs: every vCPU's
//! KVM state (saved with the snapshot code, so a reset writes it back in the same order a
//! restore does), the in-kernel PIC, IOAPIC and PIT, and every device's state fragment. A
//! reset, run by [`crate::control::VmControl::request_reset`] with every vCPU parked, writes
//! them back, copies the firmware's last 128 KiB to 0xe0000 again (SeaBIOS takes an
//! untouched low copy as "not yet initialised" and runs its whole POST), and clears the ACPI
//! blobs' `patched` flag with the rest of the device state, so tables are rebuilt on the
//! firmware's next select.
//!
//! What a reset keeps: guest RAM (as on real hardware), the KVM clock and the TSC (they keep
//! counting; the saved TSC MSR is not written back), the CMOS (battery-backed: its clock offset
//! and NVRAM survive), the VM generation ID (its GUID; the address the firmware reported is
//! forgotten until it reports it again) and what has been written to the consoles.
//!
//! The handler holds only weak references to the VM's parts, so it never keeps a dropped VM
//! alive; a reset racing with the VM going away fails quietly.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use kvm_bindings::{kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::{VcpuFd, VmFd};
use migrate::ram::{GuestMemory, RamBlock};

use crate::boot::firmware;
use crate::control::ResetHandler;
use crate::machine::Devices;
use crate::snapshot::devices::persistables;
use crate::snapshot::vcpu_state::{restore_vcpu, save_vcpu, HostVcpuCaps, VcpuState};

/// Device fragments a reset leaves alone (see the module documentation).
const KEPT: [&str; 3] = ["dev/cmos", "dev/vmgenid", "dev/debugcon"];
/// The TSC MSR: the TSC keeps counting across a reset.
const MSR_IA32_TSC: u32 = 0x10;

/// The machine as it was at power-on.
struct PowerOn {
    vcpus: Vec<VcpuState>,
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    devices: Vec<(String, Vec<u8>)>,
}

/// What a reset works on.
pub struct ResetParts<'a> {
    pub vm: &'a Arc<VmFd>,
    pub vcpus: &'a [Arc<Mutex<VcpuFd>>],
    pub caps: HostVcpuCaps,
    pub devices: &'a Arc<Devices>,
    /// `pc.bios`, whose last 128 KiB are copied to 0xe0000 again.
    pub firmware: Arc<RamBlock>,
    pub memory: GuestMemory,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records the power-on state (call before any vCPU has run) and returns the handler that
/// brings the machine back to it.
pub fn handler(parts: ResetParts<'_>) -> Result<ResetHandler, String> {
    let mut vcpus = Vec::with_capacity(parts.vcpus.len());
    for (i, fd) in parts.vcpus.iter().enumerate() {
        let id = u8::try_from(i).map_err(|_| format!("vCPU index {i}"))?;
        let mut state = save_vcpu(&lock(fd), id, &parts.caps).map_err(|e| e.to_string())?;
        state.msrs.retain(|m| m.index != MSR_IA32_TSC);
        vcpus.push(state);
    }
    let mut chips = Vec::new();
    for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        parts.vm.get_irqchip(&mut chip).map_err(|e| format!("KVM_GET_IRQCHIP {chip_id}: {e}"))?;
        chips.push(chip);
    }
    let pit = parts.vm.get_pit2().map_err(|e| format!("KVM_GET_PIT2: {e}"))?;
    let mut devices = Vec::new();
    for p in persistables(parts.devices) {
        let name = p.persist_name();
        if !KEPT.contains(&name.as_str()) {
            devices.push((name, p.save_state().map_err(|e| e.to_string())?));
        }
    }
    let power_on = PowerOn { vcpus, chips, pit, devices };

    let vm = Arc::downgrade(parts.vm);
    let vcpu_fds: Vec<Weak<Mutex<VcpuFd>>> = parts.vcpus.iter().map(Arc::downgrade).collect();
    let devs = Arc::downgrade(parts.devices);
    let (caps, fw, memory) = (parts.caps, Arc::downgrade(&parts.firmware), parts.memory);
    Ok(Arc::new(move || {
        let gone = || "the VM is going away".to_string();
        let vm = vm.upgrade().ok_or_else(gone)?;
        let devices = devs.upgrade().ok_or_else(gone)?;
        let fw = fw.upgrade().ok_or_else(gone)?;
        for chip in &power_on.chips {
            vm.set_irqchip(chip).map_err(|e| format!("KVM_SET_IRQCHIP {}: {e}", chip.chip_id))?;
        }
        vm.set_pit2(&power_on.pit).map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
        for (fd, state) in vcpu_fds.iter().zip(&power_on.vcpus) {
            let fd = fd.upgrade().ok_or_else(gone)?;
            restore_vcpu(&lock(&fd), state, &caps).map_err(|e| e.to_string())?;
        }
        for mut p in persistables(&devices) {
            let name = p.persist_name();
            if let Some((_, bytes)) = power_on.devices.iter().find(|(n, _)| *n == name) {
                p.restore_state(bytes).map_err(|e| e.to_string())?;
            }
        }
        // ACPI blobs rebuilt on the next select; VMGenID keeps its GUID but forgets the address
        // until the firmware reports it again (QEMU's vmgenid reset).
        crate::acpi::reset(&devices);
        let len = fw.used_length();
        let tail = len.saturating_sub(firmware::ISA_BIOS_LEN);
        let mut low = vec![0u8; (len - tail) as usize];
        fw.read(tail, &mut low).map_err(|e| format!("reading {}: {e}", firmware::PC_BIOS))?;
        memory
            .write(firmware::ISA_BIOS_BASE, &low)
            .map_err(|e| format!("copying the firmware to {:#x}: {e}", firmware::ISA_BIOS_BASE))?;
        Ok(())
    }))
}
