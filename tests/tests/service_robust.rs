//! The daemon under stress, through its socket: a busy VM holds up nobody else, SIGTERM ends
//! the daemon on time whatever clients and VMs do, failed requests leave nothing behind,
//! shutdown snapshots are the daemon's own, and events report what guests do on their own.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::memfill::passes;
use serde_json::{json, Value};

fn names(v: &Value) -> Vec<String> {
    v.as_array().expect("list").iter().filter_map(|v| v["name"].as_str().map(String::from)).collect()
}

/// Asserts that `method path` answers with `want` within a second.
fn answers_quickly(d: &Daemon, method: &str, path: &str, want: u16) -> Value {
    let t0 = Instant::now();
    let (status, v) = d
        .call_within(method, path, None, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{method} {path} while the VM is busy: {e}"));
    let took = t0.elapsed();
    assert_eq!(status, want, "{method} {path}: {v}");
    assert!(took < Duration::from_secs(1), "{method} {path} took {took:?} while one VM was busy");
    v
}

#[test]
fn a_busy_vm_holds_up_no_one_and_shutdown_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &["--shutdown-timeout", "1", "--on-shutdown", "snapshot"]);
    d.ok("POST", "/vms", Some(json!({"name": "small", "guest": "idle", "mem_mib": 16, "start": true})));
    // A guest that has written all of its 1 GiB: a stop-and-copy snapshot of it takes seconds.
    d.ok("POST", "/vms", Some(json!({"name": "big", "guest": "memfill", "mem_mib": 1024, "start": true})));
    let out = d.wait_serial("big", "memfill pass 0 ", Duration::from_secs(120));
    assert!(out.contains("memfill pass 0 "), "{out}");
    let (status, op) = d.call("POST", "/vms/big/snapshot", Some(json!({"name": "s", "async": true})));
    assert_eq!(status, 202, "{op}");
    std::thread::sleep(Duration::from_millis(100));
    // The actor of "big" is busy copying memory; nobody else waits for it.
    let list = answers_quickly(&d, "GET", "/vms", 200);
    assert_eq!(names(&list), vec!["big", "small"]);
    let metrics = answers_quickly(&d, "GET", "/metrics", 200);
    assert!(metrics.as_str().is_some_and(|m| m.contains("snapvisor_vms{state=\"running\"} 2")), "{metrics}");
    assert_eq!(answers_quickly(&d, "GET", "/vms/big", 200)["name"], "big");
    answers_quickly(&d, "GET", "/vms/big/serial", 200);
    answers_quickly(&d, "POST", "/vms/small/pause", 200);
    let op = d.ok("GET", &format!("/operations/{}", op["operation"]), None);
    assert_eq!(op["state"], "running", "the snapshot ended too soon to show anything: {op}");

    // Stopping with a snapshot that cannot finish in time: the daemon still exits on time,
    // and nothing half-written is listed afterwards.
    let big_snapshot = Instant::now();
    let deadline = loop {
        let op = d.ok("GET", &format!("/operations/{}", op["id"]), None);
        if op["state"] != "running" {
            assert_eq!(op["state"], "done", "{op}");
            break big_snapshot.elapsed();
        }
        assert!(big_snapshot.elapsed() < Duration::from_secs(120), "{op}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (status, took) = d.terminate_within(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "exit {status:?} after {took:?}");
    // --shutdown-timeout 1, plus the daemon's margin.
    assert!(took < Duration::from_millis(2500), "SIGTERM took {took:?} (a snapshot takes {deadline:?} here)");
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    let snaps = d.ok("GET", "/snapshots", None);
    assert!(snaps.as_array().is_some_and(|s| s.contains(&json!("s"))), "{snaps}");
}

#[test]
fn sigterm_ends_the_daemon_on_time_despite_stalled_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), &["--shutdown-timeout", "5", "--on-shutdown", "snapshot"]);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 32, "seed": 3, "start": true})));
    d.wait_serial("m", "memfill pass 1 ", Duration::from_secs(60));
    // A client that sent half its headers, one that sent headers but half its body, and an
    // idle keep-alive connection.
    let mut half_headers = UnixStream::connect(&d.socket).expect("connect");
    half_headers.write_all(b"GET /vms HTTP/1.1\r\nHost: x\r\nX-Slow").expect("write");
    let mut half_body = UnixStream::connect(&d.socket).expect("connect");
    half_body
        .write_all(
            b"POST /vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"na",
        )
        .expect("write");
    let mut idle = UnixStream::connect(&d.socket).expect("connect");
    idle.write_all(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    std::thread::sleep(Duration::from_millis(300));
    let (status, took) = d.terminate_within(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "exit {status:?} after {took:?} with stalled clients connected");
    assert!(took < Duration::from_secs(7), "SIGTERM took {took:?} with --shutdown-timeout 5");
    drop((half_headers, half_body, idle));
    drop(d);
    // The VM was snapshotted before the exit: it comes back running where it was.
    let d = Daemon::start(dir.path(), &[]);
    assert_eq!(d.ok("GET", "/vms/m", None)["state"], "running");
    // The restored guest's output may begin with the rest of a line the snapshot cut in two:
    // wait for a whole pass line and judge those.
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = d.wait_serial("m", "\n", Duration::from_secs(60));
        if !passes(&out).is_empty() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let p = passes(&out);
    assert!(!p.is_empty(), "no whole pass line after the restart: {out}");
    assert!(p.iter().all(|&(pass, _, mis)| pass > 0 && mis == 0), "the run restarted or found damage: {out}");
}

