//! An instruction KVM cannot emulate ends the VM with an error naming the instruction's bytes
//! and its RIP, and exit status 126, instead of a hang or a bare "internal error".
//!
//! The guest is a 128 KiB firmware image written here: its reset vector jumps to code that
//! enters 32-bit protected mode and runs `iret`, the instruction iPXE stops at on this
//! machine's nested KVM (its emulator runs `iret` only in real mode, see firmware.md). On a
//! host with hardware virtualisation the `iret` runs and the guest halts instead; the test
//! says which happened and asserts the emulation failure only where KVM emulates CPL0.

mod common;

use std::time::Duration;

use common::snapvisor_bin;

/// 16- then 32-bit code for 0xffff_f000 (image offset 0x1f000), assembled with GNU as:
/// `cli; lgdtl %cs:gdtptr; cr0.PE = 1; ljmpl $8, pm32; pm32: ds = ss = 0x10; esp = 0x7000;
/// push 2 (eflags), 8 (cs), done; iretl; done: hlt`, then a flat GDT and its pointer.
const CODE: [u8; 0x4e] = [
    0xfa, 0x2e, 0x66, 0x0f, 0x01, 0x16, 0x48, 0xf0, 0x0f, 0x20, 0xc0, 0x0c, 0x01, 0x0f, 0x22, 0xc0, //
    0x66, 0xea, 0x18, 0xf0, 0xff, 0xff, 0x08, 0x00, 0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8, 0x8e, 0xd0, //
    0xbc, 0x00, 0x70, 0x00, 0x00, 0x6a, 0x02, 0x6a, 0x08, 0x68, 0x2f, 0xf0, 0xff, 0xff, 0xcf, 0xf4, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9b, 0xcf, 0x00, //
    0xff, 0xff, 0x00, 0x00, 0x00, 0x93, 0xcf, 0x00, 0x17, 0x00, 0x30, 0xf0, 0xff, 0xff,
];
/// Offset of the `iret` in `CODE`.
const IRET_AT: u64 = 0x2e;

/// Whether KVM here emulates CPL0 code (the nested, paravirtual module).
fn kvm_emulates_cpl0() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn a_protected_mode_iret_kvm_cannot_emulate_ends_the_vm_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut image = vec![0xf4u8; 0x2_0000];
    image[0x1_f000..0x1_f000 + CODE.len()].copy_from_slice(&CODE);
    // Reset vector (IP 0xfff0 in CS base 0xffff0000): jmp near 0xf000.
    image[0x1_fff0..0x1_fff3].copy_from_slice(&[0xe9, 0x0d, 0xf0]);
    let fw = dir.path().join("iret.bin");
    std::fs::write(&fw, &image).expect("write image");

    let t0 = std::time::Instant::now();
    let out = std::process::Command::new(snapvisor_bin())
        .args(["run", "--firmware"])
        .arg(&fw)
        .args(["--mem-mib", "16", "--timeout", "120"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(110), "the VM did not end by itself ({took:?}): {stderr}");
    if !kvm_emulates_cpl0() {
        eprintln!("hardware virtualisation: the iret ran natively; exit {:?}: {stderr}", out.status.code());
        assert!(stderr.contains("halted"), "{stderr}");
        return;
    }
    eprintln!("KVM emulates CPL0 here (kvm_pvm): expecting the emulation failure; got: {stderr}");
    assert_eq!(out.status.code(), Some(126), "a guest crash: {stderr}");
    assert!(stderr.contains("emulation failure on iret (bytes cf"), "names the instruction and its bytes: {stderr}");
    let rip = format!("rip {:#x}", 0xffff_f000u64 + IRET_AT);
    assert!(stderr.contains(&rip), "names the RIP ({rip}): {stderr}");
}
