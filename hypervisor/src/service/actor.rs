//! One VM's actor: a thread that owns the VM and runs the requests sent to it, one at a time.
//!
//! Everything that touches the VM happens on this thread, so requests to one VM are ordered
//! and never race; blocking work (creating, snapshotting, restoring) never runs on the async
//! runtime. A panic while handling a request is caught: that VM is marked failed and stopped,
//! the request gets an error, and the daemon and every other VM carry on.
//!
//! The actor publishes its VM's status ([`Published`]) on a `watch` channel after every
//! request and every [`TICK`]: listing, info and metrics read that and never wait for an actor,
//! so a VM stuck in a long or blocking call (a huge snapshot, a kernel file that never ends)
//! holds up only requests to that VM. On the same tick it notices what the guest did on its own
//! (exited, crashed, a lazy restore that could not read its memory) and sends an event, and
//! deletes the shutdown snapshot it was resumed from once its memory is all resident.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{oneshot, watch};

use super::error::ApiError;
use super::events::Events;
use super::images::ImageDir;
use super::mac_claims::{MacClaim, MacClaims};
use super::metrics::Metrics;
use super::vm_def::VmDef;
use crate::control::{ExitReason, VmControl};
use crate::snapshot::{self, SaveOptions};
use crate::vm::{Vm, VmConfig};

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
    /// Lazy restores: when every page had arrived (ms after the restore), once it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_resident_ms: Option<f64>,
    /// Exits to the VMM (port I/O and MMIO) so far.
    pub exits: u64,
    /// The MACs its NICs have (picked ones included), in NIC order, once it has been built.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<crate::net::Mac>,
}

/// Requests an actor handles.
pub enum Cmd {
    Start,
    Pause,
    Resume,
    Stop,
    Snapshot {
        name: String,
        live: bool,
        mode: crate::snapshot::SaveMode,
        progress: Option<super::ops::OpHandle>,
    },
    /// The daemon is stopping: snapshot the VM as `name` (stop-and-copy) if it is running or
    /// paused; once committed, delete the shutdown snapshot it was resumed from, if any.
    ShutdownSnapshot {
        name: String,
    },
}

impl Cmd {
    /// Requests that must not wait behind a snapshot's wait for a lazy fill (up to
    /// [`crate::snapshot::save::DEFAULT_FILL_WAIT`]): while one is queued the wait ends and the
    /// snapshot copies at once (stop-and-copy), so a client's pause or stop waits only for
    /// the copy, as behind any stop-and-copy snapshot.
    pub fn ends_fill_wait(&self) -> bool {
        matches!(self, Cmd::Pause | Cmd::Resume | Cmd::Stop | Cmd::ShutdownSnapshot { .. })
    }

    /// The request's name, for errors.
    pub fn what(&self) -> &'static str {
        match self {
            Cmd::Start => "start",
            Cmd::Pause => "pause",
            Cmd::Resume => "resume",
            Cmd::Stop => "stop",
            Cmd::Snapshot { .. } => "snapshot",
            Cmd::ShutdownSnapshot { .. } => "shutdown snapshot",
        }
    }

    /// How long the daemon waits for the answer before it tells the client the VM is stuck.
    /// Starting reads the kernel and builds the VM; pausing waits for every vCPU to leave
    /// the guest; a snapshot copies all of guest memory.
    pub fn deadline(&self) -> Duration {
        match self {
            Cmd::Start => Duration::from_secs(60),
            Cmd::Pause | Cmd::Resume | Cmd::Stop => Duration::from_secs(30),
            Cmd::Snapshot { .. } | Cmd::ShutdownSnapshot { .. } => Duration::from_secs(1800),
        }
    }
}

/// Replies.
pub enum Reply {
    Info(Box<VmInfo>),
    Snapshot(Box<snapshot::SaveReport>),
    /// A shutdown snapshot: whether one was taken, and whether the VM was paused.
    ShutdownSnapshot {
        taken: bool,
        paused: bool,
        def: Box<VmDef>,
    },
}

pub type Request = (Cmd, oneshot::Sender<Result<Reply, ApiError>>);

