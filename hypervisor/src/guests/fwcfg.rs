//! `fwcfg`: reads fw_cfg the way firmware does, through both interfaces, and checks that they
//! agree.
//!
//! Output, one line each: the signature, the feature bits, then for the port interface and for
//! DMA the file count and one `pio|dma <name> size <n> select 0x<k>` line per file, then one
//! `file <name> size <n> pio-checksum 0x<h> dma-checksum 0x<h>` line per file, its contents
//! read through the data port and through DMA (in 64 KiB pieces, the DMA buffer pre-filled
//! with 0xa5 each time so that a transfer that wrote nothing cannot pass), then
//! `fw_cfg: PIO and DMA agree on <n> files` (status 0) or a line saying what differed
//! (status 1: directories differ, 2: no signature or no DMA, 3: DMA error or too many files,
//! 4: a file's contents differ).
//!
//! The checksum is 64-bit FNV-1a ([`checksum`]), so a restored VM's files can be compared
//! with the original's from the command line.

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
/// File contents are read here, a piece at a time.
const FILE_BUF: u64 = SCRATCH + 0x5_0000;
const PIECE: u32 = 0x1_0000;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x100_0000_01b3;
/// Directory entries the buffers hold (64 bytes each).
pub const MAX_FILES: u32 = 2048;
/// "QEMU" read as a little-endian u32.
const SIGNATURE: u32 = u32::from_le_bytes(*b"QEMU");

/// The checksum the guest prints for a file's contents: 64-bit FNV-1a.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(FNV_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// `ecx` = the smaller of `r10d` and [`PIECE`]; `r10d` -= `ecx`.
fn next_piece(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut full = a.create_label();
    a.mov(ecx, PIECE)?;
    a.cmp(r10d, ecx)?;
    a.jae(full)?;
    a.mov(ecx, r10d)?;
    a.set_label(&mut full)?;
    a.sub(r10d, ecx)
}

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
    let s_file = s.add(a, "file ");
    let s_pio_sum = s.add(a, " pio-checksum ");
    let s_dma_sum = s.add(a, " dma-checksum ");
    let s_contents = s.add(a, "fw_cfg: PIO and DMA read different contents\n");
    let mut contents_differ = a.create_label();
    let mut hash = a.create_label();
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

    // Every file's contents through the data port (r13 = checksum) and by DMA (r14), a piece
    // at a time; rbx = directory entry, r15 = entries left, r10 = bytes left, r11 = key/control.
    let mut next_file = a.create_label();
    let mut files_done = a.create_label();
    let mut pio_piece = a.create_label();
    let mut pio_done = a.create_label();
    let mut dma_piece = a.create_label();
    let mut dma_done = a.create_label();
    a.mov(ebx, (PIO_BUF + 4) as u32)?;
    a.mov(r15d, r12d)?;
    a.set_label(&mut next_file)?;
    a.test(r15d, r15d)?;
    a.jz(files_done)?;
    a.mov(r13, FNV_OFFSET)?;
    a.movzx(eax, word_ptr(rbx + 4))?;
    a.rol(ax, 8)?;
    a.mov(r11d, eax)?;
    a.mov(dx, SELECTOR)?;
    a.out(dx, ax)?;
    a.mov(r10d, dword_ptr(rbx))?;
    a.bswap(r10d)?;
    a.set_label(&mut pio_piece)?;
    a.test(r10d, r10d)?;
    a.jz(pio_done)?;
    next_piece(a)?;
    a.mov(edi, FILE_BUF as u32)?;
    a.push(rcx)?;
    read_data(a)?;
    a.pop(rcx)?;
    a.mov(r8, r13)?;
    a.mov(esi, FILE_BUF as u32)?;
    a.call(hash)?;
    a.mov(r13, r8)?;
    a.jmp(pio_piece)?;
    a.set_label(&mut pio_done)?;

    a.mov(r14, FNV_OFFSET)?;
    a.shl(r11d, 16)?;
    a.or(r11d, DMA_CTL_SELECT | DMA_CTL_READ)?;
    a.mov(r10d, dword_ptr(rbx))?;
    a.bswap(r10d)?;
    a.set_label(&mut dma_piece)?;
    a.test(r10d, r10d)?;
    a.jz(dma_done)?;
    next_piece(a)?;
    a.push(rcx)?;
    a.mov(edi, FILE_BUF as u32)?;
    a.mov(al, 0xa5u32)?;
    a.rep().stosb()?;
    a.pop(rcx)?;
    a.mov(eax, r11d)?;
    a.bswap(eax)?;
    a.mov(dword_ptr(DMA_DESC), eax)?;
    a.mov(eax, ecx)?;
    a.bswap(eax)?;
    a.mov(dword_ptr(DMA_DESC + 4), eax)?;
    a.mov(rax, FILE_BUF)?;
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
    a.test(eax, eax)?;
    a.jnz(dma_err)?;
    // Later pieces go on from where the last one stopped.
    a.mov(r11d, DMA_CTL_READ)?;
    a.mov(r8, r14)?;
    a.mov(esi, FILE_BUF as u32)?;
    a.call(hash)?;
    a.mov(r14, r8)?;
    a.jmp(dma_piece)?;
    a.set_label(&mut dma_done)?;

    print(a, &rt, s_file)?;
    a.lea(rsi, qword_ptr(rbx + 8))?;
    a.call(rt.puts)?;
    print(a, &rt, s_size)?;
    a.mov(eax, dword_ptr(rbx))?;
    a.bswap(eax)?;
    a.call(rt.put_dec)?;
    print(a, &rt, s_pio_sum)?;
    a.mov(rax, r13)?;
    a.call(rt.put_hex)?;
    print(a, &rt, s_dma_sum)?;
    a.mov(rax, r14)?;
    a.call(rt.put_hex)?;
    print(a, &rt, s_nl)?;
    a.cmp(r13, r14)?;
    a.jne(contents_differ)?;
    a.add(rbx, 64)?;
    a.dec(r15d)?;
    a.jmp(next_file)?;
    a.set_label(&mut files_done)?;

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
    a.set_label(&mut contents_differ)?;
    fail(a, &rt, s_contents, 4)?;

    // hash(rsi = bytes, ecx = count, r8 = checksum so far): FNV-1a into r8. Clobbers rax,
    // rcx, rsi, r9.
    a.set_label(&mut hash)?;
    let mut byte = a.create_label();
    let mut hashed = a.create_label();
    a.mov(r9, FNV_PRIME)?;
    a.set_label(&mut byte)?;
    a.test(ecx, ecx)?;
    a.jz(hashed)?;
    a.movzx(eax, byte_ptr(rsi))?;
    a.xor(r8, rax)?;
    a.imul_2(r8, r9)?;
    a.inc(rsi)?;
    a.dec(ecx)?;
    a.jmp(byte)?;
    a.set_label(&mut hashed)?;
    a.ret()?;

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
