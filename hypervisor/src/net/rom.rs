//! A NIC's option ROM: read, checked, patched for the device, and held in a RAM block named as
//! QEMU names it (`0000:00:03.0/virtio-net-pci.rom`) that the device's expansion ROM BAR maps
//! read-only into the guest.
//!
//! # The image
//!
//! A PCI option ROM (PCI Firmware Specification 3.0, 5.1) starts with a header:
//!
//! ```text
//! 0x00  0x55 0xAA        signature
//! 0x02  size             the (first) image's length in 512-byte units
//! 0x06  checksum byte    iPXE (and QEMU's patching) use it to keep the image's byte sum
//! 0x18  u16              offset of the PCI data structure ("PCIR")
//! PCIR+0x00 "PCIR"  +0x04 vendor  +0x06 device  ...  (0x18 bytes at least)
//! ```
//!
//! Firmware (SeaBIOS) runs a ROM from the BAR only if the signature is there and the PCIR's
//! vendor/device match the function. So a ROM is taken when its PCIR says 1af4:1041 (Debian's
//! `efi-virtio.rom` and `pxe-virtio.rom` do); a ROM for the transitional virtio-net ID
//! 1af4:1000 is patched to 1041 in the RAM block's copy (never in the file) and byte 6 is
//! changed so that the image's byte sum stays what it was, as QEMU's `pci_patch_ids` does;
//! anything else is refused with an error naming the file and the IDs. Every offset in the
//! header is untrusted: the PCIR must lie inside the file and inside the image the size byte
//! declares.
//!
//! # The RAM block
//!
//! used_length is the file's size rounded up to a power of two, and at least one page (RAM
//! blocks are page-granular; the BAR is then one page, which also covers the 2 KiB minimum of
//! a ROM BAR). The tail past the file reads as zeros.
//!
//! - Without `romsize`: max_length = used_length and the block is not resizeable, as QEMU does.
//!   A snapshot whose ROM block has another size is refused on restore with the fixes named
//!   (migrate's `snapshot::check`): silently taking a smaller ROM into a block reserved for a
//!   bigger one would only work by accident of how the destination was configured.
//! - With `romsize=N`: used_length = max_length = N (refused if the file is bigger), and the
//!   block is resizeable *by a restore only*: the guest has no way to resize a RAM block, and
//!   the only resize is the one a restore makes to take a snapshot's smaller ROM (item 4 of
//!   issue 12). This is what lets an operator pin `romsize` once and later upgrade to a bigger
//!   ROM, or restore old snapshots, without a size mismatch.
//!
//! The block is added to the VM's registry like every RAM block, so snapshots save it and
//! restores check and load it.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use devices::pci::{Bdf, PciDevice};
use migrate::ram::{RamBlock, RamBlockConfig, RamRegistry};
use thiserror::Error;

use super::rom_block_name;
use super::spec::{NetSpec, RomChoice, MAX_ROM_SIZE};
use crate::boot::files::{BootFile, BootFileError};

/// The default ROM: Debian `ipxe-qemu`'s iPXE for virtio-net (EFI and legacy images).
pub const DEFAULT_ROM_PATH: &str = "/usr/lib/ipxe/qemu/efi-virtio.rom";
/// virtio's PCI vendor.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// The modern-only virtio-net device ID our device has.
pub const VIRTIO_NET_DEVICE: u16 = 0x1041;
/// The transitional virtio-net device ID, patched to [`VIRTIO_NET_DEVICE`].
pub const VIRTIO_NET_TRANSITIONAL: u16 = 0x1000;
/// Offset of the PCIR pointer in the header.
const PCIR_POINTER: usize = 0x18;
/// Bytes of the PCIR structure that must be inside the image.
const PCIR_LEN: usize = 0x18;
/// The byte QEMU and iPXE use to keep the checksum when IDs are patched.
const CHECKSUM_BYTE: usize = 6;
/// Smallest block (one page).
const MIN_BLOCK: u64 = 0x1000;