/// How often an idle actor refreshes its published status and looks at its guest.
pub const TICK: Duration = Duration::from_millis(200);

/// What an actor publishes for readers that must not wait for it.
#[derive(Clone)]
pub struct Published {
    pub info: VmInfo,
    /// The VM's run control, to stop it from outside while the actor is busy.
    pub control: Option<Arc<VmControl>>,
}

/// The serial log (and the debug console's): the last `cap` bytes the guest wrote.
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
    /// Set by the daemon when the VM is removed: a snapshot under way is cancelled.
    pub cancel: Arc<AtomicBool>,
    /// Pause, resume, stop and shutdown-snapshot requests the daemon queued for this actor
    /// and the actor has not taken yet; while there are any, or once the daemon stops, a
    /// snapshot's wait for a lazy fill ends ([`Cmd::ends_fill_wait`]).
    pub controls_queued: Arc<AtomicUsize>,
    /// The daemon's stopping flag.
    pub daemon_stopping: watch::Receiver<bool>,
    /// Tests only: background snapshots hold their copy until cancelled.
    pub hold_snapshot_copy: bool,
    pub vm: Option<Vm>,
    pub serial: SerialLog,
    /// What the guest wrote to the debug console (port 0x402).
    pub debugcon: SerialLog,
    pub failed: bool,
    pub store: storage::Store,
    pub metrics: Arc<Metrics>,
    pub images: Arc<ImageDir>,
    pub events: Events,
    pub published: watch::Sender<Published>,
    /// The shutdown snapshot this VM was resumed from: deleted once the VM is resident.
    pub cleanup: Option<String>,
    /// The VM's end was reported (as an event, or by the request that stopped it).
    pub exit_reported: bool,
    /// The daemon's MAC registry, to claim this VM's MACs when it starts.
    pub mac_claims: Arc<MacClaims>,
    /// This VM's claim on its MACs while it runs (or is paused); `None` once it has stopped.
    pub mac_claim: Option<MacClaim>,
    /// What the VM looked like when it stopped and was let go of (its memory, taps and shared
    /// base freed): a stopped VM holds no guest memory.
    pub stopped: Option<Box<VmInfo>>,
}

impl Actor {
    fn state(&self) -> VmState {
        if self.failed {
            return VmState::Failed;
        }
        match &self.vm {
            None if self.stopped.is_some() => VmState::Stopped,
            None => VmState::Created,
            Some(vm) if vm.control().exit_reason().is_some() => VmState::Stopped,
            Some(vm) if !vm.is_started() => VmState::Created,
            Some(vm) if vm.control().state() == crate::control::RunState::Paused => VmState::Paused,
            Some(_) => VmState::Running,
        }
    }

    fn info(&self) -> VmInfo {
        if let (None, Some(last)) = (&self.vm, &self.stopped) {
            return VmInfo { def: self.def.clone(), state: self.state(), ..(**last).clone() };
        }
        VmInfo {
            def: self.def.clone(),
            state: self.state(),
            exit: self.vm.as_ref().and_then(|v| v.control().exit_reason()),
            first_exit_ms: self.vm.as_ref().and_then(|v| v.time_to_first_exit()).map(|d| d.as_secs_f64() * 1e3),
            lazy_faults: self.vm.as_ref().and_then(snapshot::restore::lazy_stats).map(|s| s.faults),
            lazy_resident_ms: self
                .vm
                .as_ref()
                .and_then(snapshot::restore::lazy_stats)
                .and_then(|s| s.resident_after_ms),
            exits: self.vm.as_ref().map_or(0, |v| v.control().exits()),
            macs: self.vm.as_ref().map(|v| v.spec().net.iter().filter_map(|n| n.mac).collect()).unwrap_or_default(),
        }
    }

    fn vm(&mut self) -> Result<&mut Vm, ApiError> {
        let name = self.def.name.clone();
        let why = if self.stopped.is_some() { "has stopped" } else { "is not running" };
        self.vm.as_mut().ok_or_else(|| ApiError::Conflict(format!("VM '{name}' {why}")))
    }

