//! Snapshot manifests and their on-disk encoding.
//!
//! A manifest value (sled tree `manifests`, key = snapshot name) is:
//!
//! ```text
//! bytes 0..4    magic "SVMF"
//! bytes 4..6    format version, u16 LE (currently 1)
//! bytes 6..8    reserved, zero
//! bytes 8..12   payload length, u32 LE
//! bytes 12..16  crc32 (IEEE) of the payload, u32 LE
//! bytes 16..    payload: CBOR of [`Manifest`] (serde defaults, so new optional fields can be
//!               added without a version bump)
//! ```
//!
//! A block's chunk table is one CBOR byte string: per chunk a tag byte, 0 = all zero,
//! 1 = stored, followed by the 32-byte blake3 hash. Manifests are untrusted input: the header,
//! the crc, and every count and size are checked on decode (see [`Manifest::validate`]).

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkRef, Hash};

/// Magic bytes at the start of an encoded manifest.
pub const MAGIC: &[u8; 4] = b"SVMF";
/// Current manifest format version.
pub const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
/// Most RAM blocks a manifest may list.
pub const MAX_BLOCKS: usize = 4096;
/// Largest encoded manifest accepted (the chunk tables of 1 TiB of guest memory at 64 KiB).
pub const MAX_MANIFEST_BYTES: usize = 1 << 30;
/// Longest accepted block idstr, in bytes.
pub const MAX_IDSTR: usize = 256;
/// Smallest chunk size.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// Why an encoded manifest was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{len} bytes is shorter than the 16-byte header")]
    Short { len: usize },
    #[error("bad magic {0:02x?}, expected \"SVMF\"")]
    Magic([u8; 4]),
    #[error("format version {0} is not supported (this build reads version 1)")]
    Version(u16),
    #[error("header says {header} payload bytes, {actual} present")]
    Length { header: usize, actual: usize },
    #[error("crc32 mismatch: header 0x{header:08x}, payload 0x{actual:08x}")]
    Crc { header: u32, actual: u32 },
    #[error("CBOR decode failed: {0}")]
    Decode(String),
    #[error("CBOR encode failed: {0}")]
    Encode(String),
    #[error("{0}")]
    Invalid(String),
}

/// One RAM block as recorded in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockManifest {
    pub idstr: String,
    pub used_length: u64,
    pub max_length: u64,
    pub page_size: u64,
    pub resizeable: bool,
    /// One entry per chunk covering `0..used_length`; the last may be short.
    #[serde(with = "chunk_table")]
    pub chunks: Vec<ChunkRef>,
}

/// Everything a snapshot records besides chunk contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    /// Chunk size used by every block of this snapshot.
    pub chunk_size: u32,
    /// Milliseconds since the Unix epoch at commit.
    #[serde(default)]
    pub created_unix_ms: u64,
    /// Opaque device/vCPU state from the caller.
    #[serde(with = "byte_string")]
    pub state: Vec<u8>,
    pub blocks: Vec<BlockManifest>,
}

/// Number of chunks needed to cover `len` bytes.
pub fn chunk_count(len: u64, chunk_size: u32) -> u64 {
    len.div_ceil(u64::from(chunk_size))
}

impl Manifest {
    /// The block named `idstr`.
    pub fn block(&self, idstr: &str) -> Option<&BlockManifest> {
        self.blocks.iter().find(|b| b.idstr == idstr)
    }

