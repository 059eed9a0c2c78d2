//! `fwcfg`: reads fw_cfg the way firmware does, through both interfaces, and checks that they
//! agree.
//!
//! Output, one line each: the signature, the feature bits, then for the port interface and for
//! DMA the file count and one `pio|dma <name> size <n> select 0x<k>` line per file, then
//! `fw_cfg: PIO and DMA agree on <n> files` (status 0) or a line saying what differed
//! (status 1: directories differ, 2: no signature or no DMA, 3: DMA error or too many files).

use iced_x86::code_asm::*;

use super::asm::{begin, print, Io, Runtime, Strings};

const SELECTOR: u32 = 0x510;
const DATA: u32 = 0x511;
const DMA_HIGH: u32 = 0x514;
const DMA_LOW: u32 = 0x518;
const KEY_SIGNATURE: u32 = 0;
const KEY_ID: u32 = 1;
const KEY_FILE_DIR: u32 = 0x19;
const DMA_CTL_READ: u32 = 2;
const DMA_CTL_SELECT: u32 = 8;
const DMA_CTL_ERROR: u32 = 1;
/// The guest's scratch memory, above its code.
const SCRATCH: u64 = 0x30_0000;
const DMA_DESC: u64 = SCRATCH;
const WORD_BUF: u64 = SCRATCH + 0x1000;
const PIO_BUF: u64 = SCRATCH + 0x2000;
const DMA_BUF: u64 = SCRATCH + 0x2_2000;
/// Directory entries the buffers hold (64 bytes each).
pub const MAX_FILES: u32 = 2048;
/// "QEMU" read as a little-endian u32.
const SIGNATURE: u32 = u32::from_le_bytes(*b"QEMU");

/// `select(key)`: port write of the 16-bit selector.
fn select(a: &mut CodeAssembler, key: u32) -> Result<(), IcedError> {
    a.mov(dx, SELECTOR)?;
    a.mov(eax, key)?;
    a.out(dx, ax)
}

/// Reads `ecx` bytes from the data port to `rdi` with `rep insb`.
fn read_data(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, DATA)?;
    a.rep().insb()
}

fn fail(a: &mut CodeAssembler, rt: &Runtime, msg: CodeLabel, status: u32) -> Result<(), IcedError> {
    print(a, rt, msg)?;
    a.mov(eax, status)?;
    a.jmp(rt.exit)
}

