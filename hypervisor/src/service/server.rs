//! Serving HTTP/1 connections so that no client can hold up the daemon.
//!
//! - A client has [`HEADER_TIMEOUT`] to send a request's headers and [`BODY_TIMEOUT`] to send
//!   its body ([`read_body_in_time`]); one that stalls gets 408 or is disconnected.
//! - When the daemon stops, [`Server`] stops accepting, asks every connection to close after
//!   its current response (idle keep-alive connections close at once), and drops whatever is
//!   still open after the grace period: a half-sent request or an endless response never keeps
//!   the daemon from exiting.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::error::ApiError;

/// Time a client has to send the headers of a request (also how long an idle keep-alive
/// connection stays open).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an owed answer has to be written once it is ready, while the daemon stops.
pub const FINAL_WRITE: Duration = Duration::from_millis(300);
/// The largest request body read (every request body here is a small JSON object).
const MAX_BODY: usize = 2 << 20;

/// Reads the whole request body within [`BODY_TIMEOUT`] before the handler runs, so that a
/// handler never waits on a slow client.
///
/// Image uploads (`PUT /images/NAME`) are the exception: they stream to disk under their own
/// size limit, each piece of the body due within [`BODY_TIMEOUT`] (`images_api::upload`).
pub async fn read_body_in_time(req: Request, next: Next) -> Response {
    if req.method() == axum::http::Method::PUT && req.uri().path().starts_with("/images/") {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(e)) => ApiError::BadRequest(format!("request body: {e} (at most {MAX_BODY} bytes)")).into_response(),
        Err(_) => ApiError::SlowClient(format!(
            "request body: not received within {} s; closing the connection",
            BODY_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A listening socket: the API's unix socket or the loopback metrics port.
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Unix(l) => Box::new(l.accept().await?.0),
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// Serves one listener until told to stop.
pub struct Server {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn start(listener: Listener, app: Router) -> Server {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, app, rx));
        Server { stop, task }
    }

    /// Stops accepting and closes every connection: at once when idle, after its response
    /// otherwise, and by force after `grace`.
    pub async fn stop(self, grace: Duration) {
        self.stop_after(grace, std::future::ready(())).await;
    }

    /// Like [`Server::stop`], but connections still open after `grace` are dropped only once
    /// `owed` resolves (every answer a client is owed was given, or the shutdown deadline)
    /// and the answers had [`FINAL_WRITE`] to go out.
    pub async fn stop_after(self, grace: Duration, owed: impl std::future::Future<Output = ()>) {
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_ok() {
            return;
        }
        owed.await;
        if tokio::time::timeout(FINAL_WRITE, &mut task).await.is_err() {
            abort.abort();
            tracing::warn!("connections still open {} ms after the shutdown began were dropped", grace.as_millis());
        }
    }
}

/// Resolves once the stop flag is set.
async fn stopping(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn accept_loop(listener: Listener, app: Router, stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    let mut stopped = stop.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(io) => { conns.spawn(serve_conn(io, app.clone(), stop.clone())); }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = stopping(&mut stopped) => break,
        }
    }
    drop(listener);
    // When this task is aborted, dropping the set aborts (and so closes) every connection.
    while conns.join_next().await.is_some() {}
}

async fn serve_conn(io: Box<dyn Io>, app: Router, mut stop: watch::Receiver<bool>) {
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection: {e}");
            }
            return;
        }
        () = stopping(&mut stop) => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!("connection at shutdown: {e}");
    }
}
