//! The REST API on the daemon's unix socket. Every body is JSON; every error is
//! `{"error": "..."}` with a 4xx status for bad requests (400 bad input, 404 unknown VM or
//! snapshot, 409 a name in use or a VM in the wrong state) and 5xx for the daemon's own
//! failures. `docs/openapi.json` describes the same routes and is served at `/openapi.json`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::actor::{Cmd, Reply};
use super::daemon::Daemon;
use super::error::ApiError;
use super::restore::RestoreAs;
use super::server::read_body_in_time;
use super::vm_def::VmDef;
use crate::guests::Builtin;
use crate::net::overrides::NetOverride;
use crate::snapshot::RestoreMode;

/// The OpenAPI document, kept in the repository.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

type Api = State<Arc<Daemon>>;

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v).map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!("request body: larger than the {} bytes allowed", super::limits::MAX_JSON_BODY))
        }
        _ => ApiError::BadRequest(format!("request body: {}", e.body_text())),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVm {
    name: String,
    #[serde(default)]
    guest: Option<Builtin>,
    /// Image names in the image directory, not paths.
    #[serde(default)]
    kernel: Option<String>,
    #[serde(default)]
    initrd: Option<String>,
    #[serde(default)]
    cmdline: Option<String>,
    /// `seabios`, or a firmware image's name in the image directory.
    #[serde(default)]
    firmware: Option<String>,
    mem_mib: u64,
    #[serde(default = "one")]
    vcpus: u64,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    passes: u64,
    /// netping's options (see [`crate::cli::guest_args::NetpingDef`]).
    #[serde(default)]
    netping: Option<Box<crate::cli::guest_args::NetpingDef>>,
    #[serde(default)]
    start: bool,
    /// NICs: `[{"tap": "tap0", "mac": "52:54:00:..", "romfile": IMAGE|"none", "romsize": N}]`.
    #[serde(default)]
    net: Vec<super::net_api::ApiNic>,
}