    /// The VM has stopped (by request or on its own): lets go of it (its guest memory, its
    /// reference to a shared base, its taps) and of its MACs, keeping what GET shows. A later
    /// start boots it afresh from its definition, as after a daemon restart.
    fn release_stopped_vm(&mut self) {
        if self.vm.as_ref().is_some_and(|vm| vm.control().exit_reason().is_some()) {
            self.stopped = Some(Box::new(self.info()));
            self.vm = None;
            tracing::info!(vm = %self.def.name, "stopped: its memory and MACs are released");
        }
        self.mac_claim = None;
    }

    /// Starts the VM: claims its MACs first (409 naming the holder of one another VM has,
    /// nothing built), then builds it afresh unless a built, never-started one is there.
    fn start(&mut self) -> Result<(), ApiError> {
        let fresh = !matches!(&self.vm, Some(vm) if !vm.is_started());
        if let (true, Some(what), Some(snap)) = (fresh, self.def.unknown_for_a_fresh_boot(), &self.def.restored_from) {
            return Err(ApiError::Conflict(format!(
                "VM '{}' was restored from snapshot '{snap}' and has stopped; it cannot boot afresh because {what} \
                 are not in the snapshot: restore the snapshot again, or define a new VM with them",
                self.def.name
            )));
        }
        if self.mac_claim.is_none() {
            let macs: Vec<_> = self.def.net.iter().map(|n| n.mac).collect();
            self.mac_claim = Some(self.mac_claims.claim(&self.def.name, &macs, &Default::default())?);
        }
        if !matches!(&self.vm, Some(vm) if !vm.is_started()) {
            let params = self.def.builtin_params().map_err(ApiError::BadRequest)?;
            let boot = self.def.boot(params, &self.images)?;
            let mut cfg = VmConfig::new(self.def.mem_mib, self.def.vcpus, boot, Box::new(self.serial.clone()));
            cfg.firmware = self.def.firmware_image(&self.images)?;
            cfg.net = super::net_api::to_specs(&self.def.net, &self.images)?;
            // The NICs get the MACs just claimed.
            let claimed = self.mac_claim.as_ref().map(MacClaim::macs).unwrap_or_default();
            for (nic, m) in cfg.net.iter_mut().zip(claimed) {
                nic.mac = Some(*m);
            }
            cfg.debugcon_out = Some(Box::new(self.debugcon.clone()));
            // The VM that ran before goes first: it holds its NICs' taps, which
            // take one user each.
            self.vm = None;
            self.vm = Some(Vm::new(cfg).map_err(|e| ApiError::from_vm(&e))?);
        }
        self.failed = false;
        self.exit_reported = false;
        self.vm()?.start().map_err(|e| ApiError::Internal(e.to_string()))?;
        self.stopped = None;
        Ok(())
    }

    /// What ends this VM's snapshots' waits for a lazy fill: the daemon stopping, or a
    /// control request queued behind the snapshot.
    fn end_fill_wait(&self) -> snapshot::EndFillWait {
        let (stopping, queued) = (self.daemon_stopping.clone(), self.controls_queued.clone());
        snapshot::EndFillWait::new(move || *stopping.borrow() || queued.load(Ordering::Acquire) > 0)
    }

