//! A KVM virtual machine: x86 PC with in-kernel irqchip and PIT, `pc.ram`, COM1, fw_cfg and
//! the exit device, booted into a built-in guest or a Linux kernel.
//!
//! Field order matters: vCPU threads are joined and devices dropped before guest memory,
//! which goes before the VM file descriptor.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::{Bus, BusDevice};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migrate::lazy::PageServer;
use migrate::ram::RamRegistry;
use thiserror::Error;

use crate::boot::files::BootFile;
use crate::boot::firmware;
use crate::boot::linux::{self, LinuxBootConfig, LinuxBootError};
use crate::control::{self, ExitReason, VmControl};
use crate::cpu::{self, CpuError};
use crate::guests::{self, BootInfo, Builtin, GuestError, MemfillMode, TimerMode};
use crate::layout;
use crate::machine::{self, BusKind, Devices};
use crate::memory::{self, GuestRam, MemoryError, SlotMap};
use crate::reset;
use crate::shell::{self, Shape, Shell};
use crate::snapshot::vcpu_state::HostVcpuCaps;
use crate::vcpu::Vcpu;

/// Errors creating or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("{what} failed: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("{requested} vCPUs requested: snapvisor runs 1 to {max}")]
    VcpuCount { requested: u64, max: u64 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Boot(#[from] LinuxBootError),
    #[error("setting up devices: {0}")]
    Devices(#[from] machine::MachineError),
    #[error("starting vCPU {id}: {source}")]
    Thread { id: u8, source: std::io::Error },
    #[error("{0}")]
    Signal(String),
    #[error(transparent)]
    Firmware(#[from] firmware::FirmwareError),
    #[error("recording the power-on state for resets: {0}")]
    Reset(String),
    #[error("booting from firmware needs a firmware image")]
    NoFirmware,
    #[error("the VM has already been started")]
    AlreadyStarted,
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiSetupError),
    #[error(transparent)]
    Nic(#[from] crate::net::nic::NicError),
}

/// Built-in guest parameters.
#[derive(Clone, Copy, Debug)]
pub struct BuiltinParams {
    pub seed: u64,
    pub passes: u64,
    pub mode: MemfillMode,
    /// touch: the working set is `span` bytes every `stride` bytes.
    pub stride: u64,
    pub span: u64,
    /// timer: how the LAPIC timer is armed.
    pub timer: TimerMode,
    /// netping: what it does and with which addresses.
    pub net: crate::guests::NetParams,
}

impl Default for BuiltinParams {
    /// 10% of memory in 64 KiB pieces, spread evenly; the TSC-deadline timer.
    fn default() -> Self {
        BuiltinParams {
            seed: 1,
            passes: 1,
            mode: MemfillMode::Fill,
            stride: 640 * 1024,
            span: 64 * 1024,
            timer: TimerMode::TscDeadline,
            net: crate::guests::NetParams::default(),
        }
    }
}

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum BootSource {
    Builtin {
        guest: Builtin,
        params: BuiltinParams,
    },
    /// A Linux kernel and initrd, already read (see [`crate::boot::files`]).
    Kernel {
        kernel: BootFile,
        initrd: Option<BootFile>,
        cmdline: String,
    },
    /// The firmware in [`VmConfig::firmware`], from the reset vector.
    Firmware,
    /// Nothing: memory, devices and vCPUs get their state from a snapshot.
    Restore,
}

impl BootSource {
    fn describe(&self) -> String {
        match self {
            BootSource::Builtin { guest, .. } => format!("builtin:{}", guest.name()),
            BootSource::Kernel { kernel, .. } => format!("kernel:{}", kernel.name),
            BootSource::Firmware => "firmware".into(),
            BootSource::Restore => "restore".into(),
        }
    }
}

/// A file offered to the guest through fw_cfg, held in a resizeable RAM block named
/// `/rom@<name>` (as QEMU names its fw_cfg blobs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FwCfgFile {
    pub name: String,
    pub data: Vec<u8>,
}

/// The shape of a VM, saved with its snapshots so that a restore can build it again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineSpec {
    pub mem_mib: u64,
    pub vcpus: u64,
    /// What it booted, for people: `builtin:memfill`, `kernel:/path`.
    pub guest: String,
    /// fw_cfg files: name and size.
    #[serde(default)]
    pub fw_cfg_files: Vec<(String, u64)>,
    /// The firmware image the VM booted from, if any.
    #[serde(default)]
    pub firmware: Option<FirmwareSpec>,
    /// Extra ACPI tables (`--acpi-table`), so a restore builds the same tables.
    #[serde(default)]
    pub acpi_tables: Vec<crate::acpi::AcpiTable>,
    /// The system UUID (`--uuid`, RFC 4122 byte order) a firmware VM's SMBIOS tables and fw_cfg
    /// key 0x02 carry, so a restore offers the same one; none is the nil UUID.
    #[serde(default)]
    pub uuid: Option<[u8; 16]>,
    /// The NICs, in PCI order (NIC i at `net::nic_bdf(i)`), each with the MAC it was given, so
    /// a restore rebuilds them (on the same taps unless `restore --net` says otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<crate::net::NetSpec>,
    /// A built-in guest's parameters that a VM definition gives, so that a VM restored from
    /// the snapshot and then booted afresh (the daemon's start of a stopped restored VM) runs
    /// the guest as it was defined. Snapshots taken before it was recorded have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinSpec>,
}

/// The parameters of a built-in guest that a snapshot records ([`MachineSpec::builtin`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuiltinSpec {
    pub seed: u64,
    pub passes: u64,
}

