//! Store benchmark behind `snapvisor bench store` (and `examples/store_sweep.rs`).
//!
//! The image is guest-like memory built from runs of 1..=64 pages (4 KiB), each run one kind:
//! 60% all-zero, 15% random bytes (incompressible: keys, compressed files), 25% text-like
//! (words, numbers and pointers-like values, compresses about 3-4x with zstd). Runs, not single
//! pages, because untouched and touched guest memory come in contiguous stretches.

use std::path::PathBuf;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::store::{Store, StoreOptions};
use crate::writer::BlockSpec;

const PAGE: usize = 4096;
const WORDS: &[&str] = &[
    "the ",
    "kernel ",
    "page ",
    "cache ",
    "inode ",
    "struct ",
    "task ",
    "0x7fff",
    "return ",
    "error ",
    "user ",
    "memory ",
    "alloc ",
    "free ",
    "lock ",
    "buffer ",
    "snapshot ",
    "\n",
    "int ",
    "char *",
    "void ",
    "NULL",
    "{ ",
    "} ",
    "; ",
    "if (",
    ") ",
    "for ",
    "1024 ",
];

/// Benchmark parameters.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub size_mib: u64,
    /// Store directory; a temporary directory when `None`.
    pub dir: Option<PathBuf>,
    pub chunk_size: u32,
    pub zstd_level: i32,
    pub threads: usize,
    /// Random chunk reads to time.
    pub reads: usize,
    /// Clones written after the base snapshot, each the base with its own 1% of pages
    /// rewritten.
    pub clones: usize,
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            size_mib: 1024,
            dir: None,
            chunk_size: crate::DEFAULT_CHUNK_SIZE,
            zstd_level: crate::DEFAULT_ZSTD_LEVEL,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            reads: 20_000,
            clones: 10,
            seed: 1,
        }
    }
}

/// Benchmark results.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchResult {
    pub size_bytes: u64,
    pub chunk_size: u32,
    pub zstd_level: i32,
    pub threads: usize,
    pub mix: &'static str,
    pub write_mb_s: f64,
    pub zero_fraction: f64,
    pub stored_bytes: u64,
    /// size_bytes / stored_bytes.
    pub compression_ratio: f64,
    pub disk_bytes: u64,
    /// disk_bytes / stored_bytes after the base snapshot.
    pub disk_overhead: f64,
    pub read_median_us: f64,
    pub read_p99_us: f64,
    /// Sequential full read (restore) of the base snapshot, MB/s on one thread.
    pub restore_mb_s: f64,
    pub clones: usize,
    pub clone_stored_growth_bytes: u64,
    pub clone_disk_growth_bytes: u64,
    /// disk_bytes / stored_bytes after the clones.
    pub final_disk_overhead: f64,
    /// Disk bytes freed by deleting the first half of the clones and running GC.
    pub gc_freed_bytes: u64,
    /// disk_bytes / stored_bytes after that GC (hole punching keeps it near 1).
    pub after_gc_disk_overhead: f64,
}

/// A benchmark image of `size` bytes by kind: `mixed` ([`guest_image`]), `memfill` (every
/// 8-byte word a hash of its address: incompressible) or `touch` (one word in four so, the
/// rest zero: compresses about 4x, like the `touch` guest's fill).
pub fn fill_image(kind: &str, size: usize) -> Vec<u8> {
    if kind == "mixed" {
        return guest_image(size, 1);
    }
    let mut v = Vec::with_capacity(size);
    for a in (0..size as u64).step_by(8) {
        let x = (a ^ 4).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let w = if kind == "memfill" || a % 32 == 0 { x ^ (x >> 29) } else { 0 };
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// Fills a guest-like memory image of `size` bytes (see the module docs for the mix).
pub fn guest_image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; size];
    let pages = size / PAGE;
    let mut p = 0;
    while p < pages {
        let run = rng.gen_range(1..=64).min(pages - p);
        let kind = rng.gen_range(0..100);
        for page in img[p * PAGE..(p + run) * PAGE].chunks_mut(PAGE) {
            fill_page(page, kind, &mut rng);
        }
        p += run;
    }
    img
}

fn fill_page(page: &mut [u8], kind: u32, rng: &mut StdRng) {
    if kind < 60 {
        page.fill(0);
    } else if kind < 75 {
        rng.fill(page);
    } else {
        let mut i = 0;
        while i < page.len() {
            let w = WORDS[rng.gen_range(0..WORDS.len())].as_bytes();
            let n = w.len().min(page.len() - i);
            page[i..i + n].copy_from_slice(&w[..n]);
            i += n;
        }
    }
}

