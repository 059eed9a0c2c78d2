//! Pack files: chunk values live outside sled, appended to `packs/<id>.pack`.
//!
//! sled (a log-structured store) kept 1.5-2.6x the bytes of chunk values on disk in
//! measurement: leaf nodes holding values are rewritten on consolidation and segments are only
//! cleaned below 50% live. So sled holds only the small index `hash -> location` and the
//! manifests, and chunk values are appended to pack files.
//!
//! # Format (version 2)
//!
//! Packs are self-describing, so `store repair` can rebuild the index from them alone:
//!
//! ```text
//! pack header, 16 bytes at offset 0:
//!     magic "SVPK", format version u16 LE (2), reserved u16 (0), pack id u32 LE,
//!     crc32 of bytes 0..12 u32 LE
//! then entries back to back, each:
//!     entry header, 48 bytes: magic "SVCE", value length u32 LE, blake3 hash of the
//!         uncompressed chunk (32 B), crc32 of the value u32 LE, crc32 of bytes 0..44 u32 LE
//!     value: codec u8 (1 zstd, 2 raw, 3 LZ4), uncompressed length u32 LE, payload (chunk.rs)
//! ```
//!
//! The index (sled tree `index`, key = 32-byte hash) holds pack id u32 LE, offset u64 LE,
//! length u32 LE of the *value*; its entry header sits just before it. Every read checks
//! that header against the hash and length the index gave, so an index that disagrees with
//! its packs is an error, never wrong bytes. Format 1 packs (no headers, before this change)
//! are refused when opened, naming the pack and the version; such stores must be re-created.
//!
//! # Writing
//!
//! * a writer reserves its bytes at the end of the active pack (a short mutex), then writes
//!   entry header and value with one `pwrite` outside any lock; packs rotate at [`PACK_MAX`]
//!   bytes (or the store's `pack_max` option, which tests set small to cross pack boundaries). A process never appends to a pack it did not create: after opening, the first
//!   write starts pack `max existing id + 1`, so torn tails from a crash are never extended.
//!   Creating a pack `fsync`s the `packs/` directory, so the file survives power loss.
//! * a pack is marked unsynced (its generation bumped) *before* a write into it and again
//!   after. [`Packs::sync`] notes each pack's generation, `fdatasync`s it without holding the
//!   mark lock, and clears the mark only if the generation did not move meanwhile: a write
//!   that was in flight during the sync keeps its pack marked, so the next commit syncs it.
//!   Writers therefore never wait for a sync, and a commit never returns with bytes it may
//!   reference (through dedup) still unsynced.
//! * GC frees dead chunk values by punching holes (`FALLOC_FL_PUNCH_HOLE`) into every gap
//!   between live entries (header and value); a pack with no live entry is deleted and its
//!   file closed at once, so the space returns to the filesystem in the same process.
//!   Punching is idempotent, so space leaked by a crash is recovered by the next GC.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::chunk::Hash;
use crate::fsfile::{open_regular, sync_dir};

/// Size at which the active pack is closed and a new one started.
pub const PACK_MAX: u64 = 1 << 30;
/// Highest pack id a store may use (lifetime writes up to this many GiB).
pub const MAX_PACKS: u32 = 1 << 18;
/// Magic bytes of a pack header.
pub const PACK_MAGIC: &[u8; 4] = b"SVPK";
/// Pack format version written and read by this build.
pub const PACK_VERSION: u16 = 2;
/// Length of the pack header.
pub const PACK_HEADER: u64 = 16;
/// Magic bytes of an entry header.
pub const ENTRY_MAGIC: &[u8; 4] = b"SVCE";
/// Length of an entry header.
pub const ENTRY_HEADER: u64 = 48;

/// Where a chunk value is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

