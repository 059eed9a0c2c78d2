//! Clone requests under way, recorded on disk so that a clone is all or nothing across a
//! crash too: a daemon killed in the middle of one removes, at its next start, the clones
//! that request had made (before, they stayed defined and stopped).
//!
//! A record is a file `pending/clone-<pid>-<n>` in the state directory listing the clone
//! names, one per line. It is written and synced before the first clone is restored and
//! removed once the request has ended: all made, or what was made removed again. At start
//! ([`sweep`], before the VM definitions are read) every VM a record names loses its
//! definition, and the record goes. Records are checked as untrusted: only valid VM names
//! in a regular file of at most [`MAX_RECORD`] bytes (not followed through a symlink) are
//! acted on; any other record is removed with a warning, its names left alone.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::daemon::validate_name;
use super::error::ApiError;

/// The largest record read back: 64-character names for far more clones than a request may ask.
const MAX_RECORD: u64 = 16 << 20;

fn dir_of(state_dir: &Path) -> PathBuf {
    state_dir.join("pending")
}

/// A clone request's record; removed when dropped (the request has ended).
pub(super) struct PendingClone {
    path: PathBuf,
}

impl PendingClone {
    /// Records that the clones `names` are about to be made.
    pub(super) fn record(state_dir: &Path, names: &[String]) -> Result<PendingClone, ApiError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = dir_of(state_dir);
        let path = dir.join(format!("clone-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let mut f = std::fs::File::create(&path)?;
            f.write_all(names.join("\n").as_bytes())?;
            f.sync_all()?;
            std::fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&path);
            ApiError::from_write(&format!("recording the clone request in {}", path.display()), &e)
        })?;
        Ok(PendingClone { path })
    }
}

impl Drop for PendingClone {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("removing {}: {e}", self.path.display());
        }
    }
}

/// Removes the definitions of the clones of requests a killed daemon left unfinished, and
/// their records; returns the VMs removed.
pub(super) fn sweep(state_dir: &Path, vms_dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir_of(state_dir)) else { return removed };
    for entry in entries.flatten() {
        let path = entry.path();
        let text = match read_record(&path) {
            Ok(t) => t,
            Err(e) => {
                // Not one this daemon wrote: nothing in it is acted on, and it goes (else
                // every start would warn of it again).
                tracing::warn!("unfinished clone request record {}: {e}; its clones are kept", path.display());
                Vec::new()
            }
        };
        for name in String::from_utf8_lossy(&text).lines().filter(|n| validate_name("VM", n).is_ok()) {
            match std::fs::remove_file(vms_dir.join(format!("{name}.json"))) {
                Ok(()) => {
                    tracing::warn!(vm = name, "removed: made by a clone request the daemon was killed in");
                    removed.push(name.to_string());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(vm = name, "removing the definition of an unfinished clone: {e}"),
            }
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
    removed
}

/// A record's bytes: a regular file (not followed through a symlink), at most [`MAX_RECORD`].
fn read_record(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut out = Vec::new();
    f.take(MAX_RECORD + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_RECORD {
        return Err(std::io::Error::other(format!("larger than {MAX_RECORD} bytes")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records are untrusted: names that are not VM names (a path out of `vms/`), a record
    /// that is a symlink, a FIFO or too large act on nothing; a good record removes its
    /// clones' definitions and only those, and every record goes.
    #[test]
    fn only_valid_names_in_regular_records_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, vms) = (dir.path(), dir.path().join("vms"));
        std::fs::create_dir_all(&vms).expect("vms");
        for n in ["c0", "c1", "keep", "outside"] {
            std::fs::write(vms.join(format!("{n}.json")), "{}").expect("def");
        }
        std::fs::write(state.join("outside.json"), "{}").expect("a file outside vms/");
        let pending = dir_of(state);
        std::fs::create_dir_all(&pending).expect("pending");
        std::fs::write(pending.join("clone-1-0"), "c0\n../outside\n.hidden\n\nc1\nnope").expect("record");
        std::fs::write(state.join("target"), "keep").expect("symlink target");
        std::os::unix::fs::symlink(state.join("target"), pending.join("clone-1-1")).expect("symlink");
        nix::unistd::mkfifo(&pending.join("clone-1-2"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        let mut big = b"keep\n".to_vec();
        big.resize(MAX_RECORD as usize + 1, b'\n');
        std::fs::write(pending.join("clone-1-3"), big).expect("big record");

        let mut removed = sweep(state, &vms);
        removed.sort();
        assert_eq!(removed, ["c0", "c1"]);
        assert!(vms.join("keep.json").exists(), "a name in a symlinked, FIFO or oversized record was acted on");
        assert!(vms.join("outside.json").exists() && state.join("outside.json").exists(), "a path name was acted on");
        assert!(std::fs::read_dir(&pending).expect("pending").next().is_none(), "a record stayed");
    }

    #[test]
    fn a_record_goes_when_its_request_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = vec!["a0".to_string(), "a1".to_string()];
        let record = PendingClone::record(dir.path(), &names).expect("record");
        assert_eq!(std::fs::read_to_string(&record.path).expect("read"), "a0\na1");
        let path = record.path.clone();
        drop(record);
        assert!(!path.exists());
    }
}
