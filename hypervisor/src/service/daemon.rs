//! The daemon's state: its VMs (each an actor thread fed by a channel), the snapshot store
//! and the state directory where VM definitions persist.
//!
//! Lock order: `Daemon::vms` is held only to look up, insert or remove a VM's handle, never
//! across a request to an actor or any blocking work.
//!
//! Nothing here waits for an actor without a deadline: status comes from what each actor
//! publishes ([`super::actor::Published`]), a request to a VM whose queue is full is refused
//! at once (503), and one the VM does not answer in time ([`Cmd::deadline`]) fails with 504
//! while the VM carries on (or stays stuck) on its own thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::actor::{Actor, Cmd, Published, Reply, Request, SerialLog, VmInfo, VmState};
use super::error::ApiError;
use super::events::Events;
use super::images::ImageDir;
use super::limits::MemoryBudget;
use super::mac_claims::{MacClaim, MacClaims};
use super::metrics::Metrics;
use super::vm_def::VmDef;
use crate::control::ExitReason;
use crate::snapshot::{self, RestoreMode, RestoreOptions};

/// Bytes of serial output kept per VM.
const SERIAL_LOG: usize = 64 * 1024;
/// Bytes of debug console output kept per VM (SeaBIOS logs a few KiB).
const DEBUGCON_LOG: usize = 256 * 1024;

/// A VM's output logs: COM1 and the debug console.
#[derive(Clone)]
pub(super) struct Logs {
    serial: SerialLog,
    debugcon: SerialLog,
}

impl Logs {
    pub(super) fn new() -> Self {
        Logs { serial: SerialLog::new(SERIAL_LOG), debugcon: SerialLog::new(DEBUGCON_LOG) }
    }

    /// Restore options that send the restored VM's output to these logs.
    pub(super) fn restore_options(&self, mode: RestoreMode, pin_holder: String) -> RestoreOptions {
        let mut opts = RestoreOptions::new(mode, Box::new(self.serial.clone()));
        opts.debugcon_out = Some(Box::new(self.debugcon.clone()));
        opts.pin_holder = pin_holder;
        opts
    }
}
/// Requests that may queue for one VM.
const QUEUE: usize = 16;
/// How long deleting a VM waits for its thread to end before answering anyway.
const DELETE_WAIT: Duration = Duration::from_secs(10);

pub(super) struct VmHandle {
    pub(super) tx: SyncSender<Request>,
    pub(super) thread: JoinHandle<()>,
    pub(super) published: watch::Receiver<Published>,
    logs: Logs,
    /// Set when the VM is removed: cancels a snapshot its actor is taking.
    cancel: Arc<AtomicBool>,
    /// Pause, resume, stop and shutdown-snapshot requests queued for the actor and not yet
    /// taken: while there are any, a snapshot waiting for a lazy fill stops waiting
    /// ([`Cmd::ends_fill_wait`]).
    controls_queued: Arc<AtomicUsize>,
}

pub struct Daemon {
    vms: Mutex<BTreeMap<String, VmHandle>>,
    /// Names of VMs requests are making (names.rs); taken after `vms`.
    pub(super) making: Mutex<BTreeMap<String, usize>>,
    /// Names whose definition file is damaged (defs.rs), with what is wrong; taken after
    /// `making`.
    damaged: Mutex<BTreeMap<String, String>>,
    pub store: storage::Store,
    state_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    pub ops: Arc<super::ops::Ops>,
    /// Events for `GET /events` subscribers.
    pub events: Events,
    /// Set when the daemon is stopping: event streams end so connections can close.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Kernels and initrds VMs may boot.
    pub images: Arc<ImageDir>,
    /// The guest memory every VM together may hold.
    pub budget: Arc<MemoryBudget>,
    /// Which running VM each MAC is on the wire for (mac_claims.rs).
    pub(super) macs: Arc<MacClaims>,
    /// Requests whose outcome a connected client waits for and must learn (a snapshot): the
    /// daemon keeps their connections open while stopping (shutdown.rs).
    pub(super) owed: watch::Sender<usize>,
    /// Tests only (`DaemonConfig::hold_snapshot_copy`).
    hold_snapshot_copy: bool,
}

