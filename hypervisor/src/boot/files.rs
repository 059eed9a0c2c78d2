//! Reading the files a VM boots (kernel, initrd) safely: whoever names the file may not be
//! whoever runs snapvisor.
//!
//! A boot file is opened with `O_NONBLOCK` (a FIFO cannot block the opener) and, when the
//! caller asks, `O_NOFOLLOW`; it must be a regular file (not a device such as `/dev/zero`, a
//! FIFO or a directory); its size is checked against a limit before a byte is read, and the
//! read stops at the limit even if the file grows meanwhile. Errors name the file as the
//! caller named it and never quote its contents.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// A file to boot, read into memory: its name (as given, for messages and the VM's
/// description) and its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct BootFile {
    pub name: String,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for BootFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootFile({:?}, {} bytes)", self.name, self.data.len())
    }
}

/// Why a boot file could not be read; `what` is "kernel" or "initrd", `name` the file as the
/// caller named it.
#[derive(Debug, thiserror::Error)]
pub enum BootFileError {
    #[error("{what} {name}: no such file")]
    Missing { what: &'static str, name: String },
    #[error("{what} {name} is a symlink; only regular files are accepted")]
    Symlink { what: &'static str, name: String },
    #[error("{what} {name} is {kind}, not a regular file")]
    NotRegular { what: &'static str, name: String, kind: &'static str },
    #[error("{what} {name} is {size} bytes, more than the {limit} allowed")]
    TooLarge { what: &'static str, name: String, size: u64, limit: u64 },
    #[error("{what} {name}: {source}")]
    Io { what: &'static str, name: String, source: std::io::Error },
}

/// What a file type is, for messages.
pub fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symlink"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "an unknown kind of file"
    }
}

impl BootFile {
    /// Reads `path` (named `name` in messages) if it is a regular file of at most `limit`
    /// bytes. With `nofollow`, a symlink as the last component is refused.
    pub fn read(
        what: &'static str,
        name: &str,
        path: &Path,
        nofollow: bool,
        limit: u64,
    ) -> Result<BootFile, BootFileError> {
        let name = name.to_string();
        let flags = libc::O_NONBLOCK | libc::O_CLOEXEC | if nofollow { libc::O_NOFOLLOW } else { 0 };
        let file = File::options().read(true).custom_flags(flags).open(path).map_err(|source| {
            match (source.kind(), source.raw_os_error()) {
                (std::io::ErrorKind::NotFound, _) => BootFileError::Missing { what, name: name.clone() },
                (_, Some(libc::ELOOP)) if nofollow => BootFileError::Symlink { what, name: name.clone() },
                _ => BootFileError::Io { what, name: name.clone(), source },
            }
        })?;
        let meta = file.metadata().map_err(|source| BootFileError::Io { what, name: name.clone(), source })?;
        if !meta.file_type().is_file() {
            return Err(BootFileError::NotRegular { what, name, kind: kind_of(meta.file_type()) });
        }
        if meta.len() > limit {
            return Err(BootFileError::TooLarge { what, name, size: meta.len(), limit });
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        file.take(limit.saturating_add(1)).read_to_end(&mut data).map_err(|source| BootFileError::Io {
            what,
            name: name.clone(),
            source,
        })?;
        if data.len() as u64 > limit {
            return Err(BootFileError::TooLarge { what, name, size: data.len() as u64, limit });
        }
        Ok(BootFile { name, data })
    }

    /// Reads a file the local user named on the command line: symlinks are followed.
    pub fn read_path(what: &'static str, path: &Path, limit: u64) -> Result<BootFile, BootFileError> {
        Self::read(what, &path.display().to_string(), path, false, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, b"12345").expect("write");
        assert_eq!(BootFile::read_path("kernel", &f, 5).expect("fits").data, b"12345");
        let e = BootFile::read_path("kernel", &f, 4).expect_err("too large");
        assert!(matches!(e, BootFileError::TooLarge { size: 5, limit: 4, .. }), "{e}");
        let e = BootFile::read_path("initrd", Path::new("/dev/zero"), 1 << 30).expect_err("device");
        assert!(matches!(e, BootFileError::NotRegular { kind: "a device", .. }), "{e}");
        let e = BootFile::read_path("initrd", dir.path(), 1 << 30).expect_err("directory");
        assert!(matches!(e, BootFileError::NotRegular { kind: "a directory", .. }), "{e}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let e = BootFile::read_path("kernel", &fifo, 1 << 30).expect_err("fifo");
        assert!(matches!(e, BootFileError::NotRegular { kind: "a FIFO", .. }), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&f, &link).expect("symlink");
        assert!(BootFile::read_path("kernel", &link, 5).is_ok(), "the CLI follows symlinks");
        let e = BootFile::read("kernel", "link", &link, true, 5).expect_err("nofollow");
        assert!(matches!(e, BootFileError::Symlink { .. }), "{e}");
        let e = BootFile::read_path("kernel", &dir.path().join("nope"), 5).expect_err("missing");
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
