//! A `snapvisor serve` child for tests that talk to the daemon through its socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub state: PathBuf,
}

impl Daemon {
    /// Starts a daemon with its socket and state in `dir` and extra `serve` arguments.
    pub fn start(dir: &Path, args: &[&str]) -> Daemon {
        Daemon::start_under(dir, args, &[])
    }

    /// Like [`Daemon::start`], with the daemon run by `wrapper` (a command and its arguments
    /// that execs the rest, like `ip netns exec NAME`).
    pub fn start_under(dir: &Path, args: &[&str], wrapper: &[&str]) -> Daemon {
        Daemon::spawn(dir, args, wrapper, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables for the daemon.
    pub fn start_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(dir, args, &[], env)
    }

    fn spawn(dir: &Path, args: &[&str], wrapper: &[&str], env: &[(&str, &str)]) -> Daemon {
        let socket = dir.join("api.sock");
        let state = dir.join("state");
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(super::snapvisor_bin());
                c
            }
            None => Command::new(super::snapvisor_bin()),
        };
        let child = cmd
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(daemon_log())
            .spawn()
            .expect("spawn daemon");
        // Ready when it accepts connections (a socket file alone could be a stale one).
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&socket).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(UnixStream::connect(&socket).is_ok(), "the daemon never accepted connections");
        Daemon { child, socket, state }
    }

    /// One request on its own connection; fails (Err) if no answer comes within `timeout`.
    pub fn call_within(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Value), String> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| format!("{method} {path}: no answer within {timeout:?}: {e}"))?;
        let (status, text) = hypervisor::service::client::parse_response(&out).map_err(|e| e.to_string())?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_within(method, path, body.as_ref(), Duration::from_secs(120)).expect("request")
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }

    /// One request with a raw body of `content_type` (an image upload), answered within 30 s
    /// (a hung request fails the test); the status and the body as text.
    pub fn raw(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("write head");
        // The daemon may answer (413, 507) and close before reading everything.
        let _ = s.write_all(body);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap_or_else(|e| panic!("{method} {path}: no answer within 30 s: {e}"));
        hypervisor::service::client::parse_response(&out).expect("response")
    }

    /// Polls VM `vm`'s serial output until it contains `needle` (at most `timeout`).
    pub fn wait_serial(&self, vm: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, v) = self.call("GET", &format!("/vms/{vm}/serial"), None);
            let text = v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
            if text.contains(needle) || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A value of the daemon's `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.ok("GET", "/metrics", None);
        let text = text.as_str().unwrap_or_default().to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in {text}"))
    }

    /// Waits until memfill VM `vm`'s serial shows `n` complete passes, each finding the
    /// previous pattern intact; panics (saying `what`) otherwise.
    pub fn wait_intact_passes(&self, vm: &str, n: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut text = String::new();
        while super::memfill::passes(&text).len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            text = self.wait_serial(vm, "\n", Duration::from_secs(1));
        }
        let p = super::memfill::passes(&text);
        assert!(p.len() >= n, "{what}: {vm} completed {} passes of {n}: {text}", p.len());
        assert!(p.iter().all(|(_, _, mis)| *mis == 0), "{what}: {vm} found its memory damaged: {text}");
    }

    /// Sends SIGTERM and waits at most `timeout` for the exit: its status and how long it took
    /// (None: still running at the deadline).
    pub fn terminate_within(&mut self, timeout: Duration) -> (Option<ExitStatus>, Duration) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return (Some(s), t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (None, t0.elapsed())
    }

    /// A value from the daemon's `/proc/PID/status` (kB for memory), e.g. "VmRSS:".
    pub fn proc_status(&self, key: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// The daemon's descriptors and mappings of shared bases' memfds.
    pub fn base_memfds(&self) -> (usize, usize) {
        let pid = self.child.id();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|r| {
                r.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter(|l| l.to_string_lossy().starts_with("/memfd:snapvisor-base"))
                    .count()
            })
            .unwrap_or(0);
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        (fds, maps.lines().filter(|l| l.contains("/memfd:snapvisor-base")).count())
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map(|d| d.count()).unwrap_or(0)
    }

    /// The daemon's open descriptors that are not KVM's, and its KVM VMs' (`kvm-vm`) and
    /// KVM descriptors (`/dev/kvm`, VMs, vCPUs): what a leak check compares, and what it
    /// bounds apart. With no VM left the daemon keeps one pre-built VM shell at most
    /// (hypervisor's shell.rs), whose descriptors are [`SHELL_FDS_1_VCPU`] for 1 vCPU.
    pub fn fds_beside_kvm(&self) -> FdCount {
        let links: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|r| {
                r.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .map(|l| l.to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let is_kvm = |l: &str| l == "/dev/kvm" || l.starts_with("anon_inode:kvm-");
        FdCount {
            other: links.iter().filter(|l| !is_kvm(l)).count(),
            kvm_vms: links.iter().filter(|l| l.as_str() == "anon_inode:kvm-vm").count(),
            kvm: links.iter().filter(|l| is_kvm(l)).count(),
        }
    }
}

/// [`Daemon::fds_beside_kvm`]'s answer.
#[derive(Clone, Copy, Debug)]
pub struct FdCount {
    pub other: usize,
    pub kvm_vms: usize,
    pub kvm: usize,
}

/// A pre-built shell of a 1-vCPU VM: /dev/kvm, the VM and the vCPU.
pub const SHELL_FDS_1_VCPU: usize = 3;

impl FdCount {
    /// With no VM left: at most one KVM VM open (a pre-built shell of a 1-vCPU VM).
    pub fn assert_at_most_a_shell(&self, what: &str) {
        assert!(
            self.kvm_vms <= 1 && self.kvm <= SHELL_FDS_1_VCPU,
            "{what}: no VM is left, yet the daemon holds {} KVM VMs and {} KVM descriptors",
            self.kvm_vms,
            self.kvm
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a daemon's log goes: nowhere, or with `SNAPVISOR_TEST_DAEMON_LOG=FILE` appended to
/// FILE (set `SNAPVISOR_LOG` for its level), to see what a failing test's daemon did.
fn daemon_log() -> Stdio {
    std::env::var_os("SNAPVISOR_TEST_DAEMON_LOG")
        .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok())
        .map_or_else(Stdio::null, Stdio::from)
}