impl Location {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.pack.to_le_bytes());
        out[4..12].copy_from_slice(&self.offset.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decodes an index value; `None` when it is not 16 bytes.
    pub fn decode(raw: &[u8]) -> Option<Location> {
        let raw: &[u8; 16] = raw.try_into().ok()?;
        let (p, rest) = raw.split_first_chunk::<4>()?;
        let (o, l) = rest.split_first_chunk::<8>()?;
        let l: &[u8; 4] = l.try_into().ok()?;
        Some(Location { pack: u32::from_le_bytes(*p), offset: u64::from_le_bytes(*o), len: u32::from_le_bytes(*l) })
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The header of pack `id`.
pub(crate) fn pack_header(id: u32) -> [u8; PACK_HEADER as usize] {
    let mut h = [0u8; PACK_HEADER as usize];
    h[0..4].copy_from_slice(PACK_MAGIC);
    h[4..6].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&id.to_le_bytes());
    let crc = crc32fast::hash(&h[0..12]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks the header of pack `id`; the error says what is wrong with it.
pub(crate) fn check_pack_header(id: u32, h: &[u8]) -> Result<(), String> {
    if h.len() < PACK_HEADER as usize {
        return Err(format!("{} bytes is shorter than the {PACK_HEADER}-byte pack header", h.len()));
    }
    if &h[0..4] != PACK_MAGIC {
        return Err(format!(
            "bad magic {:02x?}, expected \"SVPK\" (a format 1 pack from an older build has no header; \
             re-create the store)",
            &h[0..4]
        ));
    }
    let (crc, actual) = (le32(h, 12), crc32fast::hash(&h[0..12]));
    if crc != actual {
        return Err(format!("header crc32 0x{actual:08x} != stored 0x{crc:08x}"));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PACK_VERSION {
        return Err(format!("pack format version {version} is not supported (this build reads {PACK_VERSION})"));
    }
    let stored = le32(h, 8);
    if stored != id {
        return Err(format!("header names pack {stored}"));
    }
    Ok(())
}

/// A decoded entry header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryHeader {
    pub len: u32,
    pub hash: Hash,
    pub value_crc: u32,
}

/// The entry header written before `value` of chunk `hash`.
pub(crate) fn entry_header(hash: &Hash, value: &[u8], len: u32) -> [u8; ENTRY_HEADER as usize] {
    let mut h = [0u8; ENTRY_HEADER as usize];
    h[0..4].copy_from_slice(ENTRY_MAGIC);
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..40].copy_from_slice(&hash.0);
    h[40..44].copy_from_slice(&crc32fast::hash(value).to_le_bytes());
    let crc = crc32fast::hash(&h[0..44]);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Fills the first [`ENTRY_HEADER`] bytes of `entry` with the header of chunk `hash` whose
/// value is the rest of `entry`: a complete entry, appended by [`Packs::append_entry`]
/// without another copy. (The pipeline's workers build entries so; the crc is theirs to pay.)
pub(crate) fn seal_entry(hash: &Hash, entry: &mut [u8]) -> std::io::Result<()> {
    let (head, value) = entry
        .split_at_mut_checked(ENTRY_HEADER as usize)
        .ok_or_else(|| std::io::Error::other("pack entry shorter than its header"))?;
    let len = u32::try_from(value.len()).map_err(|_| std::io::Error::other("chunk value over 4 GiB"))?;
    head.copy_from_slice(&entry_header(hash, value, len));
    Ok(())
}

/// Decodes an entry header; `None` unless magic and header crc are right.
pub(crate) fn parse_entry_header(h: &[u8]) -> Option<EntryHeader> {
    let h = h.get(..ENTRY_HEADER as usize)?;
    if &h[0..4] != ENTRY_MAGIC || le32(h, 44) != crc32fast::hash(&h[0..44]) {
        return None;
    }
    let hash: [u8; 32] = h[8..40].try_into().ok()?;
    Some(EntryHeader { len: le32(h, 4), hash: Hash(hash), value_crc: le32(h, 40) })
}

struct Active {
    id: u32,
    /// Bytes used in pack `id`; 0 until this process created it.
    len: u64,
}

pub(crate) struct Packs {
    dir: PathBuf,
    read_only: bool,
    /// Size at which the active pack is closed.
    max: u64,
    first_new: u32,
    /// Open pack files. Readers clone the `Arc` under a short read lock; a deleted pack is
    /// removed here so its file closes once the last in-flight read drops it.
    files: RwLock<HashMap<u32, Arc<File>>>,
    active: Mutex<Active>,
    /// Pack id -> write generation, for every pack written since its last sync.
    unsynced: Mutex<BTreeMap<u32, u64>>,
}

pub(crate) fn pack_name(id: u32) -> String {
    format!("{id:08}.pack")
}

/// Pack ids present in `dir`.
pub(crate) fn list_ids(dir: &Path) -> std::io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name.strip_suffix(".pack").and_then(|s| s.parse::<u32>().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

impl Packs {
    /// Opens the pack directory `dir` (created unless `read_only`).
    pub fn open(dir: PathBuf, read_only: bool, max: u64) -> std::io::Result<Packs> {
        if !read_only {
            std::fs::create_dir_all(&dir)?;
        }
        let next = list_ids(&dir)?.last().map_or(0, |m| m + 1);
        Ok(Packs {
            dir,
            read_only,
            max,
            first_new: next,
            files: RwLock::new(HashMap::new()),
            active: Mutex::new(Active { id: next, len: 0 }),
            unsynced: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first pack id this handle writes (all lower ids existed when it opened).
    pub fn first_new_id(&self) -> u32 {
        self.first_new
    }

    pub fn path(&self, id: u32) -> PathBuf {
        self.dir.join(pack_name(id))
    }

    /// The open file of pack `id`, opening it (and checking its header) on first use.
    pub fn file(&self, id: u32) -> std::io::Result<Arc<File>> {
        if let Some(f) = self.files.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(f.clone());
        }
        if id >= MAX_PACKS {
            return Err(invalid(format!("pack id {id} exceeds {MAX_PACKS}")));
        }
        let path = self.path(id);
        let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let f = open_regular(&path, !self.read_only).map_err(named)?;
        let mut h = [0u8; PACK_HEADER as usize];
        f.read_exact_at(&mut h, 0).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                invalid(format!("{}: shorter than the {PACK_HEADER}-byte pack header", path.display()))
            } else {
                named(e)
            }
        })?;
        check_pack_header(id, &h).map_err(|m| invalid(format!("{}: {m}", path.display())))?;
        let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
        Ok(files.entry(id).or_insert_with(|| Arc::new(f)).clone())
    }

    fn mark(&self, id: u32) {
        *self.unsynced.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_insert(0) += 1;
    }

    /// Appends chunk `hash`'s `value` (with its entry header) to the active pack.
    #[cfg(test)]
    pub fn append(&self, hash: &Hash, value: &[u8]) -> std::io::Result<Location> {
        let mut entry = Vec::with_capacity(ENTRY_HEADER as usize + value.len());
        entry.resize(ENTRY_HEADER as usize, 0);
        entry.extend_from_slice(value);
        seal_entry(hash, &mut entry)?;
        self.append_entry(&entry)
    }

    /// Appends a complete entry (header and value, see [`seal_entry`]) to the active pack
    /// with one `pwrite`; returns where its value is.
    pub fn append_entry(&self, entry: &[u8]) -> std::io::Result<Location> {
        let (id, offset) = self.reserve(entry.len() as u64)?;
        self.write_entry_at(id, offset, entry)
    }

    /// Reserves `total` bytes (one whole entry) at the end of the active pack, rotating to a
    /// new pack when it would pass the size limit; returns the pack and the offset. The
    /// caller holds the GC lock shared until it has written the entry there
    /// ([`Packs::write_entry_at`]): a GC never sees a reservation that was not filled.
    pub fn reserve(&self, total: u64) -> std::io::Result<(u32, u64)> {
        if self.read_only {
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "store is open read-only"));
        }
        let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if a.len > 0 && a.len + total > self.max {
            a.id += 1;
            a.len = 0;
        }
        if a.len == 0 {
            self.create(a.id)?;
            a.len = PACK_HEADER;
        }
        let off = a.len;
        a.len += total;
        Ok((a.id, off))
    }

    /// Writes a complete entry into the space [`Packs::reserve`] gave for it; returns where
    /// its value is.
    pub fn write_entry_at(&self, id: u32, offset: u64, entry: &[u8]) -> std::io::Result<Location> {
        let locs = self.write_entries_at(id, offset, &[entry])?;
        locs.into_iter().next().ok_or_else(|| std::io::Error::other("no pack entry written"))
    }

    /// Writes complete entries back to back into the space [`Packs::reserve`] gave for all
    /// of them (their summed length), with one `pwritev` (more only if the kernel writes
    /// short); returns where each value is. One large write costs the kernel's page cache
    /// far less per byte than an entry-sized one each (see pipeline.rs).
    pub fn write_entries_at(&self, id: u32, offset: u64, entries: &[&[u8]]) -> std::io::Result<Vec<Location>> {
        let mut locs = Vec::with_capacity(entries.len());
        let mut at = offset;
        for e in entries {
            let total = e.len() as u64;
            let len = total
                .checked_sub(ENTRY_HEADER)
                .and_then(|l| u32::try_from(l).ok())
                .ok_or_else(|| std::io::Error::other(format!("pack entry of {total} bytes")))?;
            locs.push(Location { pack: id, offset: at + ENTRY_HEADER, len });
            at += total;
        }
        // Marked before the write (and again after): see the module doc.
        self.mark(id);
        write_all_vectored_at(&*self.file(id)?, entries, offset)?;
        self.mark(id);
        Ok(locs)
    }

    /// Creates pack `id` with its header and makes its directory entry durable.
    fn create(&self, id: u32) -> std::io::Result<()> {
        if id >= MAX_PACKS {
            return Err(invalid(format!("pack id {id} exceeds {MAX_PACKS}")));
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path(id))?;
        f.write_all_at(&pack_header(id), 0)?;
        self.mark(id);
        sync_dir(&self.dir)?;
        self.files.write().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::new(f));
        Ok(())
    }

    /// Reads the value at `loc` into `buf` (resized to fit), checking that the entry header
    /// before it names `hash` and the same length.
    pub fn read(&self, hash: &Hash, loc: Location, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let start = loc
            .offset
            .checked_sub(ENTRY_HEADER)
            .filter(|s| *s >= PACK_HEADER)
            .ok_or_else(|| invalid(format!("offset 0x{:x} lies inside the pack header", loc.offset)))?;
        buf.resize(ENTRY_HEADER as usize + loc.len as usize, 0);
        self.file(loc.pack)?.read_exact_at(buf, start)?;
        let h = parse_entry_header(buf).ok_or_else(|| invalid("no valid entry header before the value".into()))?;
        if h.hash != *hash || h.len != loc.len {
            return Err(invalid(format!(
                "the entry there holds chunk {} of {} bytes: the index disagrees with the pack",
                h.hash, h.len
            )));
        }
        buf.drain(..ENTRY_HEADER as usize);
        Ok(())
    }

    /// `fdatasync`s every pack written since its last sync.
    pub fn sync(&self) -> std::io::Result<()> {
        for (id, generation) in self.pending() {
            self.file(id)?.sync_data()?;
            self.synced(id, generation);
        }
        Ok(())
    }

    /// Starts writing back every pack written since its last sync, without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the `sync` of a commit finds most
    /// of a large snapshot already on disk instead of flushing all of it at the end.
    /// Durability still comes only from [`Packs::sync`]; the unsynced marks are untouched.
    pub fn start_writeback(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        for (id, _) in self.pending() {
            let f = self.file(id)?;
            // SAFETY: `f` is an open pack file that stays open while `f` (an Arc) lives; the
            // call only initiates writeback of its dirty pages and touches no memory of ours.
            let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Packs written since their last sync, with their write generation.
    fn pending(&self) -> Vec<(u32, u64)> {
        self.unsynced.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Clears pack `id`'s unsynced mark after a sync that began at `generation`, unless a
    /// write marked it since (that write may have missed the sync).
    fn synced(&self, id: u32, generation: u64) {
        let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        if unsynced.get(&id) == Some(&generation) {
            unsynced.remove(&id);
        }
    }

    /// Frees everything in pack `id` outside the sorted `live` value extents (their entry
    /// headers and the pack header stay). Returns the bytes handed to the hole punch, or
    /// deletes (and closes) the pack when nothing in it is live and it is not the active
    /// pack. A pack whose header is not valid is an `InvalidData` error and stays untouched.
    /// Caller holds the GC lock exclusively (no write in flight).
    pub fn reclaim(&self, id: u32, live: &[(u64, u64)]) -> std::io::Result<u64> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner()).id;
        // Only a pack with a valid header is ever punched or deleted: a damaged or foreign
        // file in packs/ is left alone (the error says which).
        let file = self.file(id)?;
        if live.is_empty() && id != active {
            drop(file);
            let path = self.path(id);
            let len = std::fs::symlink_metadata(&path)?.len();
            std::fs::remove_file(&path)?;
            self.files.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
            self.unsynced.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            sync_dir(&self.dir)?;
            return Ok(len);
        }
        let end = file.metadata()?.len();
        let mut freed = 0;
        let mut pos = PACK_HEADER;
        let extents = live.iter().map(|&(off, len)| (off.saturating_sub(ENTRY_HEADER), len + ENTRY_HEADER));
        for (off, len) in extents.chain(std::iter::once((end, 0))) {
            if off > pos {
                punch(&file, pos, off - pos)?;
                freed += off - pos;
            }
            pos = pos.max(off + len);
        }
        Ok(freed)
    }
}

/// The most buffers one `pwritev` takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// Writes `bufs` back to back at `offset` of `file`, all of them (like `write_all_at`).
fn write_all_vectored_at(file: &File, bufs: &[&[u8]], mut offset: u64) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = bufs.iter().map(|b| std::io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = rest.len().min(IOV_MAX);
        let off = libc::off_t::try_from(offset).map_err(|_| std::io::Error::other("pack offset too large"))?;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix (std documents it); the
        // first `n` slices are valid, initialised buffers that outlive the call, which only
        // reads them; `file` is an open descriptor.
        let r = unsafe { libc::pwritev(file.as_raw_fd(), rest.as_ptr().cast::<libc::iovec>(), n as libc::c_int, off) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "pwritev wrote nothing"));
        }
        offset += r as u64;
        std::io::IoSlice::advance_slices(&mut rest, r as usize);
    }
    Ok(())
}

