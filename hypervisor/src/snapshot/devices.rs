//! The VM's devices as [`Persist`] fragments: one adapter per device, naming its fragment.
//! Adding a device to the machine without listing it here makes `persistables` miss it, and
//! the machine's own check (`Devices::all_names`) then fails the snapshot by name.

use std::sync::{Arc, Mutex, PoisonError};

use devices::exit::ExitDevice;
use devices::fw_cfg::FwCfg;
use devices::serial::SerialDevice;
use migrate::persist::{decode, encode, Persist, PersistError};

use crate::machine::Devices;

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

/// Every device of the machine as a fragment owner.
pub fn persistables(d: &Devices) -> Vec<Box<dyn Persist>> {
    vec![
        Box::new(SerialPersist(d.serial.clone())),
        Box::new(FwCfgPersist(d.fw_cfg.clone())),
        Box::new(ExitPersist(d.exit.clone())),
    ]
}
