//! Snapshots of running VMs and restores, on real KVM: the state comes back bit-exact (the
//! memfill guest checks every word of the previous pass), the RAM-block size rules of QEMU
//! apply on load with errors that say what to do, and a resize cancels a live snapshot.

mod common;

use common::memfill::{check_continues, passes, wait_lines};

use std::time::Duration;

use common::{snapvisor, start_builtin};
use hypervisor::control::ExitReason;
use hypervisor::guests::{touch, BootInfo, Builtin, MemfillMode};
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions, SnapshotError};
use hypervisor::vm::{BuiltinParams, SharedOutput, Vm};

fn store(dir: &tempfile::TempDir) -> storage::Store {
    storage::Store::open(dir.path().join("store")).expect("open store")
}

#[test]
fn stop_and_copy_snapshot_restores_eagerly_and_lazily_and_the_guest_carries_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(&dir);
    let (mem, seed) = (64, 9);
    let (mut vm, out) = start_builtin(
        Builtin::Memfill,
        mem,
        BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    let before = wait_lines(&out, 3, Duration::from_secs(60));
    let report = snapshot::save(&vm, &store, "m", &SaveOptions { stay_paused: true, ..Default::default() }, &|_| {})
        .expect("snapshot");
    assert!(!report.live);
    assert_eq!(report.ram_bytes, mem << 20);
    let before = out.text().max(before);
    vm.stop("snapshot taken");

    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let out2 = SharedOutput::default();
        let (mut vm2, rep) =
            snapshot::restore(&store, "m", RestoreOptions::new(mode, Box::new(out2.clone()))).expect("restore");
        assert!(rep.resized.is_empty());
        vm2.start().expect("start");
        let after = wait_lines(&out2, 3, Duration::from_secs(60));
        vm2.stop("test done");
        check_continues(&before, &after, seed, mem);
        if mode == RestoreMode::Lazy {
            let s = snapshot::restore::lazy_stats(&vm2).expect("lazy stats");
            assert!(s.faults > 0, "{s:?}");
        }
    }
}

