//! iPXE, a virtio-net driver nobody here wrote, driving snapvisor's device from its option
//! ROM: SeaBIOS finds the ROM through the read-only ROM BAR of the NIC at 00:03.0, runs it,
//! and iPXE probes the device.
//!
//! Two versions, chosen by the host (the test prints which ran):
//! - probe (KVM emulates CPL0, as on this project's machines, kvm_pvm): every serial line up to
//!   `iPXE initialising devices...ok` for 00:03.0, in order; the device's driver record shows
//!   iPXE's probe (a reset, then ACKNOWLEDGE and DRIVER set, the MAC's six bytes read, both
//!   feature words read; FEATURES_OK only comes when iPXE opens the NIC, later); then KVM's
//!   emulator fails on iPXE's first protected-mode `iret` and the VM
//!   ends with exit status 126 and an error naming `iret`, its bytes and its RIP, not a hang.
//! - full (hardware virtualisation): `dnsmasq` serves DHCP on the tap's host side (in the
//!   test's own network namespace; no separate one is made); iPXE prints
//!   `net0: <mac> using virtio-net on 0000:00:03.0`, `Configuring (net0 <mac>)` and `ok`, and
//!   dnsmasq logs the DHCPDISCOVER (BOOTP request) from that MAC, which came in on the tap.
//!
//! This is a slow test (iPXE needs ~30 s here; QEMU 7.2 takes as long): it waits for lines,
//! for minutes, and runs with the rest of the suite (deploy/test.sh runs every test; the slow
//! ones, like seabios.rs and linux_boot.rs, are the ones that wait on real firmware).

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::snapvisor_bin;
use hypervisor::bench::firmware::strip_ansi;

const ROM: &str = "/usr/lib/ipxe/qemu/efi-virtio.rom";
const MAC: &str = "52:54:00:1b:0c:03";
const LIMIT: Duration = Duration::from_secs(600);

/// Whether this host's KVM runs guest kernel code in hardware (the full version can run).
fn hardware_virtualisation() -> bool {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return false;
    }
    std::path::Path::new("/sys/module/kvm_intel").exists() || std::path::Path::new("/sys/module/kvm_amd").exists()
}

/// A tap name unique to this test process.
fn tap_name(tag: &str) -> String {
    format!("ipx{tag}{}", std::process::id() % 100_000)
}

/// A persistent tap, deleted when dropped.
struct PersistentTap(String);

impl PersistentTap {
    fn new(name: &str) -> Self {
        let o = Command::new("ip").args(["tuntap", "add", "dev", name, "mode", "tap"]).output().expect("ip tuntap");
        assert!(o.status.success(), "ip tuntap add {name}: {}", String::from_utf8_lossy(&o.stderr));
        PersistentTap(name.to_string())
    }
}

impl Drop for PersistentTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["tuntap", "del", "dev", &self.0, "mode", "tap"]).output();
    }
}

/// The serial lines iPXE must print, in order, up to its device probe (after ANSI stripping).
fn expected_probe_lines() -> Vec<&'static str> {
    vec![
        "iPXE (http://ipxe.org) 00:03.0",
        "Booting from ROM...",
        "iPXE (PCI 00:03.0) starting execution...ok",
        "iPXE initialising devices...ok",
    ]
}

/// Asserts that `serial` has lines containing each of `wanted`, in that order.
fn assert_in_order(serial: &str, wanted: &[&str]) {
    let mut lines = serial.lines();
    for w in wanted {
        assert!(lines.any(|l| l.contains(w)), "no line containing {w:?} (in order) in the serial output:\n{serial}");
    }
}

#[test]
fn ipxe_probes_the_nic_from_its_rom() {
    assert!(std::path::Path::new(ROM).exists(), "{ROM} is missing: install Debian's ipxe-qemu");
    if hardware_virtualisation() {
        eprintln!("iPXE test: hardware virtualisation: running the full version (DHCP through dnsmasq)");
        full_version();
    } else {
        eprintln!("iPXE test: KVM emulates CPL0 here: running the probe version");
        probe_version();
    }
}

