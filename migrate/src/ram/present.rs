//! Which pages of a private anonymous mapping are in use, asked of the page tables directly.
//!
//! A lazy restore must start from a block with no page in use: userfaultfd serves only
//! missing pages, so a page that is present, or swapped out, would show the guest its old
//! bytes. `mincore` answers per page (a byte each, up to 16 MiB of mapping per kernel round
//! trip), ~0.65 ms for 4 GiB even where nothing was ever touched, and does not see pages that
//! went to swap. Linux 6.7's `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` walks the page
//! tables and returns only the ranges whose entries are set; empty page-table levels are
//! skipped whole, so an untouched 4 GiB mapping costs a few microseconds, and a swapped-out
//! page is reported like a present one (any entry that is set: `PAGE_IS_PRESENT` or
//! `PAGE_IS_SWAPPED`, the latter covering every non-present entry: swap, migration, markers).
//!
//! Page-table entries are the whole truth only for *private anonymous* memory. A file mapping
//! (a clone's base, `MAP_SHARED`) also shows pages that are in the file's page cache without
//! an entry in this process, which is what `mincore` reports there. So [`used_pages`] first
//! checks, with Linux 6.11's `PROCMAP_QUERY` ioctl on `/proc/self/maps`, that every mapping
//! (VMA) of the range is private and has no file, and answers `None` (the caller falls back
//! to `mincore`) when it cannot say: an older kernel, or another kind of mapping.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// `_IOWR('f', 16, struct pm_scan_arg)` (include/uapi/linux/fs.h).
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong = 0xc068_6611;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PROCMAP_QUERY_VMA_SHARED`: the mapping is `MAP_SHARED`.
const VMA_SHARED: u64 = 0x08;
/// Regions returned per `PAGEMAP_SCAN` call.
const REGIONS: usize = 64;

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct procmap_query`.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

const _: () = assert!(size_of::<PmScanArg>() == 96 && size_of::<ProcmapQuery>() == 104);

/// The ranges (offsets from `host`, page-aligned, ascending, merged where adjacent) of
/// `host..host+len` whose pages are present or swapped out; only the first such range if
/// `first_only`. `None` when the kernel cannot answer exactly (see the module doc): the caller
/// must then ask `mincore`. `host` and `len` must be page-aligned, and the range mapped.
pub fn used_pages(host: usize, len: u64, first_only: bool) -> Result<Option<Vec<Range<u64>>>, String> {
    if len == 0 {
        return Ok(Some(Vec::new()));
    }
    let end = (host as u64).checked_add(len).ok_or_else(|| format!("range {host:#x}+{len:#x} wraps"))?;
    if !private_anonymous(host as u64, end)? {
        return Ok(None);
    }
    let Ok(pagemap) = File::open("/proc/self/pagemap") else {
        return Ok(None);
    };
    let mut regions = [PageRegion::default(); REGIONS];
    let mut out = Vec::new();
    let mut start = host as u64;
    while start < end {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            start,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: REGIONS as u64,
            max_pages: u64::from(first_only),
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `REGIONS` writable
        // page_region entries; the kernel writes only `arg` and those entries.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTTY) {
                return Ok(None);
            }
            return Err(format!("PAGEMAP_SCAN of {start:#x}..{end:#x}: {e}"));
        }
        for r in &regions[..(n as usize).min(REGIONS)] {
            out.push(r.start - host as u64..r.end - host as u64);
            if first_only {
                return Ok(Some(out));
            }
        }
        if arg.walk_end <= start {
            return Err(format!("PAGEMAP_SCAN of {start:#x}..{end:#x} made no progress"));
        }
        start = arg.walk_end;
    }
    Ok(Some(out))
}

