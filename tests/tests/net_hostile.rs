//! The hostile tester's smaller findings about NICs, each refused with a clear error: a `run`
//! refused for its tap leaves no `--store` behind, a multi-queue tap is named as one, API
//! errors name the image (never its host path) and the JSON field (never `--net` syntax),
//! netping's addresses and interval are bounded, and one MAC is never given to two clones
//! of a request or to a clone and a running VM.

mod common;

use std::process::Command;

use common::daemon::Daemon;
use common::snapvisor;
use serde_json::json;

/// A tap name unique to this test process (the host's interfaces are shared).
fn tap_name(tag: &str) -> String {
    format!("nh{}{tag}", std::process::id() % 100_000)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tap made with `ip tuntap add`, deleted again when dropped.
struct MadeTap(String, &'static str);

impl MadeTap {
    fn new(name: &str, multi_queue: bool) -> MadeTap {
        let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        if multi_queue {
            args.push("multi_queue");
        }
        let o = Command::new("ip").args(&args).output().expect("ip tuntap");
        assert!(o.status.success(), "ip {args:?}: {}", stderr(&o));
        MadeTap(name.to_string(), if multi_queue { "multi_queue" } else { "" })
    }
}

impl Drop for MadeTap {
    fn drop(&mut self) {
        let mut args = vec!["tuntap", "del", "dev", &self.0, "mode", "tap"];
        if !self.1.is_empty() {
            args.push(self.1);
        }
        let _ = Command::new("ip").args(&args).output();
    }
}

#[test]
fn a_run_refused_for_its_tap_creates_no_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let st = store.to_str().expect("utf-8");
    let o = snapvisor(&[
        "run",
        "--builtin",
        "idle",
        "--mem-mib",
        "16",
        "--net",
        "tap=lo,romfile=none",
        "--snapshot-after-ms",
        "0",
        "--store",
        st,
        "--name",
        "s",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("'lo' is not a tap"), "{}", stderr(&o));
    assert!(!store.exists(), "a refused run created its --store {}", store.display());
}

#[test]
fn a_multi_queue_tap_is_named_as_one() {
    let name = tap_name("q");
    let _tap = MadeTap::new(&name, true);
    let o = snapvisor(&["run", "--builtin", "idle", "--mem-mib", "16", "--net", &format!("tap={name},romfile=none")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(&format!("'{name}' is a multi-queue tap")), "{e}");
    assert!(e.contains("IFF_MULTI_QUEUE") && e.contains("without multi_queue"), "{e}");
    assert!(!e.contains("is not a tap"), "{e}");

    // Through the API: a bad request naming the same.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let (status, v) = d.call(
        "POST",
        "/vms",
        Some(json!({"name": "mq", "guest": "idle", "mem_mib": 16, "start": true,
                    "net": [{"tap": name, "romfile": "none"}]})),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("is a multi-queue tap"), "{v}");
}

#[test]
fn api_rom_errors_name_the_image_never_its_host_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    // A ROM for another device (8086:100e), uploaded as an image.
    let rom = hypervisor::net::rom::synthetic(0x1000, 0x8086, 0x100e);
    let images = d.state.join("images");
    std::fs::create_dir_all(&images).expect("image dir");
    std::fs::write(images.join("e1000.rom"), &rom).expect("write image");
    let tap = tap_name("r");
    let (status, v) = d.call(
        "POST",
        "/vms",
        Some(json!({"name": "r", "guest": "idle", "mem_mib": 16, "start": true,
                    "net": [{"tap": tap, "romfile": "e1000.rom"}]})),
    );
    assert_eq!(status, 400, "{v}");
    let e = v["error"].as_str().unwrap_or("").to_string();
    assert!(e.contains("image 'e1000.rom'") && e.contains("8086:100e"), "{e}");
    let host = images.to_string_lossy().into_owned();
    assert!(!e.contains(&host) && !e.contains(&*dir.path().to_string_lossy()), "a host path in: {e}");
}

#[test]
fn api_nic_errors_name_the_json_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    // NIC entries: errors name the field, in the API's terms.
    for (net, needle) in [
        (json!([{"tap": "t1"}, {"tap": "a/b"}]), "net[1].tap: tap name 'a/b' has '/'"),
        (json!([{"tap": "t1", "romsize": 12288}]), "net[0].romsize: romsize 0x3000 must be a power of two"),
        (
            json!([{"tap": "t1", "romfile": "none", "romsize": 4096}]),
            "net[0].romsize: 0x1000 with \"romfile\": \"none\"",
        ),
        (json!([{"tap": "t1", "romfile": "../x"}]), "net[0].romfile: "),
    ] {
        let (status, v) =
            d.call("POST", "/vms", Some(json!({"name": "n", "guest": "idle", "mem_mib": 16, "net": net.clone()})));
        assert_eq!(status, 400, "{net}: {v}");
        let e = v["error"].as_str().unwrap_or("");
        assert!(e.contains(needle), "{net}: {e}");
        assert!(!e.contains("--net"), "CLI syntax in an API error: {e}");
    }
}

