//! Run control shared by a VM and its vCPU threads: stop, pause, and why the VM ended.
//!
//! A vCPU thread blocked in `KVM_RUN` is kicked with a real-time signal whose handler sets
//! `immediate_exit` in that thread's `kvm_run`; KVM then returns `EINTR` at once, even when
//! the signal landed just before `KVM_RUN` was entered, so no kick is lost. The thread then
//! looks at the shared [`RunState`].
//!
//! Lock order: `VmControl::inner` only; callers never hold a device lock while calling in.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest wrote its exit status to the exit device.
    GuestExit { status: u32 },
    /// The guest powered off (KVM system event).
    PowerOff,
    /// The guest asked for a reset, or triple-faulted.
    Reset { detail: String },
    /// The guest did something KVM could not run (emulation failure, bad state).
    Crash { detail: String },
    /// It ran for longer than it was allowed.
    Timeout { after_ms: u64 },
    /// The VMM stopped it (a request, or an error in the VMM).
    Stopped { detail: String },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestExit { status } => write!(f, "guest exited with status {status}"),
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reset { detail } => write!(f, "guest reset: {detail}"),
            ExitReason::Crash { detail } => write!(f, "guest crashed: {detail}"),
            ExitReason::Timeout { after_ms } => write!(f, "guest timed out after {after_ms} ms"),
            ExitReason::Stopped { detail } => write!(f, "VM stopped: {detail}"),
        }
    }
}

/// What the vCPUs should be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

struct Inner {
    state: RunState,
    exit: Option<ExitReason>,
    /// vCPU threads that have parked because of a pause.
    parked: usize,
    /// Threads of running vCPUs, to kick.
    threads: Vec<libc::pthread_t>,
    /// A guest reset is being carried out (the vCPUs are paused for it).
    resetting: bool,
    /// Someone paused the VM while it was resetting: it stays paused after the reset.
    hold: bool,
}

/// Carries out a guest reset while every vCPU is parked (see [`VmControl::request_reset`]).
pub type ResetHandler = std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Shared between a VM and its vCPU threads.
pub struct VmControl {
    inner: Mutex<Inner>,
    /// `RunState` as a number, for the vCPU loop's lock-free check after each exit.
    fast_state: AtomicU8,
    changed: Condvar,
    vcpus: usize,
    /// When a vCPU first exited to the VMM (guest I/O or MMIO): the guest is running.
    first_exit: OnceLock<Instant>,
    /// The process's CPU time at the first exit (ms, see [`process_cpu_ms`]).
    first_exit_cpu: OnceLock<f64>,
    /// Called once, at the first exit (a lazy restore's page server starts its fill threads).
    first_exit_hook: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Exits to the VMM (port I/O and MMIO) so far.
    exits: std::sync::atomic::AtomicU64,
    /// Resets the machine in place when the guest asks for a reset; none: a reset ends the VM.
    reset_handler: OnceLock<ResetHandler>,
    /// Resets carried out.
    resets: std::sync::atomic::AtomicU64,
    /// Per-port and per-page exit counts and costs, when enabled (benchmarks).
    pub profile: crate::exit_profile::ExitProfile,
    /// Progress marks the guest reported through the exit device, with when and the
    /// process's CPU time then (ms).
    marks: Mutex<Vec<(u32, Instant, f64)>>,
    marked: Condvar,
    /// Called with every kick: wakes vCPUs parked in the VMM (the exit device's wait
    /// register), which a signal does not interrupt.
    kick_hooks: Mutex<Vec<KickHook>>,
}

/// See [`VmControl::on_kick`].
pub type KickHook = std::sync::Arc<dyn Fn() + Send + Sync>;

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by `register_vcpu_thread`
        // and cleared before the mapping goes away; writing one byte is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| format!("installing the vCPU kick signal handler: {e}"));
    });
    result
}

/// Marks the calling thread as running the vCPU whose kvm_run is at `run`
/// (null to unregister).
pub fn set_thread_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

