//! One VM's actor: a thread that owns the VM and runs the requests sent to it, one at a time.
//!
//! Everything that touches the VM happens on this thread, so requests to one VM are ordered
//! and never race; blocking work (creating, snapshotting, restoring) never runs on the async
//! runtime. A panic while handling a request is caught: that VM is marked failed and stopped,
//! the request gets an error, and the daemon and every other VM carry on.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::error::ApiError;
use super::images::ImageDir;
use super::metrics::Metrics;
use crate::control::ExitReason;
use crate::guests::Builtin;
use crate::snapshot::{self, SaveOptions};
use crate::vm::{BootSource, BuiltinParams, Vm, VmConfig};

/// A VM as the daemon defines and persists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDef {
    pub name: String,
    /// A built-in guest to boot (or a kernel: exactly one of the two).
    #[serde(default)]
    pub guest: Option<Builtin>,
    /// A Linux kernel (bzImage or ELF) to boot, with an optional initrd and command line:
    /// names of images in the image directory ([`super::images`]), never paths.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    pub mem_mib: u64,
    #[serde(default = "one")]
    pub vcpus: u64,
    #[serde(default)]
    pub seed: u64,
    /// memfill passes (0: run until stopped).
    #[serde(default)]
    pub passes: u64,
    /// The snapshot it was restored from, if any.
    #[serde(default)]
    pub restored_from: Option<String>,
    /// The snapshot the daemon took of it when it shut down; restored when it starts again.
    #[serde(default)]
    pub resume_from: Option<String>,
}

fn one() -> u64 {
    1
}

/// The kernel command line a daemon VM gets unless it names one.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1";

impl VmDef {
    /// Exactly one of a built-in guest and a kernel.
    pub fn check_boot(&self) -> Result<(), String> {
        match (&self.guest, &self.kernel) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err("give exactly one of \"guest\" (a built-in guest) and \"kernel\" (a kernel file)".into()),
        }
    }

    /// What to boot: a kernel and initrd are read from the image directory, at most as large
    /// as guest memory.
    fn boot(&self, params: BuiltinParams, images: &ImageDir) -> Result<BootSource, ApiError> {
        let limit = self.mem_mib.saturating_mul(1 << 20);
        Ok(match (&self.kernel, self.guest) {
            (Some(kernel), _) => BootSource::Kernel {
                kernel: images.read("kernel", kernel, limit).map_err(ApiError::from_image)?,
                initrd: match &self.initrd {
                    Some(i) => Some(images.read("initrd", i, limit).map_err(ApiError::from_image)?),
                    None => None,
                },
                cmdline: self.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.into()),
            },
            (None, guest) => BootSource::Builtin { guest: guest.unwrap_or(Builtin::Idle), params },
        })
    }

    /// Checks that the kernel and initrd images exist and are regular files (without reading).
    pub fn check_images(&self, images: &ImageDir) -> Result<(), ApiError> {
        for (what, name) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(name) = name {
                images.check(what, name).map_err(ApiError::from_image)?;
            }
        }
        Ok(())
    }
}

/// What a VM is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Created,
    Running,
    Paused,
    Stopped,
    Failed,
}

/// A VM's status for the API.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    #[serde(flatten)]
    pub def: VmDef,
    pub state: VmState,
    /// How it ended, once it has.
    pub exit: Option<ExitReason>,
    /// From start to the guest's first exit to the VMM (its first I/O), once it has run.
    pub first_exit_ms: Option<f64>,
    /// Lazy restores: page faults served so far (the guest runs once there is one).
    pub lazy_faults: Option<u64>,
    /// Exits to the VMM (port I/O and MMIO) so far.
    pub exits: u64,
}

/// Requests an actor handles.
pub enum Cmd {
    Start,
    Pause,
    Resume,
    Stop,
    Info,
    Serial,
    Snapshot { name: String, live: bool, progress: Option<super::ops::OpHandle> },
}

/// Replies.
pub enum Reply {
    Info(VmInfo),
    Serial(String),
    Snapshot(snapshot::SaveReport),
}

pub type Request = (Cmd, oneshot::Sender<Result<Reply, ApiError>>);

/// The serial log: the last `cap` bytes the guest wrote.
#[derive(Clone)]
pub struct SerialLog {
    buf: Arc<Mutex<Vec<u8>>>,
    cap: usize,
}

