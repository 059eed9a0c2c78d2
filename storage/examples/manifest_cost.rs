//! What reading a large manifest costs, one thread: the crc, the CBOR decode with its chunk
//! tables, and the page faults of the buffers it allocates. A 4 GiB guest at 64 KiB chunks
//! has 65,536 chunk entries (2 MiB of tables); the restore reads its manifest before the
//! first instruction.
//!
//!     cargo run --release -p storage --example manifest_cost -- [GiB] [rounds]

use std::time::Instant;

use storage::{BlockManifest, ChunkRef, Hash, Manifest};

fn cpu_ms() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

fn minor_faults() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD is the calling thread.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_minflt
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let gib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let chunks = (gib << 30) / 65536;
    let table = (0..chunks)
        .map(|i| if i % 7 == 3 { ChunkRef::Zero } else { ChunkRef::Stored(Hash::of(&i.to_le_bytes())) })
        .collect();
    let m = Manifest {
        name: "m".into(),
        chunk_size: 65536,
        created_unix_ms: 1,
        state: vec![0; 64 * 1024],
        blocks: vec![BlockManifest {
            idstr: "pc.ram".into(),
            used_length: gib << 30,
            max_length: gib << 30,
            page_size: 4096,
            resizeable: false,
            chunks: table,
        }],
    };
    let enc = m.encode().expect("encode");
    println!("{gib} GiB: {chunks} chunks, manifest {} KiB", enc.len() / 1024);
    println!("| round | decode ms | cpu ms | minor faults | crc ms |");
    println!("|---|---:|---:|---:|---:|");
    for r in 0..rounds {
        let (t, c, f) = (Instant::now(), cpu_ms(), minor_faults());
        let d = Manifest::decode(&enc).expect("decode");
        let (ms, cpu, faults) = (t.elapsed().as_secs_f64() * 1e3, cpu_ms() - c, minor_faults() - f);
        let t = Instant::now();
        std::hint::black_box(crc32fast::hash(&enc));
        let crc = t.elapsed().as_secs_f64() * 1e3;
        println!("| {r} | {ms:.3} | {cpu:.3} | {faults} | {crc:.3} |");
        drop(d);
    }
}