#[test]
fn failed_creates_and_clones_leave_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let (status, v) = d.call(
        "POST",
        "/vms",
        Some(json!({"name": "k", "kernel": "/nonexistent/vmlinuz", "mem_mib": 64, "start": true})),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(d.call("GET", "/vms/k", None).0, 404, "a VM whose start failed is not left defined");
    assert!(!d.state.join("vms").join("k.json").exists());

    d.ok("POST", "/vms", Some(json!({"name": "src", "guest": "idle", "mem_mib": 16, "start": true})));
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
    d.ok("POST", "/vms", Some(json!({"name": "c1", "guest": "idle", "mem_mib": 16})));
    let (status, v) = d.call("POST", "/snapshots/s/clone", Some(json!({"prefix": "c", "count": 3})));
    assert_eq!(status, 409, "{v}");
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(msg.contains("'c1'"), "{msg}");
    assert_eq!(names(&d.ok("GET", "/vms", None)), vec!["c1", "src"], "no clone is left running");
    // And a clone request whose names are all free makes them all.
    let made = d.ok("POST", "/snapshots/s/clone", Some(json!({"prefix": "k", "count": 2})));
    assert_eq!(made.as_array().map(Vec::len), Some(2));
}

#[test]
fn shutdown_snapshots_are_private_keep_paused_vms_paused_and_go_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let long = "v".repeat(60);
    let args = ["--on-shutdown", "snapshot", "--shutdown-timeout", "30"];
    let mut d = Daemon::start(dir.path(), &args);
    // A user's own snapshot with the name the daemon used to take for VM "m".
    d.ok("POST", "/vms", Some(json!({"name": "other", "guest": "idle", "mem_mib": 16, "start": true})));
    d.ok("POST", "/vms/other/snapshot", Some(json!({"name": "shutdown-m"})));
    d.ok("DELETE", "/vms/other", None);
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 32, "start": true})));
    d.ok("POST", "/vms", Some(json!({"name": long, "guest": "idle", "mem_mib": 16, "start": true})));
    d.ok("POST", "/vms", Some(json!({"name": "p", "guest": "memfill", "mem_mib": 32, "start": true})));
    d.wait_serial("p", "memfill pass 0 ", Duration::from_secs(60));
    assert_eq!(d.ok("POST", "/vms/p/pause", None)["state"], "paused");
    let (status, took) = d.terminate_within(Duration::from_secs(40));
    assert!(status.is_some_and(|s| s.success()), "exit {status:?} after {took:?}");
    drop(d);

    let d = Daemon::start(dir.path(), &args);
    // The user's snapshot is untouched: still the 16 MiB idle guest.
    let back = d.ok("POST", "/snapshots/shutdown-m/restore", Some(json!({"vm": "check"})));
    assert_eq!((back["guest"].as_str(), back["mem_mib"].as_u64()), (Some("idle"), Some(16)), "{back}");
    assert_eq!(d.ok("GET", "/vms/m", None)["state"], "running");
    assert_eq!(d.ok("GET", &format!("/vms/{long}"), None)["state"], "running", "a 60-character name resumes too");
    assert_eq!(d.ok("GET", "/vms/p", None)["state"], "paused", "a paused VM comes back paused");
    // Once the resumed VMs are resident, their shutdown snapshots are deleted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let snaps = loop {
        let snaps = d.ok("GET", "/snapshots", None);
        if snaps == json!(["shutdown-m"]) || Instant::now() > deadline {
            break snaps;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(snaps, json!(["shutdown-m"]));
    assert_eq!(d.ok("POST", "/vms/p/resume", None)["state"], "running");
    // Its serial log starts where the restored guest went on, possibly inside a line: wait for
    // a whole `... mismatches N` report and require every count to be 0.
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = d.wait_serial("p", "\n", Duration::from_secs(1));
        let reported = out.split_inclusive('\n').any(|l| l.ends_with('\n') && l.contains("matches "));
        if reported || Instant::now() > deadline {
            break out;
        }
    };
    let counts: Vec<&str> =
        out.split("matches ").skip(1).map(|rest| rest.split_whitespace().next().unwrap_or("")).collect();
    assert!(!counts.is_empty() && counts.iter().all(|c| *c == "0"), "{out}");
    let (status, v) = d.call("POST", "/vms/m/snapshot", Some(json!({"name": "__mine"})));
    assert_eq!(status, 400, "the daemon's namespace is refused: {v}");
}

