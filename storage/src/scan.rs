//! Scanning pack files entry by entry, for `store repair` (rebuild the index) and
//! `store verify` (check the index against the packs).
//!
//! The scan trusts nothing: an entry counts only if its header has the right magic and crc,
//! its value fits in the file and matches the value crc, and (for repair) the value
//! decompresses to bytes whose blake3 hash is the one the header names. After a bad entry
//! (a torn write, flipped bytes, a punched hole) the scan resynchronises on the next entry
//! magic, so one damaged entry never hides the ones behind it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::chunk::{self, Hash};
use crate::manifest::MAX_CHUNK_SIZE;
use crate::pack::{parse_entry_header, ENTRY_HEADER, ENTRY_MAGIC, PACK_HEADER};

/// Largest value an entry may hold (a 16 MiB chunk that did not compress).
pub(crate) const MAX_VALUE: u64 = MAX_CHUNK_SIZE as u64 + chunk::VALUE_HEADER as u64;
const WINDOW: usize = 1 << 20;

/// One intact entry found by [`scan_pack`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Found {
    pub hash: Hash,
    /// Offset of the value (after the entry header).
    pub offset: u64,
    pub len: u32,
}

/// What a scan of one pack found.
#[derive(Debug, Default)]
pub(crate) struct PackScan {
    pub entries: Vec<Found>,
    /// Entries whose header was intact but whose value was not (crc, decode or hash).
    pub bad_entries: u64,
    /// Bytes skipped while looking for the next entry (holes, torn or flipped data).
    pub skipped_bytes: u64,
}

/// Scans an open pack of `len` bytes whose header was already checked. With `deep`, every
/// value is also decompressed and hashed.
pub(crate) fn scan_pack(file: &File, len: u64, deep: bool) -> std::io::Result<PackScan> {
    let mut out = PackScan::default();
    let mut pos = PACK_HEADER;
    let mut value = Vec::new();
    let mut plain = Vec::new();
    let mut header = [0u8; ENTRY_HEADER as usize];
    while pos + ENTRY_HEADER <= len {
        file.read_exact_at(&mut header, pos)?;
        if let Some(h) = parse_entry_header(&header) {
            let vlen = u64::from(h.len);
            let end = pos + ENTRY_HEADER + vlen;
            if vlen <= MAX_VALUE && end <= len {
                value.resize(vlen as usize, 0);
                file.read_exact_at(&mut value, pos + ENTRY_HEADER)?;
                if crc32fast::hash(&value) == h.value_crc && (!deep || decodes_to(&h.hash, &value, &mut plain)) {
                    out.entries.push(Found { hash: h.hash, offset: pos + ENTRY_HEADER, len: h.len });
                    pos = end;
                    continue;
                }
                out.bad_entries += 1;
            }
        }
        let next = find_magic(file, pos + 1, len)?;
        out.skipped_bytes += next - pos;
        pos = next;
    }
    Ok(out)
}

/// True when `value` decodes to bytes hashing to `hash`.
fn decodes_to(hash: &Hash, value: &[u8], plain: &mut Vec<u8>) -> bool {
    let Some(len) = value.get(1..5).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize) else {
        return false;
    };
    if len > MAX_CHUNK_SIZE as usize {
        return false;
    }
    plain.resize(len, 0);
    chunk::decode_into(hash, value, len, plain).is_ok()
}

/// The first offset at or after `pos` that is not in a hole (`SEEK_DATA`), or `len` when only
/// holes follow. Punched packs, and huge sparse files planted in `packs/`, are skipped fast.
fn next_data(file: &File, pos: u64, len: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let Ok(off) = libc::off_t::try_from(pos) else { return len };
    // SAFETY: lseek on a file descriptor we own; it only moves the (unused) file offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: nothing but holes up to the end. Other errors (no SEEK_DATA support): scan on.
        return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) { len } else { pos };
    }
    (r as u64).clamp(pos, len)
}

/// Offset of the next entry magic at or after `from`, or `len` when there is none.
fn find_magic(file: &File, from: u64, len: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; WINDOW];
    let mut pos = from;
    while pos + ENTRY_MAGIC.len() as u64 <= len {
        pos = next_data(file, pos, len);
        if pos + ENTRY_MAGIC.len() as u64 > len {
            break;
        }
        let n = ((len - pos) as usize).min(WINDOW);
        file.read_exact_at(&mut buf[..n], pos)?;
        if let Some(i) = buf[..n].windows(ENTRY_MAGIC.len()).position(|w| w == ENTRY_MAGIC) {
            return Ok(pos + i as u64);
        }
        // Keep the last 3 bytes: a magic may straddle two windows.
        pos += (n - (ENTRY_MAGIC.len() - 1)).max(1) as u64;
    }
    Ok(len)
}
