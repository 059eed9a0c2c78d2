//! Pre-built VM shells: the part of a restored VM that is the same for every snapshot of one
//! shape, built ahead of time so that a restore does not wait for it.
//!
//! What a shell is: the KVM VM (`KVM_CREATE_VM`), `pc.ram` mapped (unpopulated, no guest
//! memory yet) and added as memory slots, the TSS and identity-map addresses, the in-kernel
//! irqchip and PIT, and the vCPUs with their CPUID and boot MSRs: [`Vm::new`] up to its
//! devices. Building it took 2.6-5.3 ms of a 4 GiB VM's 3-9.5 ms build on the development
//! machines (nested paravirtual KVM; the memory slots alone ~2.2 ms at 4 GiB, growing with
//! the size), and a restore paid all of it before the guest's first instruction.
//!
//! The pool holds at most one shell: for the shape (memory size, vCPU count) of the VM a
//! restore completed last. A restore of that shape takes it; every restore that completes
//! then asks for a new one ([`request`]), which one background thread builds at the lowest
//! CPU priority (`SCHED_IDLE`: it runs only on a core nothing else wants), replacing a shell
//! of another shape. The thread first waits for the restored VM's first exit to the VMM (at
//! most [`REQUEST_HOLD_OFF`]): started with the restore, it took CPU and the process's
//! memory-map lock from the restore's own way to its first instruction. A restore never
//! waits for a shell: without one ready it builds its own, as before. So a daemon restoring
//! or cloning VMs of one shape one after another finds one ready each time. A restore that
//! is refused (its VM is built from the snapshot's state before the manifest is checked)
//! asks for nothing: a bad snapshot or request neither evicts the shell kept nor leaves one
//! of the shape it chose (it may still have taken the shell kept: the next restore of that
//! shape then builds its own once).
//!
//! Only restores use shells. A shell's VM and vCPUs were created earlier than the restore,
//! and what counts from their creation is set from the snapshot by every restore, as for a
//! fresh VM: the vCPUs' TSC (`IA32_TSC` with the other MSRs) and the VM's kvmclock
//! (`KVM_SET_CLOCK`, snapshot/vcpu_state.rs). A VM that boots (a kernel, firmware, a
//! built-in guest) would see both counting from the shell's creation, so it is always built
//! afresh.
//!
//! What an idle shell costs: a KVM VM with its irqchip, PIT (one kernel thread) and vCPUs,
//! their file descriptors, an address-space reservation of the memory size with nothing in
//! it (no guest memory), and the kernel's per-page metadata of its memory slots, which grows
//! with the size: about 0.25% of it in kernel memory on the development machines (~40 MiB
//! for 16 GiB), outside the daemon's guest-memory budget. The pool is off unless enabled
//! ([`enable`]): `snapvisor serve` and `snapvisor bench restore` enable it, unless given
//! `--no-shell-pool`.
//! A shell is used at most once: [`take`] moves it out of the pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migrate::ram::RamRegistry;

use crate::cpu;
use crate::layout;
use crate::memory::{GuestRam, SlotMap};
use crate::vm::VmError;

/// What a shell fits: guest memory bytes and vCPU count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub mem_bytes: u64,
    pub vcpus: u8,
}