/// Reads event lines from a `GET /events` stream until `want` events named `vm` arrived.
fn events_of(r: &mut BufReader<UnixStream>, vm: &str, want: usize) -> Vec<Value> {
    let mut seen = Vec::new();
    let mut line = String::new();
    while seen.len() < want {
        line.clear();
        r.read_line(&mut line).unwrap_or_else(|e| panic!("waiting for events of {vm}, got {seen:?}: {e}"));
        assert!(!line.is_empty(), "the stream closed");
        if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
            if v.is_object() && v["vm"] == vm {
                seen.push(v);
            }
        }
    }
    seen
}

/// The event named `what` among `events` (the API's and the VM's own events may come in
/// either order).
fn find<'a>(events: &'a [Value], what: &str) -> &'a Value {
    events.iter().find(|e| e["event"] == what).unwrap_or_else(|| panic!("no {what:?} event in {events:?}"))
}

/// An ELF kernel whose first instruction is `ud2`, with no IDT to handle it.
fn crashing_kernel(path: &std::path::Path) {
    let mut f = vec![0u8; 0x1000];
    f[..16].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let put = |f: &mut Vec<u8>, at: usize, v: &[u8]| f[at..at + v.len()].copy_from_slice(v);
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &62u16.to_le_bytes()); // x86-64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &0x10_0000u64.to_le_bytes()); // entry
    put(&mut f, 32, &64u64.to_le_bytes()); // program headers
    put(&mut f, 52, &64u16.to_le_bytes());
    put(&mut f, 54, &56u16.to_le_bytes());
    put(&mut f, 56, &1u16.to_le_bytes());
    put(&mut f, 58, &64u16.to_le_bytes());
    let ph = 64;
    put(&mut f, ph, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut f, ph + 4, &5u32.to_le_bytes()); // R+X
    put(&mut f, ph + 8, &0x1000u64.to_le_bytes()); // offset
    put(&mut f, ph + 16, &0x10_0000u64.to_le_bytes()); // vaddr
    put(&mut f, ph + 24, &0x10_0000u64.to_le_bytes()); // paddr
    put(&mut f, ph + 32, &16u64.to_le_bytes()); // filesz
    put(&mut f, ph + 40, &16u64.to_le_bytes()); // memsz
    put(&mut f, ph + 48, &0x1000u64.to_le_bytes()); // align
    f.extend_from_slice(&[
        0x0f, 0x0b, 0x0f, 0x0b, 0xf4, 0xeb, 0xfd, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
    ]);
    std::fs::write(path, f).expect("write kernel");
}