/// Errors reading or checking a ROM; each names the file as it was given.
#[derive(Debug, Error)]
pub enum RomError {
    #[error(transparent)]
    File(#[from] BootFileError),
    #[error("option ROM {name} is empty")]
    Empty { name: String },
    #[error("option ROM {name} is {len} bytes: too short for a ROM header (0x1a bytes)")]
    Truncated { name: String, len: usize },
    #[error("option ROM {name} starts {b0:#04x} {b1:#04x}, not the signature 0x55 0xaa")]
    Signature { name: String, b0: u8, b1: u8 },
    #[error("option ROM {name}: its size byte is 0 (an image of no 512-byte blocks)")]
    ZeroSize { name: String },
    #[error("option ROM {name}: the PCI data structure pointer {pointer:#x} is outside the image ({image:#x} bytes of the {len:#x}-byte file, header ends at 0x1a)")]
    PcirOutside { name: String, pointer: usize, image: usize, len: usize },
    #[error("option ROM {name}: no \"PCIR\" signature at {pointer:#x} (found {found:02x?})")]
    PcirSignature { name: String, pointer: usize, found: [u8; 4] },
    #[error("option ROM {name} is for PCI device {vendor:04x}:{device:04x}; this NIC is {VIRTIO_VENDOR:04x}:{VIRTIO_NET_DEVICE:04x} (a {VIRTIO_VENDOR:04x}:{VIRTIO_NET_TRANSITIONAL:04x} ROM is patched, others are refused)")]
    Ids { name: String, vendor: u16, device: u16 },
    #[error("option ROM {name} is {len:#x} bytes, more than romsize={romsize:#x}; give romsize={need:#x} or more")]
    RomsizeTooSmall { name: String, len: u64, romsize: u64, need: u64 },
    #[error("option ROM {name}: creating RAM block {idstr}: {source}")]
    Block { name: String, idstr: String, source: migrate::ram::RamError },
}

/// A checked ROM image, ready for its RAM block.
#[derive(Clone, PartialEq, Eq)]
pub struct OptionRom {
    /// The file as given (or the default path).
    pub name: String,
    /// The image as the guest sees it (IDs patched if they were).
    pub image: Vec<u8>,
    /// The device ID the file's PCIR had, if it was patched.
    pub patched_from: Option<u16>,
}

impl std::fmt::Debug for OptionRom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OptionRom({:?}, {} bytes, patched_from {:?})", self.name, self.image.len(), self.patched_from)
    }
}

/// Who named the ROM file: the CLI's local user (symlinks followed, as for `--kernel`), or
/// an API client through an image name the daemon resolved in its image directory (a symlink
/// there is refused, as for every image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomOrigin {
    Cli,
    Api,
}

