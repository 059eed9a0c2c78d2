//! Pack files: chunk values live outside sled, appended to `packs/<id>.pack`.
//!
//! sled (a log-structured store) kept 1.5-2.6x the bytes of chunk values on disk in
//! measurement: leaf nodes holding values are rewritten on consolidation and segments are only
//! cleaned below 50% live. So sled holds only the small index `hash -> location` and the
//! manifests, and chunk values are appended to pack files:
//!
//! * a writer reserves `len` bytes at the end of the active pack (a short mutex), then writes
//!   with `pwrite` outside any lock; packs rotate at [`PACK_MAX`] bytes (or the store's
//!   `pack_max` option, which tests set small to cross pack boundaries). A process never
//!   appends to a pack it did not create: after opening, the first write starts pack
//!   `max existing id + 1`, so torn tails from a crash are never extended.
//! * a pack is marked unsynced after each write; commit `fdatasync`s every unsynced pack
//!   (under one mutex, so a concurrent commit cannot skip a sync still in flight) before the
//!   manifest is inserted.
//! * GC frees dead chunk values by punching holes (`FALLOC_FL_PUNCH_HOLE`) into every gap
//!   between live extents; a pack with no live extent is deleted. Punching is idempotent, so
//!   space leaked by a crash is recovered by the next GC.
//!
//! Index value (sled tree `index`, key = 32-byte hash): pack id u32 LE, offset u64 LE,
//! length u32 LE.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Size at which the active pack is closed and a new one started.
pub const PACK_MAX: u64 = 1 << 30;
/// Most pack ids one store can ever use (lifetime writes up to this many GiB).
pub const MAX_PACKS: usize = 1 << 18;

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

struct Active {
    id: u32,
    len: u64,
}

pub(crate) struct Packs {
    dir: PathBuf,
    /// Size at which the active pack is closed.
    max: u64,
    files: Box<[OnceLock<File>]>,
    active: Mutex<Active>,
    unsynced: Mutex<BTreeSet<u32>>,
}

fn pack_name(id: u32) -> String {
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

impl Packs {
    pub fn open(dir: PathBuf, max: u64) -> std::io::Result<Packs> {
        std::fs::create_dir_all(&dir)?;
        let next = list_ids(&dir)?.last().map_or(0, |m| m + 1);
        let files = (0..MAX_PACKS).map(|_| OnceLock::new()).collect();
        Ok(Packs {
            dir,
            max,
            files,
            active: Mutex::new(Active { id: next, len: 0 }),
            unsynced: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(pack_name(id))
    }

    fn slot(&self, id: u32) -> std::io::Result<&OnceLock<File>> {
        self.files.get(id as usize).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("pack id {id} exceeds {MAX_PACKS}"))
        })
    }

    /// The open file of pack `id`, opening it on first use (no lock once open).
    pub fn file(&self, id: u32) -> std::io::Result<&File> {
        let slot = self.slot(id)?;
        if let Some(f) = slot.get() {
            return Ok(f);
        }
        let f = OpenOptions::new().read(true).write(true).open(self.path(id))?;
        let _ = slot.set(f);
        slot.get().ok_or_else(|| std::io::Error::other("pack slot empty after set"))
    }

    /// Reserves `len` bytes in the active pack and writes `data` there.
    pub fn append(&self, data: &[u8]) -> std::io::Result<Location> {
        let len = u32::try_from(data.len()).map_err(|_| std::io::Error::other("chunk value over 4 GiB"))?;
        let (id, offset) = {
            let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if a.len > 0 && a.len + u64::from(len) > self.max {
                a.id += 1;
                a.len = 0;
            }
            if a.len == 0 {
                let slot = self.slot(a.id)?;
                let f = OpenOptions::new().read(true).write(true).create_new(true).open(self.path(a.id))?;
                let _ = slot.set(f);
            }
            let off = a.len;
            a.len += u64::from(len);
            (a.id, off)
        };
        self.file(id)?.write_all_at(data, offset)?;
        self.unsynced.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
        Ok(Location { pack: id, offset, len })
    }

    /// Reads the value at `loc` into `buf` (resized to fit).
    pub fn read(&self, loc: Location, buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.resize(loc.len as usize, 0);
        self.file(loc.pack)?.read_exact_at(buf, loc.offset)
    }

    /// `fdatasync`s every pack written since the last sync.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&id) = unsynced.iter().next() {
            self.file(id)?.sync_data()?;
            unsynced.remove(&id);
        }
        Ok(())
    }

    /// Frees everything in pack `id` outside the sorted `live` extents. Returns the bytes
    /// handed to the hole punch, or deletes the pack when nothing in it is live and it is
    /// not the active pack. Caller holds the GC lock exclusively (no write in flight).
    pub fn reclaim(&self, id: u32, live: &[(u64, u64)]) -> std::io::Result<u64> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner()).id;
        if live.is_empty() && id != active {
            let len = std::fs::metadata(self.path(id))?.len();
            std::fs::remove_file(self.path(id))?;
            return Ok(len);
        }
        let file = self.file(id)?;
        let end = file.metadata()?.len();
        let mut freed = 0;
        let mut pos = 0;
        for &(off, len) in live.iter().chain(std::iter::once(&(end, 0))) {
            if off > pos {
                punch(file, pos, off - pos)?;
                freed += off - pos;
            }
            pos = pos.max(off + len);
        }
        Ok(freed)
    }
}

fn punch(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let to_off = |v: u64| i64::try_from(v).map_err(|_| std::io::Error::other("offset too large"));
    fallocate(file.as_raw_fd(), flags, to_off(offset)?, to_off(len)?).map_err(std::io::Error::from)
}
