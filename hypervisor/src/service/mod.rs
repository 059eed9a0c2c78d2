//! `snapvisor serve`: the daemon. One tokio runtime serves the REST API ([`api`]) on a unix
//! socket; every VM is an actor ([`actor`]): a thread that owns the VM and takes requests
//! from a channel, so a VM's failure stops only that VM. VM definitions persist as JSON in
//! the state directory and snapshots in its store, so a restarted daemon knows both (VMs come
//! back defined, not running).
//!
//! Under systemd (`Type=notify`) the daemon reports READY once the socket accepts requests,
//! STATUS lines, and WATCHDOG pings while the daemon is healthy (see [`watchdog`]). SIGTERM
//! or SIGINT stops accepting, closes connections (stalled ones after [`CONN_GRACE`]), stops
//! every VM (with `--on-shutdown snapshot`, snapshots the running and paused ones first and
//! resumes them lazily at the next start, see [`shutdown`]), removes the socket and exits, all
//! within `--shutdown-timeout` plus [`EXIT_MARGIN`], whatever clients and VMs do.

pub mod actor;
pub mod api;
pub mod client;
pub mod clone;
pub mod daemon;
mod defs;
pub mod error;
pub mod events;
#[cfg(test)]
mod fill_wait_tests;
pub mod housekeeping;
pub mod images;
pub mod images_api;
pub mod limits;
pub mod mac_claims;
pub mod macs;
pub mod metrics;
mod names;
pub mod net_api;
pub mod ops;
mod pending;
pub mod progress;
pub mod restore;
pub mod server;
pub mod shutdown;
pub mod socket;
pub mod vm_def;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Seconds to stop (or snapshot) the VMs in on SIGTERM before exiting anyway; the daemon
    /// exits within this plus about a second.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Also serve `GET /metrics` (only) on this loopback TCP address, e.g. 127.0.0.1:9101.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How the store compresses the chunks new snapshots add: zstd (fewer bytes) or lz4 (less
    /// CPU per snapshot, ~1.4x the bytes; see `cli/store_codec.rs`).
    #[arg(long, value_enum, default_value_t = crate::cli::store_codec::StoreCodec::Zstd)]
    pub store_codec: crate::cli::store_codec::StoreCodec,
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
    /// Drop decompressed chunks no lazy restore has used for this many seconds (clones that
    /// fill together share them; an idle daemon gives the memory back).
    #[arg(long, default_value_t = 10)]
    pub cache_idle_secs: u64,
    /// Build every restored VM afresh. By default the daemon keeps one pre-built VM shell
    /// (the KVM VM, its memory slots, irqchip and vCPUs) of the shape it restored last, so
    /// that the next restore of that shape skips building it: 3-9 ms of a 4 GiB restore's
    /// time to first instruction on the development machines.
    #[arg(long)]
    pub no_shell_pool: bool,
    /// Tests only: a background snapshot waits before copying until it is cancelled (or 60 s
    /// pass), so a test can act while it surely runs.
    #[arg(long, hide = true)]
    pub test_hold_snapshot_copy: bool,
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
/// How long open connections get to finish their response once the daemon stops.
pub const CONN_GRACE: Duration = Duration::from_secs(2);
/// What the daemon may take beyond `--shutdown-timeout` to tear down and exit.
pub const EXIT_MARGIN: Duration = Duration::from_secs(1);

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
    let r = rt.block_on(serve(args));
    // Blocking work still running (a store call, a VM's teardown) must not hold up the exit.
    rt.shutdown_timeout(Duration::from_millis(200));
    r
}

/// Pings the systemd watchdog at half its interval, but only while the daemon is healthy: the
/// VM table's lock can be taken and the blocking pool runs work, each within a quarter of
/// the interval. A wedged daemon stops pinging and systemd restarts it.
async fn watchdog(daemon: Arc<daemon::Daemon>, usec: u64) {
    let period = Duration::from_micros(usec / 2);
    let bound = Duration::from_micros(usec / 4);
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let d = daemon.clone();
        let probe = tokio::task::spawn_blocking(move || drop(d.lock()));
        match tokio::time::timeout(bound, probe).await {
            Ok(Ok(())) => notify(&[NotifyState::Watchdog]),
            _ => tracing::error!("health check failed (VM table or blocking pool wedged); no watchdog ping"),
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    if let Some(addr) = args.metrics_addr.filter(|a| !a.ip().is_loopback()) {
        return Err(CliError::Input(format!("--metrics-addr {addr}: only loopback addresses are served")));
    }
    let shutdown = terminated()?;
    crate::shell::enable(!args.no_shell_pool);
    let host_mib = crate::memory::host_mem_mib().map_err(|e| CliError::Internal(e.to_string()))?;
    let max_guest_mib = match &args.max_guest_memory {
        Some(v) => limits::parse_budget(v, host_mib).map_err(input)?,
        None => limits::default_budget().map_err(input)?,
    };
    let image_dir = args.image_dir.clone().unwrap_or_else(|| args.state_dir.join("images"));
    let images = images::ImageDir::open(&image_dir, args.max_image_size).map_err(input)?;
    tracing::info!(image_dir = %image_dir.display(), max_guest_mib, "limits");
    let config = daemon::DaemonConfig {
        images,
        max_guest_mib,
        store: args.store_codec.options(),
        hold_snapshot_copy: args.test_hold_snapshot_copy,
    };
    let daemon = daemon::Daemon::open(&args.state_dir, config)
        .map_err(|e| CliError::Input(format!("state directory {}: {e}", args.state_dir.display())))?;
    let group = args.socket_group.as_deref().map(socket::lookup_group).transpose().map_err(input)?;
    let (listener, claimed) = socket::claim(&args.socket, group).map_err(input)?;
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
        .map_err(|e| CliError::Internal(format!("socket {}: {e}", args.socket.display())))?;
    let metrics_server = match args.metrics_addr {
        Some(addr) => {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| CliError::Input(format!("binding {addr}: {e}")))?;
            Some(server::Server::start(server::Listener::Tcp(tcp), api::metrics_router(daemon.clone())))
        }
        None => None,
    };
    let api_server = server::Server::start(server::Listener::Unix(listener), api::router(daemon.clone()));
    tracing::info!(socket = %args.socket.display(), "snapvisor daemon ready");
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        tokio::spawn(watchdog(daemon.clone(), usec));
    }
    tokio::spawn(housekeeping::run(daemon.clone(), Duration::from_secs(args.cache_idle_secs)));
    shutdown.await;
    let deadline = Instant::now() + Duration::from_secs(args.shutdown_timeout);
    tracing::info!("stopping: no new connections; VMs have {} s", args.shutdown_timeout);
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping VMs")]);
    // Event streams end, so their connections can close.
    let _ = daemon.stopping.send(true);
    let grace = CONN_GRACE.min(Duration::from_secs(args.shutdown_timeout.max(1)));
    let conns = async {
        let metrics = async {
            if let Some(m) = metrics_server {
                m.stop(grace).await;
            }
        };
        // A snapshot request in progress keeps its connection until it is answered (or the
        // deadline): its client learns whether the snapshot exists.
        tokio::join!(api_server.stop_after(grace, daemon.answers_given(deadline)), metrics);
    };
    let snapshot = args.on_shutdown == OnShutdown::Snapshot;
    tokio::join!(conns, daemon.shutdown(snapshot, deadline));
    claimed.release();
    tracing::info!("stopped");
    Ok(())
}
