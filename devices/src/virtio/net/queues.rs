//! Moving frames between the virtqueues and the backend, with every descriptor treated as
//! untrusted.
//!
//! Transmit (queue 1): every available chain is read (device-readable descriptors only),
//! header and frame together, and written to the backend as one frame, vnet header
//! unchanged; the chain is returned with length 0. A frame the backend refuses (the tap's
//! queue full: `EAGAIN`; the tap gone) is dropped without waiting, counted in
//! [`NetStats::tx_dropped`](super::core::NetStats), and warned about at most once per
//! [`TX_DROP_WARN_INTERVAL`] with the count since the last warning.
//!
//! Receive (queue 0) is in [`rx`](super::rx): a frame read from the backend is written into
//! one chain (without `MRG_RXBUF`; a chain too small drops the frame and is left for the next
//! one) or across as many chains as it needs (with `MRG_RXBUF`; `num_buffers` in the header
//! says how many). The header's `num_buffers` is always set by the device (the tap leaves
//! those two bytes alone).
//!
//! A chain that loops or runs past the queue size, links outside the descriptor table, has a
//! descriptor outside guest RAM, of length zero, or of the wrong direction, a transmit frame
//! shorter than the header or longer than [`MAX_FRAME`], or an available index that moved
//! by more than the queue size, puts the device in its error state ([`Core::fail`]).

use std::sync::atomic::Ordering;
use std::time::Instant;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use super::core::{Core, MAX_FRAME, RX, TX, TX_DROP_WARN_INTERVAL};
use crate::net::VNET_HDR_LEN;

/// Most chains or frames moved per call, so that the device mutex is released regularly.
pub const BATCH: usize = 256;

/// Available-ring flag: the driver does not want interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One checked chain: its head and its descriptors (guest address, length).
pub(super) struct Chain {
    pub head: u16,
    pub descs: Vec<(u64, u32)>,
}

impl Chain {
    pub fn capacity(&self) -> usize {
        self.descs.iter().map(|&(_, l)| l as usize).sum()
    }
}

impl Core {
    /// Takes the next available chain of queue `qi`, checked; `Ok(None)` when none.
    pub(super) fn pop(&mut self, qi: usize) -> Result<Option<Chain>, String> {
        let mut descs = Vec::new();
        Ok(self.pop_into(qi, &mut descs)?.map(|head| Chain { head, descs }))
    }

