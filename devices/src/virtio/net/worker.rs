//! The device's I/O thread: one per device, off the vCPU threads.
//!
//! It sleeps in epoll on: a stop eventfd, a wake eventfd (the driver finished setting up,
//! resume, restore), the two queue notify eventfds (which KVM signals as ioeventfds; an
//! MMIO-exit notify signals the same ones), and the backend's fd. The backend is polled only
//! while the receive queue can take frames (device running, queue enabled, not starved);
//! when the driver has posted no receive buffers the thread sleeps until the receive queue is
//! notified, so a full tap and an idle guest cost no CPU. Each wake-up processes the transmit
//! queue and the receive side under the device mutex, which is never held while sleeping.
//! A backend that reports an error or hang-up (a tap deleted on the host) is not polled again,
//! so it cannot make the thread spin.
//!
//! Priority: the thread runs [`IO_NICE_BOOST`] nice levels above the VM's threads. A guest
//! that polls its rings (netping's ping, echo and tx modes, DPDK-style drivers, a busy guest;
//! netping `rx` waits for the interrupt instead) keeps its vCPU thread on the CPU all the
//! time; on a host with fewer cores than busy threads, an I/O thread of the
//! same priority that sleeps between bursts then waits behind it for a CPU at every wake-up
//! (measured here: hundreds of microseconds, with 40-60 frames piling up per wake-up and the
//! tap dropping the rest). Five levels (about three times a vCPU thread's weight) let it run
//! as soon as frames arrive. The price: under contention a VM's busy I/O thread (a guest that
//! keeps its transmit queue full, a host flooding its tap) gets about three times a vCPU's CPU
//! share; it still sleeps whenever there is nothing to move. Lowering the nice value
//! needs CAP_SYS_NICE or an RLIMIT_NICE that allows it (the systemd unit sets `LimitNICE`);
//! without either, the thread runs at the process's priority and one warning says so.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::core::{Core, RX, TX};

/// How many nice levels the I/O thread runs above the thread that started it (the VM's,
/// whose vCPU threads keep the process's nice): 5 levels give it about three times a vCPU
/// thread's CPU weight (see the module doc).
pub const IO_NICE_BOOST: i32 = 5;

/// [`IO_NICE_BOOST`], or `SNAPVISOR_NET_IO_NICE_BOOST` (0 to 20) when set, for measuring.
fn nice_boost() -> i32 {
    std::env::var("SNAPVISOR_NET_IO_NICE_BOOST")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(IO_NICE_BOOST, |b| b.clamp(0, 20))
}

/// Warned once per process when the boost is not allowed.
static BOOST_REFUSED: AtomicBool = AtomicBool::new(false);

/// Lowers the calling thread's nice value by [`IO_NICE_BOOST`] (down to -20). Needs
/// CAP_SYS_NICE or an RLIMIT_NICE that allows it (`LimitNICE=-5` in the systemd unit); when
/// refused, the thread keeps the process's priority and one warning per process says so.
fn raise_priority(name: &str) {
    let boost = nice_boost();
    if boost == 0 {
        return;
    }
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: getpriority reads no memory; -1 is a valid nice value, so errno is not checked:
    // the worst case is a target one level off.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    let want = (now - boost).max(-20);
    // SAFETY: setpriority on this thread's own id (PRIO_PROCESS with a TID changes that thread
    // only, on Linux); it reads no memory.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, want) } != 0 {
        let e = io::Error::last_os_error();
        if !BOOST_REFUSED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "{name}: the I/O thread cannot run at nice {want} (process at {now}): {e}; virtio-net I/O \
                 threads keep the process's priority, and frames to busy guests are dropped sooner (allow it \
                 with CAP_SYS_NICE or LimitNICE={want})"
            );
        }
    } else {
        tracing::debug!("{name}: I/O thread at nice {want}");
    }
}

/// CPU time the calling thread has used, in nanoseconds (0 if the clock cannot be read).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through the pointer, which lives across the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// See [`busy_poll`]: how long after the last frame (0: never), and at most how long in one go.
pub const BUSY_POLL: Duration = Duration::ZERO;
pub const BUSY_POLL_MAX: Duration = Duration::from_millis(1);

const STOP: u64 = 0;
const WAKE: u64 = 1;
const RX_NOTIFY: u64 = 2;
const TX_NOTIFY: u64 = 3;
const BACKEND: u64 = 4;

/// The running thread; stopping it (or dropping this) joins it.
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("running", &self.handle.is_some()).finish()
    }
}