fn write_snapshot(store: &Store, name: &str, img: &[u8], threads: usize) -> Result<()> {
    let spec = BlockSpec {
        idstr: "pc.ram".into(),
        used_length: img.len() as u64,
        max_length: img.len() as u64,
        page_size: PAGE as u64,
        resizeable: false,
    };
    let w = store.begin(name, vec![spec])?;
    let cs = w.chunk_size() as usize;
    let n = img.len().div_ceil(cs);
    let threads = threads.max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let w = &w;
                s.spawn(move || -> Result<()> {
                    for i in (t..n).step_by(threads) {
                        let end = ((i + 1) * cs).min(img.len());
                        w.put_chunk("pc.ram", (i * cs) as u64, &img[i * cs..end])?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(StoreError::Option("writer thread panicked".into()))))
            .collect::<Result<Vec<()>>>()
    })?;
    w.commit(b"bench".to_vec())?;
    Ok(())
}

/// Runs the benchmark.
pub fn run(cfg: &BenchConfig) -> Result<BenchResult> {
    let tmp;
    let dir = match &cfg.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempdir()?;
            tmp.clone()
        }
    };
    let result = run_in(cfg, &dir);
    if cfg.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn tempdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("snapvisor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|source| StoreError::Io { path: d.clone(), op: "create bench dir", source })?;
    Ok(d)
}

fn run_in(cfg: &BenchConfig, dir: &std::path::Path) -> Result<BenchResult> {
    let size = usize::try_from(cfg.size_mib << 20)
        .map_err(|_| StoreError::Option(format!("size {} MiB too large", cfg.size_mib)))?;
    let opts = StoreOptions { chunk_size: cfg.chunk_size, zstd_level: cfg.zstd_level, ..Default::default() };
    let store = Store::open_with(dir, opts)?;
    let img = guest_image(size, cfg.seed);
    let mut r = BenchResult {
        size_bytes: size as u64,
        chunk_size: cfg.chunk_size,
        zstd_level: cfg.zstd_level,
        threads: cfg.threads,
        mix: "runs of 1-64 pages: 60% zero, 15% random, 25% text-like",
        clones: cfg.clones,
        ..Default::default()
    };
    let t = Instant::now();
    write_snapshot(&store, "base", &img, cfg.threads)?;
    r.write_mb_s = size as f64 / t.elapsed().as_secs_f64() / 1e6;
    let u = store.usage()?;
    r.zero_fraction = u.zero_bytes as f64 / size as f64;
    r.stored_bytes = u.stored_bytes;
    r.compression_ratio = size as f64 / u.stored_bytes.max(1) as f64;
    r.disk_bytes = u.disk_bytes;
    r.disk_overhead = u.overhead();

    let reader = store.reader("base")?;
    let cs = u64::from(cfg.chunk_size);
    let block = &reader.manifest().blocks[0];
    let stored: Vec<u64> = (0..block.chunks.len() as u64)
        .filter(|i| block.chunks[*i as usize] != crate::ChunkRef::Zero)
        .map(|i| i * cs)
        .collect();
    let mut buf = vec![0u8; cfg.chunk_size as usize];
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed);
    let mut lat = Vec::with_capacity(cfg.reads);
    for _ in 0..cfg.reads.min(if stored.is_empty() { 0 } else { usize::MAX }) {
        let off = stored[rng.gen_range(0..stored.len())];
        let t = Instant::now();
        reader.read_chunk("pc.ram", off, &mut buf)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);
    r.read_median_us = pct(0.5);
    r.read_p99_us = pct(0.99);
    let t = Instant::now();
    for i in 0..block.chunks.len() as u64 {
        reader.read_chunk("pc.ram", i * cs, &mut buf)?;
    }
    r.restore_mb_s = size as f64 / t.elapsed().as_secs_f64() / 1e6;

    let mut img = img;
    let pages = size / PAGE;
    for c in 0..cfg.clones {
        // Each clone is the base with its own 1% of pages rewritten (non-zero content).
        let mut saved = Vec::with_capacity(pages / 100);
        for _ in 0..pages / 100 {
            let p = rng.gen_range(0..pages);
            let page = &mut img[p * PAGE..(p + 1) * PAGE];
            saved.push((p, page.to_vec()));
            let kind = rng.gen_range(60..100);
            fill_page(page, kind, &mut rng);
        }
        write_snapshot(&store, &format!("clone-{c}"), &img, cfg.threads)?;
        for (p, old) in saved.into_iter().rev() {
            img[p * PAGE..(p + 1) * PAGE].copy_from_slice(&old);
        }
    }
    let end = store.usage()?;
    r.clone_stored_growth_bytes = end.stored_bytes - u.stored_bytes;
    r.clone_disk_growth_bytes = end.disk_bytes.saturating_sub(u.disk_bytes);
    r.final_disk_overhead = end.overhead();
    for c in 0..cfg.clones / 2 {
        store.delete(&format!("clone-{c}"))?;
    }
    r.gc_freed_bytes = store.gc()?.disk_bytes_freed;
    r.after_gc_disk_overhead = store.usage()?.overhead();
    Ok(r)
}
