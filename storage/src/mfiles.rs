//! Committed manifests kept as files, `manifests/<name>`, beside their copy in sled.
//!
//! sled is the fast path (listing, lookups); the files are what survives the loss of the
//! sled index and what `store repair` rebuilds it from. A file holds exactly the encoded
//! manifest (magic, version, crc32, CBOR: see manifest.rs). It is written to a temporary
//! name, `fsync`ed, then hard-linked to its final name (which fails if the name exists, so
//! the file system itself refuses a second snapshot of the same name), and the directory is
//! `fsync`ed. Names starting with '.' are temporary files; snapshot names never start with
//! one.
//!
//! Ordering against sled (see lib.rs, "Commit protocol"): commit writes the file before the
//! sled insert; delete removes the file before the sled entry. So after a crash a file
//! without a sled entry is an interrupted commit (its chunks are durable: it is rolled
//! forward if the index holds every chunk it references), and a sled entry without a file is
//! an interrupted delete (the file is written again: the delete did not happen).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};
use crate::fsfile::{check_regular, read_capped, sync_dir};
use crate::manifest::{Manifest, MAX_MANIFEST_BYTES};
use crate::name::validate_snapshot_name;

/// Directory of the manifest files of store `dir`.
pub(crate) fn dir_of(store: &Path) -> PathBuf {
    store.join("manifests")
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}

/// Writes manifest file `name` with `value`; [`StoreError::Exists`] if it is already there.
pub(crate) fn write(dir: &Path, name: &str, value: &[u8]) -> Result<()> {
    validate_snapshot_name(name)?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".tmp-{name}-{}-{:016x}", std::process::id(), rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io(&tmp, "create manifest file"))?;
        f.write_all(value).map_err(io(&tmp, "write manifest file"))?;
        f.sync_all().map_err(io(&tmp, "sync manifest file"))?;
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StoreError::Exists(name.to_owned())),
            Err(e) => Err(io(&path, "link manifest file")(e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    sync_dir(dir).map_err(io(dir, "sync manifests directory"))
}

/// Removes manifest file `name` (absent is fine) and makes the removal durable.
pub(crate) fn remove(dir: &Path, name: &str) -> Result<()> {
    validate_snapshot_name(name)?;
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&path, "remove manifest file")(e)),
    }
    sync_dir(dir).map_err(io(dir, "sync manifests directory"))
}

/// Names of the manifest files, sorted. Anything else in the directory (a file whose name is
/// no snapshot name, a symlink, a FIFO, a directory) is an error naming it; temporary files
/// ('.' names) are skipped.
pub(crate) fn list(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir, "list manifest files"))? {
        let entry = entry.map_err(io(dir, "list manifest files"))?;
        let os_name = entry.file_name();
        let Some(name) = os_name.to_str() else {
            return Err(bad(&entry.path(), "is no manifest file: the name is not UTF-8".into()));
        };
        if name.starts_with('.') {
            continue;
        }
        validate_snapshot_name(name).map_err(|e| bad(&entry.path(), format!("is no manifest file: {e}")))?;
        check_regular(&entry.path()).map_err(|e| bad(&entry.path(), e.to_string()))?;
        out.push(name.to_owned());
    }
    out.sort();
    Ok(out)
}

/// Removes temporary files left by interrupted writes.
pub(crate) fn remove_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn bad(path: &Path, reason: String) -> StoreError {
    StoreError::ManifestFile { path: path.to_path_buf(), reason }
}

/// Reads the raw bytes of manifest file `name` (at most the largest manifest accepted).
pub(crate) fn read_raw(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    read_capped(&path, MAX_MANIFEST_BYTES as u64 + 16).map_err(|e| bad(&path, e.to_string()))
}

/// Reads and validates manifest file `name`.
pub(crate) fn read(dir: &Path, name: &str) -> Result<(Manifest, Vec<u8>)> {
    let raw = read_raw(dir, name)?;
    let path = dir.join(name);
    let m = Manifest::decode(&raw).map_err(|e| bad(&path, format!("is corrupt: {e}")))?;
    if m.name != name {
        return Err(bad(&path, format!("it holds the manifest of snapshot '{}'", m.name)));
    }
    Ok((m, raw))
}
