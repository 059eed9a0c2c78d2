//! `snapvisor bench net`: virtio-net throughput with the `netping` guest against the raw tap
//! limit, measured in one run.
//!
//! Everything runs in a network namespace the bench creates (`snvbench-<pid>`) with one tap
//! in it, removed at the end. Per frame size (Ethernet bytes without FCS, `--sizes`):
//!
//! - **raw write** (the baseline for guest to host): this process opens the tap as the VMM
//!   does (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) and writes `--frames` frames (a zero 12-byte
//!   virtio-net header + a broadcast frame) as fast as it can; the kernel's receive counter
//!   of the tap must grow by as many. Measured: wall time of the writes.
//! - **guest to host**: `snapvisor run --builtin netping --mode tx` on that tap sends the same
//!   number of frames; the guest times from its first frame to the device having used the
//!   last (TSC), and the tap's receive counter gives the frames the host got.
//! - **raw read** (the baseline for host to guest): one thread sends frames into the tap with
//!   an AF_PACKET socket bound to it, another reads them from the tap's file descriptor as
//!   the VMM would; measured from the first frame read to the last.
//! - **host to guest**: `netping --mode rx` on the tap counts what arrives while this process
//!   sends the frames with AF_PACKET; the guest times first to last frame (TSC). The guest
//!   behaves like an interrupt-driven driver, not a poll-mode one: it polls its used ring with
//!   the device's interrupt suppressed while frames come, and when the ring is empty it allows
//!   the interrupt and waits for it (the exit device's interrupt-wait register parks its vCPU
//!   thread, as a halt would; a CPL3 guest cannot halt here). So its vCPU does not take a
//!   core from the device's I/O thread and the sender, as a spinning one did, and it is no
//!   faster than a real guest could be: each wake-up costs it an exit, as an interrupt would.
//!   Besides the rate the bench prints, from the device's counters, the I/O thread's CPU time
//!   per frame and the frames per receive pass, and the CPU time of the whole VM process
//!   (`getrusage` of the child): these depend less on the host's load than the rates.
//!
//! Rates are frames/s and Gbit/s of frame bytes; the ratios are guest / raw per direction.
//! Frames the tap drops (a reader slower than the writer) do not count: rates are of frames
//! delivered.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use thiserror::Error;

use crate::cli::CliError;
use crate::guests::netping;

