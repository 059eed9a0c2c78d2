//! The VM state file: snapvisor's header around a self-describing CBOR body.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "SNVSTATE"
//! 8       4     format version, little-endian (this build writes FORMAT_VERSION)
//! 12      4     reserved, zero
//! 16      8     body length in bytes, little-endian (at most MAX_BODY)
//! 24      4     CRC-32 (IEEE) of the body, little-endian
//! 28      ...   body: CBOR encoding of `VmSnapshot`
//! ```
//!
//! The body is a tree of named fragments: the RAM-block table, and one CBOR blob per device
//! or vCPU under its own name (`vcpu/0`, `kvm/vm`, `dev/serial`, `dev/fw_cfg`, ...), each
//! decoded by its owner. New fields get serde defaults, so older snapshots keep loading; a
//! snapshot of a newer format version is refused with a clear error. Everything read back is
//! untrusted: lengths are bounded before allocation, the checksum is verified before decoding,
//! and the RAM-block table is validated field by field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"SNVSTATE";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 28;
/// Upper bound for a state body: device and vCPU state are kilobytes; RAM is stored apart.
pub const MAX_BODY: u64 = 64 << 20;
/// Upper bounds for counts in the body.
pub const MAX_BLOCKS: usize = 4096;
pub const MAX_FRAGMENTS: usize = 4096;
pub const MAX_IDSTR: usize = 256;

/// Errors reading or writing a state file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("VM state is truncated: {len} bytes, the header alone needs {HEADER_LEN}")]
    TooShort { len: usize },
    #[error("VM state has bad magic {found:02x?} (expected \"SNVSTATE\"): not a snapvisor snapshot")]
    BadMagic { found: Vec<u8> },
    #[error("VM state format version {found} is newer than this snapvisor understands ({FORMAT_VERSION}); upgrade snapvisor to load it")]
    TooNew { found: u32 },
    #[error("VM state format version 0 is invalid")]
    BadVersion,
    #[error("VM state body of {len} bytes exceeds the {MAX_BODY}-byte limit")]
    TooLarge { len: u64 },
    #[error("VM state is truncated: header says {expected} body bytes, {found} present")]
    Truncated { expected: u64, found: u64 },
    #[error("VM state checksum mismatch: stored {stored:#010x}, computed {computed:#010x} (corrupted)")]
    Checksum { stored: u32, computed: u32 },
    #[error("VM state body does not decode: {0}")]
    Decode(String),
    #[error("encoding VM state: {0}")]
    Encode(String),
    #[error("VM state is invalid: {0}")]
    Invalid(String),
}

/// One RAM block as recorded in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamBlockDesc {
    pub idstr: String,
    /// Page-aligned used length (what is saved).
    pub used_length: u64,
    /// The unaligned size the owner asked for.
    #[serde(default)]
    pub unaligned_length: u64,
    pub max_length: u64,
    pub page_size: u64,
    pub resizeable: bool,
}

/// A VM snapshot's state (RAM contents live in the store, by block and offset).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub ram: Vec<RamBlockDesc>,
    /// Named state fragments, each the CBOR encoding of its owner's state type.
    pub fragments: BTreeMap<String, serde_bytes_compat::Bytes>,
}

/// Byte strings encoded as CBOR byte strings (not arrays of integers).
pub mod serde_bytes_compat {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Bytes(pub Vec<u8>);

    impl Serialize for Bytes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

/// Encodes a value as CBOR (for fragments).
pub fn to_cbor<T: Serialize>(v: &T) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| FormatError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes a CBOR value (for fragments); `what` names it in errors.
pub fn from_cbor<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, FormatError> {
    ciborium::from_reader(bytes).map_err(|e| FormatError::Decode(format!("{what}: {e}")))
}

impl VmSnapshot {
    /// Adds a fragment encoded from `state`.
    pub fn put<T: Serialize>(&mut self, name: &str, state: &T) -> Result<(), FormatError> {
        self.fragments.insert(name.to_string(), serde_bytes_compat::Bytes(to_cbor(state)?));
        Ok(())
    }

    /// Decodes fragment `name`; a missing fragment is an error naming it.
    pub fn get<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, FormatError> {
        let b = self
            .fragments
            .get(name)
            .ok_or_else(|| FormatError::Invalid(format!("no state for '{name}' in the snapshot")))?;
        from_cbor(&b.0, name)
    }

