//! The VM's devices as [`Persist`] fragments: one adapter per device, naming its fragment.
//! Adding a device to the machine without listing it here makes `persistables` miss it, and
//! the machine's own check (`Devices::all_names`) then fails the snapshot by name.

use std::sync::{Arc, Mutex, PoisonError};

use devices::exit::ExitDevice;
use devices::fw_cfg::FwCfg;
use devices::serial::SerialDevice;
use migrate::persist::{decode, encode, Persist, PersistError};

use crate::machine::Devices;

pub struct SerialPersist(pub Arc<Mutex<SerialDevice>>);
pub struct FwCfgPersist(pub Arc<Mutex<FwCfg>>);
pub struct ExitPersist(pub Arc<Mutex<ExitDevice>>);

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Persist for SerialPersist {
    fn persist_name(&self) -> String {
        "dev/serial0".into()
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

impl Persist for FwCfgPersist {
    fn persist_name(&self) -> String {
        "dev/fw_cfg".into()
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

impl Persist for ExitPersist {
    fn persist_name(&self) -> String {
        "dev/exit".into()
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

/// Every device of the machine as a fragment owner.
pub fn persistables(d: &Devices) -> Vec<Box<dyn Persist>> {
    vec![
        Box::new(SerialPersist(d.serial.clone())),
        Box::new(FwCfgPersist(d.fw_cfg.clone())),
        Box::new(ExitPersist(d.exit.clone())),
    ]
}
