//! Per-stage costs of storing chunks, one thread: zero check, blake3, zstd at several levels,
//! on memfill's pattern (pseudo-random words, incompressible) and on the mixed guest image of
//! `storage::bench`. Backs the zstd-level table in the crate docs.
//!
//!     cargo run --release -p storage --example chunk_costs -- [MiB] [levels, e.g. -1,1,3]

use std::time::Instant;

const CHUNK: usize = 64 * 1024;

/// memfill's word at address `a` for seed `s` (hypervisor::guests::memfill::pattern).
fn memfill_image(size: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    for a in (0..size as u64).step_by(8) {
        let x = (a ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        v.extend_from_slice(&(x ^ (x >> 29)).to_le_bytes());
    }
    v
}

fn mb_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let levels: Vec<i32> =
        args.get(2).map(|s| s.split(',').filter_map(|l| l.parse().ok()).collect()).unwrap_or(vec![-1, 1, 3]);
    let size = mib << 20;
    let images = [("memfill", memfill_image(size, 3)), ("mixed", storage::bench::guest_image(size, 1))];
    println!("| image | stage | MB/s (of all bytes in) | stored/in |");
    println!("|---|---|---:|---:|");
    for (name, img) in &images {
        let t = Instant::now();
        let zero = img.chunks(CHUNK).filter(|c| storage::chunk_is_zero(c)).count();
        println!("| {name} | zero check ({zero} zero chunks) | {:.0} | |", mb_s(size, t.elapsed().as_secs_f64()));
        let nonzero: Vec<&[u8]> = img.chunks(CHUNK).filter(|c| !storage::chunk_is_zero(c)).collect();
        let t = Instant::now();
        for c in &nonzero {
            std::hint::black_box(storage::Hash::of(c));
        }
        println!("| {name} | blake3 | {:.0} | |", mb_s(size, t.elapsed().as_secs_f64()));
        for &level in &levels {
            let t = Instant::now();
            let mut out = 0usize;
            for c in &nonzero {
                out += storage::encode_chunk(c, level).map(|v| v.len()).unwrap_or(0);
            }
            let secs = t.elapsed().as_secs_f64();
            println!("| {name} | zstd {level} | {:.0} | {:.3} |", mb_s(size, secs), out as f64 / size as f64);
        }
    }
}
