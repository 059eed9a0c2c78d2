//! VM definition files: `vms/<name>.json` in the state directory, one per VM.
//!
//! Durability. A definition is written to `<name>.json.tmp`, `fsync`ed, renamed over
//! `<name>.json`, and the directory is `fsync`ed; a removal `fsync`s the directory too. So
//! once a request that made, changed or deleted a VM has been answered, a power loss keeps
//! what it answered: without the syncs a new definition could come back empty (its data not
//! yet written when the rename was), and a deleted VM could come back.
//!
//! Damage. Definitions are read back as untrusted input: a regular file (not followed
//! through a symlink, never a FIFO that would block the start), at most [`MAX_DEF`] bytes,
//! valid JSON of a [`VmDef`] whose name is valid and is the file's own name. A file that
//! fails any of these is *damaged*: the daemon starts without that VM, logs an error naming
//! the file and what is wrong with it, counts it in `/metrics`
//! (`snapvisor_vm_definitions_damaged`), leaves the file as it is for the operator, and keeps
//! its name: a client that makes a VM of that name is refused (409, naming the file), so the
//! damaged definition is never overwritten unseen. `DELETE /vms/<name>` removes it, as it
//! would remove a VM of that name. A file whose stem is not a valid VM name is logged and
//! left alone; it can never collide with a VM.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::daemon::validate_name;
use super::vm_def::VmDef;

/// The largest definition read back; the API's own are a few KiB.
pub(super) const MAX_DEF: u64 = 1 << 20;

/// The file of VM `name`'s definition in `dir` (the state directory's `vms/`).
pub(super) fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Writes `def` durably (see the module doc).
pub(super) fn write(dir: &Path, def: &VmDef) -> std::io::Result<()> {
    let path = path(dir, &def.name);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(def).map_err(std::io::Error::other)?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(dir)
    };
    write().inspect_err(|_| {
        // A half-written file is not left beside the definitions.
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Removes VM `name`'s definition durably; one that is not there is not an error.
pub(super) fn remove(dir: &Path, name: &str) -> std::io::Result<()> {
    match std::fs::remove_file(path(dir, name)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// What a start finds in `vms/`.
#[derive(Default)]
pub(super) struct Scan {
    pub(super) defs: Vec<VmDef>,
    /// Damaged definitions: VM name → what is wrong, naming the file.
    pub(super) damaged: BTreeMap<String, String>,
}

/// Reads every definition in `dir`, removing the temporary files a killed daemon was writing
/// (the store's lock, taken before, keeps any other daemon off this directory).
pub(super) fn scan(dir: &Path) -> std::io::Result<Scan> {
    let mut out = Scan::default();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if file.ends_with(".json.tmp") {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("removing {}: {e}", path.display());
            }
            continue;
        }
        let Some(stem) = file.strip_suffix(".json") else { continue };
        if validate_name("VM", stem).is_err() {
            tracing::warn!("ignoring {}: its name is not a VM name", path.display());
            continue;
        }
        match read(&path, stem) {
            Ok(def) => out.defs.push(def),
            Err(why) => {
                let why = format!("the definition {} is damaged: {why}", path.display());
                tracing::error!(vm = stem, "{why}; the VM is not loaded and the file is left as it is");
                out.damaged.insert(stem.to_string(), why);
            }
        }
    }
    // The order of the directory is the file system's; the VMs start in name order.
    out.defs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Reads the definition at `path`, which must be VM `stem`'s (see the module doc).
fn read(path: &Path, stem: &str) -> Result<VmDef, String> {
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => "it is a symbolic link".to_string(),
                _ => e.to_string(),
            },
        )?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    let mut bytes = Vec::new();
    f.take(MAX_DEF + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_DEF {
        return Err(format!("it is larger than {MAX_DEF} bytes"));
    }
    let def: VmDef = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if def.name != stem {
        return Err(format!("it names VM {:?}, not {stem:?}", def.name));
    }
    Ok(def)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str) -> VmDef {
        serde_json::from_value(serde_json::json!({"name": name, "guest": "idle", "mem_mib": 32})).expect("def")
    }

    #[test]
    fn written_definitions_read_back_and_removed_ones_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), &def("a")).expect("write a");
        write(dir.path(), &def("b")).expect("write b");
        write(dir.path(), &def("a")).expect("rewrite a");
        remove(dir.path(), "b").expect("remove b");
        remove(dir.path(), "b").expect("removing a missing one is no error");
        let s = scan(dir.path()).expect("scan");
        assert_eq!(s.defs, vec![def("a")]);
        assert!(s.damaged.is_empty());
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")], "a temporary file was left");
    }

    #[test]
    fn every_kind_of_damage_is_reported_by_name_and_the_file_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write(d, &def("good")).expect("write");
        std::fs::write(d.join("empty.json"), "").expect("empty");
        std::fs::write(d.join("garbage.json"), "{\"name\": \"garbage\", \"mem_mib\": ").expect("cut short");
        std::fs::write(d.join("other.json"), serde_json::to_vec(&def("good")).expect("json")).expect("renamed");
        std::fs::write(d.join("huge.json"), vec![b' '; MAX_DEF as usize + 1]).expect("huge");
        std::os::unix::fs::symlink(d.join("good.json"), d.join("link.json")).expect("symlink");
        nix::unistd::mkfifo(&d.join("fifo.json"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        std::fs::create_dir(d.join("dir.json")).expect("dir");
        std::fs::write(d.join("left.json.tmp"), "half").expect("tmp");
        std::fs::write(d.join(".hidden.json"), "x").expect("not a VM name");

        let s = scan(d).expect("scan");
        assert_eq!(s.defs, vec![def("good")]);
        let expect = [
            ("dir", "not a regular file"),
            ("empty", "EOF"),
            ("fifo", "not a regular file"),
            ("garbage", "EOF"),
            ("huge", "larger than"),
            ("link", "symbolic link"),
            ("other", "names VM \"good\""),
        ];
        let got: Vec<_> = s.damaged.keys().map(String::as_str).collect();
        assert_eq!(got, expect.iter().map(|(n, _)| *n).collect::<Vec<_>>());
        for (name, why) in expect {
            let msg = &s.damaged[name];
            assert!(msg.contains(&format!("{name}.json")) && msg.contains(why), "{name}: {msg}");
            assert!(d.join(format!("{name}.json")).exists() || d.join(format!("{name}.json")).is_symlink());
        }
        assert!(!d.join("left.json.tmp").exists(), "the temporary file stayed");
        assert!(d.join(".hidden.json").exists());
    }
}