fn lock(core: &Mutex<Core>) -> std::sync::MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Worker {
    /// Starts the thread for `core`.
    pub fn start(core: Arc<Mutex<Core>>) -> io::Result<Worker> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let (name, wake, notify, backend_fd) = {
            let c = lock(&core);
            (c.name.clone(), c.wake.clone(), c.notify.clone(), c.backend.poll_fd())
        };
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (stop.as_raw_fd(), STOP),
            (wake.as_raw_fd(), WAKE),
            (notify[RX].as_raw_fd(), RX_NOTIFY),
            (notify[TX].as_raw_fd(), TX_NOTIFY),
        ] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))?;
        }
        let thread_name: String = format!("net-{name}").chars().take(15).collect();
        let handle = std::thread::Builder::new().name(thread_name).spawn(move || {
            raise_priority(&name);
            run(&core, &epoll, &wake, &notify, backend_fd);
            lock(&core).stats.io_cpu_ns = thread_cpu_ns();
            tracing::debug!("{name}: I/O thread stopped");
        })?;
        Ok(Worker { stop, handle: Some(handle) })
    }

    /// Stops and joins the thread (idempotent).
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.stop.write(1);
            if h.join().is_err() {
                tracing::warn!("virtio-net I/O thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long the thread keeps polling the backend after the last frame before it sleeps:
/// `SNAPVISOR_NET_BUSY_POLL_US` (0 to 1000 microseconds), [`BUSY_POLL`] (off) by default.
/// Off because it was measured to hurt on a loaded host: `bench net` at 1500 bytes with 50 us
/// gave 0.38 / 0.62 of the raw read against 1.17 / 2.84 without, in the same runs (load
/// average 5-18): the spinning thread, at its raised priority, takes the CPU the sender and
/// the polling guest need. On an idle host, where the raw reader it is compared with spins
/// too, it is untested.
fn busy_poll_window() -> Duration {
    std::env::var("SNAPVISOR_NET_BUSY_POLL_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(BUSY_POLL, |us| Duration::from_micros(us.min(1000)))
}

/// After a pass that received frames: keeps taking frames (and sending, so a stream cannot
/// hold back the transmit queue) until none came for `window`, the receive queue starves or
/// the device stops, or [`BUSY_POLL_MAX`] passed (then the epoll loop looks at its other
/// events: stop, wake-ups). The device mutex is released between passes.
fn busy_poll(core: &Mutex<Core>, window: Duration) {
    let start = Instant::now();
    let mut last = start;
    loop {
        let now = Instant::now();
        if now - last >= window || now - start >= BUSY_POLL_MAX {
            return;
        }
        let mut c = lock(core);
        c.process_tx();
        if c.process_rx() > 0 {
            last = Instant::now();
        }
        if !c.running() || c.rx_starved {
            return;
        }
        drop(c);
        std::hint::spin_loop();
    }
}

fn run(core: &Mutex<Core>, epoll: &Epoll, wake: &EventFd, notify: &[Arc<EventFd>; 2], backend_fd: i32) {
    let name = lock(core).name.clone();
    let busy = busy_poll_window();
    let mut events = [EpollEvent::default(); 8];
    let mut polling_backend = false;
    let mut backend_gone = false;
    loop {
        lock(core).stats.sleeps += 1;
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("virtio-net I/O thread: epoll failed, stopping: {e}");
                return;
            }
        };
        let mut rx_refilled = false;
        let mut rx_notified = 0;
        for ev in &events[..n] {
            match ev.data() {
                STOP => return,
                WAKE => {
                    let _ = wake.read();
                    rx_refilled = true;
                }
                RX_NOTIFY => {
                    rx_notified = notify[RX].read().unwrap_or(0);
                    rx_refilled = true;
                }
                TX_NOTIFY => {
                    let _ = notify[TX].read();
                }
                BACKEND if ev.event_set().intersects(EventSet::ERROR | EventSet::HANG_UP) && !backend_gone => {
                    // The tap went away under the device (deleted on the host): polling it
                    // would report this for ever. Frames to it are dropped from now on.
                    backend_gone = true;
                    tracing::warn!(
                        "virtio-net I/O thread: {name}'s backend reports an error or hang-up; no longer polled"
                    );
                }
                _ => {}
            }
        }
        let want_backend = {
            let mut c = lock(core);
            c.rounds += 1;
            c.stats.rx_notifies += rx_notified;
            if rx_refilled {
                c.rx_starved = false;
            }
            if c.process_tx() {
                // More to send: come back after letting others take the mutex.
                let _ = notify[TX].write(1);
            }
            let got = c.process_rx();
            let want = c.running() && c.queues[RX].queue.is_some() && !c.rx_starved && !backend_gone;
            drop(c);
            if got > 0 && want && !busy.is_zero() {
                busy_poll(core, busy);
            }
            want
        };
        if want_backend != polling_backend {
            let r = if want_backend {
                epoll.ctl(ControlOperation::Add, backend_fd, EpollEvent::new(EventSet::IN, BACKEND))
            } else {
                epoll.ctl(ControlOperation::Delete, backend_fd, EpollEvent::default())
            };
            match r {
                Ok(()) => polling_backend = want_backend,
                Err(e) => {
                    tracing::warn!("virtio-net I/O thread: epoll on the backend failed, stopping: {e}");
                    return;
                }
            }
        }
    }
}
