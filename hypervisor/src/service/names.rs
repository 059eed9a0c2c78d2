//! Names of VMs being made: a request that makes VMs (create, restore, clone) claims their
//! names before it builds anything, and a second request for a name that is claimed or taken
//! fails at once with 409. Without it two requests for one name both built a VM and the later
//! one failed only when it tried to insert it; two clones of one prefix each took some of the
//! names and both failed, rolling back everything they made.
//!
//! While the daemon stops no name is claimed (503), and the shutdown waits for the claims
//! already held (every VM they make is then in `vms`) before it lists the VMs to snapshot and
//! stop: a VM a request finished making during the shutdown was never snapshotted with
//! `--on-shutdown snapshot`, and came back stopped, its guest's state lost.
//!
//! A delete claims the name too, from the moment it unlists the VM until its definition file
//! is gone: a create or restore of that name waits for nothing but fails (409) until then, so
//! the delete never removes the new VM's definition. A name may be claimed by the request
//! making its VM and by a delete at once (the count in `making`). A client's delete is refused
//! (503) once the daemon stops, as a create is: the shutdown may have snapshotted the VM and be
//! about to save its definition for the next start, which would bring a deleted VM back. A
//! delete begun before holds its claim, so the shutdown waits for it and never sees the VM.
//!
//! A name whose definition file is damaged (defs.rs) is taken too (409) until a delete
//! removes that file. That delete claims the name as well, until the file is gone: two deletes
//! of it at once and a create in between could otherwise see the later delete remove the new
//! VM's definition.
//!
//! Lock order: `Daemon::vms` before `Daemon::making` before `Daemon::damaged`; none is held
//! across blocking work.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

use super::daemon::Daemon;
use super::error::ApiError;

/// Names claimed by one request; released when it drops (by then the VMs are in `vms`, or
/// were never made).
pub(super) struct NameClaim {
    daemon: Arc<Daemon>,
    names: Vec<String>,
}

/// Why a claim failed: the first name already used, and how.
pub(super) enum NameTaken {
    /// A VM of that name exists.
    Exists(String),
    /// Another request is making a VM of that name.
    Making(String),
    /// The daemon is stopping: it makes no more VMs.
    Stopping(String),
    /// The name's definition file is damaged (defs.rs): name, what is wrong.
    Damaged(String, String),
}

impl NameTaken {
    /// What a client is told.
    pub(super) fn message(&self) -> String {
        match self {
            NameTaken::Exists(n) => format!("a VM named '{n}' already exists"),
            NameTaken::Making(n) => format!("a VM named '{n}' is being made by another request"),
            NameTaken::Stopping(n) => format!("the daemon is stopping: VM '{n}' is not made"),
            NameTaken::Damaged(n, why) => format!(
                "VM name '{n}' is held by a damaged definition ({why}); repair it and restart the daemon, or \
                 DELETE /vms/{n} to remove it"
            ),
        }
    }

    pub(super) fn name(&self) -> &str {
        match self {
            NameTaken::Exists(n) | NameTaken::Making(n) | NameTaken::Stopping(n) | NameTaken::Damaged(n, _) => n,
        }
    }

    /// The API error carrying `message`: 503 while the daemon stops, else 409.
    pub(super) fn api_error(&self, message: String) -> ApiError {
        match self {
            NameTaken::Stopping(_) => ApiError::Busy(message),
            NameTaken::Exists(_) | NameTaken::Making(_) | NameTaken::Damaged(..) => ApiError::Conflict(message),
        }
    }
}

impl Daemon {
    /// Claims `names` for one request, all or none: none may name a VM or a claim of another
    /// request.
    pub(super) fn claim_names(self: &Arc<Self>, names: &[String]) -> Result<NameClaim, NameTaken> {
        let vms = self.lock();
        let mut making = self.making();
        // Read under `making`: a claim that saw the daemon running is in the set before
        // `wait_for_claims` can look at it.
        if *self.stopping.borrow() {
            return Err(NameTaken::Stopping(names.first().cloned().unwrap_or_default()));
        }
        for n in names {
            if vms.contains_key(n) {
                return Err(NameTaken::Exists(n.clone()));
            }
            if making.contains_key(n) {
                return Err(NameTaken::Making(n.clone()));
            }
            if let Some(why) = self.damaged().get(n) {
                return Err(NameTaken::Damaged(n.clone(), why.clone()));
            }
        }
        for n in names {
            *making.entry(n.clone()).or_default() += 1;
        }
        Ok(NameClaim { daemon: self.clone(), names: names.to_vec() })
    }

