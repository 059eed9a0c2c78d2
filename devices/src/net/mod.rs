//! Network backends of virtio-net: where the frames a guest sends go and the frames it
//! receives come from.
//!
//! Every frame crossing a [`NetBackend`] carries the 12-byte `virtio_net_hdr_v1` in front
//! (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers), exactly as
//! the guest's driver wrote it or the device hands it to the guest: the tap is opened with
//! `IFF_VNET_HDR` and a header size of 12, so the header passes unchanged both ways and the
//! offloads the guest negotiated (checksum, TSO, UFO) are the tap's to honour.

use std::io;
use std::os::fd::RawFd;

pub mod tap;
#[cfg(test)]
mod tap_tests;

/// Bytes of the virtio-net header in front of every frame.
pub const VNET_HDR_LEN: usize = 12;

/// The most the default [`NetBackend::read_frame_iov`] reads per frame (more than any frame).
pub const SCATTER_SCRATCH: usize = 128 * 1024;

/// `TUNSETOFFLOAD` bits: what the backend may hand the guest (the guest's receive offloads).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// A frame source and sink for one virtio-net device. Frames carry the vnet header.
pub trait NetBackend: Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Reads one frame scattered over `iov` in order (the receive path reads frames straight
    /// into the guest's buffers this way, one copy by the kernel instead of two); `WouldBlock`
    /// when none is waiting. The default reads into a scratch buffer of at most
    /// [`SCATTER_SCRATCH`] bytes and copies it out; a backend with a file descriptor does a
    /// `readv`.
    ///
    /// # Safety
    ///
    /// Every `iov` entry must be valid for writes of `iov_len` bytes for the whole call, and
    /// no Rust reference may point into that memory meanwhile (guest memory qualifies: it is
    /// only ever accessed through raw pointers).
    unsafe fn read_frame_iov(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let total: usize = iov.iter().map(|v| v.iov_len).fold(0, usize::saturating_add);
        let mut scratch = vec![0u8; total.min(SCATTER_SCRATCH)];
        let n = self.read_frame(&mut scratch)?;
        let mut at = 0;
        for v in iov {
            if at == n {
                break;
            }
            let k = v.iov_len.min(n - at);
            // SAFETY: `scratch[at..at + k]` is inside `scratch` (at + k <= n <= its length),
            // and the caller guarantees `iov_base` is valid for writes of `iov_len >= k` bytes
            // and is not memory `scratch` owns.
            unsafe { std::ptr::copy_nonoverlapping(scratch.as_ptr().add(at), v.iov_base.cast::<u8>(), k) };
            at += k;
        }
        Ok(n)
    }
    /// Sends one frame; `WouldBlock` when the backend cannot take it now.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Which `TUN_F_*` offloads [`NetBackend::set_offload`] accepts.
    fn supported_offloads(&self) -> u32;
    /// Sets the offloads the guest negotiated (`TUN_F_*`).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// A file descriptor that polls readable (level-triggered) while frames are waiting.
    fn poll_fd(&self) -> RawFd;
    /// For logs.
    fn name(&self) -> String;
}

/// What a device's backend becomes once the device is shut down (its VM has ended): no frames
/// either way, and the real backend (the tap) closed, so the tap is free for another VM.
pub struct Detached {
    name: String,
    idle: vmm_sys_util::eventfd::EventFd,
}

impl Detached {
    /// Replaces `backend`'s role, keeping its name for logs.
    pub fn new(name: String) -> io::Result<Detached> {
        Ok(Detached { name, idle: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)? })
    }
}

impl NetBackend for Detached {
    fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn write_frame(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn supported_offloads(&self) -> u32 {
        0
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
    fn poll_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.idle.as_raw_fd()
    }
    fn name(&self) -> String {
        format!("{} (detached)", self.name)
    }
}
