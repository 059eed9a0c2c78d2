//! The PC platform firmware needs, put on the machine's buses: the CMOS/RTC (0x70), the
//! i8042 (0x60, 0x64) with system control port A (0x92), the ACPI PM block (PM1a event and
//! control, PM timer, GPE0; its SCI on ISA IRQ 9), and PCI bus 0 behind configuration
//! mechanism #1 (0xcf8..0xcff) with the i440FX host bridge at 00:00.0.
//!
//! Interrupt lines go to the in-kernel irqchip through KVM_IRQ_LINE ([`KvmIrqLine`]). A guest
//! reset (i8042 0xfe, port 0x92, 0xcf9) goes to [`VmControl::request_reset`]: firmware VMs
//! reset in place (`crate::reset`), others end with [`ExitReason::Reset`]; ACPI S5 ends the VM
//! with [`ExitReason::PowerOff`]. PCI BARs are placed on the port and MMIO buses through
//! [`MachineBarMapper`], which records them with the machine's other devices, so a BAR served
//! by a device without a snapshot fragment fails snapshots by name like any other device.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use devices::bus::{Bus, BusDevice};
use devices::cmos::{Cmos, CmosConfig};
use devices::i8042::{self, I8042};
use devices::irq::IrqLine;
use devices::pci::{self, BarMapper, HostBridge, IoEvent, PciBus, PciConfigIo, PciWindows};
use devices::pm::{self, Pm, PmPorts};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};

use crate::control::{ExitReason, VmControl};
use crate::layout;
use crate::machine::{BusKind, MachineError, Placed};
use crate::memory::pc_ram_layout;

/// Start of the I/O window PCI BARs may use (below it: legacy ISA ports).
pub const PCI_IO_WINDOW_START: u64 = 0x1000;
/// End (exclusive) of the 64-bit PCI memory window.
pub const PCI_MMIO64_END: u64 = 1 << 40;

/// The platform devices, shared with whoever needs them after assembly.
pub struct Platform {
    pub cmos: Arc<Mutex<Cmos>>,
    pub i8042: Arc<Mutex<I8042>>,
    /// The ACPI PM block (`raise_gpe` notifies the guest's ACPI, e.g. for VMGenID).
    pub pm: Arc<Mutex<Pm>>,
    /// The configuration ports, which own the bus's saved state.
    pub pci_config: Arc<Mutex<PciConfigIo>>,
    /// PCI bus 0: add functions here (`PciBus::add`).
    pub pci_bus: Arc<Mutex<PciBus>>,
}

/// An ISA/GSI interrupt line of the in-kernel irqchip, driven with KVM_IRQ_LINE.
pub struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmIrqLine {
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        KvmIrqLine { vm, gsi }
    }
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, level: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, level) {
            tracing::warn!("KVM_IRQ_LINE on GSI {} to {}: {e}", self.gsi, u8::from(level));
        }
    }
}

/// The machine's record of placed devices.
type PlacedList = Arc<Mutex<Vec<Placed>>>;

/// Places PCI BARs on the machine's buses and records them as placed devices.
///
/// It holds the buses and the placed list weakly: the PCI bus owns the mapper, and the buses
/// hold the PCI config ports, which hold the PCI bus; strong references would make a cycle that
/// keeps every device (and guest RAM through fw_cfg) alive after the VM is gone.
pub struct MachineBarMapper {
    pio: Weak<Bus>,
    mmio: Weak<Bus>,
    placed: Weak<Mutex<Vec<Placed>>>,
    /// For KVM_IOEVENTFD (the VM fd holds nothing of the machine: no cycle).
    vm: Arc<VmFd>,
    /// Set once KVM refused an ioeventfd, so that is logged once per VM.
    ioevent_refused: std::sync::atomic::AtomicBool,
}

fn ioevent_address(space: pci::BarSpace, addr: u64) -> IoEventAddress {
    match space {
        pci::BarSpace::Pio => IoEventAddress::Pio(addr),
        pci::BarSpace::Mmio => IoEventAddress::Mmio(addr),
    }
}