fn probe_version() {
    let tap = tap_name("p");
    let _tap = PersistentTap::new(&tap);
    let dir = tempfile::tempdir().expect("tempdir");
    let serial_path = dir.path().join("serial");
    let t0 = Instant::now();
    let mut child = Command::new(snapvisor_bin())
        .args(["run", "--firmware", "seabios", "--mem-mib", "128", "--timeout", "580"])
        .args(["--net", &format!("tap={tap},mac={MAC}")])
        .stdout(std::fs::File::create(&serial_path).expect("serial file"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvisor");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            let serial = strip_ansi(&String::from_utf8_lossy(&std::fs::read(&serial_path).unwrap_or_default()));
            panic!("the VM did not end within {LIMIT:?} (a hang):\n{serial}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    let serial = strip_ansi(&String::from_utf8_lossy(&std::fs::read(&serial_path).expect("serial")));
    eprintln!("ended after {:.1} s with {status}\nstderr:\n{stderr}", t0.elapsed().as_secs_f64());

    assert_in_order(&serial, &expected_probe_lines());
    let banner = serial.lines().find(|l| l.contains("iPXE (http://ipxe.org) 00:03.0")).unwrap_or_default();
    assert!(banner.contains("PCI2.10 PnP PMM"), "the iPXE banner: {banner}");

    // The crash, named: the protected-mode iret KVM's emulator cannot run.
    assert_eq!(status.code(), Some(126), "a guest crash ends `run` with 126: {stderr}");
    assert!(stderr.contains("emulation failure on iret (bytes cf"), "names the instruction: {stderr}");
    assert!(stderr.contains("at rip 0x"), "names the RIP: {stderr}");

    // What iPXE did to the device during its probe.
    let line =
        stderr.lines().find(|l| l.contains("net0 0000:00:03.0") && l.contains("driver {")).unwrap_or_else(|| {
            panic!("no driver record for net0 on stderr:\n{stderr}");
        });
    assert!(line.contains(MAC), "{line}");
    let json = &line[line.find('{').expect("json")..];
    let record: serde_json::Value = serde_json::from_str(json).expect("driver record JSON");
    eprintln!("driver record: {record}");
    // iPXE's probe (virtnet_probe_modern) resets the device, sets ACKNOWLEDGE (1) then
    // DRIVER (2), reads both feature words and the MAC; FEATURES_OK (8) and DRIVER_OK (4) come
    // when it opens the NIC, which it never reaches here (the iret stops it first).
    let writes: Vec<u64> =
        record["status_writes"].as_array().expect("status_writes").iter().filter_map(|w| w.as_u64()).collect();
    assert!(writes.starts_with(&[0, 1, 3]), "iPXE reset the device, then set ACKNOWLEDGE, DRIVER: {record}");
    assert_eq!(record["status_bits"].as_u64().map(|b| b & 3), Some(3), "{record}");
    assert!(record["resets"].as_u64().unwrap_or(0) >= 1, "{record}");
    let config_read: Vec<bool> =
        record["config_read"].as_array().expect("config_read").iter().map(|b| b.as_bool() == Some(true)).collect();
    assert!(config_read.len() >= 6 && config_read[..6].iter().all(|&b| b), "iPXE read the MAC's 6 bytes: {record}");
    let words: Vec<u64> =
        record["feature_words_read"].as_array().expect("feature words").iter().filter_map(|w| w.as_u64()).collect();
    assert!(
        words.contains(&0) && words.contains(&1),
        "iPXE read both feature words (VERSION_1 is in word 1): {record}"
    );
}

/// The full version: DHCP from dnsmasq on the tap, its DHCPDISCOVER from the MAC seen.
fn full_version() {
    let tap = tap_name("f");
    let _tap = PersistentTap::new(&tap);
    let sh = |cmd: &str| {
        let o = Command::new("sh").args(["-c", cmd]).output().expect("sh");
        assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
    };
    // dnsmasq serves DHCP on the tap's host side (snapvisor opens the tap in this namespace).
    sh(&format!("ip addr add 10.78.0.1/24 dev {tap} && ip link set {tap} up"));
    let dir = tempfile::tempdir().expect("tempdir");
    let leases = dir.path().join("leases");
    let mut dnsmasq = Command::new("dnsmasq")
        .args(["--no-daemon", "--port=0", "--bind-interfaces", "--log-dhcp"])
        .arg(format!("--interface={tap}"))
        .arg("--dhcp-range=10.78.0.10,10.78.0.20,1m")
        .arg(format!("--dhcp-leasefile={}", leases.display()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("dnsmasq (deploy/install-deps.sh installs it)");
    let serial_path = dir.path().join("serial");
    let mut child = Command::new(snapvisor_bin())
        .args(["run", "--firmware", "seabios", "--mem-mib", "128", "--timeout", "580"])
        .args(["--net", &format!("tap={tap},mac={MAC}")])
        .stdout(std::fs::File::create(&serial_path).expect("serial file"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvisor");
    let t0 = Instant::now();
    let serial = loop {
        let serial = strip_ansi(&String::from_utf8_lossy(&std::fs::read(&serial_path).unwrap_or_default()));
        let configured =
            serial.lines().skip_while(|l| !l.contains(&format!("Configuring (net0 {MAC})"))).any(|l| l.contains("ok"));
        if configured {
            break serial;
        }
        if t0.elapsed() > LIMIT || child.try_wait().expect("wait").is_some() {
            let _ = child.kill();
            let _ = dnsmasq.kill();
            let _ = dnsmasq.wait();
            panic!("iPXE did not configure net0 within {LIMIT:?}:\n{serial}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let mut log = String::new();
    dnsmasq.stderr.take().expect("stderr").read_to_string(&mut log).expect("dnsmasq log");
    let mut wanted = expected_probe_lines();
    let net0 = format!("net0: {MAC} using virtio-net on 0000:00:03.0");
    let conf = format!("Configuring (net0 {MAC})");
    wanted.push(&net0);
    wanted.push(&conf);
    assert_in_order(&serial, &wanted);
    assert!(log.contains("DHCPDISCOVER") && log.contains(MAC), "the BOOTP request with {MAC} reached dnsmasq:\n{log}");
}
