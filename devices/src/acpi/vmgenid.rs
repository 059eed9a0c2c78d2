//! VMGenID, as QEMU's `vmgenid` device (QEMU docs/specs/vmgenid.rst): a 128-bit generation ID
//! the guest OS reads from its own memory, changed whenever the VM may have been duplicated
//! (a clone, a restore that asks for a new identity), so the guest can reseed its random
//! number generators and renew identities.
//!
//! # Protocol
//!
//! - fw_cfg `etc/vmgenid_guid`: [`VMGENID_GUID_FILE_LEN`] bytes, the GUID at
//!   [`VMGENID_GUID_OFFSET`], its first three fields little-endian (QEMU's byte order; the
//!   rest as written). The table-loader ALLOCATEs it in guest memory (align 4096).
//! - fw_cfg `etc/vmgenid_addr`: 8 bytes, writable. The loader's WRITE_POINTER makes the
//!   firmware write the guest address of the GUID (allocation + 40) there, little-endian,
//!   through a fw_cfg DMA write; the write callback records it. An address whose GUID would
//!   not lie inside guest RAM is ignored with a warning (the guest controls it).
//! - A new generation ([`VmGenId::new_generation`]) stores the GUID, writes it into guest
//!   memory at the reported address (through [`GuestMemory`], so a live snapshot copies it
//!   again), then calls the notify callback, which the machine wires to the ACPI PM device's
//!   GPE bit [`super::VMGENID_GPE_BIT`] and the SCI (`\_GPE._E05` notifies `\_SB.VGEN`).
//! - A reset forgets the address (the firmware reports it again).
//!
//! The fw_cfg copies of the GUID and the address are refreshed with
//! [`VmGenId::sync_fw_cfg`] after a new generation or a restore, so a firmware run after a
//! reset sees the current GUID.
//!
//! # State and locks
//!
//! State: the GUID and the reported address ([`VmGenIdState`]), validated on restore like a
//! guest write. The state lock is taken inside fw_cfg's lock (the write callback and
//! `sync_fw_cfg`), and never held while fw_cfg is locked from here or while the notify
//! callback runs.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use migrate::ram::GuestMemory;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{VMGENID_ADDR_FILE, VMGENID_GUID_FILE, VMGENID_GUID_FILE_LEN, VMGENID_GUID_OFFSET};
use crate::fw_cfg::{FwCfg, FwCfgError};

/// Errors of the VMGenID device.
#[derive(Debug, Error)]
pub enum VmGenIdError {
    #[error("'{0}' is not a GUID (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")]
    BadGuid(String),
    #[error("getting random bytes for a VM generation ID: {0}")]
    Random(std::io::Error),
    #[error("VMGenID address {addr:#x}: the 16-byte GUID there is not inside guest RAM")]
    BadAddr { addr: u64 },
    #[error("writing the VM generation ID at {addr:#x}: {reason}")]
    Write { addr: u64, reason: String },
    #[error("fw_cfg file {file}: {source}")]
    FwCfg { file: &'static str, source: FwCfgError },
    #[error("the VM has no VMGenID device (it boots no firmware)")]
    NoDevice,
}

/// A GUID in RFC 4122 byte order (the order of its text form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// A random (version 4) GUID.
    pub fn random() -> Result<Guid, VmGenIdError> {
        let mut b = [0u8; 16];
        let mut got = 0;
        while got < b.len() {
            // SAFETY: the pointer and length describe the unfilled tail of `b`, which lives
            // across the call; getrandom writes at most that many bytes.
            let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VmGenIdError::Random(e));
            }
            got += n as usize;
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Ok(Guid(b))
    }

    /// The bytes as the guest reads them: the first three fields little-endian (QEMU's order).
    pub fn guest_bytes(&self) -> [u8; 16] {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Guid {
    type Err = VmGenIdError;

    fn from_str(s: &str) -> Result<Guid, VmGenIdError> {
        let bad = || VmGenIdError::BadGuid(s.chars().take(64).collect());
        let groups: Vec<&str> = s.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] {
            return Err(bad());
        }
        let hex: String = groups.concat();
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *out = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Guid(b))
    }
}

/// The device's saved state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdState {
    pub guid: Guid,
    /// Guest address of the GUID as the firmware reported it; 0 = not reported.
    pub addr: u64,
}

/// Called after a new generation was written into guest memory.
pub type Notify = Box<dyn Fn() + Send + Sync>;

struct Inner {
    guid: Guid,
    addr: u64,
    /// `etc/vmgenid_addr` as the firmware wrote it.
    addr_bytes: [u8; 8],
}

/// The VMGenID device of one VM.
pub struct VmGenId {
    mem: GuestMemory,
    inner: Mutex<Inner>,
    notify: Mutex<Option<Notify>>,
}

impl std::fmt::Debug for VmGenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmGenId").field("state", &self.state()).finish()
    }
}

