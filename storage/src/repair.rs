//! `store repair`: rebuilds the sled index from the pack files and the manifest files.
//!
//! 1. The old sled database is opened if it still opens, only to salvage manifests that
//!    decode (crc-checked) and attachments; then its files (`conf`, `db`, `snap.*`, `blobs`,
//!    and the clean-close witness `snapvisor-closed`) are moved into `damaged-index-<unix ms>/`
//!    (never deleted).
//! 2. A fresh database is created; every pack is scanned entry by entry (scan.rs, with
//!    decompression and hash check) and each intact chunk is indexed (the first copy wins).
//!    A pack whose header is damaged but whose entries are intact gets its header rewritten;
//!    a pack of another format version, or with no intact entry, is reported and left as is.
//! 3. Manifests: each file that decodes, plus each salvaged sled manifest without a good file
//!    (its file is written). A manifest file that does not decode and has no salvaged copy is
//!    renamed to `.corrupt-<name>`; a snapshot whose chunks are not all found is not listed and
//!    its file is renamed to `.incomplete-<name>`. Nothing is deleted; the report names all.
//! 4. The store is marked clean with the current pack high-water mark.
//!
//! Repair refuses to run while another process has the store open (sled's file lock).

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::chunk::ChunkRef;
use crate::error::{Result, StoreError};
use crate::fsfile::open_regular;
use crate::layout;
use crate::manifest::Manifest;
use crate::mfiles;
use crate::open::{open_sled, FIRST_NEW_PACK};
use crate::pack::{check_pack_header, list_ids, Location, PACK_HEADER};
use crate::scan::scan_pack;
use crate::store::{Store, StoreOptions, CLEAN};

/// What a repair found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    pub packs_scanned: u64,
    /// Packs that could not be used, each with the reason.
    pub packs_unreadable: Vec<String>,
    /// Packs whose damaged header was rewritten (their entries were intact), with the reason.
    pub headers_rewritten: Vec<String>,
    /// Intact entries found in the packs.
    pub entries_found: u64,
    /// Distinct chunks indexed.
    pub chunks_indexed: u64,
    /// Entries with an intact header but a damaged value (crc, decode or hash).
    pub bad_entries: u64,
    /// Bytes skipped between entries (punched holes, torn or damaged data).
    pub skipped_bytes: u64,
    /// Snapshots listed after the repair.
    pub snapshots: Vec<String>,
    /// Manifests that came from the old index because their file was missing or damaged.
    pub manifests_from_old_index: Vec<String>,
    /// Snapshots set aside (file renamed, not listed) with the reason.
    pub set_aside: Vec<String>,
    pub attachments_kept: u64,
    /// Where the old index files were moved, if there were any.
    pub old_index: Option<PathBuf>,
    /// Why the old index could not be opened for salvage, if it could not.
    pub old_index_error: Option<String>,
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}

/// Manifests (name -> raw bytes) and attachments salvaged from the old database.
type Salvage = (BTreeMap<String, Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>);

fn salvage(dir: &Path, report: &mut RepairReport) -> Result<Salvage> {
    let mut out: Salvage = Default::default();
    if !dir.join("db").exists() {
        return Ok(out);
    }
    let db = match open_sled(dir, 16 << 20) {
        Ok(db) => db,
        Err(e @ StoreError::InUse(_)) => return Err(e),
        Err(e) => {
            report.old_index_error = Some(e.to_string());
            return Ok(out);
        }
    };
    let salvage_tree = |name: &str| -> Vec<(Vec<u8>, Vec<u8>)> {
        let Ok(tree) = db.open_tree(name) else { return Vec::new() };
        tree.iter().filter_map(|i| i.ok()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    };
    for (k, v) in salvage_tree("manifests") {
        let name = String::from_utf8_lossy(&k).into_owned();
        if Manifest::decode(&v).is_ok_and(|m| m.name == name) {
            out.0.insert(name, v);
        }
    }
    out.1 = salvage_tree("attachments");
    Ok(out)
}

fn move_aside(dir: &Path) -> Result<Option<PathBuf>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir, "list store directory"))?.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n == "conf" || n == "db" || n == "blobs" || n == crate::sledfiles::WITNESS || n.starts_with("snap.") {
            names.push(n);
        }
    }
    if names.is_empty() {
        return Ok(None);
    }
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let aside = dir.join(format!("damaged-index-{ms}"));
    std::fs::create_dir(&aside).map_err(io(&aside, "create directory for the old index"))?;
    for n in names {
        std::fs::rename(dir.join(&n), aside.join(&n)).map_err(io(&dir.join(&n), "move old index aside"))?;
    }
    crate::fsfile::sync_dir(dir).map_err(io(dir, "sync store directory"))?;
    Ok(Some(aside))
}

fn set_aside(files: &Path, name: &str, prefix: &str) -> Result<()> {
    let from = files.join(name);
    if from.exists() || std::fs::symlink_metadata(&from).is_ok() {
        let to = files.join(format!(".{prefix}-{name}"));
        std::fs::rename(&from, &to).map_err(io(&from, "set manifest file aside"))?;
    }
    Ok(())
}

