//! Slow tier: Debian's cloud kernel reaches its first console lines on snapvisor's serial.
//! On hosts where KVM is a nested paravirtual module the kernel runs emulated and dies early
//! (see design.md); the banner is what this test asks for.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn debian_kernel_prints_its_banner() {
    let guest = common::repo_root().join("deploy/cache/guest");
    // The ELF inside the bzImage: its banner comes in ~20 s under emulation, the bzImage's in ~2 min.
    let kernel = guest.join("vmlinux");
    let initrd = guest.join("initramfs.cpio.gz");
    assert!(kernel.exists() && initrd.exists(), "{} missing: run deploy/fetch-guest.sh", guest.display());
    let mut child = Command::new(common::snapvisor_bin())
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
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvisor");
    // Read the console until the banner (the emulated kernel may take minutes more to die).
    let stdout = child.stdout.take().expect("stdout");
    let mut out = String::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        out.push_str(&line);
        out.push('\n');
        if line.contains("Linux version ") {
            break;
        }
    }
    let _ = child.kill();
    let o = child.wait_with_output().expect("wait for snapvisor");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("Linux version "), "no banner; status {:?}\nstdout: {out}\nstderr: {err}", o.status);
}
