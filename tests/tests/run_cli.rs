//! `snapvisor run` on bad input: one line on stderr naming the problem, a non-zero exit, no
//! panic.

mod common;

use common::snapvisor;

fn assert_input_error(args: &[&str], needle: &str) {
    let o = snapvisor(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert!(err.contains(needle), "args {args:?}: stderr {err:?} should mention {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
}

#[test]
fn missing_kernel_file() {
    assert_input_error(&["run", "--kernel", "/nonexistent/vmlinuz", "--mem-mib", "64"], "/nonexistent/vmlinuz");
}

#[test]
fn file_that_is_no_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notakernel");
    std::fs::write(&path, vec![0x5au8; 64 * 1024]).expect("write");
    let p = path.to_str().expect("utf-8 path");
    let o = snapvisor(&["run", "--kernel", p, "--mem-mib", "64"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(p) && err.to_lowercase().contains("not a"), "{err}");
}

#[test]
fn missing_initrd_file() {
    let kernel = common::repo_root().join("deploy/cache/guest/vmlinuz");
    assert!(kernel.exists(), "{} missing: run deploy/fetch-guest.sh", kernel.display());
    let k = kernel.to_str().expect("utf-8 path");
    assert_input_error(
        &["run", "--kernel", k, "--initrd", "/nonexistent/initrd", "--mem-mib", "128"],
        "/nonexistent/initrd",
    );
}

#[test]
fn memory_too_small() {
    assert_input_error(&["run", "--builtin", "hello", "--mem-mib", "1"], "too small");
}

#[test]
fn memory_beyond_the_host() {
    assert_input_error(&["run", "--builtin", "hello", "--mem-mib", "100000000"], "more than this host");
}

#[test]
fn zero_vcpus() {
    assert_input_error(&["run", "--builtin", "hello", "--mem-mib", "16", "--vcpus", "0"], "0 vCPUs");
}

#[test]
fn too_many_vcpus() {
    assert_input_error(&["run", "--builtin", "hello", "--mem-mib", "16", "--vcpus", "100000"], "vCPUs");
}

#[test]
fn no_guest_given() {
    let o = snapvisor(&["run", "--mem-mib", "16"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

#[test]
fn guest_status_is_the_exit_status() {
    // verify on zeroed memory fails inside the guest with status 1.
    let o = snapvisor(&["run", "--builtin", "memfill", "--mem-mib", "8", "--mode", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn timeout_stops_the_guest() {
    let o = snapvisor(&["run", "--builtin", "idle", "--mem-mib", "16", "--timeout", "0.5"]);
    assert_eq!(o.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&o.stderr).contains("timed out"));
}
