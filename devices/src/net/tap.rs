//! A Linux tap device as a [`NetBackend`].
//!
//! `Tap::open(name)` opens `/dev/net/tun` and attaches to the tap `name` with
//! `TUNSETIFF(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)`: the kernel creates the tap when it does
//! not exist and attaches when it does (a persistent tap made by `ip tuntap add`); this needs
//! CAP_NET_ADMIN only (or the tap's owner). The fd is non-blocking; the vnet header is 12
//! bytes (`TUNSETVNETHDRSZ`), and the offloads start off (`TUNSETOFFLOAD 0`) until a driver
//! negotiates some. Bringing the link up and addressing it is the host's business.
//!
//! Which offloads the tap takes is probed once at open: kernels since 4.14 refuse `TUN_F_UFO`
//! on some configurations, and the device then does not offer the UFO features.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

use super::{NetBackend, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Errors opening a tap.
#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap name '{name}' is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("tap '{name}': cannot open /dev/net/tun: {source}")]
    OpenTun { name: String, source: io::Error },
    #[error("tap '{name}' is in use by another process")]
    Busy { name: String },
    #[error("'{name}' is not a tap (a tun device, or another kind of interface, has that name)")]
    NotATap { name: String },
    #[error("tap '{name}': permission denied (needs CAP_NET_ADMIN, or the tap's owner)")]
    PermissionDenied { name: String },
    #[error("tap '{name}': {what} failed: {source}")]
    Ioctl { name: String, what: &'static str, source: io::Error },
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    offloads: u32,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the tun ioctl called with this helper (TUNSETOFFLOAD) takes its argument by value; the
    // fd is a tun file descriptor this module owns.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Creates or attaches the tap `name` (see the module doc).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let invalid = |reason| TapError::InvalidName { name: name.to_string(), reason };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(invalid("it must have 1 to 15 bytes"));
        }
        if name == "." || name == ".." {
            return Err(invalid("'.' and '..' are not interface names"));
        }
        if name.bytes().any(|b| matches!(b, b'/' | b':' | b'%' | 0) || b.is_ascii_whitespace() || !b.is_ascii()) {
            return Err(invalid("it may not hold '/', ':', '%', spaces, NUL or non-ASCII bytes"));
        }
        let path = CString::new("/dev/net/tun").map_err(|_| invalid("internal"))?;
        // SAFETY: a plain open(2) of a NUL-terminated path; the result is checked.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(TapError::OpenTun { name: name.to_string(), source: io::Error::last_os_error() });
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes), which `IfReq` is
        // laid out as; `req` lives across the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy { name },
                Some(libc::EINVAL) => TapError::NotATap { name },
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied { name },
                _ => TapError::Ioctl { name, what: "TUNSETIFF", source: e },
            });
        }
        let ioctl_err = |what, source| TapError::Ioctl { name: name.to_string(), what, source };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) } < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        let all = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        let offloads = if ioctl_int(fd.as_raw_fd(), TUNSETOFFLOAD, u64::from(all | TUN_F_UFO)).is_ok() {
            all | TUN_F_UFO
        } else if ioctl_int(fd.as_raw_fd(), TUNSETOFFLOAD, u64::from(all)).is_ok() {
            all
        } else {
            0
        };
        ioctl_int(fd.as_raw_fd(), TUNSETOFFLOAD, 0).map_err(|e| ioctl_err("TUNSETOFFLOAD", e))?;
        tracing::debug!("tap '{name}' open (offloads {offloads:#x})");
        Ok(Tap { fd, name: name.to_string(), offloads })
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`, which is valid for writes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    unsafe fn read_frame_iov(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees every entry is valid for writes of its length; the
        // kernel writes at most that much into each and reads `count` entries of `iov`.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), count) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: writes `frame.len()` bytes from `frame`, which is valid for reads.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn supported_offloads(&self) -> u32 {
        self.offloads
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        ioctl_int(self.fd.as_raw_fd(), TUNSETOFFLOAD, u64::from(flags & self.offloads))
    }

    fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn name(&self) -> String {
        format!("tap '{}'", self.name)
    }
}
