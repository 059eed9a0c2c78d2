//! The image routes: `GET /images`, `PUT /images/{name}` (the body is the file, streamed to
//! disk, at most `--max-image-size` bytes: more gets `413`) and `DELETE /images/{name}`.
//! [`super::images`] holds the rules.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;

use super::daemon::Daemon;
use super::error::ApiError;
use super::images::{validate_name, ImageError};

type Api = State<Arc<Daemon>>;

/// Runs image work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(e.to_string()))?.map_err(ApiError::from_image)
}

pub async fn list(State(d): Api) -> Result<Response, ApiError> {
    let images = d.images.clone();
    Ok(Json(blocking(move || images.list()).await?).into_response())
}

pub async fn delete(State(d): Api, Path(name): Path<String>) -> Result<Response, ApiError> {
    let images = d.images.clone();
    blocking(move || images.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn upload(
    State(d): Api,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    validate_name(&name).map_err(ApiError::from_image)?;
    let limit = d.images.max_bytes();
    let too_large = || ApiError::from_image(ImageError::TooLarge { name: name.clone(), limit });
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // A blocking writer fed chunk by chunk: the body never sits in memory whole.
    // `None` means the body broke off: the writer drops the upload, which removes its file.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(4);
    let (images, n) = (d.images.clone(), name.clone());
    let writer = tokio::task::spawn_blocking(move || {
        let mut up = images.upload(&n)?;
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Some(c) => up.write(&c)?,
                None => return Ok(None),
            }
        }
        up.commit().map(Some)
    });
    let mut stream = body.into_data_stream();
    let mut failed = None;
    loop {
        // Each piece of the body is due within the body timeout: a stalled client cannot hold
        // the upload (and its connection) open for ever.
        let next = match tokio::time::timeout(super::server::BODY_TIMEOUT, stream.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                // `None` tells the writer the body broke off: it drops the partial file.
                let _ = tx.send(None).await;
                failed = Some(format!(
                    "image {name:?}: the request body stalled for {} s; upload dropped",
                    super::server::BODY_TIMEOUT.as_secs()
                ));
                break;
            }
        };
        let c = next.map_err(|e| format!("image {name:?}: reading the request body: {e}"));
        let stop = c.is_err();
        // A send fails only when the writer stopped: its error is reported below.
        if tx.send(c.as_ref().ok().cloned()).await.is_err() || stop {
            failed = c.err();
            break;
        }
    }
    drop(tx);
    let written = writer.await.map_err(|e| ApiError::Internal(e.to_string()))?.map_err(ApiError::from_image)?;
    let size = match (written, failed) {
        (Some(size), None) => size,
        (_, Some(e)) => return Err(ApiError::BadRequest(e)),
        (None, None) => return Err(ApiError::Internal(format!("image {name:?}: the upload broke off"))),
    };
    tracing::info!(image = %name, size, "image uploaded");
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "name": name, "size": size }))).into_response())
}
