//! What a chunk of the prefetch list costs the page server's loader, in its own CPU time, by
//! where the chunk comes from: alternated in one process so that the rows compare on a
//! shared machine (the loader's thread CPU clock, not the wall clock).
//!
//! - `shared`: a cache hit placed straight from the cache's bytes ([`Fill::Shared`]);
//! - `copied`: a cache hit copied into the loader's buffer first, then placed (the path
//!   before `Fill::Shared`);
//! - `decoded`: the stored value decompressed (zstd level 1) into the buffer, its blake3
//!   hash checked, then placed: a cold chunk less the store's index lookup and read;
//! - `decoded+heap`: the same, and a copy kept in a fresh heap allocation per chunk: what a
//!   restore with the shared chunk cache (the default) did with every chunk it read before
//!   the cache kept its chunks in slab slots;
//! - `decoded+slot`: decompressed and checked straight into a cache slot and placed from
//!   there, as a default restore does now (`StorePageSource`).
//!
//! Chunks hold the `touch` guest's fill (`storage::bench::fill_image`); one loader thread,
//! no guest: every chunk is in the prefetch list of a fresh anonymous mapping.
//!
//!     cargo run --release -p migrate --example place_cost -- [chunks] [rounds]
//!
//! On the 2-core development machine (load 5-8 from other work; medians of 8 rounds, µs per
//! chunk): shared 29, copied 31, decoded 67, decoded+heap 106. With the slot row (load 3.6,
//! medians of 10 rounds): shared 24, copied 27, decoded 55, decoded+heap 99, decoded+slot 66.
//! Outliers of 100-250 µs in any row come with the load; read the medians.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use migrate::lazy::{ChunkCache, Fill, LazyBlock, PageServer, PageSource, ServerOptions};

const CHUNK: u64 = 64 * 1024;

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Shared,
    Copied,
    Decoded,
    DecodedHeap,
    DecodedSlot,
}

struct Source {
    way: Way,
    cache: Arc<ChunkCache>,
    hashes: Vec<storage::Hash>,
    values: Vec<Vec<u8>>,
    /// Where `DecodedHeap` keeps its copies.
    heap: Mutex<Vec<Arc<[u8]>>>,
    /// Where `DecodedSlot` keeps its chunks (fresh each run: every chunk is a miss).
    keep: Arc<ChunkCache>,
}

impl PageSource for Source {
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn read_chunk(&self, _idstr: &str, offset: u64, buf: &mut [u8]) -> Result<Fill, String> {
        let i = (offset / CHUNK) as usize;
        let hash = &self.hashes[i];
        match self.way {
            Way::Shared => {
                let data = self.cache.get_shared(&hash.0).ok_or("not cached")?;
                Ok(Fill::Shared { data, stored: 0 })
            }
            Way::Copied => {
                self.cache.get(&hash.0, buf).ok_or("not cached")?;
                Ok(Fill::Data { stored: 0 })
            }
            Way::Decoded | Way::DecodedHeap => {
                storage::decode_chunk_into(hash, &self.values[i], buf.len(), buf).map_err(|e| e.to_string())?;
                if self.way == Way::DecodedHeap {
                    self.heap.lock().map_err(|_| "poisoned")?.push(Arc::from(&*buf));
                }
                Ok(Fill::Data { stored: self.values[i].len() as u64 })
            }
            Way::DecodedSlot => {
                let mut slot = self.keep.slot(buf.len()).ok_or("no slot")?;
                let len = buf.len();
                storage::decode_chunk_into(hash, &self.values[i], len, &mut slot.bytes_mut()[..len])
                    .map_err(|e| e.to_string())?;
                Ok(Fill::Shared {
                    data: self.keep.insert_slot(&hash.0, slot, len),
                    stored: self.values[i].len() as u64,
                })
            }
        }
    }
}

/// Loads every chunk through the prefetch list of a fresh mapping; CPU µs per chunk.
fn run(src: Arc<Source>, chunks: u64) -> f64 {
    let len = (chunks * CHUNK) as usize;
    // SAFETY: a fresh anonymous private mapping with no address hint.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED, "mmap");
    let opts = ServerOptions {
        prefetch: (0..chunks).map(|c| ("b".into(), c * CHUNK)).collect(),
        background_fill: false,
        fill_threads: 1,
        ..Default::default()
    };
    let block = LazyBlock { idstr: "b".into(), host: host as usize, len: len as u64 };
    let mut server = PageServer::start(vec![block], src, opts, Box::new(|e| panic!("{e}"))).expect("start");
    assert!(server.wait_resident(Duration::from_secs(60)), "resident");
    // The loader adds its CPU time once it has left the list: after the last chunk landed.
    server.stop();
    let s = server.stats().snapshot();
    drop(server);
    // SAFETY: unmapping what was mapped above; the server (and its threads) are gone.
    unsafe { libc::munmap(host, len) };
    s.list_cpu_ms * 1e3 / s.chunks_prefetched as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let chunks: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1636);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let image = storage::bench::fill_image("touch", (chunks * CHUNK) as usize);
    let cache = ChunkCache::new(2 * image.len());
    let mut hashes = Vec::new();
    let mut values = Vec::new();
    for c in image.chunks(CHUNK as usize) {
        let h = storage::Hash::of(c);
        cache.insert(&h.0, c);
        values.push(storage::encode_chunk(c, 1).expect("encode"));
        hashes.push(h);
    }
    let (hashes, values) = (Arc::new(hashes), Arc::new(values));
    println!("| round | shared µs | copied µs | decoded µs | decoded+heap µs | decoded+slot µs |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in 0..rounds {
        let mut row = Vec::new();
        for way in [Way::Shared, Way::Copied, Way::Decoded, Way::DecodedHeap, Way::DecodedSlot] {
            let src = Source {
                way,
                cache: cache.clone(),
                hashes: (*hashes).clone(),
                values: (*values).clone(),
                heap: Mutex::new(Vec::new()),
                keep: ChunkCache::new(2 * image.len()),
            };
            row.push(run(Arc::new(src), chunks));
        }
        println!("| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |", r + 1, row[0], row[1], row[2], row[3], row[4]);
    }
}
