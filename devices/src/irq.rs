//! Interrupt lines as devices see them: level-triggered lines the machine wires to the
//! interrupt controller (KVM_IRQ_LINE in the hypervisor), so device models stay free of KVM
//! and their unit tests can watch the level.

/// A level-triggered interrupt line: the device says whether it is asserted.
///
/// Calling `set_level` with the level the line already has is allowed and must be harmless;
/// devices call it whenever their interrupt condition may have changed.
pub trait IrqLine: Send + Sync {
    fn set_level(&self, level: bool);
}

/// A line that goes nowhere, for devices whose interrupt is not wired.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn set_level(&self, _level: bool) {}
}

/// A line that remembers its level, for tests.
#[derive(Debug, Default)]
pub struct RecordingIrq(pub std::sync::atomic::AtomicBool);

impl RecordingIrq {
    /// Whether the line is asserted.
    pub fn level(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl IrqLine for RecordingIrq {
    fn set_level(&self, level: bool) {
        self.0.store(level, std::sync::atomic::Ordering::SeqCst);
    }
}
