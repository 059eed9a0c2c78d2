//! Write protection on a plain RAM block: writers from other threads wait for the fault
//! thread, and every chunk the saver takes holds the bytes of the moment protection started.

use std::sync::Arc;

use super::super::block::{RamBlock, RamBlockConfig};
use super::{WpBlock, WpTestFaults, WriteProtect};

pub(super) const CHUNK: u64 = 64 * 1024;

pub(super) fn block(chunks: u64) -> Arc<RamBlock> {
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

/// Pre-protection: tracks a block while a writer rewrites it (one `retrack` round between
/// two passes, the second over every other chunk, so those are re-dirtied at `arm`), arms it
/// with the writer stopped (the pause), then lets the writer rewrite every chunk while the
/// saver takes them. Returns what the saver got and the memory at `arm`.
fn run_tracked(test: WpTestFaults) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, super::WpStats) {
    let n = 64;
    let b = block(n);
    fill(&b, n / 2, 0xaa);
    let blocks = vec![WpBlock { block: b.clone(), chunks: (0..n).collect() }];
    let wp = WriteProtect::start_tracking_with_faults(blocks, CHUNK, n * CHUNK, test).expect("track");
    let write_all = |chunks: Vec<u64>, byte: u8| {
        let b = b.clone();
        std::thread::spawn(move || {
            for c in chunks {
                b.write(c * CHUNK, &vec![byte; CHUNK as usize]).expect("write");
            }
        })
        .join()
        .expect("writer");
    };
    write_all((0..n).collect(), 0x11);
    // The fault thread unprotects a chunk (waking its writer) before it marks it: the last
    // marks may land just after the writer is done, so a round may miss them; the next gets
    // them. Every chunk written once, so exactly `n` in all.
    let (mut retracked, mut rounds) = (0, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while retracked < n && std::time::Instant::now() < deadline {
        retracked += wp.retrack().expect("retrack");
        rounds += 1;
    }
    assert_eq!(retracked, n, "every chunk was written once since tracking started");
    assert_eq!(wp.stats().track_rounds, rounds);
    write_all((0..n).step_by(2).collect(), 0x22);
    // The pause: nothing writes; memory now is what the snapshot must hold.
    let mut at_arm = Vec::new();
    for c in 0..n {
        let mut v = vec![0u8; CHUNK as usize];
        b.read(c * CHUNK, &mut v).expect("read");
        at_arm.push(v);
    }
    wp.arm(&[(0..n).collect()]).expect("arm");
    // Every chunk rewritten before the saver starts (the buffer holds them all).
    write_all((0..n).collect(), 0x55);
    let mut saved = Vec::new();
    for c in 0..n {
        let mut buf = vec![0u8; CHUNK as usize];
        wp.take_chunk(0, c, &mut buf).expect("take");
        saved.push(buf);
    }
    assert!(wp.error().is_none());
    let stats = wp.stats();
    drop(wp);
    (saved, at_arm, stats)
}

#[test]
fn a_tracked_then_armed_protection_saves_the_bytes_at_arm() {
    let (saved, at_arm, stats) = run_tracked(WpTestFaults::default());
    for (c, (s, a)) in saved.iter().zip(&at_arm).enumerate() {
        assert!(s == a, "chunk {c} saved with bytes other than those at arm");
    }
    assert_eq!(stats.retracked_chunks, 64, "{stats:?}");
    assert_eq!(stats.armed_chunks, 32, "the chunks written after the last retrack are protected at arm");
    assert!(stats.track_faults >= 64 + 32, "{stats:?}");
}

#[test]
fn an_arm_that_leaves_redirtied_chunks_writable_is_caught() {
    let (saved, at_arm, _) = run_tracked(WpTestFaults { arm_skips_redirtied: true, ..Default::default() });
    let stale = saved.iter().zip(&at_arm).filter(|(s, a)| s != a).count();
    assert!(stale > 0, "the broken arm should have let writes into chunks it should have protected");
}

#[test]
fn a_fault_thread_failing_while_tracking_leaves_nothing_protected_and_arm_fails() {
    let n = 16;
    let b = block(n);
    let wp = WriteProtect::start_tracking_with_faults(
        vec![WpBlock { block: b.clone(), chunks: (0..n).collect() }],
        CHUNK,
        CHUNK,
        WpTestFaults { fail_on_track_fault: true, ..Default::default() },
    )
    .expect("track");
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let b = b.clone();
        std::thread::spawn(move || {
            fill(&b, 16, 9);
            let _ = tx.send(());
        });
    }
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("a writer was left blocked after the fault thread failed");
    assert!(wp.retrack().is_err(), "retrack must report the fault thread's failure");
    assert!(wp.arm(&[(0..n).collect()]).is_err(), "arm must report the fault thread's failure");
    // Still nothing protected after those calls, with the protection still alive.
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let b = b.clone();
        std::thread::spawn(move || {
            fill(&b, 16, 10);
            let _ = tx.send(());
        });
    }
    rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a write blocked after retrack/arm failed");
    drop(wp);
}