/// What the operator configures about a daemon beyond its state directory.
#[derive(Debug)]
pub struct DaemonConfig {
    pub images: ImageDir,
    /// Guest memory budget in MiB.
    pub max_guest_mib: u64,
    /// How the store is opened (the codec of new chunks).
    pub store: storage::StoreOptions,
    /// Tests only: background snapshots hold their copy until cancelled (`SaveHooks::hold_copy`).
    pub hold_snapshot_copy: bool,
}

/// VM and snapshot names: 1 to 64 of `[A-Za-z0-9._-]`, not starting with a dot (they become
/// file names in the state directory).
pub(super) fn validate_name(what: &str, name: &str) -> Result<(), ApiError> {
    if super::images::is_valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} name {name:?} is invalid: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.'"
        )))
    }
}

impl Daemon {
    /// Opens (or creates) the state directory: the store in `store/`, VM definitions in `vms/`.
    pub fn open(state_dir: &Path, config: DaemonConfig) -> Result<Arc<Daemon>, String> {
        let vms_dir = state_dir.join("vms");
        std::fs::create_dir_all(&vms_dir).map_err(|e| format!("creating {}: {e}", vms_dir.display()))?;
        let store =
            storage::Store::open_with(state_dir.join("store"), config.store.clone()).map_err(|e| e.to_string())?;
        let d = Arc::new(Daemon {
            vms: Mutex::new(BTreeMap::new()),
            making: Mutex::default(),
            damaged: Mutex::default(),
            store,
            state_dir: state_dir.to_path_buf(),
            metrics: Arc::new(Metrics::default()),
            ops: Arc::new(super::ops::Ops::default()),
            events: Events::default(),
            stopping: tokio::sync::watch::channel(false).0,
            images: Arc::new(config.images),
            budget: Arc::new(MemoryBudget::new(config.max_guest_mib)),
            macs: Arc::new(MacClaims::default()),
            owed: watch::channel(0).0,
            hold_snapshot_copy: config.hold_snapshot_copy,
        });
        // Clones of a request a killed daemon was making go first (all or nothing).
        super::pending::sweep(state_dir, &vms_dir);
        let scan = super::defs::scan(&vms_dir).map_err(|e| format!("reading {}: {e}", vms_dir.display()))?;
        d.metrics.set_damaged_definitions(scan.damaged.len());
        let damaged: Vec<String> = scan.damaged.keys().cloned().collect();
        *d.damaged() = scan.damaged;
        let mut resumed = Vec::new();
        for def in scan.defs {
            tracing::info!(vm = %def.name, "VM definition loaded");
            d.budget.force(&def.name, def.mem_mib);
            let loaded = def.clone();
            let mut resume_from = def.resume_from.clone();
            if let Some(snap) = resume_from.as_deref() {
                // Named before it was taken (shutdown.rs): a daemon killed before
                // the commit leaves a name with no snapshot, and the VM stopped.
                if let Err(storage::StoreError::NotFound(_)) = d.store.manifest(snap) {
                    tracing::warn!(
                        vm = %def.name,
                        snapshot = snap,
                        "its shutdown snapshot was never committed (the daemon was killed while taking \
                         it): the VM stays stopped"
                    );
                    resume_from = None;
                }
            }
            let vm = resume_from.as_deref().and_then(|snap| d.resume(&def.name, snap, def.resume_paused));
            // Definitions from before MACs were kept get theirs now (a resumed VM's
            // own), saved below with the rest.
            let mut def = def;
            let keep: Vec<_> =
                vm.as_ref().map(|(v, _, _)| v.spec().net.iter().map(|n| n.mac).collect()).unwrap_or_default();
            d.assign_macs(&mut def, &keep);
            let def = match (&vm, &resume_from) {
                // Resumed once: a later start must not go back to that snapshot.
                (Some(_), _) | (None, None) => VmDef { resume_from: None, resume_paused: false, ..def },
                // Not resumed (a tap busy, say): the definition keeps pointing at the
                // snapshot and the snapshot is kept, so the next daemon start tries
                // again; nothing of the guest's state is thrown away.
                (None, Some(snap)) => {
                    resumed.push(snap.clone());
                    def
                }
            };
            if def != loaded {
                if let Err(e) = d.persist(&def) {
                    tracing::error!(vm = %def.name, "{e}");
                }
            }
            // The snapshot is deleted once the VM no longer needs it (resident, or ended).
            let cleanup = if vm.is_some() { resume_from } else { None };
            if let Some(snap) = &cleanup {
                resumed.push(snap.clone());
            }
            let h = d.spawn_actor(def.clone(), vm, cleanup);
            d.lock().insert(def.name, h);
        }
        super::shutdown::sweep_shutdown_snapshots(&d.store, &resumed, &damaged);
        Ok(d)
    }

