//! `snapvisor run`: one VM in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::guest_args::{GuestMode, NetpingArgs};
use super::store_codec::StoreCodec;
use super::CliError;
use crate::boot::files::BootFile;
use crate::control::ExitReason;
use crate::guests::{Builtin, TimerMode};
use crate::snapshot::{self, SaveOptions, SnapshotError};
use crate::vm::{BootSource, BuiltinParams, FwCfgFile, Vm, VmConfig, VmError};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("guest").required(true).args(["builtin", "kernel", "firmware"])))]
pub struct RunArgs {
    /// Built-in guest to run.
    #[arg(long, value_enum)]
    pub builtin: Option<Builtin>,
    /// Linux kernel (bzImage or ELF vmlinux) to boot.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Boot through PC firmware: `seabios` (Debian's /usr/share/seabios/bios.bin) or the
    /// path of a firmware image.
    #[arg(long, conflicts_with = "builtin")]
    pub firmware: Option<String>,
    /// Initial ramdisk for the kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, requires = "kernel", default_value = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 noapic")]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[arg(long)]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u64,
    /// memfill: pattern seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// memfill: number of passes (0: until stopped).
    #[arg(long, default_value_t = 1)]
    pub passes: u64,
    /// memfill: fill (default) or verify; netping: ping (default), echo, evil, tx or rx.
    #[arg(long, value_enum)]
    pub mode: Option<GuestMode>,
    #[command(flatten)]
    pub netping: Box<NetpingArgs>,
    /// timer: arm the LAPIC timer in TSC-deadline (default) or one-shot mode.
    #[arg(long, value_enum, default_value_t = TimerMode::TscDeadline)]
    pub timer_mode: TimerMode,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Save what the guest writes to the debug console (port 0x402, SeaBIOS's log) in FILE.
    #[arg(long, value_name = "FILE")]
    pub debugcon: Option<PathBuf>,
    /// Offer a file to the guest through fw_cfg: NAME=PATH (NAME like opt/org/file). It lives
    /// in a resizeable RAM block, so a later restore adopts the snapshot's size.
    #[arg(long = "fw-cfg-file", value_name = "NAME=PATH")]
    pub fw_cfg_files: Vec<String>,
    /// With --firmware: add an ACPI table (a whole table with its header, at most 1 MiB) to
    /// those the firmware loads; repeatable.
    #[arg(long = "acpi-table", value_name = "FILE", requires = "firmware")]
    pub acpi_tables: Vec<PathBuf>,
    /// With --firmware: the system UUID its SMBIOS tables carry (SMBIOS type 1, fw_cfg key
    /// 0x02), like 8df288a9-e68e-4b7e-82b2-fdecc2c728cd; kept by snapshots. Default: the nil
    /// UUID, as QEMU's.
    #[arg(long, value_name = "UUID", requires = "firmware")]
    pub uuid: Option<String>,
    /// A NIC (virtio-net-pci) on a tap: tap=NAME[,mac=52:54:00:..][,romfile=PATH|none][,romsize=BYTES];
    /// repeatable, NIC i at PCI 00:(3+i).0. The tap is created if missing (CAP_NET_ADMIN).
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    pub net: Vec<crate::net::NetSpec>,
    #[command(flatten)]
    pub snapshot: SnapshotArgs,
}

/// Taking a snapshot while `run` runs.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Snapshot the VM this many milliseconds after it starts (0: before its first instruction).
    #[arg(long, requires_all = ["store", "name"])]
    pub snapshot_after_ms: Option<u64>,
    /// The snapshot store directory.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// How the store compresses the chunks this run's snapshot adds: zstd (fewer bytes) or
    /// lz4 (less CPU, ~1.4x the bytes).
    #[arg(long, value_enum, default_value_t = StoreCodec::Zstd)]
    pub store_codec: StoreCodec,
    /// The snapshot's name.
    #[arg(long)]
    pub name: Option<String>,
    /// How to copy memory: background (pause only to save state and write-protect RAM; the
    /// default), stop (stop-and-copy) or live (dirty-log pre-copy). Not `--mode`: that is
    /// the guest's (memfill, netping).
    #[arg(
        id = "snapshot_mode",
        long = "snapshot-mode",
        value_enum,
        requires = "snapshot_after_ms",
        conflicts_with = "live"
    )]
    pub mode: Option<snapshot::SaveMode>,
    /// The same as `--snapshot-mode live` (kept for old scripts).
    #[arg(long, requires = "snapshot_after_ms")]
    pub live: bool,
    /// Stop the VM once the snapshot is committed (exit status 0).
    #[arg(long, requires = "snapshot_after_ms")]
    pub exit_after_snapshot: bool,
}

/// Parses a `--net` value.
pub fn parse_net(s: &str) -> Result<crate::net::NetSpec, String> {
    crate::net::NetSpec::parse(s).map_err(|e| e.to_string())
}