    /// Waits (at most until `deadline`) for every claim to be released; the caller has set
    /// `stopping`, so no new one is made. True if none is left.
    pub(super) async fn wait_for_claims(&self, deadline: std::time::Instant) -> bool {
        loop {
            let left = self.making().len();
            if left == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!("{left} VM names still being made at the shutdown deadline");
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Unlists VM `name` and claims its name until the returned guard drops (see the module
    /// doc); `Ok(None)` if there is no such VM. With `refuse_while_stopping` (a client's
    /// delete) it fails while the daemon stops: the shutdown snapshots and stops the VM and
    /// may save its definition for the next start after a delete had removed it.
    pub(super) fn unlist(
        &self,
        name: &str,
        refuse_while_stopping: bool,
    ) -> Result<Option<(super::daemon::VmHandle, Unlisted<'_>)>, NameTaken> {
        let mut vms = self.lock();
        let mut making = self.making();
        // Read under `making`, as in `claim_names`: a delete that saw the daemon running has
        // its claim in the set before `wait_for_claims` can look at it.
        if refuse_while_stopping && *self.stopping.borrow() {
            return Err(NameTaken::Stopping(name.to_string()));
        }
        let Some(h) = vms.remove(name) else { return Ok(None) };
        *making.entry(name.to_string()).or_default() += 1;
        Ok(Some((h, Unlisted { daemon: self, name: name.to_string() })))
    }

    /// Claims the name of a damaged definition a client deletes until the returned guard
    /// drops, the file gone (see the module doc); `None` if no definition of `name` is damaged.
    pub(super) fn claim_damaged(&self, name: &str) -> Option<Unlisted<'_>> {
        let mut making = self.making();
        if !self.damaged().contains_key(name) {
            return None;
        }
        *making.entry(name.to_string()).or_default() += 1;
        Some(Unlisted { daemon: self, name: name.to_string() })
    }

    fn release(&self, names: &[String]) {
        let mut making = self.making();
        for n in names {
            if let Some(c) = making.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    making.remove(n);
                }
            }
        }
    }

    fn making(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.making.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for NameClaim {
    fn drop(&mut self) {
        self.daemon.release(&self.names);
    }
}

/// The name of a VM being deleted, claimed until its definition is gone ([`Daemon::unlist`]).
pub(super) struct Unlisted<'a> {
    daemon: &'a Daemon,
    name: String,
}

impl Drop for Unlisted<'_> {
    fn drop(&mut self) {
        self.daemon.release(std::slice::from_ref(&self.name));
    }
}

#[cfg(test)]
mod tests {
    use super::super::daemon::{test_daemon as daemon, Daemon};
    use super::super::error::ApiError;

    /// Defined, not started: no KVM needed.
    async fn define(d: &std::sync::Arc<Daemon>, name: &str) {
        let def = serde_json::from_value(serde_json::json!({"name": name, "guest": "idle", "mem_mib": 16}))
            .expect("a definition");
        d.create(def, false).await.expect("created");
    }

