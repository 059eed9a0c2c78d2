//! The Linux boot protocol, 64-bit entry (Documentation/arch/x86/boot.rst): the kernel
//! (bzImage or ELF vmlinux) at 1 MiB, the command line, the initrd high in low memory, and a
//! zero page with the setup header, e820 map and pointers, whose address goes in RSI.
//!
//! Low-memory map used: zero page at 0x7000, command line at 0x20000 (see
//! [`crate::layout`]), page tables and GDT below 0x10000, kernel from 1 MiB, initrd at the top
//! of RAM below the kernel's `initrd_addr_max`.

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::files::BootFile;
use crate::layout;

/// One e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    /// 1 = RAM, 2 = reserved.
    pub kind: u32,
}

/// What to boot.
#[derive(Clone, Copy, Debug)]
pub struct LinuxBootConfig<'a> {
    pub kernel: &'a BootFile,
    pub initrd: Option<&'a BootFile>,
    pub cmdline: &'a str,
    pub e820: &'a [E820Entry],
}

/// Where the kernel was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// The zero page: goes in RSI.
    pub boot_params: u64,
    pub kernel_end: u64,
}

/// Errors loading a kernel; each names the file and the value.
#[derive(Debug, Error)]
pub enum LinuxBootError {
    #[error(
        "kernel {path} is not a kernel: no bzImage header (\"HdrS\" at 0x202) and no ELF magic; it looks like {found}"
    )]
    NotAKernel { path: String, found: String },
    #[error("kernel {path} speaks boot protocol {major}.{minor:02}; snapvisor needs 2.06 or later")]
    ProtocolTooOld { path: String, major: u16, minor: u16 },
    #[error(
        "kernel {path} cannot be loaded high (loadflags {flags:#x}) or has no 64-bit entry (xloadflags {xflags:#x})"
    )]
    Not64Bit { path: String, flags: u8, xflags: u16 },
    #[error(
        "kernel {path} ({size} bytes) does not fit in guest memory ({room} bytes from 1 MiB): give the VM more memory"
    )]
    KernelTooLarge { path: String, size: u64, room: u64 },
    #[error("loading kernel {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("initrd {path} ({size} bytes) does not fit between the end of the decompressed kernel ({kernel_end:#x}) and {limit:#x}: give the VM more memory")]
    InitrdTooLarge { path: String, size: u64, kernel_end: u64, limit: u64 },
    #[error("kernel command line of {len} bytes is longer than the kernel accepts ({max} bytes with its NUL)")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("{count} e820 entries; the zero page holds at most 128")]
    TooManyE820 { count: usize },
    #[error("writing {what} into guest memory at {addr:#x}: {reason}")]
    GuestMemory { what: &'static str, addr: u64, reason: String },
}

/// boot_params as plain bytes for vm-memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a bindgen-generated repr(C) struct of integers and arrays of
// integers: every bit pattern is a valid value and it holds no pointers or references.
unsafe impl ByteValued for ZeroPage {}

const HDRS: &[u8; 4] = b"HdrS";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// loadflags bit 0: the protected-mode code is loaded at 1 MiB.
const LOADED_HIGH: u8 = 1;
/// xloadflags bit 0: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// Defaults for kernels without a setup header (ELF).
const DEFAULT_CMDLINE_MAX: usize = 2048;
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

fn low_ram_end(e820: &[E820Entry]) -> u64 {
    e820.iter()
        .filter(|e| e.kind == 1 && e.addr <= layout::HIMEM_START && e.addr + e.size > layout::HIMEM_START)
        .map(|e| e.addr + e.size)
        .max()
        .unwrap_or(layout::HIMEM_START)
}

/// What a file that is no kernel looks like, without quoting a byte of it: the file may be
/// something its owner can read and the requester cannot.
fn describe(head: &[u8]) -> &'static str {
    match head {
        [] => "nothing (an empty file)",
        [0x1f, 0x8b, ..] => "gzip data",
        [0xfd, b'7', b'z', b'X', b'Z', ..] => "xz data",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd data",
        [b'0', b'7', b'0', b'7', b'0', ..] => "a cpio archive (an initrd?)",
        _ if head.iter().take(64).all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()) => "text",
        _ => "unrecognised binary data",
    }
}