/// Reads the firmware `--firmware` names: `seabios` (Debian's SeaBIOS) or a path. The image is
/// named as given, which is how snapshots and `vm info` show it.
pub fn read_firmware(name: &str) -> Result<BootFile, CliError> {
    use crate::boot::firmware;
    if name == firmware::SEABIOS {
        return firmware::read_seabios().map_err(CliError::Input);
    }
    let file = BootFile::read_path("firmware", std::path::Path::new(name), firmware::MAX_IMAGE)
        .map_err(|e| CliError::Input(format!("--firmware {name}: {e}")))?;
    firmware::named(name, file).map_err(|e| CliError::Input(e.to_string()))
}

/// Opens (creates or truncates) the `--debugcon` file. It is opened non-blocking: the debug
/// console is written from a vCPU thread, which must never wait on a pipe or FIFO nobody reads
/// (a FIFO without a reader is refused; one whose reader stalls makes the console drop output,
/// with a warning).
pub fn debugcon_file(path: Option<&std::path::Path>) -> Result<Option<Box<dyn std::io::Write + Send>>, CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(path) = path else { return Ok(None) };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::ENXIO) { " (a FIFO nobody reads)" } else { "" };
            CliError::Input(format!("--debugcon {}: cannot open it: {e}{why}", path.display()))
        })?;
    Ok(Some(Box::new(std::io::LineWriter::new(f))))
}

/// Parses `NAME=PATH` fw_cfg file arguments and reads the files.
pub fn fw_cfg_files(args: &[String]) -> Result<Vec<FwCfgFile>, CliError> {
    args.iter()
        .map(|a| {
            let (name, path) =
                a.split_once('=').ok_or_else(|| CliError::Input(format!("--fw-cfg-file {a:?}: expected NAME=PATH")))?;
            // A regular file of at most MAX_FW_CFG_FILE bytes: a FIFO would block the read for
            // ever and a device (/dev/zero) or a huge file would fill memory.
            let file = BootFile::read_path("fw_cfg file", std::path::Path::new(path), crate::machine::MAX_FW_CFG_FILE)
                .map_err(|e| CliError::Input(format!("--fw-cfg-file {name}: {e}")))?;
            Ok(FwCfgFile { name: name.to_string(), data: file.data })
        })
        .collect()
}

impl RunArgs {
    /// What to boot; a kernel and initrd are read here, any file this user can read, at
    /// most as large as guest memory.
    pub fn boot_source(&self) -> Result<BootSource, CliError> {
        let limit = self.mem_mib.saturating_mul(1 << 20);
        let read =
            |what, p: &std::path::Path| BootFile::read_path(what, p, limit).map_err(|e| CliError::Input(e.to_string()));
        let nics = self.net.len();
        let (mode, net) = self.netping.params(self.builtin, self.mode, nics, self.mem_mib)?;
        Ok(match (&self.builtin, &self.kernel) {
            (None, None) if self.firmware.is_some() => BootSource::Firmware,
            (Some(guest), _) => BootSource::Builtin {
                guest: *guest,
                params: BuiltinParams {
                    seed: self.seed,
                    passes: self.passes,
                    mode,
                    timer: self.timer_mode,
                    net,
                    ..Default::default()
                },
            },
            (None, kernel) => BootSource::Kernel {
                kernel: read("kernel", kernel.as_deref().unwrap_or(std::path::Path::new("")))?,
                initrd: self.initrd.as_deref().map(|p| read("initrd", p)).transpose()?,
                cmdline: self.cmdline.clone(),
            },
        })
    }

    /// The firmware image `--firmware` names, read.
    pub fn firmware_image(&self) -> Result<Option<BootFile>, CliError> {
        self.firmware.as_deref().map(read_firmware).transpose()
    }

    pub fn timeout(&self) -> Result<Option<Duration>, CliError> {
        self.timeout
            .map(|t| {
                Duration::try_from_secs_f64(t)
                    .map_err(|_| CliError::Input(format!("--timeout {t}: not a number of seconds")))
            })
            .transpose()
    }
}

/// Whether a VM error is about what the user asked for (rather than snapvisor failing).
pub fn vm_error_is_input(e: &VmError) -> bool {
    matches!(
        e,
        VmError::Memory(crate::memory::MemoryError::TooSmall { .. })
            | VmError::Memory(crate::memory::MemoryError::TooLarge { .. })
            | VmError::VcpuCount { .. }
            | VmError::Boot(_)
            | VmError::Guest(_)
            | VmError::Devices(crate::machine::MachineError::File { .. })
    ) || matches!(e, VmError::Acpi(a) if a.is_input())
        || matches!(e, VmError::Nic(n) if n.is_input())
}

/// Classifies a VM error: problems with what the user asked for, or snapvisor's own failure.
pub fn vm_error(e: VmError) -> CliError {
    if vm_error_is_input(&e) {
        CliError::Input(e.to_string())
    } else {
        CliError::Internal(e.to_string())
    }
}

/// The process exit status for how a guest ended.
pub fn exit_status(reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::GuestExit { status } => u8::try_from(*status).unwrap_or(255),
        ExitReason::PowerOff => 0,
        ExitReason::Reset { .. } | ExitReason::Crash { .. } => 126,
        ExitReason::Timeout { .. } => 124,
        ExitReason::Stopped { .. } => 125,
    }
}

