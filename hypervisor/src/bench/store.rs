//! `snapvisor bench store`: write a guest-like memory image as one snapshot (MB/s, compression
//! ratio, on-disk bytes), random chunk reads (median and p99), then clones that each differ
//! in 1% of pages (on-disk growth). The work is `storage::bench`; see its docs for the mix.

use std::fmt::Write as _;
use std::path::PathBuf;

use storage::bench::{BenchConfig, BenchResult};

/// Arguments of `snapvisor bench store`.
#[derive(Debug, clap::Args)]
pub struct BenchStoreArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Size of the memory image in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Store directory (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Chunk size in bytes (power of two, >= 4096).
    #[arg(long, default_value_t = storage::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u32,
    /// zstd level.
    #[arg(long, default_value_t = storage::DEFAULT_ZSTD_LEVEL)]
    pub level: i32,
    /// Writer threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Clones written after the base snapshot, each the base with its own 1% of pages rewritten.
    #[arg(long, default_value_t = 10)]
    pub clones: usize,
}

/// Runs the benchmark and prints a table, or JSON with `--json`.
pub fn run(args: BenchStoreArgs) -> Result<(), storage::StoreError> {
    let defaults = BenchConfig::default();
    let cfg = BenchConfig {
        size_mib: args.size_mib,
        dir: args.dir.clone(),
        chunk_size: args.chunk_size,
        zstd_level: args.level,
        threads: args.threads.unwrap_or(defaults.threads),
        clones: args.clones,
        ..defaults
    };
    let r = storage::bench::run(&cfg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")));
    } else {
        print!("{}", table(&r));
    }
    Ok(())
}

/// The human-readable table of a result.
pub fn table(r: &BenchResult) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "image              {:.0} MB ({}), chunk {} KiB, zstd level {}, {} writer threads",
        mb(r.size_bytes),
        r.mix,
        r.chunk_size / 1024,
        r.zstd_level,
        r.threads
    );
    let _ = writeln!(t, "write              {:>10.0} MB/s (zero fraction {:.2})", r.write_mb_s, r.zero_fraction);
    let _ = writeln!(t, "stored             {:>10.1} MB   (ratio {:.2}x)", mb(r.stored_bytes), r.compression_ratio);
    let _ = writeln!(t, "on disk            {:>10.1} MB   ({:.3}x stored)", mb(r.disk_bytes), r.disk_overhead);
    let _ = writeln!(t, "random chunk read  {:>10.1} us median, {:.1} us p99", r.read_median_us, r.read_p99_us);
    let _ = writeln!(t, "full restore read  {:>10.0} MB/s (one thread)", r.restore_mb_s);
    let _ = writeln!(
        t,
        "{} clones (1% pages changed): +{:.1} MB stored, +{:.1} MB on disk; final {:.3}x stored",
        r.clones,
        mb(r.clone_stored_growth_bytes),
        mb(r.clone_disk_growth_bytes),
        r.final_disk_overhead
    );
    let _ = writeln!(
        t,
        "delete {} clones + gc: freed {:.1} MB on disk; then {:.3}x stored",
        r.clones / 2,
        mb(r.gc_freed_bytes),
        r.after_gc_disk_overhead
    );
    t
}
