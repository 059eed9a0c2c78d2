//! The daemon's state: its VMs (each an actor thread fed by a channel), the snapshot store
//! and the state directory where VM definitions persist.
//!
//! Lock order: `Daemon::vms` is held only to look up, insert or remove a VM's handle, never
//! across a request to an actor or any blocking work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::actor::{Actor, Cmd, Reply, Request, SerialLog, VmDef, VmInfo};
use super::error::ApiError;
use super::metrics::Metrics;
use crate::snapshot::{self, RestoreMode, RestoreOptions};

/// Bytes of serial output kept per VM.
const SERIAL_LOG: usize = 64 * 1024;
/// Requests that may queue for one VM.
const QUEUE: usize = 16;

struct VmHandle {
    tx: mpsc::Sender<Request>,
    thread: JoinHandle<()>,
}

pub struct Daemon {
    vms: Mutex<BTreeMap<String, VmHandle>>,
    pub store: storage::Store,
    state_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    pub ops: Arc<super::ops::Ops>,
    /// Events for `GET /events` subscribers.
    pub events: tokio::sync::broadcast::Sender<serde_json::Value>,
    /// Set when the daemon is stopping: event streams end so connections can close.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

/// VM and snapshot names: 1 to 64 of `[A-Za-z0-9._-]`, not starting with a dot (they become
/// file names in the state directory).
/// How long a shutdown waits for a VM's last shutdown snapshot to be released (the VM
/// becoming resident) before it gives up snapshotting that VM.
const PIN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn validate_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} name {name:?} is invalid: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.'"
        )))
    }
}

impl Daemon {
    /// Opens (or creates) the state directory: the store in `store/`, VM definitions in `vms/`.
    pub fn open(state_dir: &Path) -> Result<Arc<Daemon>, String> {
        let vms_dir = state_dir.join("vms");
        std::fs::create_dir_all(&vms_dir).map_err(|e| format!("creating {}: {e}", vms_dir.display()))?;
        let store = storage::Store::open(state_dir.join("store")).map_err(|e| e.to_string())?;
        let d = Arc::new(Daemon {
            vms: Mutex::new(BTreeMap::new()),
            store,
            state_dir: state_dir.to_path_buf(),
            metrics: Arc::new(Metrics::default()),
            ops: Arc::new(super::ops::Ops::default()),
            events: tokio::sync::broadcast::channel(1024).0,
            stopping: tokio::sync::watch::channel(false).0,
        });
        let entries = std::fs::read_dir(&vms_dir).map_err(|e| format!("reading {}: {e}", vms_dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<VmDef>(&b).map_err(|e| e.to_string()))
            {
                Ok(def) if validate_name("VM", &def.name).is_ok() => {
                    tracing::info!(vm = %def.name, "VM definition loaded");
                    let vm = def.resume_from.as_deref().and_then(|snap| d.resume(&def.name, snap));
                    // Resumed once: a later start must not go back to that snapshot.
                    let def = VmDef { resume_from: None, ..def };
                    if let Err(e) = d.persist(&def) {
                        tracing::error!(vm = %def.name, "{e}");
                    }
                    let h = d.spawn_actor(def.clone(), vm);
                    d.lock().insert(def.name, h);
                }
                Ok(def) => tracing::warn!("ignoring {}: bad VM name {:?}", path.display(), def.name),
                Err(e) => tracing::warn!("ignoring {}: {e}", path.display()),
            }
        }
        Ok(d)
    }

    /// Restores a VM the daemon snapshotted at its last shutdown, lazily, and starts it.
    fn resume(&self, name: &str, snap: &str) -> Option<(crate::vm::Vm, SerialLog)> {
        let serial = SerialLog::new(SERIAL_LOG);
        let opts = RestoreOptions {
            pin_holder: format!("VM '{name}'"),
            ..RestoreOptions::new(RestoreMode::Lazy, Box::new(serial.clone()))
        };
        let restored = snapshot::restore(&self.store, snap, opts)
            .map_err(|e| e.to_string())
            .and_then(|(mut vm, _)| vm.start().map(|()| vm).map_err(|e| e.to_string()));
        match restored {
            Ok(vm) => {
                tracing::info!(vm = name, snapshot = snap, "VM resumed from its shutdown snapshot");
                Some((vm, serial))
            }
            Err(e) => {
                tracing::error!(vm = name, snapshot = snap, "cannot resume VM: {e}; it stays stopped");
                None
            }
        }
    }

