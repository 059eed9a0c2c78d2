//! Named per-snapshot attachments (e.g. "prefetch": the working-set fault order recorded
//! with a snapshot). Value on disk: crc32 (u32 LE) of the bytes, then the bytes; key:
//! snapshot name, 0x00, attachment name. Deleting a snapshot deletes its attachments; GC
//! removes any left behind by a crash.

use crate::error::{Result, StoreError};
use crate::name::{validate_attachment_name, validate_snapshot_name};
use crate::store::Store;

impl Store {
    /// Stores attachment `att` (e.g. "prefetch") of committed snapshot `snapshot`, replacing
    /// an earlier one. Value on disk: crc32 (u32 LE) of the bytes, then the bytes.
    pub fn put_attachment(&self, snapshot: &str, att: &str, bytes: &[u8]) -> Result<()> {
        validate_attachment_name(att)?;
        self.writable()?;
        if !self.contains(snapshot)? {
            return Err(StoreError::NotFound(snapshot.to_owned()));
        }
        self.ensure_space(bytes.len() as u64)?;
        let mut value = Vec::with_capacity(bytes.len() + 4);
        value.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
        value.extend_from_slice(bytes);
        self.inner.attachments.insert(attachment_key(snapshot, att), value).map_err(self.db_err("write attachment"))?;
        self.flush()
    }

    /// Reads attachment `att` of `snapshot`, `None` when it was never stored.
    pub fn attachment(&self, snapshot: &str, att: &str) -> Result<Option<Vec<u8>>> {
        validate_snapshot_name(snapshot)?;
        validate_attachment_name(att)?;
        let Some(raw) =
            self.inner.attachments.get(attachment_key(snapshot, att)).map_err(self.db_err("read attachment"))?
        else {
            return Ok(None);
        };
        let corrupt =
            |reason: String| StoreError::Attachment { snapshot: snapshot.to_owned(), name: att.to_owned(), reason };
        let (crc, body) = raw.split_first_chunk::<4>().ok_or_else(|| corrupt(format!("only {} bytes", raw.len())))?;
        let (want, got) = (u32::from_le_bytes(*crc), crc32fast::hash(body));
        if want != got {
            return Err(corrupt(format!("crc32 0x{got:08x} != stored 0x{want:08x}")));
        }
        Ok(Some(body.to_vec()))
    }

    /// Names of the attachments of `snapshot`.
    pub fn attachments(&self, snapshot: &str) -> Result<Vec<String>> {
        validate_snapshot_name(snapshot)?;
        let prefix = attachment_prefix(snapshot);
        let mut out = Vec::new();
        for item in self.inner.attachments.scan_prefix(&prefix).keys() {
            let key = item.map_err(self.db_err("list attachments"))?;
            out.push(String::from_utf8_lossy(&key[prefix.len()..]).into_owned());
        }
        Ok(out)
    }
}

pub(crate) fn attachment_prefix(snapshot: &str) -> Vec<u8> {
    let mut k = snapshot.as_bytes().to_vec();
    k.push(0);
    k
}

fn attachment_key(snapshot: &str, att: &str) -> Vec<u8> {
    let mut k = attachment_prefix(snapshot);
    k.extend_from_slice(att.as_bytes());
    k
}
