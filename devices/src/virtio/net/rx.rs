//! The receive path: frames from the backend into the receive queue (queue 0).
//!
//! A pass ([`Core::process_rx`]) moves up to [`BATCH`] frames and then publishes them
//! together. Per frame, the device takes the next available chain, checks it (see
//! [`queues`](super::queues)), translates its descriptors to host addresses and reads the
//! frame from the backend *straight into them* (`readv` on a tap: the kernel's copy is the
//! only one), with the device's bounce buffer as one more entry at the end. A frame that fits
//! the chain is done: the device writes the header's `num_buffers` (1) and notes the used
//! entry. A frame longer than the chain spills into the bounce buffer; the device copies the
//! chain's part back in front of it, puts the chain back, and delivers the whole frame from
//! the bounce buffer like a frame read with no buffer available: across as many chains as it
//! needs with `MRG_RXBUF` (`num_buffers` says how many), dropped without (the chain stays for
//! the next frame). With no chain available the frame is read into the bounce buffer and
//! waits there; the receive queue is marked starved and the I/O thread stops polling the
//! backend until the driver notifies the queue.
//!
//! End of a pass, in this order: the pages the frames were written to are marked dirty (one
//! mark per page run, not one per write), the used entries are written and the used index is
//! stored once (release), the used ring's written bytes are marked dirty, and the driver is
//! signalled at most once. Every mark comes after the write it covers (a snapshot that reads
//! the bitmap in between copies the page again later), and all of it happens under the
//! device mutex, which a snapshot's final pass waits for ([`VirtioNet::pause`]). Memory the
//! backend wrote into a chain that is then put back (a dropped or spilled frame) is marked
//! too: guest memory changed.
//!
//! `VRING_USED_F_NO_NOTIFY` is set once while buffers last (not on every pass, which would
//! store to guest RAM and dirty the used ring's page on every wake-up), and cleared when the
//! device runs out.
//!
//! [`VirtioNet::pause`]: super::VirtioNet::pause

use std::io::ErrorKind;
use std::sync::atomic::{AtomicU16, Ordering};

use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap as _;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _, MemoryRegionAddress};

use super::core::{Core, MAX_FRAME, RX};
use super::features::MRG_RXBUF;
use super::queues::BATCH;
use crate::net::VNET_HDR_LEN;
use migrate::ram::TrackedMemory;

/// Where `num_buffers` is in the 12-byte `virtio_net_hdr_v1`.
const NUM_BUFFERS_AT: usize = 10;

/// Most entries one `readv` takes (Linux's `UIO_MAXIOV`): a chain needing more (and the
/// bounce buffer) is received through the bounce buffer.
const MAX_IOV: usize = 1024;

/// A pass's working memory, kept in the [`Core`] so that a pass allocates nothing.
#[derive(Default)]
pub struct RxScratch {
    /// The chain being filled: (guest address, length) per descriptor.
    descs: Vec<(u64, u32)>,
    /// Its host ranges, then the bounce buffer's tail.
    iov: IoVecs,
    /// Used entries of the pass, in order: (head, bytes written).
    used: Vec<(u16, u32)>,
    /// Guest ranges the backend wrote this pass: (address, length).
    written: Vec<(u64, u64)>,
}

/// `iovec`s into guest memory and the bounce buffer. They are built, used by one read and
/// cleared within one call, under the device mutex.
#[derive(Default)]
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the raw pointers are only dereferenced (by the kernel or the default backend copy)
// during the call that built them, by the thread that holds the device mutex; between calls
// the vector holds nothing that is used.
unsafe impl Send for IoVecs {}

/// What became of a frame in the bounce buffer.
pub(super) enum RxOutcome {
    Delivered,
    NoBuffers,
    Dropped,
}

/// What a direct read into the next chain did.
enum Direct {
    /// A frame is in the chain, its used entry noted.
    Delivered,
    /// The backend had no frame (or a bad one, dropped): the chain is back in the ring.
    Empty,
    Dropped,
    /// Interrupted: try again.
    Again,
    /// The frame is in the bounce buffer (`rx_pending`), the chain back in the ring.
    InBounce,
    /// No chain available (nothing was read).
    NoBuffers,
    /// The chain cannot be read into directly: use the bounce buffer.
    UseBounce,
    /// The backend failed (logged); the pass ends.
    Failed,
}