/// Loads the kernel, command line and initrd and writes the zero page.
pub fn load_linux(mem: &GuestMemoryMmap, cfg: &LinuxBootConfig) -> Result<LoadedKernel, LinuxBootError> {
    let kpath = cfg.kernel.name.clone();
    let size = cfg.kernel.data.len() as u64;
    let head = &cfg.kernel.data[..cfg.kernel.data.len().min(0x300)];
    let mut file = Cursor::new(cfg.kernel.data.as_slice());
    let low_end = low_ram_end(cfg.e820);
    let room = low_end.saturating_sub(layout::HIMEM_START);
    let is_bzimage = head.get(0x202..0x206) == Some(HDRS.as_slice());
    let is_elf = head.get(0..4) == Some(ELF_MAGIC.as_slice());
    if !is_bzimage && !is_elf {
        return Err(LinuxBootError::NotAKernel { path: kpath, found: describe(head).into() });
    }
    if size > room {
        return Err(LinuxBootError::KernelTooLarge { path: kpath, size, room });
    }
    let load_err = |e: linux_loader::loader::Error| LinuxBootError::Load { path: kpath.clone(), reason: e.to_string() };
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let (entry, kernel_end, header) = if is_bzimage {
        let version = u16::from_le_bytes([head[0x206], head[0x207]]);
        if version < 0x206 {
            return Err(LinuxBootError::ProtocolTooOld { path: kpath, major: version >> 8, minor: version & 0xff });
        }
        let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
        let hdr = r
            .setup_header
            .ok_or_else(|| LinuxBootError::Load { path: kpath.clone(), reason: "no setup header".into() })?;
        let (flags, xflags) = (hdr.loadflags, hdr.xloadflags);
        if flags & LOADED_HIGH == 0 || xflags & XLF_KERNEL_64 == 0 {
            return Err(LinuxBootError::Not64Bit { path: kpath, flags, xflags });
        }
        // The kernel decompresses itself to pref_address (at least where it was loaded) and
        // needs init_size bytes there (protocol 2.10+): nothing may be placed below that end.
        let (init_size, pref) = (u64::from(hdr.init_size), hdr.pref_address);
        let runtime_end = if version >= 0x20a { pref.max(r.kernel_load.0).saturating_add(init_size) } else { 0 };
        (r.kernel_load.0 + 0x200, r.kernel_end.max(runtime_end), Some(hdr))
    } else {
        let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
        (r.kernel_load.0, r.kernel_end, None)
    };

    let mut params = ZeroPage::default();
    let p = &mut params.0;
    if let Some(h) = header {
        p.hdr = h;
    } else {
        p.hdr.boot_flag = 0xaa55;
        p.hdr.header = u32::from_le_bytes(*HDRS);
        p.hdr.kernel_alignment = 0x0100_0000;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.vid_mode = 0xffff;

    // Command line.
    let max = match header {
        Some(h) if h.cmdline_size > 0 => h.cmdline_size as usize + 1,
        _ => DEFAULT_CMDLINE_MAX,
    };
    if cfg.cmdline.len() + 1 > max {
        return Err(LinuxBootError::CmdlineTooLong { len: cfg.cmdline.len(), max });
    }
    let mut cmdline = Cmdline::new(max).map_err(|e| LinuxBootError::Cmdline(e.to_string()))?;
    if !cfg.cmdline.is_empty() {
        cmdline.insert_str(cfg.cmdline).map_err(|e| LinuxBootError::Cmdline(e.to_string()))?;
    }
    load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmdline).map_err(|e| LinuxBootError::GuestMemory {
        what: "the command line",
        addr: layout::CMDLINE,
        reason: e.to_string(),
    })?;
    p.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    p.hdr.cmdline_size = (cfg.cmdline.len() + 1) as u32;

    // Initrd: page-aligned, as high as the kernel allows in low RAM.
    if let Some(initrd) = cfg.initrd {
        let data = &initrd.data;
        let addr_max = header.map_or(DEFAULT_INITRD_ADDR_MAX, |h| u64::from(h.initrd_addr_max));
        let limit = low_end.min(addr_max + 1);
        let isize = data.len() as u64;
        let start = limit.checked_sub(isize).map(|s| s & !0xfff);
        let addr = match start {
            Some(a) if a >= kernel_end && isize > 0 => a,
            _ => {
                return Err(LinuxBootError::InitrdTooLarge {
                    path: initrd.name.clone(),
                    size: isize,
                    kernel_end,
                    limit,
                });
            }
        };
        mem.write_slice(data, GuestAddress(addr)).map_err(|e| LinuxBootError::GuestMemory {
            what: "the initrd",
            addr,
            reason: e.to_string(),
        })?;
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = isize as u32;
    }

    // e820.
    if cfg.e820.len() > p.e820_table.len() {
        return Err(LinuxBootError::TooManyE820 { count: cfg.e820.len() });
    }
    for (slot, e) in p.e820_table.iter_mut().zip(cfg.e820) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    p.e820_entries = cfg.e820.len() as u8;

    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE)).map_err(|e| LinuxBootError::GuestMemory {
        what: "the zero page",
        addr: layout::ZERO_PAGE,
        reason: e.to_string(),
    })?;
    Ok(LoadedKernel { entry, boot_params: layout::ZERO_PAGE, kernel_end })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).expect("memory")
    }

    fn e820(mib: u64) -> Vec<E820Entry> {
        vec![
            E820Entry { addr: 0, size: 0x9fc00, kind: 1 },
            E820Entry { addr: 0x10_0000, size: (mib << 20) - 0x10_0000, kind: 1 },
        ]
    }

    /// A synthetic bzImage: a setup header of protocol `version` and a payload.
    fn bzimage(version: u16, payload: usize) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(HDRS);
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = LOADED_HIGH;
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        // Decompresses to 16 MiB and needs 8 MiB there.
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes());
        img
    }

    #[test]
    fn the_initrd_stays_clear_of_the_decompressed_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = file(&dir, "k", &bzimage(0x20f, 4096));
        let i = file(&dir, "i", &[1; 4096]);
        // 20 MiB: the decompressed kernel needs up to 24 MiB, the initrd has nowhere to go.
        let (m, e) = (mem(20), e820(20));
        let err = load_linux(&m, &LinuxBootConfig { kernel: &k, initrd: Some(&i), cmdline: "", e820: &e })
            .expect_err("overlap");
        assert!(matches!(err, LinuxBootError::InitrdTooLarge { kernel_end: 0x180_0000, .. }), "{err}");
        let (m, e) = (mem(64), e820(64));
        let l = load_linux(&m, &LinuxBootConfig { kernel: &k, initrd: Some(&i), cmdline: "", e820: &e }).expect("fits");
        assert_eq!(l.kernel_end, 0x180_0000);
    }

    /// A file written to `dir` and read back the way `snapvisor run` reads one.
    fn file(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> BootFile {
        let p = dir.path().join(name);
        std::fs::write(&p, data).expect("write");
        BootFile::read_path("kernel", &p, 1 << 30).expect("read back")
    }

    #[test]
    fn bzimage_with_initrd_and_cmdline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = file(&dir, "k", &bzimage(0x20f, 64 * 1024));
        let i = file(&dir, "i", &[0x5a; 10_000]);
        let m = mem(64);
        let e = e820(64);
        let l = load_linux(&m, &LinuxBootConfig { kernel: &k, initrd: Some(&i), cmdline: "console=ttyS0", e820: &e })
            .expect("load");
        assert_eq!(l.entry, 0x10_0200);
        let zp: ZeroPage = m.read_obj(GuestAddress(l.boot_params)).expect("zero page");
        let p = zp.0;
        let (ptr, img, isz, n, tl) =
            (p.hdr.cmd_line_ptr, p.hdr.ramdisk_image, p.hdr.ramdisk_size, p.e820_entries, p.hdr.type_of_loader);
        let mut cl = [0u8; 14];
        m.read_slice(&mut cl, GuestAddress(u64::from(ptr))).expect("cmdline");
        assert_eq!(&cl, b"console=ttyS0\0");
        assert_eq!(isz, 10_000);
        assert_eq!(u64::from(img) % 4096, 0);
        assert!(u64::from(img) + 10_000 <= 64 << 20);
        let mut first = [0u8; 1];
        m.read_slice(&mut first, GuestAddress(u64::from(img))).expect("initrd");
        assert_eq!(first[0], 0x5a);
        assert_eq!(n, 2);
        assert_eq!(tl, 0xff);
    }

    /// A minimal ELF64 vmlinux: one PT_LOAD of `code` at physical 1 MiB, entry at 1 MiB + 0x10.
    fn elf(code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[0..4].copy_from_slice(ELF_MAGIC);
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0010u64.to_le_bytes()); // entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
        f[ph + 16..ph + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes()); // vaddr
        f[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // paddr
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // filesz
        f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // memsz
        f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn elf_vmlinux_is_loaded_at_its_physical_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let code: Vec<u8> = (0..64u8).collect();
        let k = file(&dir, "vmlinux", &elf(&code));
        let m = mem(16);
        let e = e820(16);
        let l =
            load_linux(&m, &LinuxBootConfig { kernel: &k, initrd: None, cmdline: "quiet", e820: &e }).expect("load");
        assert_eq!(l.entry, 0x10_0010);
        let mut got = vec![0u8; 64];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).expect("kernel bytes");
        assert_eq!(got, code);
        let zp: ZeroPage = m.read_obj(GuestAddress(l.boot_params)).expect("zero page");
        let (flag, header) = (zp.0.hdr.boot_flag, zp.0.hdr.header);
        assert_eq!(flag, 0xaa55);
        assert_eq!(header, u32::from_le_bytes(*HDRS));
    }

    #[test]
    fn bad_kernels_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = mem(16);
        let e = e820(16);
        let r = BootFile::read_path("kernel", &dir.path().join("missing"), 1 << 30);
        assert!(matches!(r, Err(crate::boot::files::BootFileError::Missing { .. })));
        let junk = file(&dir, "junk", &[1, 2, 3, 4, 5]);
        let err =
            load_linux(&m, &LinuxBootConfig { kernel: &junk, initrd: None, cmdline: "", e820: &e }).expect_err("junk");
        assert!(err.to_string().contains("is not a kernel") && err.to_string().contains("unrecognised"), "{err}");
        // Never a byte of the file: it may be one the requester cannot read (/etc/shadow).
        assert!(!err.to_string().contains("01 02"), "{err}");
        let text = file(&dir, "shadow", b"root:*:19000:0:99999:7:::\n");
        let err =
            load_linux(&m, &LinuxBootConfig { kernel: &text, initrd: None, cmdline: "", e820: &e }).expect_err("text");
        assert!(err.to_string().ends_with("it looks like text") && !err.to_string().contains("root"), "{err}");
        let old = file(&dir, "old", &bzimage(0x204, 1024));
        let err =
            load_linux(&m, &LinuxBootConfig { kernel: &old, initrd: None, cmdline: "", e820: &e }).expect_err("old");
        assert!(matches!(err, LinuxBootError::ProtocolTooOld { major: 2, minor: 4, .. }));
        let big = file(&dir, "big", &bzimage(0x20f, 20 << 20));
        let err =
            load_linux(&m, &LinuxBootConfig { kernel: &big, initrd: None, cmdline: "", e820: &e }).expect_err("big");
        assert!(matches!(err, LinuxBootError::KernelTooLarge { .. }), "{err}");
    }

    #[test]
    fn cmdline_initrd_and_e820_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = file(&dir, "k", &bzimage(0x20f, 4096));
        let m = mem(16);
        let e = e820(16);
        let long = "x".repeat(4000);
        let err =
            load_linux(&m, &LinuxBootConfig { kernel: &k, initrd: None, cmdline: &long, e820: &e }).expect_err("long");
        assert!(matches!(err, LinuxBootError::CmdlineTooLong { len: 4000, max: 2048 }));
        let huge = file(&dir, "huge", &vec![0u8; 15 << 20]);
        let err = load_linux(&m, &LinuxBootConfig { kernel: &k, initrd: Some(&huge), cmdline: "", e820: &e })
            .expect_err("initrd");
        assert!(matches!(err, LinuxBootError::InitrdTooLarge { .. }));
        let err = BootFile::read_path("initrd", &dir.path().join("nope"), 1 << 30).expect_err("missing");
        assert!(err.to_string().contains("nope"));
        let mut many = e.clone();
        many.extend(vec![E820Entry { addr: 0xf000_0000, size: 4096, kind: 2 }; 127]);
        let err =
            load_linux(&m, &LinuxBootConfig { kernel: &k, initrd: None, cmdline: "", e820: &many }).expect_err("e820");
        assert!(matches!(err, LinuxBootError::TooManyE820 { count: 129 }));
    }
}
