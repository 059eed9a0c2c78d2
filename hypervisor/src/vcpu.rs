//! A vCPU thread: runs `KVM_RUN` and dispatches its exits to the port and MMIO buses.
//!
//! The thread holds its `VcpuFd`'s mutex while it runs the guest and lets go of it only while
//! parked (paused) or after it has ended, so whoever pauses the VM can then lock the vCPU and
//! save or restore its state. Lock order: `VmControl` is never held while taking the vCPU
//! mutex, and the vCPU mutex is never held while parking.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use devices::bus::Bus;
use kvm_bindings::{
    kvm_run, KVM_EXIT_IO_IN, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::control::{self, ExitReason, VmControl};
use crate::exit_profile::ExitKind;

/// What a vCPU thread needs.
pub struct Vcpu {
    pub id: u8,
    pub fd: Arc<Mutex<VcpuFd>>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VmControl>,
    /// Size of the kvm_run mapping, to bounds-check port I/O data.
    pub run_size: usize,
}

enum Next {
    Continue,
    Io,
    Stop(ExitReason),
}

impl Vcpu {
    /// Starts the vCPU on its own thread, which registers itself for kicks before it first
    /// enters the guest and unregisters when it ends.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name(format!("vcpu{}", self.id)).spawn(move || self.run())
    }

    fn run(self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.control.register_thread(me);
        let span = tracing::debug_span!("vcpu", id = self.id);
        let _enter = span.enter();
        'outer: while self.control.vcpu_may_run() {
            let mut fd = self.fd.lock().unwrap_or_else(PoisonError::into_inner);
            control::set_thread_kvm_run(fd.get_kvm_run() as *mut kvm_run);
            while self.control.running() {
                match self.step(&mut fd) {
                    Next::Continue => {}
                    Next::Io => self.handle_io(&mut fd),
                    Next::Stop(reason) => {
                        self.control.stop(reason);
                        break 'outer;
                    }
                }
            }
            control::set_thread_kvm_run(std::ptr::null_mut());
        }
        control::set_thread_kvm_run(std::ptr::null_mut());
        self.control.unregister_thread(me);
    }

    fn step(&self, fd: &mut MutexGuard<'_, VcpuFd>) -> Next {
        let id = self.id;
        match fd.run() {
            Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => Next::Io,
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let t0 = self.control.profile.start();
                self.control.note_exit();
                if let Err(e) = self.mmio.read(addr, data) {
                    tracing::debug!("vCPU {id}: MMIO read of {} bytes at {addr:#x}: {e}", data.len());
                    data.fill(0);
                }
                self.control.profile.record(ExitKind::Mmio, addr, t0);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let t0 = self.control.profile.start();
                self.control.note_exit();
                if let Err(e) = self.mmio.write(addr, data) {
                    tracing::debug!("vCPU {id}: MMIO write of {data:x?} at {addr:#x}: {e}");
                }
                self.control.profile.record(ExitKind::Mmio, addr, t0);
                Next::Continue
            }
            Ok(VcpuExit::Hlt) => {
                Next::Stop(ExitReason::Stopped { detail: format!("vCPU {id} halted with no way to wake") })
            }
            Ok(VcpuExit::Shutdown) => {
                self.control.request_reset(format!("vCPU {id} triple fault (KVM_EXIT_SHUTDOWN) at {}", where_(fd)));
                Next::Continue
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                self.control.request_reset(format!("vCPU {id} requested a reset"));
                Next::Continue
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Next::Stop(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_CRASH => ExitReason::Crash { detail: format!("vCPU {id} reported a crash") },
                other => ExitReason::Crash { detail: format!("vCPU {id}: unknown system event {other}") },
            }),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live
                // member of the union.
                let sub = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = match sub {
                    KVM_INTERNAL_ERROR_EMULATION => {
                        // SAFETY: suberror KVM_INTERNAL_ERROR_EMULATION: `emulation_failure` is
                        // the live member; its flags say whether the instruction bytes are valid.
                        let ef = unsafe { fd.get_kvm_run().__bindgen_anon_1.emulation_failure };
                        let bytes = (ef.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0)
                            .then(|| {
                                // SAFETY: the flag says `insn_size` and `insn_bytes` are filled in.
                                let insn = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
                                insn.insn_bytes[..usize::from(insn.insn_size).min(insn.insn_bytes.len())].to_vec()
                            });
                        format!(
                            "emulation failure on {} (an instruction this KVM cannot emulate)",
                            describe_instruction(bytes.as_deref())
                        )
                    }
                    2 => "simultaneous exceptions".into(),
                    3 => "delivery event failure".into(),
                    _ => "internal error".into(),
                };
                Next::Stop(ExitReason::Crash {
                    detail: format!("vCPU {id}: KVM {what} (suberror {sub}) at {}", where_(fd)),
                })
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Stop(ExitReason::Crash {
                detail: format!("vCPU {id}: VM entry failed (hardware reason {reason:#x} on host CPU {cpu})"),
            }),
            Ok(VcpuExit::Intr) => Next::Continue,
            Ok(other) => {
                let what = format!("{other:?}");
                Next::Stop(ExitReason::Crash {
                    detail: format!("vCPU {id}: unhandled KVM exit {what} at {}", where_(fd)),
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Stop(ExitReason::Stopped { detail: format!("vCPU {id}: KVM_RUN failed: {e}") }),
        }
    }

    /// Port I/O, including string I/O (`rep ins/outs`), which KVM hands over as `count`
    /// accesses of `size` bytes each.
    fn handle_io(&self, fd: &mut VcpuFd) {
        let t0 = self.control.profile.start();
        self.control.note_exit();
        let run_size = self.run_size;
        let run = fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the live member of the union.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let len = size * io.count as usize;
        let offset = io.data_offset as usize;
        if size == 0 || offset.checked_add(len).is_none_or(|end| end > run_size) {
            tracing::error!("vCPU {}: port I/O data out of the kvm_run page (offset {offset}, {len} bytes)", self.id);
            return;
        }
        // SAFETY: `offset + len <= run_size`, the size of this vCPU's kvm_run mapping, and the
        // mapping is only touched by this thread while it is outside KVM_RUN.
        let data = unsafe { std::slice::from_raw_parts_mut((run as *mut kvm_run as *mut u8).add(offset), len) };
        let port = u64::from(io.port);
        for access in data.chunks_mut(size) {
            let res = if u32::from(io.direction) == KVM_EXIT_IO_IN {
                let r = self.pio.read(port, access);
                if r.is_err() {
                    access.fill(0xff);
                }
                r
            } else {
                self.pio.write(port, access)
            };
            if let Err(e) = res {
                tracing::trace!("vCPU {}: port {port:#x}: {e}", self.id);
            }
        }
        self.control.profile.record(ExitKind::Pio, port, t0);
    }
}

/// The instruction KVM failed to emulate, from the bytes it reported: `iret (bytes cf ..)`
/// for the returns firmware trips on here (the nested KVM's emulator runs `iret` only in real
/// mode), the bytes alone for anything else. KVM may report the whole 15-byte fetch window;
/// the bytes are what it fetched, not a decoded length.
pub fn describe_instruction(bytes: Option<&[u8]>) -> String {
    let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
        return "an instruction KVM did not report".into();
    };
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let hex = hex.join(" ");
    // Legacy prefixes and REX before the opcode.
    let mut rex_w = false;
    let mut op = None;
    for &b in bytes {
        match b {
            0x66 | 0x67 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0xf0 | 0xf2 | 0xf3 => {}
            0x40..=0x4f => rex_w = b & 8 != 0,
            _ => {
                op = Some(b);
                break;
            }
        }
    }
    match op {
        Some(0xcf) if rex_w => format!("iretq (bytes {hex})"),
        Some(0xcf) => format!("iret (bytes {hex})"),
        _ => format!("the instruction with bytes {hex}"),
    }
}

/// `rip 0x… (cs 0x…)`, for error messages.
fn where_(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!("rip {:#x} (cs {:#x}, cr0 {:#x})", r.rip, s.cs.selector, s.cr0),
        _ => "an unknown rip".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::describe_instruction;

    #[test]
    fn failed_instructions_are_named_by_their_bytes() {
        assert_eq!(describe_instruction(Some(&[0x66, 0xcf])), "iret (bytes 66 cf)");
        assert_eq!(describe_instruction(Some(&[0xcf, 0x90])), "iret (bytes cf 90)");
        assert_eq!(describe_instruction(Some(&[0x48, 0xcf])), "iretq (bytes 48 cf)");
        assert_eq!(describe_instruction(Some(&[0x0f, 0xc7, 0xf0])), "the instruction with bytes 0f c7 f0");
        assert_eq!(describe_instruction(Some(&[])), "an instruction KVM did not report");
        assert_eq!(describe_instruction(None), "an instruction KVM did not report");
    }
}