/// A VM up to its devices (module doc).
pub struct Shell {
    pub shape: Shape,
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub registry: Arc<RamRegistry>,
    pub slots: Arc<SlotMap>,
    pub ram: GuestRam,
    /// In vCPU order, with CPUID and the boot MSRs set.
    pub vcpus: Vec<VcpuFd>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

impl Shell {
    /// Builds a shell of `shape` on `kvm` (the count of vCPUs was checked by the caller).
    pub fn build(kvm: Kvm, shape: Shape) -> Result<Shell, VmError> {
        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        // Guest RAM first: on some hosts (nested, paravirtual KVM) the first memory slot added
        // after the TSS and irqchip costs ~10 ms, before them ~50 µs.
        let registry = RamRegistry::new();
        let slots = SlotMap::new(fd.clone());
        registry.add_listener(slots.clone());
        let ram = GuestRam::new(&registry, &slots, shape.mem_bytes)?;
        fd.set_tss_address(layout::KVM_TSS as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP).map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let supported_cpuid = cpu::cpuid::supported(&kvm)?;
        let msrs = cpu::msr::index_list(&kvm)?;
        let mut vcpus = Vec::with_capacity(usize::from(shape.vcpus));
        for id in 0..shape.vcpus {
            let vfd = fd.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vfd.set_cpuid2(&cpu::cpuid::for_vcpu(&supported_cpuid, id, shape.vcpus))
                .map_err(|source| cpu::CpuError::SetCpuid { vcpu: id, source })?;
            cpu::msr::set_boot_msrs(&vfd, id, &msrs)?;
            vcpus.push(vfd);
        }
        Ok(Shell { shape, kvm, fd, registry, slots, ram, vcpus })
    }
}

/// The pool: at most one shell, and whether a builder thread runs.
struct Pool {
    ready: Option<Shell>,
    /// The shape the builder thread is building, if one runs.
    building: Option<Shape>,
    /// The shape asked for last: the builder builds it next when it differs from the one it
    /// just built.
    wanted: Option<Shape>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { ready: None, building: None, wanted: None });
static ENABLED: AtomicBool = AtomicBool::new(false);
static TAKEN: AtomicU64 = AtomicU64::new(0);
static BUILT: AtomicU64 = AtomicU64::new(0);

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Turns the pool on or off for this process; off also drops a shell kept.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Release);
    if !on {
        let shell = {
            let mut p = pool();
            p.wanted = None;
            p.ready.take()
        };
        drop(shell);
    }
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// How many restores took a pre-built shell, and how many shells the builder built, in this
/// process.
pub fn counts() -> (u64, u64) {
    (TAKEN.load(Ordering::Relaxed), BUILT.load(Ordering::Relaxed))
}

/// The shape of the shell ready now, if any.
pub fn ready_shape() -> Option<Shape> {
    pool().ready.as_ref().map(|s| s.shape)
}

