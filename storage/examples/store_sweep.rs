//! Measures chunk size x zstd level on the benchmark image:
//! `cargo run --release -p storage --example store_sweep -- [size_mib]`.

fn main() -> Result<(), storage::StoreError> {
    let size_mib = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    println!("chunk    level  write MB/s  ratio  disk/stored  read p50 us  p99 us  restore MB/s  clones growth MB");
    for chunk_size in [16u32 << 10, 64 << 10, 256 << 10, 1 << 20] {
        for zstd_level in [1, 3] {
            let cfg = storage::bench::BenchConfig {
                size_mib,
                chunk_size,
                zstd_level,
                reads: 5000,
                clones: 3,
                ..Default::default()
            };
            let r = storage::bench::run(&cfg)?;
            println!(
                "{:>5}K  {:>5}  {:>10.0}  {:>5.2}  {:>11.2}  {:>11.1}  {:>6.1}  {:>12.0}  {:>8.1}",
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