    /// Restores a VM the daemon snapshotted at its last shutdown, lazily, and starts it.
    /// A VM that was paused comes back paused (its vCPUs park before their first instruction).
    /// Its MACs are claimed first: one another resumed VM holds keeps this one stopped.
    fn resume(&self, name: &str, snap: &str, paused: bool) -> Option<(crate::vm::Vm, Logs, MacClaim)> {
        let logs = Logs::new();
        let opts = logs.restore_options(RestoreMode::Lazy, format!("VM '{name}'"));
        let restored = self.snapshot_nics(snap).and_then(|nics| {
            let macs: Vec<_> = nics.iter().map(|n| n.mac).collect();
            let claim = self.claim_macs(name, &macs).map_err(|e| e.to_string())?;
            let mut opts = opts;
            opts.net = Some(super::restore::claimed_nics(&nics, &claim));
            let (mut vm, _) = snapshot::restore(&self.store, snap, opts).map_err(|e| e.to_string())?;
            if paused {
                vm.pause();
            }
            vm.start().map(|()| (vm, claim)).map_err(|e| e.to_string())
        });
        match restored {
            Ok((vm, claim)) => {
                tracing::info!(vm = name, snapshot = snap, "VM resumed from its shutdown snapshot");
                Some((vm, logs, claim))
            }
            Err(e) => {
                tracing::error!(vm = name, snapshot = snap, "cannot resume VM: {e}; it stays stopped");
                None
            }
        }
    }

    /// The NICs snapshot `snap` restores (checked as untrusted), with their saved MACs.
    fn snapshot_nics(&self, snap: &str) -> Result<Vec<crate::net::NetSpec>, String> {
        let spec = super::limits::snapshot_spec(&self.store, snap).map_err(|e| e.to_string())?;
        snapshot::restore::restore_nics(snap, &spec.net, None, &[], false).map_err(|e| e.to_string())
    }