/// Host ranges of guest `gpa..gpa+len`, appended to `out`; an error names the address.
fn host_ranges(mem: &TrackedMemory, gpa: u64, len: u64, out: &mut Vec<libc::iovec>) -> Result<(), String> {
    let (mut at, mut left) = (gpa, len);
    while left > 0 {
        let r = mem.find_region(GuestAddress(at)).ok_or_else(|| format!("buffer at {at:#x} is outside guest RAM"))?;
        let off = at - r.start_addr().0;
        let n = left.min(r.len() - off);
        let p = r.get_host_address(MemoryRegionAddress(off)).map_err(|e| format!("buffer at {at:#x}: {e}"))?;
        out.push(libc::iovec { iov_base: p.cast(), iov_len: n as usize });
        left -= n;
        at += n;
    }
    Ok(())
}

/// One host pointer for guest `gpa..gpa+len` when it lies in one region.
fn host_span(mem: &TrackedMemory, gpa: u64, len: u64) -> Option<*mut u8> {
    let r = mem.find_region(GuestAddress(gpa))?;
    let off = gpa - r.start_addr().0;
    (r.len() - off >= len).then(|| r.get_host_address(MemoryRegionAddress(off)).ok())?
}

/// Marks guest `gpa..gpa+len` dirty in the RAM blocks behind it.
fn mark_written(mem: &TrackedMemory, gpa: u64, len: u64) {
    let (mut at, mut left) = (gpa, len);
    while left > 0 {
        let Some(r) = mem.find_region(GuestAddress(at)) else { return };
        let off = at - r.start_addr().0;
        let n = left.min(r.len() - off);
        r.bitmap().mark_dirty(off as usize, n as usize);
        left -= n;
        at += n;
    }
}

/// Notes the first `n` bytes of the chain `descs` as written (for the dirty marks).
fn note_written(descs: &[(u64, u32)], mut n: usize, written: &mut Vec<(u64, u64)>) {
    for &(addr, len) in descs {
        if n == 0 {
            break;
        }
        let k = (len as usize).min(n);
        match written.last_mut() {
            // Adjacent to the last range (a chain's buffers back to back): one range.
            Some((a, l)) if *a + *l == addr => *l += k as u64,
            _ => written.push((addr, k as u64)),
        }
        n -= k;
    }
}

/// Copies `bytes` to offset `at` of the memory `iov` describes (in order).
///
/// # Safety
///
/// Every entry of `iov` must be valid for writes of its length, and not overlap `bytes`.
unsafe fn scatter(iov: &[libc::iovec], mut at: usize, bytes: &[u8]) {
    let mut done = 0;
    for v in iov {
        if done == bytes.len() {
            return;
        }
        if at >= v.iov_len {
            at -= v.iov_len;
            continue;
        }
        let k = (v.iov_len - at).min(bytes.len() - done);
        // SAFETY: `at + k <= iov_len`, valid for writes by the caller's guarantee; the source
        // is inside `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().add(done), v.iov_base.cast::<u8>().add(at), k) };
        done += k;
        at = 0;
    }
}

/// Copies the first `dst.len()` bytes of the memory `iov` describes into `dst`.
///
/// # Safety
///
/// Every entry of `iov` must be valid for reads of its length, and not overlap `dst`.
unsafe fn gather(iov: &[libc::iovec], dst: &mut [u8]) {
    let mut done = 0;
    for v in iov {
        if done == dst.len() {
            return;
        }
        let k = v.iov_len.min(dst.len() - done);
        // SAFETY: `k <= iov_len`, valid for reads by the caller's guarantee; the destination
        // is inside `dst`.
        unsafe { std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), dst.as_mut_ptr().add(done), k) };
        done += k;
    }
}

