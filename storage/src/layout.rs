//! The store directory and its marker file: telling "no store here" from "a store whose
//! index is missing", and refusing stores of another format.
//!
//! A store directory holds `snapvisor-store`, a marker written when the store is created
//! (text: `snapvisor store\nformat 2\n`). A directory with the marker but without sled's
//! `db` file is a store whose index was lost: opening it is an error that names the file and
//! the repair command, and a fresh index is never created over existing data (sled would
//! happily create an empty one). A directory with sled files or `packs/` but no marker is a
//! format 1 store (written before packs had headers): it is refused with a versioned error.
//! Any other non-empty directory is refused too: a store is only created in a new or empty
//! directory, so a mistyped path never grows a store inside unrelated files.

use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};
use crate::fsfile::{read_capped, sync_dir};

/// File name of the marker.
pub const MARKER: &str = "snapvisor-store";
/// Store format version (the pack format, see pack.rs).
pub const FORMAT: u32 = 2;

fn marker_text() -> String {
    format!("snapvisor store\nformat {FORMAT}\n")
}

/// What is at a store path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Nothing, or an empty directory: a store may be created.
    Absent,
    /// A store of this format with its index file present.
    Store,
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}

fn format_err(path: &Path, reason: String) -> StoreError {
    StoreError::Format { path: path.to_path_buf(), reason }
}

/// Checks the marker file of `dir`.
pub(crate) fn check_marker(dir: &Path) -> Result<()> {
    let path = dir.join(MARKER);
    let raw = read_capped(&path, 4096).map_err(|e| format_err(&path, e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    if text == marker_text() {
        return Ok(());
    }
    let version = text.strip_prefix("snapvisor store\nformat ").and_then(|v| v.trim_end().parse::<u32>().ok());
    Err(format_err(
        &path,
        match version {
            Some(v) => format!("store format {v} is not supported (this build reads format {FORMAT})"),
            None => "the store marker is damaged (expected \"snapvisor store\\nformat 2\\n\"); if this is a \
                     snapvisor store, `snapvisor store repair` rewrites it"
                .to_owned(),
        },
    ))
}

/// Classifies `dir` (see the module doc).
pub(crate) fn classify(dir: &Path) -> Result<Layout> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Layout::Absent),
        Err(e) => return Err(io(dir, "open store directory")(e)),
    };
    let names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let has = |n: &str| names.iter().any(|x| x == n);
    if has(MARKER) {
        check_marker(dir)?;
        let db = dir.join("db");
        return match std::fs::symlink_metadata(&db) {
            Ok(m) if m.is_file() => Ok(Layout::Store),
            Ok(_) => Err(StoreError::IndexFile { path: db, reason: "is not a regular file".into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::IndexMissing { dir: dir.to_path_buf(), db })
            }
            Err(e) => Err(io(&db, "look at index file")(e)),
        };
    }
    if ["conf", "db", "packs", "manifests"].iter().any(|n| has(n)) {
        return Err(format_err(
            &dir.join(MARKER),
            format!(
                "missing: this is a format 1 store (or its marker was deleted); this build reads format \
                 {FORMAT} only: re-create the store, or if it was written by this build, run \
                 `snapvisor store repair --store {}`",
                dir.display()
            ),
        ));
    }
    if !names.is_empty() {
        return Err(format_err(
            dir,
            format!(
                "holds no snapvisor store but is not empty ({} entries, e.g. '{}'); a new store is only \
                 created in a new or empty directory",
                names.len(),
                names[0]
            ),
        ));
    }
    Ok(Layout::Absent)
}

/// Writes the marker (temporary file, fsync, rename, directory fsync).
pub(crate) fn write_marker(dir: &Path) -> Result<()> {
    let tmp = dir.join(format!(".{MARKER}.tmp"));
    let path = dir.join(MARKER);
    std::fs::write(&tmp, marker_text()).map_err(io(&tmp, "write store marker"))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp, "sync store marker"))?;
    std::fs::rename(&tmp, &path).map_err(io(&path, "write store marker"))?;
    sync_dir(dir).map_err(io(dir, "sync store directory"))
}

/// Creates the directories of a new store in `dir` and, last, its marker.
pub(crate) fn create(dir: &Path) -> Result<()> {
    for sub in [PathBuf::new(), PathBuf::from("packs"), PathBuf::from("manifests")] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(io(&p, "create store directory"))?;
    }
    write_marker(dir)
}
