//! Ending a snapshot with `finish`: no page is left write-protected (asked of the page tables
//! through /proc/self/pagemap, and by writing every page from a thread with no fault thread
//! left to serve it), and the next snapshot on the kept registration protects and saves as a
//! fresh one does.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use super::super::super::block::RamBlock;
use super::super::tests::{block, CHUNK};
use super::super::{WpBlock, WpTestFaults, WriteProtect};

const PAGE: u64 = 4096;
/// `/proc/pid/pagemap`: the page (or its pte marker) is userfaultfd write-protected.
const PM_UFFD_WP: u64 = 1 << 57;

fn fill(b: &RamBlock, chunks: impl Iterator<Item = u64>, byte: u8) {
    for c in chunks {
        b.write(c * CHUNK, &vec![byte; CHUNK as usize]).expect("write");
    }
}

/// Pages of the block whose entry (or pte marker) carries the userfaultfd write-protect bit.
fn protected_pages(b: &RamBlock) -> u64 {
    let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
    let first = b.host_addr() as u64 / PAGE;
    let pages = b.used_length() / PAGE;
    let mut raw = vec![0u8; pages as usize * 8];
    pagemap.read_exact_at(&mut raw, first * 8).expect("read pagemap");
    raw.chunks_exact(8).filter(|e| u64::from_le_bytes((*e).try_into().expect("8 bytes")) & PM_UFFD_WP != 0).count()
        as u64
}

