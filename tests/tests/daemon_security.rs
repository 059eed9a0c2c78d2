//! The daemon is safe to expose, through its real socket: files come only from the image
//! directory, the socket belongs to one daemon, the guest memory budget holds, oversized
//! bodies get 413.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Daemon {
    child: Child,
    socket: PathBuf,
}

/// `snapvisor serve` on `dir/api.sock` with state in `dir/state`, images in `dir/images`.
fn serve(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(common::snapvisor_bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(dir.join("api.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--image-dir")
        .arg(dir.join("images"))
        .arg("--shutdown-timeout")
        .arg("20")
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::null());
    cmd
}

impl Daemon {
    fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join("api.sock");
        let child = serve(dir, extra).stderr(Stdio::null()).spawn().expect("spawn daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(UnixStream::connect(&socket).is_ok(), "the daemon never accepted connections");
        Daemon { child, socket }
    }

    /// One request with a raw body, answered within 30 s (a hung request fails the test).
    fn raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("write head");
        // The daemon may answer (413) and close before reading everything.
        let _ = s.write_all(body);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap_or_else(|e| panic!("{method} {path}: no answer within 30 s: {e}"));
        hypervisor::service::client::parse_response(&out).expect("response")
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, text) = self.raw(method, path, body.as_bytes());
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }

    /// Asserts `status` and an error message containing `needle`; returns the message.
    fn err(&self, method: &str, path: &str, body: Value, status: u16, needle: &str) -> String {
        let (got, v) = self.call(method, path, Some(body.clone()));
        let msg = v["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(got, status, "{method} {path} {body}: {v}");
        assert!(msg.contains(needle), "{method} {path} {body}: {msg:?} should mention {needle:?}");
        msg
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal ELF64 vmlinux whose code halts: loads like a kernel.
fn tiny_elf() -> Vec<u8> {
    let code = [0xf4u8, 0xeb, 0xfd]; // hlt; jmp back
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(&code);
    f
}

/// Runs `cmd` and returns its exit code and stderr; `None` if it was still running after
/// `timeout` (then it is killed).
fn exits_within(mut cmd: Command, timeout: Duration) -> (Option<i32>, String) {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    (code, stderr)
}

fn vm(name: &str, kernel: &str, initrd: Option<&str>, start: bool) -> Value {
    json!({ "name": name, "kernel": kernel, "initrd": initrd, "mem_mib": 32, "start": start })
}

#[test]
fn api_files_come_only_from_the_image_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).expect("images");
    std::fs::write(images.join("k"), tiny_elf()).expect("kernel image");
    // Secrets the daemon (root) can read and its client must not get at.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root:*:19000:SECRET-HASH\n").expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::symlink(&secret, images.join("link")).expect("symlink");
    std::os::unix::fs::symlink("/dev/zero", images.join("zero")).expect("symlink to /dev/zero");
    nix::sys::stat::mknod(
        &images.join("zerodev"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 5),
    )
    .expect("mknod (tests run as root)");
    nix::unistd::mkfifo(&images.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    std::fs::create_dir(images.join("dir")).expect("dir");
    // In the daemon's working directory, not in the image directory.
    std::fs::write(dir.path().join("cwd-kernel"), tiny_elf()).expect("cwd kernel");
    let d = Daemon::start(dir.path(), &[]);

    let abs = secret.to_str().expect("utf-8");
    let cases: Vec<(Value, &str)> = vec![
        (vm("a", "k", Some("/etc/shadow"), true), "invalid"),
        (vm("b", "/etc/shadow", None, true), "invalid"),
        (vm("c", abs, None, true), "invalid"),
        (vm("d", "k", Some("link"), true), "symlink"),
        (vm("e", "link", None, true), "symlink"),
        // /dev/zero: refused before a byte is read (start: false so that a daemon reading it
        // whole fails this test by answering 201, not by eating the host's memory).
        (vm("f", "k", Some("/dev/zero"), false), "invalid"),
        (vm("g", "k", Some("zero"), false), "symlink"),
        (vm("h", "k", Some("zerodev"), false), "a device"),
        (vm("i", "fifo", None, true), "a FIFO"),
        (vm("j", "dir", None, true), "a directory"),
        (vm("l", "cwd-kernel", None, true), "no such file"),
        (vm("m", "../secret", None, true), "invalid"),
        (vm("n", "images/k", None, true), "invalid"),
    ];
    for (body, needle) in cases {
        let asked_for_secret = body.to_string().contains("secret");
        let msg = d.err("POST", "/vms", body, 400, needle);
        for leak in ["SECRET", "root:", "72 6f 6f 74"] {
            assert!(!msg.contains(leak), "{msg:?} reveals {leak:?}");
        }
        // A symlink's target is not told.
        assert!(asked_for_secret || !msg.contains("secret"), "{msg:?} reveals a path");
    }
    assert_eq!(d.ok("GET", "/vms", None), json!([]), "no VM was defined");
    // The one good image boots.
    assert_eq!(d.ok("POST", "/vms", Some(vm("ok", "k", None, true)))["state"], "running");
    let serial = d.ok("GET", "/vms/ok/serial", None);
    assert!(!serial.to_string().contains("SECRET"));
}

#[test]
fn images_are_uploaded_within_a_size_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &["--max-image-size", "8192"]);
    let (status, v) = d.raw("PUT", "/images/k", &tiny_elf());
    assert_eq!(status, 201, "{v}");
    let (status, v) = d.raw("PUT", "/images/big", &[0u8; 9000]);
    assert_eq!(status, 413, "{v}");
    let (status, v) = d.raw("PUT", "/images/..%2Fx", b"x");
    assert_eq!(status, 400, "{v}");
    let listed = d.ok("GET", "/images", None);
    assert_eq!(listed, json!([{ "name": "k", "size": tiny_elf().len() }]));
    assert_eq!(d.ok("POST", "/vms", Some(vm("up", "k", None, true)))["state"], "running");
    let files: Vec<String> = std::fs::read_dir(dir.path().join("images"))
        .expect("images")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, vec!["k"], "no leftovers of the refused upload");
    assert_eq!(d.call("DELETE", "/images/k", None).0, 204);
    assert_eq!(d.call("DELETE", "/images/k", None).0, 404);
}

