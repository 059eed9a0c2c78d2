//! `snapvisor bench fleet`: lazy clones through the daemon, many at once.
//!
//! Starts `snapvisor serve` on a temporary socket and state directory, and per guest
//! (`--guest memfill,touch`) runs it there and snapshots it: memfill after a pass, touch
//! with its memory filled, waiting for its go. For each count it asks the daemon for that many
//! lazy clones in one request, once with shared memory (the default: one base per snapshot)
//! and once with private copies (`"memory": "private"`, the baseline), each round on its own.
//! Reported per round: time until the daemon answered with every clone running, until every
//! clone had run (its first page fault served), until every memfill clone had finished a pass
//! over its memory (its working set: memfill rewrites all of it; touch clones wait and write
//! nothing), until every clone was fully resident; then the daemon's RSS, the Pss of its
//! guest-memory mappings, the memory in shared bases, and the bytes read from the store
//! (all from the daemon's /metrics). Then: how much memory each of `--idle` idle VMs costs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::cli::CliError;
use crate::service::client::request;

#[derive(Debug, Args)]
pub struct FleetBenchArgs {
    /// Clone counts, one round each.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
    pub counts: Vec<usize>,
    /// Memory of each VM, MiB.
    #[arg(long, default_value_t = 64)]
    pub mem_mib: u64,
    /// Guests to clone: `memfill` (rewrites all its memory, a pass is its working set) and
    /// `touch` (memory filled, waiting for its go: the clones only read).
    #[arg(long, value_delimiter = ',', default_value = "memfill,touch")]
    pub guest: Vec<FleetGuest>,
    /// Also run each round with private-copy clones (today's baseline), in the same run.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub baseline: bool,
    /// Idle VMs for the density measurement (0 to skip).
    #[arg(long, default_value_t = 100)]
    pub idle: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FleetGuest {
    Memfill,
    Touch,
}

#[derive(Debug, serde::Serialize)]
pub struct FleetRound {
    pub clones: usize,
    pub guest: FleetGuest,
    /// `shared` (one base per snapshot) or `private` (a copy per clone: the baseline).
    pub memory: &'static str,
    pub all_running_ms: f64,
    /// Private clones: every clone had a page fault served or exited to the VMM. Shared
    /// clones: none, since a clone whose pages the base already holds runs without either.
    pub all_first_instruction_ms: Option<f64>,
    /// memfill: every clone finished a pass over its memory; touch: none (the clones wait).
    pub all_working_set_ms: Option<f64>,
    pub all_resident_ms: f64,
    pub daemon_rss_bytes: u64,
    /// Pss of every guest-memory mapping of the daemon (a page shared by N clones counts
    /// 1/N in each), all clones resident.
    pub guest_pss_bytes: u64,
    /// Memory in shared bases (pages no clone maps are in no Pss and no RSS: add it).
    pub base_bytes: u64,
    pub store_read_bytes: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct FleetReport {
    pub mem_mib: u64,
    pub rounds: Vec<FleetRound>,
    pub idle_vms: usize,
    pub idle_kib_per_vm: f64,
}

const TIMEOUT: Duration = Duration::from_secs(300);

fn fail(what: String) -> CliError {
    CliError::Internal(format!("bench fleet: {what}"))
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn call(sock: &Path, method: &str, path: &str, body: Option<Value>) -> Result<Value, CliError> {
    let (status, text) = request(sock, method, path, body.as_ref())?;
    if status >= 300 {
        return Err(fail(format!("{method} {path}: {status} {text}")));
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// A gauge from the daemon's /metrics (0 when missing).
fn metric(sock: &Path, name: &str) -> Result<u64, CliError> {
    let (status, text) = request(sock, "GET", "/metrics", None)?;
    if status >= 300 {
        return Err(fail(format!("GET /metrics: {status}")));
    }
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// Completed memfill pass lines in a VM's serial log.
fn passes(sock: &Path, vm: &str) -> Result<usize, CliError> {
    let v = call(sock, "GET", &format!("/vms/{vm}/serial"), None)?;
    Ok(v.as_str().unwrap_or("").matches(" mismatches 0\n").count())
}

fn wait_until(what: &str, mut done: impl FnMut() -> Result<bool, CliError>) -> Result<Instant, CliError> {
    let deadline = Instant::now() + TIMEOUT;
    while !done()? {
        if Instant::now() > deadline {
            return Err(fail(format!("timed out waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Instant::now())
}

/// Makes the golden snapshot of `guest`: memfill after its first pass, touch once it filled
/// its memory and waits for its go (its exits: the filled mark's write, then a read of the wait
/// register every `devices::exit::WAIT_MAX` at most).
fn golden(sock: &Path, guest: FleetGuest, mem_mib: u64) -> Result<String, CliError> {
    let (name, snap) = match guest {
        FleetGuest::Memfill => ("src-memfill", "golden-memfill"),
        FleetGuest::Touch => ("src-touch", "golden-touch"),
    };
    let kind = if guest == FleetGuest::Memfill { "memfill" } else { "touch" };
    call(
        sock,
        "POST",
        "/vms",
        Some(json!({"name": name, "guest": kind, "mem_mib": mem_mib, "seed": 3, "start": true})),
    )?;
    match guest {
        FleetGuest::Memfill => wait_until("the source's first pass", || Ok(passes(sock, name)? >= 1))?,
        FleetGuest::Touch => wait_until("the source to fill its memory", || {
            Ok(call(sock, "GET", &format!("/vms/{name}"), None)?["exits"].as_u64().unwrap_or(0) >= 3)
        })?,
    };
    call(sock, "POST", &format!("/vms/{name}/snapshot"), Some(json!({"name": snap})))?;
    call(sock, "DELETE", &format!("/vms/{name}"), None)?;
    Ok(snap.to_string())
}

fn round(
    sock: &Path,
    pid: u32,
    snap: &str,
    guest: FleetGuest,
    n: usize,
    memory: &'static str,
) -> Result<FleetRound, CliError> {
    let read0 = metric(sock, "snapvisor_lazy_store_read_bytes")?;
    let t0 = Instant::now();
    let clones = call(
        sock,
        "POST",
        &format!("/snapshots/{snap}/clone"),
        Some(json!({"prefix": format!("f{n}{memory}-"), "count": n, "mode": "lazy", "memory": memory})),
    )?;
    let running = Instant::now();
    let names: Vec<String> = clones
        .as_array()
        .map(|a| a.iter().filter_map(|v| v["name"].as_str().map(String::from)).collect())
        .unwrap_or_default();
    // A private clone has run once its page server served a fault or it exited to the VMM.
    let first = (memory == "private")
        .then(|| {
            wait_until("every clone's first fault", || {
                for name in &names {
                    let info = call(sock, "GET", &format!("/vms/{name}"), None)?;
                    if info["lazy_faults"].as_u64().unwrap_or(0) == 0 && info["first_exit_ms"].is_null() {
                        return Ok(false);
                    }
                }
                Ok(true)
            })
        })
        .transpose()?;
    let ws = match guest {
        FleetGuest::Memfill => Some(wait_until("every clone's next full pass", || {
            for name in &names {
                if passes(sock, name)? == 0 {
                    return Ok(false);
                }
            }
            Ok(true)
        })?),
        FleetGuest::Touch => None,
    };
    let resident = wait_until("every clone fully resident", || {
        for name in &names {
            if call(sock, "GET", &format!("/vms/{name}"), None)?["lazy_resident_ms"].is_null() {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
    let r = FleetRound {
        clones: n,
        guest,
        memory,
        all_running_ms: ms(running),
        all_first_instruction_ms: first.map(ms),
        all_working_set_ms: ws.map(ms),
        all_resident_ms: ms(resident),
        daemon_rss_bytes: rss_kib(pid) * 1024,
        guest_pss_bytes: metric(sock, "snapvisor_guest_memory_pss_bytes")?,
        base_bytes: metric(sock, "snapvisor_shared_base_filled_bytes")?,
        store_read_bytes: metric(sock, "snapvisor_lazy_store_read_bytes")?.saturating_sub(read0),
    };
    for name in &names {
        call(sock, "DELETE", &format!("/vms/{name}"), None)?;
    }
    Ok(r)
}

/// The daemon's stderr: the file `SNAPVISOR_BENCH_DAEMON_LOG` names (for a profile, with
/// `SNAPVISOR_LOG` set), else nowhere.
fn daemon_log() -> Result<Stdio, CliError> {
    match std::env::var_os("SNAPVISOR_BENCH_DAEMON_LOG") {
        Some(path) => std::fs::File::create(&path)
            .map(Stdio::from)
            .map_err(|e| fail(format!("creating the daemon's log {}: {e}", Path::new(&path).display()))),
        None => Ok(Stdio::null()),
    }
}

pub fn measure(args: &FleetBenchArgs) -> Result<FleetReport, CliError> {
    // A fresh directory, removed however the run ends (after the daemon, which drops first):
    // one named after the pid could hold a stale socket of an earlier run with the same pid
    // (in a pid namespace), which the wait below took for the new daemon's.
    let tmp = tempfile::Builder::new()
        .prefix("snapvisor-bench-fleet-")
        .tempdir()
        .map_err(|e| fail(format!("creating a temporary directory: {e}")))?;
    let dir = tmp.path();
    let sock = dir.join("api.sock");
    let exe = std::env::current_exe().map_err(|e| fail(e.to_string()))?;
    let child = Command::new(exe)
        .arg("serve")
        .arg("--socket")
        .arg(&sock)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(daemon_log()?)
        .spawn()
        .map_err(|e| fail(format!("starting the daemon: {e}")))?;
    let daemon = Daemon(child);
    let pid = daemon.0.id();
    // Ready once it accepts connections (the file appears a moment before).
    wait_until("the daemon's socket", || Ok(std::os::unix::net::UnixStream::connect(&sock).is_ok()))?;

    let mut rounds = Vec::new();
    for &guest in &args.guest {
        let snap = golden(&sock, guest, args.mem_mib)?;
        for &n in &args.counts {
            for memory in ["shared", "private"] {
                if memory == "private" && !args.baseline {
                    continue;
                }
                let r = round(&sock, pid, &snap, guest, n, memory)?;
                // Each round as it ends, on stderr: a long run cut short keeps what it measured.
                eprintln!("bench fleet: {}", serde_json::to_string(&r).map_err(|e| fail(e.to_string()))?);
                rounds.push(r);
            }
        }
    }

    let before = rss_kib(pid);
    for i in 0..args.idle {
        call(
            &sock,
            "POST",
            "/vms",
            Some(json!({"name": format!("idle{i}"), "guest": "idle", "mem_mib": args.mem_mib, "start": true})),
        )?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(pid);
    drop(daemon);
    Ok(FleetReport {
        mem_mib: args.mem_mib,
        rounds,
        idle_vms: args.idle,
        idle_kib_per_vm: after.saturating_sub(before) as f64 / args.idle.max(1) as f64,
    })
}

pub fn run(args: FleetBenchArgs) -> Result<(), CliError> {
    let r = measure(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).map_err(|e| fail(e.to_string()))?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("lazy clones of a {} MiB guest through the daemon, all at once", r.mem_mib);
    println!(
        "{:>8} {:>7} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "guest",
        "clones",
        "memory",
        "running",
        "1st fault",
        "ws done",
        "resident",
        "RSS MiB",
        "PSS MiB",
        "base MiB",
        "read MiB",
        "mem/vm"
    );
    for x in &r.rounds {
        let ws = x.all_working_set_ms.map_or("-".to_string(), |v| format!("{v:.0} ms"));
        let first = x.all_first_instruction_ms.map_or("-".to_string(), |v| format!("{v:.0} ms"));
        // What the guests' memory costs against one guest's memory.
        let per = (x.guest_pss_bytes + x.base_bytes) as f64 / (r.mem_mib << 20) as f64;
        println!(
            "{:>8} {:>7} {:>8} {:>7.0} ms {:>10} {:>10} {:>7.0} ms {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>6.2}x",
            format!("{:?}", x.guest).to_lowercase(),
            x.clones,
            x.memory,
            x.all_running_ms,
            first,
            ws,
            x.all_resident_ms,
            mib(x.daemon_rss_bytes),
            mib(x.guest_pss_bytes),
            mib(x.base_bytes),
            mib(x.store_read_bytes),
            per
        );
    }
    println!("mem/vm: (guest PSS + base) against one guest's memory");
    if r.idle_vms > 0 {
        println!("idle density: {} idle VMs cost the daemon {:.0} KiB each", r.idle_vms, r.idle_kib_per_vm);
    }
    Ok(())
}
