//! The virtio-net data path with the `netping` guest and a real kernel network stack on the
//! other side of a tap (fast tier).
//!
//! Each test makes its own network namespace (`snvt<pid>x<n>`) holding one tap per VM, with
//! the host side at 10.77.<k>.1/24 and the guest at 10.77.<k>.2/24, and deletes it at the end;
//! `snapvisor` runs inside the namespace (`ip netns exec`), where it attaches to the tap.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::snapvisor_bin;

/// A network namespace with `taps` taps (`snvtap0`, `snvtap1`, ...), tap k at 10.77.k.1/24.
struct Netns {
    name: String,
    taps: Vec<String>,
}

fn sh(cmd: &str, args: &[&str]) -> Output {
    let o = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(o.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

impl Netns {
    fn new(taps: usize) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("snvt{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name, taps: (0..taps).map(|k| format!("snvtap{k}")).collect() };
        sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        for (k, tap) in ns.taps.iter().enumerate() {
            sh("ip", &["-n", &ns.name, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
            sh("ip", &["-n", &ns.name, "addr", "add", &format!("10.77.{k}.1/24"), "dev", tap]);
            sh("ip", &["-n", &ns.name, "link", "set", tap, "up"]);
        }
        ns
    }

    /// `snapvisor ARGS` inside the namespace.
    fn snapvisor(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(snapvisor_bin()).args(args);
        c
    }

    /// `CMD ARGS` inside the namespace.
    fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.name, cmd]).args(args).output().expect("ip netns exec")
    }

    /// The MAC the host's neighbour table has for `ip` on tap k, watched until `child` ends
    /// (the kernel flushes a tap's neighbours when its file descriptor closes). Returns the
    /// MAC seen last and the child's output.
    fn watch_neighbour(&self, k: usize, ip: &str, child: Child) -> (Option<String>, Output) {
        let mut child = child;
        let mut seen = None;
        while child.try_wait().expect("wait").is_none() {
            if let Some(m) = self.neighbour(k, ip) {
                seen = Some(m);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (seen, child.wait_with_output().expect("output"))
    }

    /// The MAC the host's neighbour table has for `ip` on tap k, if any.
    fn neighbour(&self, k: usize, ip: &str) -> Option<String> {
        let o = Command::new("ip").args(["-n", &self.name, "neigh", "show", ip, "dev", &self.taps[k]]).output().ok()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let words: Vec<&str> = text.split_whitespace().collect();
        words.iter().position(|w| *w == "lladdr").and_then(|i| words.get(i + 1)).map(|s| s.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The `icmp_seq` numbers of the reply lines in `out`.
fn reply_seqs(out: &str) -> Vec<u64> {
    out.lines()
        .filter(|l| l.ends_with(" reply") && l.contains("bytes from"))
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

/// netping's ping arguments for tap k.
fn ping_args(k: usize, count: &str) -> Vec<String> {
    [
        "run",
        "--builtin",
        "netping",
        "--mem-mib",
        "16",
        "--net",
        &format!("tap=snvtap{k}"),
        "--guest-ip",
        &format!("10.77.{k}.2/24"),
        "--ping",
        &format!("10.77.{k}.1"),
        "--count",
        count,
        "--timeout",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn netping_round_trips_with_the_kernel() {
    let ns = Netns::new(1);
    let mut args = ping_args(0, "5");
    args.extend(["--ping-interval-ms", "300"].map(String::from));
    let child = ns.snapvisor(&strs(&args)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let (neighbour, o) = ns.watch_neighbour(0, "10.77.0.2", child);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(out.contains("netping: virtio-net ready, mac "), "{out}");
    assert!(out.contains("netping: 10.77.0.1 is at "), "{out}");
    assert_eq!(reply_seqs(&out), vec![1, 2, 3, 4, 5], "{out}");
    assert!(out.contains("64 bytes from 10.77.0.1: icmp_seq=1 reply"), "{out}");
    assert!(out.contains("netping: 5 replies, done"), "{out}");
    // The host learnt the guest's MAC (the one the guest printed) from its ARP.
    let mac = out.split("virtio-net ready, mac ").nth(1).and_then(|s| s.lines().next()).expect("mac line");
    assert_eq!(neighbour.as_deref(), Some(mac), "{out}");
}

#[test]
fn netping_gives_up_with_a_clear_line_when_nobody_answers() {
    let ns = Netns::new(1);
    // Nobody has 10.77.0.9: ARP goes unanswered.
    let mut args = ping_args(0, "5");
    assert_eq!(args[9], "--ping");
    args[10] = "10.77.0.9".into();
    let o = ns.snapvisor(&strs(&args)).output().expect("spawn");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("netping: no ARP reply from the peer after 20 tries"));
}

#[test]
fn echo_mode_answers_the_hosts_ping() {
    let ns = Netns::new(1);
    let mut guest = ns
        .snapvisor(&[
            "run",
            "--builtin",
            "netping",
            "--mem-mib",
            "16",
            "--net",
            "tap=snvtap0",
            "--guest-ip",
            "10.77.0.2/24",
            "--mode",
            "echo",
            "--timeout",
            "60",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    let o = ns.exec("ping", &["-c", "4", "-i", "0.2", "-W", "2", "10.77.0.2"]);
    let _ = guest.kill();
    let _ = guest.wait();
    let ping = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", text(&o));
    assert!(ping.contains("4 received"), "{ping}");
}

#[test]
fn snapshot_mid_traffic_keeps_pinging_after_eager_and_lazy_restore() {
    let ns = Netns::new(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let st = store.to_str().expect("utf-8");
    let mut args = ping_args(0, "1000000");
    args.extend(
        [
            "--ping-interval-ms",
            "20",
            "--snapshot-after-ms",
            "1500",
            "--store",
            st,
            "--name",
            "mid",
            "--exit-after-snapshot",
        ]
        .map(String::from),
    );
    let o = ns.snapvisor(&strs(&args)).output().expect("spawn");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let before = reply_seqs(&String::from_utf8_lossy(&o.stdout));
    assert!(before.len() >= 5, "the guest was pinging when the snapshot was taken: {}", text(&o));
    let last = *before.last().expect("a reply");

    for lazy in [false, true] {
        let mut r = vec!["restore", "--store", st, "mid", "--timeout", "4"];
        if lazy {
            r.push("--lazy");
        }
        let o = ns.snapvisor(&r).output().expect("spawn restore");
        let after = reply_seqs(&String::from_utf8_lossy(&o.stdout));
        assert!(after.len() >= 10, "lazy={lazy}: replies continue after the restore: {}", text(&o));
        assert!(after[0] >= last, "lazy={lazy}: the restored guest continues its sequence ({} < {last})", after[0]);
        assert!(after.windows(2).all(|w| w[1] > w[0]), "lazy={lazy}: {after:?}");
    }
}

#[test]
fn three_clones_on_three_taps_ping_with_their_own_macs() {
    // One namespace per clone, each with a tap snvtap0 whose host side is 10.77.0.1: the
    // clones keep the snapshot's guest address 10.77.0.2.
    let nss: Vec<Netns> = (0..3).map(|_| Netns::new(1)).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let st = store.to_str().expect("utf-8");
    // The snapshot: netping before its first instruction, so every clone starts from the same
    // state and reads its own MAC from its device.
    let mut args = ping_args(0, "5");
    args.extend(
        [
            "--ping-interval-ms",
            "300",
            "--snapshot-after-ms",
            "0",
            "--store",
            st,
            "--name",
            "base",
            "--exit-after-snapshot",
        ]
        .map(String::from),
    );
    let o = nss[0].snapvisor(&strs(&args)).output().expect("spawn");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // A store serves one process at a time: each clone restores from its own copy of it.
    let stores: Vec<String> = (0..3)
        .map(|k| {
            let copy = dir.path().join(format!("store{k}"));
            sh("cp", &["-a", st, copy.to_str().expect("utf-8")]);
            copy.to_str().expect("utf-8").to_string()
        })
        .collect();

    // Three clones at once, each on its own tap with its own MAC.
    let macs = ["52:54:00:aa:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03"];
    let results: Vec<(Option<String>, Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = nss
            .iter()
            .zip(macs)
            .zip(&stores)
            .map(|((ns, mac), st)| {
                let c = ns
                    .snapvisor(&[
                        "restore",
                        "--store",
                        st,
                        "base",
                        "--lazy",
                        "--timeout",
                        "60",
                        "--net",
                        &format!("tap=snvtap0,mac={mac}"),
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn clone");
                s.spawn(move || ns.watch_neighbour(0, "10.77.0.2", c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("watcher")).collect()
    });
    for (k, (neighbour, o)) in results.into_iter().enumerate() {
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(o.status.code(), Some(0), "clone {k}: {}", text(&o));
        assert_eq!(reply_seqs(&out), vec![1, 2, 3, 4, 5], "clone {k}: {out}");
        assert!(out.contains(&format!("mac {}", macs[k])), "clone {k} runs with its own MAC: {out}");
        assert_eq!(neighbour.as_deref(), Some(macs[k]), "clone {k}'s MAC in its host's neighbour table: {out}");
    }
}

#[test]
fn evil_guest_leaves_the_process_and_another_vm_working() {
    let ns = Netns::new(2);
    let dir = tempfile::tempdir().expect("tempdir");
    // The daemon runs inside the namespace, where the taps are.
    let client = common::daemon::Daemon::start_under(dir.path(), &[], &["ip", "netns", "exec", &ns.name]);
    let vm = |name: &str, k: usize, mode: &str, count: u64| {
        let netping = if mode == "ping" {
            serde_json::json!({
                "mode": mode,
                "guest_ip": format!("10.77.{k}.2/24"),
                "ping": format!("10.77.{k}.1"),
                "count": count,
                "ping_interval_ms": 10,
            })
        } else {
            serde_json::json!({ "mode": mode, "guest_ip": format!("10.77.{k}.2/24") })
        };
        serde_json::json!({
            "name": name,
            "guest": "netping",
            "mem_mib": 16,
            "start": true,
            "net": [{ "tap": format!("snvtap{k}") }],
            "netping": netping,
        })
    };
    let (s, v) = client.call("POST", "/vms", Some(vm("good", 1, "ping", 0)));
    assert!((200..300).contains(&s), "{s} {v}");
    let good = client.wait_serial("good", "icmp_seq=3 reply", Duration::from_secs(30));
    assert!(good.contains("icmp_seq=3 reply"), "{good}");
    let (s, v) = client.call("POST", "/vms", Some(vm("evil", 0, "evil", 0)));
    assert!((200..300).contains(&s), "{s} {v}");
    let evil = client.wait_serial("evil", "netping evil: done", Duration::from_secs(30));
    assert!(evil.contains("netping evil: posted a descriptor loop"), "{evil}");
    assert!(evil.contains("netping evil: done"), "{evil}");
    // The device reported its error to the driver: DEVICE_NEEDS_RESET (0x40) in its status.
    let status = evil.split("device status 0x").nth(1).and_then(|s| s.lines().next()).expect("status line");
    let status = u64::from_str_radix(status, 16).expect("hex status");
    assert_ne!(status & 0x40, 0, "DEVICE_NEEDS_RESET set: {evil}");
    // The other VM keeps pinging: its replies go on.
    let n0 = reply_seqs(&client.wait_serial("good", "", Duration::ZERO)).len();
    std::thread::sleep(Duration::from_secs(1));
    let n1 = reply_seqs(&client.wait_serial("good", "", Duration::ZERO)).len();
    assert!(n1 > n0 + 5, "the good VM kept pinging ({n0} -> {n1} replies)");
    // The daemon still answers.
    let (s, _) = client.call("GET", "/vms", None);
    assert_eq!(s, 200);
    // The evil VM itself is still there (stopped or running), not taking the daemon down.
    let (s, v) = client.call("GET", "/vms/evil", None);
    assert_eq!(s, 200, "{v}");
}

#[test]
fn netping_options_are_refused_without_net_and_for_other_guests() {
    let o = common::snapvisor(&["run", "--builtin", "netping", "--mem-mib", "16", "--guest-ip", "10.77.0.2/24"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("add --net tap=NAME"), "{}", text(&o));
    let o = common::snapvisor(&["run", "--builtin", "hello", "--mem-mib", "16", "--ping", "10.77.0.1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--ping is an option of --builtin netping, not of --builtin hello"),
        "{}",
        text(&o)
    );
    let o = common::snapvisor(&["run", "--builtin", "memfill", "--mem-mib", "16", "--mode", "echo"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("memfill's modes are fill and verify"), "{}", text(&o));
}