#[test]
fn images_larger_than_a_json_body_upload_up_to_the_image_limit() {
    // Firmware images (up to 16 MiB) and kernels are far larger than any JSON body.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &["--max-image-size", &(5u64 << 20).to_string()]);
    let big = vec![0x5au8; (4 << 20) + 4096];
    let (status, v) = d.raw("PUT", "/images/fw", &big);
    assert_eq!(status, 201, "{v}");
    assert_eq!(std::fs::read(dir.path().join("images/fw")).expect("uploaded").len(), big.len());
    let (status, v) = d.raw("PUT", "/images/too-big", &vec![0u8; 6 << 20]);
    assert_eq!(status, 413, "{v}");
}

#[test]
fn a_second_daemon_on_the_socket_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "a", "guest": "idle", "mem_mib": 16, "start": true})));
    // Same socket, another state directory.
    let other = tempfile::tempdir().expect("tempdir");
    let mut second = Command::new(common::snapvisor_bin());
    second
        .args(["serve", "--socket"])
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(other.path().join("state"))
        .arg("--image-dir")
        .arg(other.path().join("images"));
    let (code, stderr) = exits_within(second, Duration::from_secs(20));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("another snapvisor daemon"), "{stderr}");
    // The first one is untouched and still answers.
    assert_eq!(d.ok("GET", "/vms/a", None)["state"], "running");
    let mode = std::fs::metadata(&d.socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the daemon's user may use the socket");
}

#[test]
fn nothing_but_a_stale_socket_is_removed_at_the_socket_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    std::fs::write(&socket, b"precious").expect("file");
    let (code, stderr) = exits_within(serve(dir.path(), &[]), Duration::from_secs(20));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&socket).expect("the file is still there"), b"precious");
    // A stale socket (nobody listening) is replaced.
    std::fs::remove_file(&socket).expect("rm");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    let d = Daemon::start(dir.path(), &[]);
    assert_eq!(d.ok("GET", "/vms", None), json!([]));
}

#[test]
fn the_guest_memory_budget_caps_every_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &["--max-guest-memory", "100"]);
    d.ok("POST", "/vms", Some(json!({"name": "a", "guest": "idle", "mem_mib": 64, "start": true})));
    let msg = d.err(
        "POST",
        "/vms",
        json!({"name": "b", "guest": "idle", "mem_mib": 64}),
        409,
        "budget (--max-guest-memory) is 100 MiB",
    );
    assert!(msg.contains("64 MiB of it are held"), "{msg}");
    d.ok("POST", "/vms", Some(json!({"name": "small", "guest": "idle", "mem_mib": 32})));
    d.ok("POST", "/vms/a/snapshot", Some(json!({"name": "s"})));
    d.err("POST", "/snapshots/s/restore", json!({"vm": "r"}), 409, "budget");
    d.err("POST", "/snapshots/s/clone", json!({"prefix": "c", "count": 2}), 409, "budget");
    assert_eq!(d.call("DELETE", "/vms/a", None).0, 204);
    assert_eq!(d.ok("POST", "/snapshots/s/restore", Some(json!({"vm": "r"})))["state"], "running");
    let names: Vec<String> = d
        .ok("GET", "/vms", None)
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names, vec!["r", "small"]);
}

#[test]
fn oversized_bodies_get_413() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let body = json!({"name": "big", "guest": "idle", "mem_mib": 16, "cmdline": "x".repeat(100 * 1024)});
    let (status, v) = d.call("POST", "/vms", Some(body));
    assert_eq!(status, 413, "{v}");
    assert!(v["error"].as_str().unwrap_or_default().contains("bytes allowed"), "{v}");
    assert_eq!(d.ok("GET", "/vms", None), json!([]));
}

/// The unit's exposure as `systemd-analyze security` rates it (offline, on the file itself).
#[test]
fn the_systemd_unit_is_least_privilege() {
    let unit = std::fs::read_to_string(common::repo_root().join("deploy/snapvisor.service")).expect("unit");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("snapvisor.service");
    let bin = common::snapvisor_bin();
    std::fs::write(&path, unit.replace("/usr/local/bin/snapvisor", bin.to_str().expect("utf-8"))).expect("write unit");
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd)");
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let exposure: f64 = line
        .split(": ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"));
    eprintln!("{line}");
    assert!(exposure <= 3.0, "exposure {exposure} > 3.0:\n{text}");
    for needed in [
        "CapabilityBoundingSet=CAP_NET_ADMIN\n",
        "SystemCallFilter=@system-service",
        "ProtectKernelTunables=yes",
        "ProtectProc=invisible",
        "UMask=0077",
        "TasksMax=",
        "MemoryMax=",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
}

/// What the daemon creates is not readable by others: the socket, VM definitions, the store.
#[test]
fn state_files_and_packs_are_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "a", "guest": "idle", "mem_mib": 16, "start": true})));
    d.ok("POST", "/vms/a/snapshot", Some(json!({"name": "s"})));
    let mut seen = 0;
    let mut stack = vec![dir.path().join("state")];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o007, 0, "{} is open to others", p.display());
        seen += 1;
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).expect("dir").flatten().map(|e| e.path()));
        }
    }
    assert!(seen > 5, "only {seen} files looked at");
}
