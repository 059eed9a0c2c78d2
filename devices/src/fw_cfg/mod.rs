//! fw_cfg, QEMU's firmware configuration interface, on the x86 I/O ports (QEMU's
//! docs/specs/fw_cfg.rst is the reference).
//!
//! Items are selected by a 16-bit key and read a byte at a time from the data port, or in bulk
//! by DMA ([`dma`]). Key 0 is the "QEMU" signature, key 1 the feature bits (traditional
//! interface, DMA), key 0x19 the file directory: a be32 count and one 64-byte entry per file
//! (be32 size, be16 select, u16 reserved, NUL-padded name), files having keys from 0x20 in
//! name order. The directory is generated when it is selected, so it always shows current
//! sizes; adding a file re-sorts the files (machines add them before the guest runs).
//!
//! Files may live in RAM blocks ([`FwCfg::add_ram_block_file`]): their contents are the
//! block's memory and their size the block's unaligned length, which the block's resize hook
//! keeps up to date. The hook only stores an atomic, so it may run while this device is locked
//! (a select callback that rebuilds a blob resizes its block from inside an access).

mod dma;
pub mod keys;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use migrate::ram::{GuestMemory, RamBlock};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use keys::*;

use crate::bus::BusDevice;

/// Errors configuring fw_cfg or restoring its state.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error("fw_cfg key {key:#x} is reserved or out of range")]
    BadKey { key: u16 },
    #[error("fw_cfg key {key:#x} is already in use")]
    DuplicateKey { key: u16 },
    #[error("fw_cfg file '{name}' already exists")]
    DuplicateFile { name: String },
    #[error("fw_cfg file name '{name}' is {len} bytes; at most {} fit", FILE_NAME_LEN - 1)]
    NameTooLong { name: String, len: usize },
    #[error("fw_cfg file name is empty or has a NUL byte")]
    BadName,
    #[error("fw_cfg has no room for file '{name}': {max} files at most")]
    TooManyFiles { name: String, max: usize },
    #[error("fw_cfg item of {len} bytes is larger than 4 GiB")]
    TooLarge { len: u64 },
    #[error("fw_cfg state selects key {key:#x}, which this machine does not have")]
    NoSuchItem { key: u16 },
    #[error("fw_cfg state offset {offset:#x} is beyond item {key:#x}'s {size:#x} bytes")]
    BadOffset { key: u16, offset: u64, size: u64 },
    #[error("fw_cfg file '{name}' does not exist or is not held in bytes")]
    NoSuchFile { name: String },
    #[error("fw_cfg file '{name}' is {old} bytes; new contents of {new} bytes would change its size")]
    SizeChange { name: String, old: u64, new: u64 },
}

/// Runs when an item is selected.
pub type SelectCallback = Box<dyn FnMut() + Send>;
/// Runs after a DMA write to an item: (offset, bytes written).
pub type WriteCallback = Box<dyn FnMut(u64, &[u8]) + Send>;

enum ItemData {
    Bytes(Vec<u8>),
    Block { block: Arc<RamBlock>, size: Arc<AtomicU64> },
}

impl ItemData {
    fn len(&self) -> u64 {
        match self {
            ItemData::Bytes(b) => b.len() as u64,
            ItemData::Block { size, .. } => size.load(Ordering::Acquire),
        }
    }

    /// Copies from `off`; returns the bytes available (the rest of `buf` is left alone).
    fn read(&self, off: u64, buf: &mut [u8]) -> usize {
        let n = (self.len().saturating_sub(off)).min(buf.len() as u64) as usize;
        if n == 0 {
            return 0;
        }
        match self {
            ItemData::Bytes(b) => buf[..n].copy_from_slice(&b[off as usize..off as usize + n]),
            ItemData::Block { block, .. } => {
                if let Err(e) = block.read(off, &mut buf[..n]) {
                    tracing::warn!("fw_cfg: reading RAM block: {e}");
                    buf[..n].fill(0);
                }
            }
        }
        n
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), String> {
        match self {
            ItemData::Bytes(b) => {
                let end = off as usize + data.len();
                b.get_mut(off as usize..end).ok_or("beyond the item")?.copy_from_slice(data);
                Ok(())
            }
            ItemData::Block { block, .. } => block.write(off, data).map_err(|e| e.to_string()),
        }
    }
}

struct Item {
    data: ItemData,
    writable: bool,
    select_cb: Option<SelectCallback>,
    write_cb: Option<WriteCallback>,
}

impl Item {
    fn bytes(data: Vec<u8>) -> Item {
        Item { data: ItemData::Bytes(data), writable: false, select_cb: None, write_cb: None }
    }
}

/// fw_cfg's saved state: what is selected, where reading goes on, and a half-written DMA
/// address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    /// The selected key, or none (an invalid key was selected).
    pub selector: Option<u16>,
    pub offset: u64,
    /// High half of the DMA address, written but not yet followed by the low half.
    pub dma_high: u32,
}

/// The fw_cfg device.
pub struct FwCfg {
    mem: Option<GuestMemory>,
    items: BTreeMap<u16, Item>,
    files: BTreeMap<String, Item>,
    selected: Option<u16>,
    offset: u64,
    dma_high: u32,
}