#[test]
fn live_snapshot_of_a_guest_rewriting_all_its_memory_restores_and_the_guest_carries_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(&dir);
    let (mem, seed) = (128, 21);
    let (mut vm, out) = start_builtin(
        Builtin::Memfill,
        mem,
        BuiltinParams { seed, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    wait_lines(&out, 1, Duration::from_secs(60));
    let rounds = std::sync::Mutex::new(Vec::new());
    let report = snapshot::save(
        &vm,
        &store,
        "live",
        &SaveOptions { live: true, stay_paused: true, ..Default::default() },
        &|p| {
            rounds.lock().expect("lock").push(*p);
        },
    )
    .expect("live snapshot");
    assert!(report.live);
    // One progress report per copying round, then one when done; round 0 copies everything.
    let rounds = rounds.into_inner().expect("lock");
    assert_eq!(rounds.len() as u32, report.rounds + 1, "{rounds:?}");
    assert_eq!(rounds[0].chunks_copied * 64 * 1024, report.ram_bytes, "{rounds:?}");
    let before = out.text();
    vm.stop("snapshot taken");
    let out2 = SharedOutput::default();
    let (mut vm2, _) =
        snapshot::restore(&store, "live", RestoreOptions::new(RestoreMode::Eager, Box::new(out2.clone())))
            .expect("restore");
    vm2.start().expect("start");
    let after = wait_lines(&out2, 2, Duration::from_secs(60));
    vm2.stop("test done");
    check_continues(&before, &after, seed, mem);
}

#[test]
fn live_snapshot_pauses_briefly_and_restores() {
    // A guest that filled its memory and now only waits: side by side, a stop-and-copy
    // snapshot pauses it for the whole copy, a live one for the few chunks left dirty.
    let dir = tempfile::tempdir().expect("tempdir");
    // Each snapshot into a store of its own: in one store the second would find every chunk
    // already stored (dedup) and look fast for that reason alone.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let stop_store = store(&other_dir);
    let store = store(&dir);
    let mem = 128;
    let params = BuiltinParams { seed: 5, ..Default::default() };
    let out = SharedOutput::default();
    let mut vm = Vm::new(hypervisor::vm::VmConfig::new(
        mem,
        1,
        hypervisor::vm::BootSource::Builtin { guest: Builtin::Touch, params },
        Box::new(out.clone()),
    ))
    .expect("vm");
    vm.start().expect("start");
    vm.control().wait_mark(touch::MARK_FILLED, Duration::from_secs(60)).expect("filled");
    // Stop-and-copy asked for by name: the default is background now.
    let stop = SaveOptions { mode: snapshot::SaveMode::Stop, ..Default::default() };
    let stop_copy = snapshot::save(&vm, &stop_store, "stop", &stop, &|_| {}).expect("stop-and-copy");
    let rounds = std::sync::Mutex::new(Vec::new());
    let live = snapshot::save(&vm, &store, "live", &SaveOptions { live: true, ..Default::default() }, &|p| {
        rounds.lock().expect("lock").push(*p);
    })
    .expect("live snapshot");
    vm.stop("snapshots taken");
    assert!(live.live && !stop_copy.live);
    let rounds = rounds.into_inner().expect("lock");
    let (first, last) = (rounds[0], rounds[rounds.len() - 2]);
    assert_eq!(first.chunks_copied * 64 * 1024, live.ram_bytes, "round 0 copies everything: {rounds:?}");
    assert!(last.dirty_chunks * 100 < first.chunks_copied, "few chunks were left for the pause: {rounds:?}");
    // What each pause copies, not how long it took (a loaded host stretches any pause): the
    // stop-and-copy pause copies all of RAM, the live one only the chunks the last round left.
    assert_eq!(stop_copy.bytes_copied, stop_copy.ram_bytes, "stop-and-copy copies all RAM in its pause");
    assert!(
        last.dirty_chunks * 64 * 1024 * 100 < stop_copy.bytes_copied,
        "the live pause copies a small part of what the stop-and-copy pause copies: {rounds:?}"
    );
    // What the live pause did copy: the bytes read after the last live round's report (the
    // chunks that round left dirty would not show a pause that copied more than them).
    let paused_bytes = live.bytes_copied - last.bytes_copied;
    assert!(
        paused_bytes * 100 < stop_copy.bytes_copied,
        "the live pause copied {paused_bytes} bytes, not a small part of the stop-and-copy pause's {}: {rounds:?}",
        stop_copy.bytes_copied
    );
    eprintln!("pause: live {:.1} ms, stop-and-copy {:.1} ms", live.pause_ms, stop_copy.pause_ms);

    // The live snapshot restores: given go, the guest touches its working set on the
    // memory it had filled.
    let out2 = SharedOutput::default();
    let (mut vm2, _) =
        snapshot::restore(&store, "live", RestoreOptions::new(RestoreMode::Eager, Box::new(out2.clone())))
            .expect("restore");
    vm2.devices().go.store(true, std::sync::atomic::Ordering::Release);
    vm2.start().expect("start");
    assert_eq!(vm2.wait(Some(Duration::from_secs(60))), ExitReason::GuestExit { status: 0 });
    let ranges = BootInfo::fill_ranges(&hypervisor::memory::e820_map(mem << 20));
    let (sum, pages) = touch::checksum(&ranges, 5, params.stride, params.span);
    assert_eq!(out2.text(), format!("touch: working set of {pages} pages done, checksum {sum:#x}\n"));
}

fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn a_resize_cancels_a_live_snapshot_and_the_vm_keeps_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(&dir);
    let out = SharedOutput::default();
    let mut cfg = hypervisor::vm::VmConfig::new(
        64,
        1,
        hypervisor::vm::BootSource::Builtin {
            guest: Builtin::Memfill,
            params: BuiltinParams { seed: 1, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
        },
        Box::new(out.clone()),
    );
    cfg.fw_cfg_files = vec![hypervisor::vm::FwCfgFile { name: "opt/snapvisor/blob".into(), data: blob(5000) }];
    let mut vm = Vm::new(cfg).expect("vm");
    vm.start().expect("start");
    wait_lines(&out, 1, Duration::from_secs(60));
    let registry = vm.registry().clone();
    let err = snapshot::save(&vm, &store, "cancelled", &SaveOptions { live: true, ..Default::default() }, &|p| {
        if p.round == 0 {
            registry.resize("/rom@opt/snapvisor/blob", 9000).expect("resize");
        }
    })
    .expect_err("the resize must cancel the snapshot");
    assert!(matches!(err, SnapshotError::ResizedDuringSnapshot(_)));
    assert_eq!(err.to_string(), "RAM block '/rom@opt/snapvisor/blob' resized during snapshot");
    assert!(store.list().expect("list").is_empty(), "nothing committed");
    // The VM runs on.
    let n = out.text().lines().count();
    wait_lines(&out, n + 1, Duration::from_secs(60));
    assert!(out.text().lines().count() > n);
    assert!(vm.control().exit_reason().is_none());
    // And a snapshot without a resize then succeeds.
    snapshot::save(&vm, &store, "after", &SaveOptions { live: true, ..Default::default() }, &|_| {}).expect("snapshot");
    vm.stop("done");
}

#[test]
fn pause_and_resume() {
    let (mut vm, out) = start_builtin(
        Builtin::Memfill,
        64,
        BuiltinParams { seed: 2, passes: 0, mode: MemfillMode::Fill, ..Default::default() },
    );
    wait_lines(&out, 1, Duration::from_secs(60));
    assert!(vm.pause());
    let n = out.text().len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(out.text().len(), n, "a paused guest prints nothing");
    vm.resume();
    let lines = out.text().lines().count();
    wait_lines(&out, lines + 1, Duration::from_secs(60));
    assert!(out.text().lines().count() > lines);
    assert_eq!(vm.stop("done"), ExitReason::Stopped { detail: "done".into() });
}

fn write_file(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, data).expect("write");
    p.to_str().expect("utf-8").to_string()
}

