//! Chunk codec: content hashing, zero detection, compression (LZ4 or zstd) into a stored
//! value, and verified decompression straight into the caller's buffer.
//!
//! A stored chunk value (in a pack entry, see pack.rs; indexed by the 32-byte blake3 hash of
//! the uncompressed bytes) is:
//!
//! ```text
//! byte 0      codec: 1 = zstd frame, 2 = raw (stored when the codec does not shrink it),
//!             3 = LZ4 block (no frame, no checksum: the content hash checks it)
//! bytes 1..5  uncompressed length, u32 little endian
//! bytes 5..   payload
//! ```
//!
//! All-zero chunks are never stored; the manifest records them as [`ChunkRef::Zero`].
//!
//! Codec 3 (LZ4) was added in December 2026. New chunks are written with zstd unless
//! `StoreOptions::lz4` asks for LZ4 ([`Codec`]; the crate docs have the measurement that
//! kept zstd the default). Builds before it refuse an LZ4 value with "unknown codec 3" (a
//! clean error, never wrong bytes), so a store holding LZ4 chunks cannot be read by older
//! ones; this build reads every codec ever written. The
//! codec is per value: one store, even one snapshot, may hold zstd, LZ4 and raw values side
//! by side, and dedup does not care (the hash is of the uncompressed bytes).

use std::cell::RefCell;

/// Codec byte of a zstd-compressed chunk value.
pub const CODEC_ZSTD: u8 = 1;
/// Codec byte of a chunk value stored uncompressed.
pub const CODEC_RAW: u8 = 2;
/// Codec byte of an LZ4 block (lz4_flex's block format, the uncompressed length in the value
/// header rather than in the block).
pub const CODEC_LZ4: u8 = 3;
/// Length of the value header (codec + length).
pub const VALUE_HEADER: usize = 5;

/// A 32-byte blake3 content hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// Hash of `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

/// What a manifest records for one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkRef {
    /// All bytes are zero; nothing is stored.
    Zero,
    /// Stored under this content hash.
    Stored(Hash),
}

/// A stored chunk value that cannot be turned back into the bytes it was written from.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("stored value of chunk {hash} is {len} bytes, shorter than its header")]
    Truncated { hash: Hash, len: usize },
    #[error("stored value of chunk {hash} has unknown codec {codec}")]
    Codec { hash: Hash, codec: u8 },
    #[error("chunk {hash} records length {stored}, the manifest expects {expected}")]
    Length { hash: Hash, stored: u32, expected: usize },
    #[error("chunk {hash} does not decompress: {reason}")]
    Decompress { hash: Hash, reason: String },
    #[error("chunk {hash} decompressed to {got} bytes, expected {expected}")]
    Size { hash: Hash, got: usize, expected: usize },
    #[error("chunk content does not match its hash {hash} (got {actual})")]
    HashMismatch { hash: Hash, actual: Hash },
    #[error("zstd compression at level {level} failed: {reason}")]
    Compress { level: i32, reason: String },
    #[error("LZ4 compression failed: {reason}")]
    Lz4 { reason: String },
    #[error("index entry of chunk {hash} is corrupt ({len} bytes)")]
    BadIndex { hash: Hash, len: usize },
    #[error("reading chunk {hash} from pack {pack} offset 0x{offset:x} length {len}: {source}")]
    Read { hash: Hash, pack: u32, offset: u64, len: u32, source: std::io::Error },
    #[error("caller buffer of {got} bytes is too small for a {needed}-byte chunk")]
    Buffer { got: usize, needed: usize },
}

/// True when every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned
        // middle part of an initialised byte slice.
        unsafe { data.align_to::<u64>() }
    };
    prefix.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && suffix.iter().all(|b| *b == 0)
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
    /// Where `encode` compresses to: kept per thread, so a chunk costs no zero-filled
    /// allocation of the compression bound (for 1 GiB of chunks that was a 1 GiB memset).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How new chunk values are compressed (the crate docs' codec table says what each costs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// LZ4 (codec byte 3): a fraction of zstd's CPU time, values 1.2-1.5x larger.
    Lz4,
    /// zstd at this level (codec byte 1), -7..=22.
    Zstd(i32),
}

/// Compresses `data` with `codec` into a complete stored value (header + payload), allocated
/// at its exact size; stored raw (codec 2) when the codec does not shrink it.
pub fn encode_with(data: &[u8], codec: Codec) -> Result<Vec<u8>, ChunkError> {
    match codec {
        Codec::Zstd(level) => encode_zstd(data, level, 0),
        Codec::Lz4 => encode_lz4(data, 0),
    }
}

