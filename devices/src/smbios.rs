//! SMBIOS tables for firmware VMs, served through fw_cfg the way QEMU serves them, so that
//! SeaBIOS copies them instead of building its own (which it does byte by byte in CPL0 code,
//! slow under an emulating KVM).
//!
//! Two fw_cfg files:
//! - [`ANCHOR_FILE`] (`etc/smbios/smbios-anchor`): the SMBIOS 2.x entry point, 31 bytes, all
//!   little-endian:
//!
//!   | off | size | field                                             |
//!   |-----|------|---------------------------------------------------|
//!   | 0   | 4    | `_SM_`                                            |
//!   | 4   | 1    | checksum: bytes 0..0x10 sum to 0                  |
//!   | 5   | 1    | entry point length, 0x1f                          |
//!   | 6   | 2    | SMBIOS version, major 2 then minor 8              |
//!   | 8   | 2    | largest structure, formatted part plus strings    |
//!   | 10  | 1    | entry point revision, 0                           |
//!   | 11  | 5    | formatted area, zero                              |
//!   | 16  | 5    | `_DMI_`                                           |
//!   | 21  | 1    | intermediate checksum: bytes 0x10..0x1f sum to 0  |
//!   | 22  | 2    | structure table length                            |
//!   | 24  | 4    | structure table address: 0, the firmware fills it |
//!   | 28  | 2    | number of structures                              |
//!   | 30  | 1    | BCD revision, 0x28                                |
//!
//! - [`TABLES_FILE`] (`etc/smbios/smbios-tables`): the structures, back to back. Each is a
//!   header (type u8, length u8 of the formatted part, handle u16), the rest of its formatted
//!   part, then its strings, each NUL-terminated, then one more NUL; a structure without
//!   strings ends in two NULs. A string field holds a 1-based index into that set, 0 for none.
//!
//! SeaBIOS (rel-1.16.2, `smbios_romfile_setup`) takes the files only if the anchor is exactly
//! the size of its entry-point struct (31 bytes) and the tables file is exactly the anchor's
//! structure table length; otherwise it silently builds its own tables. It walks the
//! structures looking for a type 0 and adds its own type 0 only when there is none; it then
//! places the tables, fills in the address and fixes both checksums.
//!
//! The structures, each at the length SMBIOS 2.8 gives it: type 0 BIOS information, type 1
//! system information (with the VM's UUID), type 3 chassis, one type 4 processor per vCPU,
//! type 16 physical memory array, type 17 memory devices (one per 16 GiB, as QEMU splits RAM),
//! type 19 memory array mapped addresses (RAM below 4 GiB, RAM above it), type 32 boot
//! information and the type 127 end of table. Handles are the structures' indexes, so they are
//! unique. Everything is built from [`SmbiosConfig`], so the same machine gets the same bytes
//! (except for the UUID it is given).

/// fw_cfg name of the entry point.
pub const ANCHOR_FILE: &str = "etc/smbios/smbios-anchor";
/// fw_cfg name of the structure table.
pub const TABLES_FILE: &str = "etc/smbios/smbios-tables";
/// Size of the SMBIOS 2.1+ (32-bit) entry point.
pub const ANCHOR_LEN: usize = 0x1f;
/// SMBIOS version the structures follow.
pub const VERSION: (u8, u8) = (2, 8);
/// Manufacturer of the system, chassis and processors.
pub const MANUFACTURER: &str = "snapvisor";

/// Largest memory device (type 17) described: bigger RAM is split, as QEMU does.
const MAX_DIMM: u64 = 16 << 30;
const GIB4: u64 = 1 << 32;

/// What a VM's SMBIOS tables say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmbiosConfig {
    /// The system UUID in RFC 4122 (big-endian) byte order, as fw_cfg key 0x02 carries it.
    /// Type 1 stores its first three fields little-endian, as SMBIOS 2.6+ says.
    pub uuid: [u8; 16],
    pub vcpus: u8,
    pub ram_below_4g: u64,
    pub ram_above_4g: u64,
    /// Type 0: who made the firmware, its version, its release date (`mm/dd/yyyy`).
    pub bios_vendor: String,
    pub bios_version: String,
    pub bios_date: String,
    /// Size of the firmware image in bytes.
    pub bios_size: u64,
    /// Type 1 product name and version.
    pub product: String,
    pub product_version: String,
}

