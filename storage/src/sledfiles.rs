//! sled's own files in the store directory, and what catches a damaged byte in each file
//! of the store.
//!
//! | file | damage is caught by |
//! |------|---------------------|
//! | `snapvisor-store` | every open: its text must be exactly the marker (layout.rs) |
//! | `conf` | every open and `store verify`: compared byte for byte here (below) |
//! | `db` | sled: every log record carries a crc32; `store verify` reads every tree, so every live page is read and checked. A bad record in the log's tail, see below |
//! | `snap.<lsn>` | sled, at every open: its crc32 is checked and a mismatch is an open error |
//! | `blobs/` | sled, when the value is read (crc32); `store verify` reads every value of every tree |
//! | `snapvisor-closed` | every open: its text must be exactly the witness (below) |
//! | `manifests/NAME` | `store verify`: header crc32, and byte equality with the index's copy (check.rs) |
//! | `packs/N.pack` | the pack header's crc32 at open of the pack; `store verify` checks every indexed entry's header, hash and value crc32 (check.rs) |
//!
//! Bytes no one reads are not checked, because their damage cannot change what any reader
//! gets: in a pack, the bytes outside live entries (holes punched by GC, dead entries not yet
//! punched, the torn tail a crash leaves) are never read through the index, which names each
//! live entry exactly; `store repair` scans them, but indexes only an entry whose header
//! crc32, value crc32 and blake3 hash of the decompressed value all hold. In `db`, records
//! that a later record superseded are never read again (sled reads a page at its newest
//! location); a sweep of flipped bytes over a store's `db` (every 437th byte, and each of the
//! last 700) found only the last record, the clean mark, unreported before the witness.
//!
//! `conf` holds sled's settings as three text lines (`segment_size: N`, `use_compression:
//! B`, `version: MAJOR.MINOR`) followed by the crc32 of that text, u32 LE. sled 0.34 parses
//! the lines (a damaged key or value is an open error) but only logs a warning when the crc
//! does not match, and it treats a `conf` of 8 bytes or less as absent and writes a new one
//! over it. So a damaged crc byte, or a truncated file, was accepted silently. Every setting
//! sled writes there is fixed by this crate ([`crate::open::sled_config`]), so the file has
//! exactly one correct content: [`check_conf`] compares it byte for byte, before sled opens
//! the database and again in `store verify`. `conf` missing beside a non-empty `db` is damage
//! too (sled would write a fresh one without complaint); beside an empty `db` it is a store
//! whose first open was interrupted, and sled writes it.
//!
//! sled recovers its log by replaying the records written after its last `snap.*` file; it
//! stops at the first record whose crc32 fails, takes it for a write torn by a crash, and
//! drops it and everything after it. A damaged byte there therefore opens silently as an
//! older state of the index. After a crash that is indistinguishable from the crash itself
//! (the cross-checks in consistency.rs still compare the index with the manifest files); but
//! a store closed cleanly ends its log with the `clean` mark (store.rs), written last. So a
//! clean close then writes the witness file `snapvisor-closed` (temporary file, fsync,
//! rename, directory fsync), and every open refuses a witness without the `clean` mark in the
//! index: the log lost its last records, and the error names `db`. A read-write open removes
//! the witness (durably) before it clears the `clean` mark, so a crash between the two
//! leaves a clean index without a witness, which is accepted, as are stores written before
//! the witness existed.

use std::path::Path;

use crate::error::{Result, StoreError};
use crate::fsfile::{read_capped, sync_dir};

/// File name of sled's settings file.
pub(crate) const CONF: &str = "conf";
/// File name of the clean-close witness.
pub(crate) const WITNESS: &str = "snapvisor-closed";
const WITNESS_TEXT: &str = "snapvisor store closed cleanly\n";

