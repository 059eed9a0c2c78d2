//! The CLI's side of the API: `snapvisor vm ...` and `snapvisor snapshot ...` send one HTTP
//! request each over the daemon's unix socket and print the answer (a table, or the JSON
//! with `--json`). A daemon error becomes one line on stderr and a non-zero exit.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::cli::CliError;
use crate::guests::Builtin;
use crate::snapshot::RestoreMode;

/// The default API socket.
pub const DEFAULT_SOCKET: &str = "/run/snapvisor/api.sock";

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The daemon's API socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the daemon's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM (and start it with --start).
    Create {
        name: String,
        /// A built-in guest to boot.
        #[arg(long, value_enum, required_unless_present_any = ["kernel", "firmware"])]
        builtin: Option<Builtin>,
        /// A Linux kernel to boot instead: the name of an image in the daemon's image
        /// directory (not a path; `PUT /images/NAME` uploads one).
        #[arg(long, conflicts_with = "builtin")]
        kernel: Option<String>,
        /// An initrd image in the daemon's image directory.
        #[arg(long, requires = "kernel")]
        initrd: Option<String>,
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        /// Boot through firmware: `seabios`, or a firmware image in the image directory.
        #[arg(long, conflicts_with_all = ["builtin", "kernel"])]
        firmware: Option<String>,
        #[arg(long)]
        mem_mib: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: u64,
        #[arg(long, default_value_t = 0)]
        passes: u64,
        #[arg(long)]
        start: bool,
        /// A NIC: tap=NAME[,mac=..][,romfile=IMAGE|none][,romsize=BYTES] (repeatable; romfile
        /// names an image in the daemon's image directory).
        #[arg(long = "net", value_name = "SPEC", value_parser = crate::cli::run::parse_net)]
        net: Vec<crate::net::NetSpec>,
    },
    List,
    Info {
        name: String,
    },
    Start {
        name: String,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    Stop {
        name: String,
    },
    Delete {
        name: String,
    },
    /// The VM's serial output.
    Serial {
        name: String,
    },
    /// What the VM wrote to its debug console (port 0x402: SeaBIOS's log).
    Debugcon {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot VM into SNAPSHOT.
    Create {
        vm: String,
        snapshot: String,
        /// The same as `--mode live` (kept for old scripts).
        #[arg(long, conflicts_with = "mode")]
        live: bool,
        /// background (default: the shortest pause), stop or live.
        #[arg(long, value_enum)]
        mode: Option<crate::snapshot::SaveMode>,
    },
    /// Restore SNAPSHOT as a new running VM.
    Restore {
        snapshot: String,
        vm: String,
        #[arg(long, value_enum, default_value_t = RestoreMode::Lazy)]
        mode: RestoreMode,
    },
    /// Restore COUNT clones of SNAPSHOT named PREFIX0, PREFIX1, ...
    Clone {
        snapshot: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: usize,
        #[arg(long, value_enum, default_value_t = RestoreMode::Lazy)]
        mode: RestoreMode,
        /// Lazy clones: share one copy of the snapshot's memory, or give each its own.
        #[arg(long, value_enum, default_value_t = super::clone::CloneMemory::Shared)]
        memory: super::clone::CloneMemory,
    },
    List,
    Delete {
        snapshot: String,
    },
}

/// One HTTP/1.1 request over the socket; returns the status and body.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String), CliError> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        CliError::Input(format!("cannot reach the daemon at {}: {e} (is `snapvisor serve` running?)", socket.display()))
    })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(600)));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let io = |e: std::io::Error| CliError::Internal(format!("talking to the daemon: {e}"));
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    parse_response(&raw)
}

/// Splits a response into status and (de-chunked) body.
pub fn parse_response(raw: &[u8]) -> Result<(u16, String), CliError> {
    let bad = || CliError::Internal("the daemon sent a malformed HTTP response".into());
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| bad())?;
        if n == 0 {
            break;
        }
        out.push_str(tail.get(..n).ok_or_else(bad)?);
        rest = tail.get(n + 2..).unwrap_or("");
    }
    Ok((status, out))
}

fn call(a: &ClientArgs, method: &str, path: &str, body: Option<Value>) -> Result<String, CliError> {
    let (status, text) = request(&a.socket, method, path, body.as_ref())?;
    if status >= 400 {
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or(text);
        let e = format!("daemon: {msg}");
        return Err(if status < 500 { CliError::Input(e) } else { CliError::Internal(e) });
    }
    Ok(text)
}