fn punch(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let to_off = |v: u64| i64::try_from(v).map_err(|_| std::io::Error::other("offset too large"));
    fallocate(file.as_raw_fd(), flags, to_off(offset)?, to_off(len)?).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsynced(p: &Packs, id: u32) -> bool {
        p.unsynced.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&id)
    }

    /// A write that lands while a sync of its pack is in flight keeps the pack marked, so
    /// the next commit syncs it again.
    #[test]
    fn a_write_during_a_sync_keeps_its_pack_unsynced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = Packs::open(dir.path().join("packs"), false, PACK_MAX).expect("open");
        let loc = packs.append(&Hash([1; 32]), b"first value").expect("append");
        let pending = packs.pending();
        assert_eq!(pending.len(), 1);
        // The sync has noted the generation; now another writer appends to the same pack.
        packs.append(&Hash([2; 32]), b"second value").expect("append");
        packs.file(loc.pack).expect("file").sync_data().expect("fdatasync");
        packs.synced(pending[0].0, pending[0].1);
        assert!(unsynced(&packs, loc.pack), "a write after the sync began was forgotten");
        packs.sync().expect("sync");
        assert!(!unsynced(&packs, loc.pack));
    }

    #[test]
    fn entries_carry_a_checked_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = Packs::open(dir.path().join("packs"), false, PACK_MAX).expect("open");
        let h = Hash([7; 32]);
        let loc = packs.append(&h, b"value bytes").expect("append");
        let mut buf = Vec::new();
        packs.read(&h, loc, &mut buf).expect("read");
        assert_eq!(buf, b"value bytes");
        let e = packs.read(&Hash([8; 32]), loc, &mut buf).expect_err("other hash").to_string();
        assert!(e.contains("disagrees"), "{e}");
        let bad = Location { len: loc.len + 1, ..loc };
        assert!(packs.read(&h, bad, &mut buf).is_err());
    }
}
