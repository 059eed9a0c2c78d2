//! A cache of decompressed chunks shared by every lazy restore in a process, keyed by content
//! hash: when many clones of one snapshot restore at once, each chunk is read and
//! decompressed once and copied into every clone from memory afterwards.
//!
//! Sharded by the hash's first byte so that clones faulting at once rarely meet on a lock;
//! each shard evicts its least recently used chunks beyond its share of the capacity. Entries
//! are verified chunks (the store checks the hash before decompressed bytes leave it), so a
//! hit is as trustworthy as a read.
//!
//! Bounds: at most `capacity` bytes of chunk data (plus about 100 bytes of bookkeeping per
//! chunk); and since sharing only pays while clones fill at the same time, an owner can drop
//! what has not been used for a while ([`ChunkCache::evict_idle`]) so that an idle process
//! gives the memory back.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

const SHARDS: usize = 16;

/// A cached chunk: its data, its LRU tick, its last use.
type Entry = (Arc<[u8]>, u64, Instant);

#[derive(Default)]
struct Shard {
    map: HashMap<[u8; 32], Entry>,
    lru: BTreeMap<u64, [u8; 32]>,
    bytes: usize,
    tick: u64,
}

/// Decompressed chunks by content hash, bounded in bytes.
pub struct ChunkCache {
    shards: Vec<Mutex<Shard>>,
    shard_capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ChunkCache {
    /// A cache holding about `capacity` bytes of chunks.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(ChunkCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity: capacity / SHARDS,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    fn shard(&self, hash: &[u8; 32]) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[usize::from(hash[0]) % SHARDS].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Copies the chunk into `buf` if cached; returns its length.
    pub fn get(&self, hash: &[u8; 32], buf: &mut [u8]) -> Option<usize> {
        let data = self.get_shared(hash)?;
        if data.len() > buf.len() {
            return None;
        }
        buf[..data.len()].copy_from_slice(&data);
        Some(data.len())
    }

    /// The cached chunk itself, if cached: a reference to the entry's bytes rather than a copy
    /// (a lazy restore places them straight from here).
    pub fn get_shared(&self, hash: &[u8; 32]) -> Option<Arc<[u8]>> {
        let data = {
            let mut s = self.shard(hash);
            s.tick += 1;
            let tick = s.tick;
            let (data, old) = match s.map.get_mut(hash) {
                Some(e) => {
                    let old = e.1;
                    e.1 = tick;
                    e.2 = Instant::now();
                    (e.0.clone(), old)
                }
                None => {
                    drop(s);
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            };
            s.lru.remove(&old);
            s.lru.insert(tick, *hash);
            data
        };
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(data)
    }

    /// Keeps a copy of a verified chunk.
    pub fn insert(&self, hash: &[u8; 32], data: &[u8]) {
        if data.len() > self.shard_capacity {
            return;
        }
        let mut s = self.shard(hash);
        if s.map.contains_key(hash) {
            return;
        }
        s.tick += 1;
        let tick = s.tick;
        s.bytes += data.len();
        s.map.insert(*hash, (Arc::from(data), tick, Instant::now()));
        s.lru.insert(tick, *hash);
        while s.bytes > self.shard_capacity {
            let Some((_, victim)) = s.lru.pop_first() else { break };
            if let Some((d, _, _)) = s.map.remove(&victim) {
                s.bytes -= d.len();
            }
        }
    }

    /// Drops every chunk not used for `idle`; returns the bytes dropped.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut freed = 0;
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // The LRU order is the order of last use: stop at the first recent one.
            while let Some((&tick, hash)) = s.lru.first_key_value() {
                let hash = *hash;
                match s.map.get(&hash) {
                    Some((_, _, used)) if now.duration_since(*used) < idle => break,
                    _ => {}
                }
                s.lru.remove(&tick);
                if let Some((d, _, _)) = s.map.remove(&hash) {
                    s.bytes -= d.len();
                    freed += d.len();
                }
            }
            if s.map.is_empty() {
                // Give the tables' own memory back too.
                s.map = HashMap::new();
            }
        }
        freed
    }

    /// (hits, misses) so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> [u8; 32] {
        let mut x = [0u8; 32];
        x[0] = i;
        x[1] = i.wrapping_mul(7);
        x
    }

    #[test]
    fn hits_misses_and_eviction() {
        let c = ChunkCache::new(SHARDS * 100);
        let mut buf = [0u8; 64];
        assert_eq!(c.get(&h(1), &mut buf), None);
        c.insert(&h(1), &[1; 60]);
        assert_eq!(c.get(&h(1), &mut buf), Some(60));
        assert_eq!(buf[..60], [1; 60]);
        // Same shard (first byte 1 + 16): over its 100-byte share, the older entry goes.
        c.insert(&h(17), &[2; 60]);
        assert_eq!(c.get(&h(1), &mut buf), None);
        assert_eq!(c.get(&h(17), &mut buf), Some(60));
        assert_eq!(c.counters(), (2, 2));
        assert!(c.bytes() <= SHARDS * 100);
        c.insert(&h(3), &[0; 1000]);
        assert_eq!(c.get(&h(3), &mut buf), None, "larger than a shard: not kept");
    }

    #[test]
    fn idle_chunks_are_dropped() {
        let c = ChunkCache::new(SHARDS * 100);
        let mut buf = [0u8; 64];
        c.insert(&h(1), &[1; 60]);
        c.insert(&h(2), &[2; 60]);
        assert_eq!(c.evict_idle(Duration::from_secs(60)), 0, "recently used: kept");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.get(&h(2), &mut buf), Some(60));
        assert_eq!(c.evict_idle(Duration::from_millis(20)), 60, "only the idle one goes");
        assert_eq!(c.get(&h(1), &mut buf), None);
        assert_eq!(c.get(&h(2), &mut buf), Some(60));
        assert_eq!(c.bytes(), 60);
    }
}