    /// Checks every count and size; called on every decode.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Invalid(m));
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return bad(format!("chunk size {cs} is not a power of two in 4 KiB..=16 MiB"));
        }
        if self.blocks.len() > MAX_BLOCKS {
            return bad(format!("{} blocks, at most {MAX_BLOCKS} allowed", self.blocks.len()));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if b.idstr.is_empty() || b.idstr.len() > MAX_IDSTR {
                return bad(format!("block #{i} idstr {:?} is empty or too long", b.idstr));
            }
            if self.blocks[..i].iter().any(|o| o.idstr == b.idstr) {
                return bad(format!("block '{}' is listed twice", b.idstr));
            }
            if !b.page_size.is_power_of_two() {
                return bad(format!("block '{}' page size {} is not a power of two", b.idstr, b.page_size));
            }
            if b.used_length > b.max_length {
                return bad(format!(
                    "block '{}' used_length 0x{:x} > max_length 0x{:x}",
                    b.idstr, b.used_length, b.max_length
                ));
            }
            let want = chunk_count(b.used_length, cs);
            if b.chunks.len() as u64 != want {
                return bad(format!(
                    "block '{}' has {} chunks, used_length 0x{:x} needs {want}",
                    b.idstr,
                    b.chunks.len(),
                    b.used_length
                ));
            }
        }
        Ok(())
    }

    /// Encodes with header and crc.
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        let mut payload = Vec::new();
        ciborium::into_writer(self, &mut payload).map_err(|e| ManifestError::Encode(e.to_string()))?;
        let len = u32::try_from(payload.len())
            .map_err(|_| ManifestError::Encode(format!("{} bytes is too large", payload.len())))?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes and validates untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let (header, payload) = bytes.split_at_checked(HEADER_LEN).ok_or(ManifestError::Short { len: bytes.len() })?;
        let word = |i: usize| [header[i], header[i + 1], header[i + 2], header[i + 3]];
        if &header[0..4] != MAGIC {
            return Err(ManifestError::Magic(word(0)));
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        let len = u32::from_le_bytes(word(8)) as usize;
        if len != payload.len() || len > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Length { header: len, actual: payload.len() });
        }
        let crc = u32::from_le_bytes(word(12));
        let actual = crc32fast::hash(payload);
        if crc != actual {
            return Err(ManifestError::Crc { header: crc, actual });
        }
        let m: Manifest = ciborium::from_reader(payload).map_err(|e| ManifestError::Decode(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }
}

/// The snapshot state (the `state` field) of an encoded manifest, found without checking
/// the crc and without decoding the rest: the chunk tables are skipped, not read. For a
/// restore that builds its VM while the whole manifest is read and checked on another thread
/// (hypervisor's snapshot/restore.rs): the bytes are *unchecked*, for speculative work only,
/// and must equal the state of a checked decode ([`Manifest::decode`]) before anything relies
/// on them. `None` unless the header is whole and the payload has the shape this build
/// writes (a CBOR map of definite length with text keys, one `state` byte string); a
/// manifest of any other shape is then read the ordinary way.
pub fn peek_state(bytes: &[u8]) -> Option<&[u8]> {
    let (header, payload) = bytes.split_at_checked(HEADER_LEN)?;
    if &header[0..4] != MAGIC || u16::from_le_bytes([header[4], header[5]]) != VERSION {
        return None;
    }
    let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if len != payload.len() {
        return None;
    }
    let mut c = Cbor { buf: payload, at: 0 };
    let (major, fields) = c.head()?;
    if major != 5 {
        return None;
    }
    let mut state = None;
    for _ in 0..fields {
        let (major, len) = c.head()?;
        if major != 3 {
            return None;
        }
        if c.take(len)? == b"state" {
            let (major, len) = c.head()?;
            if major != 2 || state.is_some() {
                return None;
            }
            state = Some(c.take(len)?);
        } else {
            c.skip(0)?;
        }
    }
    state
}

/// A forward-only reader of definite-length CBOR, for [`peek_state`].
struct Cbor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cbor<'a> {
    /// Deepest nesting [`Cbor::skip`] follows (a manifest nests three deep).
    const MAX_DEPTH: usize = 8;

    /// An item's major type and argument; `None` for an indefinite length or a reserved
    /// argument.
    fn head(&mut self) -> Option<(u8, u64)> {
        let b = *self.buf.get(self.at)?;
        self.at += 1;
        let (major, info) = (b >> 5, b & 31);
        let n = match info {
            0..=23 => return Some((major, u64::from(info))),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return None,
        };
        let bytes = self.buf.get(self.at..self.at + n)?;
        self.at += n;
        Some((major, bytes.iter().fold(0u64, |v, &b| v << 8 | u64::from(b))))
    }

    fn take(&mut self, len: u64) -> Option<&'a [u8]> {
        let end = self.at.checked_add(usize::try_from(len).ok()?)?;
        let out = self.buf.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    /// Steps over one item (whatever it holds).
    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > Self::MAX_DEPTH {
            return None;
        }
        let (major, n) = self.head()?;
        match major {
            0 | 1 | 7 => {}
            2 | 3 => {
                self.take(n)?;
            }
            4 | 5 => {
                let items = if major == 5 { n.checked_mul(2)? } else { n };
                for _ in 0..items {
                    self.skip(depth + 1)?;
                }
            }
            _ => self.skip(depth + 1)?,
        }
        Some(())
    }
}