/// Polls a background operation until it ends, showing its progress on stderr (one updating
/// line on a terminal); returns its result as JSON text.
fn wait_operation(a: &ClientArgs, accepted: &str, show: impl Fn(&Value) -> String) -> Result<String, CliError> {
    use std::io::IsTerminal;
    let v: Value = serde_json::from_str(accepted).map_err(|e| CliError::Internal(format!("daemon answer: {e}")))?;
    let id = v["operation"]
        .as_u64()
        .ok_or_else(|| CliError::Internal(format!("daemon answer without an operation: {accepted}")))?;
    let tty = std::io::stderr().is_terminal();
    let mut shown = String::new();
    loop {
        let op: Value = serde_json::from_str(&call(a, "GET", &format!("/operations/{id}"), None)?)
            .map_err(|e| CliError::Internal(format!("daemon answer: {e}")))?;
        if !op["progress"].is_null() {
            let line = show(&op["progress"]);
            if line != shown {
                if tty {
                    eprint!("\r\x1b[K{line}");
                } else if !a.json {
                    eprintln!("{line}");
                }
                shown = line;
            }
        }
        let finished = match op["state"].as_str() {
            Some("done") => Ok(op["result"].to_string()),
            Some("failed") => {
                Err(CliError::Input(format!("daemon: {}", op["error"].as_str().unwrap_or("operation failed"))))
            }
            _ => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if tty && !shown.is_empty() {
            eprintln!();
        }
        return finished;
    }
}

fn print_vms(a: &ClientArgs, text: &str) -> Result<(), CliError> {
    if a.json {
        println!("{text}");
        return Ok(());
    }
    let v: Value = serde_json::from_str(text).map_err(|e| CliError::Internal(format!("daemon answer: {e}")))?;
    let rows = match v {
        Value::Array(a) => a,
        other => vec![other],
    };
    println!("{:<24} {:<8} {:>8} {:>6} {:<10} FROM", "NAME", "GUEST", "MEM MiB", "VCPUS", "STATE");
    for r in rows {
        println!(
            "{:<24} {:<8} {:>8} {:>6} {:<10} {}",
            r["name"].as_str().unwrap_or("?"),
            r["guest"].as_str().unwrap_or(if r["kernel"].is_string() { "kernel" } else { "?" }),
            r["mem_mib"].as_u64().unwrap_or(0),
            r["vcpus"].as_u64().unwrap_or(0),
            r["state"].as_str().unwrap_or("?"),
            r["restored_from"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub fn vm(a: ClientArgs, cmd: VmCommand) -> Result<(), CliError> {
    let (method, path, body) = match &cmd {
        VmCommand::Create { name, builtin, kernel, initrd, cmdline, firmware, mem_mib, vcpus, passes, start, net } => (
            "POST",
            "/vms".to_string(),
            Some(json!({
                "name": name, "guest": builtin, "kernel": kernel, "initrd": initrd, "cmdline": cmdline,
                "firmware": firmware, "mem_mib": mem_mib, "vcpus": vcpus, "passes": passes, "start": start,
                "net": net.iter().map(super::net_api::ApiNic::from_cli).collect::<Vec<_>>(),
            })),
        ),
        VmCommand::List => ("GET", "/vms".into(), None),
        VmCommand::Info { name } => ("GET", format!("/vms/{name}"), None),
        VmCommand::Start { name } => ("POST", format!("/vms/{name}/start"), None),
        VmCommand::Pause { name } => ("POST", format!("/vms/{name}/pause"), None),
        VmCommand::Resume { name } => ("POST", format!("/vms/{name}/resume"), None),
        VmCommand::Stop { name } => ("POST", format!("/vms/{name}/stop"), None),
        VmCommand::Delete { name } => ("DELETE", format!("/vms/{name}"), None),
        VmCommand::Serial { name } => ("GET", format!("/vms/{name}/serial"), None),
        VmCommand::Debugcon { name } => ("GET", format!("/vms/{name}/debugcon"), None),
    };
    let text = call(&a, method, &path, body)?;
    match cmd {
        VmCommand::Serial { .. } | VmCommand::Debugcon { .. } => print!("{text}"),
        VmCommand::Delete { name } => {
            if !a.json {
                println!("deleted VM {name}");
            }
        }
        _ => print_vms(&a, &text)?,
    }
    Ok(())
}

pub fn snapshot(a: ClientArgs, cmd: SnapshotCommand) -> Result<(), CliError> {
    match cmd {
        SnapshotCommand::Create { vm, snapshot, live, mode } => {
            let mut body = json!({ "name": snapshot, "live": live, "async": true });
            if let Some(m) = mode {
                body["mode"] = json!(m);
            }
            let op = call(&a, "POST", &format!("/vms/{vm}/snapshot"), Some(body))?;
            let text = wait_operation(&a, &op, |p| {
                // One shape throughout (service/progress.rs).
                let n = |k: &str| p[k].as_u64().unwrap_or(0);
                let mut line = format!(
                    "{} of {} chunks copied, {} MiB",
                    n("chunks_copied"),
                    n("chunks_total"),
                    n("bytes_copied") >> 20
                );
                if n("chunks_inherited") > 0 {
                    line += &format!(", {} taken from the parent", n("chunks_inherited"));
                }
                if n("round") > 0 {
                    line += &format!(", round {}, {} chunks dirty", n("round"), n("dirty_chunks"));
                }
                line
            })?;
            if a.json {
                println!("{text}");
            } else {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                println!(
                    "snapshot {} taken in {:.1} ms (paused {:.1} ms)",
                    snapshot,
                    v["total_ms"].as_f64().unwrap_or(0.0),
                    v["pause_ms"].as_f64().unwrap_or(0.0)
                );
            }
        }
        SnapshotCommand::Restore { snapshot, vm, mode } => {
            let text =
                call(&a, "POST", &format!("/snapshots/{snapshot}/restore"), Some(json!({ "vm": vm, "mode": mode })))?;
            print_vms(&a, &text)?;
        }
        SnapshotCommand::Clone { snapshot, prefix, count, mode, memory } => {
            let body = json!({ "prefix": prefix, "count": count, "mode": mode, "memory": memory, "async": true });
            let op = call(&a, "POST", &format!("/snapshots/{snapshot}/clone"), Some(body))?;
            let text = wait_operation(&a, &op, |p| format!("{} of {} clones running", p["restored"], p["of"]))?;
            print_vms(&a, &text)?;
        }
        SnapshotCommand::List => {
            let text = call(&a, "GET", "/snapshots", None)?;
            if a.json {
                println!("{text}");
            } else {
                for n in serde_json::from_str::<Vec<String>>(&text).unwrap_or_default() {
                    println!("{n}");
                }
            }
        }
        SnapshotCommand::Delete { snapshot } => {
            call(&a, "DELETE", &format!("/snapshots/{snapshot}"), None)?;
            if !a.json {
                println!("deleted snapshot {snapshot}");
            }
        }
    }
    Ok(())
}
