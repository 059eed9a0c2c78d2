//! The few userfaultfd calls write protection needs, as raw ioctls: the `userfaultfd` crate
//! cannot ask for `UFFD_FEATURE_WP_UNPOPULATED` (without it, a page the guest never touched is
//! not protected, and its first write would not fault) and gates its write-protect calls
//! behind a feature the lazy restore does not need.
//!
//! The structures and numbers are those of `<linux/userfaultfd.h>`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::WpError;

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Write-protecting a range also protects its pages that are not populated yet (Linux 6.4).
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
/// `uffd_msg.event` of a page fault.
pub(super) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// The fault was a write to a write-protected page.
pub(super) const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `_UFFDIO_WRITEPROTECT`'s bit in the ioctls a registration reports.
const IOCTL_WRITEPROTECT: u64 = 1 << 0x06;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// One `struct uffd_msg` (32 bytes): event, then for page faults the flags and the address.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct UffdMsg {
    pub(super) event: u8,
    _reserved: [u8; 7],
    pub(super) flags: u64,
    pub(super) address: u64,
    _feat: u64,
}

/// A userfaultfd for write protection, created with `user_mode_only(false)` semantics (no
/// `UFFD_USER_MODE_ONLY`) so that KVM's own writes to guest memory fault too.
pub(super) struct Uffd(OwnedFd);

fn os_err(what: &str) -> WpError {
    WpError::Uffd(format!("{what}: {}", std::io::Error::last_os_error()))
}

impl Uffd {
    pub(super) fn new() -> Result<Uffd, WpError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes flags only; the result is checked.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as libc::c_int;
        if fd < 0 {
            // Without the capability to see kernel faults, /dev/userfaultfd may still allow it.
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|e| WpError::Uffd(format!("userfaultfd syscall and /dev/userfaultfd: {e}")))?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as its argument.
            fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd < 0 {
                return Err(os_err("/dev/userfaultfd USERFAULTFD_IOC_NEW"));
            }
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let uffd = Uffd(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is.
        if unsafe { libc::ioctl(uffd.raw(), UFFDIO_API, &mut api) } != 0 {
            return Err(os_err(
                "UFFDIO_API with write-protect features (PAGEFAULT_FLAG_WP, WP_UNPOPULATED: Linux 6.4 or later)",
            ));
        }
        Ok(uffd)
    }

    pub(super) fn raw(&self) -> libc::c_int {
        self.0.as_raw_fd()
    }

    /// Registers `start..start+len` in write-protect mode.
    pub(super) fn register_wp(&self, start: u64, len: u64) -> Result<(), WpError> {
        let mut r = UffdioRegister { range: UffdioRange { start, len }, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`, which `r` is;
        // the kernel checks the range is mapped.
        if unsafe { libc::ioctl(self.raw(), UFFDIO_REGISTER, &mut r) } != 0 {
            return Err(os_err("UFFDIO_REGISTER (write-protect mode)"));
        }
        if r.ioctls & IOCTL_WRITEPROTECT == 0 {
            return Err(WpError::Uffd(format!(
                "UFFDIO_WRITEPROTECT not offered for the range (ioctls {:#x})",
                r.ioctls
            )));
        }
        Ok(())
    }

    pub(super) fn unregister(&self, start: u64, len: u64) -> Result<(), WpError> {
        let mut r = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`, which `r` is.
        if unsafe { libc::ioctl(self.raw(), UFFDIO_UNREGISTER, &mut r) } != 0 {
            return Err(os_err("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Write-protects (`protect`) or unprotects and wakes the writers waiting on the range.
    pub(super) fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), WpError> {
        let mode = if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 };
        let mut w = UffdioWriteprotect { range: UffdioRange { start, len }, mode };
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`, which `w` is.
            if unsafe { libc::ioctl(self.raw(), UFFDIO_WRITEPROTECT, &mut w) } == 0 {
                return Ok(());
            }
            // EAGAIN: the address space changed under it; the call is repeatable.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                return Err(os_err(if protect {
                    "UFFDIO_WRITEPROTECT (protect)"
                } else {
                    "UFFDIO_WRITEPROTECT (unprotect)"
                }));
            }
        }
    }

    /// Wakes the threads waiting on faults in the range.
    pub(super) fn wake(&self, start: u64, len: u64) -> Result<(), WpError> {
        let mut r = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`, which `r` is.
        if unsafe { libc::ioctl(self.raw(), UFFDIO_WAKE, &mut r) } != 0 {
            return Err(os_err("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// Reads pending events into `buf`; the number read (0 when none is pending).
    pub(super) fn read_events(&self, buf: &mut [UffdMsg]) -> Result<usize, WpError> {
        let size = std::mem::size_of::<UffdMsg>();
        // SAFETY: `buf` is valid for writes of `buf.len() * size` bytes; `UffdMsg` is plain
        // old data of the kernel's `struct uffd_msg` layout, any bytes are a valid value.
        let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), std::mem::size_of_val(buf)) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(WpError::Uffd(format!("reading userfaultfd events: {e}"))),
            };
        }
        Ok(n as usize / size)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_message_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<super::UffdMsg>(), 32);
        assert_eq!(std::mem::size_of::<super::UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<super::UffdioWriteprotect>(), 24);
    }
}