    /// Tells event subscribers that `what` happened to VM `vm` (no subscribers: nothing).
    pub fn event(&self, vm: &str, what: &str, detail: serde_json::Value) {
        let unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let _ = self.events.send(serde_json::json!({ "vm": vm, "event": what, "detail": detail, "unix_ms": unix_ms }));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VmHandle>> {
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn def_path(&self, name: &str) -> PathBuf {
        self.state_dir.join("vms").join(format!("{name}.json"))
    }

    fn persist(&self, def: &VmDef) -> Result<(), ApiError> {
        let path = self.def_path(&def.name);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(def).map_err(|e| ApiError::Internal(e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| ApiError::Internal(format!("saving VM definition {}: {e}", path.display())))
    }

    fn spawn_actor(&self, def: VmDef, vm: Option<(crate::vm::Vm, SerialLog)>) -> VmHandle {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (vm, serial) = match vm {
            Some((vm, serial)) => (Some(vm), serial),
            None => (None, SerialLog::new(SERIAL_LOG)),
        };
        let actor = Actor {
            def: def.clone(),
            vm,
            serial,
            failed: false,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vm-{}", def.name))
            .spawn(move || actor.run(rx))
            .unwrap_or_else(|e| {
                tracing::error!("cannot start the actor thread of VM '{}': {e}", def.name);
                std::thread::spawn(|| {})
            });
        VmHandle { tx, thread }
    }

    /// Sends `cmd` to VM `name` and waits for the answer.
    pub async fn call(&self, name: &str, cmd: Cmd) -> Result<Reply, ApiError> {
        let tx =
            self.lock().get(name).map(|h| h.tx.clone()).ok_or_else(|| ApiError::NotFound(format!("no VM '{name}'")))?;
        let (reply, rx) = oneshot::channel();
        tx.send((cmd, reply)).await.map_err(|_| ApiError::Internal(format!("VM '{name}' is gone")))?;
        rx.await.map_err(|_| ApiError::Internal(format!("VM '{name}' did not answer")))?
    }

    pub async fn info(&self, name: &str) -> Result<VmInfo, ApiError> {
        match self.call(name, Cmd::Info).await? {
            Reply::Info(i) => Ok(i),
            _ => Err(ApiError::Internal("unexpected reply".into())),
        }
    }

    pub async fn list(&self) -> Vec<VmInfo> {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        let mut out = Vec::new();
        for n in names {
            if let Ok(i) = self.info(&n).await {
                out.push(i);
            }
        }
        out
    }

    /// Defines a VM (and starts it if asked).
    pub async fn create(&self, def: VmDef, start: bool) -> Result<VmInfo, ApiError> {
        validate_name("VM", &def.name)?;
        def.check_boot().map_err(ApiError::BadRequest)?;
        crate::memory::check_size(def.mem_mib).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if def.vcpus == 0 || def.vcpus > 255 {
            return Err(ApiError::BadRequest(format!("{} vCPUs requested: 1 to 255 allowed", def.vcpus)));
        }
        {
            let mut vms = self.lock();
            if vms.contains_key(&def.name) {
                return Err(ApiError::Conflict(format!("a VM named '{}' already exists", def.name)));
            }
            let h = self.spawn_actor(def.clone(), None);
            vms.insert(def.name.clone(), h);
        }
        if let Err(e) = self.persist(&def) {
            self.remove(&def.name);
            return Err(e);
        }
        if start {
            self.call(&def.name, Cmd::Start).await?;
        }
        self.info(&def.name).await
    }

    fn remove(&self, name: &str) -> Option<JoinHandle<()>> {
        self.lock().remove(name).map(|h| h.thread)
    }

    /// Stops and forgets a VM.
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        let thread = self.remove(name).ok_or_else(|| ApiError::NotFound(format!("no VM '{name}'")))?;
        // Dropping the sender ends the actor, which stops the VM.
        tokio::task::spawn_blocking(move || thread.join()).await.map_err(|e| ApiError::Internal(e.to_string()))?.ok();
        let _ = std::fs::remove_file(self.def_path(name));
        Ok(())
    }

    /// Restores `snapshot` as a new running VM `name`.
    pub async fn restore(
        self: &Arc<Self>,
        snapshot_name: &str,
        name: &str,
        mode: RestoreMode,
    ) -> Result<VmInfo, ApiError> {
        validate_name("VM", name)?;
        validate_name("snapshot", snapshot_name)?;
        if self.lock().contains_key(name) {
            return Err(ApiError::Conflict(format!("a VM named '{name}' already exists")));
        }
        let t0 = Instant::now();
        let this = self.clone();
        let (snap, vm_name) = (snapshot_name.to_string(), name.to_string());
        let pin_holder = format!("VM '{name}'");
        let (vm, serial, spec) = tokio::task::spawn_blocking(move || {
            let serial = SerialLog::new(SERIAL_LOG);
            let opts = RestoreOptions { pin_holder, ..RestoreOptions::new(mode, Box::new(serial.clone())) };
            let (mut vm, _) = snapshot::restore(&this.store, &snap, opts).map_err(|e| ApiError::from_snapshot(&e))?;
            vm.start().map_err(|e| ApiError::Internal(e.to_string()))?;
            let spec = vm.spec().clone();
            Ok::<_, ApiError>((vm, serial, spec))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        self.metrics.restore_done(t0.elapsed());
        let (guest, kernel) = match spec.guest.split_once(':') {
            Some(("builtin", g)) => (g.parse().ok(), None),
            Some(("kernel", path)) => (None, Some(std::path::PathBuf::from(path))),
            _ => (None, None),
        };
        let def = VmDef {
            name: vm_name.clone(),
            guest,
            kernel,
            initrd: None,
            cmdline: None,
            mem_mib: spec.mem_mib,
            vcpus: spec.vcpus,
            seed: 0,
            passes: 0,
            restored_from: Some(snapshot_name.to_string()),
            resume_from: None,
        };
        {
            let mut vms = self.lock();
            if vms.contains_key(&vm_name) {
                return Err(ApiError::Conflict(format!("a VM named '{vm_name}' already exists")));
            }
            let h = self.spawn_actor(def.clone(), Some((vm, serial)));
            vms.insert(vm_name.clone(), h);
        }
        self.persist(&def)?;
        self.event(&vm_name, "restored", serde_json::json!({ "snapshot": snapshot_name, "mode": mode }));
        self.info(&vm_name).await
    }

    /// Stops every VM and waits for the actors to end. With `snapshot`, running VMs are
    /// snapshotted first (as `shutdown-<name>`) and resumed from it when the daemon starts.
    pub fn shutdown(&self, snapshot: bool) {
        let handles: Vec<(String, VmHandle)> = std::mem::take(&mut *self.lock()).into_iter().collect();
        for (name, h) in handles {
            if snapshot {
                self.snapshot_for_restart(&name, &h);
            }
            drop(h.tx);
            let _ = h.thread.join();
        }
    }

    fn snapshot_for_restart(&self, name: &str, h: &VmHandle) {
        let ask = |cmd| {
            let (tx, rx) = oneshot::channel();
            h.tx.blocking_send((cmd, tx)).ok()?;
            rx.blocking_recv().ok()
        };
        let Some(Ok(Reply::Info(info))) = ask(Cmd::Info) else { return };
        if !matches!(info.state, super::actor::VmState::Running | super::actor::VmState::Paused) {
            return;
        }
        let snap = format!("shutdown-{name}");
        if let Err(storage::StoreError::Pinned { holders, .. }) = self.store.delete(&snap) {
            // Resumed from it moments ago and still filling: the daemon's lazy restores fill
            // in the background, so the pin goes once the VM is resident.
            tracing::info!(vm = name, snapshot = %snap, ?holders, "waiting for the snapshot to be released");
            let deadline = Instant::now() + PIN_WAIT;
            while !self.store.pin_holders(&snap).is_empty() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if let Err(e) = self.store.delete(&snap) {
                tracing::error!(vm = name, "cannot replace the shutdown snapshot: {e}");
                return;
            }
        }
        match ask(Cmd::Snapshot { name: snap.clone(), live: false, progress: None }) {
            Some(Ok(_)) => {
                let def = VmDef { resume_from: Some(snap.clone()), ..info.def };
                match self.persist(&def) {
                    Ok(()) => tracing::info!(vm = name, snapshot = %snap, "VM snapshotted for the restart"),
                    Err(e) => tracing::error!(vm = name, "{e}"),
                }
            }
            Some(Err(e)) => tracing::error!(vm = name, "snapshot at shutdown failed: {e}"),
            None => tracing::error!(vm = name, "the VM did not answer at shutdown"),
        }
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
