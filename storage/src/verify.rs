//! Verification: every chunk of a snapshot is read, decompressed and checked against its hash,
//! and every attachment of it (e.g. the prefetch list) is read and checked against its crc32.

use std::collections::HashSet;

use serde::Serialize;

use crate::chunk::{ChunkRef, Hash};
use crate::error::Result;
use crate::store::Store;

/// Outcome of verifying one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub snapshot: String,
    /// Chunks checked (zero chunks included).
    pub chunks: u64,
    /// Bytes of guest memory covered.
    pub bytes: u64,
    /// Attachments checked (their crc).
    pub attachments: u64,
    /// One message per problem, naming block and offset; empty when the snapshot is intact.
    pub errors: Vec<String>,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

impl Store {
    /// Verifies snapshot `name`. Fails only if the manifest itself cannot be read; chunk
    /// problems are listed in the report.
    pub fn verify(&self, name: &str) -> Result<VerifyReport> {
        self.verify_inner(name, &mut HashSet::new())
    }

    /// Verifies every snapshot, checking each distinct chunk once. A snapshot whose manifest
    /// is unreadable is reported with that error.
    pub fn verify_all(&self) -> Result<Vec<VerifyReport>> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for name in self.list()? {
            match self.verify_inner(&name, &mut seen) {
                Ok(r) => out.push(r),
                Err(e) => out.push(VerifyReport { snapshot: name, errors: vec![e.to_string()], ..Default::default() }),
            }
        }
        Ok(out)
    }

    fn verify_inner(&self, name: &str, seen: &mut HashSet<Hash>) -> Result<VerifyReport> {
        let reader = self.reader(name)?;
        let m = reader.manifest();
        let cs = u64::from(m.chunk_size);
        let mut buf = vec![0u8; m.chunk_size as usize];
        let mut report = VerifyReport { snapshot: name.to_owned(), ..Default::default() };
        for b in &m.blocks {
            report.bytes += b.used_length;
            for (i, c) in b.chunks.iter().enumerate() {
                report.chunks += 1;
                if let ChunkRef::Stored(h) = c {
                    if seen.contains(h) {
                        continue;
                    }
                    match reader.read_chunk(&b.idstr, i as u64 * cs, &mut buf) {
                        Ok(_) => {
                            seen.insert(*h);
                        }
                        Err(e) => report.errors.push(e.to_string()),
                    }
                }
            }
        }
        // Attachments (the prefetch list, ...) are part of the snapshot: each must read back
        // with its crc intact. The error names the snapshot and the attachment.
        for att in self.attachments(name)? {
            report.attachments += 1;
            if let Err(e) = self.attachment(name, &att) {
                report.errors.push(e.to_string());
            }
        }
        if !report.ok() {
            tracing::warn!(snapshot = name, errors = report.errors.len(), "verify found problems");
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::Store;
    use crate::writer::BlockSpec;

    #[test]
    fn a_damaged_attachment_is_a_problem_naming_snapshot_and_attachment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let spec = BlockSpec {
            idstr: "ram".into(),
            used_length: 65536,
            max_length: 65536,
            page_size: 4096,
            resizeable: false,
        };
        let w = store.begin("x", vec![spec]).expect("begin");
        w.put("ram", 0, &[5u8; 65536]).expect("put");
        w.commit(Vec::new()).expect("commit");
        store.put_attachment("x", "prefetch", b"a working-set list").expect("attach");
        let r = store.verify("x").expect("verify");
        assert!(r.ok() && r.attachments == 1, "{r:?}");
        // One bit of the stored attachment flipped: its crc no longer holds.
        let key = [b"x".as_slice(), &[0], b"prefetch"].concat();
        let mut v = store.inner.attachments.get(&key).expect("get").expect("stored").to_vec();
        let last = v.len() - 1;
        v[last] ^= 1;
        store.inner.attachments.insert(key, v).expect("insert");
        for r in [store.verify("x").expect("verify"), store.verify_all().expect("verify all").remove(0)] {
            assert!(!r.ok(), "a damaged attachment verified ok: {r:?}");
            assert!(r.errors[0].contains("snapshot 'x' attachment 'prefetch' is corrupt: crc32"), "{r:?}");
        }
    }
}
