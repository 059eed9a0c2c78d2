//! `snapvisor bench fleet`: lazy clones through the daemon, many at once.
//!
//! Starts `snapvisor serve` on a temporary socket and state directory, runs a `memfill`
//! guest there, snapshots it, and for each count asks the daemon for that many lazy clones in
//! one request. Reported per count: time until the daemon answered with every clone running,
//! until every clone had run (its first page fault served), and until every clone had finished a
//! whole pass over its memory (its working set: memfill touches all of it); and the daemon's
//! resident memory. Then: how much memory each of `--idle` idle VMs costs the daemon.

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
    /// Idle VMs for the density measurement (0 to skip).
    #[arg(long, default_value_t = 100)]
    pub idle: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct FleetRound {
    pub clones: usize,
    pub all_running_ms: f64,
    pub all_first_instruction_ms: f64,
    pub all_working_set_ms: f64,
    pub daemon_rss_mib: f64,
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

pub fn measure(args: &FleetBenchArgs) -> Result<FleetReport, CliError> {
    let dir = std::env::temp_dir().join(format!("snapvisor-bench-fleet-{}", std::process::id()));
    let sock = dir.join("api.sock");
    let exe = std::env::current_exe().map_err(|e| fail(e.to_string()))?;
    let child = Command::new(exe)
        .arg("serve")
        .arg("--socket")
        .arg(&sock)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("starting the daemon: {e}")))?;
    let daemon = Daemon(child);
    let pid = daemon.0.id();
    wait_until("the daemon's socket", || Ok(sock.exists()))?;

    call(
        &sock,
        "POST",
        "/vms",
        Some(json!({"name": "source", "guest": "memfill", "mem_mib": args.mem_mib, "seed": 3, "start": true})),
    )?;
    wait_until("the source's first pass", || Ok(passes(&sock, "source")? >= 1))?;
    call(&sock, "POST", "/vms/source/snapshot", Some(json!({"name": "golden"})))?;
    call(&sock, "DELETE", "/vms/source", None)?;

    let mut rounds = Vec::new();
    for &n in &args.counts {
        let t0 = Instant::now();
        let clones = call(
            &sock,
            "POST",
            "/snapshots/golden/clone",
            Some(json!({"prefix": format!("f{n}-"), "count": n, "mode": "lazy"})),
        )?;
        let running = Instant::now();
        let names: Vec<String> = clones
            .as_array()
            .map(|a| a.iter().filter_map(|v| v["name"].as_str().map(String::from)).collect())
            .unwrap_or_default();
        // A clone has run once its page server served a fault (memfill exits to the VMM only
        // when it prints, at the end of a pass).
        let first = wait_until("every clone's first fault", || {
            for name in &names {
                let info = call(&sock, "GET", &format!("/vms/{name}"), None)?;
                if info["lazy_faults"].as_u64().unwrap_or(0) == 0 && info["first_exit_ms"].is_null() {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        let ws = wait_until("every clone's next full pass", || {
            for name in &names {
                if passes(&sock, name)? == 0 {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        let rss = rss_kib(pid);
        for name in &names {
            call(&sock, "DELETE", &format!("/vms/{name}"), None)?;
        }
        let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
        rounds.push(FleetRound {
            clones: n,
            all_running_ms: ms(running),
            all_first_instruction_ms: ms(first),
            all_working_set_ms: ms(ws),
            daemon_rss_mib: rss as f64 / 1024.0,
        });
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
    let _ = std::fs::remove_dir_all(&dir);
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
    println!("lazy clones of a {} MiB memfill guest through the daemon, all at once", r.mem_mib);
    println!(
        "{:>7} {:>16} {:>18} {:>18} {:>16}",
        "clones", "all running ms", "all 1st fault ms", "all ws done ms", "daemon RSS MiB"
    );
    for x in &r.rounds {
        println!(
            "{:>7} {:>16.0} {:>18.0} {:>18.0} {:>16.0}",
            x.clones, x.all_running_ms, x.all_first_instruction_ms, x.all_working_set_ms, x.daemon_rss_mib
        );
    }
    if r.idle_vms > 0 {
        println!("idle density: {} idle VMs cost the daemon {:.0} KiB each", r.idle_vms, r.idle_kib_per_vm);
    }
    Ok(())
}
