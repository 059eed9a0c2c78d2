//! Tests with real taps (the tests run as root): errors that name the tap, and a frame
//! through the device to the tap and back.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use super::tap::{Tap, TapError};
use super::NetBackend;

fn unique(tag: &str) -> String {
    format!("svt{}{tag}", std::process::id() % 1_000_000)
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?}");
}

#[test]
fn tap_open_errors_name_the_tap() {
    let name = unique("b");
    let first = Tap::open(&name).expect("first open creates the tap");
    assert_eq!(first.name(), format!("tap '{name}'"));
    let e = Tap::open(&name).expect_err("busy");
    assert!(matches!(e, TapError::Busy { .. }), "{e}");
    assert_eq!(e.to_string(), format!("tap '{name}' is in use by another process"));
    drop(first);
    // Gone with its only fd; a new open creates it again.
    drop(Tap::open(&name).expect("reopen"));

    let tun = unique("n");
    ip(&["tuntap", "add", "mode", "tun", "name", &tun]);
    let e = Tap::open(&tun).expect_err("a tun is not a tap");
    ip(&["tuntap", "del", "mode", "tun", "name", &tun]);
    assert!(matches!(e, TapError::NotATap { .. }), "{e}");
    assert!(e.to_string().contains(&tun), "{e}");

    for bad in ["", "a/b", "sixteen-bytes-xx", "a b"] {
        let e = Tap::open(bad).expect_err(bad);
        assert!(matches!(e, TapError::InvalidName { .. }), "{bad}: {e}");
    }
}

#[test]
fn tap_attaches_to_a_persistent_tap() {
    let name = unique("p");
    ip(&["tuntap", "add", "mode", "tap", "name", &name]);
    let offloads = Tap::open(&name).map(|t| t.supported_offloads());
    ip(&["tuntap", "del", "mode", "tap", "name", &name]);
    assert_ne!(offloads.expect("attach") & super::TUN_F_CSUM, 0, "a tap takes checksum offload");
}

/// An AF_PACKET socket on `ifname`: sees what the tap's reader writes and sends to it.
fn packet_socket(ifname: &str) -> (OwnedFd, i32) {
    let cname = std::ffi::CString::new(ifname).expect("name");
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
    assert!(ifindex > 0, "ifindex of {ifname}");
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is fresh and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex;
    // SAFETY: binds to a sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
    // SAFETY: sets a timeval option of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    (fd, ifindex)
}

fn eth_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend_from_slice(payload);
    f
}

#[test]
fn frames_pass_between_the_device_and_a_real_tap() {
    use crate::virtio::net::test_util::*;
    use vm_memory::{Bytes, GuestAddress};

    let name = unique("d");
    let tap = Tap::open(&name).expect("tap");
    ip(&["link", "set", "dev", &name, "up"]);
    let (sock, _) = packet_socket(&name);

    let r = rig();
    let mut dev = super::super::virtio::net::VirtioNet::build(super::super::virtio::net::NetConfig {
        mac: MAC_ADDR,
        backend: Box::new(tap),
        mem: migrate::ram::GuestMemory::flat(r.block.clone()),
        msi: r.routes.clone(),
        rom: None,
    })
    .expect("device");
    dev.start().expect("thread");
    let r = Rig { dev, ..r };
    r.init(crate::virtio::net::features::VERSION_1 | crate::virtio::net::features::MAC);

    // Guest -> tap: header and frame in two descriptors.
    let out = eth_frame([0xff; 6], MAC_ADDR, b"snapvisor guest to host");
    r.mem.write_slice(&[0u8; 12], GuestAddress(BUF)).expect("w");
    r.mem.write_slice(&out, GuestAddress(BUF + 0x1000)).expect("w");
    r.add(TXQ, &[(BUF, 12, NEXT, 1), (BUF + 0x1000, out.len() as u32, 0, 0)], 0);
    r.notify(1);
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        assert!(t.elapsed() < Duration::from_secs(5), "the frame never reached the tap");
        // SAFETY: reads into `buf`, valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 && buf[..n as usize] == out[..] {
            break;
        }
    }

    // Tap -> guest.
    for i in 0..8u16 {
        r.add(RXQ, &[(BUF + 0x10000 + 0x1000 * u64::from(i), 2048, WRITE, 0)], i);
    }
    r.notify(0);
    let back = eth_frame(MAC_ADDR, [0x02, 0, 0, 0, 0, 1], b"snapvisor host to guest");
    // SAFETY: sends `back`, valid for its length, on the bound socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
    assert_eq!(n, back.len() as isize, "send: {}", std::io::Error::last_os_error());
    let t = Instant::now();
    'found: loop {
        assert!(t.elapsed() < Duration::from_secs(5), "the frame never reached the guest");
        let (_, used) = r.used(RXQ);
        for (id, len) in used {
            let mut got = vec![0u8; len as usize];
            r.mem.read_slice(&mut got, GuestAddress(BUF + 0x10000 + 0x1000 * u64::from(id))).expect("r");
            if got.len() > 12 && got[12..] == back[..] {
                assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
                break 'found;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(r.dev.error().is_none());
}