    /// Tells event subscribers that `what` happened to VM `vm` (no subscribers: nothing).
    pub fn event(&self, vm: &str, what: &str, detail: serde_json::Value) {
        self.events.emit(vm, what, detail);
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VmHandle>> {
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error for a request naming VM `name`, which is not listed: 404, or 409 naming the
    /// damage when its definition is damaged (defs.rs).
    pub(super) fn no_vm(&self, name: &str) -> ApiError {
        match self.damaged().get(name) {
            Some(why) => ApiError::Conflict(format!(
                "VM '{name}' was not loaded: {why}; repair it and restart the daemon, or DELETE /vms/{name} to \
                 remove it"
            )),
            None => ApiError::NotFound(format!("no VM '{name}'")),
        }
    }

    /// Damaged definitions by VM name (defs.rs).
    pub(super) fn damaged(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.damaged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn persist(&self, def: &VmDef) -> Result<(), ApiError> {
        let dir = self.state_dir.join("vms");
        super::defs::write(&dir, def).map_err(|e| {
            let path = super::defs::path(&dir, &def.name);
            ApiError::from_write(&format!("saving VM definition {}", path.display()), &e)
        })
    }

    /// Saves a VM definition from a blocking-pool thread.
    pub(super) async fn save_def(self: &Arc<Self>, def: VmDef) -> Result<(), ApiError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.persist(&def)).await.map_err(|e| ApiError::Internal(e.to_string()))?
    }

    /// Removes a VM definition from a blocking-pool thread.
    async fn remove_def(&self, name: &str) {
        let (dir, owned) = (self.state_dir.join("vms"), name.to_string());
        match tokio::task::spawn_blocking(move || super::defs::remove(&dir, &owned)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(vm = name, "removing its definition: {e}"),
            Err(e) => tracing::error!(vm = name, "removing its definition: {e}"),
        }
    }

    /// A VM's actor; a running `vm` comes with its logs and the claim on its MACs.
    pub(super) fn spawn_actor(
        &self,
        def: VmDef,
        vm: Option<(crate::vm::Vm, Logs, MacClaim)>,
        cleanup: Option<String>,
    ) -> VmHandle {
        let (tx, rx) = sync_channel(QUEUE);
        let (vm, logs, claim) = match vm {
            Some((vm, logs, claim)) => (Some(vm), logs, Some(claim)),
            None => (None, Logs::new(), None),
        };
        // What readers see until the actor's first publication.
        let first = Published {
            info: VmInfo {
                def: def.clone(),
                state: match &vm {
                    Some(vm) if vm.control().state() == crate::control::RunState::Paused => VmState::Paused,
                    Some(_) => VmState::Running,
                    None => VmState::Created,
                },
                exit: None,
                first_exit_ms: None,
                lazy_faults: None,
                lazy_resident_ms: None,
                exits: 0,
                macs: vm.as_ref().map(|v| v.spec().net.iter().filter_map(|n| n.mac).collect()).unwrap_or_default(),
            },
            control: vm.as_ref().map(|v| v.control().clone()),
        };
        let (published_tx, published) = watch::channel(first);
        let cancel = Arc::new(AtomicBool::new(false));
        let controls_queued = Arc::new(AtomicUsize::new(0));
        let actor = Actor {
            cancel: cancel.clone(),
            controls_queued: controls_queued.clone(),
            daemon_stopping: self.stopping.subscribe(),
            hold_snapshot_copy: self.hold_snapshot_copy,
            def: def.clone(),
            vm,
            serial: logs.serial.clone(),
            debugcon: logs.debugcon.clone(),
            failed: false,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            images: self.images.clone(),
            events: self.events.clone(),
            published: published_tx,
            cleanup,
            exit_reported: false,
            mac_claims: self.macs.clone(),
            mac_claim: claim,
            stopped: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vm-{}", def.name))
            .spawn(move || actor.run(rx))
            .unwrap_or_else(|e| {
                tracing::error!("cannot start the actor thread of VM '{}': {e}", def.name);
                std::thread::spawn(|| {})
            });
        VmHandle { tx, thread, published, logs, cancel, controls_queued }
    }

    /// Sends `cmd` to VM `name` and waits for the answer, at most the command's deadline.
    pub async fn call(&self, name: &str, cmd: Cmd) -> Result<Reply, ApiError> {
        let deadline = cmd.deadline();
        self.call_within(name, cmd, deadline).await
    }

    /// Sends `cmd` to VM `name` and waits at most `deadline` for the answer. A VM whose queue
    /// is full is busy (503); one that does not answer in time is reported stuck (504).
    pub async fn call_within(&self, name: &str, cmd: Cmd, deadline: Duration) -> Result<Reply, ApiError> {
        let (tx, queued) =
            self.lock().get(name).map(|h| (h.tx.clone(), h.controls_queued.clone())).ok_or_else(|| self.no_vm(name))?;
        let what = cmd.what();
        // Counted before it is sent, so the actor never takes it uncounted (actor.rs).
        let control = cmd.ends_fill_wait();
        if control {
            queued.fetch_add(1, Ordering::AcqRel);
        }
        let (reply, rx) = oneshot::channel();
        tx.try_send((cmd, reply)).map_err(|e| {
            if control {
                queued.fetch_sub(1, Ordering::AcqRel);
            }
            match e {
                TrySendError::Full(_) => ApiError::Busy(format!(
                    "VM '{name}' is busy: {QUEUE} requests are already waiting for it; try again later"
                )),
                TrySendError::Disconnected(_) => ApiError::Internal(format!("VM '{name}' is gone")),
            }
        })?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ApiError::Internal(format!("VM '{name}' did not answer '{what}'"))),
            Err(_) => Err(ApiError::Timeout(format!(
                "VM '{name}' did not finish '{what}' within {} s; it is still busy or stuck \
                 (GET /vms/{name} shows its state; DELETE removes it)",
                deadline.as_secs()
            ))),
        }
    }