pub fn emit(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let rt = begin(a, Io::Port)?;
    let mut s = Strings::default();
    let s_sig = s.add(a, "fw_cfg signature: ");
    let s_feat = s.add(a, "fw_cfg features: ");
    let s_nl = s.add(a, "\n");
    let s_pio = s.add(a, "fw_cfg PIO directory: ");
    let s_dma = s.add(a, "fw_cfg DMA directory: ");
    let s_files = s.add(a, " files\n");
    let s_pio_e = s.add(a, "pio ");
    let s_dma_e = s.add(a, "dma ");
    let s_size = s.add(a, " size ");
    let s_select = s.add(a, " select ");
    let s_agree = s.add(a, "fw_cfg: PIO and DMA agree on ");
    let s_differ = s.add(a, "fw_cfg: PIO and DMA directories differ\n");
    let s_nosig = s.add(a, "fw_cfg: bad signature\n");
    let s_nodma = s.add(a, "fw_cfg: no DMA interface\n");
    let s_dmaerr = s.add(a, "fw_cfg: DMA transfer failed\n");
    let s_many = s.add(a, "fw_cfg: too many files\n");
    let mut bad_sig = a.create_label();
    let mut no_dma = a.create_label();
    let mut dma_err = a.create_label();
    let mut too_many = a.create_label();
    let mut differ = a.create_label();
    let mut entries = a.create_label();

    // Signature.
    select(a, KEY_SIGNATURE)?;
    a.mov(edi, WORD_BUF as u32)?;
    a.mov(ecx, 4u32)?;
    read_data(a)?;
    a.mov(byte_ptr(WORD_BUF + 4), 0u32)?;
    print(a, &rt, s_sig)?;
    a.mov(esi, WORD_BUF as u32)?;
    a.call(rt.puts)?;
    print(a, &rt, s_nl)?;
    a.cmp(dword_ptr(WORD_BUF), SIGNATURE)?;
    a.jne(bad_sig)?;

    // Feature bits (little-endian u32).
    select(a, KEY_ID)?;
    a.mov(edi, WORD_BUF as u32)?;
    a.mov(ecx, 4u32)?;
    read_data(a)?;
    print(a, &rt, s_feat)?;
    a.mov(eax, dword_ptr(WORD_BUF))?;
    a.mov(r14d, eax)?;
    a.call(rt.put_hex)?;
    print(a, &rt, s_nl)?;
    a.test(r14d, 2u32)?;
    a.jz(no_dma)?;

    // Directory through the data port: be32 count, then the entries.
    select(a, KEY_FILE_DIR)?;
    a.mov(edi, PIO_BUF as u32)?;
    a.mov(ecx, 4u32)?;
    read_data(a)?;
    a.mov(eax, dword_ptr(PIO_BUF))?;
    a.bswap(eax)?;
    a.mov(r12d, eax)?;
    a.cmp(r12d, MAX_FILES)?;
    a.ja(too_many)?;
    a.mov(ecx, r12d)?;
    a.shl(ecx, 6)?;
    read_data(a)?;
    print(a, &rt, s_pio)?;
    a.mov(eax, r12d)?;
    a.call(rt.put_dec)?;
    print(a, &rt, s_files)?;
    a.mov(ebx, (PIO_BUF + 4) as u32)?;
    a.mov(r15d, r12d)?;
    a.lea(rbp, ptr(s_pio_e))?;
    a.call(entries)?;

    // The same directory by DMA into a buffer pre-filled with 0xff.
    a.mov(edi, DMA_BUF as u32)?;
    a.mov(ecx, r12d)?;
    a.shl(ecx, 6)?;
    a.add(ecx, 4u32)?;
    a.mov(r13d, ecx)?;
    a.mov(al, 0xffu32)?;
    a.rep().stosb()?;
    a.mov(eax, (KEY_FILE_DIR << 16) | DMA_CTL_SELECT | DMA_CTL_READ)?;
    a.bswap(eax)?;
    a.mov(dword_ptr(DMA_DESC), eax)?;
    a.mov(eax, r13d)?;
    a.bswap(eax)?;
    a.mov(dword_ptr(DMA_DESC + 4), eax)?;
    a.mov(rax, DMA_BUF)?;
    a.bswap(rax)?;
    a.mov(qword_ptr(DMA_DESC + 8), rax)?;
    a.mov(dx, DMA_HIGH)?;
    a.xor(eax, eax)?;
    a.out(dx, eax)?;
    a.mov(dx, DMA_LOW)?;
    a.mov(eax, DMA_DESC as u32)?;
    a.bswap(eax)?;
    a.out(dx, eax)?;
    a.mov(eax, dword_ptr(DMA_DESC))?;
    a.bswap(eax)?;
    a.test(eax, DMA_CTL_ERROR)?;
    a.jnz(dma_err)?;
    a.test(eax, eax)?;
    a.jnz(dma_err)?;
    a.mov(eax, dword_ptr(DMA_BUF))?;
    a.bswap(eax)?;
    a.mov(r13d, eax)?;
    print(a, &rt, s_dma)?;
    a.mov(eax, r13d)?;
    a.call(rt.put_dec)?;
    print(a, &rt, s_files)?;
    a.cmp(r13d, MAX_FILES)?;
    a.ja(too_many)?;
    a.mov(ebx, (DMA_BUF + 4) as u32)?;
    a.mov(r15d, r13d)?;
    a.lea(rbp, ptr(s_dma_e))?;
    a.call(entries)?;

    // Compare.
    a.cmp(r12d, r13d)?;
    a.jne(differ)?;
    a.mov(esi, (PIO_BUF + 4) as u32)?;
    a.mov(edi, (DMA_BUF + 4) as u32)?;
    a.mov(ecx, r12d)?;
    a.shl(ecx, 6)?;
    a.cmp(ecx, ecx)?;
    a.repe().cmpsb()?;
    a.jne(differ)?;
    print(a, &rt, s_agree)?;
    a.mov(eax, r12d)?;
    a.call(rt.put_dec)?;
    print(a, &rt, s_files)?;
    a.xor(eax, eax)?;
    a.jmp(rt.exit)?;

    a.set_label(&mut differ)?;
    fail(a, &rt, s_differ, 1)?;
    a.set_label(&mut bad_sig)?;
    fail(a, &rt, s_nosig, 2)?;
    a.set_label(&mut no_dma)?;
    fail(a, &rt, s_nodma, 2)?;
    a.set_label(&mut dma_err)?;
    fail(a, &rt, s_dmaerr, 3)?;
    a.set_label(&mut too_many)?;
    fail(a, &rt, s_many, 3)?;

    // entries(rbx = first entry, r15 = count, rbp = line prefix): one line per entry.
    a.set_label(&mut entries)?;
    let mut done = a.create_label();
    a.test(r15d, r15d)?;
    a.jz(done)?;
    a.mov(rsi, rbp)?;
    a.call(rt.puts)?;
    a.lea(rsi, qword_ptr(rbx + 8))?;
    a.call(rt.puts)?;
    print(a, &rt, s_size)?;
    a.mov(eax, dword_ptr(rbx))?;
    a.bswap(eax)?;
    a.call(rt.put_dec)?;
    print(a, &rt, s_select)?;
    a.movzx(eax, word_ptr(rbx + 4))?;
    a.rol(ax, 8)?;
    a.call(rt.put_hex)?;
    print(a, &rt, s_nl)?;
    a.add(rbx, 64)?;
    a.dec(r15d)?;
    a.jmp(entries)?;
    a.set_label(&mut done)?;
    a.ret()?;

    s.emit(a)
}
