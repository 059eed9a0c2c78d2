//! A small tmpfs mounted for a test (needs root), for the tests that fill a disk.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory; unmounted on drop.
pub struct Mount(PathBuf);

impl Mount {
    /// Mounts a tmpfs of `size` (mount's syntax, e.g. "64m") on `dir`.
    pub fn tmpfs(dir: &Path, size: &str) -> Mount {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount(8)");
        assert!(out.status.success(), "needs root to mount a tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Bytes free for an unprivileged writer on the file system of `dir`.
pub fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.to_str().expect("utf-8")).expect("path");
    // SAFETY: statvfs is plain old data; all zeros is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs into a struct we own, on a NUL-terminated path.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0, "statvfs");
    s.f_bavail * s.f_frsize
}
