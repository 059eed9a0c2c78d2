//! Boot images: the only files an API client may make the daemon read.
//!
//! The daemon runs as root and its clients may not be, so a VM's kernel and initrd are named,
//! not given as paths: `"kernel": "vmlinuz"` means the file `vmlinuz` in the image directory
//! (`--image-dir`, default `images/` in the state directory: `/var/lib/snapvisor/images`),
//! which the operator fills, or which a
//! client fills through `PUT /images/{name}` (at most `--max-image-size` bytes, streamed to a
//! hidden temporary file and renamed into place when complete, so a half-uploaded image is
//! never visible).
//!
//! Guarantees: a name is 1 to 64 of `[A-Za-z0-9._-]` not starting with a dot (so it cannot
//! leave the directory or name an upload in progress); the file is opened with `O_NOFOLLOW`
//! and `O_NONBLOCK` and must be a regular file (no symlink to `/etc/shadow`, no `/dev/zero`, no
//! FIFO); its size is checked against the limit before a byte is read. Error messages name the
//! image, never a path outside the directory, and never quote a file's contents.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::boot::files::{kind_of, BootFile, BootFileError};

/// The default largest image, in bytes (a kernel plus a generous initrd).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 512 << 20;

/// Errors about images; each names the image (never a path outside the image directory).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image name {name:?} is invalid: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.' (images are named, not given as paths; see --image-dir)")]
    Name { name: String },
    #[error("{0}")]
    File(#[from] BootFileError),
    #[error("no image {name:?}")]
    NotFound { name: String },
    #[error("image {name:?} is larger than the {limit} bytes allowed (--max-image-size)")]
    TooLarge { name: String, limit: u64 },
    #[error("image {name:?}: {what}: {source}")]
    Io { name: String, what: &'static str, source: std::io::Error },
    #[error("image directory: {0}")]
    Dir(String),
}

impl ImageError {
    /// Whether the client asked for something wrong (rather than the daemon failing).
    pub fn is_input(&self) -> bool {
        match self {
            ImageError::Name { .. } | ImageError::NotFound { .. } | ImageError::TooLarge { .. } => true,
            ImageError::File(BootFileError::Io { .. }) => false,
            ImageError::File(_) => true,
            ImageError::Io { .. } | ImageError::Dir(_) => false,
        }
    }
}

/// An image as `GET /images` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub size: u64,
}

/// The image directory.
#[derive(Debug)]
pub struct ImageDir {
    root: PathBuf,
    max_bytes: u64,
}

/// The rule for every name a client gives (VMs, snapshots, images): 1 to 64 of
/// `[A-Za-z0-9._-]`, not starting with a dot (they become file names).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks an image name (the same rules as VM names).
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(ImageError::Name { name: name.to_string() })
    }
}