impl Core {
    /// Moves frames from the backend into the receive queue until the backend has none, the
    /// queue has no buffers, or [`BATCH`] frames moved (the backend's fd, polled
    /// level-triggered, brings the thread back for the rest), then publishes them (see the
    /// module doc). Returns the frames delivered.
    pub fn process_rx(&mut self) -> usize {
        if !self.running() || self.queues[RX].queue.is_none() {
            return 0;
        }
        // While the device has buffers, the driver need not tell it about new ones: no
        // notification (an exit for the vCPU) per refilled buffer. Re-enabled when it runs out.
        if !self.rx_starved && !self.rx_notify_off {
            if let Err(e) = self.rx_notifications(false) {
                self.fail(RX, &e);
                return 0;
            }
        }
        self.rx_scratch.used.clear();
        self.rx_scratch.written.clear();
        let mut delivered = 0;
        let mut problem = None;
        let mut n = 0;
        while n < BATCH {
            n += 1;
            if self.rx_pending == 0 {
                match self.receive_direct() {
                    Ok(Direct::Delivered) => {
                        delivered += 1;
                        continue;
                    }
                    Ok(Direct::Dropped) => {
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(Direct::Again) => continue,
                    Ok(Direct::Empty | Direct::Failed) => break,
                    Ok(Direct::InBounce) => {}
                    Ok(Direct::NoBuffers | Direct::UseBounce) => {
                        if !self.read_into_bounce() {
                            break;
                        }
                    }
                    Err(p) => {
                        problem = Some(p);
                        break;
                    }
                }
                if self.rx_pending == 0 {
                    // Dropped while reading into the bounce buffer.
                    continue;
                }
            }
            match self.deliver() {
                Ok(RxOutcome::Delivered) => {
                    delivered += 1;
                    self.rx_pending = 0;
                }
                Ok(RxOutcome::Dropped) => {
                    self.stats.rx_dropped += 1;
                    self.rx_pending = 0;
                }
                Ok(RxOutcome::NoBuffers) => match self.rx_notifications(true) {
                    // Buffers came while notifications were off: take them.
                    Ok(true) => continue,
                    Ok(false) => {
                        self.rx_starved = true;
                        break;
                    }
                    Err(e) => {
                        problem = Some(e);
                        break;
                    }
                },
                Err(p) => {
                    problem = Some(p);
                    break;
                }
            }
        }
        if let Err(p) = self.publish_rx() {
            problem.get_or_insert(p);
        }
        if let Some(p) = problem {
            self.fail(RX, &p);
        }
        if delivered > 0 {
            self.stats.rx_frames += delivered as u64;
            self.stats.rx_batches += 1;
            self.notify_used(RX);
        }
        delivered
    }

    /// Reads one frame into the bounce buffer (`rx_pending`); false when the pass should end
    /// (no frame, or the backend failed). A frame of a bad length is dropped (`rx_pending`
    /// stays 0, true).
    fn read_into_bounce(&mut self) -> bool {
        loop {
            match self.backend.read_frame(&mut self.rx_buf) {
                Ok(n) if (VNET_HDR_LEN..=MAX_FRAME).contains(&n) => {
                    self.rx_pending = n;
                    return true;
                }
                Ok(n) => {
                    self.stats.rx_dropped += 1;
                    tracing::debug!("{}: dropped a {n}-byte frame from {}", self.name, self.backend.name());
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.stats.rx_empty_reads += 1;
                    return false;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("{}: reading {}: {e}", self.name, self.backend.name());
                    return false;
                }
            }
        }
    }

    /// Takes the next chain and reads a frame from the backend straight into it.
    fn receive_direct(&mut self) -> Result<Direct, String> {
        let Some(start) = self.queues[RX].queue.as_ref().map(|q| q.next_avail()) else {
            return Ok(Direct::NoBuffers);
        };
        let mut s = std::mem::take(&mut self.rx_scratch);
        let r = self.receive_into_chain(start, &mut s);
        s.iov.0.clear();
        self.rx_scratch = s;
        r
    }

    fn receive_into_chain(&mut self, start: u16, s: &mut RxScratch) -> Result<Direct, String> {
        let Some(head) = self.pop_into(RX, &mut s.descs)? else { return Ok(Direct::NoBuffers) };
        let rewind = |c: &mut Core| {
            if let Some(q) = c.queues[RX].queue.as_mut() {
                q.set_next_avail(start);
            }
        };
        let iov = &mut s.iov.0;
        iov.clear();
        let mut cap = 0u64;
        for &(addr, len) in &s.descs {
            host_ranges(&self.mem, addr, u64::from(len), iov).map_err(|e| format!("chain at head {head}: {e}"))?;
            cap += u64::from(len);
        }
        if iov.len() >= MAX_IOV {
            rewind(self);
            return Ok(Direct::UseBounce);
        }
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        // The bounce buffer's tail takes what does not fit the chain, at the frame's offset.
        let tail = cap.min(self.rx_buf.len());
        if tail < self.rx_buf.len() {
            // SAFETY: `tail < rx_buf.len()`: the pointer stays inside the bounce buffer.
            let p = unsafe { self.rx_buf.as_mut_ptr().add(tail) };
            iov.push(libc::iovec { iov_base: p.cast(), iov_len: self.rx_buf.len() - tail });
        }
        // SAFETY: the chain's entries point into guest RAM (translated just now from checked
        // descriptors; the mapping lives as long as `self.mem`), valid for writes of their
        // lengths, and guest memory is only accessed through raw pointers; the last entry is
        // the bounce buffer, which no reference points into during the call.
        let r = unsafe { self.backend.read_frame_iov(iov) };
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                rewind(self);
                return Ok(match e.kind() {
                    ErrorKind::WouldBlock => {
                        self.stats.rx_empty_reads += 1;
                        Direct::Empty
                    }
                    ErrorKind::Interrupted => Direct::Again,
                    _ => {
                        // A failed copy may have written part of the chain.
                        note_written(&s.descs, cap.min(MAX_FRAME), &mut s.written);
                        tracing::debug!("{}: reading {}: {e}", self.name, self.backend.name());
                        Direct::Failed
                    }
                });
            }
        };
        note_written(&s.descs, n.min(cap), &mut s.written);
        if !(VNET_HDR_LEN..=MAX_FRAME).contains(&n) {
            rewind(self);
            tracing::debug!("{}: dropped a {n}-byte frame from {}", self.name, self.backend.name());
            return Ok(Direct::Dropped);
        }
        if n > cap {
            // Spilled: the chain's part goes in front of the rest, in the bounce buffer.
            rewind(self);
            // SAFETY: the entries are the chain's guest memory (valid for reads, see above);
            // `rx_buf[..cap]` is ours (cap < n <= MAX_FRAME < rx_buf.len()).
            unsafe { gather(iov, &mut self.rx_buf[..cap]) };
            self.rx_pending = n;
            return Ok(Direct::InBounce);
        }
        // SAFETY: offsets 10 and 11 lie in the chain (n >= 12 and n <= cap), whose entries
        // are valid for writes (see above); the source is a local array.
        unsafe { scatter(iov, NUM_BUFFERS_AT, &1u16.to_le_bytes()) };
        s.used.push((head, n as u32));
        Ok(Direct::Delivered)
    }

    /// Writes the pass's used entries and stores the used index once, marking what the pass
    /// wrote (see the module doc).
    fn publish_rx(&mut self) -> Result<(), String> {
        for &(gpa, len) in &self.rx_scratch.written {
            mark_written(&self.mem, gpa, len);
        }
        if self.rx_scratch.used.is_empty() {
            return Ok(());
        }
        let mem = &self.mem;
        let used = &self.rx_scratch.used;
        let Some(q) = self.queues[RX].queue.as_mut() else { return Ok(()) };
        let (size, ring, first) = (q.size(), q.used_ring(), q.next_used());
        let ring_len = 4 + 8 * u64::from(size);
        let Some(base) = host_span(mem, ring, ring_len) else {
            // The ring straddles two regions: one entry at a time.
            for &(head, len) in used {
                q.add_used(mem, head, len).map_err(|e| format!("used ring: {e}"))?;
            }
            return Ok(());
        };
        for (i, &(head, len)) in used.iter().enumerate() {
            let slot = usize::from(first.wrapping_add(i as u16) % size);
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            // SAFETY: slot < size, so 4 + 8 * slot + 8 <= ring_len: inside the ring, which
            // `host_span` found in one region of guest RAM.
            unsafe { std::ptr::copy_nonoverlapping(elem.as_ptr(), base.add(4 + 8 * slot), 8) };
        }
        let next = first.wrapping_add(used.len() as u16);
        // SAFETY: `base + 2` is inside the ring and 2-byte aligned (the used ring is 4-byte
        // aligned, checked when the queue was built); AtomicU16 has u16's layout. The release
        // store publishes the frames and entries written before it.
        unsafe { (*base.add(2).cast::<AtomicU16>()).store(next.to_le(), Ordering::Release) };
        q.set_next_used(next);
        mark_written(mem, ring + 2, 2);
        let (from, count) = (u64::from(first % size), used.len() as u64);
        let till_end = (u64::from(size) - from).min(count);
        mark_written(mem, ring + 4 + 8 * from, 8 * till_end);
        if count > till_end {
            mark_written(mem, ring + 4, 8 * (count - till_end));
        }
        Ok(())
    }

    /// Turns the driver's notifications for the receive queue on or off (the used ring's
    /// `VRING_USED_F_NO_NOTIFY`); turning them on returns whether buffers were added while
    /// they were off, which the device must then take itself.
    fn rx_notifications(&mut self, on: bool) -> Result<bool, String> {
        let mem = &self.mem;
        let Some(q) = self.queues[RX].queue.as_mut() else { return Ok(false) };
        self.rx_notify_off = !on;
        if on {
            q.enable_notification(mem).map_err(|e| format!("used ring flags: {e}"))
        } else {
            q.disable_notification(mem).map(|()| false).map_err(|e| format!("used ring flags: {e}"))
        }
    }

    /// Delivers the frame in the bounce buffer (`rx_pending` bytes): into one chain, or as
    /// many as it needs with `MRG_RXBUF`. Its used entries join the pass's.
    fn deliver(&mut self) -> Result<RxOutcome, String> {
        let len = self.rx_pending;
        let mrg = self.has(MRG_RXBUF);
        let Some(start) = self.queues[RX].queue.as_ref().map(|q| q.next_avail()) else {
            return Ok(RxOutcome::NoBuffers);
        };
        let rewind = |c: &mut Core| {
            if let Some(q) = c.queues[RX].queue.as_mut() {
                q.set_next_avail(start);
            }
        };
        let mut chains = Vec::new();
        let mut cap = 0;
        while cap < len {
            match self.pop(RX)? {
                Some(c) => {
                    cap += c.capacity();
                    chains.push(c);
                }
                None => {
                    rewind(self);
                    return Ok(RxOutcome::NoBuffers);
                }
            }
            if !mrg {
                break;
            }
        }
        if cap < len {
            rewind(self);
            tracing::debug!("{}: dropped a {len}-byte frame: the receive buffer holds {cap}", self.name);
            return Ok(RxOutcome::Dropped);
        }
        let n = chains.len() as u16;
        self.rx_buf[NUM_BUFFERS_AT..NUM_BUFFERS_AT + 2].copy_from_slice(&n.to_le_bytes());
        let mut at = 0;
        for c in &chains {
            let mut written = 0u32;
            for &(addr, dlen) in &c.descs {
                if at == len {
                    break;
                }
                let k = (dlen as usize).min(len - at);
                self.mem
                    .write_slice(&self.rx_buf[at..at + k], GuestAddress(addr))
                    .map_err(|e| format!("chain at head {}: writing {addr:#x}: {e}", c.head))?;
                at += k;
                written += k as u32;
            }
            self.rx_scratch.used.push((c.head, written));
        }
        Ok(RxOutcome::Delivered)
    }
}