#[derive(Debug, Args)]
pub struct NetBenchArgs {
    /// Frames per measurement.
    #[arg(long, default_value_t = 200_000)]
    pub frames: u64,
    /// Frame sizes in bytes (Ethernet without FCS, 60..=1514), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![64, 1500])]
    pub sizes: Vec<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Errors of the network benchmark.
#[derive(Debug, Error)]
pub enum NetBenchError {
    #[error("frame size {0} must be in 60..=1514")]
    FrameSize(u64),
    #[error("{what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("the netping guest ({mode}) did not report: status {status}, output: {output}")]
    Guest { mode: &'static str, status: String, output: String },
}

fn setup(what: impl Into<String>, reason: impl std::fmt::Display) -> NetBenchError {
    NetBenchError::Setup { what: what.into(), reason: reason.to_string() }
}

/// One throughput measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Rate {
    pub frames: u64,
    pub seconds: f64,
    pub frames_per_s: f64,
    pub gbit_per_s: f64,
}

impl Rate {
    fn new(frames: u64, size: u64, seconds: f64) -> Rate {
        let s = seconds.max(1e-9);
        Rate { frames, seconds, frames_per_s: frames as f64 / s, gbit_per_s: (frames * size * 8) as f64 / s / 1e9 }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct SizeReport {
    pub frame_size: u64,
    pub raw_write: Rate,
    pub guest_to_host: Rate,
    /// Frames the tap's receive counter saw during the guest's run.
    pub host_received: u64,
    pub ratio_guest_to_host: f64,
    pub raw_read: Rate,
    pub host_to_guest: Rate,
    pub ratio_host_to_guest: f64,
    /// CPU time of the device's I/O thread per frame it received (host to guest run), from the
    /// device's counters: the device's per-frame cost, load-independent unlike the rates.
    pub host_to_guest_device_ns_per_frame: Option<f64>,
    /// Frames per receive pass that delivered any (host to guest run): how much each wake-up
    /// of the I/O thread moved.
    pub host_to_guest_frames_per_pass: Option<f64>,
    /// CPU time of the whole `snapvisor run` process of the host to guest run (vCPU, I/O
    /// thread and the rest, from start to exit), in milliseconds: what the VM cost the host.
    pub host_to_guest_vm_cpu_ms: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
pub struct NetReport {
    pub frames: u64,
    pub tsc_per_ms: u64,
    pub sizes: Vec<SizeReport>,
}

/// The bench's namespace with a tap in it; removed on drop.
struct Netns {
    name: String,
    tap: String,
}

fn ip(args: &[&str]) -> Result<(), NetBenchError> {
    let o = Command::new("ip").args(args).output().map_err(|e| setup(format!("ip {}", args.join(" ")), e))?;
    if !o.status.success() {
        return Err(setup(format!("ip {}", args.join(" ")), String::from_utf8_lossy(&o.stderr).trim()));
    }
    Ok(())
}

impl Netns {
    fn create() -> Result<Netns, NetBenchError> {
        let n = Netns { name: format!("snvbench-{}", std::process::id()), tap: "snvb0".to_string() };
        ip(&["netns", "add", &n.name])?;
        ip(&["-n", &n.name, "tuntap", "add", "dev", &n.tap, "mode", "tap", "vnet_hdr"])?;
        ip(&["-n", &n.name, "addr", "add", "10.78.0.1/24", "dev", &n.tap])?;
        ip(&["-n", &n.name, "link", "set", &n.tap, "up"])?;
        Ok(n)
    }

    /// Runs `f` on a thread inside the namespace.
    fn within<T: Send>(&self, f: impl FnOnce() -> Result<T, NetBenchError> + Send) -> Result<T, NetBenchError> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).map_err(|e| setup(&path, e))?;
                // SAFETY: setns on a namespace file we opened; it changes only this thread's
                // network namespace, and the thread ends with the scope.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(setup(format!("setns {path}"), std::io::Error::last_os_error()));
                }
                f()
            })
            .join()
            .map_err(|_| setup("bench thread", "panicked"))?
        })
    }

    fn rx_packets(&self) -> Result<u64, NetBenchError> {
        let path = format!("/sys/class/net/{}/statistics/rx_packets", self.tap);
        self.within(|| {
            // sysfs shows the namespace of the process that mounted it; read through ip instead.
            let o = Command::new("ip")
                .args(["-s", "-j", "link", "show", "dev", &self.tap])
                .output()
                .map_err(|e| setup("ip -s link", e))?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| setup(&path, e))?;
            v[0]["stats64"]["rx"]["packets"].as_u64().ok_or_else(|| setup(&path, "no rx packet counter"))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const VNET_HDR: usize = netping::NET_HDR as usize;

/// Opens tap `name` (in the calling thread's namespace) as the VMM does.
fn open_tap(name: &str) -> Result<File, NetBenchError> {
    let f = OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(|e| setup("/dev/net/tun", e))?;
    let mut ifr = [0u8; 40];
    ifr[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes) that `ifr` provides.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } != 0 {
        return Err(setup(format!("TUNSETIFF {name}"), std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// A broadcast frame of `size` bytes with ethertype 0x88b5.
fn frame(size: u64) -> Vec<u8> {
    let mut f = vec![0u8; size as usize];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&netping::TX_ETHERTYPE.to_be_bytes());
    f
}

/// An AF_PACKET socket bound to `ifname` (in the calling thread's namespace).
struct PacketSocket(std::os::fd::OwnedFd, libc::sockaddr_ll);

impl PacketSocket {
    fn bind(ifname: &str) -> Result<PacketSocket, NetBenchError> {
        let cname = std::ffi::CString::new(ifname).map_err(|e| setup(ifname, e))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(setup(format!("if_nametoindex {ifname}"), std::io::Error::last_os_error()));
        }
        // SAFETY: socket() has no memory arguments; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(setup("AF_PACKET socket", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].fill(0xff);
        Ok(PacketSocket(fd, addr))
    }

    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: sendto reads `frame` and the address, both valid for the call.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.1 as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        n == frame.len() as isize
    }
}

/// Sends `frames` frames into the tap from the host side; returns how many the kernel took.
fn inject(ifname: &str, frames: u64, size: u64) -> Result<u64, NetBenchError> {
    let sock = PacketSocket::bind(ifname)?;
    let f = frame(size);
    let mut sent = 0;
    for _ in 0..frames {
        // The tap's queue full (ENOBUFS): go on, the frame is lost as a real one would be.
        if sock.send(&f) {
            sent += 1;
        }
    }
    Ok(sent)
}

fn raw_write(ns: &Netns, frames: u64, size: u64) -> Result<(Rate, u64), NetBenchError> {
    let before = ns.rx_packets()?;
    let secs = ns.within(|| {
        let mut tap = open_tap(&ns.tap)?;
        let mut buf = vec![0u8; VNET_HDR];
        buf.extend(frame(size));
        let t0 = Instant::now();
        for _ in 0..frames {
            tap.write_all(&buf).map_err(|e| setup("writing the tap", e))?;
        }
        Ok(t0.elapsed().as_secs_f64())
    })?;
    let got = ns.rx_packets()?.saturating_sub(before);
    Ok((Rate::new(frames, size, secs), got))
}

fn raw_read(ns: &Netns, frames: u64, size: u64) -> Result<Rate, NetBenchError> {
    ns.within(|| {
        let mut tap = open_tap(&ns.tap)?;
        // SAFETY: F_SETFL on our own descriptor.
        unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        std::thread::scope(|s| {
            let reader = s.spawn(move || {
                let mut buf = vec![0u8; 65536];
                let (mut n, mut first, mut last) = (0u64, None, Instant::now());
                let mut idle_since = Instant::now();
                while n < frames && idle_since.elapsed() < Duration::from_secs(1) {
                    match tap.read(&mut buf) {
                        Ok(len) if len == VNET_HDR + size as usize => {
                            last = Instant::now();
                            first.get_or_insert(last);
                            idle_since = last;
                            n += 1;
                        }
                        Ok(_) => {}
                        Err(_) => std::hint::spin_loop(),
                    }
                }
                (n, first.map_or(0.0, |f| last.duration_since(f).as_secs_f64()))
            });
            std::thread::sleep(Duration::from_millis(50));
            // Threads inherit the namespace of the thread that spawns them: the reader is in
            // it, and this thread sends.
            inject(&ns.tap, frames, size)?;
            let (n, secs) = reader.join().map_err(|_| setup("tap reader", "panicked"))?;
            Ok(Rate::new(n, size, secs))
        })
    })
}

/// Runs netping in the namespace: (exit status, stdout).
fn netping_cmd(ns: &Netns, mode: &str, frames: u64, size: u64) -> Result<std::process::Child, NetBenchError> {
    let exe = std::env::current_exe().map_err(|e| setup("snapvisor executable", e))?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]).arg(exe).args([
        "run",
        "--builtin",
        "netping",
        "--mem-mib",
        "16",
        "--net",
        &format!("tap={}", ns.tap),
        "--guest-ip",
        "10.78.0.2/24",
        "--mode",
        mode,
        "--count",
        &frames.to_string(),
        "--timeout",
        "300",
    ]);
    if mode == "tx" {
        c.args(["--frame-size", &size.to_string()]);
    }
    if mode == "rx" && std::env::var_os("SNAPVISOR_LOG").is_none() {
        // The device's counters at the end (frames per wake-up, notifications) are shown.
        c.env("SNAPVISOR_LOG", "warn,devices::virtio::net=debug,devices::virtio::net::queues=warn");
    }
    c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    c.spawn().map_err(|e| setup("spawning snapvisor run", e))
}