/// A VM's firmware image as its snapshots record it (the bytes are in the `pc.bios` block).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FirmwareSpec {
    pub name: String,
    pub size: u64,
}

/// How to build a VM.
pub struct VmConfig {
    pub mem_mib: u64,
    pub vcpus: u64,
    pub boot: BootSource,
    /// Where COM1's output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Where the debug console (port 0x402) writes; none drops it.
    pub debugcon_out: Option<Box<dyn Write + Send>>,
    /// Files offered through fw_cfg.
    pub fw_cfg_files: Vec<FwCfgFile>,
    /// A firmware image mapped below 4 GiB (`pc.bios`): booted from with
    /// [`BootSource::Firmware`], or given its snapshot contents by a restore.
    pub firmware: Option<BootFile>,
    /// Extra ACPI tables for a firmware VM.
    pub acpi_tables: Vec<crate::acpi::AcpiTable>,
    /// A firmware VM's system UUID (SMBIOS type 1, fw_cfg key 0x02); none is the nil UUID,
    /// as QEMU's default.
    pub uuid: Option<[u8; 16]>,
    /// NICs (virtio-net on a tap each); a NIC without a MAC gets a unique one.
    pub net: Vec<crate::net::NetSpec>,
    /// A restore: take a pre-built shell of this shape when the pool has one (shell.rs).
    /// Ignored for a VM that boots.
    pub prebuilt_shell: bool,
}

impl VmConfig {
    /// A VM with no fw_cfg files of its own.
    pub fn new(mem_mib: u64, vcpus: u64, boot: BootSource, serial_out: Box<dyn Write + Send>) -> Self {
        VmConfig {
            mem_mib,
            vcpus,
            boot,
            serial_out,
            debugcon_out: None,
            fw_cfg_files: Vec::new(),
            firmware: None,
            acpi_tables: Vec::new(),
            uuid: None,
            net: Vec::new(),
            prebuilt_shell: false,
        }
    }
}

/// How long the phases of bringing a VM up took.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// From `Vm::new` being called to the VM being ready to start.
    pub create: Duration,
}

/// A VM.
pub struct Vm {
    spec: MachineSpec,
    /// Serves lazily restored memory; dropped only after the vCPU threads are joined.
    page_server: Option<PageServer>,
    /// The snapshot this VM's memory was last equal to, for incremental snapshots.
    lineage: crate::snapshot::lineage::Lineage,
    /// RAM registered for write protection by the last background snapshot, nothing of it
    /// protected, for the next one to reuse ([`migrate::ram::wp::WpRegistration`]).
    wp_registration: Mutex<Option<migrate::ram::wp::WpRegistration>>,
    control: Arc<VmControl>,
    threads: Vec<JoinHandle<()>>,
    /// vCPUs not started yet.
    vcpus: Vec<Vcpu>,
    /// Every vCPU's file descriptor, lockable while the VM is paused or stopped.
    vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    devices: Arc<Devices>,
    ram: GuestRam,
    slots: Arc<SlotMap>,
    registry: Arc<RamRegistry>,
    fd: Arc<VmFd>,
    kvm: Kvm,
    timings: Timings,
    started: Option<Instant>,
    /// Its memory size and vCPU count: the shell a restore of it asks to be kept (shell.rs).
    shape: Shape,
}

