//! fw_cfg's DMA interface. The guest writes the address of a `FWCfgDmaAccess` to the DMA
//! register; the device reads it from guest memory (be32 control, be32 length, be64 address),
//! acts on it, and writes the control word back: 0 on success, `DMA_CTL_ERROR` on failure.
//!
//! Read copies from the current offset, zero-filling past the item's end; skip only moves the
//! offset; write is allowed only to writable items and only within their current size (it
//! never grows them). Every guest address and length is checked against guest memory, and
//! work is done in bounded pieces however large the guest's length is.
//!
//! Guest memory is reached only through [`GuestMemory`], so every byte DMA writes is marked
//! in its RAM block's dirty bitmap and a live snapshot copies it again.

use migrate::ram::GuestMemory;

use super::keys::*;
use super::FwCfg;

/// Largest piece copied at once.
const PIECE: usize = 64 * 1024;

impl FwCfg {
    /// Runs the DMA request whose descriptor is at guest address `desc`.
    pub(super) fn dma_transfer(&mut self, desc: u64) {
        let Some(mem) = self.mem.clone() else {
            tracing::warn!("fw_cfg: DMA request with no guest memory attached");
            return;
        };
        let mut raw = [0u8; 16];
        if mem.read(desc, &mut raw).is_err() {
            tracing::debug!("fw_cfg: DMA descriptor at {desc:#x} is outside guest memory");
            return;
        }
        let be32 = |i: usize| u32::from_be_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let control = be32(0);
        let length = be32(4);
        let addr = u64::from_be_bytes([raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]]);
        if control & DMA_CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let result = if control & DMA_CTL_READ != 0 {
            self.dma_read(&mem, addr, length)
        } else if control & DMA_CTL_WRITE != 0 {
            self.dma_write(&mem, addr, length)
        } else if control & DMA_CTL_SKIP != 0 {
            self.skip(length);
            Ok(())
        } else {
            Ok(())
        };
        let status: u32 = if result.is_ok() { 0 } else { DMA_CTL_ERROR };
        if let Err(why) = result {
            tracing::debug!("fw_cfg: DMA {control:#x} of {length:#x} bytes at {addr:#x}: {why}");
        }
        if mem.write(desc, &status.to_be_bytes()).is_err() {
            tracing::debug!("fw_cfg: cannot write DMA status back at {desc:#x}");
        }
    }

    fn skip(&mut self, length: u32) {
        let size = self.current_size();
        self.offset = (self.offset + u64::from(length)).min(size.max(self.offset));
    }

    fn dma_read(&mut self, mem: &GuestMemory, addr: u64, length: u32) -> Result<(), String> {
        let mut done = 0u64;
        let mut buf = vec![0u8; PIECE.min(length as usize)];
        while done < u64::from(length) {
            let n = (u64::from(length) - done).min(PIECE as u64) as usize;
            let piece = &mut buf[..n];
            self.read_data(piece);
            let at = addr.checked_add(done).ok_or("address wraps")?;
            mem.write(at, piece).map_err(|e| format!("guest memory at {at:#x}: {e}"))?;
            done += n as u64;
        }
        Ok(())
    }

    fn dma_write(&mut self, mem: &GuestMemory, addr: u64, length: u32) -> Result<(), String> {
        let size = self.current_size();
        let item = self.current_item_mut().ok_or("no item selected")?;
        if !item.writable {
            return Err("item is not writable".into());
        }
        let off = self.offset;
        if off.checked_add(u64::from(length)).is_none_or(|end| end > size) {
            return Err(format!("write of {length:#x} bytes at offset {off:#x} runs past the item's {size:#x} bytes"));
        }
        let mut data = vec![0u8; length as usize];
        mem.read(addr, &mut data).map_err(|e| format!("guest memory at {addr:#x}: {e}"))?;
        let item = self.current_item_mut().ok_or("no item selected")?;
        item.data.write(off, &data)?;
        if let Some(cb) = item.write_cb.as_mut() {
            cb(off, &data);
        }
        self.offset = off + u64::from(length);
        Ok(())
    }
}
