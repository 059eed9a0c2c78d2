//! Booting through PC firmware (SeaBIOS): the image is a read-only RAM block, `pc.bios`, that
//! ends at 4 GiB, and its last 128 KiB are copied to 0xe0000 in `pc.ram`, the legacy BIOS area
//! the reset vector's code jumps into. vCPU 0 starts in KVM's reset state (real mode,
//! CS base 0xffff0000, IP 0xfff0); the others wait for INIT/SIPI from it.
//!
//! The low copy lives in `pc.ram`, which is writable there: firmware that "unlocks" the
//! shadow area through the host bridge's PAM registers then simply writes to RAM, which is
//! what QEMU's i440FX gives it too once unlocked.

use std::sync::Arc;

use migrate::ram::{RamBlock, RamBlockConfig, RamRegistry};

use crate::boot::files::BootFile;
use thiserror::Error;

use crate::memory::{GuestRam, Placement, SlotMap};

/// The RAM block holding the firmware image (QEMU's name).
pub const PC_BIOS: &str = "pc.bios";
/// Where the low copy of the image's last 128 KiB goes.
pub const ISA_BIOS_BASE: u64 = 0xe_0000;
/// Size of the low copy.
pub const ISA_BIOS_LEN: u64 = 0x2_0000;
/// Largest image, as in QEMU: 16 MiB, ending at 4 GiB just above KVM's TSS pages
/// (`layout::KVM_TSS`). SeaBIOS is 128 or 256 KiB.
pub const MAX_IMAGE: u64 = 0x100_0000;
/// The default firmware: Debian's `seabios` package.
pub const SEABIOS_PATH: &str = "/usr/share/seabios/bios.bin";
/// The firmware name that means [`SEABIOS_PATH`] (CLI and API alike).
pub const SEABIOS: &str = "seabios";

/// Errors loading firmware.
#[derive(Debug, Error)]
pub enum FirmwareError {
    #[error(
        "firmware image {name} is {len:#x} bytes: it must be a multiple of 64 KiB from 128 KiB to {max:#x} bytes",
        max = MAX_IMAGE
    )]
    Size { name: String, len: u64 },
    #[error("creating RAM block {PC_BIOS}: {0}")]
    Block(migrate::ram::RamError),
    #[error("writing the firmware's low copy at {ISA_BIOS_BASE:#x}: {0}")]
    LowCopy(String),
}

/// Where the image of `len` bytes is mapped: its last byte at 4 GiB - 1.
pub fn image_base(len: u64) -> u64 {
    (1u64 << 32) - len
}

/// Checks an image's size.
pub fn check_image(name: &str, len: u64) -> Result<(), FirmwareError> {
    if !(ISA_BIOS_LEN..=MAX_IMAGE).contains(&len) || !len.is_multiple_of(0x1_0000) {
        return Err(FirmwareError::Size { name: name.to_string(), len });
    }
    Ok(())
}

/// `file` as the firmware called `name` (how snapshots and `vm info` show it), its size checked.
pub fn named(name: &str, mut file: BootFile) -> Result<BootFile, FirmwareError> {
    check_image(name, file.data.len() as u64)?;
    file.name = name.to_string();
    Ok(file)
}

/// Reads the system's SeaBIOS ([`SEABIOS_PATH`]), named [`SEABIOS`].
pub fn read_seabios() -> Result<BootFile, String> {
    let file = BootFile::read_path("firmware", std::path::Path::new(SEABIOS_PATH), MAX_IMAGE)
        .map_err(|e| format!("the system's SeaBIOS: {e}"))?;
    named(SEABIOS, file).map_err(|e| e.to_string())
}

/// Creates `pc.bios` holding `image` (mapped read-only below 4 GiB through `slots`) and, unless
/// the VM is being restored (`low_copy` false: `pc.ram` comes from the snapshot), copies its
/// last 128 KiB to 0xe0000.
pub fn load(
    registry: &RamRegistry,
    slots: &SlotMap,
    ram: &GuestRam,
    name: &str,
    image: &[u8],
    low_copy: bool,
) -> Result<Arc<RamBlock>, FirmwareError> {
    let len = image.len() as u64;
    check_image(name, len)?;
    slots.place(PC_BIOS, vec![Placement { block_offset: 0, gpa: image_base(len), len, readonly: true }]);
    let block = registry
        .add(RamBlockConfig { idstr: PC_BIOS.into(), size: len, max_size: len, page_size: 0, resizeable: false })
        .map_err(FirmwareError::Block)?;
    block.write(0, image).map_err(FirmwareError::Block)?;
    if low_copy {
        copy_low(ram, image)?;
    }
    Ok(block)
}

/// Copies the image's last 128 KiB to the legacy BIOS area (also what a reset redoes).
pub fn copy_low(ram: &GuestRam, image: &[u8]) -> Result<(), FirmwareError> {
    let tail = &image[image.len().saturating_sub(ISA_BIOS_LEN as usize)..];
    ram.device_memory().write(ISA_BIOS_BASE, tail).map_err(|e| FirmwareError::LowCopy(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_sizes() {
        assert!(check_image("x", 0x2_0000).is_ok());
        assert!(check_image("x", 0x4_0000).is_ok());
        assert!(check_image("x", 0x1_0000).is_err());
        assert!(check_image("x", 0x2_0001).is_err());
        assert!(check_image("x", 0x20_0000).is_ok());
        assert!(check_image("x", 0x100_0000).is_ok());
        assert!(check_image("x", 0x101_0000).is_err());
        assert_eq!(image_base(0x2_0000), 0xfffe_0000);
    }
}