fn le16(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

/// Checks `data` (the file named `name`) and patches a transitional device ID.
pub fn parse(name: &str, mut data: Vec<u8>) -> Result<OptionRom, RomError> {
    let name_s = || name.to_string();
    if data.is_empty() {
        return Err(RomError::Empty { name: name_s() });
    }
    if data.len() < PCIR_POINTER + 2 {
        return Err(RomError::Truncated { name: name_s(), len: data.len() });
    }
    if data[0] != 0x55 || data[1] != 0xaa {
        return Err(RomError::Signature { name: name_s(), b0: data[0], b1: data[1] });
    }
    if data[2] == 0 {
        return Err(RomError::ZeroSize { name: name_s() });
    }
    // The image the size byte declares, cut to the file (a short file is taken as far as it
    // goes, as SeaBIOS would copy it from the BAR).
    let image = (usize::from(data[2]) * 512).min(data.len());
    let pointer = usize::from(le16(&data, PCIR_POINTER));
    if pointer < PCIR_POINTER + 2 || pointer + PCIR_LEN > image {
        return Err(RomError::PcirOutside { name: name_s(), pointer, image, len: data.len() });
    }
    let mut sig = [0u8; 4];
    sig.copy_from_slice(&data[pointer..pointer + 4]);
    if &sig != b"PCIR" {
        return Err(RomError::PcirSignature { name: name_s(), pointer, found: sig });
    }
    let (vendor, device) = (le16(&data, pointer + 4), le16(&data, pointer + 6));
    let patched_from = match (vendor, device) {
        (VIRTIO_VENDOR, VIRTIO_NET_DEVICE) => None,
        (VIRTIO_VENDOR, VIRTIO_NET_TRANSITIONAL) => {
            let new = VIRTIO_NET_DEVICE.to_le_bytes();
            let old = [data[pointer + 6], data[pointer + 7]];
            data[pointer + 6..pointer + 8].copy_from_slice(&new);
            // Keep the byte sum: what the ID bytes gained, the checksum byte loses.
            let gained = new[0].wrapping_add(new[1]).wrapping_sub(old[0].wrapping_add(old[1]));
            data[CHECKSUM_BYTE] = data[CHECKSUM_BYTE].wrapping_sub(gained);
            tracing::info!("option ROM {name}: PCI device ID {device:04x} patched to {VIRTIO_NET_DEVICE:04x}");
            Some(device)
        }
        _ => return Err(RomError::Ids { name: name_s(), vendor, device }),
    };
    Ok(OptionRom { name: name.to_string(), image: data, patched_from })
}

/// Reads and checks `path` (named `name` in messages).
pub fn read(name: &str, path: &Path, origin: RomOrigin) -> Result<OptionRom, RomError> {
    // The CLI follows symlinks like `--kernel` and `--firmware` do; both refuse FIFOs,
    // devices, directories and huge files.
    let nofollow = origin == RomOrigin::Api;
    let file = BootFile::read("option ROM", name, path, nofollow, MAX_ROM_SIZE)?;
    parse(name, file.data)
}

/// The ROM `spec` asks for: none for `romfile=none`.
pub fn load(spec: &NetSpec, origin: RomOrigin) -> Result<Option<OptionRom>, RomError> {
    match &spec.rom {
        RomChoice::None => Ok(None),
        RomChoice::Default => read(DEFAULT_ROM_PATH, Path::new(DEFAULT_ROM_PATH), RomOrigin::Cli).map(Some),
        RomChoice::File(p) => read(&p.display().to_string(), p, origin).map(Some),
        RomChoice::Image { name, path } => read(&format!("image '{name}'"), path, RomOrigin::Api).map(Some),
    }
}

/// The block's size for a file of `len` bytes: the next power of two, at least one page.
pub fn block_size(len: u64) -> u64 {
    len.next_power_of_two().max(MIN_BLOCK)
}

/// The RAM block for `rom` on the NIC at `bdf`; see the module doc for the sizes.
pub fn block_config(bdf: Bdf, rom: &OptionRom, romsize: Option<u64>) -> Result<RamBlockConfig, RomError> {
    let len = rom.image.len() as u64;
    let natural = block_size(len);
    let idstr = rom_block_name(bdf);
    Ok(match romsize {
        None => RamBlockConfig { idstr, size: natural, max_size: natural, page_size: 0, resizeable: false },
        Some(r) if r < len => {
            return Err(RomError::RomsizeTooSmall { name: rom.name.clone(), len, romsize: r, need: natural })
        }
        Some(r) => RamBlockConfig { idstr, size: r, max_size: r, page_size: 0, resizeable: true },
    })
}

/// Creates the ROM block of the NIC at `bdf` in `registry` and writes the image into it.
pub fn create_block(
    registry: &RamRegistry,
    bdf: Bdf,
    rom: &OptionRom,
    romsize: Option<u64>,
) -> Result<Arc<RamBlock>, RomError> {
    let cfg = block_config(bdf, rom, romsize)?;
    let idstr = cfg.idstr.clone();
    let err = |source| RomError::Block { name: rom.name.clone(), idstr: idstr.clone(), source };
    let block = registry.add(cfg).map_err(err)?;
    if let Err(e) = block.write(0, &rom.image) {
        registry.remove(&idstr).ok();
        return Err(err(e));
    }
    tracing::debug!(
        "option ROM {} ({} bytes) in RAM block {idstr} of {:#x} bytes (max {:#x})",
        rom.name,
        rom.image.len(),
        block.used_length(),
        block.max_length()
    );
    Ok(block)
}

/// Makes the expansion ROM BAR of `device` follow `block`'s size. A restore that resizes a
/// pinned (`romsize`) block to the snapshot's smaller ROM runs this hook before device state
/// is restored, so BAR 6 then has the size the guest saw and takes the saved address with the
/// right mask. The device is held weakly: it holds the block, which holds the hook.
pub fn follow_resizes(block: &RamBlock, device: Weak<Mutex<dyn PciDevice>>) {
    block.set_resized_hook(Box::new(move |idstr, len| {
        let Some(dev) = device.upgrade() else { return };
        let size = block_size(len);
        let mut d = dev.lock().unwrap_or_else(PoisonError::into_inner);
        match d.config_mut().resize_rom_bar(size) {
            Ok(()) => tracing::debug!("{idstr} resized to {len:#x}: ROM BAR of {} now {size:#x} bytes", d.name()),
            Err(e) => tracing::warn!("{idstr} resized to {len:#x}: ROM BAR of {} not resized: {e}", d.name()),
        }
    }));
}

/// A minimal valid ROM image of `len` bytes (a multiple of 512, at most 127 KiB of declared
/// image) for `vendor:device`: signature, size byte, PCIR at 0x1c, a `retf` as its init entry,
/// and a byte sum of 0. For tests that need ROMs of given sizes.
pub fn synthetic(len: usize, vendor: u16, device: u16) -> Vec<u8> {
    let mut d = vec![0u8; len.max(0x200)];
    d[0] = 0x55;
    d[1] = 0xaa;
    d[2] = (d.len() / 512).min(0xff) as u8;
    d[3] = 0xcb; // retf: an init entry that returns at once
    d[PCIR_POINTER..PCIR_POINTER + 2].copy_from_slice(&0x1cu16.to_le_bytes());
    d[0x1c..0x20].copy_from_slice(b"PCIR");
    d[0x20..0x22].copy_from_slice(&vendor.to_le_bytes());
    d[0x22..0x24].copy_from_slice(&device.to_le_bytes());
    d[0x26..0x28].copy_from_slice(&(PCIR_LEN as u16).to_le_bytes());
    d[0x28] = 0; // PCIR revision
    d[0x29..0x2c].copy_from_slice(&[0x00, 0x00, 0x02]); // class: network, Ethernet
    let blocks = u16::from(d[2]);
    d[0x2c..0x2e].copy_from_slice(&blocks.to_le_bytes()); // image length
    d[0x31] = 0x80; // last image
    let image = usize::from(d[2]) * 512;
    let sum = d[..image].iter().fold(0u8, |a, &b| a.wrapping_add(b));
    d[CHECKSUM_BYTE] = 0u8.wrapping_sub(sum);
    d
}

#[cfg(test)]
#[path = "rom_tests.rs"]
mod tests;