    /// The store's size for metrics: asked off the async threads, for at most half a second
    /// (a store busy with a GC must not hold up metrics); the last known value otherwise.
    pub async fn stored_bytes(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let store = self.store.clone();
        let ask = tokio::task::spawn_blocking(move || store.usage().map(|u| u.stored_bytes));
        match tokio::time::timeout(Duration::from_millis(500), ask).await {
            Ok(Ok(Ok(n))) => {
                self.metrics.last_stored_bytes.store(n, Relaxed);
                n
            }
            _ => self.metrics.last_stored_bytes.load(Relaxed),
        }
    }

    /// A VM's status as its actor last published it: never waits for the actor.
    pub async fn info(&self, name: &str) -> Result<VmInfo, ApiError> {
        self.lock().get(name).map(|h| h.published.borrow().info.clone()).ok_or_else(|| self.no_vm(name))
    }

    /// How many VMs the daemon has.
    pub fn vm_count(&self) -> usize {
        self.lock().len()
    }

    /// Every VM's published status.
    pub async fn list(&self) -> Vec<VmInfo> {
        self.lock().values().map(|h| h.published.borrow().info.clone()).collect()
    }

    /// The last `SERIAL_LOG` bytes VM `name` printed; never waits for the actor.
    pub fn serial(&self, name: &str) -> Result<String, ApiError> {
        self.lock().get(name).map(|h| h.logs.serial.text()).ok_or_else(|| self.no_vm(name))
    }

    /// The last `DEBUGCON_LOG` bytes VM `name` wrote to its debug console; never waits.
    pub fn debugcon(&self, name: &str) -> Result<String, ApiError> {
        self.lock().get(name).map(|h| h.logs.debugcon.text()).ok_or_else(|| self.no_vm(name))
    }

    /// Defines a VM (and starts it if asked).
    pub async fn create(self: &Arc<Self>, mut def: VmDef, start: bool) -> Result<VmInfo, ApiError> {
        validate_name("VM", &def.name)?;
        def.check_boot().map_err(ApiError::BadRequest)?;
        crate::memory::check_size(def.mem_mib).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if def.vcpus == 0 || def.vcpus > 255 {
            return Err(ApiError::BadRequest(format!("{} vCPUs requested: 1 to 255 allowed", def.vcpus)));
        }
        def.check_images(&self.images)?;
        let _name = self.claim_names(std::slice::from_ref(&def.name)).map_err(|t| t.api_error(t.message()))?;
        // Its NICs keep the MACs they get now, across stops and daemon restarts. They are
        // picked and the VM listed in one step: a concurrent create sees them and picks others.
        self.assign_macs(&mut def, &[]);
        {
            let mut vms = self.lock();
            self.budget.reserve(&def.name, def.mem_mib)?;
            let h = self.spawn_actor(def.clone(), None, None);
            vms.insert(def.name.clone(), h);
        }
        if let Err(e) = self.save_def(def.clone()).await {
            self.remove(&def.name);
            return Err(e);
        }
        // A delete while the definition was being saved may have removed the file before it
        // was written: the VM is gone, so is its definition (else it came back at the next
        // start). The name is still claimed, so the file is no other VM's.
        if !self.lock().contains_key(&def.name) {
            self.remove_def(&def.name).await;
            return Err(ApiError::NotFound(format!("VM '{}' was deleted while it was being created", def.name)));
        }
        if start {
            if let Err(e) = self.call(&def.name, Cmd::Start).await {
                // All or nothing: a VM that cannot start is not left defined.
                tracing::info!(vm = %def.name, "start failed, the VM is removed again: {e}");
                self.forget(&def.name, "its start failed").await;
                return Err(e);
            }
        }
        self.info(&def.name).await
    }

    fn remove(&self, name: &str) -> Option<VmHandle> {
        let h = self.lock().remove(name);
        if h.is_some() {
            self.budget.release(name);
        }
        h
    }

    /// Removes VM `name`: cancels a snapshot it is taking (nothing of it is committed), stops
    /// it (at once, even while its actor is busy), ends its actor and deletes its definition.
    /// Waits up to [`DELETE_WAIT`] for the actor thread to end; one stuck in a call that never
    /// returns is left behind (and logged).
    pub(super) async fn forget(&self, name: &str, why: &str) -> bool {
        match self.unlist(name, false) {
            Ok(Some((h, unlisted))) => {
                self.forget_unlisted(name, h, unlisted, why).await;
                true
            }
            Ok(None) | Err(_) => false,
        }
    }