/// Errors building the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SmbiosError {
    #[error("SMBIOS tables need at least one vCPU")]
    NoCpus,
    #[error("SMBIOS structure table is {len} bytes; the 2.x entry point holds at most 65535")]
    TooLarge { len: usize },
    #[error("SMBIOS structure type {kind} has {count} strings; at most 255")]
    TooManyStrings { kind: u8, count: usize },
}

/// The two fw_cfg files' contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmbiosBlobs {
    /// [`ANCHOR_FILE`]: the entry point, with its table address 0.
    pub anchor: Vec<u8>,
    /// [`TABLES_FILE`]: the structures.
    pub tables: Vec<u8>,
}

/// One structure being built: its formatted part and its strings.
struct Structure {
    formatted: Vec<u8>,
    strings: Vec<Vec<u8>>,
}

impl Structure {
    /// A structure of `kind` whose formatted part is `len` bytes (header included), zeroed.
    fn new(kind: u8, len: u8, handle: u16) -> Structure {
        let mut formatted = vec![0u8; usize::from(len)];
        formatted[0] = kind;
        formatted[1] = len;
        formatted[2..4].copy_from_slice(&handle.to_le_bytes());
        Structure { formatted, strings: Vec::new() }
    }

    fn u8(&mut self, off: usize, v: u8) {
        self.formatted[off] = v;
    }