fn one() -> u64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotReq {
    name: String,
    #[serde(default)]
    live: bool,
    /// background (the default), stop or live; `live: true` is the same as `mode: live`.
    #[serde(default)]
    mode: Option<crate::snapshot::SaveMode>,
    /// Return 202 with an operation id at once instead of waiting.
    #[serde(default, rename = "async")]
    background: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreReq {
    vm: String,
    #[serde(default = "lazy")]
    mode: RestoreMode,
    /// Other taps and/or MACs for some of the snapshot's NICs.
    #[serde(default)]
    network_overrides: Vec<NetOverride>,
}

/// The daemon restores lazily unless asked otherwise.
fn lazy() -> RestoreMode {
    RestoreMode::Lazy
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneReq {
    prefix: String,
    count: usize,
    #[serde(default = "lazy")]
    mode: RestoreMode,
    /// Return 202 with an operation id at once instead of waiting.
    #[serde(default, rename = "async")]
    background: bool,
    /// Per clone (entry i for clone i; none, or one per clone): its NICs' taps and/or MACs.
    /// A clone's NIC that no override gives a MAC gets a new one.
    #[serde(default)]
    network_overrides: Vec<Vec<NetOverride>>,
    /// Lazy clones: `shared` (the default) maps one copy of the snapshot's memory into every
    /// clone, copy-on-write; `private` gives each clone its own copy of every page.
    #[serde(default)]
    memory: super::clone::CloneMemory,
}

/// Decodes `bytes` as the JSON body of every route that takes one, with the types those
/// routes use, and checks what is checked before anything is done (names, the boot choice).
/// For the fuzz tests (tests/tests/fuzz_parsers.rs): it must return, never panic. Returns how
/// many routes would accept the body.
pub fn decode_bodies(bytes: &[u8]) -> usize {
    let create = serde_json::from_slice::<CreateVm>(bytes).ok().filter(|c| {
        let def = VmDef {
            name: c.name.clone(),
            guest: c.guest,
            kernel: c.kernel.clone(),
            initrd: c.initrd.clone(),
            cmdline: c.cmdline.clone(),
            firmware: c.firmware.clone(),
            mem_mib: c.mem_mib,
            vcpus: c.vcpus,
            seed: c.seed,
            passes: c.passes,
            restored_from: None,
            resume_from: None,
            resume_paused: false,
            netping: c.netping.clone(),
            net: c.net.clone(),
        };
        let firmware = def.firmware.clone().filter(|f| f != super::vm_def::SEABIOS);
        let images_ok = [&def.kernel, &def.initrd, &firmware]
            .into_iter()
            .flatten()
            .all(|n| super::images::validate_name(n).is_ok());
        def.check_boot().is_ok() && images_ok && super::net_api::check_list(&def.net).is_ok()
    });
    let snapshot =
        serde_json::from_slice::<SnapshotReq>(bytes).ok().filter(|s| storage::validate_snapshot_name(&s.name).is_ok());
    let restore = serde_json::from_slice::<RestoreReq>(bytes).ok();
    let clone = serde_json::from_slice::<CloneReq>(bytes)
        .ok()
        .filter(|c| (1..=MAX_CLONES).contains(&c.count) && check_overrides(c).is_ok());
    [create.is_some(), snapshot.is_some(), restore.is_some(), clone.is_some()].into_iter().filter(|&b| b).count()
}

/// The most clones one request may ask for.
const MAX_CLONES: usize = 256;

/// A clone request's overrides: none, or one list per clone.
fn check_overrides(c: &CloneReq) -> Result<(), String> {
    if c.network_overrides.is_empty() || c.network_overrides.len() == c.count {
        Ok(())
    } else {
        Err(format!(
            "network_overrides has {} entries for {} clones: give one list per clone (or none)",
            c.network_overrides.len(),
            c.count
        ))
    }
}

async fn list_vms(State(d): Api) -> Response {
    Json(d.list().await).into_response()
}

async fn create_vm(State(d): Api, b: Result<Json<CreateVm>, JsonRejection>) -> Result<Response, ApiError> {
    let c = body(b)?;
    let def = VmDef {
        name: c.name,
        guest: c.guest,
        kernel: c.kernel,
        initrd: c.initrd,
        cmdline: c.cmdline,
        firmware: c.firmware,
        mem_mib: c.mem_mib,
        vcpus: c.vcpus,
        seed: c.seed,
        passes: c.passes,
        restored_from: None,
        resume_from: None,
        resume_paused: false,
        netping: c.netping,
        net: c.net,
    };
    let start = c.start;
    let info = {
        let d = d.clone();
        to_completion(async move { d.create(def, start).await }).await?
    };
    d.event(&info.def.name, "created", serde_json::json!({ "state": info.state }));
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn vm_info(State(d): Api, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(d.info(&name).await?).into_response())
}

async fn delete_vm(State(d): Api, Path(name): Path<String>) -> Result<Response, ApiError> {
    d.delete(&name).await?;
    d.event(&name, "deleted", serde_json::Value::Null);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn vm_action(State(d): Api, Path((name, action)): Path<(String, String)>) -> Result<Response, ApiError> {
    let cmd = match action.as_str() {
        "start" => Cmd::Start,
        "pause" => Cmd::Pause,
        "resume" => Cmd::Resume,
        "stop" => Cmd::Stop,
        other => return Err(ApiError::NotFound(format!("no action '{other}' (start, pause, resume, stop)"))),
    };
    d.call(&name, cmd).await?;
    let info = d.info(&name).await?;
    d.event(&name, &action, serde_json::json!({ "state": info.state }));
    Ok(Json(info).into_response())
}

async fn vm_debugcon(State(d): Api, Path(name): Path<String>) -> Result<Response, ApiError> {
    let s = d.debugcon(&name)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], s).into_response())
}

async fn vm_serial(State(d): Api, Path(name): Path<String>) -> Result<Response, ApiError> {
    let s = d.serial(&name)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], s).into_response())
}

async fn vm_snapshot(
    State(d): Api,
    Path(name): Path<String>,
    b: Result<Json<SnapshotReq>, JsonRejection>,
) -> Result<Response, ApiError> {
    let s = body(b)?;
    storage::validate_snapshot_name(&s.name)
        .map_err(|e| ApiError::BadRequest(format!("snapshot name {:?}: {e}", s.name)))?;
    super::shutdown::check_user_snapshot_name(&s.name)?;
    d.info(&name).await?;
    let op = s.background.then(|| d.ops.start("snapshot", super::progress::initial()));
    if s.live && s.mode.is_some_and(|m| m != crate::snapshot::SaveMode::Live) {
        return Err(ApiError::BadRequest(format!("\"live\": true contradicts \"mode\": {:?}", s.mode)));
    }
    let cmd = Cmd::Snapshot { name: s.name, live: s.live, mode: s.mode.unwrap_or_default(), progress: op.clone() };
    let Some(op) = op else {
        // The client waits for the outcome: even a daemon that is stopping answers it.
        let _owed = d.owe_answer();
        return match d.call(&name, cmd).await? {
            Reply::Snapshot(r) => {
                d.event(&name, "snapshot", serde_json::json!({ "snapshot": r.name, "live": r.live, "mode": r.mode }));
                Ok((StatusCode::CREATED, Json(r)).into_response())
            }
            _ => Err(ApiError::Internal("unexpected reply".into())),
        };
    };
    let id = op.id();
    tokio::spawn(async move {
        op.finish(match d.call(&name, cmd).await {
            Ok(Reply::Snapshot(r)) => {
                d.event(&name, "snapshot", serde_json::json!({ "snapshot": r.name, "live": r.live, "mode": r.mode }));
                serde_json::to_value(r).map_err(|e| e.to_string())
            }
            Ok(_) => Err("unexpected reply".into()),
            Err(e) => Err(e.to_string()),
        })
    });
    Ok(accepted(id))
}

