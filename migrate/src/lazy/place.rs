//! Placing pages into registered ranges: the results of `UFFDIO_COPY` and `UFFDIO_ZEROPAGE`
//! as the serving code needs them. On `EAGAIN` the kernel reports how many bytes it placed
//! before stopping; the userfaultfd crate keeps that count for copies but drops it for
//! zero-fills, so zero-fills issue the ioctl here.
//!
//! Why a copy. What a page costs to place is its allocation and mapping, not the copy: on
//! the development machines (kvm_pvm, 2 cores), CPU time per 64 KiB chunk placed into fresh
//! memory was 17-25 µs for `UFFDIO_COPY`; 21-29 µs for `MADV_POPULATE_WRITE` alone (allocate
//! and zero, nothing copied yet); 29-32 µs to `pwrite` it into a memfd, plus ~7.5 µs for
//! `UFFDIO_CONTINUE` to map it; 56 µs to populate a shared alias of the memfd, copy into it
//! and `UFFDIO_CONTINUE`; a plain copy into pages already present, 4-6 µs. So decompressing
//! straight into a file-backed guest memory (MINOR faults) would cost more per chunk than
//! decompressing into a buffer and copying, and copies of 256 KiB at once saved 10-20%
//! over 64 KiB ones (a working set's chunks are rarely adjacent).

use std::os::fd::AsRawFd;

use userfaultfd::Uffd;

/// `struct uffdio_zeropage` of the kernel's userfaultfd ABI.
#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// `UFFDIO_ZEROPAGE`: `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;

/// How one `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` went.
pub(super) enum Placed {
    /// The whole range.
    All,
    /// `EAGAIN`: this many bytes were placed (0 when the mm changed before any).
    Part(usize),
    /// `EEXIST`: a page in the range was already present.
    Exists,
    Failed(String),
}

pub(super) fn copy_result(r: Result<usize, userfaultfd::Error>, len: usize) -> Placed {
    match r {
        Ok(_) => Placed::All,
        Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => Placed::Exists,
        // A negative count (nothing placed) arrives as a huge one.
        Err(userfaultfd::Error::PartiallyCopied(n)) => Placed::Part(if n <= len { n } else { 0 }),
        Err(e) => Placed::Failed(e.to_string()),
    }
}

/// `UFFDIO_ZEROPAGE`, keeping the count the kernel reports on a partial zero-fill (`EAGAIN`),
/// which the userfaultfd crate drops.
pub(super) fn zeropage(uffd: &Uffd, dst: *mut libc::c_void, len: usize) -> Placed {
    let mut z = UffdioZeropage { start: dst as u64, len: len as u64, mode: 0, zeropage: 0 };
    // SAFETY: UFFDIO_ZEROPAGE reads and writes exactly one `struct uffdio_zeropage`, which `z`
    // is (same layout); the range is inside a registered block (the caller checked), where
    // the kernel maps zero pages and touches nothing else.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z as *mut UffdioZeropage) };
    if r == 0 {
        return Placed::All;
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Placed::Exists,
        Some(libc::EAGAIN) => Placed::Part(usize::try_from(z.zeropage).ok().filter(|&n| n <= len).unwrap_or(0)),
        _ => Placed::Failed(format!("UFFDIO_ZEROPAGE: {err}")),
    }
}