    fn handle(&mut self, cmd: Cmd) -> Result<Reply, ApiError> {
        if cmd.ends_fill_wait() {
            // Taken: counted by the daemon when it was sent (daemon.rs `call_within`).
            self.controls_queued.fetch_sub(1, Ordering::AcqRel);
        }
        match cmd {
            Cmd::Start => match self.state() {
                VmState::Running | VmState::Paused => {
                    return Err(ApiError::Conflict(format!("VM '{}' is already running", self.def.name)))
                }
                _ => {
                    if let (None, Some(snap)) = (&self.vm, &self.def.resume_from) {
                        // The daemon could not resume it at its start: a fresh boot would
                        // throw the guest's state away, so say what to do instead.
                        return Err(ApiError::Conflict(format!(
                            "VM '{}' has a shutdown snapshot '{snap}' the daemon could not resume it from (see \
                             the daemon's log: a tap in use, say); free what blocked it and restart the daemon \
                             to resume it, restore '{snap}' as another VM, or delete this VM to drop its state",
                            self.def.name
                        )));
                    }
                    if let Err(e) = self.start() {
                        // A start that fails gives its MACs back.
                        self.mac_claim = None;
                        return Err(e);
                    }
                }
            },
            Cmd::Pause => {
                if !self.vm()?.pause() {
                    return Err(ApiError::Conflict(format!("VM '{}' has stopped", self.def.name)));
                }
            }
            Cmd::Resume => self.vm()?.resume(),
            Cmd::Stop => {
                let vm = self.vm()?;
                vm.stop("stopped by request");
                // Its taps are free at once, for another VM or this one started again.
                vm.shutdown_nics();
                // The API reports this stop itself.
                self.exit_reported = true;
                self.release_stopped_vm();
            }
            Cmd::ShutdownSnapshot { name } => return self.shutdown_snapshot(name),
            Cmd::Snapshot { name, live, mode, progress } => {
                let t0 = Instant::now();
                let store = self.store.clone();
                let mut opts = SaveOptions {
                    live,
                    mode,
                    cancel: Some(self.cancel.clone()),
                    end_fill_wait: Some(self.end_fill_wait()),
                    ..Default::default()
                };
                opts.hooks.hold_copy = self.hold_snapshot_copy;
                let vm = self.vm()?;
                // GET on the operation shows the chunks copied so far while the copy runs.
                let ticker = progress.map(|op| super::progress::SnapshotProgress::start(vm, &store, &name, op));
                let report = snapshot::save(vm, &store, &name, &opts, &|p| {
                    if let Some(t) = &ticker {
                        t.report(p);
                    }
                })
                .map_err(|e| ApiError::from_snapshot(&e))?;
                self.metrics.snapshot_done(t0.elapsed());
                return Ok(Reply::Snapshot(Box::new(report)));
            }
        }
        Ok(Reply::Info(Box::new(self.info())))
    }

