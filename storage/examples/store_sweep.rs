//! Measurements behind the defaults (chunk size, zstd level):
//! `cargo run --release -p storage --example store_sweep -- [size_mib]`.
//! Part 1: the codec alone, one thread, on the non-zero chunks of the benchmark image.
//! Part 2: the whole store (write, read, clones) for each chunk size x level.

use std::time::Instant;

fn codec(img: &[u8], chunk: usize, level: i32) -> (f64, f64, f64) {
    let chunks: Vec<&[u8]> = img.chunks(chunk).filter(|c| c.iter().any(|b| *b != 0)).collect();
    let raw: usize = chunks.iter().map(|c| c.len()).sum();
    let mut c = zstd::bulk::Compressor::new(level).expect("compressor");
    let t = Instant::now();
    let packed: Vec<Vec<u8>> = chunks.iter().map(|x| c.compress(x).expect("compress")).collect();
    let ct = t.elapsed().as_secs_f64();
    let stored: usize = packed.iter().map(|p| p.len()).sum();
    let mut d = zstd::bulk::Decompressor::new().expect("decompressor");
    let mut out = vec![0u8; chunk];
    let t = Instant::now();
    for p in &packed {
        d.decompress_to_buffer(p, &mut out).expect("decompress");
    }
    let dt = t.elapsed().as_secs_f64();
    (raw as f64 / ct / 1e6, raw as f64 / dt / 1e6, raw as f64 / stored as f64)
}

fn main() -> Result<(), storage::StoreError> {
    let size_mib: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let img = storage::bench::guest_image((size_mib << 20) as usize, 1);
    println!("codec only, 1 thread, non-zero chunks:");
    println!("chunk  level  compress MB/s  decompress MB/s  ratio");
    for chunk in [16usize << 10, 64 << 10] {
        for level in [1, 2, 3, 5] {
            let (c, d, r) = codec(&img, chunk, level);
            println!("{:>4}K  {level:>5}  {c:>13.0}  {d:>15.0}  {r:>5.2}", chunk >> 10);
        }
    }
    if std::env::var_os("CODEC_ONLY").is_some() {
        return Ok(());
    }
    drop(img);
    println!("\nwhole store, {size_mib} MiB image, 10 clones (each: base + its own 1% of pages):");
    println!("chunk  level  write MB/s  ratio  disk/stored  read p50 us  p99 us  restore MB/s  clones growth MB");
    for chunk_size in [16u32 << 10, 32 << 10, 64 << 10, 256 << 10, 1 << 20] {
        for zstd_level in [1, 3] {
            let cfg = storage::bench::BenchConfig {
                size_mib,
                chunk_size,
                zstd_level,
                reads: 5000,
                clones: 10,
                ..Default::default()
            };
            let r = storage::bench::run(&cfg)?;
            println!(
                "{:>4}K  {:>5}  {:>10.0}  {:>5.2}  {:>11.3}  {:>11.1}  {:>6.1}  {:>12.0}  {:>16.1}",
                chunk_size >> 10,
                zstd_level,
                r.write_mb_s,
                r.compression_ratio,
                r.final_disk_overhead,
                r.read_median_us,
                r.read_p99_us,
                r.restore_mb_s,
                r.clone_disk_growth_bytes as f64 / 1e6
            );
        }
    }
    Ok(())
}
