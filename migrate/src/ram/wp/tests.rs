//! Write protection on a plain RAM block: writers from other threads wait for the fault
//! thread, and every chunk the saver takes holds the bytes of the moment protection started.

use std::sync::Arc;

use super::super::block::{RamBlock, RamBlockConfig};
use super::{WpBlock, WriteProtect};

const CHUNK: u64 = 64 * 1024;

fn block(chunks: u64) -> Arc<RamBlock> {
    Arc::new(
        RamBlock::new(RamBlockConfig {
            idstr: "ram".into(),
            size: chunks * CHUNK,
            max_size: 0,
            page_size: 0,
            resizeable: false,
        })
        .expect("block"),
    )
}

fn fill(b: &RamBlock, chunks: u64, byte: u8) {
    for c in 0..chunks {
        b.write(c * CHUNK, &vec![byte; CHUNK as usize]).expect("write");
    }
}

/// Protects all of a block whose first half is written (the rest never touched), lets a thread
/// rewrite every chunk while the saver takes them in order, and returns what the saver got.
fn run(broken: bool) -> (Vec<Vec<u8>>, Arc<RamBlock>) {
    let n = 64;
    let b = block(n);
    fill(&b, n / 2, 0xaa);
    let blocks = vec![WpBlock { block: b.clone(), chunks: (0..n).collect() }];
    // A buffer of eight chunks: the writer must wait for room at times.
    let wp = if broken {
        WriteProtect::start_broken_for_tests(blocks, CHUNK, 8 * CHUNK)
    } else {
        WriteProtect::start(blocks, CHUNK, 8 * CHUNK)
    }
    .expect("protect");
    // The last eight chunks are written before the saver starts (they fit in the buffer), so
    // they are certainly written before they are saved; the rest from the top down while the
    // saver runs, filling the buffer at times.
    let first = std::thread::spawn({
        let b = b.clone();
        move || {
            for c in (n - 8..n).rev() {
                b.write(c * CHUNK, &vec![0x55; CHUNK as usize]).expect("write");
            }
        }
    });
    first.join().expect("first writes");
    let writer = {
        let b = b.clone();
        std::thread::spawn(move || {
            for c in (0..n - 8).rev() {
                b.write(c * CHUNK, &vec![0x55; CHUNK as usize]).expect("write");
            }
        })
    };
    let mut saved = Vec::new();
    for c in 0..n {
        let mut buf = vec![0u8; CHUNK as usize];
        wp.take_chunk(0, c, &mut buf).expect("take");
        saved.push(buf);
    }
    writer.join().expect("writer");
    assert!(wp.error().is_none());
    drop(wp);
    (saved, b)
}

#[test]
fn every_saved_chunk_has_the_bytes_of_the_protect_point_and_the_writes_land() {
    let (saved, b) = run(false);
    for (c, chunk) in saved.iter().enumerate() {
        let want = if c < 32 { 0xaa } else { 0 };
        assert!(chunk.iter().all(|&x| x == want), "chunk {c} saved with the bytes written after protection");
    }
    let mut now = vec![0u8; CHUNK as usize];
    for c in 0..64 {
        b.read(c * CHUNK, &mut now).expect("read");
        assert!(now.iter().all(|&x| x == 0x55), "chunk {c}: the write did not land");
    }
    // Unprotected and unregistered: a write needs nobody now.
    b.write(0, &[1]).expect("write after");
}

#[test]
fn a_fault_thread_that_does_not_copy_first_is_caught() {
    let (saved, _) = run(true);
    let stale =
        saved.iter().enumerate().filter(|(c, chunk)| chunk.iter().any(|&x| x != if *c < 32 { 0xaa } else { 0 }));
    assert!(stale.count() > 0, "the broken protection should have let writes into saved chunks");
}

#[test]
fn dropping_it_early_lets_every_writer_through() {
    let n = 16;
    let b = block(n);
    let wp = WriteProtect::start(vec![WpBlock { block: b.clone(), chunks: (0..n).collect() }], CHUNK, CHUNK)
        .expect("protect");
    let writer = {
        let b = b.clone();
        std::thread::spawn(move || fill(&b, 16, 7))
    };
    // Nothing is taken; the buffer (one chunk) fills and the writer waits until the drop.
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(wp);
    writer.join().expect("writer");
    let mut now = vec![0u8; CHUNK as usize];
    b.read(15 * CHUNK, &mut now).expect("read");
    assert!(now.iter().all(|&x| x == 7));
}
