//! The I/O path's counters and costs: frames the backend refuses, what an idle receive round
//! writes to guest memory, the I/O thread's priority.

use std::time::Duration;

use super::features::*;
use super::test_util::*;

/// Frames the backend refuses are counted and their chains completed; one warning covers a
/// burst (the rest are counted for the next one), and the device stays usable.
#[test]
fn tx_frames_the_backend_refuses_are_counted_and_completed() {
    let mut r = rig();
    r.init(VERSION_1 | MAC);
    r.enable_msix();
    *r.net.refuse_tx.lock().expect("lock") = Some(libc::EAGAIN);
    for i in 0..3u16 {
        r.add(TXQ, &[(BUF + 0x1000 * u64::from(i), 72, 0, 0)], i);
    }
    r.core().process_tx();
    assert_eq!(r.used(TXQ).0, 3, "every refused frame's chain is completed: the guest never waits");
    assert!(r.dev.error().is_none(), "a full tap is not a device error");
    let s = r.dev.stats();
    assert_eq!((s.tx_dropped, s.tx_frames), (3, 0));
    {
        let c = r.core();
        assert!(c.tx_drop_warned.is_some(), "the first refusal is warned about");
        assert_eq!(c.tx_drops_unwarned, 2, "the next two, within the interval, wait for the next warning");
    }
    *r.net.refuse_tx.lock().expect("lock") = None;
    r.add(TXQ, &[(BUF, 72, 0, 0)], 3);
    r.core().process_tx();
    assert_eq!(r.net.sent().len(), 1);
    let s = r.dev.stats();
    assert_eq!((s.tx_dropped, s.tx_frames), (3, 1));
}

/// Receive counters: frames, batches (one used-ring publication and at most one signal
/// each), and the empty read that ends a batch.
#[test]
fn rx_counts_frames_batches_and_empty_reads() {
    let mut r = rig();
    r.init(VERSION_1 | MAC);
    r.enable_msix();
    for i in 0..4u16 {
        r.add(RXQ, &[(BUF + 0x1000 * u64::from(i), 2048, WRITE, 0)], i);
    }
    for i in 0..3 {
        r.net.push_rx(frame(100, i));
    }
    assert_eq!(r.core().process_rx(), 3);
    assert_eq!(r.routes.take(), vec![1], "one interrupt for the batch of three");
    let s = r.dev.stats();
    assert_eq!((s.rx_frames, s.rx_batches, s.rx_empty_reads, s.interrupts), (3, 1, 1, 1));
}

/// A receive round that finds no frame writes nothing to guest memory: the used ring's
/// `VRING_USED_F_NO_NOTIFY` is written once, not on every wake-up (each write is a store to
/// guest RAM and a dirty page for the next incremental snapshot).
#[test]
fn idle_rx_rounds_do_not_write_guest_memory() {
    let r = rig();
    r.init(VERSION_1 | MAC);
    r.add(RXQ, &[(BUF, 2048, WRITE, 0), (BUF + 0x1000, 2048, WRITE, 0)], 0);
    r.net.push_rx(frame(100, 1));
    assert_eq!(r.core().process_rx(), 1);
    r.block.take_dirty();
    for _ in 0..3 {
        assert_eq!(r.core().process_rx(), 0);
    }
    assert_eq!(r.block.take_dirty(), Vec::<u64>::new(), "idle rounds dirtied guest pages");
    // A reset forgets the flag: the next driver gets it written again.
    r.init(VERSION_1 | MAC);
    r.add(RXQ, &[(BUF, 2048, WRITE, 0)], 0);
    r.block.take_dirty();
    r.core().process_rx();
    let (_, _, used) = layout(RXQ);
    assert_eq!(r.block.take_dirty(), vec![used / 0x1000], "the used ring flags, after the reset");
}

/// The nice value of thread `tid` of this process.
fn nice_of(tid: &str) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
    // Fields after the command (which ends with ')'): state is field 3, nice field 19.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    rest.split(' ').nth(16).expect("nice").parse().expect("number")
}

/// The I/O thread runs IO_NICE_BOOST nice levels above the thread that started it, so that
/// a polling vCPU (a CPU-bound thread) cannot keep it off the CPU while frames wait (root
/// runs the tests; an unprivileged daemon gets a warning instead).
#[test]
fn io_thread_runs_above_the_vcpu_priority() {
    let mut r = rig();
    r.dev.start().expect("start");
    // SAFETY: gettid has no arguments.
    let me = unsafe { libc::gettid() };
    let mut io_tid = None;
    for _ in 0..100 {
        for t in std::fs::read_dir("/proc/self/task").expect("tasks").flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.starts_with("net-virtio-net") {
                io_tid = Some(t.file_name().to_string_lossy().into_owned());
            }
        }
        if io_tid.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let io_tid = io_tid.expect("the I/O thread");
    let want = (nice_of(&me.to_string()) - i64::from(super::worker::IO_NICE_BOOST)).max(-20);
    let mut got = nice_of(&io_tid);
    for _ in 0..100 {
        if got == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        got = nice_of(&io_tid);
    }
    assert_eq!(got, want, "the I/O thread's nice value");
    r.dev.shutdown();
}