/// Classifies a snapshot error.
pub fn snapshot_error(e: SnapshotError) -> CliError {
    match e {
        SnapshotError::Vm(v) => vm_error(v),
        SnapshotError::Check(_)
        | SnapshotError::Format(_)
        | SnapshotError::NetCount { .. }
        | SnapshotError::NetSpec { .. }
        | SnapshotError::FwCfgFiles { .. } => CliError::Input(e.to_string()),
        SnapshotError::Store(
            storage::StoreError::Name(_)
            | storage::StoreError::Exists(_)
            | storage::StoreError::NotFound(_)
            | storage::StoreError::Busy(_),
        ) => CliError::Input(e.to_string()),
        _ => CliError::Internal(e.to_string()),
    }
}

/// Waits for the guest to end, reporting as `run` does: the exit status of the process.
pub fn finish(vm: &mut Vm, timeout: Option<Duration>) -> ExitCode {
    let reason = vm.wait(timeout);
    let status = exit_status(&reason);
    if !matches!(reason, ExitReason::GuestExit { .. } | ExitReason::PowerOff) {
        eprintln!("snapvisor: {reason}");
    }
    for nic in &vm.devices().nics {
        eprintln!("snapvisor: {}", nic.driver_report());
    }
    tracing::info!(%reason, status, "guest ended");
    ExitCode::from(status)
}

pub fn run(args: RunArgs) -> Result<ExitCode, CliError> {
    let timeout = args.timeout()?;
    let mut cfg = VmConfig::new(args.mem_mib, args.vcpus, args.boot_source()?, Box::new(std::io::stdout()));
    cfg.fw_cfg_files = fw_cfg_files(&args.fw_cfg_files)?;
    cfg.firmware = args.firmware_image()?;
    cfg.acpi_tables = crate::acpi::read_tables(&args.acpi_tables).map_err(|e| CliError::Input(e.to_string()))?;
    cfg.debugcon_out = debugcon_file(args.debugcon.as_deref())?;
    cfg.net = args.net.clone();
    cfg.uuid = match &args.uuid {
        Some(s) => {
            Some(s.parse::<devices::acpi::vmgenid::Guid>().map_err(|e| CliError::Input(format!("--uuid {s}: {e}")))?.0)
        }
        None => None,
    };
    // The VM first: a run refused for its input (a bad tap, say) leaves no store directory
    // behind; opening the store creates it.
    let mut vm = Vm::new(cfg).map_err(vm_error)?;
    let store = match &args.snapshot.store {
        Some(dir) => Some(
            storage::Store::open_with(dir, args.snapshot.store_codec.options())
                .map_err(|e| CliError::Input(format!("opening store {}: {e}", dir.display())))?,
        ),
        None => None,
    };
    let snap = args.snapshot.snapshot_after_ms.zip(store).zip(args.snapshot.name.clone());
    if let Some(((0, store), name)) = &snap {
        take_snapshot(&vm, store, name, &args.snapshot)?;
        if args.snapshot.exit_after_snapshot {
            // Never started: the guest runs no instruction past its snapshot.
            return Ok(ExitCode::SUCCESS);
        }
    }
    vm.start().map_err(vm_error)?;
    if let Some(((after, store), name)) = &snap {
        if *after > 0 {
            let deadline = Duration::from_millis(*after);
            if vm.control().wait_exit(Some(deadline)).is_none() {
                take_snapshot(&vm, store, name, &args.snapshot)?;
            } else {
                return Err(CliError::Input(format!("the guest ended before the snapshot at {after} ms")));
            }
        }
        if args.snapshot.exit_after_snapshot {
            vm.stop("snapshot taken");
            return Ok(ExitCode::SUCCESS);
        }
    }
    Ok(finish(&mut vm, timeout))
}

fn take_snapshot(vm: &Vm, store: &storage::Store, name: &str, a: &SnapshotArgs) -> Result<(), CliError> {
    // With --exit-after-snapshot the VM stays paused from the snapshot's final pause on, so
    // nothing the guest does (or prints) comes after the state it was saved in.
    let opts = SaveOptions {
        mode: a.mode.unwrap_or_default(),
        live: a.live,
        stay_paused: a.exit_after_snapshot,
        ..Default::default()
    };
    let report = snapshot::save(vm, store, name, &opts, &|p| {
        tracing::info!(round = p.round, bytes = p.bytes_copied, dirty = p.dirty_chunks, "snapshot progress");
    })
    .map_err(snapshot_error)?;
    eprintln!(
        "snapvisor: snapshot '{}' committed: {} MiB of RAM in {:.1} ms ({}, pause {:.1} ms, {} rounds), {} bytes stored{}",
        report.name,
        report.ram_bytes >> 20,
        report.total_ms,
        report.mode.as_str(),
        report.pause_ms,
        report.rounds,
        report.store.bytes_stored,
        report.mode_reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
    );
    Ok(())
}
