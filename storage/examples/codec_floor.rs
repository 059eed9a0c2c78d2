//! The CPU floors of a full snapshot, one thread, 64 KiB chunks: memory copy, blake3, zstd at
//! several levels and with advanced parameters, and LZ4 (`lz4_flex`), on the `touch` fill (one
//! pseudo-random word in four, zeros between: what `bench snapshot` snapshots) and on
//! `memfill` (pseudo-random words, incompressible). Backs the codec table in the crate docs.
//!
//! Costs are CPU seconds of this thread per GiB (`CLOCK_THREAD_CPUTIME_ID`), so they hold on a
//! shared machine; `valgrind --tool=callgrind` on this example gives exact instruction counts.
//!
//!     cargo run --release -p storage --example codec_floor -- [MiB] [touch|memfill|mixed|all] [stage]
//!
//! With a stage (its exact name, or `none`), only that stage runs: under callgrind,
//! its instructions are the run's minus a run with `none`.

use std::time::Instant;

const CHUNK: usize = 64 * 1024;

/// CPU time of the calling thread, seconds.
fn cpu_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Runs `f` over every chunk; prints CPU-s per GiB (wall in brackets) and stored/in.
fn row(kind: &str, what: &str, img: &[u8], f: &mut dyn FnMut(&[u8]) -> usize) {
    // Only the stages named by the third argument (for callgrind: one stage per run).
    if std::env::args().nth(3).is_some_and(|only| what != only) {
        return;
    }
    let (c, t) = (cpu_now(), Instant::now());
    let mut out = 0usize;
    for chunk in img.chunks(CHUNK) {
        out += f(chunk);
    }
    let (cpu, wall) = (cpu_now() - c, t.elapsed().as_secs_f64());
    let gib = img.len() as f64 / f64::from(1u32 << 30);
    let ratio = if out == 0 { String::new() } else { format!("{:.3}", out as f64 / img.len() as f64) };
    println!("| {kind} | {what} | {:.3} ({:.3}) | {ratio} |", cpu / gib, wall / gib);
}

fn zstd_row(kind: &str, img: &[u8], what: &str, mut c: zstd::bulk::Compressor<'static>) {
    let mut dst = vec![0u8; zstd::zstd_safe::compress_bound(CHUNK)];
    row(kind, what, img, &mut |chunk| c.compress_to_buffer(chunk, &mut dst).map_or(0, |n| n.min(chunk.len())));
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let which = args.get(2).map_or("all", String::as_str);
    let kinds: Vec<&str> = if which == "all" { vec!["touch", "memfill", "mixed"] } else { vec![which] };
    println!("| image | stage | CPU-s per GiB (wall) | stored/in |");
    println!("|---|---|---:|---:|");
    for kind in kinds {
        let img = storage::bench::fill_image(kind, mib << 20);
        let mut buf = vec![0u8; CHUNK];
        row(kind, "copy", &img, &mut |c| {
            buf[..c.len()].copy_from_slice(c);
            std::hint::black_box(&buf);
            0
        });
        row(kind, "blake3", &img, &mut |c| {
            std::hint::black_box(storage::Hash::of(c));
            0
        });
        for level in [1, -1, -3, -5, -10, -20] {
            zstd_row(kind, &img, &format!("zstd {level}"), zstd::bulk::Compressor::new(level)?);
        }
        // zstd's fast strategy with a smaller hash table (fits the L1/L2 cache) and longer
        // minimum matches (fewer probes that fail).
        for (level, hash, min) in
            [(-1, 14, 7), (-1, 12, 7), (-1, 11, 7), (-1, 10, 7), (-1, 12, 6), (-1, 12, 5), (1, 12, 7)]
        {
            use zstd::zstd_safe::CParameter as P;
            let mut c = zstd::bulk::Compressor::new(level)?;
            c.set_parameter(P::HashLog(hash))?;
            c.set_parameter(P::MinMatch(min))?;
            zstd_row(kind, &img, &format!("zstd {level} hashlog {hash} minmatch {min}"), c);
        }
        let mut dst = vec![0u8; lz4_flex::block::get_maximum_output_size(CHUNK)];
        row(kind, "lz4_flex", &img, &mut |c| lz4_flex::block::compress_into(c, &mut dst).map_or(0, |n| n.min(c.len())));
        // Decompression of what each codec wrote (restores pay this).
        let lz: Vec<Vec<u8>> = img.chunks(CHUNK).map(lz4_flex::block::compress).collect();
        let mut it = lz.iter();
        row(kind, "lz4_flex decompress", &img, &mut |c| {
            let v = it.next().map_or(&[][..], Vec::as_slice);
            std::hint::black_box(lz4_flex::block::decompress_into(v, &mut buf[..c.len()]).unwrap_or(0));
            0
        });
        let zs: Vec<Vec<u8>> = img.chunks(CHUNK).map(|c| zstd::bulk::compress(c, -1).unwrap_or_default()).collect();
        let mut d = zstd::bulk::Decompressor::new()?;
        let mut it = zs.iter();
        row(kind, "zstd -1 decompress", &img, &mut |c| {
            let v = it.next().map_or(&[][..], Vec::as_slice);
            std::hint::black_box(d.decompress_to_buffer(v, &mut buf[..c.len()]).unwrap_or(0));
            0
        });
        if std::env::args().nth(3).is_some_and(|s| s == "zstd -1 minmatch 7 decompress") {
            let mut c = zstd::bulk::Compressor::new(-1)?;
            c.set_parameter(zstd::zstd_safe::CParameter::MinMatch(7))?;
            let zs: Vec<Vec<u8>> = img.chunks(CHUNK).map(|ch| c.compress(ch).unwrap_or_default()).collect();
            let mut it = zs.iter();
            row(kind, "zstd -1 minmatch 7 decompress", &img, &mut |ch| {
                let v = it.next().map_or(&[][..], Vec::as_slice);
                std::hint::black_box(d.decompress_to_buffer(v, &mut buf[..ch.len()]).unwrap_or(0));
                0
            });
        }
        for min in [6, 7] {
            use zstd::zstd_safe::CParameter as P;
            let mut c = zstd::bulk::Compressor::new(-1)?;
            c.set_parameter(P::MinMatch(min))?;
            zstd_row(kind, &img, &format!("zstd -1 minmatch {min}"), c);
        }
    }
    Ok(())
}