/// The `pio`/`dma` directory lines and the `file` contents line of the blob in fwcfg's output.
fn blob_sizes(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| ["pio ", "dma ", "file "].iter().any(|p| l.starts_with(p)) && l.contains(" opt/snapvisor/blob "))
        .map(|l| l.to_string())
        .collect()
}

#[test]
fn restore_resizes_a_fw_cfg_blob_that_grew_or_shrank() {
    for (source, destination) in [(10_000usize, 3_000usize), (3_000, 10_000)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = dir.path().join("store");
        let st = st.to_str().expect("utf-8");
        let a = write_file(&dir, "a", &blob(source));
        let b = write_file(&dir, "b", &blob(destination).iter().map(|x| !x).collect::<Vec<u8>>());
        let o = snapvisor(&[
            "run",
            "--builtin",
            "fwcfg",
            "--mem-mib",
            "32",
            "--fw-cfg-file",
            &format!("opt/snapvisor/blob={a}"),
            "--snapshot-after-ms",
            "0",
            "--store",
            st,
            "--name",
            "f",
            "--exit-after-snapshot",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout.is_empty(), "snapshot taken before the first instruction");
        let o = snapvisor(&["restore", "--store", st, "f", "--fw-cfg-file", &format!("opt/snapvisor/blob={b}")]);
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "stdout {out}\nstderr {err}");
        assert!(
            err.contains(&format!("resized RAM block /rom@opt/snapvisor/blob to the snapshot's {source:#x} bytes")),
            "{err}"
        );
        let lines = blob_sizes(&out);
        assert_eq!(lines.len(), 3, "{out}");
        for l in lines {
            assert!(l.contains(&format!(" size {source} ")), "guest sees the snapshot's size: {l}");
        }
        let sum = hypervisor::guests::fwcfg::checksum(&blob(source));
        assert!(out.contains(&format!("pio-checksum {sum:#x} dma-checksum {sum:#x}\n")), "and its bytes: {out}");
    }
}