impl ImageDir {
    /// The image directory at `root` (created, `0700`, if missing).
    pub fn open(root: &Path, max_bytes: u64) -> Result<ImageDir, ImageError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| ImageError::Dir(format!("creating {}: {e}", root.display())))?;
        remove_dead_uploads(root);
        Ok(ImageDir { root: root.to_path_buf(), max_bytes })
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Reads image `name` as the VM's `what` ("kernel", "initrd"), at most `limit` bytes (and
    /// never more than `--max-image-size`).
    pub fn read(&self, what: &'static str, name: &str, limit: u64) -> Result<BootFile, ImageError> {
        validate_name(name)?;
        Ok(BootFile::read(what, name, &self.root.join(name), true, limit.min(self.max_bytes))?)
    }

    /// Where image `name` is (checked as a name; the file is not opened).
    pub fn path(&self, name: &str) -> Result<std::path::PathBuf, ImageError> {
        validate_name(name)?;
        Ok(self.root.join(name))
    }

    /// Checks that image `name` can be read as `what`, without reading it.
    pub fn check(&self, what: &'static str, name: &str) -> Result<(), ImageError> {
        self.read(what, name, 0).map(drop).or_else(|e| match e {
            ImageError::File(BootFileError::TooLarge { .. }) => Ok(()),
            e => Err(e),
        })
    }

    /// The images, by name (regular files only).
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let entries = std::fs::read_dir(&self.root).map_err(|e| ImageError::Dir(format!("listing: {e}")))?;
        let mut out: Vec<ImageInfo> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let meta = e.metadata().ok().filter(|m| m.file_type().is_file())?;
                validate_name(&name).ok().map(|()| ImageInfo { name, size: meta.len() })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes image `name`.
    pub fn delete(&self, name: &str) -> Result<(), ImageError> {
        validate_name(name)?;
        let path = self.root.join(name);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound { name: name.to_string() })
            }
            Err(source) => return Err(ImageError::Io { name: name.to_string(), what: "inspecting", source }),
            Ok(m) if !m.file_type().is_file() => {
                return Err(ImageError::File(BootFileError::NotRegular {
                    what: "image",
                    name: name.to_string(),
                    kind: kind_of(m.file_type()),
                }))
            }
            Ok(_) => {}
        }
        std::fs::remove_file(&path).map_err(|source| ImageError::Io {
            name: name.to_string(),
            what: "removing",
            source,
        })
    }

    /// Starts an upload of image `name`: a hidden temporary file in the directory.
    pub fn upload(&self, name: &str) -> Result<Upload, ImageError> {
        validate_name(name)?;
        let io = |what| move |source| ImageError::Io { name: name.to_string(), what, source };
        for n in 0u32.. {
            let tmp = self.root.join(format!("{UPLOAD_PREFIX}{}-{n}-{name}", std::process::id()));
            match std::fs::File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)
            {
                Ok(file) => {
                    return Ok(Upload {
                        name: name.to_string(),
                        tmp,
                        dest: self.root.join(name),
                        file: Some(file),
                        written: 0,
                        limit: self.max_bytes,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
                Err(e) => return Err(io("creating the upload file")(e)),
            }
        }
        Err(ImageError::Dir("no free upload file name".into()))
    }
}

/// The prefix of an upload's temporary file; `.upload-<pid>-<n>-<name>` names the process
/// writing it.
const UPLOAD_PREFIX: &str = ".upload-";

/// Removes the temporary files of uploads whose daemon is gone (killed mid-upload: its
/// `Drop` never ran). Each would otherwise stay for good, up to `--max-image-size` bytes,
/// unseen by `GET /images`. A file of a live process is left alone: the image directory may
/// be shared with another daemon that is uploading now. (A recycled pid only keeps a file
/// until a later start.)
fn remove_dead_uploads(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(UPLOAD_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| *p > 0)
        else {
            continue;
        };
        let dead = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH);
        if dead && entry.file_type().is_ok_and(|t| t.is_file()) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(file = ?name, "removed the file of an upload its daemon never finished"),
                Err(e) => tracing::warn!(file = ?name, "removing an unfinished upload's file: {e}"),
            }
        }
    }
}

/// An upload in progress; dropped without [`Upload::commit`], it leaves nothing behind.
#[derive(Debug)]
pub struct Upload {
    name: String,
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<std::fs::File>,
    written: u64,
    limit: u64,
}

impl Upload {
    /// Appends `data`; more than `--max-image-size` in all is refused.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ImageError> {
        self.written = self.written.saturating_add(data.len() as u64);
        if self.written > self.limit {
            return Err(ImageError::TooLarge { name: self.name.clone(), limit: self.limit });
        }
        let name = self.name.clone();
        let file = self.file.as_mut().ok_or_else(|| ImageError::Dir("upload already finished".into()))?;
        file.write_all(data).map_err(|source| ImageError::Io { name, what: "writing", source })
    }

    /// Makes the image visible under its name (replacing an older one) and returns its size.
    pub fn commit(mut self) -> Result<u64, ImageError> {
        let io = |what| {
            let name = self.name.clone();
            move |source| ImageError::Io { name, what, source }
        };
        // The file stays `Some` until the rename is done: a failure on the way leaves the
        // upload to `Drop`, which removes the temporary file.
        if let Some(file) = &self.file {
            file.sync_all().map_err(io("syncing"))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(io("renaming into place"))?;
        self.file = None;
        Ok(self.written)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_file_kinds_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = ImageDir::open(&dir.path().join("images"), 16).expect("dir");
        for bad in ["/etc/shadow", "../x", ".hidden", "", "a/b", "vmlinuz\0"] {
            assert!(matches!(images.read("kernel", bad, 16), Err(ImageError::Name { .. })), "{bad:?}");
        }
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("images/link")).expect("symlink");
        let e = images.read("kernel", "link", 16).expect_err("symlink");
        assert!(matches!(e, ImageError::File(BootFileError::Symlink { .. })), "{e}");
        assert!(!e.to_string().contains("/etc"), "{e}");
        let mut up = images.upload("k").expect("upload");
        up.write(b"0123456789").expect("write");
        assert!(images.read("kernel", "k", 16).is_err(), "invisible until committed");
        assert_eq!(up.commit().expect("commit"), 10);
        assert_eq!(images.read("kernel", "k", 16).expect("read").data, b"0123456789");
        let mut up = images.upload("big").expect("upload");
        assert!(matches!(up.write(&[0; 17]), Err(ImageError::TooLarge { .. })));
        drop(up);
        let names: Vec<String> = images.list().expect("list").into_iter().map(|i| i.name).collect();
        assert_eq!(names, vec!["k"], "no upload leftovers, no symlink");
        images.delete("k").expect("delete");
        assert!(matches!(images.delete("k"), Err(ImageError::NotFound { .. })));
    }
}