/// KVM_IOEVENTFD (de)assignment for `ev` at `addr`. kvm-ioctls takes the access length from
/// the datamatch value's type: no datamatch matches a write of any length.
fn ioeventfd(vm: &VmFd, space: pci::BarSpace, addr: u64, ev: &IoEvent, assign: bool) -> Result<(), String> {
    let a = ioevent_address(space, addr);
    let fd = &ev.fd;
    let r = match (ev.datamatch, ev.len) {
        (None, _) if assign => vm.register_ioevent(fd, &a, NoDatamatch),
        (None, _) => vm.unregister_ioevent(fd, &a, NoDatamatch),
        (Some(v), 1) if assign => vm.register_ioevent(fd, &a, v as u8),
        (Some(v), 1) => vm.unregister_ioevent(fd, &a, v as u8),
        (Some(v), 2) if assign => vm.register_ioevent(fd, &a, v as u16),
        (Some(v), 2) => vm.unregister_ioevent(fd, &a, v as u16),
        (Some(v), 4) if assign => vm.register_ioevent(fd, &a, v as u32),
        (Some(v), 4) => vm.unregister_ioevent(fd, &a, v as u32),
        (Some(v), 8) if assign => vm.register_ioevent(fd, &a, v),
        (Some(v), 8) => vm.unregister_ioevent(fd, &a, v),
        (Some(_), len) => return Err(format!("a datamatch needs a length of 1, 2, 4 or 8 bytes, not {len}")),
    };
    r.map_err(|e| format!("KVM_IOEVENTFD at {addr:#x}: {e}"))
}

impl MachineBarMapper {
    fn parts(&self, space: pci::BarSpace) -> Option<(Arc<Bus>, BusKind, PlacedList)> {
        let (bus, kind) = match space {
            pci::BarSpace::Pio => (&self.pio, BusKind::Pio),
            pci::BarSpace::Mmio => (&self.mmio, BusKind::Mmio),
        };
        Some((bus.upgrade()?, kind, self.placed.upgrade()?))
    }
}

impl BarMapper for MachineBarMapper {
    fn map(&self, name: &'static str, r: pci::BarRegion, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), String> {
        let (bus, kind, placed) = self.parts(r.space).ok_or("the machine is going away")?;
        let mut placed = placed.lock().unwrap_or_else(PoisonError::into_inner);
        bus.insert(device.clone(), r.addr, r.len).map_err(|e| e.to_string())?;
        placed.push(Placed { name, bus: kind, addr: r.addr, device });
        Ok(())
    }

    fn unmap(&self, r: pci::BarRegion) {
        let Some((bus, kind, placed)) = self.parts(r.space) else { return };
        let mut placed = placed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = bus.remove(r.addr) {
            tracing::warn!("unmapping PCI BAR at {r}: {e}");
        }
        placed.retain(|p| !(p.bus == kind && p.addr == r.addr));
    }

    fn map_ioevent(&self, space: pci::BarSpace, addr: u64, ev: &IoEvent) -> Result<(), String> {
        let r = ioeventfd(&self.vm, space, addr, ev, true);
        if let Err(e) = &r {
            if !self.ioevent_refused.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("{e}; queue notifications take the MMIO exit path on this VM");
            }
        }
        r
    }

    fn unmap_ioevent(&self, space: pci::BarSpace, addr: u64, ev: &IoEvent) {
        if let Err(e) = ioeventfd(&self.vm, space, addr, ev, false) {
            tracing::warn!("removing an ioeventfd: {e}");
        }
    }
}

/// Where PCI BARs may go on a machine with `mem_bytes` of RAM: the 32-bit window runs from
/// the end of RAM below 4 GiB (as QEMU's i440FX PCI hole does; SeaBIOS allocates from
/// 0x80000000 or the end of low RAM, downwards from the IOAPIC) to the IOAPIC, the 64-bit one
/// from the first GiB boundary above RAM to [`PCI_MMIO64_END`].
pub fn pci_windows(mem_bytes: u64) -> PciWindows {
    let parts = pc_ram_layout(mem_bytes);
    let low_end = parts.iter().filter(|p| p.gpa < layout::HIGH_RAM_START).map(|p| p.gpa + p.len).max().unwrap_or(0);
    let ram_end = parts.last().map_or(0, |p| p.gpa + p.len);
    let mmio64_start = ram_end.max(layout::HIGH_RAM_START).next_multiple_of(1 << 30);
    PciWindows {
        io: (PCI_IO_WINDOW_START, 0x1_0000),
        mmio32: (low_end.min(layout::PCI_MMIO32_START), layout::PCI_MMIO32_END),
        mmio64: (mmio64_start, PCI_MMIO64_END),
    }
}

