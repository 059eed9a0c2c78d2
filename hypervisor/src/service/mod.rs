//! `snapvisor serve`: the daemon. One tokio runtime serves the REST API ([`api`]) on a unix
//! socket; every VM is an actor ([`actor`]): a thread that owns the VM and takes requests
//! from a channel, so a VM's failure stops only that VM. VM definitions persist as JSON in
//! the state directory and snapshots in its store, so a restarted daemon knows both (VMs come
//! back defined, not running).
//!
//! Under systemd (`Type=notify`) the daemon reports READY once the socket accepts requests,
//! STATUS lines, and WATCHDOG pings when a watchdog is configured. SIGTERM or SIGINT stops
//! new requests, stops every VM within `--shutdown-timeout` (with `--on-shutdown snapshot`,
//! snapshots the running ones first and resumes them lazily at the next start), removes the
//! socket and exits.

pub mod actor;
pub mod api;
pub mod client;
pub mod daemon;
pub mod error;
pub mod images;
pub mod images_api;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod socket;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sd_notify::NotifyState;

use crate::cli::CliError;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The API socket.
    #[arg(long, default_value = client::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where VM definitions and the snapshot store live.
    #[arg(long, default_value = "/var/lib/snapvisor")]
    pub state_dir: PathBuf,
    /// Seconds to stop the VMs in on SIGTERM before exiting anyway.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Also serve `GET /metrics` (only) on this loopback TCP address, e.g. 127.0.0.1:9101.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// On SIGTERM, stop running VMs, or snapshot them and resume them (lazily) at the next start.
    #[arg(long, value_enum, default_value_t = OnShutdown::Stop)]
    pub on_shutdown: OnShutdown,
    /// Let this group use the API socket (mode 0660); without it only the daemon's user can
    /// (0600). API access is control of every VM: grant it as you would root.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Where the kernels and initrds that API requests name live (`PUT /images/NAME` adds
    /// one); default `STATE_DIR/images` (/var/lib/snapvisor/images).
    #[arg(long)]
    pub image_dir: Option<PathBuf>,
    /// The largest image, in bytes, that a VM may boot or a client may upload.
    #[arg(long, default_value_t = images::DEFAULT_MAX_IMAGE_BYTES)]
    pub max_image_size: u64,
    /// Guest memory all VMs together may have: MiB, a size (16G) or a share of host RAM
    /// (default 75%).
    #[arg(long)]
    pub max_guest_memory: Option<String>,
}

/// What happens to running VMs when the daemon stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnShutdown {
    Stop,
    Snapshot,
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, so call it
/// before announcing readiness: a signal that arrives early must not kill the daemon uncleanly.
fn terminated() -> Result<impl std::future::Future<Output = ()>, CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let err = |e: std::io::Error| CliError::Internal(format!("installing signal handlers: {e}"));
    let mut term = signal(SignalKind::terminate()).map_err(err)?;
    let mut int = signal(SignalKind::interrupt()).map_err(err)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn input(e: impl std::fmt::Display) -> CliError {
    CliError::Input(e.to_string())
}

pub fn run(args: ServeArgs) -> Result<(), CliError> {
    // Before any thread or file exists: nothing the daemon creates (socket, state, packs) is
    // readable by others unless it widens it on purpose.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Threads for blocking work (snapshots, restores) retire soon after a burst.
        .thread_keep_alive(Duration::from_secs(1))
        .enable_all()
        .build()
        .map_err(|e| CliError::Internal(format!("starting the runtime: {e}")))?;
    rt.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    if let Some(addr) = args.metrics_addr.filter(|a| !a.ip().is_loopback()) {
        return Err(CliError::Input(format!("--metrics-addr {addr}: only loopback addresses are served")));
    }
    let shutdown = terminated()?;
    let host_mib = crate::memory::host_mem_mib().map_err(|e| CliError::Internal(e.to_string()))?;
    let max_guest_mib = match &args.max_guest_memory {
        Some(v) => limits::parse_budget(v, host_mib).map_err(input)?,
        None => limits::default_budget().map_err(input)?,
    };
    let image_dir = args.image_dir.clone().unwrap_or_else(|| args.state_dir.join("images"));
    let images = images::ImageDir::open(&image_dir, args.max_image_size).map_err(input)?;
    tracing::info!(image_dir = %image_dir.display(), max_guest_mib, "limits");
    let config = daemon::DaemonConfig { images, max_guest_mib };
    let daemon = daemon::Daemon::open(&args.state_dir, config)
        .map_err(|e| CliError::Input(format!("state directory {}: {e}", args.state_dir.display())))?;
    let group = args.socket_group.as_deref().map(socket::lookup_group).transpose().map_err(input)?;
    let (listener, claimed) = socket::claim(&args.socket, group).map_err(input)?;
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
        .map_err(|e| CliError::Internal(format!("socket {}: {e}", args.socket.display())))?;
    if let Some(addr) = args.metrics_addr {
        let tcp =
            tokio::net::TcpListener::bind(addr).await.map_err(|e| CliError::Input(format!("binding {addr}: {e}")))?;
        let app = api::metrics_router(daemon.clone());
        let mut stop = daemon.stopping.subscribe();
        tokio::spawn(async move {
            let served = axum::serve(tcp, app).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
            if let Err(e) = served.await {
                tracing::error!("metrics endpoint: {e}");
            }
        });
    }
    tracing::info!(socket = %args.socket.display(), "snapvisor daemon ready");
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
            loop {
                tick.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        });
    }
    let served = axum::serve(listener, api::router(daemon.clone()))
        .with_graceful_shutdown({
            let d = daemon.clone();
            async move {
                shutdown.await;
                let _ = d.stopping.send(true);
            }
        })
        .await;
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping VMs")]);
    let d = daemon.clone();
    let snapshot = args.on_shutdown == OnShutdown::Snapshot;
    let stop = tokio::task::spawn_blocking(move || d.shutdown(snapshot));
    if tokio::time::timeout(Duration::from_secs(args.shutdown_timeout), stop).await.is_err() {
        tracing::warn!("VMs did not stop within {} s; exiting anyway", args.shutdown_timeout);
    }
    claimed.release();
    served.map_err(|e| CliError::Internal(format!("serving the API: {e}")))
}
