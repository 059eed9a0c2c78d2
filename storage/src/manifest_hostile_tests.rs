//! Hostile manifests: random damage to an encoded manifest, its crc fixed so that the CBOR
//! and the chunk tables are what the decoder sees, is an error or decodes to a manifest that
//! passes validation; never a panic, and never a chunk table whose count disagrees with its
//! block's length.

use crate::pipeline::{put_pipelined, ChunkJob};
use crate::{BlockSpec, Manifest, Store, StoreOptions};

const CS: u64 = 4096;

#[test]
fn randomly_damaged_manifests_with_a_fixed_crc_never_panic_or_miscount() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store =
        Store::open_with(dir.path(), StoreOptions { chunk_size: CS as u32, ..Default::default() }).expect("open");
    let len = 40 * CS + 100;
    let spec = BlockSpec { idstr: "ram".into(), used_length: len, max_length: len, page_size: 4096, resizeable: false };
    let w = store.begin("m", vec![spec]).expect("begin");
    let jobs: Vec<ChunkJob> = (0..len.div_ceil(CS)).map(|i| ChunkJob { block: "ram".into(), offset: i * CS }).collect();
    let read = |_: &str, off: u64, buf: &mut [u8]| {
        // Every third chunk zero, the rest distinct.
        let i = off / CS;
        buf.iter_mut().enumerate().for_each(|(j, b)| *b = if i.is_multiple_of(3) { 0 } else { (i as u8) ^ (j as u8) });
        Ok(())
    };
    put_pipelined(&w, &jobs, 2, &read).expect("pipeline");
    let m = w.commit(b"state".to_vec()).expect("commit");
    let good = m.encode().expect("encode");
    assert_eq!(Manifest::decode(&good).expect("decode"), m);
    let header = 16;
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut ok, mut table_errors) = (0, 0);
    for round in 0..20_000 {
        let mut bad = good.clone();
        for _ in 0..=(rnd() % 4) {
            let at = header + (rnd() as usize) % (bad.len() - header);
            match rnd() % 3 {
                0 => bad[at] ^= 1 << (rnd() % 8),
                1 => bad[at] = rnd() as u8,
                _ => bad[at] = [0, 0xff, 0x40, 0x58, 0x59, 0x5a, 0x5b, 0x5f][(rnd() % 8) as usize],
            }
        }
        let crc = crc32fast::hash(&bad[header..]);
        bad[12..16].copy_from_slice(&crc.to_le_bytes());
        let r = Manifest::decode(&bad);
        if let Err(e) = &r {
            table_errors += usize::from(e.to_string().contains("chunk table"));
        }
        if let Ok(d) = r {
            ok += 1;
            for b in &d.blocks {
                let want = b.used_length.div_ceil(u64::from(d.chunk_size));
                assert_eq!(b.chunks.len() as u64, want, "round {round}: block {} decoded with a wrong count", b.idstr);
            }
        }
    }
    // The damage reached the chunk tables' parser, and some damage (in a hash) decodes.
    assert!(table_errors > 0 && ok > 0, "ok {ok}, chunk table errors {table_errors}");
}
