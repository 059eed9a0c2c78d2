//! What the kernel charges for writing pack entries into the page cache, by write size: one
//! `pwrite` per entry (entries back to back, so at unaligned offsets: what the pipeline did
//! before December 2026) against one `pwritev` per batch of entries (what it does now). CPU
//! time of this process (user + system, nearly all system), then the `fdatasync`:
//!
//!     cargo run --release -p storage --example pack_writes -- FILE [MiB] [entry bytes] [batch bytes]...
//!
//! Defaults: 261 MiB (what `bench snapshot` stores for the 1 GiB `touch` guest), 16432-byte
//! entries (its average: 64 KiB chunks stored at 0.25, plus the 48-byte entry header),
//! batches of 0 (one write per entry), 64 KiB, 512 KiB and 1 MiB.

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Instant;

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
    let path = args.get(1).ok_or("usage: pack_writes FILE [MiB] [entry bytes] [batch bytes]...")?;
    let mib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(261);
    let entry: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(16432);
    let mut batches: Vec<usize> = args.iter().skip(4).filter_map(|s| s.parse().ok()).collect();
    if batches.is_empty() {
        batches = vec![0, 64 << 10, 512 << 10, 1 << 20];
    }
    let total = mib << 20;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..entry)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for batch in batches {
        let _ = std::fs::remove_file(path);
        let f = std::fs::OpenOptions::new().create_new(true).read(true).write(true).open(path)?;
        let per = (batch / entry).max(1);
        let (c0, t0) = (cpu_secs(), Instant::now());
        let mut off = 0u64;
        while off < total {
            if batch == 0 {
                f.write_all_at(&data, off)?;
                off += entry as u64;
                continue;
            }
            let iov: Vec<IoSlice<'_>> = (0..per).map(|_| IoSlice::new(&data)).collect();
            // SAFETY: IoSlice is ABI-compatible with iovec; the buffers outlive the call,
            // which only reads them.
            let r = unsafe {
                libc::pwritev(f.as_raw_fd(), iov.as_ptr().cast::<libc::iovec>(), iov.len() as i32, off as i64)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            off += r as u64;
        }
        let (c1, t1) = (cpu_secs(), Instant::now());
        f.sync_data()?;
        let t2 = Instant::now();
        println!(
            "{mib} MiB, {entry}-byte entries, {}: {:.3} CPU-s, {:.0} ms wall; fdatasync {:.0} ms",
            if batch == 0 {
                "one pwrite each".to_owned()
            } else {
                format!("pwritev of {per} ({} KiB)", (per * entry) >> 10)
            },
            c1 - c0,
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3
        );
        drop(f);
        std::fs::remove_file(path)?;
    }
    Ok(())
}