impl VmControl {
    pub fn new(vcpus: usize) -> Self {
        VmControl {
            inner: Mutex::new(Inner {
                state: RunState::Running,
                exit: None,
                parked: 0,
                threads: Vec::new(),
                resetting: false,
                hold: false,
            }),
            reset_handler: OnceLock::new(),
            resets: std::sync::atomic::AtomicU64::new(0),
            first_exit: OnceLock::new(),
            first_exit_hook: OnceLock::new(),
            first_exit_cpu: OnceLock::new(),
            exits: std::sync::atomic::AtomicU64::new(0),
            profile: Default::default(),
            marks: Mutex::new(Vec::new()),
            marked: Condvar::new(),
            kick_hooks: Mutex::new(Vec::new()),
            fast_state: AtomicU8::new(RunState::Running as u8),
            changed: Condvar::new(),
            vcpus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn register_thread(&self, t: libc::pthread_t) {
        self.lock().threads.push(t);
    }

    pub fn unregister_thread(&self, t: libc::pthread_t) {
        let mut g = self.lock();
        g.threads.retain(|x| *x != t);
        self.changed.notify_all();
    }

    fn kick_all(&self, g: &Inner) {
        for t in &g.threads {
            // SAFETY: `t` is a live vCPU thread: threads unregister themselves (under this lock)
            // before they exit, so the handle is valid while it is in the list.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
        for hook in self.kick_hooks.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            hook();
        }
    }

    /// Calls `hook` with every kick (after the run state has changed), to wake a vCPU thread
    /// that waits in the VMM. Lock order: the hook runs under `inner` and must not call back.
    pub fn on_kick(&self, hook: KickHook) {
        self.kick_hooks.lock().unwrap_or_else(PoisonError::into_inner).push(hook);
    }

    pub fn state(&self) -> RunState {
        self.lock().state
    }

    /// Whether vCPUs should keep running the guest: one atomic load, for the vCPU loop.
    pub fn running(&self) -> bool {
        self.fast_state.load(Ordering::Acquire) == RunState::Running as u8
    }

    /// Records why the VM ends (the first reason wins) and stops every vCPU.
    pub fn stop(&self, reason: ExitReason) {
        let mut g = self.lock();
        if g.exit.is_none() {
            tracing::debug!(%reason, "VM stopping");
            g.exit = Some(reason);
        }
        g.state = RunState::Stopping;
        self.fast_state.store(RunState::Stopping as u8, Ordering::Release);
        self.kick_all(&g);
        self.changed.notify_all();
    }

    /// The reason the VM ended, if it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Waits until the VM has an exit reason, or `timeout` passes.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.lock();
        while g.exit.is_none() {
            match deadline {
                None => g = self.changed.wait(g).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    g = self.changed.wait_timeout(g, d - now).unwrap_or_else(PoisonError::into_inner).0;
                }
            }
        }
        g.exit.clone()
    }

