//! Register state for 64-bit entry: flat segments from the boot GDT, identity-mapped page
//! tables with 2 MiB pages, long mode on.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::CpuError;
use crate::layout;

/// Selectors in the boot GDT.
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_CS: u16 = 0x18 | 3;
pub const USER_DS: u16 = 0x20 | 3;

/// Descriptors: null, 64-bit code DPL0, data DPL0, 64-bit code DPL3, data DPL3.
const GDT: [u64; 5] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff];

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;

fn write_u64(mem: &GuestMemoryMmap, addr: u64, val: u64) -> Result<(), CpuError> {
    mem.write_obj(val, GuestAddress(addr)).map_err(|e| CpuError::GuestMemory { addr, reason: e.to_string() })
}

/// Writes the boot GDT and identity page tables covering `[0, top)` (at least 4 GiB, so the
/// platform MMIO below 4 GiB is reachable). With `user`, every level carries the user bit so
/// that CPL3 code can touch all of it (built-in test guests).
pub fn write_boot_tables(mem: &GuestMemoryMmap, top: u64, user: bool) -> Result<(), CpuError> {
    for (i, d) in GDT.iter().enumerate() {
        write_u64(mem, layout::BOOT_GDT + 8 * i as u64, *d)?;
    }
    let flags = PTE_PRESENT | PTE_WRITE | if user { PTE_USER } else { 0 };
    let gibs = top.max(4 * GIB).div_ceil(GIB);
    let high_capacity = (layout::PD_HIGH_END - layout::PD_HIGH) / 0x1000;
    if gibs > 4 + high_capacity {
        return Err(CpuError::GuestMemory {
            addr: layout::PD_HIGH,
            reason: format!("identity map of {gibs} GiB exceeds the {} GiB the boot tables hold", 4 + high_capacity),
        });
    }
    write_u64(mem, layout::PML4, layout::PDPT | flags)?;
    for g in 0..gibs {
        let pd = if g < 4 { layout::PD_LOW + g * 0x1000 } else { layout::PD_HIGH + (g - 4) * 0x1000 };
        write_u64(mem, layout::PDPT + 8 * g, pd | flags)?;
        for i in 0..512u64 {
            write_u64(mem, pd + 8 * i, (g * GIB + (i << 21)) | flags | PTE_HUGE)?;
        }
    }
    Ok(())
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Puts `vcpu` in 64-bit mode at `entry` with `rsp`, at CPL0 or (with `user`) CPL3, and
/// `rsi` set (the Linux boot protocol passes boot_params there).
pub fn set_long_mode(vcpu: &VcpuFd, id: u8, entry: u64, rsp: u64, rsi: u64, user: bool) -> Result<(), CpuError> {
    let ioctl = |what| move |source| CpuError::Ioctl { vcpu: id, what, source };
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let (cs, ds) = if user { (USER_CS, USER_DS) } else { (KERNEL_CS, KERNEL_DS) };
    sregs.cs = segment(cs, true);
    let data = segment(ds, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    // A 64-bit busy TSS: VM entry requires a usable TR in long mode.
    sregs.tr = kvm_segment { limit: 0x67, type_: 0xb, present: 1, ..Default::default() };
    sregs.cr3 = layout::PML4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;

    let regs = kvm_regs { rip: entry, rsp, rbp: rsp, rsi, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;

    // x87 and SSE in their reset state: FCW 0x37f, MXCSR 0x1f80.
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))?;
    Ok(())
}