impl Vm {
    /// Creates the VM, loads its guest and sets up its vCPUs; nothing runs yet.
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        let t0 = Instant::now();
        let size = memory::check_size(cfg.mem_mib)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let max = (kvm.get_max_vcpus() as u64).min(255);
        if cfg.vcpus == 0 || cfg.vcpus > max {
            return Err(VmError::VcpuCount { requested: cfg.vcpus, max });
        }
        let nr_vcpus = cfg.vcpus as u8;
        control::install_kick_handler().map_err(VmError::Signal)?;

        // The VM up to its devices: pre-built for a restore when the pool has one of this
        // shape (shell.rs), else built now.
        let shape = Shape { mem_bytes: size, vcpus: nr_vcpus };
        let pooled =
            if cfg.prebuilt_shell && matches!(cfg.boot, BootSource::Restore) { shell::take(shape) } else { None };
        let Shell { kvm, fd, registry, slots, ram, vcpus: vcpu_fds, .. } = match pooled {
            Some(shell) => shell,
            None => Shell::build(kvm, shape)?,
        };

        let control = Arc::new(VmControl::new(usize::from(nr_vcpus)));
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let mut devices = machine::attach_devices(
            &fd,
            &pio,
            &mmio,
            &ram,
            &control,
            nr_vcpus,
            machine::Outputs { serial: cfg.serial_out, debugcon: cfg.debugcon_out },
        )?;
        devices.platform.bar_mapper.set_slots(&slots);
        machine::add_fw_cfg_files(&devices, &registry, &cfg.fw_cfg_files)?;
        if let Some(fw) = &cfg.firmware {
            crate::acpi::attach(&mut devices, &registry, &ram, nr_vcpus, &cfg.acpi_tables)?;
            let uuid = cfg.uuid.unwrap_or_default();
            crate::acpi::attach_smbios(&devices, nr_vcpus, ram.size(), &fw.name, fw.data.len() as u64, uuid)?;
        }
        devices.nics = crate::net::nic::attach(
            &crate::net::nic::NicParts {
                pci: &devices.platform.pci_bus,
                router: &devices.irq_router,
                registry: &registry,
                mem: ram.device_memory(),
                // Firmware places BARs itself; so does a restore (from the saved config space).
                place_bars: !matches!(cfg.boot, BootSource::Firmware | BootSource::Restore),
            },
            &cfg.net,
        )?;
        let spec = MachineSpec {
            mem_mib: cfg.mem_mib,
            vcpus: cfg.vcpus,
            guest: cfg.boot.describe(),
            fw_cfg_files: cfg.fw_cfg_files.iter().map(|f| (f.name.clone(), f.data.len() as u64)).collect(),
            firmware: cfg.firmware.as_ref().map(|f| FirmwareSpec { name: f.name.clone(), size: f.data.len() as u64 }),
            acpi_tables: cfg.acpi_tables.clone(),
            uuid: cfg.uuid,
            net: devices.nics.iter().map(|n| n.spec.clone()).collect(),
            builtin: match &cfg.boot {
                BootSource::Builtin { params, .. } => Some(BuiltinSpec { seed: params.seed, passes: params.passes }),
                _ => None,
            },
        };

