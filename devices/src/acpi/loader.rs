//! The bios-linker-loader script (`etc/table-loader`): how firmware learns where to put the
//! ACPI blobs in guest memory and which pointers and checksums to patch once they are there.
//!
//! # Format
//!
//! The script is a sequence of 128-byte entries, all fields little-endian, the command in the
//! `u32` at offset 0. File names are NUL-terminated within their 56-byte field. An entry of all
//! zeroes is padding and is skipped (the script is padded to a multiple of
//! [`super::LOADER_STEP`]).
//!
//! | command | fields |
//! |---|---|
//! | 1 ALLOCATE | file\[56\]@4, align u32@60, zone u8@64 (1 high memory, 2 FSEG) |
//! | 2 ADD_POINTER | dest\[56\]@4, src\[56\]@60, offset u32@116, size u8@120 |
//! | 3 ADD_CHECKSUM | file\[56\]@4, offset u32@60, start u32@64, length u32@68 |
//! | 4 WRITE_POINTER | dest\[56\]@4, src\[56\]@60, dest_offset u32@116, src_offset u32@120, size u8@124 |
//!
//! * ALLOCATE copies a fw_cfg file into guest memory at an address the firmware chooses.
//! * ADD_POINTER adds the address of the allocated `src` to the `size`-byte value at `offset`
//!   in the allocated `dest` (the value holds an offset into `src` before).
//! * ADD_CHECKSUM subtracts the byte sum of `start..start+length` from the byte at `offset`,
//!   so that range sums to zero when that byte started at zero.
//! * WRITE_POINTER writes `address(src) + src_offset` as a `size`-byte value into the fw_cfg
//!   file `dest` at `dest_offset` (through a fw_cfg DMA write; `dest` is never allocated).
//!
//! [`LoaderBuilder`] encodes a script; [`parse`] decodes one, treating it as untrusted (every
//! malformed entry is an error naming its index and the bad value); `loader_exec` runs one.

use thiserror::Error;

/// Size of one loader entry.
pub const ENTRY_LEN: usize = 128;
/// Size of a file-name field, including its terminating NUL.
pub const FILE_NAME_LEN: usize = 56;

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
const CMD_WRITE_POINTER: u32 = 4;

/// Where ALLOCATE places a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// Anywhere in RAM (SeaBIOS: high memory below 4 GiB).
    High,
    /// The 0xe0000-0xfffff F-segment, where an OS looks for the RSDP.
    FSeg,
}

impl Zone {
    fn code(self) -> u8 {
        match self {
            Zone::High => 1,
            Zone::FSeg => 2,
        }
    }
}

/// One loader command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Allocate { file: String, align: u32, zone: Zone },
    AddPointer { dest: String, src: String, offset: u32, size: u8 },
    AddChecksum { file: String, offset: u32, start: u32, length: u32 },
    WritePointer { dest: String, src: String, dest_offset: u32, src_offset: u32, size: u8 },
}

