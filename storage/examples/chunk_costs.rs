//! Per-stage costs of storing chunks, one thread: zero check, blake3, zstd at several levels,
//! on memfill's pattern (pseudo-random words, incompressible) and on the mixed guest image of
//! `storage::bench`. Backs the zstd-level table in the crate docs.
//!
//! Speeds are per CPU second of this thread (`CLOCK_THREAD_CPUTIME_ID`), so they hold on a
//! shared machine where wall time is inflated by other processes; wall-time speeds follow in
//! brackets.
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

/// The `touch` guest's fill: memfill's word in every fourth word, zeros between.
fn touch_image(size: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    for a in (0..size as u64).step_by(8) {
        let x = (a ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let w = if a % 32 == 0 { x ^ (x >> 29) } else { 0 };
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

fn mb_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// CPU time of the calling thread, seconds.
fn cpu_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Times `f`: (CPU seconds of this thread, wall seconds).
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (c, t) = (cpu_now(), Instant::now());
    let r = f();
    (r, cpu_now() - c, t.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let levels: Vec<i32> =
        args.get(2).map(|s| s.split(',').filter_map(|l| l.parse().ok()).collect()).unwrap_or(vec![-1, 1, 3]);
    let size = mib << 20;
    let images = [
        ("memfill", memfill_image(size, 3)),
        ("touch", touch_image(size, 4)),
        ("mixed", storage::bench::guest_image(size, 1)),
    ];
    println!("| image | stage | MB/s per CPU second (wall) | stored/in | decompress MB/s per CPU s |");
    println!("|---|---|---:|---:|---:|");
    for (name, img) in &images {
        let (zero, cpu, wall) = timed(|| img.chunks(CHUNK).filter(|c| storage::chunk_is_zero(c)).count());
        println!("| {name} | zero check ({zero} zero chunks) | {:.0} ({:.0}) | | |", mb_s(size, cpu), mb_s(size, wall));
        let nonzero: Vec<&[u8]> = img.chunks(CHUNK).filter(|c| !storage::chunk_is_zero(c)).collect();
        let ((), cpu, wall) = timed(|| {
            for c in &nonzero {
                std::hint::black_box(storage::Hash::of(c));
            }
        });
        println!("| {name} | blake3 | {:.0} ({:.0}) | | |", mb_s(size, cpu), mb_s(size, wall));
        for &level in &levels {
            let (values, cpu, wall) =
                timed(|| nonzero.iter().filter_map(|c| storage::encode_chunk(c, level).ok()).collect::<Vec<Vec<u8>>>());
            let out: usize = values.iter().map(|v| v.len()).sum();
            let mut buf = vec![0u8; CHUNK];
            let ((), dcpu, _) = timed(|| {
                for v in values.iter().filter(|v| v[0] == 1) {
                    std::hint::black_box(zstd::bulk::decompress_to_buffer(&v[5..], &mut buf).ok());
                }
            });
            println!(
                "| {name} | zstd {level} | {:.0} ({:.0}) | {:.3} | {:.0} |",
                mb_s(size, cpu),
                mb_s(size, wall),
                out as f64 / size as f64,
                mb_s(size, dcpu)
            );
        }
    }
}
