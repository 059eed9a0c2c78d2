//! The PC's devices and their wiring: COM1 on port 0x3f8 (and its MMIO alias) raising IRQ 4
//! through an irqfd, the exit device on port 0x501 (and its MMIO alias), the debug console on
//! port 0x402, fw_cfg with the items firmware and built-in guests read, and the PC platform
//! firmware needs (`crate::platform`: CMOS, i8042, ACPI PM, the PCI bus).
//!
//! Every device put on a bus is recorded as [`Placed`] (name, bus, address, the device
//! itself), whether at machine assembly or later through [`Devices::place`]: a snapshot checks
//! that each of them has a state fragment (`snapshot::devices`), so a device added without
//! one fails the snapshot by name instead of silently losing its state.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use devices::bus::{Bus, BusDevice};
use devices::debugcon::Debugcon;
use devices::exit::ExitDevice;
use devices::fw_cfg::{self, FwCfg};
use devices::serial::SerialDevice;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use migrate::ram::{RamBlockConfig, RamRegistry};

use crate::control::{ExitReason, VmControl};
use crate::layout;
use crate::memory::GuestRam;

/// Errors wiring devices.
#[derive(Debug, Error)]
pub enum MachineError {
    #[error("placing {device} at {addr:#x}: {reason}")]
    Bus { device: &'static str, addr: u64, reason: String },
    #[error("creating the interrupt eventfd for {device}: {source}")]
    EventFd { device: &'static str, source: std::io::Error },
    #[error("KVM_IRQFD for {device} on GSI {gsi}: {source}")]
    Irqfd { device: &'static str, gsi: u32, source: kvm_ioctls::Error },
    #[error("fw_cfg item {item}: {reason}")]
    FwCfg { item: String, reason: String },
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("fw_cfg file {name}: {reason}")]
    File { name: String, reason: String },
}

/// The RAM block holding fw_cfg file `name`.
pub fn fw_cfg_file_block(name: &str) -> String {
    format!("/rom@{name}")
}

/// Largest fw_cfg file a VM is given (a restore cuts a snapshot's file sizes here too).
pub const MAX_FW_CFG_FILE: u64 = 64 << 20;

/// Room reserved for a fw_cfg file of `len` bytes to grow into on a later restore: the power
/// of two at or above it, at least 64 KiB.
pub fn fw_cfg_file_max(len: u64) -> u64 {
    len.max(1).next_power_of_two().max(64 * 1024)
}

/// Offers `files` through fw_cfg, each in its own resizeable RAM block.
pub fn add_fw_cfg_files(
    devices: &Devices,
    registry: &RamRegistry,
    files: &[crate::vm::FwCfgFile],
) -> Result<(), MachineError> {
    for f in files {
        let err = |reason: String| MachineError::File { name: f.name.clone(), reason };
        if f.data.is_empty() {
            return Err(err("is empty".into()));
        }
        let len = f.data.len() as u64;
        let block = registry
            .add(RamBlockConfig {
                idstr: fw_cfg_file_block(&f.name),
                size: len,
                max_size: fw_cfg_file_max(len),
                page_size: 0,
                resizeable: true,
            })
            .map_err(|e| err(e.to_string()))?;
        block.write(0, &f.data).map_err(|e| err(e.to_string()))?;
        devices
            .fw_cfg
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add_ram_block_file(&f.name, block)
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// Which of the machine's buses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusKind {
    Pio,
    Mmio,
}

impl std::fmt::Display for BusKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BusKind::Pio => "port",
            BusKind::Mmio => "MMIO",
        })
    }
}

/// A device as placed on a bus.
#[derive(Clone)]
pub struct Placed {
    pub name: &'static str,
    pub bus: BusKind,
    pub addr: u64,
    pub device: Arc<Mutex<dyn BusDevice>>,
}

impl Placed {
    /// The device's identity: the address of its shared state, the same for every `Arc` of it.
    pub fn identity(&self) -> usize {
        device_identity(&self.device)
    }
}

