//! The receive path against a real tap: every frame queued in the tap reaches the guest's
//! buffers through the device's passes (checked in every round), and the CPU time per frame
//! is printed against a plain `read` of the same tap, on the calling thread's CPU clock, so
//! the number does not depend on what else the host runs. The suite runs a few rounds; for a
//! measurement: `SNAPVISOR_BENCH_RX_ROUNDS=300 cargo nextest run --release -p devices
//! bench_rx -- --nocapture`. Nothing here asserts a time.
//!
//! Per round, `FRAMES` frames of `SIZE` bytes are queued in the tap (an AF_PACKET socket
//! sends them, within the tap's queue of 500) and then drained: by the device's receive
//! passes into 2 KiB guest buffers (as netping posts them), or by `read` into one buffer.
//! The frames are queued before the clock starts, so the sender's cost and wake-ups are not
//! in the numbers: what is left is the per-frame work of the device against the read alone.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use super::features::{MAC, VERSION_1};
use super::test_util::*;
use crate::net::tap::Tap;
use crate::net::NetBackend;

const FRAMES: usize = 200;
/// Rounds per size: `SNAPVISOR_BENCH_RX_ROUNDS`, 4 in the suite.
fn rounds() -> usize {
    std::env::var("SNAPVISOR_BENCH_RX_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4)
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An AF_PACKET socket that sends broadcast frames of `size` bytes out of `ifname`.
fn sender(ifname: &str) -> (OwnedFd, libc::sockaddr_ll) {
    let cname = std::ffi::CString::new(ifname).expect("name");
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(index > 0, "ifindex of {ifname}");
    // SAFETY: plain socket(2); checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "packet socket");
    // SAFETY: fresh fd owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain data; all zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    (fd, addr)
}

fn send_all(s: &(OwnedFd, libc::sockaddr_ll), frame: &[u8], n: usize) {
    for _ in 0..n {
        // SAFETY: sendto reads `frame` and the address, both valid for the call.
        let r = unsafe {
            libc::sendto(
                s.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&s.1 as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }
}

fn measure(size: usize) -> (f64, f64) {
    let rounds = rounds();
    let name = format!("svb{}", std::process::id() % 1_000_000);
    let mut tap = Tap::open(&name).expect("tap");
    // No IPv6 on the tap: the host's stack would send it router solicitations of its own.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let ok = Command::new("ip").args(["link", "set", "dev", &name, "up"]).status().expect("ip").success();
    assert!(ok, "link up");
    let s = sender(&name);
    let mut frame = vec![0u8; size];
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);

    // Raw: read() of the tap into one buffer (the same tap, before the device takes it).
    let mut buf = vec![0u8; 65536];
    let mut raw = 0u64;
    for _ in 0..rounds {
        send_all(&s, &frame, FRAMES);
        let t0 = thread_cpu_ns();
        let mut got = 0;
        while got < FRAMES {
            match tap.read_frame(&mut buf) {
                Ok(_) => got += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        // The empty read that tells a reader the tap is drained.
        let _ = tap.read_frame(&mut buf);
        raw += thread_cpu_ns() - t0;
        assert!(got >= FRAMES, "{got} frames read");
    }

    // The device: receive passes into 2 KiB buffers, re-posted after each round.
    let r = rig();
    let dev = super::VirtioNet::build(super::NetConfig {
        mac: MAC_ADDR,
        backend: Box::new(tap),
        mem: migrate::ram::GuestMemory::flat(r.block.clone()),
        msi: r.routes.clone(),
        rom: None,
    })
    .expect("device");
    let r = Rig { dev, ..r };
    r.init(VERSION_1 | MAC);
    let mut posted = 0u16;
    let post = |posted: &mut u16, n: usize| {
        for _ in 0..n {
            let i = *posted % 256;
            r.add(RXQ, &[(BUF + 0x800 * u64::from(i), 2048, WRITE, 0)], i);
            *posted = posted.wrapping_add(1);
        }
    };
    post(&mut posted, 256);
    let mut dev_ns = 0u64;
    let mut delivered = 0usize;
    for _ in 0..rounds {
        send_all(&s, &frame, FRAMES);
        let t0 = thread_cpu_ns();
        let mut got = 0;
        loop {
            let n = r.core().process_rx();
            got += n;
            if n == 0 || got >= FRAMES {
                break;
            }
        }
        dev_ns += thread_cpu_ns() - t0;
        assert!(got >= FRAMES, "{got} frames delivered");
        delivered += got;
        post(&mut posted, got);
    }
    assert!(r.dev.error().is_none());
    let raw_per = raw as f64 / (rounds * FRAMES) as f64;
    let dev_per = dev_ns as f64 / delivered as f64;
    (raw_per, dev_per)
}

#[test]
fn bench_rx_every_frame_queued_in_a_real_tap_reaches_the_guest() {
    for size in [64usize, 1500] {
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(measure(size));
        }
        for (raw, dev) in &runs {
            eprintln!(
                "bench_rx {size:>4} bytes: raw read {raw:.0} ns/frame, device {dev:.0} ns/frame, device/raw {:.2}",
                dev / raw
            );
        }
    }
}
