//! Resizes between, and during, background snapshots that keep their userfaultfd
//! registration (migrate/src/ram/wp/keep.rs) (hostile3). A running memfill VM with a
//! resizeable fw_cfg file block is snapshotted in the background again and again while the
//! block shrinks, grows to its maximum, shrinks and grows back to the registered length (same
//! length, other bytes), and is resized while the snapshot pre-protects and in its pause.
//! Every committed snapshot restores byte-exact (against the RAM at its pause) and sized as
//! it was; a resize during a snapshot cancels it or is refused, and the VM runs on; no page
//! of any block, over its whole reserved length, stays write-protected (pagemap bit 57).

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use common::ram::{assert_same_ram, ram_of, Ram};
use hypervisor::guests::Builtin;
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveHooks, SaveMode, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, FwCfgFile, SharedOutput, Vm, VmConfig};

const FILE: &str = "opt/h3/blob";
const BLOCK: &str = "/rom@opt/h3/blob";

/// Pages write-protected per the page tables, over every block's whole reserved length.
fn protected_pages(vm: &Vm) -> Vec<(String, u64)> {
    let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
    let mut out = Vec::new();
    for b in vm.registry().blocks() {
        let pages = b.max_length() / 4096;
        let mut raw = vec![0u8; pages as usize * 8];
        pagemap.read_exact_at(&mut raw, b.host_addr() as u64 / 4096 * 8).expect("read pagemap");
        let n =
            raw.chunks_exact(8).filter(|e| u64::from_le_bytes((*e).try_into().expect("8")) & (1 << 57) != 0).count();
        if n > 0 {
            out.push((b.idstr().to_string(), n as u64));
        }
    }
    out
}

type Hook = Arc<dyn Fn(&Vm) + Send + Sync>;

/// A background snapshot `name`; `during` runs while it pre-protects and `paused` in its pause
/// after RAM is protected. Ok(RAM at the pause) or Err(its error).
fn bg(vm: &Vm, store: &storage::Store, name: &str, during: Option<Hook>, paused: Option<Hook>) -> Result<Ram, String> {
    let seen: Arc<Mutex<Option<Ram>>> = Arc::default();
    let s = seen.clone();
    let after: Hook = Arc::new(move |vm: &Vm| {
        *s.lock().expect("lock") = Some(ram_of(vm));
        if let Some(p) = &paused {
            p(vm);
        }
    });
    let hooks = SaveHooks { after_protect: Some(after), during_pre_protect: during, ..SaveHooks::NONE };
    let so = SaveOptions { mode: SaveMode::Background, incremental: true, hooks, ..Default::default() };
    let r = snapshot::save(vm, store, name, &so, &|_| {}).map_err(|e| e.to_string())?;
    assert_eq!(r.mode, SaveMode::Background, "{name}: {:?}", r.mode_reason);
    let ram = seen.lock().expect("lock").take().expect("pause hook ran");
    Ok(ram)
}

fn resize(vm: &Vm, len: usize, seed: u64) {
    vm.registry().resize(BLOCK, len as u64).expect("resize");
    let b = vm.registry().get(BLOCK).expect("block");
    b.write(0, &common::noise(len, seed)).expect("write file");
}

#[test]
fn resizes_between_and_during_kept_registration_snapshots_restore_exact_and_leave_nothing_protected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::Store::open(dir.path().join("store")).expect("store");
    let out = SharedOutput::default();
    let mut cfg = VmConfig::new(
        16,
        1,
        BootSource::Builtin {
            guest: Builtin::Memfill,
            params: BuiltinParams { seed: 3, passes: 0, ..Default::default() },
        },
        Box::new(out.clone()),
    );
    cfg.fw_cfg_files = vec![FwCfgFile { name: FILE.into(), data: common::noise(100_000, 1) }];
    let mut vm = Vm::new(cfg).expect("vm");
    vm.start().expect("start");
    common::memfill::wait_lines(&out, 1, std::time::Duration::from_secs(60));
    let max = vm.registry().get(BLOCK).expect("block").max_length() as usize;
    assert_eq!(max, 128 * 1024);

    let mut taken: Vec<(String, Ram)> = Vec::new();
    let check = |taken: &mut Vec<(String, Ram)>, vm: &Vm, name: &str, r: Result<Ram, String>| {
        let ram = r.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(protected_pages(vm), vec![], "{name}: pages left write-protected");
        taken.push((name.to_string(), ram));
    };
    check(&mut taken, &vm, "s1", bg(&vm, &store, "s1", None, None));
    resize(&vm, 70_000, 2); // shrink between snapshots
    check(&mut taken, &vm, "s2", bg(&vm, &store, "s2", None, None));
    resize(&vm, max, 3); // grow to the reserved maximum
    check(&mut taken, &vm, "s3", bg(&vm, &store, "s3", None, None));
    resize(&vm, 5_000, 4); // shrink and grow back to the registered length, other bytes
    resize(&vm, max, 5);
    check(&mut taken, &vm, "s4", bg(&vm, &store, "s4", None, None));
    resize(&vm, 4096, 6); // one page
    check(&mut taken, &vm, "s5", bg(&vm, &store, "s5", None, None));

    // During pre-protection (the guest running): the snapshot is cancelled or the resize
    // refused; either way the VM runs on and nothing stays protected.
    let resized_during: Hook = Arc::new(|vm: &Vm| {
        let _ = vm.registry().resize(BLOCK, 90_000);
    });
    let r = bg(&vm, &store, "x1", Some(resized_during), None);
    eprintln!("x1 (resize while pre-protecting): {:?}", r.as_ref().map(|_| "committed"));
    assert_eq!(protected_pages(&vm), vec![], "x1: pages left write-protected");
    match r {
        Ok(ram) => taken.push(("x1".into(), ram)),
        Err(e) => {
            assert!(e.contains(BLOCK) && e.contains("resized"), "x1: {e}");
            assert!(!store.list().expect("list").contains(&"x1".to_string()), "a cancelled snapshot is listed");
        }
    }
    // In the pause, with RAM protected.
    let resized_paused: Hook = Arc::new(|vm: &Vm| {
        let _ = vm.registry().resize(BLOCK, 20_000);
    });
    let r = bg(&vm, &store, "x2", None, Some(resized_paused));
    eprintln!("x2 (resize in the pause): {:?}", r.as_ref().map(|_| "committed"));
    assert_eq!(protected_pages(&vm), vec![], "x2: pages left write-protected");
    match r {
        Ok(ram) => {
            // The snapshot holds the RAM of the pause; the resize came after the copy of it
            // only if it was refused.
            taken.push(("x2".into(), ram));
        }
        Err(e) => {
            assert!(e.contains(BLOCK) && e.contains("resized"), "x2: {e}");
            assert!(!store.list().expect("list").contains(&"x2".to_string()), "a cancelled snapshot is listed");
        }
    }
    // And on: the registration is sound after all this.
    resize(&vm, 65_536, 7);
    check(&mut taken, &vm, "s6", bg(&vm, &store, "s6", None, None));
    let text = out.text();
    vm.stop("done");
    let p = common::memfill::passes(&text);
    assert!(p.iter().all(|(_, _, m)| *m == 0), "the running guest found its memory damaged: {text}");
    drop(vm);

    for (name, want) in &taken {
        for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
            let (vm2, _) =
                snapshot::restore(&store, name, RestoreOptions::new(mode, Box::new(SharedOutput::default())))
                    .unwrap_or_else(|e| panic!("restore {name}: {e}"));
            assert_same_ram(&ram_of(&vm2), want, &format!("{name}: {mode:?} restore"));
        }
    }
}