/// True if every mapping of `start..end` is private and has no file behind it; false if one
/// is not, or the kernel cannot say (no `PROCMAP_QUERY`).
fn private_anonymous(start: u64, end: u64) -> Result<bool, String> {
    let Ok(maps) = File::open("/proc/self/maps") else {
        return Ok(false);
    };
    let mut at = start;
    while at < end {
        let mut q = ProcmapQuery { size: size_of::<ProcmapQuery>() as u64, query_addr: at, ..Default::default() };
        // SAFETY: `q` is a valid procmap_query asking for no name or build ID (sizes 0), so
        // the kernel writes only `q`.
        if unsafe { libc::ioctl(maps.as_raw_fd(), PROCMAP_QUERY, &mut q) } < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTTY) => Ok(false),
                _ => Err(format!("PROCMAP_QUERY at {at:#x}: {e}")),
            };
        }
        let anonymous = q.inode == 0 && q.dev_major == 0 && q.dev_minor == 0 && q.vma_flags & VMA_SHARED == 0;
        if !anonymous || q.vma_start > at || q.vma_end <= at {
            return Ok(false);
        }
        at = q.vma_end;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    struct Map(*mut u8, usize);

    impl Map {
        fn new(len: usize, flags: libc::c_int, fd: libc::c_int) -> Map {
            // SAFETY: a new mapping at an address the kernel picks.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
            assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
            Map(p.cast(), len)
        }
        fn anon(len: usize) -> Map {
            Map::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1)
        }
        fn touch(&self, page: usize) {
            assert!(page * PAGE < self.1);
            // SAFETY: inside the mapping, which this test owns.
            unsafe { self.0.add(page * PAGE).write_volatile(1) };
        }
        fn used(&self, first_only: bool) -> Option<Vec<Range<u64>>> {
            used_pages(self.0 as usize, self.1 as u64, first_only).expect("scan")
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: the mapping this value created.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    fn supported() -> bool {
        let m = Map::anon(PAGE);
        let ok = m.used(false).is_some();
        if !ok {
            eprintln!("PAGEMAP_SCAN or PROCMAP_QUERY missing (Linux < 6.11): skipped");
        }
        ok
    }

    #[test]
    fn an_untouched_mapping_has_nothing_in_use() {
        if !supported() {
            return;
        }
        let m = Map::anon(1 << 30);
        assert_eq!(m.used(false), Some(vec![]));
        assert_eq!(m.used(true), Some(vec![]));
    }

    #[test]
    fn every_touched_page_is_found_and_only_those() {
        if !supported() {
            return;
        }
        let pages = (64 << 20) / PAGE;
        let m = Map::anon(pages * PAGE);
        // The first and last pages, a run, and more separate pages than one call returns.
        let mut want: Vec<Range<u64>> = Vec::new();
        let mut touched = vec![0, pages - 1, 100, 101, 102];
        touched.extend((0..3 * REGIONS).map(|i| 1000 + 7 * i));
        touched.sort_unstable();
        for &p in &touched {
            m.touch(p);
            let r = (p * PAGE) as u64..((p + 1) * PAGE) as u64;
            match want.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => want.push(r),
            }
        }
        assert_eq!(m.used(false), Some(want.clone()));
        let first: Range<u64> = 0..PAGE as u64;
        assert_eq!(m.used(true), Some([first].to_vec()));
        // A read of an untouched page maps the zero page: in use too (a fault would not come).
        // SAFETY: inside the mapping.
        let _ = unsafe { m.0.add(50 * PAGE).read_volatile() };
        assert!(m.used(false).expect("scan").contains(&((50 * PAGE) as u64..(51 * PAGE) as u64)));
    }

    #[test]
    fn a_range_spanning_several_mappings_is_scanned_whole() {
        if !supported() {
            return;
        }
        let m = Map::anon(16 * PAGE);
        // Different protections split the range into three VMAs.
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { libc::mprotect(m.0.add(4 * PAGE).cast(), 4 * PAGE, libc::PROT_READ) }, 0);
        m.touch(12);
        let page12: Range<u64> = (12 * PAGE) as u64..(13 * PAGE) as u64;
        assert_eq!(m.used(false), Some([page12].to_vec()));
    }

    #[test]
    fn a_file_or_shared_mapping_is_not_answered() {
        if !supported() {
            return;
        }
        // Pages of a shared mapping can be in the page cache with no entry in this process:
        // only mincore sees those.
        let m = Map::new(4 * PAGE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1);
        assert_eq!(m.used(false), None);
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(4 * PAGE as u64).expect("set_len");
        let m = Map::new(4 * PAGE, libc::MAP_PRIVATE, file.as_raw_fd());
        assert_eq!(m.used(false), None);
    }
}