        // Load the guest and decide where vCPU 0 starts.
        let e820 = ram.e820();
        let (entry, rsi, user, top) = match &cfg.boot {
            BootSource::Builtin { guest, params } => {
                let code = guest.assemble()?;
                let entry = guests::load(ram.memory(), &code)?;
                BootInfo {
                    seed: params.seed,
                    passes: params.passes,
                    mode: params.mode,
                    stride: params.stride,
                    span: params.span,
                    timer: params.timer,
                    net: params.net,
                    tsc_per_ms: if *guest == Builtin::Netping { guests::netping::host_tsc_per_ms() } else { 0 },
                    nic_bars: crate::net::builtin_bars(0),
                    ranges: BootInfo::fill_ranges(&e820),
                }
                .write(ram.memory())?;
                (entry, 0, guest.user_mode(), ram.top())
            }
            BootSource::Kernel { kernel, initrd, cmdline } => {
                let loaded = linux::load_linux(
                    ram.memory(),
                    &LinuxBootConfig { kernel, initrd: initrd.as_ref(), cmdline, e820: &e820 },
                )?;
                machine::add_kernel_items(&devices, kernel, initrd.as_ref(), cmdline)?;
                (loaded.entry, loaded.boot_params, false, 0)
            }
            BootSource::Firmware | BootSource::Restore => (0, 0, false, 0),
        };
        let bios = match &cfg.firmware {
            Some(fw) => {
                let boots_it = matches!(cfg.boot, BootSource::Firmware);
                Some(firmware::load(&registry, &slots, &ram, &fw.name, &fw.data, boots_it)?)
            }
            None if matches!(cfg.boot, BootSource::Firmware) => return Err(VmError::NoFirmware),
            None => None,
        };
        let boots = !matches!(cfg.boot, BootSource::Restore | BootSource::Firmware);
        if boots {
            cpu::regs::write_boot_tables(ram.memory(), top, user)?;
        }