    /// [`Daemon::forget`] of a VM already unlisted, its name claimed by `unlisted`.
    async fn forget_unlisted(&self, name: &str, h: VmHandle, unlisted: super::names::Unlisted<'_>, why: &str) {
        // The name stays claimed until the definition is gone (names.rs): a new VM of the
        // name cannot save its definition meanwhile only for this removal to delete it.
        self.budget.release(name);
        h.cancel.store(true, Ordering::Release);
        if let Some(control) = h.published.borrow().control.clone() {
            control.stop(ExitReason::Stopped { detail: format!("VM removed: {why}") });
        }
        // Dropping the sender ends the actor, which stops the VM and frees it.
        drop(h.tx);
        self.remove_def(name).await;
        drop(unlisted);
        let t0 = Instant::now();
        while !h.thread.is_finished() {
            if t0.elapsed() > DELETE_WAIT {
                tracing::warn!(
                    vm = name,
                    "its thread has not ended {} s after removal; left behind",
                    DELETE_WAIT.as_secs()
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = h.thread.join();
    }

    /// Stops and forgets a VM at a client's request; refused (503) while the daemon stops
    /// (names.rs).
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        match self.unlist(name, true) {
            Ok(Some((h, unlisted))) => {
                self.forget_unlisted(name, h, unlisted, "deleted").await;
                Ok(())
            }
            Ok(None) => self.remove_damaged(name).await,
            Err(_) => Err(ApiError::Busy(format!(
                "the daemon is stopping: VM '{name}' is stopped with the others (and snapshotted, with \
                 --on-shutdown snapshot); delete it once the daemon runs again"
            ))),
        }
    }
}

impl Daemon {
    /// The end of a client's delete of a name with no VM: a damaged definition of that name
    /// goes (defs.rs), else there is nothing to delete.
    async fn remove_damaged(&self, name: &str) -> Result<(), ApiError> {
        // Claimed until the file is gone and the name free (names.rs).
        let Some(_claim) = self.claim_damaged(name) else {
            return Err(ApiError::NotFound(format!("no VM '{name}'")));
        };
        let (dir, owned) = (self.state_dir.join("vms"), name.to_string());
        let path = super::defs::path(&dir, name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Err(ApiError::Conflict(format!(
                "the damaged definition of VM '{name}' is a directory ({}): the daemon does not remove \
                 directories; remove it by hand",
                path.display()
            )));
        }
        tokio::task::spawn_blocking(move || super::defs::remove(&dir, &owned))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::from_write(&format!("removing the damaged definition of VM '{name}'"), &e))?;
        let mut damaged = self.damaged();
        damaged.remove(name);
        self.metrics.set_damaged_definitions(damaged.len());
        tracing::warn!(vm = name, "its damaged definition was deleted by a client");
        Ok(())
    }
}

/// VMs by state, for metrics.
pub fn count_states(vms: &[VmInfo]) -> Vec<(&'static str, usize)> {
    use super::actor::VmState;
    let mut c: BTreeMap<&'static str, usize> =
        ["created", "running", "paused", "stopped", "failed"].into_iter().map(|s| (s, 0)).collect();
    for i in vms {
        let k = match i.state {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        };
        *c.entry(k).or_default() += 1;
    }
    c.into_iter().collect()
}

#[cfg(test)]
impl Daemon {
    /// Control requests queued for VM `name` and not yet taken by its actor.
    pub(super) fn controls_queued(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, |h| h.controls_queued.load(Ordering::Acquire))
    }
}

/// A daemon for unit tests, its state and store in `dir`, 1 GiB of guest memory.
#[cfg(test)]
pub(super) fn test_daemon(dir: &Path) -> Arc<Daemon> {
    let images = super::images::ImageDir::open(&dir.join("images"), 1 << 20).expect("image directory");
    let config = DaemonConfig {
        images,
        max_guest_mib: 1024,
        store: storage::StoreOptions::default(),
        hold_snapshot_copy: false,
    };
    Daemon::open(dir, config).expect("daemon")
}