/// Parses `netping <mode>: frames N bytes B tsc T`.
pub fn parse_report(out: &str, mode: &str) -> Option<(u64, u64, u64)> {
    let line = out.lines().find_map(|l| l.strip_prefix(&format!("netping {mode}: frames ")))?;
    let f: Vec<&str> = line.split(' ').collect();
    match f.as_slice() {
        [n, "bytes", b, "tsc", t] => Some((n.parse().ok()?, b.parse().ok()?, t.parse().ok()?)),
        _ => None,
    }
}

fn guest_failed(mode: &'static str, o: &std::process::Output) -> NetBenchError {
    NetBenchError::Guest {
        mode,
        status: o.status.to_string(),
        output: format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
    }
}

fn guest_tx(ns: &Netns, frames: u64, size: u64, tsc_ms: u64) -> Result<(Rate, u64), NetBenchError> {
    let before = ns.rx_packets()?;
    let o = netping_cmd(ns, "tx", frames, size)?.wait_with_output().map_err(|e| setup("snapvisor run", e))?;
    let out = String::from_utf8_lossy(&o.stdout);
    let (n, _, tsc) = parse_report(&out, "tx").ok_or_else(|| guest_failed("tx", &o))?;
    let got = ns.rx_packets()?.saturating_sub(before);
    Ok((Rate::new(n, size, tsc as f64 / tsc_ms as f64 / 1000.0), got))
}

