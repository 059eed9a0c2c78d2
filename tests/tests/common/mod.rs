//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod daemon;

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