/// The identity of a shared device (see [`Placed::identity`]).
pub fn device_identity<T: ?Sized>(device: &Arc<Mutex<T>>) -> usize {
    Arc::as_ptr(device) as *const () as usize
}

/// The devices of a VM.
pub struct Devices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub fw_cfg: Arc<Mutex<FwCfg>>,
    pub exit: Arc<Mutex<ExitDevice>>,
    pub debugcon: Arc<Mutex<Debugcon>>,
    /// COM1's interrupt, registered as an irqfd on GSI 4.
    pub serial_irq: EventFd,
    /// The exit device's go flag (see `devices::exit`).
    pub go: Arc<devices::exit::Go>,
    /// CMOS, i8042, ACPI PM and the PCI bus.
    pub platform: crate::platform::Platform,
    /// Every device on the buses, in the order placed (PCI BARs come and go with the guest's
    /// placements).
    placed: Arc<Mutex<Vec<Placed>>>,
    /// ACPI blobs and VMGenID (firmware VMs; `crate::acpi::attach`). Not on a bus; their
    /// fragments are `dev/acpi` and `dev/vmgenid`.
    pub acpi: Option<Arc<devices::acpi::runtime::AcpiRuntime>>,
    pub vmgenid: Option<Arc<devices::acpi::vmgenid::VmGenId>>,
    /// The VM's GSI routing table (IOAPIC/PIC defaults plus MSI routes).
    pub irq_router: Arc<crate::irq_routes::GsiRouter>,
    /// virtio-net functions on the PCI bus, NIC i at `net::nic_bdf(i)`; their fragments are
    /// `dev/virtio-net/<bdf>`.
    pub nics: Vec<crate::net::nic::Nic>,
}

impl Devices {
    /// Puts `device` on `bus` at `addr..addr+len` and records it.
    pub fn place(
        &self,
        bus: &Bus,
        kind: BusKind,
        name: &'static str,
        device: Arc<Mutex<dyn BusDevice>>,
        addr: u64,
        len: u64,
    ) -> Result<(), MachineError> {
        let mut placed = self.placed.lock().unwrap_or_else(PoisonError::into_inner);
        insert(&mut placed, bus, kind, name, device, addr, len)
    }