/// The exact bytes sled 0.34 writes to `conf` for `cfg`: the settings text, then its crc32
/// (u32 LE).
pub(crate) fn expected_conf(cfg: &sled::Config) -> Vec<u8> {
    let mut out = format!(
        "segment_size: {}\nuse_compression: {}\nversion: {}.{}\n",
        cfg.segment_size, cfg.use_compression, cfg.version.0, cfg.version.1
    )
    .into_bytes();
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn damaged(path: &Path, reason: String) -> StoreError {
    StoreError::IndexFile { path: path.to_path_buf(), reason }
}

fn repair_hint(dir: &Path) -> String {
    format!("run `snapvisor store repair --store {}` to rebuild the index", dir.display())
}

/// Checks `dir/conf` against what sled writes for `cfg` (see the module doc).
pub(crate) fn check_conf(dir: &Path, cfg: &sled::Config) -> Result<()> {
    let path = dir.join(CONF);
    let expected = expected_conf(cfg);
    let raw = match read_capped(&path, 4096) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let db_len = std::fs::symlink_metadata(dir.join("db")).map(|m| m.len()).unwrap_or(0);
            if db_len == 0 {
                return Ok(());
            }
            return Err(damaged(&path, format!("is missing beside a {db_len}-byte index 'db'; {}", repair_hint(dir))));
        }
        Err(e) => return Err(damaged(&path, format!("cannot be read: {e}; {}", repair_hint(dir)))),
    };
    if raw == expected {
        return Ok(());
    }
    let at = raw.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(raw.len().min(expected.len()));
    Err(damaged(
        &path,
        format!(
            "is damaged: {} bytes that differ from sled's settings at byte {at} (expected the {} bytes \
             {:?} followed by crc32 0x{:08x}); {}",
            raw.len(),
            expected.len(),
            String::from_utf8_lossy(&expected[..expected.len() - 4]),
            crc32fast::hash(&expected[..expected.len() - 4]),
            repair_hint(dir)
        ),
    ))
}

/// True when the witness of a clean close is present; an error when it is there but is not
/// exactly the witness text.
pub(crate) fn read_witness(dir: &Path) -> Result<bool> {
    let path = dir.join(WITNESS);
    match read_capped(&path, 4096) {
        Ok(raw) if raw == WITNESS_TEXT.as_bytes() => Ok(true),
        Ok(raw) => Err(damaged(
            &path,
            format!(
                "is damaged: {} bytes, expected {WITNESS_TEXT:?}; if the store was closed cleanly, \
                 delete the file, otherwise {}",
                raw.len(),
                repair_hint(dir)
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(damaged(&path, format!("cannot be read: {e}"))),
    }
}

/// Writes the witness (temporary file, fsync, rename, directory fsync).
pub(crate) fn write_witness(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{WITNESS}.tmp"));
    // Whatever is at the temporary name (a crash's leftover, or a symlink planted there) goes
    // first, unfollowed, and the file is created new without following links: the close must
    // never write through a link, nor rename one into place.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(WITNESS_TEXT.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(WITNESS))?;
    sync_dir(dir)
}

/// Removes the witness durably (nothing to do if it is absent).
pub(crate) fn remove_witness(dir: &Path) -> Result<()> {
    let path = dir.join(WITNESS);
    let io = |op: &'static str| {
        let path = path.clone();
        move |source| StoreError::Io { path, op, source }
    };
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir).map_err(io("sync store directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove clean-close witness")(e)),
    }
}

/// The error for a witness without the `clean` mark in the index (see the module doc).
pub(crate) fn lost_tail(dir: &Path) -> StoreError {
    StoreError::IndexDamaged {
        path: dir.to_path_buf(),
        reason: format!(
            "the store was closed cleanly ('{}' is there) but its index '{}' lost the clean mark written \
             last: sled's log dropped its last records (a damaged or truncated file)",
            dir.join(WITNESS).display(),
            dir.join("db").display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes sled itself writes for the store's configuration are the ones compared.
    #[test]
    fn expected_conf_is_what_sled_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::open::sled_config(dir.path(), 1 << 20);
        drop(cfg.open().expect("open sled"));
        let written = std::fs::read(dir.path().join(CONF)).expect("conf");
        assert_eq!(written, expected_conf(&crate::open::sled_config(dir.path(), 1 << 20)));
        check_conf(dir.path(), &crate::open::sled_config(dir.path(), 1 << 20)).expect("intact conf");
    }
}
