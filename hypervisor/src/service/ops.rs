//! Long operations (snapshots, clones) run in the background when asked: the request returns
//! `202 Accepted` with an operation id at once, and `GET /operations/{id}` reports progress,
//! then the result or the error. Finished operations are kept (the last `KEEP`) for clients
//! that poll late.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use serde_json::Value;

/// Finished operations kept for polling.
const KEEP: usize = 256;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    Running,
    Done,
    Failed,
}

/// An operation as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Operation {
    pub id: u64,
    pub kind: String,
    pub state: OpState,
    /// What has been done so far (operation-specific, e.g. rounds and bytes copied).
    pub progress: Value,
    pub result: Option<Value>,
    pub error: Option<String>,
}

#[derive(Default)]
pub struct Ops {
    inner: Mutex<(u64, BTreeMap<u64, Operation>)>,
}

/// A handle an operation's worker updates.
#[derive(Clone)]
pub struct OpHandle {
    ops: Arc<Ops>,
    id: u64,
}

impl Ops {
    /// Starts an operation of `kind` whose progress is `progress` until it reports more; every
    /// report of one kind has the shape of its first (service/progress.rs, clone.rs).
    pub fn start(self: &Arc<Self>, kind: &str, progress: Value) -> OpHandle {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        g.0 += 1;
        let id = g.0;
        g.1.insert(
            id,
            Operation { id, kind: kind.into(), state: OpState::Running, progress, result: None, error: None },
        );
        while g.1.len() > KEEP {
            let Some(old) = g.1.iter().find(|(_, o)| !matches!(o.state, OpState::Running)).map(|(k, _)| *k) else {
                break;
            };
            g.1.remove(&old);
        }
        OpHandle { ops: self.clone(), id }
    }

    pub fn get(&self, id: u64) -> Option<Operation> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).1.get(&id).cloned()
    }
}

impl OpHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    fn update(&self, f: impl FnOnce(&mut Operation)) {
        if let Some(op) = self.ops.inner.lock().unwrap_or_else(PoisonError::into_inner).1.get_mut(&self.id) {
            f(op);
        }
    }

    pub fn progress(&self, p: Value) {
        self.update(|op| op.progress = p);
    }

    pub fn finish(&self, r: Result<Value, String>) {
        self.update(|op| match r {
            Ok(v) => {
                op.state = OpState::Done;
                op.result = Some(v);
            }
            Err(e) => {
                op.state = OpState::Failed;
                op.error = Some(e);
            }
        });
    }
}
