//! `snapvisor store ...`: inspect and maintain a snapshot store (list, inspect, verify, gc,
//! du, repair). Human tables by default, JSON with `--json`. All logic lives in the `storage`
//! crate; this module parses arguments and formats. `list`, `inspect`, `verify` and `du`
//! open the store read-only: they never recover, collect or write.

use std::fmt::Write as _;
use std::path::PathBuf;

use storage::{ChunkRef, Store};

/// Arguments of `snapvisor store`.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// Store directory.
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: StoreCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// List committed snapshots.
    List,
    /// Show a snapshot's manifest: blocks, chunks, state size, attachments.
    Inspect { name: String },
    /// Check that every chunk decompresses and matches its hash (all snapshots by default),
    /// and that the index agrees with the pack files and manifest files.
    Verify { name: Option<String> },
    /// Remove chunks no snapshot references and free their disk space.
    Gc,
    /// Logical, stored and on-disk bytes.
    Du,
    /// Rebuild a missing or damaged index from the pack files and manifest files.
    Repair,
}

/// A failed `snapvisor store` command.
#[derive(Debug, thiserror::Error)]
pub enum StoreCliError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Store(#[from] storage::StoreError),
    #[error("verify found {0} problem(s)")]
    Corrupt(usize),
}

impl StoreCliError {
    /// Process exit status: 2 bad input, 1 the store is damaged (verify found problems, or
    /// the index or a manifest does not match the store's data), 125 other store failures.
    pub fn exit_code(&self) -> u8 {
        use storage::StoreError as E;
        match self {
            StoreCliError::Input(_) => 2,
            StoreCliError::Corrupt(_) => 1,
            StoreCliError::Store(
                E::IndexMissing { .. }
                | E::IndexDamaged { .. }
                | E::IndexFile { .. }
                | E::Open { .. }
                | E::Format { .. }
                | E::ManifestFile { .. }
                | E::Manifest { .. },
            ) => 1,
            StoreCliError::Store(storage::StoreError::NoStore(_) | storage::StoreError::Name(_)) => 2,
            StoreCliError::Store(storage::StoreError::NotFound(_)) => 2,
            StoreCliError::Store(_) => 125,
        }
    }
}

/// Runs the command and prints its output on stdout.
pub fn run(args: StoreArgs) -> Result<(), StoreCliError> {
    let (out, result) = render(&args)?;
    print!("{out}");
    result
}

/// Byte counts for people: "1.50 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn json(v: Result<serde_json::Value, serde_json::Error>) -> String {
    v.and_then(|v| serde_json::to_string_pretty(&v)).map_or_else(|e| format!("{{\"error\": \"{e}\"}}\n"), |s| s + "\n")
}

