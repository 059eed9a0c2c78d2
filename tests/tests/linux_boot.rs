//! Slow tier: Debian's cloud kernel reaches its first console lines on snapvisor's serial.
//! On hosts where KVM is a nested paravirtual module the kernel runs emulated and dies early
//! (see design.md); the banner is what this test asks for.

mod common;

use std::process::Command;

#[test]
fn debian_kernel_prints_its_banner() {
    let guest = common::repo_root().join("deploy/cache/guest");
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initramfs.cpio.gz");
    assert!(kernel.exists() && initrd.exists(), "{} missing: run deploy/fetch-guest.sh", guest.display());
    let o = Command::new(common::snapvisor_bin())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1",
            "--mem-mib",
            "256",
            "--timeout",
            "300",
        ])
        .output()
        .expect("spawn snapvisor");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("Linux version "), "no banner; status {:?}\nstdout: {out}\nstderr: {err}", o.status);
}
