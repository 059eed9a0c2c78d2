//! The receive path's passes: frames read straight into the guest's chains, published
//! together in order, spilled across chains with `MRG_RXBUF`, and the dirty bitmap after a
//! pass.

use vm_memory::{Bytes, GuestAddress};

use super::features::*;
use super::test_util::*;

/// The frame as the guest must find it: the header's `num_buffers` set to `n`.
fn with_num_buffers(f: &[u8], n: u16) -> Vec<u8> {
    let mut f = f.to_vec();
    f[10..12].copy_from_slice(&n.to_le_bytes());
    f
}

fn guest_bytes(r: &Rig, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    r.mem.read_slice(&mut b, GuestAddress(addr)).expect("read");
    b
}

/// A pass publishes its frames together and in order: the used index moves once, after every
/// frame and used entry of the pass is in place (the backend looks at it before each read).
#[test]
fn rx_pass_publishes_its_frames_together_in_order() {
    let mut r = rig();
    r.init(VERSION_1 | MAC);
    r.enable_msix();
    r.routes.take();
    for i in 0..4u16 {
        r.add(RXQ, &[(BUF + 0x800 * u64::from(i), 2048, WRITE, 0)], i);
    }
    let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(100 + 300 * i, i as u8)).collect();
    for f in &frames {
        r.net.push_rx(f.clone());
    }
    let (block, used_idx) = (r.block.clone(), layout(RXQ).2 + 2);
    *r.net.probe.lock().expect("lock") = Some(Box::new(move || {
        let mut b = [0u8; 2];
        block.read(used_idx, &mut b).expect("used idx");
        u16::from_le_bytes(b)
    }));
    assert_eq!(r.core().process_rx(), 4);
    assert_eq!(
        *r.net.probed.lock().expect("lock"),
        vec![0; 5],
        "the used index seen at each read of the pass (four frames and the empty read)"
    );
    let want: Vec<(u32, u32)> = frames.iter().enumerate().map(|(i, f)| (i as u32, f.len() as u32)).collect();
    assert_eq!(r.used(RXQ), (4, want), "every frame, in order");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(guest_bytes(&r, BUF + 0x800 * i as u64, f.len()), with_num_buffers(f, 1), "frame {i}");
    }
    assert_eq!(r.routes.take(), vec![1], "one interrupt for the pass");
    assert_eq!(r.core().queues[0].queue.as_ref().map(virtio_queue::QueueT::next_used), Some(4));
}

/// A frame is read from the backend straight into the chain's buffers (header and data
/// descriptors, as iPXE posts them), with the bounce buffer only as the last entry.
#[test]
fn rx_frames_are_read_straight_into_the_chain() {
    let r = rig();
    r.init(VERSION_1 | MAC);
    r.add(RXQ, &[(BUF, 12, WRITE | NEXT, 1), (BUF + 0x1000, 1514, WRITE, 0)], 0);
    let f = frame(1000, 4);
    r.net.push_rx(f.clone());
    assert_eq!(r.core().process_rx(), 1);
    let reads = r.net.iov_reads.lock().expect("lock").clone();
    assert!(!reads.is_empty(), "the device read through read_frame_iov");
    let first = &reads[0];
    assert_eq!(first[..2], [12, 1514], "the chain's buffers come first: {first:?}");
    assert_eq!(first.len(), 3, "then only the bounce buffer's tail: {first:?}");
    assert!(first[2] >= super::core::MAX_FRAME - 1526, "the tail takes any frame: {first:?}");
    assert_eq!(guest_bytes(&r, BUF, 12), with_num_buffers(&f[..12], 1));
    assert_eq!(guest_bytes(&r, BUF + 0x1000, f.len() - 12), f[12..]);
    assert_eq!(r.used(RXQ), (1, vec![(0, f.len() as u32)]));
}

/// With MRG_RXBUF, a frame longer than the first chain spills out of the direct read and is
/// delivered across as many chains as it needs; the next frame goes straight into the next
/// chain again, and the order holds.
#[test]
fn rx_frame_longer_than_the_first_chain_spans_chains_with_mrg_rxbuf() {
    let r = rig();
    r.init(ALL);
    // Chain 0: 1000 bytes; chain 1: two descriptors of 600; chain 2: 2048.
    r.add(RXQ, &[(BUF, 1000, WRITE, 0)], 0);
    r.add(RXQ, &[(BUF + 0x1000, 600, WRITE | NEXT, 2), (BUF + 0x2000, 600, WRITE, 0)], 1);
    r.add(RXQ, &[(BUF + 0x3000, 2048, WRITE, 0)], 3);
    let big = frame(2000, 6);
    let small = frame(100, 7);
    r.net.push_rx(big.clone());
    r.net.push_rx(small.clone());
    assert_eq!(r.core().process_rx(), 2);
    assert_eq!(r.iov_first_lengths(), vec![1000, 2048], "both frames were first read into their first chain");
    assert_eq!(r.used(RXQ), (3, vec![(0, 1000), (1, 1012), (3, small.len() as u32)]));
    let big_hdr = with_num_buffers(&big, 2);
    assert_eq!(guest_bytes(&r, BUF, 1000), big_hdr[..1000], "chain 0, num_buffers 2");
    assert_eq!(guest_bytes(&r, BUF + 0x1000, 600), big[1000..1600]);
    assert_eq!(guest_bytes(&r, BUF + 0x2000, 412), big[1600..]);
    assert_eq!(guest_bytes(&r, BUF + 0x3000, small.len()), with_num_buffers(&small, 1));
    assert!(r.dev.error().is_none());
}

