//! What one full snapshot of an image costs through [`storage::put_pipelined`]: wall time,
//! CPU time of the whole process (user + system) and the pipeline's stage counters, into an
//! empty store. Runs the store's own code, so `perf record` on it profiles the snapshot path
//! without a VM:
//!
//!     cargo run --release -p storage --example pipeline_cost -- DIR [MiB] [touch|memfill|mixed] [level|lz4] [workers]

use std::time::Instant;

use storage::{BlockSpec, ChunkJob, Store, StoreOptions};

/// User + system CPU seconds of this process so far.
fn cpu_secs() -> f64 {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or("usage: pipeline_cost DIR [MiB] [touch|memfill|mixed] [level|lz4] [workers]")?;
    let mib: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let kind = args.get(3).map_or("touch", String::as_str);
    // A zstd level, or `lz4`.
    let lz4 = args.get(4).is_some_and(|s| s == "lz4");
    let level: i32 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(storage::DEFAULT_ZSTD_LEVEL);
    let workers: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(2);
    let size = mib << 20;
    let img = storage::bench::fill_image(kind, size);
    let _ = std::fs::remove_dir_all(dir);
    let store = Store::open_with(dir, StoreOptions { zstd_level: level, lz4, ..Default::default() })?;
    let spec = BlockSpec {
        idstr: "pc.ram".into(),
        used_length: size as u64,
        max_length: size as u64,
        page_size: 4096,
        resizeable: false,
    };
    let cs = u64::from(store.options().chunk_size);
    let jobs: Vec<ChunkJob> =
        (0..size as u64).step_by(cs as usize).map(|offset| ChunkJob { block: "pc.ram".into(), offset }).collect();
    let (c0, t0) = (cpu_secs(), Instant::now());
    let w = store.begin("snap", vec![spec])?;
    let read = |_: &str, off: u64, buf: &mut [u8]| -> Result<(), String> {
        let at = off as usize;
        buf.copy_from_slice(&img[at..at + buf.len()]);
        Ok(())
    };
    let st = storage::put_pipelined(&w, &jobs, workers, &read)?;
    let (c1, t1) = (cpu_secs(), Instant::now());
    let ws = w.stats();
    w.commit(Vec::new())?;
    let (c2, t2) = (cpu_secs(), Instant::now());
    println!(
        "{kind} {mib} MiB {} workers {workers}: pipeline {:.0} ms wall {:.0} ms cpu; commit {:.0} ms wall \
         {:.0} ms cpu; read/work/write {:.0}/{:.0}/{:.0} ms; hashed {} MiB, stored {} MiB",
        if lz4 { "lz4".to_owned() } else { format!("level {level}") },
        (t1 - t0).as_secs_f64() * 1e3,
        (c1 - c0) * 1e3,
        (t2 - t1).as_secs_f64() * 1e3,
        (c2 - c1) * 1e3,
        st.read_ns as f64 / 1e6,
        st.work_ns as f64 / 1e6,
        st.write_ns as f64 / 1e6,
        ws.bytes_hashed >> 20,
        ws.bytes_stored >> 20,
    );
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