/// Produces the output text, and the command's result (a failed verify still has output).
pub fn render(args: &StoreArgs) -> Result<(String, Result<(), StoreCliError>), StoreCliError> {
    let dir = args.store.as_ref().ok_or_else(|| StoreCliError::Input("--store DIR is required".into()))?;
    if let StoreCommand::Repair = args.cmd {
        return Ok((repair(dir, args.json)?, Ok(())));
    }
    let store = match args.cmd {
        StoreCommand::Gc => Store::open_existing(dir)?,
        _ => Store::open_read_only(dir)?,
    };
    let mut out = String::new();
    let mut result = Ok(());
    match &args.cmd {
        StoreCommand::Repair => {}
        StoreCommand::List => {
            let mut rows = Vec::new();
            for name in store.list()? {
                let m = store.manifest(&name)?;
                let bytes: u64 = m.blocks.iter().map(|b| b.used_length).sum();
                rows.push(serde_json::json!({
                    "name": name, "created_unix_ms": m.created_unix_ms, "blocks": m.blocks.len(),
                    "memory_bytes": bytes, "state_bytes": m.state.len(),
                    "attachments": store.attachments(&name)?,
                }));
            }
            if args.json {
                out = json(Ok(serde_json::Value::Array(rows)));
            } else {
                let _ = writeln!(
                    out,
                    "{:<32} {:>14} {:>6} {:>12} {:>10}  ATTACHMENTS",
                    "NAME", "CREATED(unix)", "BLOCKS", "MEMORY", "STATE"
                );
                for r in &rows {
                    let _ = writeln!(
                        out,
                        "{:<32} {:>14} {:>6} {:>12} {:>10}  {}",
                        r["name"].as_str().unwrap_or(""),
                        r["created_unix_ms"].as_u64().unwrap_or(0) / 1000,
                        r["blocks"],
                        human(r["memory_bytes"].as_u64().unwrap_or(0)),
                        human(r["state_bytes"].as_u64().unwrap_or(0)),
                        r["attachments"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(","))
                            .unwrap_or_default(),
                    );
                }
            }
        }
        StoreCommand::Inspect { name } => {
            let m = store.manifest(name)?;
            let mut blocks = Vec::new();
            for b in &m.blocks {
                let zero = b.chunks.iter().filter(|c| **c == ChunkRef::Zero).count();
                blocks.push(serde_json::json!({
                    "idstr": b.idstr, "used_length": b.used_length, "max_length": b.max_length,
                    "page_size": b.page_size, "resizeable": b.resizeable,
                    "chunks": b.chunks.len(), "zero_chunks": zero,
                }));
            }
            let mut atts = Vec::new();
            for a in store.attachments(name)? {
                let len = store.attachment(name, &a)?.map_or(0, |v| v.len());
                atts.push(serde_json::json!({ "name": a, "bytes": len }));
            }
            let doc = serde_json::json!({
                "name": m.name, "chunk_size": m.chunk_size, "created_unix_ms": m.created_unix_ms,
                "state_bytes": m.state.len(), "blocks": blocks, "attachments": atts,
            });
            if args.json {
                out = json(Ok(doc));
            } else {
                let _ = writeln!(
                    out,
                    "snapshot {}  chunk size {}  state {}  created {} (unix s)",
                    m.name,
                    human(u64::from(m.chunk_size)),
                    human(m.state.len() as u64),
                    m.created_unix_ms / 1000
                );
                let _ = writeln!(
                    out,
                    "{:<40} {:>12} {:>12} {:>9} {:>6} {:>8} {:>8}",
                    "BLOCK", "USED", "MAX", "PAGE", "RESIZE", "CHUNKS", "ZERO"
                );
                for (b, j) in m.blocks.iter().zip(&blocks) {
                    let _ = writeln!(
                        out,
                        "{:<40} {:>#12x} {:>#12x} {:>#9x} {:>6} {:>8} {:>8}",
                        b.idstr,
                        b.used_length,
                        b.max_length,
                        b.page_size,
                        if b.resizeable { "yes" } else { "no" },
                        b.chunks.len(),
                        j["zero_chunks"]
                    );
                }
                for a in &atts {
                    let _ = writeln!(out, "attachment {} ({} bytes)", a["name"].as_str().unwrap_or(""), a["bytes"]);
                }
            }
        }
        StoreCommand::Verify { name } => {
            let reports = match name {
                Some(n) => vec![store.verify(n)?],
                None => store.verify_all()?,
            };
            let index = store.check_index()?;
            let problems: usize = reports.iter().map(|r| r.errors.len()).sum::<usize>() + index.problems as usize;
            if args.json {
                out = json(serde_json::to_value(&reports).and_then(|snapshots| {
                    Ok(serde_json::json!({ "snapshots": snapshots, "index": serde_json::to_value(&index)? }))
                }));
            } else {
                for r in &reports {
                    let status = if r.ok() { "ok" } else { "CORRUPT" };
                    let _ =
                        writeln!(out, "{:<32} {:<8} {:>8} chunks {:>12}", r.snapshot, status, r.chunks, human(r.bytes));
                    for e in &r.errors {
                        let _ = writeln!(out, "  {e}");
                    }
                }
                let status = if index.ok() { "ok" } else { "CORRUPT" };
                let _ = writeln!(
                    out,
                    "{:<32} {:<8} {:>8} entries in {} packs, {} manifest files",
                    "(index)", status, index.entries, index.packs, index.manifest_files
                );
                for e in &index.errors {
                    let _ = writeln!(out, "  {e}");
                }
                if index.problems > index.errors.len() as u64 {
                    let _ = writeln!(out, "  ... {} more", index.problems - index.errors.len() as u64);
                }
            }
            if problems > 0 {
                result = Err(StoreCliError::Corrupt(problems));
            }
        }
        StoreCommand::Gc => {
            let r = store.gc()?;
            if args.json {
                out = json(serde_json::to_value(r));
            } else {
                let _ = writeln!(
                    out,
                    "removed {} chunks ({} stored), kept {}, removed {} orphaned attachments, freed {} on disk",
                    r.chunks_removed,
                    human(r.bytes_removed),
                    r.chunks_kept,
                    r.attachments_removed,
                    human(r.disk_bytes_freed)
                );
            }
        }
        StoreCommand::Du => {
            let u = store.usage()?;
            if args.json {
                out = json(serde_json::to_value(u).map(|mut v| {
                    v["disk_overhead"] = serde_json::json!(u.overhead());
                    v
                }));
            } else {
                let ratio = (u.logical_bytes - u.zero_bytes) as f64 / u.stored_bytes.max(1) as f64;
                let _ = writeln!(out, "snapshots        {}", u.snapshots);
                let _ = writeln!(out, "guest memory     {} ({} zero)", human(u.logical_bytes), human(u.zero_bytes));
                let _ = writeln!(
                    out,
                    "stored chunks    {} in {} (non-zero memory / stored = {ratio:.2}x)",
                    u.chunks,
                    human(u.stored_bytes)
                );
                let _ = writeln!(out, "metadata         {}", human(u.metadata_bytes));
                let _ = writeln!(out, "on disk          {} ({:.3}x stored)", human(u.disk_bytes), u.overhead());
            }
        }
    }
    Ok((out, result))
}

fn repair(dir: &std::path::Path, as_json: bool) -> Result<String, StoreCliError> {
    let r = Store::repair(dir)?;
    if as_json {
        return Ok(json(serde_json::to_value(&r)));
    }
    let mut out = String::new();
    let _ = writeln!(out, "repaired store {}", dir.display());
    if let Some(old) = &r.old_index {
        let _ = writeln!(out, "  old index moved to {}", old.display());
    }
    if let Some(e) = &r.old_index_error {
        let _ = writeln!(out, "  old index could not be read: {e}");
    }
    let _ = writeln!(
        out,
        "  scanned {} packs: {} intact entries, {} damaged, {} skipped; indexed {} chunks",
        r.packs_scanned,
        r.entries_found,
        r.bad_entries,
        human(r.skipped_bytes),
        r.chunks_indexed
    );
    for p in &r.packs_unreadable {
        let _ = writeln!(out, "  unreadable pack: {p}");
    }
    for p in &r.headers_rewritten {
        let _ = writeln!(out, "  pack header rewritten: {p}");
    }
    let _ = writeln!(out, "  {} snapshots: {}", r.snapshots.len(), r.snapshots.join(", "));
    if !r.manifests_from_old_index.is_empty() {
        let _ = writeln!(out, "  manifests taken from the old index: {}", r.manifests_from_old_index.join(", "));
    }
    for s in &r.set_aside {
        let _ = writeln!(out, "  set aside (not listed): {s}");
    }
    let _ = writeln!(out, "  {} attachments kept", r.attachments_kept);
    Ok(out)
}
