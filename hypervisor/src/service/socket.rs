//! The API socket belongs to one daemon.
//!
//! Claiming the socket path, in order:
//! 1. take an exclusive, non-blocking `flock` on `<socket>.lock` beside it (created `0600`,
//!    never removed, opened without following symlinks) and hold it for the daemon's life: a
//!    second daemon fails here, even when both start at the same moment;
//! 2. look at what is at the socket path without following it: nothing is fine; a socket that
//!    accepts a connection belongs to a live daemon (one that predates the lock file), so we
//!    refuse; a socket that refuses connections is stale and is removed; anything else (a
//!    regular file, a directory, a symlink) is left alone and we refuse to start;
//! 3. bind under the daemon's umask (`0077`, set before anything is created), so the socket
//!    never exists with wider permissions, then hand it to `--socket-group` if one is given
//!    (`chown` first, `chmod 0660` second; otherwise it stays `0600`).
//!
//! Whoever can connect to the socket controls every VM, so its permissions are the daemon's
//! access control. On exit the socket is removed only if it is still the one we bound.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Group};

/// Errors claiming the socket; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket {path}: another snapvisor daemon is running on it (it holds {lock})")]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("socket {path}: another daemon answers on it; stop that one first")]
    InUse { path: PathBuf },
    #[error("socket {path}: something that is not a socket is there ({kind}); snapvisor removes only stale sockets, so move it away or choose another --socket")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("socket {path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("--socket-group {group:?}: no such group")]
    NoGroup { group: String },
    #[error("--socket-group {group:?}: {source}")]
    Group { group: String, source: nix::Error },
}

/// The claimed socket: the lock held for as long as this lives.
#[derive(Debug)]
pub struct ClaimedSocket {
    path: PathBuf,
    /// Device and inode of the socket we bound, to remove only that one on exit.
    id: (u64, u64),
    _lock: Flock<File>,
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SocketError + 'a {
    move |source| SocketError::Io { path: path.to_path_buf(), what, source }
}

/// The group named (or numbered) by `--socket-group`.
pub fn lookup_group(group: &str) -> Result<Gid, SocketError> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(SocketError::NoGroup { group: group.to_string() }),
        Err(source) => Err(SocketError::Group { group: group.to_string(), source }),
    }
}

/// Claims `path` for this daemon and binds it (see the module doc for the steps).
pub fn claim(
    path: &Path,
    group: Option<Gid>,
) -> Result<(std::os::unix::net::UnixListener, ClaimedSocket), SocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(if group.is_some() { 0o750 } else { 0o700 })
            .create(dir)
            .map_err(io(path, "creating its directory"))?;
        if let Some(gid) = group {
            nix::unistd::chown(dir, None, Some(gid)).map_err(|e| SocketError::Io {
                path: path.to_path_buf(),
                what: "chown of its directory",
                source: e.into(),
            })?;
        }
    }
    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock_path = PathBuf::from(lock_name);
    let lock_file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock_path)
        .map_err(io(path, "opening its lock file"))?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| match e {
        nix::Error::EWOULDBLOCK => SocketError::Locked { path: path.to_path_buf(), lock: lock_path.clone() },
        e => SocketError::Io { path: path.to_path_buf(), what: "locking its lock file", source: e.into() },
    })?;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path, "inspecting it")(e)),
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse { path: path.to_path_buf() }),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                std::fs::remove_file(path).map_err(io(path, "removing the stale socket"))?;
                tracing::info!(socket = %path.display(), "removed a stale socket (nothing answered on it)");
            }
            Err(e) => return Err(io(path, "checking whether a daemon answers on it")(e)),
        },
        Ok(m) => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
                kind: crate::boot::files::kind_of(m.file_type()),
            })
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io(path, "binding"))?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| SocketError::Io {
            path: path.to_path_buf(),
            what: "chown to --socket-group",
            source: e.into(),
        })?;
    }
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path, "chmod"))?;
    let m = std::fs::symlink_metadata(path).map_err(io(path, "inspecting it after binding"))?;
    Ok((listener, ClaimedSocket { path: path.to_path_buf(), id: (m.dev(), m.ino()), _lock: lock }))
}

impl ClaimedSocket {
    /// Removes the socket if it is still the one this daemon bound; the lock goes with `self`.
    pub fn release(self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), "removing the socket: {e}");
                }
            }
            _ => tracing::warn!(socket = %self.path.display(), "the socket was replaced; leaving it"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_fails_and_leaves_the_first_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let (_l, claimed) = claim(&path, None).expect("first claim");
        let err = claim(&path, None).expect_err("second claim");
        assert!(matches!(err, SocketError::Locked { .. }), "{err}");
        assert!(path.exists());
        let mode = std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        claimed.release();
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_anything_else_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
        let (_l, claimed) = claim(&path, None).expect("claim over a stale socket");
        claimed.release();
        std::fs::write(&path, b"precious").expect("file");
        let err = claim(&path, None).expect_err("regular file");
        assert!(matches!(err, SocketError::NotASocket { kind: "a regular file", .. }), "{err}");
        assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
    }
}