/// Waits at most `timeout` for a shell of `shape` to be ready while one is coming (being built,
/// or to be built next by the running builder); true if one is ready. With none of `shape`
/// ready or coming it returns false at once. Used by `bench restore` to measure with a shell
/// ready, as a daemon restoring one shape after another has it; a restore itself never waits.
pub fn wait_ready(shape: Shape, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        {
            let p = pool();
            if p.ready.as_ref().is_some_and(|s| s.shape == shape) {
                return true;
            }
            // Coming: being built, or asked for next while the builder builds another. With
            // no builder running none is coming (a build that failed leaves `wanted` set).
            let coming = p.building == Some(shape) || (p.building.is_some() && p.wanted == Some(shape));
            if !coming {
                return false;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// For a restore of `shape`: the pre-built shell if one of that shape is ready; `None`
/// otherwise (or with the pool off). The restore asks for the next one once it completes
/// ([`request`]).
pub fn take(shape: Shape) -> Option<Shell> {
    if !enabled() {
        return None;
    }
    let shell = {
        let mut p = pool();
        match p.ready.take() {
            Some(s) if s.shape == shape => Some(s),
            other => {
                p.ready = other;
                None
            }
        }
    }?;
    TAKEN.fetch_add(1, Ordering::Relaxed);
    Some(shell)
}

/// How long the builder waits for the restored VM's first exit before building anyway (a
/// guest that never exits, or a VM never started).
pub const REQUEST_HOLD_OFF: Duration = Duration::from_millis(100);

/// After a restore of `shape` completed (pool on): the shell kept is to be of `shape`. Starts
/// the builder thread unless a shell of that shape is ready or the builder runs (it then
/// builds `shape` when done with the shell it is building). A new builder thread first waits
/// until `ran()` holds (the restored VM has exited to the VMM once, or ended), at most
/// [`REQUEST_HOLD_OFF`].
pub fn request(shape: Shape, ran: impl Fn() -> bool + Send + 'static) {
    if !enabled() {
        return;
    }
    {
        let mut p = pool();
        p.wanted = Some(shape);
        if p.ready.as_ref().is_some_and(|s| s.shape == shape) || p.building.is_some() {
            return;
        }
        p.building = Some(shape);
    }
    let spawned = std::thread::Builder::new().name("vm-shell".into()).spawn(move || {
        // A panic ends the pool's record of a builder too, or none would be started again.
        let _ending = BuilderPanics;
        idle_priority();
        let deadline = Instant::now() + REQUEST_HOLD_OFF;
        while !ran() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut shape = shape;
        while let Some(next) = build_one(shape) {
            shape = next;
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("starting the VM shell builder: {e}");
        pool().building = None;
    }
}

/// Clears [`Pool::building`] when the builder thread unwinds. (A builder that returns has
/// cleared it itself, under the lock, and a new builder may have set it since.)
struct BuilderPanics;

impl Drop for BuilderPanics {
    fn drop(&mut self) {
        if std::thread::panicking() {
            pool().building = None;
        }
    }
}

/// The builder's work for one shell of `shape`: builds it and puts it in the pool (the pool
/// on). Returns the shape to build next (recorded as being built): the one asked for last,
/// if another than `shape` and none of it is ready.
fn build_one(shape: Shape) -> Option<Shape> {
    let start = Instant::now();
    let built = Kvm::new().map_err(VmError::OpenKvm).and_then(|kvm| Shell::build(kvm, shape));
    tracing::debug!(?shape, ms = start.elapsed().as_secs_f64() * 1e3, ok = built.is_ok(), "built a VM shell");
    let mut p = pool();
    // The shell replaced or not kept is dropped outside the lock.
    let dropped = match built {
        Ok(shell) if enabled() => {
            BUILT.fetch_add(1, Ordering::Relaxed);
            p.ready.replace(shell)
        }
        Ok(shell) => Some(shell),
        Err(e) => {
            tracing::warn!(?shape, "building a VM shell ahead of time: {e}");
            None
        }
    };
    let ready = p.ready.as_ref().map(|s| s.shape);
    p.building = match p.wanted {
        Some(w) if enabled() && w != shape && ready != Some(w) => Some(w),
        _ => None,
    };
    let next = p.building;
    drop(p);
    drop(dropped);
    next
}

/// `SCHED_IDLE` for the calling thread: it runs only when a core has nothing else to do.
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads one sched_param; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::debug!("SCHED_IDLE for the VM shell builder: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits up to `secs` for `cond`.
    fn wait(secs: u64, cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// A builder thread that unwinds (here in the restore's `ran`, which it calls) clears the
    /// pool's record of a running builder: the next request starts one and gets its shell.
    /// Without the guard the record stays and no shell is ever built again.
    #[test]
    fn a_panicking_builder_does_not_stop_later_ones() {
        enable(true);
        let shape = Shape { mem_bytes: 32 << 20, vcpus: 1 };
        request(shape, || panic!("a restore's first-exit check panics (on purpose)"));
        assert!(wait(10, || pool().building.is_none()), "the panicked builder is still recorded as running");
        assert_eq!(ready_shape(), None);
        request(shape, || true);
        assert!(wait(60, || ready_shape() == Some(shape)), "no shell was built after a builder panicked");
        assert_eq!(counts().1, 1);
        assert!(take(shape).is_some());
        enable(false);
    }

    /// After a build that failed nothing of that shape is coming: `wait_ready` says so at once
    /// instead of waiting out its timeout (the failed shape stays `wanted`).
    #[test]
    fn wait_ready_does_not_wait_for_a_shell_whose_build_failed() {
        enable(true);
        // Guest memory no address space holds: the build fails.
        let shape = Shape { mem_bytes: 1 << 50, vcpus: 1 };
        request(shape, || true);
        assert!(wait(30, || pool().building.is_none()), "the failed build never ended");
        assert_eq!(pool().wanted, Some(shape));
        let timeout = Duration::from_secs(30);
        let start = Instant::now();
        assert!(!wait_ready(shape, timeout));
        assert!(start.elapsed() < timeout, "wait_ready waited its whole timeout for a build that had failed");
        assert_eq!(counts().1, 0);
        enable(false);
    }
}
