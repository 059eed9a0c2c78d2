//! Snapshots of the `touch` guest: its memory filled, waiting for its go.

use std::time::Duration;

use hypervisor::guests::{touch, BootInfo, Builtin};
use hypervisor::snapshot::{self, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};

/// Snapshots a `touch` guest of `mem` MiB with `seed` that has filled its memory and waits for
/// go; returns the line the guest prints once it has touched its working set.
pub fn touch_snapshot(store: &storage::Store, name: &str, mem: u64, seed: u64) -> String {
    let params = BuiltinParams { seed, ..Default::default() };
    let mut vm = Vm::new(VmConfig::new(
        mem,
        1,
        BootSource::Builtin { guest: Builtin::Touch, params },
        Box::new(SharedOutput::default()),
    ))
    .expect("vm");
    vm.start().expect("start");
    vm.control().wait_mark(touch::MARK_FILLED, Duration::from_secs(60)).expect("filled");
    snapshot::save(&vm, store, name, &SaveOptions::default(), &|_| {}).expect("snapshot");
    vm.stop("snapshot taken");
    let ranges = BootInfo::fill_ranges(&hypervisor::memory::e820_map(mem << 20));
    let (sum, pages) = touch::checksum(&ranges, seed, params.stride, params.span);
    format!("touch: working set of {pages} pages done, checksum {sum:#x}\n")
}
