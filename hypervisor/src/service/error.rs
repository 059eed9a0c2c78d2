//! API errors: each maps to one HTTP status and a JSON body `{"error": "..."}` naming the
//! problem and the value.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::snapshot::SnapshotError;
use crate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    /// The request body is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The guest memory budget has no room (see [`super::limits`]).
    #[error("{0}")]
    OverBudget(#[from] super::limits::OverBudget),
    /// The VM's request queue is full.
    #[error("{0}")]
    Busy(String),
    /// The VM did not answer within the request's deadline.
    #[error("{0}")]
    Timeout(String),
    /// The client did not send its request in time.
    #[error("{0}")]
    SlowClient(String),
    /// The store's file system has no room for what the request writes (507).
    #[error("{0}")]
    StoreFull(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::OverBudget(_) => StatusCode::CONFLICT,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::SlowClient(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::StoreFull(_) => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    /// A store error: 404 for a missing snapshot, 409 for one that exists, is being written
    /// or is in use, 400 for a bad name, 507 when the store's file system is full (the
    /// store's own reserve check, or ENOSPC from a write of a pack, manifest or the index,
    /// [`storage::StoreError::is_no_room`]), 500 for the rest (damage included:
    /// the message names the snapshot and the chunk).
    pub fn from_store(e: &storage::StoreError) -> ApiError {
        use storage::StoreError as S;
        match e {
            S::NotFound(_) => ApiError::NotFound(e.to_string()),
            S::Exists(_) | S::Busy(_) | S::Pinned { .. } => ApiError::Conflict(e.to_string()),
            S::Name(_) => ApiError::BadRequest(e.to_string()),
            _ if e.is_no_room() => ApiError::StoreFull(e.to_string()),
            _ => ApiError::Internal(e.to_string()),
        }
    }

    /// A write to the state directory that failed (a VM definition): 507 when its file
    /// system has no room, 500 otherwise; `what` names what was written.
    pub fn from_write(what: &str, e: &std::io::Error) -> ApiError {
        let msg = format!("{what}: {e}");
        if storage::is_no_room(e) {
            ApiError::StoreFull(msg)
        } else {
            ApiError::Internal(msg)
        }
    }

    pub fn from_vm(e: &VmError) -> ApiError {
        use crate::net::nic::NicError;
        if let VmError::Nic(NicError::Tap { source, .. }) = e {
            if matches!(**source, devices::net::tap::TapError::Busy { .. }) {
                return ApiError::Conflict(e.to_string());
            }
        }
        match crate::cli::run::vm_error_is_input(e) {
            true => ApiError::BadRequest(e.to_string()),
            false => ApiError::Internal(e.to_string()),
        }
    }

    pub fn from_image(e: super::images::ImageError) -> ApiError {
        use super::images::ImageError as I;
        match e {
            I::NotFound { .. } => ApiError::NotFound(e.to_string()),
            I::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
            I::Io { ref source, .. } if storage::is_no_room(source) => ApiError::StoreFull(e.to_string()),
            e if e.is_input() => ApiError::BadRequest(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }

    pub fn from_snapshot(e: &SnapshotError) -> ApiError {
        match e {
            SnapshotError::Store(s) => match ApiError::from_store(s) {
                // The snapshot's own words (they may say more than the store's).
                ApiError::Internal(_) => ApiError::Internal(e.to_string()),
                mapped => mapped,
            },
            SnapshotError::Check(_)
            | SnapshotError::Format(_)
            | SnapshotError::NetCount { .. }
            | SnapshotError::NetSpec { .. }
            | SnapshotError::FwCfgFiles { .. } => ApiError::BadRequest(e.to_string()),
            SnapshotError::Vm(v) => ApiError::from_vm(v),
            SnapshotError::Cancelled | SnapshotError::Replaced { .. } => ApiError::Conflict(e.to_string()),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}
