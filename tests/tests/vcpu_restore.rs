//! vCPU state across a snapshot and a restore in a new process: the `timer` guest arms the
//! LAPIC timer tick after tick and must keep receiving its ticks after the restore, in
//! TSC-deadline mode (whose deadline KVM drops unless the LAPIC is restored before the MSRs)
//! and in one-shot mode.

mod common;

use common::{run_builtin, snapvisor};
use hypervisor::control::ExitReason;
use hypervisor::guests::timer::{REPORT_EVERY, TICKS};
use hypervisor::guests::{Builtin, TimerMode};
use hypervisor::vm::BuiltinParams;

/// The tick numbers of the `timer: <mode> tick <n>` lines in `out`.
fn ticks(out: &str, mode: TimerMode) -> Vec<u64> {
    let prefix = format!("timer: {} tick ", mode.name());
    out.lines().filter_map(|l| l.strip_prefix(&prefix)).map(|n| n.trim().parse().expect("tick number")).collect()
}

#[test]
fn timer_guest_counts_its_ticks_in_both_modes() {
    for mode in [TimerMode::TscDeadline, TimerMode::Oneshot] {
        let params = BuiltinParams { timer: mode, ..Default::default() };
        let (reason, out, _vm) = run_builtin(Builtin::Timer, 16, params);
        assert_eq!(reason, ExitReason::GuestExit { status: 0 }, "{mode:?}: {out}");
        let want: Vec<u64> = (1..=TICKS / REPORT_EVERY).map(|i| i * REPORT_EVERY).collect();
        assert_eq!(ticks(&out, mode), want, "{mode:?}: {out}");
        assert!(out.ends_with("timer: done\n"), "{mode:?}: {out}");
    }
}

/// Runs the timer guest in `mode`, snapshots it mid-run, restores it in a new process and
/// requires the ticks to carry on from where they were to the end of the run.
fn ticks_continue_after_restore(mode: TimerMode) {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("store");
    let st = st.to_str().expect("utf-8");
    #[rustfmt::skip]
    let o = snapvisor(&[
        "run", "--builtin", "timer", "--mem-mib", "16", "--timer-mode", mode.name(),
        "--snapshot-after-ms", "400", "--store", st, "--name", "t", "--exit-after-snapshot",
    ]);
    let before = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "run: {before}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(before.contains(&format!("timer: {} mode", mode.name())), "{before}");
    assert!(!before.contains("timer: done"), "the snapshot came after the run ended: {before}");
    let o = snapvisor(&["restore", "--store", st, "t", "--timeout", "60"]);
    let after = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{mode:?}: the restored guest failed\nbefore the snapshot:\n{before}\nafter the restore:\n{after}\nstderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!ticks(&after, mode).is_empty(), "no tick after the restore: {after}");
    // The snapshot may fall inside a line: the restored guest finishes it, so the two outputs
    // are read as one stream.
    let all = ticks(&format!("{before}{after}"), mode);
    let want: Vec<u64> = (1..=TICKS / REPORT_EVERY).map(|i| i * REPORT_EVERY).collect();
    assert_eq!(all, want, "ticks continue where they were\nbefore {before}\nafter {after}");
    assert!(after.ends_with("timer: done\n"), "{after}");
}

#[test]
fn tsc_deadline_ticks_continue_after_restore_in_a_new_process() {
    ticks_continue_after_restore(TimerMode::TscDeadline);
}

#[test]
fn oneshot_ticks_continue_after_restore_in_a_new_process() {
    ticks_continue_after_restore(TimerMode::Oneshot);
}
