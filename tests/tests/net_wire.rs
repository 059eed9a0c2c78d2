//! NICs wired into machines, the CLI, the API and snapshots: tap errors (missing permission,
//! busy, bad name, not a tap), MACs unique across a daemon's VMs, `restore --net` with another
//! NIC count refused with nothing changed, the device fragment's round trip and a tampered
//! fragment refused by name, and no fd or thread left behind by a VM with NICs.
//! (The data path, pinging through the tap, is in the `netping` tests.)

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::snapvisor;
use hypervisor::guests::Builtin;
use hypervisor::net::{Mac, NetSpec, RomChoice};
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};
use migrate::persist::Persist;
use serde_json::json;

/// A tap name unique to this test process (the host's interfaces are shared with other
/// engineers' test runs).
fn tap_name(tag: &str) -> String {
    format!("nw{}{tag}", std::process::id() % 100_000)
}

fn link_exists(name: &str) -> bool {
    Command::new("ip").args(["link", "show", "dev", name]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// A persistent tap, deleted again when dropped.
struct PersistentTap(String);

impl PersistentTap {
    fn new(name: &str) -> PersistentTap {
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

fn nic(tap: &str) -> NetSpec {
    NetSpec { tap: tap.to_string(), mac: None, rom: RomChoice::None, romsize: None }
}

fn idle_vm(net: Vec<NetSpec>) -> Result<Vm, hypervisor::vm::VmError> {
    let boot = BootSource::Builtin { guest: Builtin::Idle, params: BuiltinParams::default() };
    let mut cfg = VmConfig::new(64, 1, boot, Box::new(SharedOutput::default()));
    cfg.net = net;
    Vm::new(cfg)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn tap_errors_through_the_cli() {
    let busy = tap_name("b");
    // Held by this process: a tap without IFF_MULTI_QUEUE takes one user.
    let _held = devices::net::tap::Tap::open(&busy).expect("open a tap in the test");
    let spec = format!("tap={busy},romfile=none");
    let o = snapvisor(&["run", "--builtin", "idle", "--mem-mib", "64", "--timeout", "5", "--net", &spec]);
    assert_eq!(o.status.code(), Some(2), "busy tap: {}", stderr(&o));
    assert!(stderr(&o).contains(&format!("tap '{busy}' is in use")), "{}", stderr(&o));

    // Not a tap: an interface of another kind has the name.
    let o = snapvisor(&["run", "--builtin", "idle", "--mem-mib", "64", "--net", "tap=lo,romfile=none"]);
    assert_eq!(o.status.code(), Some(2), "lo: {}", stderr(&o));
    assert!(stderr(&o).contains("'lo' is not a tap"), "{}", stderr(&o));

    // A bad name never reaches the kernel.
    let o = snapvisor(&["run", "--builtin", "idle", "--mem-mib", "64", "--net", "tap=a/b"]);
    assert_eq!(o.status.code(), Some(2), "bad name: {}", stderr(&o));
    assert!(stderr(&o).contains("tap name 'a/b' has '/'"), "{}", stderr(&o));

    // Missing, without the permission to create it: root without CAP_NET_ADMIN.
    let missing = tap_name("m");
    let o = Command::new("setpriv")
        .args(["--bounding-set", "-net_admin", "--inh-caps", "-net_admin"])
        .arg(common::snapvisor_bin())
        .args(["run", "--builtin", "idle", "--mem-mib", "64", "--net", &format!("tap={missing},romfile=none")])
        .output()
        .expect("setpriv");
    assert_eq!(o.status.code(), Some(2), "no CAP_NET_ADMIN: {}", stderr(&o));
    assert!(stderr(&o).contains(&format!("tap '{missing}': permission denied")), "{}", stderr(&o));
    assert!(stderr(&o).contains("CAP_NET_ADMIN"), "{}", stderr(&o));
    assert!(!link_exists(&missing));

    // The same MAC twice in one VM.
    let (a, b) = (tap_name("x"), tap_name("y"));
    let o = snapvisor(&[
        "run",
        "--builtin",
        "idle",
        "--mem-mib",
        "64",
        "--net",
        &format!("tap={a},mac=52:54:00:00:00:42,romfile=none"),
        "--net",
        &format!("tap={b},mac=52:54:00:00:00:42,romfile=none"),
    ]);
    assert_eq!(o.status.code(), Some(2), "MAC twice: {}", stderr(&o));
    assert!(stderr(&o).contains("MAC 52:54:00:00:00:42 is given to two NICs"), "{}", stderr(&o));
    assert!(!link_exists(&a) && !link_exists(&b), "nothing was opened before the MACs were checked");
}

#[test]
fn tap_errors_macs_and_fds_through_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let vm = |name: &str, net: serde_json::Value| json!({"name": name, "guest": "idle", "mem_mib": 16, "start": true, "net": net});
    // Warm up the daemon (first VM, first threads) before counting its fds.
    d.ok("POST", "/vms", Some(vm("warm", json!([]))));
    d.ok("DELETE", "/vms/warm", None);
    let fds = d.open_fds();

    let busy = tap_name("B");
    let _held = devices::net::tap::Tap::open(&busy).expect("open a tap in the test");
    let (status, v) = d.call("POST", "/vms", Some(vm("busy", json!([{"tap": busy, "romfile": "none"}]))));
    assert_eq!(status, 409, "busy tap: {v}");
    assert!(v["error"].as_str().unwrap_or("").contains(&format!("tap '{busy}' is in use")), "{v}");
    let (status, _) = d.call("GET", "/vms/busy", None);
    assert_eq!(status, 404, "a VM whose start failed is not left defined");

    for (net, needle) in [
        (json!([{"tap": "a/b"}]), "has '/'"),
        (json!([{"tap": "lo", "romfile": "none"}]), "'lo' is not a tap"),
        (json!([{"tap": "t1", "romfile": "../etc/passwd"}]), "romfile"),
        (json!([{"tap": "t1", "mac": "01:00:00:00:00:01"}]), "multicast"),
        (
            json!([{"tap": "t1", "mac": "52:54:00:00:00:07"}, {"tap": "t2", "mac": "52:54:00:00:00:07"}]),
            "given to two NICs",
        ),
        (json!([{"tap": "t1"}, {"tap": "t1"}]), "tap t1 is given to two NICs of this VM (NICs 0 and 1)"),
        (json!([{"tap": "t1", "queues": 2}]), "queues"),
    ] {
        let (status, v) = d.call("POST", "/vms", Some(vm("bad", net.clone())));
        assert_eq!(status, 400, "{net}: {v}");
        assert!(v.to_string().contains(needle), "{net}: {v}");
    }

    // MACs: picked, unique across the daemon's VMs, locally administered.
    let taps: Vec<String> = (0..3).map(|i| tap_name(&format!("u{i}"))).collect();
    let mut macs = Vec::new();
    for (i, t) in taps.iter().enumerate() {
        let info = d.ok("POST", "/vms", Some(vm(&format!("m{i}"), json!([{"tap": t, "romfile": "none"}]))));
        let m = info["macs"][0].as_str().unwrap_or_default().to_string();
        assert!(m.starts_with("52:54:00:"), "VM m{i} got MAC '{m}': {info}");
        macs.push(m);
    }
    let mut unique = macs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3, "MACs not unique: {macs:?}");
    for t in &taps {
        assert!(link_exists(t), "the daemon created tap {t}");
    }
    // Stopped and started again: the new machine gets the tap the old one held.
    d.ok("POST", "/vms/m0/stop", None);
    d.ok("POST", "/vms/m0/start", None);
    for i in 0..3 {
        d.ok("DELETE", &format!("/vms/m{i}"), None);
    }
    // Deleted VMs close their taps (non-persistent: the kernel removes them) and leave no fd.
    let t0 = Instant::now();
    while (taps.iter().any(|t| link_exists(t)) || d.open_fds() > fds) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!taps.iter().any(|t| link_exists(t)), "a deleted VM's tap is still open");
    assert!(d.open_fds() <= fds, "daemon fds grew from {fds} to {} over VMs with NICs", d.open_fds());
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[test]
fn vms_with_nics_leave_no_fd_or_thread_behind() {
    let taps = [tap_name("L0"), tap_name("L1")];
    let run = || {
        let mut vm = idle_vm(taps.iter().map(|t| nic(t)).collect()).expect("VM with two NICs");
        vm.start().expect("start");
        std::thread::sleep(Duration::from_millis(100));
        vm.stop("test done");
        drop(vm);
    };
    run();
    let (fds, th) = (open_fds(), threads());
    for _ in 0..3 {
        run();
    }
    // A VM never started, and one whose second NIC fails, leave nothing either.
    drop(idle_vm(vec![nic(&taps[0])]).expect("VM"));
    let held = devices::net::tap::Tap::open(&taps[1]).expect("hold tap");
    assert!(idle_vm(vec![nic(&taps[0]), nic(&taps[1])]).is_err(), "the second tap is busy");
    drop(held);
    let (fds_after, th_after) = (open_fds(), threads());
    assert!(fds_after <= fds, "file descriptors grew from {fds} to {fds_after}");
    assert!(th_after <= th, "threads grew from {th} to {th_after}: an I/O thread outlived its VM");
}

#[test]
fn builtin_vms_find_their_nics_at_fixed_bars() {
    let taps = [tap_name("P0"), tap_name("P1")];
    let vm = idle_vm(taps.iter().map(|t| nic(t)).collect()).expect("VM");
    let bus = vm.devices().platform.pci_bus.lock().expect("bus");
    for i in 0..2 {
        let bdf = hypervisor::net::nic_bdf(i);
        let (msix, modern) = hypervisor::net::builtin_bars(i);
        assert_eq!(bus.mapped(bdf, devices::virtio::MSIX_BAR).map(|r| r.addr), Some(msix), "NIC {i}");
        assert_eq!(bus.mapped(bdf, devices::virtio::MODERN_BAR).map(|r| r.addr), Some(modern), "NIC {i}");
        let mut cmd = [0u8; 2];
        bus.read(bdf, 4, &mut cmd);
        assert_eq!(u16::from_le_bytes(cmd) & 0x6, 0x6, "memory decoding and bus mastering on");
    }
    drop(bus);
    let macs: Vec<Mac> = vm.spec().net.iter().filter_map(|n| n.mac).collect();
    assert_eq!(macs.len(), 2);
    assert_ne!(macs[0], macs[1]);
    // The queue notifications are KVM ioeventfds at the notify area: KVM refuses the same
    // registration twice (EEXIST).
    for (i, n) in vm.devices().nics.iter().enumerate() {
        let (_, modern) = hypervisor::net::builtin_bars(i);
        let fds = n.device.lock().expect("dev").notify_fds();
        for (q, fd) in fds.iter().enumerate() {
            let addr = kvm_ioctls::IoEventAddress::Mmio(modern + devices::virtio::NOTIFY_OFFSET + 4 * q as u64);
            let e = vm.fd().register_ioevent(fd, &addr, kvm_ioctls::NoDatamatch).expect_err("already registered");
            assert_eq!(e.errno(), libc::EEXIST, "NIC {i} queue {q}: {e}");
        }
    }
}

#[test]
fn device_fragment_round_trip_and_tampering() {
    use devices::virtio::net::VirtioNetState;
    use hypervisor::snapshot::net_state::NetPersist;
    let tap = tap_name("F");
    let a = idle_vm(vec![nic(&tap)]).expect("VM a");
    let n = &a.devices().nics[0];
    let p = NetPersist { bdf: n.bdf, device: n.device.clone() };
    assert_eq!(p.persist_name(), "dev/virtio-net/0000:00:03.0");
    let bytes = p.save_state().expect("save");
    let state: VirtioNetState = migrate::persist::decode("x", &bytes).expect("decode");
    // The adapter holds the device (and its tap) too.
    drop(p);
    drop(a);

    let b = idle_vm(vec![nic(&tap)]).expect("VM b");
    let n = &b.devices().nics[0];
    let mut p = NetPersist { bdf: n.bdf, device: n.device.clone() };
    p.restore_state(&bytes).expect("round trip");
    assert_eq!(n.device.lock().expect("dev").state(), state);

    let mut bad = state.clone();
    bad.queues[0].size = 3;
    let tampered = migrate::persist::encode("x", &bad).expect("encode");
    let e = p.restore_state(&tampered).expect_err("queue size 3").to_string();
    assert!(e.contains("dev/virtio-net/0000:00:03.0"), "{e}");
    assert_eq!(n.device.lock().expect("dev").state(), state, "a refused state changes nothing");
    let e = p.restore_state(b"\xff\x00garbage").expect_err("garbage").to_string();
    assert!(e.contains("dev/virtio-net/0000:00:03.0"), "{e}");
}

#[test]
fn restore_with_another_nic_count_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let store_s = store.to_str().expect("utf-8");
    let (t0, t1, t2) = (tap_name("R0"), tap_name("R1"), tap_name("R2"));
    let _t0 = PersistentTap::new(&t0);
    let o = snapvisor(&[
        "run",
        "--builtin",
        "idle",
        "--mem-mib",
        "64",
        "--net",
        &format!("tap={t0},mac=52:54:00:aa:00:01,romfile=none"),
        "--snapshot-after-ms",
        "0",
        "--exit-after-snapshot",
        "--store",
        store_s,
        "--name",
        "s",
    ]);
    assert!(o.status.success(), "snapshot: {}", stderr(&o));
    let before = snapvisor(&["store", "inspect", "--store", store_s, "s", "--json"]);
    assert!(before.status.success(), "{}", stderr(&before));

    let o = snapvisor(&[
        "restore",
        "--store",
        store_s,
        "s",
        "--timeout",
        "5",
        "--net",
        &format!("tap={t1},romfile=none"),
        "--net",
        &format!("tap={t2},romfile=none"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("snapshot 's' has 1 NIC(s) but 2 --net option(s) were given"), "{}", stderr(&o));
    assert!(!link_exists(&t1) && !link_exists(&t2), "no tap was created");
    let after = snapvisor(&["store", "inspect", "--store", store_s, "s", "--json"]);
    assert_eq!(before.stdout, after.stdout, "the store is unchanged");

    // The same count, another tap: accepted; the snapshot's MAC is kept.
    let _t1 = PersistentTap::new(&t1);
    let o =
        snapvisor(&["restore", "--store", store_s, "s", "--timeout", "1", "--net", &format!("tap={t1},romfile=none")]);
    assert_eq!(o.status.code(), Some(124), "restored and ran until the timeout: {}", stderr(&o));
}

#[test]
fn clones_get_new_macs_unless_overridden() {
    use hypervisor::net::overrides::NetOverride;
    use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let (t0, t1, t2) = (tap_name("C0"), tap_name("C1"), tap_name("C2"));
    let mac = Mac([0x52, 0x54, 0, 0xbb, 0, 1]);
    let vm = idle_vm(vec![NetSpec { mac: Some(mac), ..nic(&t0) }]).expect("VM");
    snapshot::save(&vm, &store, "c", &SaveOptions::default(), &|_| {}).expect("snapshot");
    drop(vm);
    let restore = |new_macs: bool, over: Vec<NetOverride>| {
        let mut o = RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default()));
        o.new_macs = new_macs;
        o.net_overrides = over;
        snapshot::restore(&store, "c", o).map(|(vm, _)| vm)
    };
    // A plain restore keeps the MAC.
    let plain = restore(false, Vec::new()).expect("restore");
    assert_eq!(plain.spec().net[0].mac, Some(mac));
    drop(plain);
    // A clone on another tap gets a new MAC.
    let over = |tap: &str, mac: Option<Mac>| {
        vec![NetOverride { nic: Some(0), new_tap: Some(tap.into()), mac, ..Default::default() }]
    };
    let c1 = restore(true, over(&t1, None)).expect("clone 1");
    assert_eq!(c1.spec().net[0].tap, t1);
    let m1 = c1.spec().net[0].mac.expect("mac");
    assert_ne!(m1, mac);
    // Unless its override gives one.
    let given = Mac([0x52, 0x54, 0, 0xbb, 0, 9]);
    let c2 = restore(true, over(&t2, Some(given))).expect("clone 2");
    assert_eq!(c2.spec().net[0].mac, Some(given));
    // An override naming a NIC the snapshot lacks is refused by name.
    let e = restore(true, vec![NetOverride { nic: Some(4), new_tap: Some("x".into()), ..Default::default() }])
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("NIC 4 does not exist"), "{e}");
}

#[test]
fn api_clones_take_network_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let (t0, c0, c1, r0) = (tap_name("A0"), tap_name("Ac0"), tap_name("Ac1"), tap_name("Ar0"));
    let mac = "52:54:00:cc:00:01";
    let net = json!([{"tap": t0, "mac": mac, "romfile": "none"}]);
    d.ok("POST", "/vms", Some(json!({"name": "src", "guest": "idle", "mem_mib": 16, "start": true, "net": net})));
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
    d.ok("DELETE", "/vms/src", None);

    // One list per clone, or the request is refused before anything is made.
    let (status, v) = d.call(
        "POST",
        "/snapshots/s/clone",
        Some(json!({"prefix": "x", "count": 2, "network_overrides": [[{"nic": 0, "new_tap": c0}]]})),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("one list per clone"), "{v}");

    let given = "52:54:00:cc:00:09";
    let clones = d.ok(
        "POST",
        "/snapshots/s/clone",
        Some(json!({"prefix": "c", "count": 2, "mode": "eager", "network_overrides": [
            [{"tap": t0, "new_tap": c0}],
            [{"nic": 0, "new_tap": c1, "mac": given}],
        ]})),
    );
    let m0 = clones[0]["macs"][0].as_str().unwrap_or_default().to_string();
    let m1 = clones[1]["macs"][0].as_str().unwrap_or_default().to_string();
    assert!(m0.starts_with("52:54:00:") && m0 != mac, "clone 0 gets a new MAC, not {m0}: {clones}");
    assert_eq!(m1, given, "clone 1 gets its override's MAC: {clones}");
    assert_eq!(clones[0]["net"][0]["tap"], json!(c0), "{clones}");
    assert_eq!(clones[1]["net"][0]["tap"], json!(c1), "{clones}");

    // A plain restore keeps the MAC; an override naming an unknown tap is refused by name.
    let (status, v) = d.call(
        "POST",
        "/snapshots/s/restore",
        Some(json!({"vm": "r", "network_overrides": [{"tap": "nope", "new_tap": r0}]})),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("no NIC of the snapshot is on tap 'nope'"), "{v}");
    let r = d.ok(
        "POST",
        "/snapshots/s/restore",
        Some(json!({"vm": "r", "mode": "eager", "network_overrides": [{"nic": 0, "new_tap": r0}]})),
    );
    assert_eq!(r["macs"][0], json!(mac), "{r}");
}