    /// A client's delete while the daemon stops is refused (503) and leaves the VM and its
    /// definition (the shutdown snapshots and stops it with the rest, and may save its
    /// definition after a delete had removed it); an internal removal still works then.
    #[tokio::test]
    async fn a_delete_while_the_daemon_stops_is_refused_and_keeps_the_vm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        define(&d, "a").await;
        define(&d, "b").await;
        define(&d, "c").await;
        d.delete("a").await.expect("a delete while running");
        assert!(!dir.path().join("vms/a.json").exists());
        d.stopping.send_replace(true);
        match d.delete("b").await {
            Err(ApiError::Busy(m)) => assert!(m.contains("stopping") && m.contains("'b'"), "{m}"),
            other => panic!("a delete while stopping: {other:?}"),
        }
        assert!(dir.path().join("vms/b.json").exists(), "the refused delete removed the definition");
        assert!(d.lock().contains_key("b"), "the refused delete unlisted the VM");
        assert!(d.making().is_empty(), "the refused delete left a claim: shutdown would wait for it");
        assert!(matches!(d.delete("nope").await, Err(ApiError::Busy(_))));
        assert!(d.forget("c", "its start failed").await, "an internal removal while stopping");
        assert!(!dir.path().join("vms/c.json").exists());
    }

    /// Two deletes of one damaged definition under way at once, then a create of its name:
    /// the create is refused (409) until both deletes have ended. Else the later delete's
    /// removal, begun before, could remove the new VM's definition once saved (with more than
    /// one blocking thread it may run at any time), and the VM was gone at the next start.
    /// One blocking thread, held at first, keeps both deletes under way here.
    #[test]
    fn a_create_waits_for_every_delete_of_a_damaged_definition() {
        use std::future::Future;
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir_all(dir.path().join("vms")).expect("vms");
            std::fs::write(dir.path().join("vms/bad.json"), "{").expect("a damaged definition");
            let d = daemon(dir.path());
            let (free, held) = std::sync::mpsc::channel::<()>();
            let blocker = tokio::task::spawn_blocking(move || held.recv());
            async fn poll_once(f: &mut (impl Future + Unpin)) {
                std::future::poll_fn(|cx| {
                    assert!(std::pin::Pin::new(&mut *f).poll(cx).is_pending(), "the delete ended at once");
                    std::task::Poll::Ready(())
                })
                .await
            }
            let mut first = Box::pin(d.delete("bad"));
            let mut second = Box::pin(d.delete("bad"));
            poll_once(&mut first).await;
            poll_once(&mut second).await;
            free.send(()).expect("free the blocking thread");
            blocker.await.expect("blocker").expect("freed");
            first.await.expect("the first delete");
            let def = serde_json::from_value(serde_json::json!({"name": "bad", "guest": "idle", "mem_mib": 16}))
                .expect("a definition");
            match d.create(def, false).await {
                Err(ApiError::Conflict(m)) => assert!(m.contains("'bad'"), "{m}"),
                other => panic!("a create while a delete of the damaged definition is under way: {other:?}"),
            }
            second.await.expect("the second delete");
            assert!(d.making().is_empty(), "a delete left its claim");
            define(&d, "bad").await;
            assert!(dir.path().join("vms/bad.json").exists());
        });
    }

    /// A damaged definition keeps its VM out and its name taken (409 naming the file, never
    /// overwritten) until a client deletes it; the metric counts it; other VMs load.
    #[tokio::test]
    async fn a_damaged_definition_holds_its_name_until_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let d = daemon(dir.path());
            define(&d, "good").await;
        }
        let bad = dir.path().join("vms/bad.json");
        std::fs::write(&bad, "{\"name\": \"bad\", \"mem_").expect("a damaged definition");
        let d = daemon(dir.path());
        assert!(d.lock().contains_key("good"), "a good definition beside a damaged one was not loaded");
        assert!(!d.lock().contains_key("bad"));
        let text = d.metrics.render(&[], &[], 0);
        assert!(text.contains("snapvisor_vm_definitions_damaged 1"), "{text}");

        let def = serde_json::from_value(serde_json::json!({"name": "bad", "guest": "idle", "mem_mib": 16}))
            .expect("a definition");
        match d.create(def, false).await {
            Err(ApiError::Conflict(m)) => {
                assert!(m.contains("damaged") && m.contains(&bad.display().to_string()), "{m}")
            }
            other => panic!("a create over a damaged definition: {other:?}"),
        }
        assert_eq!(std::fs::read(&bad).expect("kept"), b"{\"name\": \"bad\", \"mem_", "the damaged file was changed");
        assert!(d.making().is_empty(), "the refused create left a claim");
        // Asked about, it is named as damaged, not "no VM".
        match d.info("bad").await {
            Err(ApiError::Conflict(m)) => assert!(m.contains("damaged") && m.contains("DELETE /vms/bad"), "{m}"),
            other => panic!("GET of a damaged definition: {other:?}"),
        }
        assert!(matches!(d.info("nope").await, Err(ApiError::NotFound(_))));

        d.delete("bad").await.expect("deleting the damaged definition");
        assert!(!bad.exists());
        assert!(d.metrics.render(&[], &[], 0).contains("snapvisor_vm_definitions_damaged 0"));
        assert!(matches!(d.delete("bad").await, Err(ApiError::NotFound(_))));
        define(&d, "bad").await;
        assert!(bad.exists());
    }

    /// A damaged definition that is a directory is not removed by a delete: 409 saying so,
    /// the directory and the name's hold kept.
    #[tokio::test]
    async fn a_damaged_definition_that_is_a_directory_is_left_for_the_operator() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(daemon(dir.path()));
        let bad = dir.path().join("vms/dir.json");
        std::fs::create_dir(&bad).expect("a directory where a definition goes");
        std::fs::write(bad.join("inside"), "x").expect("a file in it");
        let d = daemon(dir.path());
        match d.delete("dir").await {
            Err(ApiError::Conflict(m)) => assert!(m.contains("directory") && m.contains("by hand"), "{m}"),
            other => panic!("a delete of a damaged directory: {other:?}"),
        }
        assert!(bad.join("inside").exists());
        assert!(d.making().is_empty(), "the refused delete left a claim");
        assert!(matches!(d.info("dir").await, Err(ApiError::Conflict(_))), "the name was freed");
    }
}