#[test]
fn api_netping_addresses_and_interval_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    // netping's addresses and interval, through the API.
    for (netping, needle) in [
        (
            json!({"guest_ip": "10.77.0.255/24", "ping": "10.77.0.1"}),
            "10.77.0.255 is the broadcast address of 10.77.0.0/24",
        ),
        (json!({"guest_ip": "10.77.0.0/24", "ping": "10.77.0.1"}), "10.77.0.0 is the network address of 10.77.0.0/24"),
        (json!({"guest_ip": "10.77.0.2/24", "ping": "10.77.0.255"}), "10.77.0.255 is the broadcast address"),
        (json!({"guest_ip": "10.77.0.2/24", "ping": "10.77.0.1", "ping_interval_ms": u64::MAX}), "at most 60000"),
    ] {
        let body = json!({"name": "np", "guest": "netping", "mem_mib": 16, "net": [{"tap": "t1"}], "netping": netping});
        let (status, v) = d.call("POST", "/vms", Some(body));
        assert_eq!(status, 400, "{netping}: {v}");
        assert!(v["error"].as_str().unwrap_or("").contains(needle), "{netping}: {v}");
    }
    let (status, _) = d.call("GET", "/vms/np", None);
    assert_eq!(status, 404, "nothing was defined");
}

/// A daemon with a running idle VM `src` on a NIC, snapshotted as `s`; the VM's MAC.
fn daemon_with_snapshot(dir: &std::path::Path) -> (Daemon, String) {
    let d = Daemon::start(dir, &[]);
    let info = d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "src", "guest": "idle", "mem_mib": 16, "start": true,
                    "net": [{"tap": tap_name("s"), "romfile": "none"}]})),
    );
    let src_mac = info["macs"][0].as_str().expect("src MAC").to_string();
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
    (d, src_mac)
}

fn clone_taps() -> Vec<String> {
    (0..3).map(|i| tap_name(&format!("c{i}"))).collect()
}

/// Clones `c0`..`c2` of `s`, each on its own tap with its MAC of `macs`.
fn clone(d: &Daemon, macs: [&str; 3]) -> (u16, serde_json::Value) {
    let over: Vec<_> =
        clone_taps().iter().zip(macs).map(|(t, m)| json!([{"nic": 0, "new_tap": t, "mac": m}])).collect();
    d.call("POST", "/snapshots/s/clone", Some(json!({"prefix": "c", "count": 3, "network_overrides": over})))
}

fn assert_no_clones(d: &Daemon) {
    for i in 0..3 {
        let (status, _) = d.call("GET", &format!("/vms/c{i}"), None);
        assert_eq!(status, 404, "clone c{i} was made");
    }
}

#[test]
fn one_mac_for_two_clones_of_a_request_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, _) = daemon_with_snapshot(dir.path());
    let (status, v) = clone(&d, ["52:54:00:ab:00:01", "52:54:00:ab:00:02", "52:54:00:ab:00:01"]);
    assert_eq!(status, 400, "{v}");
    let e = v["error"].as_str().unwrap_or("");
    assert!(e.contains("MAC 52:54:00:ab:00:01 is given to clones 'c0' and 'c2'"), "{e}");
    assert!(e.contains("nothing was cloned"), "{e}");
    assert_no_clones(&d);
    // Distinct MACs: all three made, each with its own.
    let (status, v) = clone(&d, ["52:54:00:ab:00:10", "52:54:00:ab:00:11", "52:54:00:ab:00:12"]);
    assert_eq!(status, 201, "{v}");
    let macs: Vec<&str> = (0..3).map(|i| v[i]["macs"][0].as_str().unwrap_or_default()).collect();
    assert_eq!(macs, ["52:54:00:ab:00:10", "52:54:00:ab:00:11", "52:54:00:ab:00:12"], "{v}");
}

#[test]
fn a_running_vms_mac_is_refused_for_clones_and_restores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, src_mac) = daemon_with_snapshot(dir.path());
    let (status, v) = clone(&d, ["52:54:00:ab:00:01", &src_mac, "52:54:00:ab:00:03"]);
    assert_eq!(status, 409, "{v}");
    let e = v["error"].as_str().unwrap_or("");
    assert!(e.contains(&format!("{src_mac} is the MAC of running VM 'src'")) && e.contains("'c1'"), "{e}");
    assert_no_clones(&d);
    // A single restore is held to the same rule.
    let over = json!([{"nic": 0, "new_tap": clone_taps()[0], "mac": src_mac}]);
    let (status, v) = d.call("POST", "/snapshots/s/restore", Some(json!({"vm": "r", "network_overrides": over})));
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("running VM 'src'"), "{v}");
    let (status, _) = d.call("GET", "/vms/r", None);
    assert_eq!(status, 404, "the restore was made");
}
