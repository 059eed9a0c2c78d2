//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod at_pause;
pub mod daemon;
pub mod damage;
pub mod iasl;
pub mod memfill;
pub mod mock_net;
pub mod ram;
pub mod seabios_vm;
pub mod shell;
pub mod throttle;
pub mod tmpfs;
pub mod touch;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use hypervisor::control::ExitReason;
use hypervisor::guests::Builtin;
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};

/// The `snapvisor` binary built beside this test (deploy/test.sh builds it first).
pub fn snapvisor_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target profile directory");
    let bin = dir.join("snapvisor");
    assert!(bin.exists(), "{} is missing: build it with `cargo build --bins` (deploy/test.sh does)", bin.display());
    bin
}

/// Runs `snapvisor ARGS`, returning its output.
pub fn snapvisor(args: &[&str]) -> Output {
    Command::new(snapvisor_bin()).args(args).output().expect("spawn snapvisor")
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// `len` bytes from a xorshift generator seeded with `seed`: incompressible, and a different
/// stream for every seed (the start state is a bijection of the seed, zero only for
/// `u64::MAX`, which is not used).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A one-byte register: state a snapshot would have to carry (and a BAR can serve).
pub struct Scratch(pub u8);

impl devices::bus::BusDevice for Scratch {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(self.0);
    }
    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        self.0 = data.first().copied().unwrap_or(0);
    }
}

/// What a `snapvisor run|restore` with `--debugcon` printed: COM1 (ANSI escapes stripped) and
/// the debug console.
pub struct FirmwareRun {
    pub serial: String,
    pub debugcon: String,
    pub secs: f64,
}

/// Runs `snapvisor ARGS --debugcon LOG` until `done(debugcon text)` holds, then kills it.
/// Panics, with what it printed, if the process ends first or `limit` passes.
pub fn run_firmware_until(
    args: &[&str],
    dir: &std::path::Path,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> FirmwareRun {
    use std::time::Instant;
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = dir.join(format!("debugcon-{n}.log"));
    let out = log.with_extension("serial");
    let mut child = Command::new(snapvisor_bin())
        .args(args)
        .arg("--debugcon")
        .arg(&log)
        .stdout(std::fs::File::create(&out).expect("serial file"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn snapvisor");
    let t0 = Instant::now();
    let read = || {
        let serial = std::fs::read(&out).unwrap_or_default();
        let serial = hypervisor::bench::firmware::strip_ansi(&String::from_utf8_lossy(&serial));
        (serial, std::fs::read_to_string(&log).unwrap_or_default())
    };
    loop {
        let (serial, debugcon) = read();
        if done(&debugcon) {
            let _ = child.kill();
            let _ = child.wait();
            return FirmwareRun { serial, debugcon, secs: t0.elapsed().as_secs_f64() };
        }
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            panic!(
                "snapvisor {args:?} ended ({status}) too early:\nstderr: {}\ndebugcon:\n{debugcon}\nserial:\n{serial}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            t0.elapsed() < limit,
            "snapvisor {args:?}: not done within {limit:?}\ndebugcon:\n{debugcon}\nserial:\n{serial}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builds and starts a VM running a built-in guest, capturing its serial output.
pub fn start_builtin(guest: Builtin, mem_mib: u64, params: BuiltinParams) -> (Vm, SharedOutput) {
    let out = SharedOutput::default();
    let mut vm = Vm::new(VmConfig::new(mem_mib, 1, BootSource::Builtin { guest, params }, Box::new(out.clone())))
        .expect("create VM");
    vm.start().expect("start VM");
    (vm, out)
}

/// Runs a built-in guest to its end (at most 120 s).
pub fn run_builtin(guest: Builtin, mem_mib: u64, params: BuiltinParams) -> (ExitReason, String, Vm) {
    let (mut vm, out) = start_builtin(guest, mem_mib, params);
    let reason = vm.wait(Some(Duration::from_secs(120)));
    (reason, out.text(), vm)
}