/// `202 Accepted` with the operation to poll.
fn accepted(id: u64) -> Response {
    (StatusCode::ACCEPTED, Json(serde_json::json!({ "operation": id, "status": format!("/operations/{id}") })))
        .into_response()
}

async fn operation(State(d): Api, Path(id): Path<String>) -> Result<Response, ApiError> {
    let n: u64 = id.parse().map_err(|_| ApiError::BadRequest(format!("operation id {id:?} is not a number")))?;
    let op = d.ops.get(n).ok_or_else(|| ApiError::NotFound(format!("no operation {n}")))?;
    Ok(Json(op).into_response())
}

async fn list_snapshots(State(d): Api) -> Result<Response, ApiError> {
    let store = d.store.clone();
    let names =
        tokio::task::spawn_blocking(move || store.list()).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(names.map_err(|e| ApiError::from_store(&e))?).into_response())
}

async fn delete_snapshot(State(d): Api, Path(name): Path<String>) -> Result<Response, ApiError> {
    storage::validate_snapshot_name(&name).map_err(|e| ApiError::BadRequest(format!("snapshot name {name:?}: {e}")))?;
    let store = d.store.clone();
    tokio::task::spawn_blocking(move || store.delete(&name))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        // Pinned (a restored VM still reads from it) is 409, naming the VMs.
        .map_err(|e| ApiError::from_store(&e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn restore_snapshot(
    State(d): Api,
    Path(name): Path<String>,
    b: Result<Json<RestoreReq>, JsonRejection>,
) -> Result<Response, ApiError> {
    let mut r = body(b)?;
    super::net_api::resolve_overrides(&mut r.network_overrides, &d.images)?;
    let info = to_completion(async move {
        d.restore_as(&name, &r.vm, RestoreAs { mode: r.mode, net_overrides: r.network_overrides, ..Default::default() })
            .await
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// Runs `work` as a task of its own, so a client that hangs up does not cut it short: a
/// restore or clone holds its memory reservation and MAC claims until its VMs are registered
/// (or, on failure, removed again), never just until the request goes away while the blocking
/// part runs on. What the client missed is in `GET /vms`.
async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work).await.map_err(|e| ApiError::Internal(format!("the request's task failed: {e}")))?
}

async fn clone_snapshot(
    State(d): Api,
    Path(name): Path<String>,
    b: Result<Json<CloneReq>, JsonRejection>,
) -> Result<Response, ApiError> {
    let mut c = body(b)?;
    for o in c.network_overrides.iter_mut() {
        super::net_api::resolve_overrides(o, &d.images)?;
    }
    if c.count == 0 || c.count > MAX_CLONES {
        return Err(ApiError::BadRequest(format!("clone count {}: 1 to {MAX_CLONES} allowed", c.count)));
    }
    check_overrides(&c).map_err(ApiError::BadRequest)?;
    let op = c.background.then(|| d.ops.start("clone", super::clone::initial_progress(c.count)));
    let run = {
        let op = op.clone();
        async move {
            let (prefix, mode, memory) = (c.prefix, c.mode, c.memory);
            d.clone_snapshot(&name, &prefix, c.count, (mode, memory), c.network_overrides, op.as_ref()).await
        }
    };
    let Some(op) = op else {
        return Ok((StatusCode::CREATED, Json(to_completion(run).await?)).into_response());
    };
    let id = op.id();
    tokio::spawn(async move {
        op.finish(match run.await {
            Ok(vms) => serde_json::to_value(vms).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        })
    });
    Ok(accepted(id))
}

/// Runs a blocking store operation off the async threads and answers with its JSON result.
async fn store_call<T: serde::Serialize + Send + 'static>(
    d: &Daemon,
    f: impl FnOnce(storage::Store) -> Result<T, storage::StoreError> + Send + 'static,
) -> Result<Response, ApiError> {
    let store = d.store.clone();
    let v = tokio::task::spawn_blocking(move || f(store))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::from_store(&e))?;
    Ok(Json(v).into_response())
}

async fn store_usage(State(d): Api) -> Result<Response, ApiError> {
    store_call(&d, |s| s.usage()).await
}

async fn store_gc(State(d): Api) -> Result<Response, ApiError> {
    store_call(&d, |s| s.gc()).await
}

async fn metrics(State(d): Api) -> Response {
    let stored = d.stored_bytes().await;
    let vms = d.list().await;
    let per_vm: Vec<(String, u64, u64)> =
        vms.iter().map(|i| (i.def.name.clone(), i.exits, i.lazy_faults.unwrap_or(0))).collect();
    let counts = super::daemon::count_states(&vms);
    let mut text = d.metrics.render(&counts, &per_vm, stored);
    // /proc reads, off the async threads.
    if let Ok(process) = tokio::task::spawn_blocking(|| {
        let mut out = String::new();
        super::metrics::render_process(&mut out);
        out
    })
    .await
    {
        text.push_str(&process);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Newline-delimited JSON events, one per line, for as long as the client stays connected.
async fn events(State(d): Api) -> Response {
    let state = (d.events.subscribe(), d.stopping.subscribe());
    let stream = futures_util::stream::unfold(state, |(mut rx, mut stop)| async move {
        let line = tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) => format!("{ev}\n"),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    format!("{}\n", serde_json::json!({ "event": "lagged", "detail": { "lost": n } }))
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            },
            // The daemon is stopping: end the stream so the connection can close.
            _ = stop.wait_for(|s| *s) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(line), (rx, stop)))
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(stream)).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route (see GET /openapi.json)".into())
}

/// Counts requests and errors.
async fn count(State(d): Api, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    d.metrics.requests.fetch_add(1, Relaxed);
    let res = next.run(req).await;
    if res.status().is_client_error() || res.status().is_server_error() {
        d.metrics.request_errors.fetch_add(1, Relaxed);
    }
    res
}

/// Every route, as `(method, path)`: the OpenAPI test checks the document against it.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/vms"),
    ("post", "/vms"),
    ("get", "/vms/{name}"),
    ("delete", "/vms/{name}"),
    ("post", "/vms/{name}/{action}"),
    ("get", "/vms/{name}/serial"),
    ("get", "/vms/{name}/debugcon"),
    ("post", "/vms/{name}/snapshot"),
    ("get", "/snapshots"),
    ("delete", "/snapshots/{name}"),
    ("post", "/snapshots/{name}/restore"),
    ("post", "/snapshots/{name}/clone"),
    ("get", "/operations/{id}"),
    ("get", "/store"),
    ("post", "/store/gc"),
    ("get", "/events"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/images"),
    ("put", "/images/{name}"),
    ("delete", "/images/{name}"),
];

/// Only `GET /metrics`, for a loopback TCP listener.
pub fn metrics_router(d: Arc<Daemon>) -> Router {
    Router::new().route("/metrics", get(metrics)).fallback(not_found).with_state(d)
}

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/vms", get(list_vms).post(create_vm))
        .route("/vms/{name}", get(vm_info).delete(delete_vm))
        .route("/vms/{name}/serial", get(vm_serial))
        .route("/vms/{name}/debugcon", get(vm_debugcon))
        .route("/vms/{name}/snapshot", post(vm_snapshot))
        .route("/vms/{name}/{action}", post(vm_action))
        .route("/snapshots", get(list_snapshots))
        .route("/snapshots/{name}", axum::routing::delete(delete_snapshot))
        .route("/snapshots/{name}/restore", post(restore_snapshot))
        .route("/snapshots/{name}/clone", post(clone_snapshot))
        .route("/operations/{id}", get(operation))
        .route("/store", get(store_usage))
        .route("/store/gc", post(store_gc))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/images", get(super::images_api::list))
        .route(
            "/images/{name}",
            axum::routing::put(super::images_api::upload)
                .delete(super::images_api::delete)
                // Uploads stream to disk under their own limit (--max-image-size).
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .layer(axum::extract::DefaultBodyLimit::max(super::limits::MAX_JSON_BODY))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(read_body_in_time))
        .layer(axum::middleware::from_fn_with_state(d.clone(), count))
        .with_state(d)
}
