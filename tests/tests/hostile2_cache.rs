//! Hostile checks of the chunk cache's slab slots: many lazy restores of different snapshots
//! at once, all through one cache far smaller than what they read (every shard evicting all
//! the time, slots recycled while other restores place from theirs), each VM compared byte
//! for byte with its snapshot; afterwards idle eviction gives every slab back.

mod common;

use common::ram::assert_blocks_match;

use std::time::Duration;

use common::memfill::wait_lines;
use common::start_builtin;
use hypervisor::guests::{Builtin, MemfillMode};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveMode, SaveOptions};
use hypervisor::vm::{BuiltinParams, SharedOutput};

#[test]
fn concurrent_lazy_restores_of_different_snapshots_through_one_tiny_cache_hold_their_own_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let names: Vec<String> = (0..3).map(|i| format!("m{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let params = BuiltinParams { seed: 100 + i as u64, passes: 0, mode: MemfillMode::Fill, ..Default::default() };
        let (mut vm, out) = start_builtin(Builtin::Memfill, 64, params);
        wait_lines(&out, 1, Duration::from_secs(60));
        let opts = SaveOptions { mode: SaveMode::Stop, ..Default::default() };
        snapshot::save(&vm, &store, name, &opts, &|_| {}).expect("snapshot");
        vm.stop("taken");
    }
    // 16 shards of 128 KiB: two 64 KiB chunks a shard, against 3 x 64 MiB of chunks.
    let cache = migrate::lazy::ChunkCache::new(2 << 20);
    for round in 0..2 {
        std::thread::scope(|s| {
            for k in 0..6 {
                let (store, cache, name) = (&store, cache.clone(), names[k % names.len()].clone());
                s.spawn(move || {
                    let mut opts = RestoreOptions::new(RestoreMode::Lazy, Box::new(SharedOutput::default()));
                    opts.cache = Some(cache);
                    let (vm, _) = snapshot::restore(store, &name, opts).expect("restore");
                    assert!(snapshot::restore::wait_resident(&vm, Duration::from_secs(120)), "{name}: resident");
                    assert_eq!(vm.page_server().and_then(|p| p.error()), None, "{name}");
                    assert_blocks_match(&vm, store, &name, &format!("round {round}, restore {k} of {name}"));
                });
            }
        });
    }
    let (hits, misses) = cache.counters();
    eprintln!("cache hits {hits} misses {misses}");
    // Each restore reads most of its 64 MiB (1024 chunks) through the cache.
    assert!(misses > 6 * 500, "the restores did not go through the cache: {hits} hits, {misses} misses");
    assert!(cache.bytes() <= 2 << 20, "{} bytes cached", cache.bytes());
    std::thread::sleep(Duration::from_millis(20));
    cache.evict_idle(Duration::from_millis(1));
    assert_eq!(cache.bytes(), 0);
    assert_eq!(cache.slabs(), 0, "slabs left mapped once every VM is gone and the cache idle");
}