    /// Checks what the type system cannot: counts, names, sizes.
    pub fn validate(&self) -> Result<(), FormatError> {
        if self.ram.len() > MAX_BLOCKS {
            return Err(FormatError::Invalid(format!("{} RAM blocks (at most {MAX_BLOCKS})", self.ram.len())));
        }
        if self.fragments.len() > MAX_FRAGMENTS {
            return Err(FormatError::Invalid(format!(
                "{} state fragments (at most {MAX_FRAGMENTS})",
                self.fragments.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for b in &self.ram {
            let bad = |why: String| Err(FormatError::Invalid(format!("RAM block '{}': {why}", b.idstr.escape_debug())));
            if b.idstr.is_empty() || b.idstr.len() > MAX_IDSTR || b.idstr.chars().any(char::is_control) {
                return bad(format!("name of {} bytes is not a valid idstr", b.idstr.len()));
            }
            if !seen.insert(&b.idstr) {
                return bad("listed twice".into());
            }
            if !b.page_size.is_power_of_two() || b.page_size < 4096 {
                return bad(format!("page size {:#x} is not a power of two of at least 4 KiB", b.page_size));
            }
            if b.used_length % b.page_size != 0 || b.max_length % b.page_size != 0 {
                return bad(format!(
                    "used length {:#x} or max length {:#x} not page-aligned",
                    b.used_length, b.max_length
                ));
            }
            if b.used_length == 0 || b.used_length > b.max_length {
                return bad(format!("used length {:#x} outside 1..=max length {:#x}", b.used_length, b.max_length));
            }
            // The unaligned length is what a resizeable block is resized to on restore: it
            // must lie in the last page of the used length, or the block would end up shorter
            // (or longer) than what is loaded into it.
            if b.unaligned_length > 0 && b.unaligned_length.div_ceil(b.page_size) != b.used_length / b.page_size {
                return bad(format!(
                    "unaligned length {:#x} is not in the last page of used length {:#x}",
                    b.unaligned_length, b.used_length
                ));
            }
        }
        Ok(())
    }

    /// Encodes header and body.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let body = to_cbor(self)?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes and validates untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, FormatError> {
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::TooShort { len: bytes.len() });
        }
        let (header, body) = bytes.split_at(HEADER_LEN);
        if header[0..8] != MAGIC {
            return Err(FormatError::BadMagic { found: header[0..8].to_vec() });
        }
        let word = |r: std::ops::Range<usize>| header[r].iter().rev().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let version = word(8..12) as u32;
        if version == 0 {
            return Err(FormatError::BadVersion);
        }
        if version > FORMAT_VERSION {
            return Err(FormatError::TooNew { found: version });
        }
        let len = word(16..24);
        if len > MAX_BODY {
            return Err(FormatError::TooLarge { len });
        }
        if (body.len() as u64) != len {
            return Err(FormatError::Truncated { expected: len, found: body.len() as u64 });
        }
        let stored = word(24..28) as u32;
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        let snap: VmSnapshot = from_cbor(body, "VM state body")?;
        snap.validate()?;
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmSnapshot {
        let mut s = VmSnapshot::default();
        s.ram.push(RamBlockDesc {
            idstr: "pc.ram".into(),
            used_length: 0x100_0000,
            unaligned_length: 0x100_0000,
            max_length: 0x100_0000,
            page_size: 4096,
            resizeable: false,
        });
        s.put("dev/exit", &7u32).expect("encode");
        s
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let back = VmSnapshot::decode(&s.encode().expect("encode")).expect("decode");
        assert_eq!(back, s);
        assert_eq!(back.get::<u32>("dev/exit"), Ok(7));
        assert!(matches!(back.get::<u32>("dev/serial"), Err(FormatError::Invalid(m)) if m.contains("dev/serial")));
    }

    #[test]
    fn truncated_corrupted_and_newer_are_refused() {
        let bytes = sample().encode().expect("encode");
        assert_eq!(VmSnapshot::decode(&bytes[..10]), Err(FormatError::TooShort { len: 10 }));
        assert!(matches!(VmSnapshot::decode(&bytes[..bytes.len() - 1]), Err(FormatError::Truncated { .. })));
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(matches!(VmSnapshot::decode(&bad), Err(FormatError::Checksum { .. })));
        let mut newer = bytes.clone();
        newer[8] = 2;
        assert_eq!(VmSnapshot::decode(&newer), Err(FormatError::TooNew { found: 2 }));
        let mut magic = bytes;
        magic[0] = b'X';
        assert!(matches!(VmSnapshot::decode(&magic), Err(FormatError::BadMagic { .. })));
    }

    #[test]
    fn huge_length_is_refused_before_allocation() {
        let mut bytes = sample().encode().expect("encode");
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(VmSnapshot::decode(&bytes), Err(FormatError::TooLarge { len: u64::MAX }));
    }

    #[test]
    fn invalid_block_tables_are_refused() {
        for mutate in [
            (|b: &mut RamBlockDesc| b.page_size = 3000) as fn(&mut RamBlockDesc),
            |b| b.used_length = 0x100_0001,
            |b| b.used_length = b.max_length * 2,
            |b| b.idstr = String::new(),
            |b| b.unaligned_length = u64::MAX,
            |b| b.unaligned_length = 1,
            |b| b.unaligned_length = b.used_length - b.page_size,
        ] {
            let mut s = sample();
            mutate(&mut s.ram[0]);
            let bytes = s.encode().expect("encode");
            assert!(matches!(VmSnapshot::decode(&bytes), Err(FormatError::Invalid(_))), "{:?}", s.ram[0]);
        }
        let mut dup = sample();
        dup.ram.push(dup.ram[0].clone());
        assert!(
            matches!(VmSnapshot::decode(&dup.encode().expect("encode")), Err(FormatError::Invalid(m)) if m.contains("twice"))
        );
    }
}