/// After a pass the blocks' dirty bitmap holds exactly the pages the frames were written to
/// (a buffer across a page boundary: both pages; the unwritten rest of a long buffer: not)
/// and the used ring's page, nothing else.
#[test]
fn rx_dirty_bitmap_after_a_pass_is_exactly_the_pages_written() {
    let r = rig();
    r.init(VERSION_1 | MAC);
    let bufs = [(BUF + 0x5000, 2048u32), (BUF + 0x5800, 2048), (BUF + 0x9f00, 2048), (BUF + 0xd000, 0x2000)];
    for (i, &(a, l)) in bufs.iter().enumerate() {
        r.add(RXQ, &[(a, l, WRITE, 0)], i as u16);
    }
    // The first pass sets VRING_USED_F_NO_NOTIFY (the used ring's page) on an empty backend.
    r.core().process_rx();
    r.block.take_dirty();
    for (i, len) in [100, 200, 1000, 100].into_iter().enumerate() {
        r.net.push_rx(frame(len, i as u8));
    }
    assert_eq!(r.core().process_rx(), 4);
    let page = |a: u64| a / r.block.page_size();
    let mut want = vec![page(BUF + 0x5000), page(BUF + 0x9f00), page(BUF + 0xa000), page(BUF + 0xd000)];
    want.push(page(layout(RXQ).2));
    want.sort();
    assert_eq!(r.block.take_dirty(), want);
}

/// Bad receive chains are still device errors, never panics, and frames of the pass before
/// the bad chain are published.
#[test]
fn rx_bad_chain_after_good_frames_is_a_device_error() {
    for (what, bad, needle) in [
        ("outside RAM", (RAM - 8, 100, WRITE, 0), "outside guest RAM"),
        ("read-only", (BUF + 0x2000, 100, 0, 0), "device-readable"),
        ("loop", (BUF + 0x2000, 100, WRITE | NEXT, 1), "loops"),
    ] {
        let r = rig();
        r.init(VERSION_1 | MAC);
        r.add(RXQ, &[(BUF, 2048, WRITE, 0)], 0);
        r.add(RXQ, &[bad], 1);
        r.net.push_rx(frame(100, 1));
        r.net.push_rx(frame(100, 2));
        r.core().process_rx();
        let err = r.dev.error().unwrap_or_else(|| panic!("{what}: no error"));
        assert!(err.contains(needle) && err.starts_with("receive queue 0"), "{what}: {err}");
        assert_eq!(r.used(RXQ), (1, vec![(0, 112)]), "{what}: the good frame is published");
    }
}

impl Rig {
    /// The first entry's length of every scattered read so far.
    fn iov_first_lengths(&self) -> Vec<usize> {
        self.net.iov_reads.lock().expect("lock").iter().filter_map(|v| v.first().copied()).collect()
    }
}

/// With MSI-X disabled (netping, CPL3 guests) a receive pass raises the VM's interrupt line
/// instead of a vector, and only when the driver has not suppressed the interrupt
/// (`VRING_AVAIL_F_NO_INTERRUPT`): the driver that waits for it is woken, the one that polls
/// costs nothing.
#[test]
fn rx_without_msix_raises_the_interrupt_line_unless_suppressed() {
    use std::sync::atomic::Ordering;
    let r = rig();
    r.init(VERSION_1 | MAC);
    let lines = || r.routes.lines.load(Ordering::SeqCst);
    for i in 0..2u16 {
        r.add(RXQ, &[(BUF + 0x1000 * u64::from(i), 2048, WRITE, 0)], i);
    }
    r.set_avail_flags(RXQ, 1);
    r.net.push_rx(frame(100, 1));
    assert_eq!(r.core().process_rx(), 1);
    assert_eq!(lines(), 0, "the driver suppressed the interrupt");
    r.set_avail_flags(RXQ, 0);
    r.net.push_rx(frame(100, 2));
    assert_eq!(r.core().process_rx(), 1);
    assert_eq!(lines(), 1, "one pass, one raise");
    assert!(r.routes.take().is_empty(), "no MSI-X vector fired");
}