/// Creates the platform devices and puts them on the buses, recording them in `placed`.
pub fn attach(
    vm: &Arc<VmFd>,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    placed: &Arc<Mutex<Vec<Placed>>>,
    control: &Arc<VmControl>,
    mem_bytes: u64,
    vcpus: u8,
) -> Result<Platform, MachineError> {
    let reset_cb = |what: &'static str| {
        let ctl = control.clone();
        Arc::new(move || ctl.request_reset(format!("the guest reset the machine ({what})")))
    };
    let place = |name: &'static str, device: Arc<Mutex<dyn BusDevice>>, addr: u64, len: u64| {
        pio.insert(device.clone(), addr, len).map_err(|e| MachineError::Bus {
            device: name,
            addr,
            reason: e.to_string(),
        })?;
        placed.lock().unwrap_or_else(PoisonError::into_inner).push(Placed { name, bus: BusKind::Pio, addr, device });
        Ok::<(), MachineError>(())
    };

    let parts = pc_ram_layout(mem_bytes);
    let below_4g = parts.iter().filter(|p| p.gpa < layout::HIGH_RAM_START).map(|p| p.len).sum();
    let above_4g = parts.iter().filter(|p| p.gpa >= layout::HIGH_RAM_START).map(|p| p.len).sum();
    let cmos = Arc::new(Mutex::new(Cmos::new(CmosConfig { below_4g, above_4g, vcpus })));
    place("CMOS", cmos.clone(), u64::from(layout::CMOS_PORT), devices::cmos::LEN)?;

    let kbd = Arc::new(Mutex::new(I8042::new(reset_cb("i8042"))));
    place("i8042", kbd.clone(), i8042::DATA_PORT, 1)?;
    place("i8042", kbd.clone(), i8042::STATUS_PORT, 1)?;
    place("i8042", kbd.clone(), i8042::PORT_A, 1)?;

    let ports = PmPorts {
        pm1a_evt: u64::from(layout::ACPI_PM1A_EVT),
        pm1a_cnt: u64::from(layout::ACPI_PM1A_CNT),
        pm_tmr: u64::from(layout::ACPI_PM_TMR),
        gpe0: u64::from(layout::ACPI_GPE0),
    };
    let ctl = control.clone();
    let sci = Arc::new(KvmIrqLine::new(vm.clone(), layout::ACPI_SCI_IRQ));
    let pm = Arc::new(Mutex::new(Pm::new(ports, sci, Arc::new(move || ctl.stop(ExitReason::PowerOff)))));
    place("ACPI PM", pm.clone(), ports.pm1a_evt, pm::PM1_EVT_LEN)?;
    place("ACPI PM", pm.clone(), ports.pm1a_cnt, pm::PM1_CNT_LEN)?;
    place("ACPI PM", pm.clone(), ports.pm_tmr, pm::PM_TMR_LEN)?;
    place("ACPI PM", pm.clone(), ports.gpe0, u64::from(layout::ACPI_GPE0_LEN))?;

    let mapper = Arc::new(MachineBarMapper {
        pio: Arc::downgrade(pio),
        mmio: Arc::downgrade(mmio),
        placed: Arc::downgrade(placed),
        vm: vm.clone(),
        ioevent_refused: std::sync::atomic::AtomicBool::new(false),
    });
    let mut bus = PciBus::new(pci_windows(mem_bytes), mapper);
    bus.add(pci::Bdf::new(0, 0), Arc::new(Mutex::new(HostBridge::new()))).map_err(|e| MachineError::Bus {
        device: "i440FX host bridge",
        addr: 0,
        reason: e.to_string(),
    })?;
    let pci_bus = Arc::new(Mutex::new(bus));
    let pci_config = Arc::new(Mutex::new(PciConfigIo::new(pci_bus.clone(), reset_cb("port 0xcf9"))));
    place("PCI config", pci_config.clone(), u64::from(layout::PCI_CONFIG_PORT), pci::config_io::LEN)?;

    Ok(Platform { cmos, i8042: kbd, pm, pci_config, pci_bus })
}
