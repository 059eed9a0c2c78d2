//! The VM's devices as [`Persist`] fragments: one adapter per device, naming its fragment.
//!
//! The safety net: the machine records every device it puts on a bus
//! ([`crate::machine::Placed`]), and [`check_all_saved`] — run by every snapshot before its
//! state is written — fails the snapshot, naming the device and where it sits, when one of
//! them has no fragment in [`fragments`]. A device added to the machine without an adapter here
//! thus stops snapshots loudly instead of being restored in its power-on state.

use std::sync::{Arc, Mutex, PoisonError};

use devices::cmos::Cmos;
use devices::debugcon::Debugcon;
use devices::exit::ExitDevice;
use devices::fw_cfg::FwCfg;
use devices::i8042::I8042;
use devices::pci::PciConfigIo;
use devices::pm::Pm;
use devices::serial::SerialDevice;
use migrate::persist::{decode, encode, Persist, PersistError};

use crate::machine::{device_identity, Devices};

use super::SnapshotError;

/// A device whose state has `state()` and `restore(&state)`, as a named fragment owner.
macro_rules! persist_adapter {
    ($adapter:ident, $device:ty, $fragment:literal) => {
        pub struct $adapter(pub Arc<Mutex<$device>>);

        impl Persist for $adapter {
            fn persist_name(&self) -> String {
                $fragment.into()
            }
            fn save_state(&self) -> Result<Vec<u8>, PersistError> {
                encode(&self.persist_name(), &lock(&self.0).state())
            }
            fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
                let name = self.persist_name();
                let state = decode(&name, bytes)?;
                lock(&self.0).restore(&state).map_err(|e| PersistError::Invalid { name, reason: e.to_string() })
            }
        }
    };
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

persist_adapter!(SerialPersist, SerialDevice, "dev/serial0");
persist_adapter!(FwCfgPersist, FwCfg, "dev/fw_cfg");
persist_adapter!(ExitPersist, ExitDevice, "dev/exit");
persist_adapter!(DebugconPersist, Debugcon, "dev/debugcon");
persist_adapter!(CmosPersist, Cmos, "dev/cmos");
persist_adapter!(I8042Persist, I8042, "dev/i8042");
persist_adapter!(PmPersist, Pm, "dev/pm");
// The configuration ports save the whole PCI bus: every function's configuration space.
persist_adapter!(PciPersist, PciConfigIo, "dev/pci");

/// Every device of the machine as a fragment owner, with the identity of the device it saves
/// ([`crate::machine::Placed::identity`]). Devices on no bus (the ACPI runtime, VMGenID) are
/// listed too, so they are saved; their identity matches no placed device.
pub fn fragments(d: &Devices) -> Vec<(Box<dyn Persist>, usize)> {
    let p = &d.platform;
    let mut v: Vec<(Box<dyn Persist>, usize)> = vec![
        (Box::new(SerialPersist(d.serial.clone())), device_identity(&d.serial)),
        (Box::new(FwCfgPersist(d.fw_cfg.clone())), device_identity(&d.fw_cfg)),
        (Box::new(ExitPersist(d.exit.clone())), device_identity(&d.exit)),
        (Box::new(DebugconPersist(d.debugcon.clone())), device_identity(&d.debugcon)),
        (Box::new(CmosPersist(p.cmos.clone())), device_identity(&p.cmos)),
        (Box::new(I8042Persist(p.i8042.clone())), device_identity(&p.i8042)),
        (Box::new(PmPersist(p.pm.clone())), device_identity(&p.pm)),
        (Box::new(PciPersist(p.pci_config.clone())), device_identity(&p.pci_config)),
    ];
    v.extend(super::acpi_state::fragments(d));
    for (p, ids) in super::net_state::fragments(d) {
        v.push((p, ids.first().copied().unwrap_or(0)));
    }
    v
}

/// Every device of the machine as a fragment owner.
pub fn persistables(d: &Devices) -> Vec<Box<dyn Persist>> {
    fragments(d).into_iter().map(|(p, _)| p).collect()
}

/// Fails, naming the device, unless every device on the machine's buses has a fragment.
pub fn check_all_saved(d: &Devices) -> Result<(), SnapshotError> {
    let mut saved: Vec<usize> = fragments(d).into_iter().map(|(_, id)| id).collect();
    // A NIC's fragment saves both of its BARs.
    saved.extend(super::net_state::fragments(d).into_iter().flat_map(|(_, ids)| ids));
    match d.placed().into_iter().find(|p| !saved.contains(&p.identity())) {
        Some(p) => {
            Err(SnapshotError::DeviceNotSaved { device: p.name.to_string(), bus: p.bus.to_string(), addr: p.addr })
        }
        None => Ok(()),
    }
}