    /// Every device on the buses.
    pub fn placed(&self) -> Vec<Placed> {
        self.placed.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

fn insert(
    placed: &mut Vec<Placed>,
    bus: &Bus,
    kind: BusKind,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
    addr: u64,
    len: u64,
) -> Result<(), MachineError> {
    bus.insert(device.clone(), addr, len).map_err(|e| MachineError::Bus {
        device: name,
        addr,
        reason: e.to_string(),
    })?;
    placed.push(Placed { name, bus: kind, addr, device });
    Ok(())
}

/// fw_cfg `etc/boot-fail-wait`: milliseconds SeaBIOS waits after "No bootable device"
/// before it reboots (its default is 60 s).
pub const BOOT_FAIL_WAIT_MS: u32 = 1000;

/// Where the devices that print write to.
pub struct Outputs {
    /// COM1.
    pub serial: Box<dyn Write + Send>,
    /// The debug console on port 0x402; none drops its bytes.
    pub debugcon: Option<Box<dyn Write + Send>>,
}

/// Creates the devices and puts them on the buses.
pub fn attach_devices(
    vm: &Arc<VmFd>,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    ram: &GuestRam,
    control: &Arc<VmControl>,
    vcpus: u8,
    out: Outputs,
) -> Result<Devices, MachineError> {
    let Outputs { serial: serial_out, debugcon: debugcon_out } = out;
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|source| MachineError::EventFd { device: "serial", source })?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ).map_err(|source| MachineError::Irqfd {
        device: "serial",
        gsi: layout::SERIAL_IRQ,
        source,
    })?;
    let irq = serial_irq.try_clone().map_err(|source| MachineError::EventFd { device: "serial", source })?;
    let mut placed = Vec::new();
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, serial_out)));
    insert(&mut placed, pio, BusKind::Pio, "serial", serial.clone(), u64::from(layout::SERIAL_PORT), 8)?;
    insert(&mut placed, mmio, BusKind::Mmio, "serial", serial.clone(), layout::SERIAL_MMIO, 8)?;

    let ctl = control.clone();
    let mut exit_dev = ExitDevice::new(Arc::new(move |status| ctl.stop(ExitReason::GuestExit { status })));
    let ctl = control.clone();
    exit_dev.set_mark_callback(Arc::new(move |v| ctl.mark(v)));
    let go = exit_dev.go_flag();
    // A vCPU parked in the wait register goes back to its loop as soon as the VM is to pause
    // or stop: every kick also wakes it.
    let ctl = control.clone();
    exit_dev.set_wait_while(Arc::new(move || ctl.running()));
    let g = go.clone();
    control.on_kick(Arc::new(move || g.wake()));
    // Devices whose MSI-X is off raise the VM's interrupt line; CPL3 guests wait for it in
    // the exit device's interrupt-wait register, which kicks end like the go wait.
    let irq_router = crate::irq_routes::GsiRouter::new(vm.clone());
    let line = irq_router.line();
    exit_dev.set_irq_line(line.clone());
    control.on_kick(Arc::new(move || line.wake()));
    let exit = Arc::new(Mutex::new(exit_dev));
    let exit_len = devices::exit::LEN;
    insert(&mut placed, pio, BusKind::Pio, "exit device", exit.clone(), u64::from(layout::EXIT_PORT), exit_len)?;
    let mmio_len = devices::exit::MMIO_LEN;
    insert(&mut placed, mmio, BusKind::Mmio, "exit device", exit.clone(), layout::EXIT_MMIO, mmio_len)?;

    let mut fw = FwCfg::new(ram.device_memory().clone());
    let fw_err = |item: &str| {
        let item = item.to_string();
        move |e: fw_cfg::FwCfgError| MachineError::FwCfg { item, reason: e.to_string() }
    };
    fw.add_bytes(fw_cfg::FW_CFG_RAM_SIZE, ram.size().to_le_bytes().to_vec()).map_err(fw_err("ram size"))?;
    fw.add_bytes(fw_cfg::FW_CFG_NB_CPUS, u16::from(vcpus).to_le_bytes().to_vec()).map_err(fw_err("cpu count"))?;
    fw.add_bytes(fw_cfg::FW_CFG_MAX_CPUS, u16::from(vcpus).to_le_bytes().to_vec()).map_err(fw_err("max cpus"))?;
    let e820: Vec<fw_cfg::E820Entry> =
        ram.e820().iter().map(|e| fw_cfg::E820Entry { addr: e.addr, size: e.size, kind: e.kind }).collect();
    fw.add_file("etc/e820", fw_cfg::encode_e820(&e820)).map_err(fw_err("etc/e820"))?;
    // What SeaBIOS reads besides: no graphics (so it puts its console on COM1), no NUMA
    // nodes, no boot menu, and how long to wait before rebooting when nothing boots.
    fw.add_bytes(fw_cfg::FW_CFG_NOGRAPHIC, 1u16.to_le_bytes().to_vec()).map_err(fw_err("nographic"))?;
    fw.add_bytes(fw_cfg::FW_CFG_NUMA, 0u64.to_le_bytes().to_vec()).map_err(fw_err("numa"))?;
    fw.add_bytes(fw_cfg::FW_CFG_BOOT_MENU, 0u16.to_le_bytes().to_vec()).map_err(fw_err("boot menu"))?;
    fw.add_file("etc/boot-fail-wait", BOOT_FAIL_WAIT_MS.to_le_bytes().to_vec())
        .map_err(fw_err("etc/boot-fail-wait"))?;
    let fw_cfg = Arc::new(Mutex::new(fw));
    insert(&mut placed, pio, BusKind::Pio, "fw_cfg", fw_cfg.clone(), fw_cfg::PORT_BASE, fw_cfg::PORT_LEN)?;

    let debugcon = Arc::new(Mutex::new(Debugcon::new(debugcon_out)));
    let port = u64::from(layout::DEBUGCON_PORT);
    insert(&mut placed, pio, BusKind::Pio, "debug console", debugcon.clone(), port, devices::debugcon::LEN)?;

    let placed = Arc::new(Mutex::new(placed));
    let platform = crate::platform::attach(vm, pio, mmio, &placed, control, ram.size(), vcpus)?;
    Ok(Devices {
        serial,
        fw_cfg,
        exit,
        debugcon,
        serial_irq,
        go,
        platform,
        placed,
        acpi: None,
        vmgenid: None,
        irq_router,
        nics: Vec::new(),
    })
}