/// Serde helper: `Vec<u8>` as one CBOR byte string (not an array of integers).
pub(crate) mod byte_string {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }
}

/// Serde helper: a chunk table as one tagged byte string.
mod chunk_table {
    use super::{byte_string, ChunkRef, Hash};
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[ChunkRef], s: S) -> Result<S::Ok, S::Error> {
        let mut out = Vec::with_capacity(v.len() * 33);
        for c in v {
            match c {
                ChunkRef::Zero => out.push(0),
                ChunkRef::Stored(h) => {
                    out.push(1);
                    out.extend_from_slice(&h.0);
                }
            }
        }
        s.serialize_bytes(&out)
    }

    /// Parses a table: counted first, so that the table is allocated once at its size.
    fn parse<E: Error>(raw: &[u8]) -> Result<Vec<ChunkRef>, E> {
        let mut count = 0usize;
        let mut at = 0usize;
        while let Some(&tag) = raw.get(at) {
            at += match tag {
                0 => 1,
                1 if raw.len() - at > 32 => 33,
                1 => return Err(E::custom("chunk table ends inside a hash")),
                t => return Err(E::custom(format!("chunk table has unknown tag {t}"))),
            };
            count += 1;
        }
        let mut out = Vec::with_capacity(count);
        let mut rest = raw;
        while let Some((&tag, tail)) = rest.split_first() {
            if tag == 0 {
                out.push(ChunkRef::Zero);
                rest = tail;
            } else {
                let (h, tail) =
                    tail.split_first_chunk::<32>().ok_or_else(|| E::custom("chunk table ends inside a hash"))?;
                out.push(ChunkRef::Stored(Hash(*h)));
                rest = tail;
            }
        }
        Ok(out)
    }

    struct TableVisitor;

    impl<'de> Visitor<'de> for TableVisitor {
        type Value = Vec<ChunkRef>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a chunk table (byte string)")
        }
        // Parsed from the decoder's own buffer: no copy of the table's bytes first.
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<ChunkRef>, E> {
            parse(v)
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<ChunkRef>, E> {
            parse(&v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<ChunkRef>, A::Error> {
            parse(&byte_string::BytesVisitor.visit_seq(seq)?)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ChunkRef>, D::Error> {
        d.deserialize_byte_buf(TableVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            name: "s".into(),
            chunk_size: 65536,
            created_unix_ms: 1,
            state: vec![1, 2, 3],
            blocks: vec![BlockManifest {
                idstr: "pc.ram".into(),
                used_length: 65536 * 2 + 4096,
                max_length: 1 << 20,
                page_size: 4096,
                resizeable: false,
                chunks: vec![ChunkRef::Zero, ChunkRef::Stored(Hash([7; 32])), ChunkRef::Zero],
            }],
        }
    }

    #[test]
    fn roundtrip_and_compact_chunk_table() {
        let m = sample();
        let enc = m.encode().expect("encode");
        assert!(enc.len() < 200, "chunk table must be a byte string, got {} bytes", enc.len());
        assert_eq!(Manifest::decode(&enc).expect("decode"), m);
    }

    #[test]
    fn rejects_inconsistent_counts_and_sizes() {
        let mut m = sample();
        m.blocks[0].chunks.pop();
        let e = Manifest::decode(&m.encode().expect("encode")).expect_err("count").to_string();
        assert!(e.contains("needs 3"), "{e}");
        let mut m = sample();
        m.blocks[0].max_length = 10;
        assert!(Manifest::decode(&m.encode().expect("encode")).is_err());
        let mut m = sample();
        m.chunk_size = 3000;
        assert!(Manifest::decode(&m.encode().expect("encode")).is_err());
        let mut m = sample();
        m.blocks.push(m.blocks[0].clone());
        assert!(Manifest::decode(&m.encode().expect("encode")).expect_err("dup").to_string().contains("twice"));
    }

    /// `sample()` encoded, with its chunk table's bytes changed by `edit` and the crc fixed.
    fn with_table(edit: impl Fn(&mut [u8])) -> Vec<u8> {
        let mut enc = sample().encode().expect("encode");
        let mut table = vec![0x58, 35, 0, 1];
        table.extend_from_slice(&[7; 32]);
        table.push(0);
        let at = enc.windows(table.len()).position(|w| w == table.as_slice()).expect("the table as one byte string");
        edit(&mut enc[at + 2..at + table.len()]);
        let crc = crc32fast::hash(&enc[HEADER_LEN..]);
        enc[12..16].copy_from_slice(&crc.to_le_bytes());
        enc
    }

    #[test]
    fn a_damaged_chunk_table_is_an_error_naming_the_damage() {
        assert_eq!(Manifest::decode(&with_table(|_| {})).expect("unchanged"), sample());
        let e = Manifest::decode(&with_table(|t| t[0] = 2)).expect_err("tag 2").to_string();
        assert!(e.contains("unknown tag 2"), "{e}");
        // The last entry's tag says a hash follows, and the table ends there.
        let e = Manifest::decode(&with_table(|t| t[34] = 1)).expect_err("cut hash").to_string();
        assert!(e.contains("ends inside a hash"), "{e}");
        // A hash's first byte taken for a tag: the table no longer lines up.
        let e = Manifest::decode(&with_table(|t| t[1] = 0)).expect_err("shifted").to_string();
        assert!(e.contains("unknown tag 7"), "{e}");
    }

    #[test]
    fn peek_state_finds_the_state_without_the_crc() {
        let mut m = sample();
        m.state = (0..3000).map(|i| (i % 251) as u8).collect();
        m.blocks.push(BlockManifest { idstr: "b2".into(), ..m.blocks[0].clone() });
        let mut enc = m.encode().expect("encode");
        assert_eq!(peek_state(&enc), Some(m.state.as_slice()));
        // Unchecked: a damaged table does not stop the peek (the checked decode catches it).
        let last = enc.len() - 1;
        enc[last] ^= 1;
        assert_eq!(peek_state(&enc), Some(m.state.as_slice()));
        assert!(Manifest::decode(&enc).is_err());
        // Not this build's shape or header: nothing, never a guess.
        assert_eq!(peek_state(&enc[..enc.len() - 1]), None, "length differs from the header");
        let mut v2 = m.encode().expect("encode");
        v2[4] = 2;
        assert_eq!(peek_state(&v2), None);
        for cut in [HEADER_LEN, HEADER_LEN + 1, HEADER_LEN + 30] {
            let mut short = m.encode().expect("encode");
            short.truncate(cut);
            let len = (cut - HEADER_LEN) as u32;
            short[8..12].copy_from_slice(&len.to_le_bytes());
            assert_eq!(peek_state(&short), None, "cut at {cut}");
        }
    }

    /// Every truncation and every single-byte change of an encoded manifest: the peek never
    /// panics, and whenever it finds a state while the checked decode succeeds, the two agree.
    #[test]
    fn peek_state_agrees_with_the_checked_decode() {
        let enc = sample().encode().expect("encode");
        for i in HEADER_LEN..enc.len() {
            for x in [1u8, 0x20, 0x80, 0xff] {
                let mut e = enc.clone();
                e[i] ^= x;
                let crc = crc32fast::hash(&e[HEADER_LEN..]);
                e[12..16].copy_from_slice(&crc.to_le_bytes());
                if let (Some(p), Ok(m)) = (peek_state(&e), Manifest::decode(&e)) {
                    assert_eq!(p, m.state.as_slice(), "byte {i} ^ {x:#x}");
                }
            }
        }
    }

    #[test]
    fn garbage_payload_with_valid_crc_is_an_error() {
        let payload = vec![0xff; 64];
        let mut raw = Vec::new();
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&VERSION.to_le_bytes());
        raw.extend_from_slice(&[0, 0]);
        raw.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        raw.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        raw.extend_from_slice(&payload);
        assert!(matches!(Manifest::decode(&raw), Err(ManifestError::Decode(_))));
        raw[0] = b'X';
        assert!(matches!(Manifest::decode(&raw), Err(ManifestError::Magic(_))));
    }
}