#[test]
fn events_report_guest_exits_crashes_and_lazy_restore_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        r.read_line(&mut line).expect("headers");
        assert!(!line.is_empty(), "the stream closed");
    }

    // The hello guest prints a line and exits with status 0.
    d.ok("POST", "/vms", Some(json!({"name": "h", "guest": "hello", "mem_mib": 16, "start": true})));
    let ev = events_of(&mut r, "h", 2);
    let exit = find(&ev, "guest_exit");
    assert_eq!(exit["detail"]["status"], 0, "{ev:?}");

    // A kernel that runs into an exception with no handler: the guest crashes.
    // (API clients name images in the daemon's image directory, by default STATE/images.)
    crashing_kernel(&d.state.join("images").join("crash.elf"));
    d.ok("POST", "/vms", Some(json!({"name": "x", "kernel": "crash.elf", "mem_mib": 64, "start": true})));
    let ev = events_of(&mut r, "x", 2);
    find(&ev, "crashed");

    // A lazy restore whose store cannot give the guest its memory.
    d.ok("POST", "/vms", Some(json!({"name": "m", "guest": "memfill", "mem_mib": 16, "start": true})));
    d.wait_serial("m", "memfill pass 1 ", Duration::from_secs(60));
    d.ok("POST", "/vms/m/snapshot", Some(json!({"name": "ms"})));
    d.ok("DELETE", "/vms/m", None);
    for pack in std::fs::read_dir(d.state.join("store").join("packs")).expect("packs") {
        let path = pack.expect("entry").path();
        let mut bytes = std::fs::read(&path).expect("pack");
        bytes.iter_mut().for_each(|b| *b ^= 0x5a);
        std::fs::write(&path, bytes).expect("corrupt pack");
    }
    let v = d.ok("POST", "/snapshots/ms/restore", Some(json!({"vm": "l", "mode": "lazy"})));
    assert_eq!(v["state"], "running");
    let ev = events_of(&mut r, "l", 2);
    find(&ev, "restored");
    let failed = find(&ev, "lazy_restore_failed");
    assert!(failed["detail"]["error"].as_str().is_some_and(|e| e.contains("pc.ram")), "{ev:?}");
    assert_eq!(d.ok("GET", "/vms/l", None)["state"], "stopped");
}

#[test]
fn the_unit_gives_the_shutdown_room_to_finish() {
    let unit = std::fs::read_to_string(common::repo_root().join("deploy/snapvisor.service")).expect("unit");
    let value = |key: &str| -> u64 {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("the unit sets no {key}"))
    };
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).expect("ExecStart");
    let timeout: u64 = exec
        .split_whitespace()
        .skip_while(|w| *w != "--shutdown-timeout")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("ExecStart passes --shutdown-timeout");
    // The daemon exits within its timeout plus about a second; systemd must not SIGKILL it
    // before (that would lose the shutdown snapshots).
    assert!(value("TimeoutStopSec=") >= timeout + 10, "TimeoutStopSec leaves no room after {timeout} s");
    assert!(value("WatchdogSec=") > 0);
}

/// Resident memory the daemon may keep after the load beyond its baseline: the store index's
/// page cache (sled, bounded at 64 MiB) and 16 MiB for allocator slack. The decompressed-chunk
/// cache counts nothing here: an idle daemon drops it after `--cache-idle-secs` (10 s).
const RSS_MARGIN_KIB: u64 = (64 + 16) * 1024;

