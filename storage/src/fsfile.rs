//! Opening the files of a store as untrusted input: never through a symlink, only regular
//! files, and never reading more than a caller-given cap into memory.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symlink"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Opens `path` (read-only, or read-write) refusing symlinks (`O_NOFOLLOW`), FIFOs (opened
/// non-blocking, then checked) and anything else that is not a regular file.
pub(crate) fn open_regular(path: &Path, write: bool) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "is a symlink, expected a regular file")
            } else {
                e
            }
        })?;
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("is {}, expected a regular file", kind(ft)),
        ));
    }
    Ok(f)
}

/// Checks that `path` exists and is a regular file (not following a symlink).
pub(crate) fn check_regular(path: &Path) -> std::io::Result<()> {
    let ft = std::fs::symlink_metadata(path)?.file_type();
    if ft.is_file() {
        Ok(())
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("is {}, expected a regular file", kind(ft))))
    }
}

/// Reads all of regular file `path`, failing if it is larger than `max` bytes.
pub(crate) fn read_capped(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let f = open_regular(path, false)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("is {len} bytes, more than the {max} allowed"),
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("grew past {max} bytes")));
    }
    Ok(out)
}

/// `fsync`s directory `dir`, making the creation, rename or removal of its entries durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