/// What the host to guest run measured besides its rate.
#[derive(Default)]
struct RxCosts {
    device_ns_per_frame: Option<f64>,
    frames_per_pass: Option<f64>,
    vm_cpu_ms: Option<f64>,
}

/// User and system CPU time of this process's waited-for children so far, in milliseconds.
fn children_cpu_ms() -> Option<f64> {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a valid out pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
        return None;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    Some(ms(u.ru_utime) + ms(u.ru_stime))
}

fn guest_rx(ns: &Netns, frames: u64, size: u64, tsc_ms: u64) -> Result<(Rate, RxCosts), NetBenchError> {
    let mut child = netping_cmd(ns, "rx", frames, size)?;
    let cpu_before = children_cpu_ms();
    let mut stdout = child.stdout.take().ok_or_else(|| setup("snapvisor run", "no stdout"))?;
    let mut stderr = child.stderr.take().ok_or_else(|| setup("snapvisor run", "no stderr"))?;
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stdout.read_to_string(&mut all);
        all
    });
    // Drained so that the guest's log cannot fill the pipe; the device's counters (logged at
    // debug level when the VM ends) are shown.
    let log_reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        let mut costs = RxCosts::default();
        for l in all.lines().filter_map(|l| l.find("I/O counters").map(|i| &l[i..])) {
            eprintln!("{size:<6} host -> guest, the device's {l}");
            costs.device_ns_per_frame = device_ns_per_frame(l);
            costs.frames_per_pass = frames_per_pass(l);
        }
        costs
    });
    // The guest needs well under a second to come up and print `netping rx: ready`.
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    if let Ok(Some(status)) = child.try_wait() {
        let all = reader.join().map_err(|_| setup("stdout reader", "panicked"))?;
        return Err(NetBenchError::Guest { mode: "rx", status: status.to_string(), output: all });
    }
    ns.within(|| inject(&ns.tap, frames, size))?;
    let status = child.wait().map_err(|e| setup("snapvisor run", e))?;
    let cpu_after = children_cpu_ms();
    let all = reader.join().map_err(|_| setup("stdout reader", "panicked"))?;
    let mut costs = log_reader.join().unwrap_or_default();
    // Only this child was reaped in between (the namespace's `ip` runs happen before and after).
    costs.vm_cpu_ms = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
    let (n, _, tsc) = parse_report(&all, "rx").ok_or_else(|| NetBenchError::Guest {
        mode: "rx",
        status: format!("{status} after {:.1} s", t0.elapsed().as_secs_f64()),
        output: all.clone(),
    })?;
    Ok((Rate::new(n, size, tsc as f64 / tsc_ms as f64 / 1000.0), costs))
}