#[test]
fn restore_refuses_blocks_that_do_not_fit_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("store");
    let st = st.to_str().expect("utf-8");
    let big = write_file(&dir, "big", &blob(100_000));
    let small = write_file(&dir, "small", &blob(3_000));
    let o = snapvisor(&[
        "run",
        "--builtin",
        "hello",
        "--mem-mib",
        "64",
        "--fw-cfg-file",
        &format!("opt/snapvisor/blob={big}"),
        "--snapshot-after-ms",
        "0",
        "--store",
        st,
        "--name",
        "h",
        "--exit-after-snapshot",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let verify_before = snapvisor(&["store", "verify", "--store", st, "--json"]);
    let o = snapvisor(&[
        "restore",
        "--store",
        st,
        "h",
        "--mem-mib",
        "128",
        "--fw-cfg-file",
        &format!("opt/snapvisor/blob={small}"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(o.stdout.is_empty(), "the guest never ran");
    assert!(err.contains("Size mismatch: pc.ram: 0x4000000 != 0x8000000"), "{err}");
    assert!(err.contains("--mem-mib 64"), "{err}");
    assert!(err.contains("Size too large: /rom@opt/snapvisor/blob: 0x19000 > 0x10000"), "{err}");
    assert!(err.contains("2 problems"), "{err}");
    let verify_after = snapvisor(&["store", "verify", "--store", st, "--json"]);
    assert_eq!(verify_after.status.code(), Some(0));
    assert_eq!(verify_before.stdout, verify_after.stdout, "the store is as it was");
    // The right destination restores.
    let o = snapvisor(&["restore", "--store", st, "h"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), hypervisor::guests::hello::GREETING);
}

#[test]
fn restore_in_a_new_process_continues_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mem, seed, total) = (128u64, 4u64, 40u64);
    // The snapshot must fall in the middle of the run: on a loaded host the guest may not have
    // printed anything 700 ms after its start, so a later point is tried then (a fresh store
    // each time; the 40 passes take about 3 s on an idle host, so each point is still within
    // the run). What is checked below does not change.
    let mut attempt = 0;
    let (st, before) = loop {
        let st = dir.path().join(format!("store-{attempt}"));
        let st = st.to_str().expect("utf-8").to_string();
        let after_ms = [700u64, 1400, 2100][attempt];
        let o = snapvisor(&[
            "run",
            "--builtin",
            "memfill",
            "--mem-mib",
            &mem.to_string(),
            "--seed",
            &seed.to_string(),
            "--passes",
            &total.to_string(),
            "--snapshot-after-ms",
            &after_ms.to_string(),
            "--store",
            &st,
            "--name",
            "r",
            "--live",
            "--exit-after-snapshot",
        ]);
        let before = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
        attempt += 1;
        if !before.is_empty() || attempt == 3 {
            break (st, before);
        }
    };
    let o = snapvisor(&["restore", "--store", &st, "r", "--lazy", "--timeout", "120"]);
    let after = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "stderr {}", String::from_utf8_lossy(&o.stderr));
    check_continues(&before, &after, seed, mem);
    assert_eq!(passes(&after).last().map(|p| p.0), Some(total - 1), "runs to its last pass");
}

#[test]
fn snapshot_names_and_missing_snapshots_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("store");
    let st = st.to_str().expect("utf-8");
    let o = snapvisor(&["restore", "--store", st, "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no snapshot store at"), "a missing store is not created");
    assert!(!dir.path().join("store").exists());
    drop(storage::Store::open(dir.path().join("store")).expect("create store"));
    let o = snapvisor(&["restore", "--store", st, "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("'nope' not found"));
    let o = snapvisor(&[
        "run",
        "--builtin",
        "hello",
        "--mem-mib",
        "16",
        "--snapshot-after-ms",
        "0",
        "--store",
        st,
        "--name",
        "../evil",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("../evil"));
}

#[test]
fn restored_blob_contents_are_the_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(&dir);
    let mut cfg = hypervisor::vm::VmConfig::new(
        16,
        1,
        hypervisor::vm::BootSource::Builtin { guest: Builtin::Hello, params: BuiltinParams::default() },
        Box::new(SharedOutput::default()),
    );
    cfg.fw_cfg_files = vec![hypervisor::vm::FwCfgFile { name: "opt/snapvisor/blob".into(), data: blob(6000) }];
    let vm = Vm::new(cfg).expect("vm");
    snapshot::save(&vm, &store, "b", &SaveOptions::default(), &|_| {}).expect("snapshot");
    let mut opts = RestoreOptions::new(RestoreMode::Eager, Box::new(SharedOutput::default()));
    opts.fw_cfg_files =
        Some(vec![hypervisor::vm::FwCfgFile { name: "opt/snapvisor/blob".into(), data: vec![0xee; 2000] }]);
    let (vm2, rep) = snapshot::restore(&store, "b", opts).expect("restore");
    assert_eq!(rep.resized, vec![("/rom@opt/snapvisor/blob".to_string(), 6000)]);
    let block = vm2.registry().get("/rom@opt/snapvisor/blob").expect("block");
    assert_eq!(block.unaligned_length(), 6000);
    let mut got = vec![0; 6000];
    block.read(0, &mut got).expect("read");
    assert_eq!(got, blob(6000));
}

#[test]
fn a_snapshot_asking_for_too_many_fw_cfg_bytes_is_refused_before_anything_is_allocated() {
    // The machine spec is snapshot bytes: its fw_cfg file sizes are untrusted. Five files of
    // 64 MiB (each under the per-file cut) make 320 MiB, over what a restore accepts in all.
    use migrate::snapshot::format::{RamBlockDesc, VmSnapshot};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(&dir);
    let mut snap = VmSnapshot::default();
    snap.ram.push(RamBlockDesc {
        idstr: "pc.ram".into(),
        used_length: 64 << 20,
        unaligned_length: 64 << 20,
        max_length: 64 << 20,
        page_size: 4096,
        resizeable: false,
    });
    let spec = hypervisor::vm::MachineSpec {
        mem_mib: 64,
        vcpus: 1,
        guest: "builtin:memfill".into(),
        fw_cfg_files: (0..5).map(|i| (format!("opt/big{i}"), 64 << 20)).collect(),
        firmware: None,
        acpi_tables: Vec::new(),
        uuid: None,
        net: Vec::new(),
        builtin: None,
    };
    snap.put("machine", &spec).expect("put");
    let block = storage::BlockSpec {
        idstr: "pc.ram".into(),
        used_length: 64 << 20,
        max_length: 64 << 20,
        page_size: 4096,
        resizeable: false,
    };
    let w = store.begin("big", vec![block]).expect("begin");
    let zeros = vec![0u8; 64 << 10];
    for off in (0..64u64 << 20).step_by(zeros.len()) {
        w.put_chunk("pc.ram", off, &zeros).expect("chunk");
    }
    w.commit(snap.encode().expect("encode")).expect("commit");
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let err = match snapshot::restore(&store, "big", RestoreOptions::new(mode, Box::new(SharedOutput::default()))) {
            Ok(_) => panic!("{mode:?}: a restore of 320 MiB of fw_cfg files was accepted"),
            Err(e) => e,
        };
        assert!(matches!(err, SnapshotError::FwCfgFiles { .. }), "{mode:?}: {err}");
        let msg = err.to_string();
        assert!(msg.contains("'big'") && msg.contains(&(320u64 << 20).to_string()), "{mode:?}: {msg}");
    }
}