/// Fills every page of the block with `byte` from another thread; fails if a write hangs (a
/// protected page nobody serves).
fn write_every_page(b: &Arc<RamBlock>, byte: u8) {
    let (tx, rx) = std::sync::mpsc::channel();
    let b2 = b.clone();
    std::thread::spawn(move || {
        for p in 0..b2.used_length() / PAGE {
            b2.write(p * PAGE, &[byte; PAGE as usize]).expect("write");
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("a write hung: a page is still write-protected");
}

/// One snapshot of all `n` chunks: a thread rewrites every chunk with `after` while the saver
/// takes them; each saved chunk must hold `before(c)`. Returns the protection, all taken.
fn snapshot_all(wp: WriteProtect, b: &Arc<RamBlock>, n: u64, before: impl Fn(u64) -> u8, after: u8) -> WriteProtect {
    let writer = {
        let b = b.clone();
        std::thread::spawn(move || fill(&b, (0..n).rev(), after))
    };
    for c in 0..n {
        let mut buf = vec![0u8; CHUNK as usize];
        wp.take_chunk(0, c, &mut buf).expect("take");
        assert!(buf.iter().all(|&x| x == before(c)), "chunk {c} saved with bytes written after protection");
    }
    writer.join().expect("writer");
    assert!(wp.error().is_none());
    wp
}

#[test]
fn finish_leaves_no_page_protected_and_the_next_snapshot_on_the_kept_registration_saves_the_protect_point() {
    let n = 64;
    let b = block(n);
    // The first half written, the rest never touched (protected through pte markers).
    fill(&b, 0..n / 2, 0xaa);
    let all = || vec![WpBlock { block: b.clone(), chunks: (0..n).collect() }];
    let wp = WriteProtect::start(all(), CHUNK, 8 * CHUNK).expect("protect");
    assert_eq!(protected_pages(&b), n * CHUNK / PAGE, "start protects every page asked for");
    let wp = snapshot_all(wp, &b, n, |c| if c < n / 2 { 0xaa } else { 0 }, 0x55);
    let reg = wp.finish().expect("every chunk taken: the registration is kept");
    assert_eq!(reg.registered_bytes(), n * CHUNK);
    assert_eq!(protected_pages(&b), 0, "a page is still write-protected after finish");
    write_every_page(&b, 0x66);

    // Twice more on the kept registration: it protects, and saves the bytes of that moment.
    let mut reg = Some(reg);
    for (round, (before, after)) in [(0x66u8, 0x77u8), (0x77, 0x88)].into_iter().enumerate() {
        let wp = WriteProtect::start_on(reg.take(), all(), CHUNK, 8 * CHUNK, WpTestFaults::default())
            .expect("protect on the kept registration");
        assert_eq!(protected_pages(&b), n * CHUNK / PAGE, "round {round}: not protected on the kept registration");
        let wp = snapshot_all(wp, &b, n, |_| before, after);
        reg = Some(wp.finish().expect("kept again"));
        assert_eq!(protected_pages(&b), 0, "round {round}: a page is still write-protected after finish");
        let mut now = vec![0u8; CHUNK as usize];
        for c in 0..n {
            b.read(c * CHUNK, &mut now).expect("read");
            assert!(now.iter().all(|&x| x == after), "round {round}: chunk {c}: the write did not land");
        }
    }
    // Dropping the registration unregisters: still writable.
    drop(reg);
    write_every_page(&b, 1);
}

#[test]
fn finish_with_a_chunk_not_taken_lifts_all_protection_and_keeps_nothing() {
    let n = 16;
    let b = block(n);
    fill(&b, 0..n, 3);
    let wp = WriteProtect::start(vec![WpBlock { block: b.clone(), chunks: (0..n).collect() }], CHUNK, n * CHUNK)
        .expect("protect");
    for c in (0..n).filter(|&c| c != 5) {
        let mut buf = vec![0u8; CHUNK as usize];
        wp.take_chunk(0, c, &mut buf).expect("take");
    }
    assert_eq!(protected_pages(&b), CHUNK / PAGE, "only chunk 5 is still protected");
    assert!(wp.finish().is_none(), "a registration kept with chunk 5 still protected");
    assert_eq!(protected_pages(&b), 0);
    write_every_page(&b, 4);
}

#[test]
fn a_tracked_protection_on_the_kept_registration_arms_saves_and_finishes_clean() {
    let n = 32;
    let b = block(n);
    fill(&b, 0..n, 0x10);
    let blocks = || vec![WpBlock { block: b.clone(), chunks: (0..n).collect() }];
    let wp = WriteProtect::start(blocks(), CHUNK, n * CHUNK).expect("protect");
    let wp = snapshot_all(wp, &b, n, |_| 0x10, 0x20);
    let reg = wp.finish().expect("kept");
    // An incremental-like round: track every chunk, the guest writes some, arm with a subset.
    let wp = WriteProtect::start_tracking_on(Some(reg), blocks(), CHUNK, n * CHUNK, WpTestFaults::default())
        .expect("track on the kept registration");
    fill(&b, (0..n).step_by(3), 0x30);
    wp.retrack().expect("retrack");
    fill(&b, (0..n).step_by(4), 0x40);
    let want: Vec<u64> = (0..n).step_by(2).collect();
    let mut at_arm = Vec::new();
    for &c in &want {
        let mut v = vec![0u8; CHUNK as usize];
        b.read(c * CHUNK, &mut v).expect("read");
        at_arm.push(v);
    }
    wp.arm(std::slice::from_ref(&want)).expect("arm");
    assert_eq!(protected_pages(&b), want.len() as u64 * CHUNK / PAGE, "arm protects exactly the chunks wanted");
    fill(&b, 0..n, 0x50);
    for (i, &c) in want.iter().enumerate() {
        let mut buf = vec![0u8; CHUNK as usize];
        wp.take_chunk(0, c, &mut buf).expect("take");
        assert!(buf == at_arm[i], "chunk {c} saved with bytes other than those at arm");
    }
    // Chunks not wanted are DONE after arm, so finish keeps the registration.
    let reg = wp.finish().expect("kept after an armed round");
    assert_eq!(protected_pages(&b), 0);
    write_every_page(&b, 0x60);
    drop(reg);
}

#[test]
fn a_kept_registration_of_other_lengths_is_dropped_and_the_blocks_registered_anew() {
    let n = 8;
    let b = block(n);
    let other = block(n);
    let wp = WriteProtect::start(vec![WpBlock { block: other.clone(), chunks: (0..n).collect() }], CHUNK, n * CHUNK)
        .expect("protect");
    let wp = snapshot_all(wp, &other, n, |_| 0, 1);
    let reg = wp.finish().expect("kept");
    // Offered for another block: not used (the other block is unregistered), `b` registered.
    let wp = WriteProtect::start_on(
        Some(reg),
        vec![WpBlock { block: b.clone(), chunks: (0..n).collect() }],
        CHUNK,
        n * CHUNK,
        WpTestFaults::default(),
    )
    .expect("protect anew");
    assert_eq!(protected_pages(&b), n * CHUNK / PAGE);
    let wp = snapshot_all(wp, &b, n, |_| 0, 2);
    drop(wp.finish());
    write_every_page(&other, 3);
    write_every_page(&b, 3);
}
