//! Tests of codec 3 (LZ4) values: round trips, and every way a stored value can be wrong
//! (bad lengths, truncated or flipped payloads, a wrong codec byte) is an error naming the
//! chunk, never a panic and never wrong bytes in the caller's buffer.

use crate::bench::fill_image;
use crate::chunk::{decode_into, encode, encode_with, ChunkError, Codec, Hash, CODEC_LZ4, CODEC_RAW, CODEC_ZSTD};

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn lz4_values_round_trip_and_incompressible_chunks_are_stored_raw() {
    let text: Vec<u8> = (0..65536u32).map(|i| b"hello world "[(i % 12) as usize]).collect();
    for (what, data, codec) in [
        ("text", text, CODEC_LZ4),
        ("touch", fill_image("touch", 65536), CODEC_LZ4),
        ("noise", noise(65536, 7), CODEC_RAW),
        ("short", vec![3u8; 100], CODEC_LZ4),
    ] {
        let hash = Hash::of(&data);
        let value = encode_with(&data, Codec::Lz4).expect("encode");
        assert_eq!(value[0], codec, "{what}: codec byte");
        assert_eq!(value.capacity(), value.len(), "{what}: allocated at its size");
        let mut buf = vec![0xaa; data.len() + 3];
        decode_into(&hash, &value, data.len(), &mut buf).expect("decode");
        assert!(buf[..data.len()] == data[..], "{what}: bytes differ after the round trip");
    }
    assert!(
        encode_with(&fill_image("touch", 65536), Codec::Lz4).expect("encode").len() < 65536 / 2,
        "touch compresses"
    );
}

/// Values written with zstd (codec 1) and raw (codec 2) read back beside LZ4 ones: the
/// decoder keeps every codec it ever wrote.
#[test]
fn every_codec_decodes() {
    let data = fill_image("touch", 65536);
    let hash = Hash::of(&data);
    for (value, codec) in [
        (encode(&data, -1).expect("zstd"), CODEC_ZSTD),
        (encode_with(&data, Codec::Zstd(3)).expect("zstd 3"), CODEC_ZSTD),
        (encode_with(&data, Codec::Lz4).expect("lz4"), CODEC_LZ4),
    ] {
        assert_eq!(value[0], codec);
        let mut buf = vec![0u8; data.len()];
        decode_into(&hash, &value, data.len(), &mut buf).expect("decode");
        assert!(buf == data, "codec {codec} decodes to different bytes");
    }
}

fn decode_err(hash: &Hash, value: &[u8], len: usize) -> ChunkError {
    let mut buf = vec![0x55u8; len];
    let e = decode_into(hash, value, len, &mut buf).expect_err("a bad value must not decode");
    assert!(buf.iter().all(|b| *b == 0), "the buffer is zeroed after {e}");
    assert!(e.to_string().contains(&hash.to_string()), "the error names the chunk: {e}");
    e
}

#[test]
fn bad_lz4_values_are_errors_naming_the_chunk() {
    let data = fill_image("touch", 65536);
    let hash = Hash::of(&data);
    let value = encode_with(&data, Codec::Lz4).expect("encode");
    assert_eq!(value[0], CODEC_LZ4);

    // Truncated payloads, down to the bare header.
    for cut in [value.len() - 1, value.len() / 2, 6, 5] {
        let e = decode_err(&hash, &value[..cut], data.len());
        assert!(matches!(e, ChunkError::Decompress { .. } | ChunkError::Size { .. }), "cut {cut}: {e}");
    }
    // Shorter than the header.
    assert!(matches!(decode_err(&hash, &value[..3], data.len()), ChunkError::Truncated { .. }));
    // The recorded length disagrees with the manifest's.
    let mut v = value.clone();
    v[1..5].copy_from_slice(&4096u32.to_le_bytes());
    let e = decode_err(&hash, &v, data.len());
    assert!(matches!(e, ChunkError::Length { stored: 4096, expected: 65536, .. }), "{e}");
    // Both lengths say less than the block decompresses to: it must not write past them.
    let e = decode_err(&hash, &v, 4096);
    assert!(matches!(e, ChunkError::Decompress { .. }), "{e}");
    // A payload that decompresses to fewer bytes than recorded.
    let small = encode_with(&data[..32768], Codec::Lz4).expect("encode");
    let mut v = small.clone();
    v[1..5].copy_from_slice(&65536u32.to_le_bytes());
    let e = decode_err(&hash, &v, 65536);
    assert!(matches!(e, ChunkError::Size { got: 32768, expected: 65536, .. }), "{e}");
    // Unknown codec bytes; and a zstd frame labelled LZ4, an LZ4 block labelled zstd.
    for codec in [0u8, 4, 0xff] {
        let mut v = value.clone();
        v[0] = codec;
        let e = decode_err(&hash, &v, data.len());
        assert!(e.to_string().contains(&format!("unknown codec {codec}")), "{e}");
    }
    let mut v = encode(&data, -1).expect("zstd");
    v[0] = CODEC_LZ4;
    decode_err(&hash, &v, data.len());
    let mut v = value.clone();
    v[0] = CODEC_ZSTD;
    decode_err(&hash, &v, data.len());
}

/// Flipped bytes and random payloads behind a valid LZ4 header: never a panic, never a
/// success with bytes that do not hash to the chunk.
#[test]
fn mutated_lz4_values_never_decode_to_wrong_bytes() {
    let data = fill_image("touch", 16384);
    let hash = Hash::of(&data);
    let value = encode_with(&data, Codec::Lz4).expect("encode");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut buf = vec![0u8; data.len()];
    for round in 0..3000 {
        let mut v = value.clone();
        match round % 3 {
            0 => {
                let at = 5 + (next() as usize) % (v.len() - 5);
                v[at] ^= 1 << (next() % 8);
            }
            1 => {
                let at = 5 + (next() as usize) % (v.len() - 5);
                v[at] = next() as u8;
                v.truncate(5 + (next() as usize) % (v.len() - 4));
            }
            _ => {
                let n = (next() as usize) % 600;
                v.truncate(5);
                v.extend((0..n).map(|_| next() as u8));
            }
        }
        if decode_into(&hash, &v, data.len(), &mut buf).is_ok() {
            assert!(buf == data, "round {round}: a mutated value decoded to other bytes");
        } else {
            assert!(buf.iter().all(|b| *b == 0), "round {round}: buffer not zeroed");
        }
    }
}
