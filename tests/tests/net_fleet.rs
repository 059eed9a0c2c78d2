//! Networked VMs through the daemon: clones of a pinging VM made in one clone request, each on
//! its own tap with its own MAC, all pinging at once; MACs the daemon picks for clones; and
//! the MAC a VM defined without one keeps across stop/start and daemon restarts.
//!
//! The clones keep the snapshot's guest address (10.77.0.2) and peer (10.77.0.1), so each
//! clone's tap goes into a network namespace of its own whose side of the tap has the peer's
//! address: the daemon (in a namespace of its own) creates the taps, and the test moves each
//! into its namespace with `ip link set TAP netns NS` while the clone runs (the daemon's open
//! file descriptor stays attached to the tap wherever the interface goes).

mod common;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::{json, Value};

fn sh(cmd: &str, args: &[&str]) -> Output {
    let o = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(o.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("snvf{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    /// Gives `tap` (in this namespace) the peer's address 10.77.0.1/24 and brings it up.
    fn peer_side(&self, tap: &str) {
        sh("ip", &["-n", &self.0, "addr", "add", "10.77.0.1/24", "dev", tap]);
        sh("ip", &["-n", &self.0, "link", "set", tap, "up"]);
    }

    /// The MAC this namespace's neighbour table has for `ip` on `dev`, if any.
    fn neighbour(&self, ip: &str, dev: &str) -> Option<String> {
        let o = Command::new("ip").args(["-n", &self.0, "neigh", "show", ip, "dev", dev]).output().ok()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let words: Vec<&str> = text.split_whitespace().collect();
        words.iter().position(|w| *w == "lladdr").and_then(|i| words.get(i + 1)).map(|s| s.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The `icmp_seq` numbers of the reply lines in `out`.
fn reply_seqs(out: &str) -> Vec<u64> {
    out.lines()
        .filter(|l| l.ends_with(" reply") && l.contains("bytes from"))
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

fn serial(d: &Daemon, vm: &str) -> String {
    let (_, v) = d.call("GET", &format!("/vms/{vm}/serial"), None);
    v.as_str().map(String::from).unwrap_or_else(|| v.to_string())
}

fn mac_of(info: &Value) -> String {
    info["macs"][0].as_str().unwrap_or_else(|| panic!("no MAC in {info}")).to_string()
}

#[test]
fn three_daemon_clones_on_three_taps_ping_at_once_with_their_own_macs() {
    // Declared first, dropped last: the daemon (and with it the taps it holds) goes first.
    let nss: Vec<Netns> = (0..3).map(|_| Netns::new()).collect();
    let home = Netns::new();
    sh("ip", &["-n", &home.0, "tuntap", "add", "dev", "snvsrc", "mode", "tap", "vnet_hdr"]);
    home.peer_side("snvsrc");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_under(dir.path(), &[], &["ip", "netns", "exec", &home.0]);

    // The source VM pings its peer; it is snapshotted mid-traffic.
    let netping = json!({"mode": "ping", "guest_ip": "10.77.0.2/24", "ping": "10.77.0.1", "count": 0,
                         "ping_interval_ms": 100});
    let src = d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "src", "guest": "netping", "mem_mib": 16, "start": true,
                    "net": [{"tap": "snvsrc", "romfile": "none"}], "netping": netping})),
    );
    let src_mac = mac_of(&src);
    let out = d.wait_serial("src", "icmp_seq=3 reply", Duration::from_secs(30));
    assert!(out.contains("icmp_seq=3 reply"), "the source VM pings: {out}");
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
    let before = reply_seqs(&serial(&d, "src"));
    // It has done its part: its CPU goes to the clones (netping polls its rings).
    d.ok("POST", "/vms/src/stop", None);

    // Three clones in one request, each on its own new tap with its own MAC.
    let macs = ["52:54:00:f1:00:01", "52:54:00:f1:00:02", "52:54:00:f1:00:03"];
    let taps = ["snvc0", "snvc1", "snvc2"];
    let overrides: Vec<Value> =
        taps.iter().zip(macs).map(|(t, m)| json!([{"nic": 0, "new_tap": t, "mac": m}])).collect();
    let clones = d.ok(
        "POST",
        "/snapshots/s/clone",
        Some(json!({"prefix": "c", "count": 3, "mode": "lazy", "network_overrides": overrides})),
    );
    for (k, ns) in nss.iter().enumerate() {
        assert_eq!(mac_of(&clones[k]), macs[k], "clone c{k}: {}", clones[k]);
        // The daemon created the tap in its namespace; it moves, attached, to the clone's own.
        sh("ip", &["-n", &home.0, "link", "set", taps[k], "netns", &ns.0]);
        ns.peer_side(taps[k]);
    }

    // All three ping at once: each one's serial shows its own replies, and each namespace's
    // host learnt that clone's MAC from its ARP and ICMP.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: [Option<String>; 3] = Default::default();
    let mut replies: [Vec<u64>; 3] = Default::default();
    while Instant::now() < deadline {
        for k in 0..3 {
            replies[k] = reply_seqs(&serial(&d, &format!("c{k}")));
            if let Some(m) = nss[k].neighbour("10.77.0.2", taps[k]) {
                seen[k] = Some(m);
            }
        }
        if replies.iter().all(|r| r.len() >= 5) && seen.iter().all(Option::is_some) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for k in 0..3 {
        let out = serial(&d, &format!("c{k}"));
        assert!(replies[k].len() >= 5, "clone c{k} pings: {out}");
        assert!(out.contains("64 bytes from 10.77.0.1: icmp_seq="), "clone c{k}: {out}");
        // A clone continues the snapshot's sequence (taken after icmp_seq 3), not from 1.
        assert!(replies[k][0] > 3, "clone c{k}: {:?} (source: {before:?})", replies[k]);
        assert_eq!(seen[k].as_deref(), Some(macs[k]), "clone c{k}'s MAC in its namespace's neighbour table: {out}");
    }
    // At once: every clone is still pinging (its reply count grows) while the others do.
    let n0: Vec<usize> = (0..3).map(|k| reply_seqs(&serial(&d, &format!("c{k}"))).len()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    for (k, n) in n0.iter().enumerate() {
        let n1 = reply_seqs(&serial(&d, &format!("c{k}"))).len();
        assert!(n1 > *n, "clone c{k} stopped pinging ({n} -> {n1} replies)");
    }
    for k in 0..3 {
        d.ok("DELETE", &format!("/vms/c{k}"), None);
    }

    // Clones whose overrides give no MAC: the daemon picks, each different, none the source's
    // nor one another clone had.
    let overrides: Vec<Value> = (0..3).map(|k| json!([{"nic": 0, "new_tap": format!("snvd{k}")}])).collect();
    let picked =
        d.ok("POST", "/snapshots/s/clone", Some(json!({"prefix": "d", "count": 3, "network_overrides": overrides})));
    let mut all: Vec<String> = (0..3).map(|k| mac_of(&picked[k])).collect();
    for m in &all {
        assert!(m.starts_with("52:54:00:"), "{m}");
        assert_ne!(m, &src_mac, "a clone has the source VM's MAC");
        assert!(!macs.contains(&m.as_str()), "{m}");
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3, "picked MACs not unique: {picked}");
    for k in 0..3 {
        d.ok("DELETE", &format!("/vms/d{k}"), None);
    }
}

#[test]
fn a_vm_keeps_the_mac_it_was_defined_with_across_restarts() {
    let tag = std::process::id() % 100_000;
    let (tap, old_tap, clone_tap) = (format!("nfp{tag}"), format!("nfo{tag}"), format!("nfc{tag}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &[]);
    let info = d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "p", "guest": "idle", "mem_mib": 16, "net": [{"tap": tap, "romfile": "none"}]})),
    );
    // Picked when defined, shown in the definition before the VM ever ran.
    let mac = info["net"][0]["mac"].as_str().unwrap_or_else(|| panic!("no MAC in the definition: {info}")).to_string();
    assert!(mac.starts_with("52:54:00:"), "{mac}");
    let saved = std::fs::read_to_string(d.state.join("vms/p.json")).expect("state file");
    assert!(saved.contains(&mac), "the state file keeps the MAC: {saved}");
    assert_eq!(mac_of(&d.ok("POST", "/vms/p/start", None)), mac);
    d.ok("POST", "/vms/p/stop", None);
    assert_eq!(mac_of(&d.ok("POST", "/vms/p/start", None)), mac, "stop/start");

    // A definition from before MACs were kept (no "mac"): still loads, and gets one it keeps.
    let old = json!({"name": "old", "guest": "idle", "mem_mib": 16, "vcpus": 1, "seed": 0, "passes": 0,
                     "restored_from": null, "resume_from": null, "net": [{"tap": old_tap, "romfile": "none"}]});
    std::fs::write(d.state.join("vms/old.json"), old.to_string()).expect("old state file");

    let (status, _) = d.terminate_within(Duration::from_secs(30));
    assert!(status.is_some(), "the daemon did not exit on SIGTERM");
    let d2 = Daemon::start(dir.path(), &[]);
    let info = d2.ok("GET", "/vms/p", None);
    assert_eq!(info["net"][0]["mac"].as_str(), Some(mac.as_str()), "daemon restart: {info}");
    assert_eq!(mac_of(&d2.ok("POST", "/vms/p/start", None)), mac, "started after the daemon restart");

    let info = d2.ok("GET", "/vms/old", None);
    let old_mac = info["net"][0]["mac"].as_str().unwrap_or_else(|| panic!("old VM got no MAC: {info}")).to_string();
    assert_ne!(old_mac, mac);
    let saved = std::fs::read_to_string(d2.state.join("vms/old.json")).expect("state file");
    assert!(saved.contains(&old_mac), "the old VM's MAC is saved: {saved}");
    assert_eq!(mac_of(&d2.ok("POST", "/vms/old/start", None)), old_mac);
    d2.ok("DELETE", "/vms/old", None);

    // A clone without a MAC override still gets a new one.
    d2.ok("POST", "/vms/p/snapshot", Some(json!({"name": "ps"})));
    let c = d2.ok(
        "POST",
        "/snapshots/ps/clone",
        Some(json!({"prefix": "pc", "count": 1, "network_overrides": [[{"nic": 0, "new_tap": clone_tap}]]})),
    );
    let cm = mac_of(&c[0]);
    assert_ne!(cm, mac, "a clone got its source's MAC");
    assert_eq!(c[0]["net"][0]["mac"].as_str(), Some(cm.as_str()), "the clone's definition keeps its MAC: {c}");
}