impl SerialLog {
    pub fn new(cap: usize) -> Self {
        SerialLog { buf: Arc::new(Mutex::new(Vec::new())), cap }
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl Write for SerialLog {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut b = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        b.extend_from_slice(data);
        if b.len() > self.cap {
            let cut = b.len() - self.cap;
            b.drain(..cut);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The state an actor thread keeps.
pub struct Actor {
    pub def: VmDef,
    pub vm: Option<Vm>,
    pub serial: SerialLog,
    pub failed: bool,
    pub store: storage::Store,
    pub metrics: Arc<Metrics>,
    pub images: Arc<ImageDir>,
}

impl Actor {
    fn state(&self) -> VmState {
        if self.failed {
            return VmState::Failed;
        }
        match &self.vm {
            None => VmState::Created,
            Some(vm) if vm.control().exit_reason().is_some() => VmState::Stopped,
            Some(vm) if !vm.is_started() => VmState::Created,
            Some(vm) if vm.control().state() == crate::control::RunState::Paused => VmState::Paused,
            Some(_) => VmState::Running,
        }
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            def: self.def.clone(),
            state: self.state(),
            exit: self.vm.as_ref().and_then(|v| v.control().exit_reason()),
            first_exit_ms: self.vm.as_ref().and_then(|v| v.time_to_first_exit()).map(|d| d.as_secs_f64() * 1e3),
            lazy_faults: self.vm.as_ref().and_then(snapshot::restore::lazy_stats).map(|s| s.faults),
            exits: self.vm.as_ref().map_or(0, |v| v.control().exits()),
        }
    }

    fn vm(&mut self) -> Result<&mut Vm, ApiError> {
        let name = self.def.name.clone();
        self.vm.as_mut().ok_or_else(|| ApiError::Conflict(format!("VM '{name}' is not running")))
    }

    fn handle(&mut self, cmd: Cmd) -> Result<Reply, ApiError> {
        match cmd {
            Cmd::Info => {}
            Cmd::Serial => return Ok(Reply::Serial(self.serial.text())),
            Cmd::Start => match self.state() {
                VmState::Running | VmState::Paused => {
                    return Err(ApiError::Conflict(format!("VM '{}' is already running", self.def.name)))
                }
                _ => {
                    if !matches!(&self.vm, Some(vm) if !vm.is_started()) {
                        let params =
                            BuiltinParams { seed: self.def.seed, passes: self.def.passes, ..Default::default() };
                        let boot = self.def.boot(params, &self.images)?;
                        let cfg = VmConfig::new(self.def.mem_mib, self.def.vcpus, boot, Box::new(self.serial.clone()));
                        self.vm = Some(Vm::new(cfg).map_err(|e| ApiError::from_vm(&e))?);
                    }
                    self.failed = false;
                    self.vm()?.start().map_err(|e| ApiError::Internal(e.to_string()))?;
                }
            },
            Cmd::Pause => {
                if !self.vm()?.pause() {
                    return Err(ApiError::Conflict(format!("VM '{}' has stopped", self.def.name)));
                }
            }
            Cmd::Resume => self.vm()?.resume(),
            Cmd::Stop => {
                self.vm()?.stop("stopped by request");
            }
            Cmd::Snapshot { name, live, progress } => {
                let t0 = Instant::now();
                let store = self.store.clone();
                let vm = self.vm()?;
                let report = snapshot::save(vm, &store, &name, &SaveOptions { live, ..Default::default() }, &|p| {
                    if let Some(op) = &progress {
                        op.progress(serde_json::json!(p));
                    }
                })
                .map_err(|e| ApiError::from_snapshot(&e))?;
                self.metrics.snapshot_done(t0.elapsed());
                return Ok(Reply::Snapshot(report));
            }
        }
        Ok(Reply::Info(self.info()))
    }

    /// Runs requests until every sender is gone; then stops the VM.
    pub fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some((cmd, reply)) = rx.blocking_recv() {
            let result = match catch_unwind(AssertUnwindSafe(|| self.handle(cmd))) {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(vm = %self.def.name, "a request panicked; the VM is stopped");
                    self.failed = true;
                    if let Some(vm) = self.vm.as_mut() {
                        vm.stop("failed");
                    }
                    Err(ApiError::Internal(format!(
                        "VM '{}' failed while handling the request; it was stopped",
                        self.def.name
                    )))
                }
            };
            let _ = reply.send(result);
        }
        if let Some(mut vm) = self.vm.take() {
            vm.stop("daemon dropped the VM");
        }
    }
}