/// Offers the kernel, initrd and command line through fw_cfg as QEMU does (for firmware that
/// boots Linux itself, such as SeaBIOS's linuxboot ROM): the bzImage's real-mode setup part as
/// the setup item, the rest as the kernel item.
pub fn add_kernel_items(
    devices: &Devices,
    kernel: &crate::boot::files::BootFile,
    initrd: Option<&crate::boot::files::BootFile>,
    cmdline: &str,
) -> Result<(), MachineError> {
    let image = &kernel.data;
    // bzImage: setup_sects at 0x1f1 (0 means 4), "HdrS" at 0x202.
    let setup_len = if image.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
        let sects = image.get(0x1f1).copied().map_or(4, |s| if s == 0 { 4 } else { usize::from(s) });
        ((sects + 1) * 512).min(image.len())
    } else {
        0
    };
    let (setup, body) = image.split_at(setup_len);
    let mut fw = devices.fw_cfg.lock().unwrap_or_else(PoisonError::into_inner);
    let fw_err = |item: &str| {
        let item = item.to_string();
        move |e: fw_cfg::FwCfgError| MachineError::FwCfg { item, reason: e.to_string() }
    };
    let len32 = |n: usize| (n as u32).to_le_bytes().to_vec();
    fw.add_bytes(fw_cfg::FW_CFG_SETUP_ADDR, len32(0x1_0000)).map_err(fw_err("setup addr"))?;
    fw.add_bytes(fw_cfg::FW_CFG_SETUP_SIZE, len32(setup.len())).map_err(fw_err("setup size"))?;
    fw.add_bytes(fw_cfg::FW_CFG_SETUP_DATA, setup.to_vec()).map_err(fw_err("setup data"))?;
    fw.add_bytes(fw_cfg::FW_CFG_KERNEL_ADDR, len32(layout::HIMEM_START as usize)).map_err(fw_err("kernel addr"))?;
    fw.add_bytes(fw_cfg::FW_CFG_KERNEL_SIZE, len32(body.len())).map_err(fw_err("kernel size"))?;
    fw.add_bytes(fw_cfg::FW_CFG_KERNEL_DATA, body.to_vec()).map_err(fw_err("kernel data"))?;
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    fw.add_bytes(fw_cfg::FW_CFG_CMDLINE_ADDR, len32(0x2_0000)).map_err(fw_err("cmdline addr"))?;
    fw.add_bytes(fw_cfg::FW_CFG_CMDLINE_SIZE, len32(cmd.len())).map_err(fw_err("cmdline size"))?;
    fw.add_bytes(fw_cfg::FW_CFG_CMDLINE_DATA, cmd).map_err(fw_err("cmdline data"))?;
    if let Some(initrd) = initrd {
        let data = initrd.data.clone();
        fw.add_bytes(fw_cfg::FW_CFG_INITRD_SIZE, len32(data.len())).map_err(fw_err("initrd size"))?;
        fw.add_bytes(fw_cfg::FW_CFG_INITRD_DATA, data).map_err(fw_err("initrd data"))?;
    }
    Ok(())
}