impl VmGenId {
    /// The device with generation `guid`, writing guest memory through `mem`.
    pub fn new(mem: GuestMemory, guid: Guid) -> Arc<VmGenId> {
        Arc::new(VmGenId {
            mem,
            inner: Mutex::new(Inner { guid, addr: 0, addr_bytes: [0; 8] }),
            notify: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets what runs after a new generation reached guest memory (raise GPE bit 5 and the
    /// SCI).
    pub fn set_notify(&self, cb: Notify) {
        *self.notify.lock().unwrap_or_else(PoisonError::into_inner) = Some(cb);
    }

    /// The contents of `etc/vmgenid_guid` for `guid`.
    pub fn guid_file(guid: &Guid) -> Vec<u8> {
        let mut v = vec![0u8; VMGENID_GUID_FILE_LEN];
        let at = VMGENID_GUID_OFFSET as usize;
        v[at..at + 16].copy_from_slice(&guid.guest_bytes());
        v
    }

    /// Adds `etc/vmgenid_guid` and the writable `etc/vmgenid_addr` to `fw`.
    pub fn register(self: &Arc<Self>, fw: &mut FwCfg) -> Result<(), VmGenIdError> {
        let guid = self.guid();
        fw.add_file(VMGENID_GUID_FILE, Self::guid_file(&guid))
            .map_err(|source| VmGenIdError::FwCfg { file: VMGENID_GUID_FILE, source })?;
        let me = self.clone();
        fw.add_file_with_callbacks(
            VMGENID_ADDR_FILE,
            vec![0; 8],
            None,
            Some(Box::new(move |off, data| me.addr_written(off, data))),
        )
        .map_err(|source| VmGenIdError::FwCfg { file: VMGENID_ADDR_FILE, source })
    }

    /// The firmware wrote `data` at `off` of `etc/vmgenid_addr` (fw_cfg keeps writes inside
    /// the file). Records the address if its GUID lies in guest RAM and puts the current GUID
    /// there; otherwise logs and keeps the previous address.
    pub fn addr_written(&self, off: u64, data: &[u8]) {
        let mut g = self.lock();
        let start = usize::try_from(off).unwrap_or(usize::MAX).min(8);
        let n = data.len().min(8 - start);
        g.addr_bytes[start..start + n].copy_from_slice(&data[..n]);
        let addr = u64::from_le_bytes(g.addr_bytes);
        if addr == 0 {
            g.addr = 0;
            return;
        }
        if let Err(e) = self.check_addr(addr) {
            tracing::warn!("VMGenID: ignoring the address the guest reported: {e}");
            return;
        }
        g.addr = addr;
        let guid = g.guid;
        drop(g);
        if let Err(e) = self.mem.write(addr, &guid.guest_bytes()) {
            tracing::warn!("VMGenID: writing the GUID at {addr:#x}: {e}");
        }
        tracing::debug!("VMGenID: the firmware put the GUID at {addr:#x}");
    }

    fn check_addr(&self, addr: u64) -> Result<(), VmGenIdError> {
        let mut probe = [0u8; 16];
        match self.mem.read(addr, &mut probe) {
            Ok(()) => Ok(()),
            Err(_) => Err(VmGenIdError::BadAddr { addr }),
        }
    }

    pub fn guid(&self) -> Guid {
        self.lock().guid
    }

    /// The guest address of the GUID the firmware reported (0: none yet).
    pub fn addr(&self) -> u64 {
        self.lock().addr
    }

    /// Makes `guid` the VM's generation: stores it and, if the firmware reported an address,
    /// writes it there and notifies the guest. Returns whether guest memory was written.
    /// Call [`VmGenId::sync_fw_cfg`] afterwards (without holding anything this device locks).
    pub fn new_generation(&self, guid: Guid) -> Result<bool, VmGenIdError> {
        let addr = {
            let mut g = self.lock();
            g.guid = guid;
            g.addr
        };
        if addr == 0 {
            tracing::info!(%guid, "VMGenID: new generation; the firmware has not placed it in guest memory yet");
            return Ok(false);
        }
        self.mem.write(addr, &guid.guest_bytes()).map_err(|e| VmGenIdError::Write { addr, reason: e.to_string() })?;
        if let Some(cb) = &*self.notify.lock().unwrap_or_else(PoisonError::into_inner) {
            cb();
        }
        tracing::info!(%guid, "VMGenID: new generation written at {addr:#x}");
        Ok(true)
    }

    /// Puts the current GUID and address into fw_cfg's copies of the two files.
    pub fn sync_fw_cfg(&self, fw: &mut FwCfg) -> Result<(), VmGenIdError> {
        let (guid, addr_bytes) = {
            let g = self.lock();
            (g.guid, g.addr_bytes)
        };
        fw.set_file_bytes(VMGENID_GUID_FILE, Self::guid_file(&guid))
            .map_err(|source| VmGenIdError::FwCfg { file: VMGENID_GUID_FILE, source })?;
        fw.set_file_bytes(VMGENID_ADDR_FILE, addr_bytes.to_vec())
            .map_err(|source| VmGenIdError::FwCfg { file: VMGENID_ADDR_FILE, source })
    }

    /// A machine reset: the firmware reports the address again.
    pub fn reset(&self) {
        let mut g = self.lock();
        g.addr = 0;
        g.addr_bytes = [0; 8];
    }

    pub fn state(&self) -> VmGenIdState {
        let g = self.lock();
        VmGenIdState { guid: g.guid, addr: g.addr }
    }

    /// Restores saved state (untrusted): a non-zero address must hold the GUID inside guest
    /// RAM. Guest memory already holds what it held at the snapshot; nothing is written.
    pub fn restore(&self, s: &VmGenIdState) -> Result<(), VmGenIdError> {
        if s.addr != 0 {
            self.check_addr(s.addr)?;
        }
        let mut g = self.lock();
        g.guid = s.guid;
        g.addr = s.addr;
        g.addr_bytes = s.addr.to_le_bytes();
        Ok(())
    }
}

#[cfg(test)]
#[path = "vmgenid_tests.rs"]
mod tests;