impl FwCfg {
    /// fw_cfg with DMA into `mem`.
    pub fn new(mem: GuestMemory) -> FwCfg {
        Self::build(Some(mem))
    }

    /// fw_cfg without DMA (the traditional interface only).
    pub fn without_dma() -> FwCfg {
        Self::build(None)
    }

    fn build(mem: Option<GuestMemory>) -> FwCfg {
        let features = FW_CFG_VERSION | if mem.is_some() { FW_CFG_VERSION_DMA } else { 0 };
        let mut items = BTreeMap::new();
        items.insert(FW_CFG_SIGNATURE, Item::bytes(b"QEMU".to_vec()));
        items.insert(FW_CFG_ID, Item::bytes(features.to_le_bytes().to_vec()));
        items.insert(FW_CFG_FILE_DIR, Item::bytes(0u32.to_be_bytes().to_vec()));
        FwCfg { mem, items, files: BTreeMap::new(), selected: None, offset: 0, dma_high: 0 }
    }

    /// Adds a fixed-key item (keys below 0x20, or architecture-local ones).
    pub fn add_bytes(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        let reserved = matches!(key, FW_CFG_SIGNATURE | FW_CFG_ID | FW_CFG_FILE_DIR);
        if reserved || (key >= FW_CFG_FILE_FIRST && key & FW_CFG_ARCH_LOCAL == 0) || key & FW_CFG_WRITE_CHANNEL != 0 {
            return Err(FwCfgError::BadKey { key });
        }
        if data.len() as u64 > u64::from(u32::MAX) {
            return Err(FwCfgError::TooLarge { len: data.len() as u64 });
        }
        if self.items.contains_key(&key) {
            return Err(FwCfgError::DuplicateKey { key });
        }
        self.items.insert(key, Item::bytes(data));
        Ok(())
    }

    fn insert_file(&mut self, name: &str, item: Item) -> Result<(), FwCfgError> {
        if name.is_empty() || name.contains('\0') {
            return Err(FwCfgError::BadName);
        }
        if name.len() >= FILE_NAME_LEN {
            return Err(FwCfgError::NameTooLong { name: name.into(), len: name.len() });
        }
        if self.files.contains_key(name) {
            return Err(FwCfgError::DuplicateFile { name: name.into() });
        }
        if self.files.len() >= usize::from(FW_CFG_FILE_SLOTS) {
            return Err(FwCfgError::TooManyFiles { name: name.into(), max: usize::from(FW_CFG_FILE_SLOTS) });
        }
        if item.data.len() > u64::from(u32::MAX) {
            return Err(FwCfgError::TooLarge { len: item.data.len() });
        }
        self.files.insert(name.to_string(), item);
        Ok(())
    }