    /// [`Core::pop`] into `descs` (cleared first, so a caller can reuse it): the head.
    pub(super) fn pop_into(&mut self, qi: usize, descs: &mut Vec<(u64, u32)>) -> Result<Option<u16>, String> {
        descs.clear();
        let writable = qi == RX;
        let mem = &self.mem;
        let Some(q) = self.queues[qi].queue.as_mut() else { return Ok(None) };
        let size = q.size();
        let mut it = q.iter(mem).map_err(|e| format!("available ring: {e}"))?;
        let Some(chain) = it.next() else { return Ok(None) };
        let head = chain.head_index();
        if head >= size {
            return Err(format!("head descriptor index {head} is past the queue size {size}"));
        }
        let mut links_on = false;
        for d in chain {
            let (addr, len) = (d.addr().0, d.len());
            if len == 0 {
                return Err(format!("chain at head {head}: descriptor {} at {addr:#x} has length 0", descs.len()));
            }
            if d.is_write_only() != writable {
                let what = if writable { "device-readable" } else { "device-writable" };
                return Err(format!(
                    "chain at head {head}: descriptor {} at {addr:#x} is {what}, which this queue may not have",
                    descs.len()
                ));
            }
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Err(format!("chain at head {head}: buffer at {addr:#x} (+{len:#x}) is outside guest RAM"));
            }
            links_on = d.has_next();
            descs.push((addr, len));
        }
        if descs.is_empty() {
            return Err(format!("descriptor {head} cannot be read (descriptor table outside guest RAM)"));
        }
        if links_on {
            return Err(format!(
                "chain at head {head} loops, links past the descriptor table, or is longer than the queue size {size}"
            ));
        }
        Ok(Some(head))
    }

    fn add_used(&mut self, qi: usize, head: u16, len: u32) -> Result<(), String> {
        let mem = &self.mem;
        let Some(q) = self.queues[qi].queue.as_mut() else { return Ok(()) };
        q.add_used(mem, head, len).map_err(|e| format!("used ring: {e}"))
    }

    /// Raises queue `qi`'s interrupt unless the driver asked not to have it
    /// (`VRING_AVAIL_F_NO_INTERRUPT`).
    pub(super) fn notify_used(&mut self, qi: usize) {
        let mem = &self.mem;
        let Some(q) = self.queues[qi].queue.as_mut() else { return };
        // virtio-queue handles EVENT_IDX (not offered here) but not VRING_AVAIL_F_NO_INTERRUPT.
        let wanted = q.needs_notification(mem).map_err(|e| e.to_string()).and_then(|n| {
            let flags: u16 = mem
                .load(GuestAddress(q.avail_ring()), Ordering::Acquire)
                .map_err(|e| format!("reading the available ring flags: {e}"))?;
            Ok(n && u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
        });
        match wanted {
            Ok(false) => {}
            Ok(true) => self.interrupt_queue(qi),
            Err(e) => self.fail(qi, &e),
        }
    }

    /// Sends the chains the driver made available on the transmit queue, at most [`BATCH`]
    /// of them; true when more may be waiting (the caller comes back for them, so that vCPU
    /// accesses to the device get the mutex in between).
    pub fn process_tx(&mut self) -> bool {
        if !self.running() {
            return false;
        }
        let mut used = false;
        let mut more = false;
        for n in 0.. {
            if n == BATCH {
                more = true;
                break;
            }
            let chain = match self.pop(TX) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(p) => {
                    self.fail(TX, &p);
                    break;
                }
            };
            if let Err(p) = self.send(&chain) {
                self.fail(TX, &p);
                break;
            }
            if let Err(p) = self.add_used(TX, chain.head, 0) {
                self.fail(TX, &p);
                break;
            }
            used = true;
        }
        if used {
            self.notify_used(TX);
        }
        more
    }

    fn send(&mut self, chain: &Chain) -> Result<(), String> {
        let total = chain.capacity();
        if total > MAX_FRAME {
            return Err(format!("chain at head {}: frame of {total} bytes is longer than {MAX_FRAME}", chain.head));
        }
        if total < VNET_HDR_LEN {
            return Err(format!(
                "chain at head {}: frame of {total} bytes is shorter than the {VNET_HDR_LEN}-byte header",
                chain.head
            ));
        }
        self.tx_buf.resize(total, 0);
        let mut at = 0;
        for &(addr, len) in &chain.descs {
            let len = len as usize;
            self.mem
                .read_slice(&mut self.tx_buf[at..at + len], GuestAddress(addr))
                .map_err(|e| format!("chain at head {}: reading {addr:#x}: {e}", chain.head))?;
            at += len;
        }
        match self.backend.write_frame(&self.tx_buf) {
            Ok(()) => self.stats.tx_frames += 1,
            Err(e) => self.tx_refused(total, &e),
        }
        Ok(())
    }

    /// A frame the backend refused: counted, and a warning naming the backend and the error
    /// at most once per [`TX_DROP_WARN_INTERVAL`] (with the count since the last one), so a
    /// full tap cannot flood the log. The chain is completed all the same: the device never
    /// waits for the backend, so the vCPU never does.
    fn tx_refused(&mut self, len: usize, e: &std::io::Error) {
        self.stats.tx_dropped += 1;
        self.tx_drops_unwarned += 1;
        let due = self.tx_drop_warned.is_none_or(|t| t.elapsed() >= TX_DROP_WARN_INTERVAL);
        if due {
            tracing::warn!(
                "{}: {} refused a {len}-byte frame from the guest ({e}, errno {}): {} frame(s) dropped since the \
                 last warning, {} in all",
                self.name,
                self.backend.name(),
                e.raw_os_error().unwrap_or(0),
                self.tx_drops_unwarned,
                self.stats.tx_dropped
            );
            self.tx_drop_warned = Some(Instant::now());
            self.tx_drops_unwarned = 0;
        } else {
            tracing::debug!("{}: {} dropped a {len}-byte frame: {e}", self.name, self.backend.name());
        }
    }

    /// Logs the refused frames no warning has counted yet (at shutdown).
    pub fn flush_tx_drop_warning(&mut self) {
        if self.tx_drops_unwarned > 0 {
            tracing::warn!(
                "{}: {} refused {} more frame(s) from the guest since the last warning, {} in all",
                self.name,
                self.backend.name(),
                self.tx_drops_unwarned,
                self.stats.tx_dropped
            );
            self.tx_drops_unwarned = 0;
        }
    }
}