    /// Waits until every vCPU thread has gone.
    pub fn wait_threads_gone(&self) {
        let mut g = self.lock();
        while !g.threads.is_empty() {
            g = self.changed.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Pauses every vCPU and returns once all are parked outside KVM_RUN. Returns false if the
    /// VM is stopping instead. During a guest reset it waits for the reset to end and keeps the
    /// VM paused after it.
    pub fn pause(&self) -> bool {
        let mut g = self.lock();
        if g.resetting {
            g.hold = true;
            while g.resetting {
                g = self.changed.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
        }
        if g.state == RunState::Stopping {
            return false;
        }
        g.state = RunState::Paused;
        self.fast_state.store(RunState::Paused as u8, Ordering::Release);
        self.kick_all(&g);
        while g.parked < g.threads.len() && g.state == RunState::Paused {
            g = self.changed.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        g.state == RunState::Paused
    }

    pub fn resume(&self) {
        let mut g = self.lock();
        if g.resetting {
            // The reset resumes the VM when it is done.
            g.hold = false;
            return;
        }
        if g.state == RunState::Paused {
            g.state = RunState::Running;
            self.fast_state.store(RunState::Running as u8, Ordering::Release);
            self.changed.notify_all();
        }
    }

    /// Called by a vCPU thread between runs: parks while paused; returns false when the vCPU
    /// must stop.
    pub fn vcpu_may_run(&self) -> bool {
        let mut g = self.lock();
        if g.state == RunState::Paused {
            g.parked += 1;
            self.changed.notify_all();
            while g.state == RunState::Paused {
                g = self.changed.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
            g.parked -= 1;
        }
        g.state == RunState::Running
    }

    /// Makes guest resets reset the machine in place (firmware VMs) instead of ending the VM.
    pub fn set_reset_handler(&self, handler: ResetHandler) {
        if self.reset_handler.set(handler).is_err() {
            tracing::warn!("a reset handler was already installed; keeping the first");
        }
    }

    /// Resets carried out so far.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// The guest asked for a reset (or triple-faulted). Without a reset handler the VM ends
    /// with [`ExitReason::Reset`]. With one, every vCPU is paused at once (so the asking vCPU
    /// does not enter the guest again), and a helper thread waits for all of them to park, runs
    /// the handler, and resumes them; a failed reset stops the VM as a crash. A reset asked for
    /// while one is under way is the same reset. Callable from a vCPU thread.
    pub fn request_reset(self: &std::sync::Arc<Self>, detail: String) {
        let Some(handler) = self.reset_handler.get().cloned() else {
            self.stop(ExitReason::Reset { detail });
            return;
        };
        {
            let mut g = self.lock();
            if g.resetting || g.state == RunState::Stopping {
                return;
            }
            g.resetting = true;
            g.hold = g.state == RunState::Paused;
            g.state = RunState::Paused;
            self.fast_state.store(RunState::Paused as u8, Ordering::Release);
            self.kick_all(&g);
        }
        tracing::info!(%detail, "guest reset");
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("vm-reset".into()).spawn(move || me.carry_out_reset(&handler));
        if let Err(e) = spawned {
            self.stop(ExitReason::Crash { detail: format!("cannot start the reset thread: {e}") });
            self.end_reset();
        }
    }

    fn carry_out_reset(&self, handler: &ResetHandler) {
        {
            let mut g = self.lock();
            while g.parked < g.threads.len() && g.state == RunState::Paused {
                g = self.changed.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
            if g.state != RunState::Paused {
                drop(g);
                self.end_reset();
                return;
            }
        }
        let result = handler();
        self.resets.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.stop(ExitReason::Crash { detail: format!("resetting the machine failed: {e}") });
        }
        self.end_reset();
    }

    fn end_reset(&self) {
        let mut g = self.lock();
        g.resetting = false;
        if g.state == RunState::Paused && !g.hold {
            g.state = RunState::Running;
            self.fast_state.store(RunState::Running as u8, Ordering::Release);
        }
        g.hold = false;
        self.changed.notify_all();
    }

    /// Notes the first exit of any vCPU to the VMM.
    pub fn note_exit(&self) {
        self.exits.fetch_add(1, Ordering::Relaxed);
        if self.first_exit.get().is_none() {
            let mut first = false;
            self.first_exit.get_or_init(|| {
                first = true;
                Instant::now()
            });
            if first {
                let _ = self.first_exit_cpu.set(process_cpu_ms());
                if let Some(hook) = self.first_exit_hook.get() {
                    hook();
                }
            }
        }
    }

    /// Runs `hook` at the VM's first exit to the VMM (set before the VM starts; only the first
    /// hook given is kept). A hook set after the first exit never runs.
    pub fn on_first_exit(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.first_exit_hook.set(hook);
    }

    /// Exits to the VMM so far.
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    /// Records a progress mark from the guest.
    pub fn mark(&self, value: u32) {
        let cpu = process_cpu_ms();
        self.marks.lock().unwrap_or_else(PoisonError::into_inner).push((value, Instant::now(), cpu));
        self.marked.notify_all();
    }

    /// When the guest first reported `value`, waiting at most `timeout` for it (or for the
    /// VM to end).
    pub fn wait_mark(&self, value: u32, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        let mut g = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some((_, t, _)) = g.iter().find(|(v, _, _)| *v == value) {
                return Some(*t);
            }
            let now = Instant::now();
            if now >= deadline || self.exit_reason().is_some() {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            g = self.marked.wait_timeout(g, wait).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// The process's CPU time (ms, every thread) when the guest first reported `value`: with
    /// [`process_cpu_ms`] before, what reaching the mark cost, whatever else the host ran.
    pub fn mark_cpu_ms(&self, value: u32) -> Option<f64> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner).iter().find(|m| m.0 == value).map(|m| m.2)
    }

    /// The process's CPU time at the first exit, ms (see [`process_cpu_ms`]).
    pub fn first_exit_cpu_ms(&self) -> Option<f64> {
        self.first_exit_cpu.get().copied()
    }

    pub fn first_exit(&self) -> Option<Instant> {
        self.first_exit.get().copied()
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus
    }
}

/// CPU time of this process so far (every thread, user and kernel), milliseconds; 0 if the
/// clock cannot be read.
pub fn process_cpu_ms() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}