    /// Adds a read-only file.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        self.insert_file(name, Item::bytes(data))
    }

    /// Adds a file with callbacks; `write_cb` makes it writable by DMA (within its size).
    pub fn add_file_with_callbacks(
        &mut self,
        name: &str,
        data: Vec<u8>,
        select_cb: Option<SelectCallback>,
        write_cb: Option<WriteCallback>,
    ) -> Result<(), FwCfgError> {
        let writable = write_cb.is_some();
        self.insert_file(name, Item { data: ItemData::Bytes(data), writable, select_cb, write_cb })
    }

    /// Adds a file whose contents are `block`'s memory up to its unaligned length. The block's
    /// resized hook keeps the file's size in the directory current.
    pub fn add_ram_block_file(&mut self, name: &str, block: Arc<RamBlock>) -> Result<(), FwCfgError> {
        let size = Arc::new(AtomicU64::new(block.unaligned_length()));
        let hooked = size.clone();
        block.set_resized_hook(Box::new(move |_, len| hooked.store(len, Ordering::Release)));
        self.insert_file(
            name,
            Item { data: ItemData::Block { block, size }, writable: false, select_cb: None, write_cb: None },
        )
    }

    /// Replaces the contents of file `name` (one added as bytes) with `data` of the same size,
    /// for devices whose file changes while the guest runs (VMGenID's GUID and address).
    pub fn set_file_bytes(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        let no_file = || FwCfgError::NoSuchFile { name: name.into() };
        let item = self.files.get_mut(name).ok_or_else(no_file)?;
        match &mut item.data {
            ItemData::Bytes(b) if b.len() == data.len() => {
                *b = data;
                Ok(())
            }
            ItemData::Bytes(b) => {
                Err(FwCfgError::SizeChange { name: name.into(), old: b.len() as u64, new: data.len() as u64 })
            }
            ItemData::Block { .. } => Err(no_file()),
        }
    }

    /// Sets the callback run when file `name` is selected.
    pub fn set_select_callback(&mut self, name: &str, cb: SelectCallback) -> Result<(), FwCfgError> {
        let item = self.files.get_mut(name).ok_or(FwCfgError::BadName)?;
        item.select_cb = Some(cb);
        Ok(())
    }

    /// File `name`'s key and size, as the directory shows them.
    pub fn file(&self, name: &str) -> Option<(u16, u64)> {
        let idx = self.files.keys().position(|n| n == name)?;
        Some((FW_CFG_FILE_FIRST + idx as u16, self.files.get(name)?.data.len()))
    }

    /// The directory's bytes.
    pub fn directory(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(4 + DIR_ENTRY_LEN * self.files.len());
        d.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for (i, (name, item)) in self.files.iter().enumerate() {
            d.extend_from_slice(&(item.data.len() as u32).to_be_bytes());
            d.extend_from_slice(&(FW_CFG_FILE_FIRST + i as u16).to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            d.extend_from_slice(&n);
        }
        d
    }

    fn item_mut(&mut self, key: u16) -> Option<&mut Item> {
        if (FW_CFG_FILE_FIRST..FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS).contains(&key) {
            self.files.values_mut().nth(usize::from(key - FW_CFG_FILE_FIRST))
        } else {
            self.items.get_mut(&key)
        }
    }

    fn item(&self, key: u16) -> Option<&Item> {
        if (FW_CFG_FILE_FIRST..FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS).contains(&key) {
            self.files.values().nth(usize::from(key - FW_CFG_FILE_FIRST))
        } else {
            self.items.get(&key)
        }
    }

    fn current_item_mut(&mut self) -> Option<&mut Item> {
        let key = self.selected?;
        self.item_mut(key)
    }

    fn current_size(&self) -> u64 {
        self.selected.and_then(|k| self.item(k)).map_or(0, |i| i.data.len())
    }

    /// Selects `key`: resets the offset and runs the item's select callback. An unknown key
    /// leaves nothing selected (reads give zeros).
    pub fn select(&mut self, key: u16) {
        let key = key & !FW_CFG_WRITE_CHANNEL;
        self.offset = 0;
        if key == FW_CFG_FILE_DIR {
            let dir = self.directory();
            if let Some(item) = self.items.get_mut(&FW_CFG_FILE_DIR) {
                item.data = ItemData::Bytes(dir);
            }
        }
        match self.item_mut(key) {
            Some(item) => {
                if let Some(cb) = item.select_cb.as_mut() {
                    cb();
                }
                self.selected = Some(key);
            }
            None => self.selected = None,
        }
    }

    /// Reads from the current offset; past the end the rest of `buf` is zero.
    fn read_data(&mut self, buf: &mut [u8]) {
        let off = self.offset;
        let n = self.selected.and_then(|k| self.item(k)).map_or(0, |i| i.data.read(off, buf));
        buf[n..].fill(0);
        self.offset += n as u64;
    }

    pub fn state(&self) -> FwCfgState {
        FwCfgState { selector: self.selected, offset: self.offset, dma_high: self.dma_high }
    }

    /// Restores a saved state (untrusted): the key must exist and the offset lie within it.
    pub fn restore(&mut self, s: &FwCfgState) -> Result<(), FwCfgError> {
        if let Some(key) = s.selector {
            let item = self.item(key).ok_or(FwCfgError::NoSuchItem { key })?;
            let size = if key == FW_CFG_FILE_DIR { self.directory().len() as u64 } else { item.data.len() };
            if s.offset > size {
                return Err(FwCfgError::BadOffset { key, offset: s.offset, size });
            }
            if key == FW_CFG_FILE_DIR {
                let dir = self.directory();
                if let Some(item) = self.items.get_mut(&FW_CFG_FILE_DIR) {
                    item.data = ItemData::Bytes(dir);
                }
            }
        }
        self.selected = s.selector;
        self.offset = s.offset;
        self.dma_high = s.dma_high;
        Ok(())
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            PORT_DATA => self.read_data(data),
            o if (PORT_DMA..PORT_DMA + 8).contains(&o) && self.mem.is_some() => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get((o - PORT_DMA) as usize + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (PORT_SELECTOR, 1) => self.select(u16::from(data[0])),
            (PORT_SELECTOR, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (PORT_DMA, 4) if self.mem.is_some() => {
                self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]])
            }
            (o, 4) if o == PORT_DMA + 4 && self.mem.is_some() => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let addr = (u64::from(self.dma_high) << 32) | u64::from(low);
                self.dma_high = 0;
                self.dma_transfer(addr);
            }
            (PORT_DMA, 8) if self.mem.is_some() => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                self.dma_high = 0;
                self.dma_transfer(u64::from_be_bytes(b));
            }
            // Writes to the data port have been ignored since QEMU 2.4; so are odd sizes.
            _ => tracing::trace!("fw_cfg: ignoring a {}-byte write at offset {offset}", data.len()),
        }
    }
}

/// One e820 entry as `etc/e820` carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// `etc/e820`: packed entries of le64 address, le64 length, le32 type.
pub fn encode_e820(entries: &[E820Entry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * 20);
    for e in entries {
        v.extend_from_slice(&e.addr.to_le_bytes());
        v.extend_from_slice(&e.size.to_le_bytes());
        v.extend_from_slice(&e.kind.to_le_bytes());
    }
    v
}
