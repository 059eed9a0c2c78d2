//! netping `rx` waits for the device's interrupt (the exit device's interrupt-wait register)
//! instead of spinning on its used ring: on real KVM with the real virtio-net device and a
//! tap. Its vCPU parks between bursts and the device's interrupt wakes it; a pause takes it
//! out of the park and a resume puts it back; a snapshot taken while it is parked restores
//! (eagerly and lazily) to a guest that parks again and goes on receiving.
//!
//! The tap is a persistent one in the test's network namespace with a name unique to this
//! process; frames reach the guest from an AF_PACKET socket bound to it.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use hypervisor::control::ExitReason;
use hypervisor::guests::{Builtin, NetMode, NetParams};
use hypervisor::net::{NetSpec, RomChoice};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};

/// Bounds for things that take milliseconds when the machine is idle.
const LONG: Duration = Duration::from_secs(60);

/// A persistent tap, up, deleted again when dropped.
struct Tap(String);

impl Tap {
    fn new(tag: &str) -> Tap {
        let name = format!("nwt{}{tag}", std::process::id() % 100_000);
        for args in [vec!["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"], vec!["link", "set", &name, "up"]] {
            let o = Command::new("ip").args(&args).output().expect("ip");
            assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Tap(name)
    }

    fn spec(&self) -> NetSpec {
        NetSpec { tap: self.0.clone(), mac: None, rom: RomChoice::None, romsize: None }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["tuntap", "del", "dev", &self.0, "mode", "tap"]).output();
    }
}

/// Sends `n` broadcast frames of netping's benchmark ethertype into the tap (towards the
/// guest), a few at a time so that the tap's queue never overflows.
fn send(tap: &Tap, n: usize) {
    let cname = std::ffi::CString::new(tap.0.clone()).expect("name");
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(index, 0, "if_nametoindex {}", tap.0);
    // SAFETY: socket() has no memory arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].fill(0xff);
    let mut frame = [0u8; 200];
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame[12..14].copy_from_slice(&hypervisor::guests::netping::TX_ETHERTYPE.to_be_bytes());
    for i in 0..n {
        // SAFETY: sendto reads `frame` and `addr`, both valid for the call.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, frame.len() as isize, "sendto {}: {}", tap.0, std::io::Error::last_os_error());
        if i % 16 == 15 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn until(what: &str, out: &SharedOutput, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < LONG, "{what} did not happen; guest output:\n{}", out.text());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// vCPUs parked in the exit device's interrupt-wait register.
fn parked(vm: &Vm) -> usize {
    vm.devices().irq_router.line().waiters()
}

fn rx_frames(vm: &Vm) -> u64 {
    vm.devices().nics[0].device.lock().expect("device").stats().rx_frames
}

fn rx_vm(tap: &Tap, count: u64) -> (Vm, SharedOutput) {
    let out = SharedOutput::default();
    let net = NetParams { mode: NetMode::Rx, count, ip: [10, 77, 0, 2], prefix: 24, ..Default::default() };
    let params = BuiltinParams { net, ..Default::default() };
    let mut cfg = VmConfig::new(16, 1, BootSource::Builtin { guest: Builtin::Netping, params }, Box::new(out.clone()));
    cfg.net = vec![tap.spec()];
    let mut vm = Vm::new(cfg).expect("VM");
    vm.start().expect("start");
    (vm, out)
}

#[test]
fn the_rx_guest_parks_between_frames_and_a_pause_takes_it_out() {
    let tap = Tap::new("p");
    let (mut vm, out) = rx_vm(&tap, 300);
    until("the guest parking before its first frame", &out, || parked(&vm) == 1);
    let hits = vm.devices().irq_router.line().hits();
    send(&tap, 100);
    until("the device delivering the frames", &out, || rx_frames(&vm) >= 100);
    // Woken by the device's interrupt (not the wait's bound), the guest took the frames and
    // parked again.
    until("the guest parking again", &out, || parked(&vm) == 1);
    assert!(vm.devices().irq_router.line().hits() > hits, "no park was ended by the device's interrupt");

    assert!(vm.pause(), "the pause completed with the vCPU parked in the register");
    assert_eq!(parked(&vm), 0, "a paused VM's vCPU is not parked in the register");
    vm.resume();
    until("the guest parking after the resume", &out, || parked(&vm) == 1);

    send(&tap, 200);
    assert_eq!(vm.wait(Some(LONG)), ExitReason::GuestExit { status: 0 }, "{}", out.text());
    let report = hypervisor::bench::net::parse_report(&out.text(), "rx").expect("rx report");
    assert_eq!((report.0, report.1), (300, 300 * 200), "{}", out.text());
}

#[test]
fn a_snapshot_of_a_parked_rx_guest_restores_eagerly_and_lazily_and_goes_on_receiving() {
    let tap = Tap::new("s");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (mut vm, out) = rx_vm(&tap, 300);
    until("the guest parking before its first frame", &out, || parked(&vm) == 1);
    send(&tap, 100);
    until("the device delivering the frames", &out, || rx_frames(&vm) >= 100);
    until("the guest parking again", &out, || parked(&vm) == 1);
    snapshot::save(&vm, &store, "parked", &SaveOptions { stay_paused: true, ..Default::default() }, &|_| {})
        .expect("snapshot");
    vm.stop("snapshot taken");
    drop(vm);

    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let out2 = SharedOutput::default();
        let (mut vm2, _) =
            snapshot::restore(&store, "parked", RestoreOptions::new(mode, Box::new(out2.clone()))).expect("restore");
        vm2.start().expect("start");
        until("the restored guest parking", &out2, || parked(&vm2) == 1);
        // It had 100 frames; 200 more end its count of 300.
        let hits = vm2.devices().irq_router.line().hits();
        send(&tap, 200);
        let reason = vm2.wait(Some(LONG));
        assert!(vm2.devices().irq_router.line().hits() > hits, "{mode:?}: no park was ended by the interrupt");
        let text = out2.text();
        assert_eq!(reason, ExitReason::GuestExit { status: 0 }, "{mode:?}: {text}");
        let report = hypervisor::bench::net::parse_report(&text, "rx").expect("rx report");
        assert_eq!((report.0, report.1), (300, 300 * 200), "{mode:?}: {text}");
        vm2.stop("test done");
    }
}
