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
//! chunk, and slots rounded up to a power of two); and since sharing only pays while clones
//! fill at the same time, an owner can drop what has not been used for a while
//! ([`ChunkCache::evict_idle`]) so that an idle process gives the memory back.
//!
//! Entries live in slab slots (slab.rs says why: a fresh heap allocation per chunk cost more
//! than decompressing it). A reader that misses takes a slot ([`ChunkCache::slot`]), has the
//! store decompress and verify the chunk straight into it, and publishes it
//! ([`ChunkCache::insert_slot`]); only verified bytes are ever published. Slots of a pool
//! fill before a new slab is mapped, so the slabs never hold much more than the capacity.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::slab::{ChunkBytes, Pool, SlotMut};

const SHARDS: usize = 16;
/// Slot pools by size: 4 KiB << i, up to a slab (2 MiB).
const POOLS: usize = 10;

/// A cached chunk: its data, its LRU tick, its last use.
type Entry = (ChunkBytes, u64, Instant);

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
    pools: [OnceLock<Option<Arc<Pool>>>; POOLS],
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ChunkCache {
    /// A cache holding about `capacity` bytes of chunks.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(ChunkCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity: capacity / SHARDS,
            pools: Default::default(),
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
    pub fn get_shared(&self, hash: &[u8; 32]) -> Option<ChunkBytes> {
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

    fn pool(&self, len: usize) -> Option<&Arc<Pool>> {
        let class = len.max(4096).checked_next_power_of_two()?.trailing_zeros().checked_sub(12)? as usize;
        self.pools.get(class)?.get_or_init(|| Pool::for_len(4096 << class)).as_ref()
    }

    /// A slot for a chunk of `len` bytes to be read into and then published with
    /// [`ChunkCache::insert_slot`]; `None` if the cache would not keep such a chunk (larger
    /// than its share of the capacity, or no memory for a slab).
    pub fn slot(&self, len: usize) -> Option<SlotMut> {
        if len == 0 || len > self.shard_capacity {
            return None;
        }
        self.pool(len)?.take()
    }

    /// Keeps a copy of a verified chunk.
    pub fn insert(&self, hash: &[u8; 32], data: &[u8]) {
        let Some(mut slot) = self.slot(data.len()) else { return };
        slot.bytes_mut()[..data.len()].copy_from_slice(data);
        self.insert_slot(hash, slot, data.len());
    }

    /// Keeps the verified chunk of `len` bytes written into `slot` (from [`ChunkCache::slot`]);
    /// returns it, shared. If the cache already holds the chunk (another reader was first),
    /// the slot goes back and the held copy is returned.
    pub fn insert_slot(&self, hash: &[u8; 32], slot: SlotMut, len: usize) -> ChunkBytes {
        let data = slot.freeze(len);
        let mut evicted = Vec::new();
        let mut s = self.shard(hash);
        if let Some(e) = s.map.get(hash) {
            return e.0.clone();
        }
        s.tick += 1;
        let tick = s.tick;
        s.bytes += data.len();
        s.map.insert(*hash, (data.clone(), tick, Instant::now()));
        s.lru.insert(tick, *hash);
        while s.bytes > self.shard_capacity {
            let Some((_, victim)) = s.lru.pop_first() else { break };
            if let Some((d, _, _)) = s.map.remove(&victim) {
                s.bytes -= d.len();
                evicted.push(d);
            }
        }
        drop(s);
        // Their slots go back to the pool outside the shard's lock.
        drop(evicted);
        data
    }

    /// Drops every chunk not used for `idle`; returns the bytes dropped. Slabs left with no
    /// chunk in use are unmapped.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut freed = 0;
        let mut evicted = Vec::new();
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
                    evicted.push(d);
                }
            }
            if s.map.is_empty() {
                // Give the tables' own memory back too.
                s.map = HashMap::new();
            }
        }
        drop(evicted);
        for pool in self.pools.iter().filter_map(|p| p.get()).flatten() {
            pool.trim();
        }
        freed
    }

    /// Slabs mapped for entries (and slots being filled).
    pub fn slabs(&self) -> usize {
        self.pools.iter().filter_map(|p| p.get()).flatten().map(|p| p.slabs()).sum()
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
    fn chunks_read_into_slots_are_published_only_when_inserted_and_slabs_stay_bounded() {
        const CHUNK: usize = 64 << 10;
        // 4 MiB of capacity: 64 chunks, two slabs' worth.
        let c = ChunkCache::new(64 * CHUNK);
        let mut buf = vec![0u8; CHUNK];
        // A slot written but dropped (a read that failed its check) publishes nothing.
        let mut slot = c.slot(CHUNK).expect("slot");
        slot.bytes_mut().fill(0xaa);
        drop(slot);
        assert_eq!(c.get(&h(9), &mut buf), None);
        // 2000 distinct chunks through a cache of 64: each reads back its own bytes while
        // held, evicted slots are reused, and the slabs never pass the capacity by much.
        let mut held = Vec::new();
        for i in 0..2000u32 {
            let mut hash = [0u8; 32];
            hash[..4].copy_from_slice(&i.to_le_bytes());
            let mut slot = c.slot(CHUNK).expect("slot");
            slot.bytes_mut()[..CHUNK].fill(i as u8);
            slot.bytes_mut()[..4].copy_from_slice(&i.to_le_bytes());
            let data = c.insert_slot(&hash, slot, CHUNK);
            assert_eq!(data.len(), CHUNK);
            if i % 500 == 0 {
                held.push((i, data));
            }
            assert!(c.slabs() <= 4 + held.len(), "{} slabs after {i} chunks", c.slabs());
        }
        // Held chunks keep their bytes after the cache evicted them and reused other slots.
        for (i, data) in &held {
            assert_eq!(data[..4], i.to_le_bytes());
            assert!(data[4..].iter().all(|&x| x == *i as u8), "chunk {i} was overwritten");
        }
        // The same hash inserted twice: the first copy stays and is returned.
        let hash = [0xfe; 32];
        let mut a = c.slot(CHUNK).expect("slot");
        a.bytes_mut().fill(1);
        let mut b = c.slot(CHUNK).expect("slot");
        b.bytes_mut().fill(2);
        let first = c.insert_slot(&hash, a, CHUNK);
        let second = c.insert_slot(&hash, b, CHUNK);
        assert!(first.iter().chain(second.iter()).all(|&x| x == 1));
        // Idle eviction gives every slab back once nothing holds a chunk.
        drop((held, first, second));
        std::thread::sleep(Duration::from_millis(5));
        c.evict_idle(Duration::from_millis(1));
        assert_eq!(c.bytes(), 0);
        assert_eq!(c.slabs(), 0);
        assert!(c.slot(65 * CHUNK / SHARDS * SHARDS).is_none(), "larger than a shard's share: no slot");
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
