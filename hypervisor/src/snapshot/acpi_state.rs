//! Snapshot fragments of the ACPI devices that sit on no bus: `dev/acpi` (the runtime's
//! `patched` flag; the three blobs are RAM blocks and travel with RAM) and `dev/vmgenid` (the
//! generation GUID and the address the firmware reported). Both exist only on firmware VMs.
//!
//! Restoring `dev/vmgenid` also refreshes fw_cfg's copies of `etc/vmgenid_guid` and
//! `etc/vmgenid_addr`; the VMGenID lock is released before fw_cfg's is taken.

use std::sync::{Arc, Mutex, PoisonError};

use devices::acpi::runtime::{AcpiRuntime, AcpiRuntimeState};
use devices::acpi::vmgenid::{VmGenId, VmGenIdState};
use devices::fw_cfg::FwCfg;
use migrate::persist::{decode, encode, Persist, PersistError};

use crate::machine::Devices;

/// `dev/acpi`.
pub struct AcpiPersist(pub Arc<AcpiRuntime>);

impl Persist for AcpiPersist {
    fn persist_name(&self) -> String {
        "dev/acpi".into()
    }
    fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        encode(&self.persist_name(), &self.0.state())
    }
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
        let name = self.persist_name();
        let state: AcpiRuntimeState = decode(&name, bytes)?;
        self.0.restore(&state).map_err(|e| PersistError::Invalid { name, reason: e.to_string() })
    }
}

/// `dev/vmgenid`.
pub struct VmGenIdPersist {
    pub dev: Arc<VmGenId>,
    pub fw_cfg: Arc<Mutex<FwCfg>>,
}

impl Persist for VmGenIdPersist {
    fn persist_name(&self) -> String {
        "dev/vmgenid".into()
    }
    fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        encode(&self.persist_name(), &self.dev.state())
    }
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
        let name = self.persist_name();
        let state: VmGenIdState = decode(&name, bytes)?;
        let invalid = |e: devices::acpi::vmgenid::VmGenIdError| PersistError::Invalid {
            name: name.clone(),
            reason: e.to_string(),
        };
        self.dev.restore(&state).map_err(invalid)?;
        self.dev.sync_fw_cfg(&mut self.fw_cfg.lock().unwrap_or_else(PoisonError::into_inner)).map_err(invalid)
    }
}

/// The fragments of the ACPI devices `d` has, with their identities.
pub fn fragments(d: &Devices) -> Vec<(Box<dyn Persist>, usize)> {
    let mut v: Vec<(Box<dyn Persist>, usize)> = Vec::new();
    if let Some(rt) = &d.acpi {
        v.push((Box::new(AcpiPersist(rt.clone())), Arc::as_ptr(rt) as *const () as usize));
    }
    if let Some(g) = &d.vmgenid {
        let fw_cfg = d.fw_cfg.clone();
        v.push((Box::new(VmGenIdPersist { dev: g.clone(), fw_cfg }), Arc::as_ptr(g) as *const () as usize));
    }
    v
}
