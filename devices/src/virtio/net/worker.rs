//! The device's I/O thread: one per device, off the vCPU threads.
//!
//! It sleeps in epoll on: a stop eventfd, a wake eventfd (the driver finished setting up,
//! resume, restore), the two queue notify eventfds (which KVM signals as ioeventfds; an
//! MMIO-exit notify signals the same ones), and the backend's fd. The backend is polled only
//! while the receive queue can take frames (device running, queue enabled, not starved);
//! when the driver has posted no receive buffers the thread sleeps until the receive queue is
//! notified, so a full tap and an idle guest cost no CPU. Each wake-up processes the transmit
//! queue and the receive side under the device mutex, which is never held while sleeping.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::core::{Core, RX, TX};

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
            run(&core, &epoll, &wake, &notify, backend_fd);
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

fn run(core: &Mutex<Core>, epoll: &Epoll, wake: &EventFd, notify: &[Arc<EventFd>; 2], backend_fd: i32) {
    let mut events = [EpollEvent::default(); 8];
    let mut polling_backend = false;
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("virtio-net I/O thread: epoll failed, stopping: {e}");
                return;
            }
        };
        let mut rx_refilled = false;
        for ev in &events[..n] {
            match ev.data() {
                STOP => return,
                WAKE => {
                    let _ = wake.read();
                    rx_refilled = true;
                }
                RX_NOTIFY => {
                    let _ = notify[RX].read();
                    rx_refilled = true;
                }
                TX_NOTIFY => {
                    let _ = notify[TX].read();
                }
                _ => {}
            }
        }
        let want_backend = {
            let mut c = lock(core);
            if rx_refilled {
                c.rx_starved = false;
            }
            if c.process_tx() {
                // More to send: come back after letting others take the mutex.
                let _ = notify[TX].write(1);
            }
            c.process_rx();
            c.running() && c.queues[RX].queue.is_some() && !c.rx_starved
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
