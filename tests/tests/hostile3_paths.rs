//! Paths and names from clients (hostile3): every place the CLI or the API takes a path or a
//! name gets FIFOs, devices, huge sparse files, names starting with '-', with '/', '..', NUL,
//! newline, 10,000 bytes or Unicode. Each gets one clear error (or works), at once, and the
//! daemon stays up.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::json;

/// Runs `snapvisor ARGS`; fails the test if it has not ended within 60 s (a read blocked on a
/// FIFO, or one of an endless device, never ends).
fn run_bounded(args: &[&str]) -> Output {
    let mut child = Command::new(common::snapvisor_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvisor");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "snapvisor {args:?} still running after 60 s (blocked or reading without end); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().expect("utf-8")).expect("path");
    // SAFETY: mkfifo on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// `--fw-cfg-file NAME=PATH` of `run` and `restore`: a FIFO nobody writes, `/dev/zero` and a
/// sparse file of 1 TiB are refused with exit 2 naming the file, instead of blocking for ever
/// or reading until memory runs out; a regular file (also through a symlink, as a local user
/// may name one) works.
#[test]
fn fw_cfg_file_paths_that_are_fifos_devices_or_huge_are_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let huge = dir.path().join("huge");
    std::fs::File::create(&huge).expect("huge").set_len(1 << 40).expect("sparse 1 TiB");
    let small = dir.path().join("small");
    std::fs::write(&small, b"hello fw_cfg").expect("small");
    let link = dir.path().join("link");
    symlink(&small, &link).expect("symlink");
    let store = dir.path().join("store");
    let store = store.to_str().expect("utf-8");
    let ok = run_bounded(&[
        "run",
        "--builtin",
        "hello",
        "--mem-mib",
        "16",
        "--fw-cfg-file",
        &format!("opt/x={}", link.display()),
        "--snapshot-after-ms",
        "0",
        "--exit-after-snapshot",
        "--store",
        store,
        "--name",
        "s",
    ]);
    assert_eq!(ok.status.code(), Some(0), "a symlink to a regular file: {}", String::from_utf8_lossy(&ok.stderr));

    for (path, what) in [(fifo.as_path(), "FIFO"), (Path::new("/dev/zero"), "device"), (huge.as_path(), "bytes")] {
        let arg = format!("opt/x={}", path.display());
        for args in [
            vec!["run", "--builtin", "hello", "--mem-mib", "16", "--fw-cfg-file", &arg],
            vec!["restore", "--store", store, "s", "--fw-cfg-file", &arg],
        ] {
            let o = run_bounded(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{args:?}: exit 2 for bad input; stderr {err}");
            assert!(err.contains(&path.display().to_string()) && err.contains(what), "{args:?}: names the file: {err}");
        }
    }
}

/// Names a client gives the daemon: each bad one is one 400 naming it; names starting with
/// '-' work through the API and through the CLI after `--`; the daemon stays up and writes
/// nothing outside its state directory.
#[test]
fn hostile_names_through_the_api_get_one_clear_error_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    let long = "a".repeat(10_000);
    let bad = ["a/b", "..", ".", "../x", "a\0b", "a\nb", "é", "snäp", "", &long, "a b", "a\\b", "%2e%2e"];
    for name in bad {
        let (s, v) = d.call("POST", "/vms", Some(json!({"name": name, "guest": "idle", "mem_mib": 16})));
        assert_eq!(s, 400, "VM name {name:?}: {v}");
        assert!(v.to_string().contains("name"), "{v}");
    }
    d.ok("POST", "/vms", Some(json!({"name": "src", "guest": "idle", "mem_mib": 16, "start": true})));
    for name in bad {
        let (s, v) = d.call("POST", "/vms/src/snapshot", Some(json!({"name": name})));
        assert_eq!(s, 400, "snapshot name {name:?}: {v}");
        let (s, v) = d.call("POST", "/vms", Some(json!({"name": "k", "kernel": name, "mem_mib": 16})));
        assert!(s == 400 || (name == "%2e%2e" && s == 404), "kernel image name {name:?}: {s} {v}");
    }
    // Names that look like options work, and the CLI reaches them after `--`.
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "--help"})));
    d.ok("POST", "/snapshots/--help/restore", Some(json!({"vm": "-rf"})));
    let sock = d.socket.to_str().expect("utf-8").to_string();
    let o = common::snapvisor(&["vm", "info", "--socket", &sock, "--", "-rf"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let o = common::snapvisor(&["vm", "delete", "--socket", &sock, "--", "-rf"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let o = common::snapvisor(&["snapshot", "delete", "--socket", &sock, "--", "--help"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    // Nothing was written outside the state directory, whose VM files are the one VM's.
    let mut top: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    top.sort();
    assert!(top.iter().all(|n| n == "state" || n.starts_with("api.sock")), "{top:?}");
    let vms: Vec<String> = std::fs::read_dir(d.state.join("vms"))
        .expect("vms")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    assert_eq!(vms, vec!["src.json".to_string()], "VM definitions");
    d.ok("GET", "/vms", None);
}

/// Kernel images that are FIFOs, symlinks (to a file, a device, a directory), directories or
/// missing are each refused by name; an upload over a symlink replaces the link, never
/// writes through it; an upload whose rename fails (a directory holds the name) is an error
/// and leaves no hidden upload file behind (it was left, up to --max-image-size each).
#[test]
fn image_paths_that_are_not_regular_files_are_refused_and_failed_uploads_leave_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("state").join("images");
    std::fs::create_dir_all(&images).expect("images");
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"not yours").expect("outside");
    mkfifo(&images.join("fifo"));
    symlink(&outside, images.join("link")).expect("link");
    symlink("/dev/zero", images.join("zero")).expect("zero");
    symlink(dir.path(), images.join("dirlink")).expect("dirlink");
    std::fs::create_dir(images.join("dir")).expect("dir");
    let d = Daemon::start(dir.path(), &[]);
    for (name, what) in [
        ("fifo", "FIFO"),
        ("link", "symlink"),
        ("zero", "symlink"),
        ("dirlink", "symlink"),
        ("dir", "directory"),
        ("missing", "no such file"),
    ] {
        let (s, v) = d.call("POST", "/vms", Some(json!({"name": "k", "kernel": name, "mem_mib": 16})));
        assert_eq!(s, 400, "kernel {name}: {v}");
        assert!(v.to_string().contains(name) && v.to_string().contains(what), "kernel {name}: {v}");
    }
    // An upload over the symlink replaces it; the file it pointed to is untouched.
    let (s, v) = d.call("PUT", "/images/link", Some(&json!("new")).cloned());
    assert_eq!(s, 201, "{v}");
    assert_eq!(std::fs::read(&outside).expect("outside"), b"not yours");
    assert!(!std::fs::symlink_metadata(images.join("link")).expect("link").file_type().is_symlink());
    // An upload onto a directory's name fails, and leaves no hidden file.
    let (s, v) = d.call("PUT", "/images/dir", Some(&json!("x".repeat(1000))).cloned());
    assert!((400..600).contains(&s), "{s} {v}");
    assert!(v.to_string().contains("dir"), "{v}");
    let hidden: Vec<String> = std::fs::read_dir(&images)
        .expect("images")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|n| n.starts_with('.'))
        .collect();
    assert_eq!(hidden, Vec::<String>::new(), "a failed upload left its file");
    d.ok("GET", "/images", None);
}
