//! Damage to a stored chunk, put right again on demand.

use storage::ChunkRef;

/// Corrupts the stored chunk of `name`'s pc.ram at `offset` (flips a byte in its pack);
/// returns a closure that puts the byte back.
pub fn damage(store: &storage::Store, name: &str, offset: u64) -> impl Fn() {
    let m = store.manifest(name).expect("manifest");
    let ChunkRef::Stored(hash) = m.block("pc.ram").expect("pc.ram").chunks[(offset / u64::from(m.chunk_size)) as usize]
    else {
        panic!("the chunk at {offset:#x} holds data");
    };
    let loc = store.debug_chunk_location(&hash).expect("location").expect("indexed");
    let path = store.debug_pack_path(loc.pack);
    let at = (loc.offset + u64::from(loc.len) / 2) as usize;
    let flip = move || {
        let mut pack = std::fs::read(&path).expect("pack");
        pack[at] ^= 0xff;
        std::fs::write(&path, &pack).expect("write pack");
    };
    flip();
    flip
}