impl Store {
    /// Rebuilds the index of the store in `dir` from its packs and manifest files (see the
    /// module doc). The store must not be open anywhere.
    pub fn repair(dir: impl AsRef<Path>) -> Result<RepairReport> {
        let dir = dir.as_ref();
        let is_store =
            ["packs", "manifests", layout::MARKER].iter().any(|n| std::fs::symlink_metadata(dir.join(n)).is_ok());
        if !is_store {
            return Err(StoreError::NoStore(dir.to_path_buf()));
        }
        if dir.join(layout::MARKER).exists() {
            if let Err(e @ StoreError::Format { .. }) = layout::check_marker(dir) {
                if e.to_string().contains("is not supported") {
                    return Err(e);
                }
            }
        }
        let mut report = RepairReport::default();
        let (mut salvaged, attachments) = salvage(dir, &mut report)?;
        report.old_index = move_aside(dir)?;
        for sub in ["packs", "manifests"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io(&dir.join(sub), "create store directory"))?;
        }
        layout::write_marker(dir)?;
        let db = open_sled(dir, StoreOptions::default().cache_capacity)?;
        let db_err = |op: &'static str| {
            let path = dir.to_path_buf();
            move |source| StoreError::Db { path, op, source }
        };
        let index = db.open_tree("index").map_err(db_err("open index"))?;
        let manifests = db.open_tree("manifests").map_err(db_err("open manifests"))?;
        let atts = db.open_tree("attachments").map_err(db_err("open attachments"))?;
        let meta = db.open_tree("meta").map_err(db_err("open meta"))?;

        // 2. Chunks from the packs.
        let packs = dir.join("packs");
        let ids = list_ids(&packs).map_err(io(&packs, "list packs"))?;
        for &id in &ids {
            report.packs_scanned += 1;
            let path = packs.join(crate::pack::pack_name(id));
            let file = match open_regular(&path, true) {
                Ok(f) => f,
                Err(e) => {
                    report.packs_unreadable.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let len = file.metadata().map_err(io(&path, "stat pack"))?.len();
            let mut header = [0u8; PACK_HEADER as usize];
            let header_ok = file
                .read_exact_at(&mut header, 0)
                .map_err(|e| e.to_string())
                .and_then(|()| check_pack_header(id, &header));
            let scan = scan_pack(&file, len, true).map_err(io(&path, "scan pack"))?;
            if let Err(why) = header_ok {
                // A header that names another format version with a valid crc is a pack of
                // another build: never touched. A damaged header in front of intact entries
                // is rewritten (it is a pure function of the pack id).
                let foreign = why.contains("not supported");
                if foreign || scan.entries.is_empty() {
                    report.packs_unreadable.push(format!("{}: {why}", path.display()));
                    continue;
                }
                file.write_all_at(&crate::pack::pack_header(id), 0)
                    .and_then(|()| file.sync_data())
                    .map_err(io(&path, "rewrite pack header"))?;
                report.headers_rewritten.push(format!("{}: {why}", path.display()));
            }
            report.entries_found += scan.entries.len() as u64;
            report.bad_entries += scan.bad_entries;
            report.skipped_bytes += scan.skipped_bytes;
            for e in scan.entries {
                let loc = Location { pack: id, offset: e.offset, len: e.len };
                if index
                    .compare_and_swap(e.hash.0, None::<&[u8]>, Some(&loc.encode()[..]))
                    .map_err(db_err("index chunk"))?
                    .is_ok()
                {
                    report.chunks_indexed += 1;
                }
            }
        }

        // 3. Manifests from the files, then from the salvage.
        let files = mfiles::dir_of(dir);
        let mut found: BTreeMap<String, (Manifest, Vec<u8>)> = BTreeMap::new();
        for entry in std::fs::read_dir(&files).map_err(io(&files, "list manifest files"))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match mfiles::read(&files, &name) {
                Ok((m, raw)) => {
                    salvaged.remove(&name);
                    found.insert(name, (m, raw));
                }
                Err(e) => {
                    if crate::name::validate_snapshot_name(&name).is_ok() {
                        if let Some(raw) = salvaged.remove(&name) {
                            set_aside(&files, &name, "corrupt")?;
                            if let Ok(m) = Manifest::decode(&raw) {
                                report.manifests_from_old_index.push(name.clone());
                                found.insert(name, (m, raw));
                            }
                            continue;
                        }
                    }
                    set_aside(&files, &name, "corrupt")?;
                    report.set_aside.push(format!("{name}: {e}"));
                }
            }
        }
        for (name, raw) in std::mem::take(&mut salvaged) {
            if let Ok(m) = Manifest::decode(&raw) {
                report.manifests_from_old_index.push(name.clone());
                found.insert(name, (m, raw));
            }
        }
        let mut listed = HashSet::new();
        for (name, (m, raw)) in found {
            let mut missing = 0u64;
            for c in m.blocks.iter().flat_map(|b| b.chunks.iter()) {
                if let ChunkRef::Stored(h) = c {
                    if !index.contains_key(h.0).map_err(db_err("look up chunk"))? {
                        missing += 1;
                    }
                }
            }
            if missing > 0 {
                set_aside(&files, &name, "incomplete")?;
                report.set_aside.push(format!("{name}: {missing} chunk reference(s) not found in any pack"));
                continue;
            }
            if !files.join(&name).exists() {
                mfiles::write(&files, &name, &raw)?;
            }
            manifests.insert(name.as_bytes(), raw).map_err(db_err("insert manifest"))?;
            listed.insert(name.clone().into_bytes());
            report.snapshots.push(name);
        }
        for (k, v) in attachments {
            if listed.contains(k.split(|b| *b == 0).next().unwrap_or(&[])) {
                atts.insert(k, v).map_err(db_err("insert attachment"))?;
                report.attachments_kept += 1;
            }
        }
        let next = ids.last().map_or(0, |m| m + 1);
        meta.insert(FIRST_NEW_PACK, &next.to_le_bytes()).map_err(db_err("write meta"))?;
        meta.insert(CLEAN, &[1u8][..]).map_err(db_err("write meta"))?;
        db.flush().map_err(db_err("flush"))?;
        tracing::info!(?report, "store repaired");
        Ok(report)
    }
}