/// Errors encoding, decoding or running a loader script.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LoaderError {
    #[error("loader script of {len} bytes is not a whole number of {ENTRY_LEN}-byte entries")]
    Truncated { len: usize },
    #[error("loader script of {len:#x} bytes is larger than its maximum {max:#x}")]
    TooLarge { len: u64, max: u64 },
    #[error("loader entry {index}: unknown command {command:#x}")]
    UnknownCommand { index: usize, command: u32 },
    #[error("loader entry {index}: {field} file name is not NUL-terminated within {FILE_NAME_LEN} bytes")]
    NameNotTerminated { index: usize, field: &'static str },
    #[error("loader entry {index}: {field} file name is not UTF-8")]
    NameNotUtf8 { index: usize, field: &'static str },
    #[error("loader entry {index}: {field} file name is empty")]
    NameEmpty { index: usize, field: &'static str },
    #[error("loader entry {index}: file name '{name}' is longer than {} bytes", FILE_NAME_LEN - 1)]
    NameTooLong { index: usize, name: String },
    #[error("loader entry {index}: pointer size {size} is not 1, 2, 4 or 8")]
    BadSize { index: usize, size: u8 },
    #[error("loader entry {index}: unknown allocation zone {zone}")]
    BadZone { index: usize, zone: u8 },
    #[error("loader entry {index}: alignment {align:#x} is not a power of two")]
    BadAlign { index: usize, align: u32 },
    #[error("loader entry {index}: file '{file}' does not exist")]
    UnknownFile { index: usize, file: String },
    #[error("loader entry {index}: file '{file}' has not been allocated")]
    NotAllocated { index: usize, file: String },
    #[error("loader entry {index}: file '{file}' is allocated twice")]
    AllocatedTwice { index: usize, file: String },
    #[error("loader entry {index}: range {start:#x}+{len:#x} lies outside '{file}' ({file_len:#x} bytes)")]
    OutsideFile { index: usize, file: String, start: u64, len: u64, file_len: u64 },
    #[error("loader entry {index}: pointer {value:#x} does not fit in {size} bytes")]
    PointerOverflow { index: usize, value: u64, size: u8 },
    #[error("loader entry {index}: cannot allocate {len:#x} bytes for '{file}': {reason}")]
    Alloc { index: usize, file: String, len: u64, reason: String },
}

/// Builds a loader script, one method per command, in the order they should run.
#[derive(Clone, Debug, Default)]
pub struct LoaderBuilder {
    commands: Vec<Command>,
}

impl LoaderBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn allocate(&mut self, file: &str, align: u32, zone: Zone) -> &mut Self {
        self.commands.push(Command::Allocate { file: file.into(), align, zone });
        self
    }

    pub fn add_pointer(&mut self, dest: &str, offset: u32, size: u8, src: &str) -> &mut Self {
        self.commands.push(Command::AddPointer { dest: dest.into(), src: src.into(), offset, size });
        self
    }

    pub fn add_checksum(&mut self, file: &str, offset: u32, start: u32, length: u32) -> &mut Self {
        self.commands.push(Command::AddChecksum { file: file.into(), offset, start, length });
        self
    }

    pub fn write_pointer(&mut self, dest: &str, dest_offset: u32, size: u8, src: &str, src_offset: u32) -> &mut Self {
        self.commands.push(Command::WritePointer { dest: dest.into(), src: src.into(), dest_offset, src_offset, size });
        self
    }

    pub fn commands(&self) -> &[Command] {
        &self.commands
    }

    /// The script, padded with zero entries to a multiple of `step` bytes, at most `max`.
    pub fn encode(&self, step: u64, max: u64) -> Result<Vec<u8>, LoaderError> {
        let mut out = Vec::with_capacity(self.commands.len() * ENTRY_LEN);
        for (index, cmd) in self.commands.iter().enumerate() {
            out.extend_from_slice(&encode_entry(index, cmd)?);
        }
        let len = (out.len() as u64).div_ceil(step.max(1)) * step.max(1);
        if len > max {
            return Err(LoaderError::TooLarge { len, max });
        }
        out.resize(len as usize, 0);
        Ok(out)
    }
}

fn put_u32(e: &mut [u8; ENTRY_LEN], at: usize, v: u32) {
    e[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_name(e: &mut [u8; ENTRY_LEN], index: usize, at: usize, name: &str) -> Result<(), LoaderError> {
    if name.len() >= FILE_NAME_LEN || name.as_bytes().contains(&0) {
        return Err(LoaderError::NameTooLong { index, name: name.into() });
    }
    e[at..at + name.len()].copy_from_slice(name.as_bytes());
    Ok(())
}

fn encode_entry(index: usize, cmd: &Command) -> Result<[u8; ENTRY_LEN], LoaderError> {
    let mut e = [0u8; ENTRY_LEN];
    match cmd {
        Command::Allocate { file, align, zone } => {
            put_u32(&mut e, 0, CMD_ALLOCATE);
            put_name(&mut e, index, 4, file)?;
            put_u32(&mut e, 60, *align);
            e[64] = zone.code();
        }
        Command::AddPointer { dest, src, offset, size } => {
            put_u32(&mut e, 0, CMD_ADD_POINTER);
            put_name(&mut e, index, 4, dest)?;
            put_name(&mut e, index, 60, src)?;
            put_u32(&mut e, 116, *offset);
            e[120] = *size;
        }
        Command::AddChecksum { file, offset, start, length } => {
            put_u32(&mut e, 0, CMD_ADD_CHECKSUM);
            put_name(&mut e, index, 4, file)?;
            put_u32(&mut e, 60, *offset);
            put_u32(&mut e, 64, *start);
            put_u32(&mut e, 68, *length);
        }
        Command::WritePointer { dest, src, dest_offset, src_offset, size } => {
            put_u32(&mut e, 0, CMD_WRITE_POINTER);
            put_name(&mut e, index, 4, dest)?;
            put_name(&mut e, index, 60, src)?;
            put_u32(&mut e, 116, *dest_offset);
            put_u32(&mut e, 120, *src_offset);
            e[124] = *size;
        }
    }
    Ok(e)
}

fn get_u32(e: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&e[at..at + 4]);
    u32::from_le_bytes(b)
}

fn get_name(e: &[u8], index: usize, at: usize, field: &'static str) -> Result<String, LoaderError> {
    let raw = &e[at..at + FILE_NAME_LEN];
    let end = raw.iter().position(|&b| b == 0).ok_or(LoaderError::NameNotTerminated { index, field })?;
    if end == 0 {
        return Err(LoaderError::NameEmpty { index, field });
    }
    String::from_utf8(raw[..end].to_vec()).map_err(|_| LoaderError::NameNotUtf8 { index, field })
}

fn check_size(index: usize, size: u8) -> Result<u8, LoaderError> {
    match size {
        1 | 2 | 4 | 8 => Ok(size),
        _ => Err(LoaderError::BadSize { index, size }),
    }
}

/// Decodes a script: the commands with their entry indexes (padding entries are skipped).
pub fn parse(script: &[u8]) -> Result<Vec<(usize, Command)>, LoaderError> {
    if !script.len().is_multiple_of(ENTRY_LEN) {
        return Err(LoaderError::Truncated { len: script.len() });
    }
    let mut out = Vec::new();
    for (index, e) in script.chunks_exact(ENTRY_LEN).enumerate() {
        if e.iter().all(|&b| b == 0) {
            continue;
        }
        let cmd = match get_u32(e, 0) {
            CMD_ALLOCATE => {
                let file = get_name(e, index, 4, "ALLOCATE")?;
                let align = get_u32(e, 60);
                if align != 0 && !align.is_power_of_two() {
                    return Err(LoaderError::BadAlign { index, align });
                }
                let zone = match e[64] {
                    1 => Zone::High,
                    2 => Zone::FSeg,
                    zone => return Err(LoaderError::BadZone { index, zone }),
                };
                Command::Allocate { file, align: align.max(1), zone }
            }
            CMD_ADD_POINTER => Command::AddPointer {
                dest: get_name(e, index, 4, "destination")?,
                src: get_name(e, index, 60, "source")?,
                offset: get_u32(e, 116),
                size: check_size(index, e[120])?,
            },
            CMD_ADD_CHECKSUM => Command::AddChecksum {
                file: get_name(e, index, 4, "checksum")?,
                offset: get_u32(e, 60),
                start: get_u32(e, 64),
                length: get_u32(e, 68),
            },
            CMD_WRITE_POINTER => Command::WritePointer {
                dest: get_name(e, index, 4, "destination")?,
                src: get_name(e, index, 60, "source")?,
                dest_offset: get_u32(e, 116),
                src_offset: get_u32(e, 120),
                size: check_size(index, e[124])?,
            },
            command => return Err(LoaderError::UnknownCommand { index, command }),
        };
        out.push((index, cmd));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(cmd: Command) -> Vec<u8> {
        let mut b = LoaderBuilder::new();
        b.commands.push(cmd);
        b.encode(ENTRY_LEN as u64, 1 << 20).expect("encode")
    }

    #[test]
    fn allocate_layout_and_roundtrip() {
        let cmd = Command::Allocate { file: "etc/acpi/tables".into(), align: 64, zone: Zone::High };
        let e = one(cmd.clone());
        assert_eq!(e.len(), ENTRY_LEN);
        assert_eq!(get_u32(&e, 0), 1);
        assert_eq!(&e[4..19], b"etc/acpi/tables");
        assert_eq!(e[19], 0);
        assert_eq!(get_u32(&e, 60), 64);
        assert_eq!(e[64], 1);
        assert_eq!(parse(&e), Ok(vec![(0, cmd)]));
    }

    #[test]
    fn add_pointer_layout_and_roundtrip() {
        let cmd = Command::AddPointer { dest: "a".into(), src: "b".into(), offset: 0x24, size: 8 };
        let e = one(cmd.clone());
        assert_eq!(get_u32(&e, 0), 2);
        assert_eq!(e[4], b'a');
        assert_eq!(e[60], b'b');
        assert_eq!(get_u32(&e, 116), 0x24);
        assert_eq!(e[120], 8);
        assert_eq!(parse(&e), Ok(vec![(0, cmd)]));
    }

    #[test]
    fn add_checksum_layout_and_roundtrip() {
        let cmd = Command::AddChecksum { file: "f".into(), offset: 9, start: 0x40, length: 0x24 };
        let e = one(cmd.clone());
        assert_eq!(get_u32(&e, 0), 3);
        assert_eq!((get_u32(&e, 60), get_u32(&e, 64), get_u32(&e, 68)), (9, 0x40, 0x24));
        assert_eq!(parse(&e), Ok(vec![(0, cmd)]));
    }

    #[test]
    fn write_pointer_layout_and_roundtrip() {
        let cmd = Command::WritePointer {
            dest: "etc/vmgenid_addr".into(),
            src: "g".into(),
            dest_offset: 0,
            src_offset: 40,
            size: 8,
        };
        let e = one(cmd.clone());
        assert_eq!(get_u32(&e, 0), 4);
        assert_eq!((get_u32(&e, 116), get_u32(&e, 120), e[124]), (0, 40, 8));
        assert_eq!(parse(&e), Ok(vec![(0, cmd)]));
    }

    #[test]
    fn padding_is_zero_entries_and_skipped() {
        let mut b = LoaderBuilder::new();
        b.allocate("x", 16, Zone::FSeg).add_checksum("x", 0, 0, 1);
        let s = b.encode(0x1000, 0x10000).expect("encode");
        assert_eq!(s.len(), 0x1000);
        assert!(s[2 * ENTRY_LEN..].iter().all(|&x| x == 0));
        let cmds = parse(&s).expect("parse");
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[1].0, 1);
    }

    #[test]
    fn encode_too_large() {
        let mut b = LoaderBuilder::new();
        for _ in 0..3 {
            b.allocate("x", 16, Zone::High);
        }
        assert_eq!(b.encode(128, 256), Err(LoaderError::TooLarge { len: 384, max: 256 }));
    }

    #[test]
    fn encode_name_too_long() {
        let mut b = LoaderBuilder::new();
        let long = "n".repeat(FILE_NAME_LEN);
        b.allocate(&long, 16, Zone::High);
        assert_eq!(b.encode(128, 4096), Err(LoaderError::NameTooLong { index: 0, name: long }));
    }

    fn entry(cmd: u32) -> Vec<u8> {
        let mut e = vec![0u8; ENTRY_LEN * 2];
        // A padding entry first, so the bad one has index 1.
        e[ENTRY_LEN..ENTRY_LEN + 4].copy_from_slice(&cmd.to_le_bytes());
        e[ENTRY_LEN + 4] = b'a';
        e[ENTRY_LEN + 60] = b'b';
        e
    }

    #[test]
    fn parse_rejects_truncated() {
        assert_eq!(parse(&[0u8; 130]), Err(LoaderError::Truncated { len: 130 }));
    }

    #[test]
    fn parse_rejects_unknown_command() {
        assert_eq!(parse(&entry(7)), Err(LoaderError::UnknownCommand { index: 1, command: 7 }));
        let mut e = entry(0);
        e[ENTRY_LEN + 100] = 1;
        assert_eq!(parse(&e), Err(LoaderError::UnknownCommand { index: 1, command: 0 }));
    }

    #[test]
    fn parse_rejects_unterminated_names() {
        let mut e = entry(CMD_ALLOCATE);
        e[ENTRY_LEN + 4..ENTRY_LEN + 60].fill(b'x');
        e[ENTRY_LEN + 64] = 1;
        assert_eq!(parse(&e), Err(LoaderError::NameNotTerminated { index: 1, field: "ALLOCATE" }));
        let mut e = entry(CMD_ADD_POINTER);
        e[ENTRY_LEN + 60..ENTRY_LEN + 116].fill(b'y');
        e[ENTRY_LEN + 120] = 4;
        assert_eq!(parse(&e), Err(LoaderError::NameNotTerminated { index: 1, field: "source" }));
    }

    #[test]
    fn parse_rejects_empty_and_non_utf8_names() {
        let mut e = entry(CMD_ADD_CHECKSUM);
        e[ENTRY_LEN + 4] = 0;
        assert_eq!(parse(&e), Err(LoaderError::NameEmpty { index: 1, field: "checksum" }));
        let mut e = entry(CMD_ADD_CHECKSUM);
        e[ENTRY_LEN + 4] = 0xff;
        assert_eq!(parse(&e), Err(LoaderError::NameNotUtf8 { index: 1, field: "checksum" }));
    }

    #[test]
    fn parse_rejects_bad_sizes() {
        for size in [0u8, 3, 5, 16, 255] {
            let mut e = entry(CMD_ADD_POINTER);
            e[ENTRY_LEN + 120] = size;
            assert_eq!(parse(&e), Err(LoaderError::BadSize { index: 1, size }));
            let mut e = entry(CMD_WRITE_POINTER);
            e[ENTRY_LEN + 124] = size;
            assert_eq!(parse(&e), Err(LoaderError::BadSize { index: 1, size }));
        }
    }

    #[test]
    fn parse_rejects_bad_zone_and_align() {
        let mut e = entry(CMD_ALLOCATE);
        e[ENTRY_LEN + 60] = 16;
        e[ENTRY_LEN + 64] = 3;
        assert_eq!(parse(&e), Err(LoaderError::BadZone { index: 1, zone: 3 }));
        let mut e = entry(CMD_ALLOCATE);
        e[ENTRY_LEN + 64] = 1;
        e[ENTRY_LEN + 60] = 48;
        assert_eq!(parse(&e), Err(LoaderError::BadAlign { index: 1, align: 48 }));
    }
}