/// A counter of the device's counters line (`... name: N, ...`).
fn counter(line: &str, name: &str) -> Option<u64> {
    let rest = &line[line.find(&format!("{name}: "))? + name.len() + 2..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Frames per receive pass that delivered any, from the device's counters line.
pub fn frames_per_pass(line: &str) -> Option<f64> {
    let (frames, passes) = (counter(line, "rx_frames")?, counter(line, "rx_batches")?);
    (passes > 0).then(|| frames as f64 / passes as f64)
}

/// The I/O thread's CPU nanoseconds per received frame, from the device's counters line
/// (`... rx_frames: N, ... io_cpu_ns: T ...`).
pub fn device_ns_per_frame(line: &str) -> Option<f64> {
    let (frames, ns) = (counter(line, "rx_frames")?, counter(line, "io_cpu_ns")?);
    (frames > 0 && ns > 0).then(|| ns as f64 / frames as f64)
}

pub fn measure(args: &NetBenchArgs) -> Result<NetReport, NetBenchError> {
    for &s in &args.sizes {
        if !(netping::MIN_FRAME..=netping::MAX_FRAME).contains(&s) {
            return Err(NetBenchError::FrameSize(s));
        }
    }
    let tsc_per_ms = netping::host_tsc_per_ms();
    let ns = Netns::create()?;
    let mut sizes = Vec::new();
    for &size in &args.sizes {
        let (raw_write, _) = raw_write(&ns, args.frames, size)?;
        let (guest_to_host, host_received) = guest_tx(&ns, args.frames, size, tsc_per_ms)?;
        let raw_read = raw_read(&ns, args.frames, size)?;
        let (host_to_guest, costs) = guest_rx(&ns, args.frames, size, tsc_per_ms)?;
        sizes.push(SizeReport {
            frame_size: size,
            ratio_guest_to_host: guest_to_host.frames_per_s / raw_write.frames_per_s.max(1e-9),
            ratio_host_to_guest: host_to_guest.frames_per_s / raw_read.frames_per_s.max(1e-9),
            raw_write,
            guest_to_host,
            host_received,
            raw_read,
            host_to_guest,
            host_to_guest_device_ns_per_frame: costs.device_ns_per_frame,
            host_to_guest_frames_per_pass: costs.frames_per_pass,
            host_to_guest_vm_cpu_ms: costs.vm_cpu_ms,
        });
    }
    Ok(NetReport { frames: args.frames, tsc_per_ms, sizes })
}

pub fn run(args: NetBenchArgs) -> Result<(), CliError> {
    let r = measure(&args).map_err(|e| CliError::Internal(e.to_string()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).map_err(|e| CliError::Internal(e.to_string()))?);
        return Ok(());
    }
    println!("snapvisor bench net: {} frames per measurement, guest TSC {} kHz", r.frames, r.tsc_per_ms);
    println!("{:<6} {:<22} {:>12} {:>10} {:>10} {:>8}", "size", "path", "frames", "Mframes/s", "Gbit/s", "ratio");
    for s in &r.sizes {
        let rows = [
            ("raw tap write", &s.raw_write, None),
            ("guest -> host", &s.guest_to_host, Some(s.ratio_guest_to_host)),
            ("raw tap read", &s.raw_read, None),
            ("host -> guest", &s.host_to_guest, Some(s.ratio_host_to_guest)),
        ];
        for (name, rate, ratio) in rows {
            println!(
                "{:<6} {:<22} {:>12} {:>10.3} {:>10.3} {:>8}",
                s.frame_size,
                name,
                rate.frames,
                rate.frames_per_s / 1e6,
                rate.gbit_per_s,
                ratio.map_or(String::new(), |r| format!("{r:.2}"))
            );
        }
        println!("{:<6} host received {} of the guest's frames", s.frame_size, s.host_received);
        if let Some(ns) = s.host_to_guest_device_ns_per_frame {
            println!("{:<6} host -> guest: the device's I/O thread used {ns:.0} ns of CPU per frame", s.frame_size);
        }
        if let Some(f) = s.host_to_guest_frames_per_pass {
            println!("{:<6} host -> guest: {f:.1} frames per receive pass of the I/O thread", s.frame_size);
        }
        if let Some(ms) = s.host_to_guest_vm_cpu_ms {
            println!(
                "{:<6} host -> guest: the VM's process used {ms:.0} ms of CPU from start to exit (vCPU, I/O thread \
                 and the rest)",
                s.frame_size
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guest_report() {
        let out = "netping: virtio-net ready, mac 52:54:00:12:34:56\nnetping tx: frames 10 bytes 640 tsc 12345\n";
        assert_eq!(parse_report(out, "tx"), Some((10, 640, 12345)));
        assert_eq!(parse_report(out, "rx"), None);
        assert_eq!(parse_report("netping rx: frames x bytes 1 tsc 2\n", "rx"), None);
    }

    #[test]
    fn parses_the_device_cost_per_frame() {
        let l = "I/O counters at shutdown: NetStats { tx_frames: 0, rx_frames: 4000, rx_dropped: 0, \
                 interrupts: 0, io_cpu_ns: 6000000 }, 7 rounds";
        assert_eq!(device_ns_per_frame(l), Some(1500.0));
        assert_eq!(device_ns_per_frame("I/O counters at shutdown: NetStats { rx_frames: 0, io_cpu_ns: 5 }"), None);
        assert_eq!(device_ns_per_frame("I/O counters at shutdown: NetStats { rx_frames: 3 }"), None);
        let l = "NetStats { rx_frames: 300, rx_dropped: 0, rx_batches: 20, rx_empty_reads: 4 }";
        assert_eq!(frames_per_pass(l), Some(15.0));
        assert_eq!(frames_per_pass("NetStats { rx_frames: 3, rx_batches: 0 }"), None);
    }

    #[test]
    fn rates() {
        let r = Rate::new(1000, 1500, 0.5);
        assert_eq!(r.frames_per_s, 2000.0);
        assert!((r.gbit_per_s - 0.024).abs() < 1e-9);
    }
}