/// [`encode_with`] into `out` (cleared first, its allocation reused): `reserve` zero bytes
/// (room for the pack entry header, which the pipeline's workers fill in: see pack.rs), then
/// the value. zstd compresses straight into `out`, so a recycled `out` costs neither an
/// allocation nor a copy; LZ4 goes through the per-thread scratch buffer.
pub(crate) fn encode_into(data: &[u8], codec: Codec, reserve: usize, out: &mut Vec<u8>) -> Result<(), ChunkError> {
    let level = match codec {
        Codec::Zstd(level) => level,
        Codec::Lz4 => {
            *out = encode_lz4(data, reserve)?;
            return Ok(());
        }
    };
    let len = u32::try_from(data.len())
        .map_err(|_| ChunkError::Compress { level, reason: format!("chunk of {} bytes", data.len()) })?;
    let start = reserve + VALUE_HEADER;
    out.clear();
    out.resize(reserve, 0);
    out.push(CODEC_ZSTD);
    out.extend_from_slice(&len.to_le_bytes());
    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
    // The frame goes right after the header, into `out`'s spare capacity (the cursor's
    // position): zstd writes only there and sets the length to what it wrote.
    let mut cursor = std::io::Cursor::new(std::mem::take(out));
    cursor.set_position(start as u64);
    let written = with_compressor(level, |c| c.compress_to_buffer(data, &mut cursor));
    *out = cursor.into_inner();
    let written = written?;
    if written >= data.len() || out.len() != start + written {
        // Stored raw when zstd does not shrink it.
        out.truncate(start);
        out[reserve] = CODEC_RAW;
        out.extend_from_slice(data);
    }
    Ok(())
}

/// LZ4-compresses `data` into a stored value (codec 3, or raw when it does not shrink).
fn encode_lz4(data: &[u8], reserve: usize) -> Result<Vec<u8>, ChunkError> {
    let len =
        u32::try_from(data.len()).map_err(|_| ChunkError::Lz4 { reason: format!("chunk of {} bytes", data.len()) })?;
    let bound = lz4_flex::block::get_maximum_output_size(data.len());
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < bound {
            scratch.resize(bound, 0);
        }
        let written = lz4_flex::block::compress_into(data, &mut scratch[..bound])
            .map_err(|e| ChunkError::Lz4 { reason: e.to_string() })?;
        let (codec, payload) = if written >= data.len() { (CODEC_RAW, data) } else { (CODEC_LZ4, &scratch[..written]) };
        Ok(value(reserve, codec, len, payload))
    })
}

/// `reserve` zero bytes, then a stored value: header, then `payload`; allocated at its exact
/// size.
fn value(reserve: usize, codec: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(reserve + VALUE_HEADER + payload.len());
    out.resize(reserve, 0);
    out.push(codec);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Runs `f` with this thread's zstd compression context at `level` (made, or remade for
/// another level, on first use).
fn with_compressor<R>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<R>,
) -> Result<R, ChunkError> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|e| ChunkError::Compress { level, reason: e.to_string() })?;
            *slot = Some((level, c));
        }
        let (_, c) = slot.as_mut().ok_or(ChunkError::Compress { level, reason: "no context".into() })?;
        f(c).map_err(|e| ChunkError::Compress { level, reason: e.to_string() })
    })
}

/// Compresses `data` with zstd at `level` into a complete stored value (header + payload),
/// allocated at its exact size.
pub fn encode(data: &[u8], level: i32) -> Result<Vec<u8>, ChunkError> {
    encode_zstd(data, level, 0)
}

fn encode_zstd(data: &[u8], level: i32, reserve: usize) -> Result<Vec<u8>, ChunkError> {
    let len = u32::try_from(data.len())
        .map_err(|_| ChunkError::Compress { level, reason: format!("chunk of {} bytes", data.len()) })?;
    let bound = zstd::zstd_safe::compress_bound(data.len());
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < bound {
            scratch.resize(bound, 0);
        }
        let written = with_compressor(level, |c| c.compress_to_buffer(data, &mut scratch[..bound]))?;
        let (codec, payload) =
            if written >= data.len() { (CODEC_RAW, data) } else { (CODEC_ZSTD, &scratch[..written]) };
        Ok(value(reserve, codec, len, payload))
    })
}

/// Decodes stored `value` of chunk `hash` into `buf[..expected]` and checks its content hash.
/// On any error the first `expected` bytes of `buf` are zeroed, so no wrong bytes leak out.
pub fn decode_into(hash: &Hash, value: &[u8], expected: usize, buf: &mut [u8]) -> Result<(), ChunkError> {
    if buf.len() < expected {
        return Err(ChunkError::Buffer { got: buf.len(), needed: expected });
    }
    let out = &mut buf[..expected];
    let result = decode_unchecked(hash, value, out).and_then(|()| {
        let actual = Hash::of(out);
        if actual == *hash {
            Ok(())
        } else {
            Err(ChunkError::HashMismatch { hash: *hash, actual })
        }
    });
    if result.is_err() {
        out.fill(0);
    }
    result
}