    fn u16(&mut self, off: usize, v: u16) {
        self.formatted[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, off: usize, v: u32) {
        self.formatted[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, off: usize, v: u64) {
        self.formatted[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Adds string `s` and stores its index at `off`; an empty string is index 0 (none).
    /// NULs would end the string early, so they are dropped. Indexes past 255 are caught
    /// by [`Structure::encode`].
    fn string(&mut self, off: usize, s: &str) {
        let bytes: Vec<u8> = s.bytes().filter(|&b| b != 0).collect();
        if bytes.is_empty() {
            self.formatted[off] = 0;
            return;
        }
        self.strings.push(bytes);
        self.formatted[off] = u8::try_from(self.strings.len()).unwrap_or(0);
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<usize, SmbiosError> {
        if self.strings.len() > 255 {
            return Err(SmbiosError::TooManyStrings { kind: self.formatted[0], count: self.strings.len() });
        }
        let start = out.len();
        out.extend_from_slice(&self.formatted);
        for s in &self.strings {
            out.extend_from_slice(s);
            out.push(0);
        }
        if self.strings.is_empty() {
            out.push(0);
        }
        out.push(0);
        Ok(out.len() - start)
    }
}

/// Sum of `bytes`, modulo 256.
fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

/// Builds the entry point and the structures for `cfg`.
pub fn build(cfg: &SmbiosConfig) -> Result<SmbiosBlobs, SmbiosError> {
    if cfg.vcpus == 0 {
        return Err(SmbiosError::NoCpus);
    }
    let mut list: Vec<Structure> = Vec::new();
    // The next structure's handle is its index.
    let next = |kind: u8, len: u8, list: &[Structure]| Structure::new(kind, len, list.len() as u16);

    // Type 0, BIOS information (2.4+: 0x18 bytes).
    let mut t = next(0, 0x18, &list);
    t.string(4, &cfg.bios_vendor);
    t.string(5, &cfg.bios_version);
    // The firmware's low copy starts at 0xe0000 (its last 128 KiB).
    t.u16(6, 0xe000);
    t.string(8, &cfg.bios_date);
    // ROM size: 64 KiB * (n + 1).
    let rom_units = cfg.bios_size.div_ceil(64 << 10).clamp(1, 256);
    t.u8(9, (rom_units - 1) as u8);
    // Characteristics: bit 3, "BIOS characteristics are not supported" (as QEMU sets).
    t.u64(0x0a, 1 << 3);
    // Extension byte 2, bit 2: targeted content distribution supported (as QEMU sets).
    t.u8(0x13, 1 << 2);
    // System BIOS release unknown (0, 0 as QEMU); no embedded controller (0xff).
    t.u8(0x16, 0xff);
    t.u8(0x17, 0xff);
    list.push(t);

    // Type 1, system information (2.4+: 0x1b bytes).
    let mut t = next(1, 0x1b, &list);
    t.string(4, MANUFACTURER);
    t.string(5, &cfg.product);
    t.string(6, &cfg.product_version);
    let mut uuid = cfg.uuid;
    uuid[0..4].reverse();
    uuid[4..6].reverse();
    uuid[6..8].reverse();
    t.formatted[8..24].copy_from_slice(&uuid);
    t.u8(0x18, 0x06); // wake-up type: power switch
    t.string(0x1a, "Virtual Machine"); // family
    list.push(t);

    // Type 3, system enclosure (2.7+: 0x16 bytes, no contained elements).
    let mut t = next(3, 0x16, &list);
    t.string(4, MANUFACTURER);
    t.u8(5, 0x01); // type: other
    t.u8(9, 0x03); // boot-up state: safe
    t.u8(0x0a, 0x03); // power supply state: safe
    t.u8(0x0b, 0x03); // thermal state: safe
    t.u8(0x0c, 0x02); // security status: unknown
    list.push(t);

    // Type 4, one processor per vCPU (2.6+: 0x2a bytes).
    for cpu in 0..cfg.vcpus {
        let mut t = next(4, 0x2a, &list);
        t.string(4, &format!("CPU {cpu}"));
        t.u8(5, 0x03); // central processor
        t.u8(6, 0xfe); // family: see family 2
        t.string(7, MANUFACTURER);
        t.u16(0x14, 2000); // max speed, MHz (QEMU's default)
        t.u16(0x16, 2000); // current speed
        t.u8(0x18, 0x41); // socket populated, CPU enabled
        t.u8(0x19, 0x01); // upgrade: other
        t.u16(0x1a, 0xffff); // no L1/L2/L3 cache structures
        t.u16(0x1c, 0xffff);
        t.u16(0x1e, 0xffff);
        t.u8(0x23, 1); // cores
        t.u8(0x24, 1); // cores enabled
        t.u8(0x25, 1); // threads
        t.u16(0x26, 0x02); // characteristics: unknown
        t.u16(0x28, 0x01); // family 2: other
        list.push(t);
    }

    // Type 16, the physical memory array (2.7+: 0x17 bytes).
    let total = cfg.ram_below_4g + cfg.ram_above_4g;
    let dimms = total.div_ceil(MAX_DIMM).max(1);
    let array = list.len() as u16;
    let mut t = next(16, 0x17, &list);
    t.u8(4, 0x01); // location: other
    t.u8(5, 0x03); // use: system memory
    t.u8(6, 0x06); // error correction: multi-bit ECC (as QEMU says)
    let kib = total / 1024;
    if kib < 0x8000_0000 {
        t.u32(7, kib as u32);
    } else {
        t.u32(7, 0x8000_0000);
        t.u64(0x0f, total);
    }
    t.u16(0x0b, 0xfffe); // no error information
    t.u16(0x0d, dimms as u16);
    list.push(t);

    // Type 17, memory devices of at most 16 GiB (2.8: 0x28 bytes).
    for i in 0..dimms {
        let size = (total - i * MAX_DIMM).min(MAX_DIMM);
        let mut t = next(17, 0x28, &list);
        t.u16(4, array);
        t.u16(6, 0xfffe); // no error information
        t.u16(8, 0xffff); // total width unknown
        t.u16(0x0a, 0xffff); // data width unknown
        let mib = size >> 20;
        if mib < 0x7fff {
            t.u16(0x0c, mib as u16);
        } else {
            t.u16(0x0c, 0x7fff);
            t.u32(0x1c, mib as u32);
        }
        t.u8(0x0e, 0x09); // form factor: DIMM
        t.string(0x10, &format!("DIMM {i}"));
        t.u8(0x12, 0x07); // type: RAM
        t.u16(0x13, 0x02); // type detail: other
        t.string(0x17, MANUFACTURER);
        list.push(t);
    }

    // Type 19, where the array's memory is mapped (2.7+: 0x1f bytes).
    for (start, len) in [(0, cfg.ram_below_4g), (GIB4, cfg.ram_above_4g)] {
        if len == 0 {
            continue;
        }
        let end = start + len - 1;
        let mut t = next(19, 0x1f, &list);
        if end / 1024 < 0xffff_ffff {
            t.u32(4, (start / 1024) as u32);
            t.u32(8, (end / 1024) as u32);
        } else {
            t.u32(4, 0xffff_ffff);
            t.u32(8, 0xffff_ffff);
            t.u64(0x0f, start);
            t.u64(0x17, end);
        }
        t.u16(0x0c, array);
        t.u8(0x0e, dimms.min(255) as u8); // partition width: devices that form a row
        list.push(t);
    }

    // Type 32, boot information: no errors (0x0b bytes).
    list.push(next(32, 0x0b, &list));
    // Type 127, end of table.
    list.push(next(127, 0x04, &list));

    let mut tables = Vec::new();
    let mut max = 0;
    for s in &list {
        max = max.max(s.encode(&mut tables)?);
    }
    let len = u16::try_from(tables.len()).map_err(|_| SmbiosError::TooLarge { len: tables.len() })?;
    let count = u16::try_from(list.len()).map_err(|_| SmbiosError::TooLarge { len: tables.len() })?;

    let mut a = vec![0u8; ANCHOR_LEN];
    a[0..4].copy_from_slice(b"_SM_");
    a[5] = ANCHOR_LEN as u8;
    a[6] = VERSION.0;
    a[7] = VERSION.1;
    a[8..10].copy_from_slice(&(max as u16).to_le_bytes());
    a[0x10..0x15].copy_from_slice(b"_DMI_");
    a[0x16..0x18].copy_from_slice(&len.to_le_bytes());
    a[0x1c..0x1e].copy_from_slice(&count.to_le_bytes());
    a[0x1e] = (VERSION.0 << 4) | VERSION.1;
    a[0x15] = sum(&a[0x10..]).wrapping_neg();
    a[4] = sum(&a[..0x10]).wrapping_neg();
    Ok(SmbiosBlobs { anchor: a, tables })
}

/// One structure of a table, as [`parse`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub kind: u8,
    pub handle: u16,
    /// The formatted part, header included.
    pub formatted: Vec<u8>,
    pub strings: Vec<String>,
}

impl Parsed {
    /// The string a field at `off` refers to, if any.
    pub fn string_at(&self, off: usize) -> Option<&str> {
        let i = usize::from(*self.formatted.get(off)?);
        self.strings.get(i.checked_sub(1)?).map(String::as_str)
    }
}

/// Walks a structure table (untrusted bytes): every structure's formatted part must fit and
/// its string set end in a double NUL within the table. Returns the structures, or what is
/// wrong and where.
pub fn parse(tables: &[u8]) -> Result<Vec<Parsed>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < tables.len() {
        let rest = &tables[pos..];
        if rest.len() < 4 {
            return Err(format!("partial header at {pos:#x}"));
        }
        let len = usize::from(rest[1]);
        if len < 4 || len > rest.len() {
            return Err(format!("structure at {pos:#x}: length {len} does not fit"));
        }
        let mut strings = Vec::new();
        let mut p = len;
        // A string set: strings each ending in NUL, then one more NUL; none at all is "\0\0".
        if rest.get(p..p + 2) == Some(&[0, 0]) {
            p += 2;
        } else {
            loop {
                let end = rest[p..]
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(format!("structure at {pos:#x}: unterminated string"))?;
                strings.push(String::from_utf8_lossy(&rest[p..p + end]).into_owned());
                p += end + 1;
                match rest.get(p) {
                    Some(0) => {
                        p += 1;
                        break;
                    }
                    Some(_) => {}
                    None => return Err(format!("structure at {pos:#x}: no final NUL")),
                }
            }
        }
        out.push(Parsed {
            kind: rest[0],
            handle: u16::from_le_bytes([rest[2], rest[3]]),
            formatted: rest[..len].to_vec(),
            strings,
        });
        pos += p;
    }
    Ok(out)
}

/// Offers `blobs` to the firmware as [`ANCHOR_FILE`] and [`TABLES_FILE`], read-only.
pub fn add_files(fw: &mut crate::fw_cfg::FwCfg, blobs: &SmbiosBlobs) -> Result<(), crate::fw_cfg::FwCfgError> {
    fw.add_file(ANCHOR_FILE, blobs.anchor.clone())?;
    fw.add_file(TABLES_FILE, blobs.tables.clone())
}

#[cfg(test)]
#[path = "smbios_tests.rs"]
mod tests;