        let run_size = fd.run_size();
        let mut vcpus = Vec::with_capacity(usize::from(nr_vcpus));
        for (id, vfd) in (0..nr_vcpus).zip(vcpu_fds) {
            if id == 0 && boots {
                cpu::regs::set_long_mode(&vfd, id, entry, layout::BUILTIN_STACK, rsi, user)?;
            }
            vcpus.push(Vcpu {
                id,
                fd: Arc::new(Mutex::new(vfd)),
                pio: pio.clone(),
                mmio: mmio.clone(),
                control: control.clone(),
                run_size,
            });
        }
        let vcpu_fds: Vec<_> = vcpus.iter().map(|v| v.fd.clone()).collect();
        let devices = Arc::new(devices);
        if let Some(bios) = bios {
            // Firmware VMs reset in place; the power-on state is recorded before anything runs.
            let caps = HostVcpuCaps::query(&kvm, &fd).map_err(|e| VmError::Reset(e.to_string()))?;
            let handler = reset::handler(reset::ResetParts {
                vm: &fd,
                vcpus: &vcpu_fds,
                caps,
                devices: &devices,
                firmware: bios,
                memory: ram.device_memory().clone(),
            })
            .map_err(VmError::Reset)?;
            control.set_reset_handler(handler);
        }
        Ok(Vm {
            spec,
            page_server: None,
            lineage: Default::default(),
            wp_registration: Mutex::new(None),
            control,
            threads: Vec::new(),
            vcpus,
            vcpu_fds,
            pio,
            mmio,
            devices,
            ram,
            slots,
            registry,
            fd,
            kvm,
            timings: Timings { create: t0.elapsed() },
            started: None,
            shape,
        })
    }

    /// Starts every vCPU.
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.started.is_some() {
            return Err(VmError::AlreadyStarted);
        }
        self.started = Some(Instant::now());
        // A restore keeps the NICs paused until the guest runs.
        for nic in &self.devices.nics {
            nic.resume();
        }
        for v in self.vcpus.drain(..) {
            let id = v.id;
            match v.spawn() {
                Ok(t) => self.threads.push(t),
                Err(source) => {
                    self.control.stop(ExitReason::Stopped { detail: format!("could not start vCPU {id}") });
                    return Err(VmError::Thread { id, source });
                }
            }
        }
        Ok(())
    }

    /// Waits for the VM to end, at most `timeout`; on timeout stops it and says so.
    pub fn wait(&mut self, timeout: Option<Duration>) -> ExitReason {
        let reason = match self.control.wait_exit(timeout) {
            Some(r) => r,
            None => {
                let after_ms = timeout.map_or(0, |t| t.as_millis() as u64);
                self.control.stop(ExitReason::Timeout { after_ms });
                self.control.exit_reason().unwrap_or(ExitReason::Timeout { after_ms })
            }
        };
        self.join();
        reason
    }

    /// Stops the VM (if still running) and joins its vCPU threads.
    pub fn stop(&mut self, detail: &str) -> ExitReason {
        self.control.stop(ExitReason::Stopped { detail: detail.to_string() });
        self.join();
        self.control.exit_reason().unwrap_or(ExitReason::Stopped { detail: detail.to_string() })
    }

    fn join(&mut self) {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        // The guest is gone: so is the NICs' I/O (their taps close with the machine).
        for nic in &self.devices.nics {
            nic.shutdown();
        }
    }

    /// Stops the NICs' I/O threads (the VM has ended; also done when it is joined or dropped).
    pub fn shutdown_nics(&self) {
        for nic in &self.devices.nics {
            nic.shutdown();
        }
    }

    /// Whether `start` has run.
    pub fn is_started(&self) -> bool {
        self.started.is_some()
    }

    /// Pauses the vCPUs, then the NICs' I/O (nothing touches guest memory or device state
    /// until [`Vm::resume`]); false if the VM has ended.
    pub fn pause(&self) -> bool {
        if !self.control.pause() {
            return false;
        }
        for nic in &self.devices.nics {
            nic.pause();
        }
        true
    }

    /// Resumes the NICs' I/O, then the vCPUs.
    pub fn resume(&self) {
        for nic in &self.devices.nics {
            nic.resume();
        }
        self.control.resume()
    }

    pub fn spec(&self) -> &MachineSpec {
        &self.spec
    }

    /// A restored VM describes the guest it was restored from, with its parameters.
    pub fn set_guest_description(&mut self, guest: String, builtin: Option<BuiltinSpec>) {
        self.spec.guest = guest;
        self.spec.builtin = builtin;
    }

    /// Attaches the page server of a lazy restore; it lives as long as the VM.
    pub fn set_page_server(&mut self, server: PageServer) {
        self.page_server = Some(server);
    }

    pub fn page_server(&self) -> Option<&PageServer> {
        self.page_server.as_ref()
    }

    /// The write-protect registration the last background snapshot kept, taken out (the next
    /// background snapshot reuses it; see [`crate::snapshot::background`]).
    pub fn take_wp_registration(&self) -> Option<migrate::ram::wp::WpRegistration> {
        self.wp_registration.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// Keeps a background snapshot's write-protect registration for the next one.
    pub fn keep_wp_registration(&self, reg: migrate::ram::wp::WpRegistration) {
        *self.wp_registration.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reg);
    }

    /// The VM's snapshot lineage (incremental snapshots).
    pub fn lineage(&self) -> &crate::snapshot::lineage::Lineage {
        &self.lineage
    }

    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// Time from `start` to the guest's first exit to the VMM.
    pub fn time_to_first_exit(&self) -> Option<Duration> {
        Some(self.control.first_exit()?.saturating_duration_since(self.started?))
    }

    pub fn registry(&self) -> &Arc<RamRegistry> {
        &self.registry
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Its memory size and vCPU count, as the shell pool knows VMs (shell.rs).
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Puts another device on one of the machine's buses. Its state must be saved by a fragment
    /// (`snapshot::devices`), or snapshots of this VM fail naming it.
    pub fn add_device(
        &self,
        name: &'static str,
        device: Arc<Mutex<dyn BusDevice>>,
        bus: BusKind,
        addr: u64,
        len: u64,
    ) -> Result<(), VmError> {
        let target = match bus {
            BusKind::Pio => &self.pio,
            BusKind::Mmio => &self.mmio,
        };
        Ok(self.devices.place(target, bus, name, device, addr, len)?)
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    pub fn slots(&self) -> &Arc<SlotMap> {
        &self.slots
    }

    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The vCPUs' file descriptors, in vCPU order. Lock one only while the VM is paused,
    /// stopped or not yet started: a running vCPU thread holds its lock.
    pub fn vcpu_fds(&self) -> &[Arc<Mutex<VcpuFd>>] {
        &self.vcpu_fds
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop("VM dropped");
        }
        for nic in &self.devices.nics {
            nic.shutdown();
        }
    }
}

/// Shared output buffer, for tests and benchmarks that read what the guest printed.
#[derive(Clone, Default)]
pub struct SharedOutput(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedOutput {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    }
}