fn decode_unchecked(hash: &Hash, value: &[u8], out: &mut [u8]) -> Result<(), ChunkError> {
    let expected = out.len();
    let (header, payload) = match value.split_at_checked(VALUE_HEADER) {
        Some(parts) => parts,
        None => return Err(ChunkError::Truncated { hash: *hash, len: value.len() }),
    };
    let stored = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    if stored as usize != expected {
        return Err(ChunkError::Length { hash: *hash, stored, expected });
    }
    match header[0] {
        CODEC_RAW => {
            if payload.len() != expected {
                return Err(ChunkError::Size { hash: *hash, got: payload.len(), expected });
            }
            out.copy_from_slice(payload);
            Ok(())
        }
        CODEC_ZSTD => {
            let got = DECOMPRESSOR.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    let d = zstd::bulk::Decompressor::new()
                        .map_err(|e| ChunkError::Decompress { hash: *hash, reason: e.to_string() })?;
                    *slot = Some(d);
                }
                let d = slot.as_mut().ok_or(ChunkError::Decompress { hash: *hash, reason: "no context".into() })?;
                d.decompress_to_buffer(payload, out)
                    .map_err(|e| ChunkError::Decompress { hash: *hash, reason: e.to_string() })
            })?;
            if got != expected {
                return Err(ChunkError::Size { hash: *hash, got, expected });
            }
            Ok(())
        }
        CODEC_LZ4 => {
            // Bounded by `out`: a block that would write past it, or reads past its own end,
            // is an error. (0.12.1 and later: earlier lz4_flex could copy stale bytes of a
            // reused output buffer for a bad match offset; the hash check would catch it.)
            let got = lz4_flex::block::decompress_into(payload, out)
                .map_err(|e| ChunkError::Decompress { hash: *hash, reason: format!("lz4: {e}") })?;
            if got != expected {
                return Err(ChunkError::Size { hash: *hash, got, expected });
            }
            Ok(())
        }
        codec => Err(ChunkError::Codec { hash: *hash, codec }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_compressible_and_raw() {
        let text: Vec<u8> = (0..65536u32).map(|i| b"hello world "[(i % 12) as usize]).collect();
        let noise: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for data in [&text, &noise] {
            let hash = Hash::of(data);
            let value = encode(data, 1).expect("encode");
            let mut buf = vec![0xaa; data.len() + 7];
            decode_into(&hash, &value, data.len(), &mut buf).expect("decode");
            assert_eq!(&buf[..data.len()], &data[..]);
        }
        assert_eq!(encode(&text, 1).expect("encode")[0], CODEC_ZSTD);
    }

    /// A stored value is allocated at its size: the values in flight in the pipeline hold
    /// their compressed bytes, not a compression bound each (64 KiB+ for a 64 KiB chunk).
    #[test]
    fn values_are_allocated_at_their_size() {
        let text: Vec<u8> = (0..65536u32).map(|i| b"hello world "[(i % 12) as usize]).collect();
        let noise: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for (what, data) in [("text", &text), ("noise", &noise)] {
            let value = encode(data, 1).expect("encode");
            assert_eq!(
                value.capacity(),
                value.len(),
                "{what}: {} bytes allocated for {}",
                value.capacity(),
                value.len()
            );
        }
        assert!(encode(&text, 1).expect("encode").len() < 4096, "text compresses");
    }

    /// `encode_into` (the pipeline's encoder, into a recycled entry buffer) gives exactly
    /// `encode_with`'s value after the reserved bytes, for compressed, raw and LZ4 values,
    /// whatever the buffer held before (a longer, stale entry leaves no byte behind).
    #[test]
    fn encode_into_a_recycled_buffer_gives_the_value_of_encode_with() {
        let text: Vec<u8> = (0..65536u32).map(|i| b"hello world "[(i % 12) as usize]).collect();
        let noise: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut out = vec![0xee; 200_000];
        for codec in [Codec::Zstd(-1), Codec::Zstd(3), Codec::Lz4] {
            for (what, data) in [("text", &text), ("noise", &noise), ("short text", &text[..1000].to_vec())] {
                encode_into(data, codec, 48, &mut out).expect("encode_into");
                let want = encode_with(data, codec).expect("encode_with");
                assert!(out[..48].iter().all(|b| *b == 0), "{codec:?} {what}: reserved bytes not zero");
                assert!(out[48..] == want[..], "{codec:?} {what}: value differs from encode_with's");
                let mut back = vec![0u8; data.len()];
                decode_into(&Hash::of(data), &out[48..], data.len(), &mut back).expect("decode");
                assert!(back == **data, "{codec:?} {what}: does not decode to the chunk");
            }
        }
    }

    #[test]
    fn corruption_is_detected_and_buffer_zeroed() {
        let data = vec![7u8; 8192];
        let hash = Hash::of(&data);
        let mut value = encode(&data, 3).expect("encode");
        let last = value.len() - 1;
        value[last] ^= 0xff;
        let mut buf = vec![1u8; 8192];
        assert!(decode_into(&hash, &value, 8192, &mut buf).is_err());
        assert!(is_zero(&buf));
        assert!(decode_into(&hash, &value[..3], 8192, &mut buf).is_err());
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
    }
}