/// A stopped VM frees its taps at once (another VM may take the tap; before, only a delete
/// did); a VM the daemon cannot resume from its shutdown snapshot because its tap is busy
/// keeps that snapshot and its definition's pointer to it (start is refused, naming it) and
/// resumes at the next daemon start once the tap is free.
#[test]
fn stopped_vms_free_their_taps_and_a_blocked_resume_keeps_the_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tap = tap_name("R");
    let _persistent = PersistentTap::new(&tap);
    let args = ["--on-shutdown", "snapshot", "--shutdown-timeout", "30"];
    let mut d = Daemon::start(dir.path(), &args);
    let net = json!([{"tap": tap, "romfile": "none"}]);
    d.ok("POST", "/vms", Some(json!({"name": "a", "guest": "idle", "mem_mib": 16, "start": true, "net": net})));
    d.ok("POST", "/vms/a/stop", None);
    // The stopped VM's tap is free: this process can take it (and gives it back).
    drop(devices::net::tap::Tap::open(&tap).expect("a stopped VM's tap is free"));
    d.ok("POST", "/vms/a/start", None);

    let (status, _) = d.terminate_within(Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "daemon exit {status:?}");
    drop(d);
    let held = devices::net::tap::Tap::open(&tap).expect("hold the tap");
    let d = Daemon::start(dir.path(), &args);
    let info = d.ok("GET", "/vms/a", None);
    let snap = info["resume_from"].as_str().unwrap_or_default().to_string();
    assert!(snap.starts_with("__shutdown"), "the definition still points at its snapshot: {info}");
    let snaps = d.ok("GET", "/snapshots", None).to_string();
    assert!(snaps.contains(&snap), "the shutdown snapshot is kept: {snaps}");
    let (status, v) = d.call("POST", "/vms/a/start", None);
    assert_eq!(status, 409, "{v}");
    assert!(v.to_string().contains(&snap), "the refusal names the snapshot: {v}");
    drop(d);

    drop(held);
    let d = Daemon::start(dir.path(), &args);
    let info = d.ok("GET", "/vms/a", None);
    assert_eq!(info["state"], "running", "resumed once the tap was free: {info}");
}