#[test]
fn memory_threads_and_files_return_to_baseline_after_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("GET", "/vms", None);
    // Descriptors other than KVM's; KVM's are bounded apart (one pre-built VM shell at most).
    let (rss0, threads0, fds0) = (d.proc_status("VmRSS:"), d.proc_status("Threads:"), d.fds_beside_kvm().other);
    let mut peak = 0;
    for i in 0..12 {
        let vm = format!("v{i}");
        // A different seed each time: nothing deduplicates, every cycle brings new chunks.
        d.ok("POST", "/vms", Some(json!({"name": vm, "guest": "memfill", "mem_mib": 32, "seed": i, "start": true})));
        d.wait_serial(&vm, "memfill pass 0 ", Duration::from_secs(60));
        d.ok("POST", &format!("/vms/{vm}/snapshot"), Some(json!({"name": format!("s{i}")})));
        d.ok("POST", &format!("/snapshots/s{i}/clone"), Some(json!({"prefix": format!("{vm}c"), "count": 3})));
        for c in 0..3 {
            d.wait_serial(&format!("{vm}c{c}"), "\n", Duration::from_secs(60));
        }
        peak = peak.max(d.proc_status("VmRSS:"));
        for name in [vm.clone(), format!("{vm}c0"), format!("{vm}c1"), format!("{vm}c2")] {
            assert_eq!(d.call("DELETE", &format!("/vms/{name}"), None).0, 204);
        }
        assert_eq!(d.call("DELETE", &format!("/snapshots/s{i}"), None).0, 204);
    }
    assert_eq!(d.ok("GET", "/vms", None), json!([]));
    let settled = |d: &Daemon| (d.proc_status("VmRSS:"), d.proc_status("Threads:"), d.fds_beside_kvm().other);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (rss1, threads1, fds1) = loop {
        let now = settled(&d);
        let ok = now.0 <= rss0 + RSS_MARGIN_KIB && now.1 <= threads0 + 2 && now.2 <= fds0 + 2;
        if ok || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let metrics = d.ok("GET", "/metrics", None);
    let metrics = metrics.as_str().unwrap_or_default();
    let cache = metrics.lines().find(|l| l.starts_with("snapvisor_chunk_cache_bytes ")).unwrap_or("no cache metric");
    let report = format!(
        "RSS {rss0} KiB at start, {peak} KiB at peak, {rss1} KiB at the end; threads {threads0} -> {threads1}; \
         fds {fds0} -> {fds1}; {cache}"
    );
    println!("{report}");
    assert!(rss1 <= rss0 + RSS_MARGIN_KIB, "memory did not come back: {report}");
    assert!(threads1 <= threads0 + 2, "threads did not come back: {report}");
    assert!(fds1 <= fds0 + 2, "file descriptors did not come back: {report}");
    d.fds_beside_kvm().assert_at_most_a_shell("after the load");
}

#[test]
fn a_client_that_stalls_mid_request_is_timed_out() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let mut half_headers = UnixStream::connect(&d.socket).expect("connect");
    half_headers.write_all(b"GET /vms HTTP/1.1\r\nHost: x\r\nX-Slow").expect("write");
    let mut half_body = UnixStream::connect(&d.socket).expect("connect");
    half_body
        .write_all(
            b"POST /vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"na",
        )
        .expect("write");
    let t0 = Instant::now();
    // Meanwhile everyone else is served.
    answers_quickly(&d, "GET", "/vms", 200);
    for s in [&half_headers, &half_body] {
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    }
    let mut out = Vec::new();
    let r = half_body.read_to_end(&mut out);
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&out);
    assert!(r.is_ok() && text.starts_with("HTTP/1.1 408"), "{r:?} after {took:?}: {text}");
    assert!(text.contains("not received within 10 s"), "{text}");
    let mut out = Vec::new();
    let r = half_headers.read_to_end(&mut out);
    let took = t0.elapsed();
    // The connection is closed (with or without a 408 from the HTTP layer).
    assert!(r.is_ok(), "{r:?} after {took:?}");
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
}