    fn shutdown_snapshot(&mut self, name: String) -> Result<Reply, ApiError> {
        let state = self.state();
        let paused = state == VmState::Paused;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Ok(Reply::ShutdownSnapshot { taken: false, paused, def: Box::new(self.def.clone()) });
        }
        let store = self.store.clone();
        let vm = self.vm()?;
        // Stop-and-copy: the daemon stops the VM next, so nothing would run beside a
        // background copy.
        let opts = SaveOptions { mode: snapshot::SaveMode::Stop, ..Default::default() };
        let report = snapshot::save(vm, &store, &name, &opts, &|_| {}).map_err(|e| ApiError::from_snapshot(&e))?;
        // (save() leaves a VM that was paused paused.)
        tracing::info!(vm = %self.def.name, snapshot = %report.name, "VM snapshotted for the restart");
        // The new one is committed: the one it was resumed from can go.
        if let Some(old) = self.cleanup.take() {
            if let Err(e) = self.store.delete(&old) {
                tracing::warn!(vm = %self.def.name, snapshot = old, "deleting the previous shutdown snapshot: {e}");
            }
        }
        Ok(Reply::ShutdownSnapshot { taken: true, paused, def: Box::new(self.def.clone()) })
    }

    /// Publishes the VM's status for readers.
    fn publish(&self) {
        let control = self.vm.as_ref().map(|v| v.control().clone());
        self.published.send_replace(Published { info: self.info(), control });
    }

    /// How the VM ended, once, when the guest (or a lazy restore) ended it: the event to send.
    fn notice_exit(&mut self) -> Option<(&'static str, serde_json::Value)> {
        if self.exit_reported {
            return None;
        }
        let vm = self.vm.as_ref()?;
        let reason = vm.control().exit_reason()?;
        self.exit_reported = true;
        // The guest is gone: its NICs stop moving frames and close their taps.
        vm.shutdown_nics();
        tracing::info!(vm = %self.def.name, %reason, "VM ended");
        if let (ExitReason::Crash { .. }, Some(e)) = (&reason, vm.page_server().and_then(|s| s.error())) {
            let event = ("lazy_restore_failed", serde_json::json!({ "error": e.to_string() }));
            self.release_stopped_vm();
            return Some(event);
        }
        let what = match &reason {
            ExitReason::GuestExit { .. } | ExitReason::PowerOff => "guest_exit",
            ExitReason::Reset { .. } | ExitReason::Crash { .. } => "crashed",
            ExitReason::Timeout { .. } => "timeout",
            ExitReason::Stopped { .. } => "stopped",
        };
        let event = (what, serde_json::json!(reason));
        self.release_stopped_vm();
        Some(event)
    }

    /// A snapshot committed after its client stopped waiting (the connection was cut at the
    /// daemon's shutdown deadline, the request timed out): the client was told it failed, so
    /// it must not exist.
    fn drop_unanswered_snapshot(&self, name: &str) {
        match self.store.delete(name) {
            Ok(()) => tracing::warn!(
                vm = %self.def.name,
                snapshot = name,
                "snapshot committed after its client stopped waiting; deleted, as the client was told it failed"
            ),
            Err(e) => tracing::error!(vm = %self.def.name, snapshot = name, "deleting an unanswered snapshot: {e}"),
        }
    }

    /// Deletes the shutdown snapshot this VM resumed from once nothing depends on it.
    fn clean_up_resume_snapshot(&mut self) {
        let Some(snap) = self.cleanup.as_deref() else { return };
        let done = match self.vm.as_ref() {
            Some(vm) => {
                let resident = snapshot::restore::lazy_stats(vm).is_none_or(|s| s.resident_after_ms.is_some());
                resident || vm.control().exit_reason().is_some()
            }
            // Stopped and let go of: nothing reads the snapshot any more.
            None => self.stopped.is_some(),
        };
        if !done {
            return;
        }
        match self.store.delete(snap) {
            Ok(()) | Err(storage::StoreError::NotFound(_)) => {
                tracing::info!(vm = %self.def.name, snapshot = snap, "resumed; its shutdown snapshot is deleted");
            }
            // Its page server lets go of the pin a moment after residency: try again later.
            Err(storage::StoreError::Pinned { .. }) => return,
            Err(e) => tracing::warn!(vm = %self.def.name, snapshot = snap, "deleting the shutdown snapshot: {e}"),
        }
        self.cleanup = None;
    }

    fn handle_caught(&mut self, cmd: Cmd) -> Result<Reply, ApiError> {
        match catch_unwind(AssertUnwindSafe(|| self.handle(cmd))) {
            Ok(r) => r,
            Err(_) => {
                tracing::error!(vm = %self.def.name, "a request panicked; the VM is stopped");
                self.failed = true;
                self.exit_reported = true;
                if let Some(vm) = self.vm.as_mut() {
                    vm.stop("failed");
                }
                self.mac_claim = None;
                self.events.emit(&self.def.name, "failed", serde_json::json!({ "error": "a request panicked" }));
                Err(ApiError::Internal(format!(
                    "VM '{}' failed while handling the request; it was stopped",
                    self.def.name
                )))
            }
        }
    }

    /// Runs requests until every sender is gone; then stops the VM.
    pub fn run(mut self, rx: Receiver<Request>) {
        loop {
            let request = match rx.recv_timeout(TICK) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let result = request.map(|(cmd, reply)| (self.handle_caught(cmd), reply));
            let ended = self.notice_exit();
            self.clean_up_resume_snapshot();
            // Published before the answer and the event: a client that reads after either
            // sees the new state.
            self.publish();
            if let Some((what, detail)) = ended {
                self.events.emit(&self.def.name, what, detail);
            }
            if let Some((result, reply)) = result {
                if let Err(Ok(Reply::Snapshot(r))) = reply.send(result) {
                    self.drop_unanswered_snapshot(&r.name);
                }
            }
        }
        if let Some(mut vm) = self.vm.take() {
            vm.stop("daemon dropped the VM");
        }
    }
}
