//! The NICs' fragments: `dev/virtio-net/<bdf>` per NIC, the device's state
//! (`devices::virtio::net::VirtioNetState`: features, queues, MSI-X table, config, pending
//! interrupts), validated as untrusted by the device when restored.
//!
//! The fragment saves the device's state only; which NICs a VM has (tap, MAC, ROM choice and
//! size) is in the machine spec, so a restore builds them before their fragments are loaded.
//! Saving and loading happen with the NIC paused (`Vm::pause`; a restore pauses its NICs until
//! the VM starts), so its I/O thread touches neither the queues nor guest memory meanwhile.

use std::sync::{Arc, Mutex, PoisonError};

use devices::pci::{Bdf, PciDevice};
use devices::virtio::net::VirtioNet;
use devices::virtio::{MODERN_BAR, MSIX_BAR};
use migrate::persist::{decode, encode, Persist, PersistError};

use crate::machine::{device_identity, Devices};

/// The fragment of the NIC at `bdf`.
pub fn fragment_name(bdf: Bdf) -> String {
    format!("dev/virtio-net/{bdf}")
}

/// A NIC as a fragment owner.
pub struct NetPersist {
    pub bdf: Bdf,
    pub device: Arc<Mutex<VirtioNet>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Persist for NetPersist {
    fn persist_name(&self) -> String {
        fragment_name(self.bdf)
    }
    fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        encode(&self.persist_name(), &lock(&self.device).state())
    }
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
        let name = self.persist_name();
        let state = decode(&name, bytes)?;
        lock(&self.device).restore(&state).map_err(|e| PersistError::Invalid { name, reason: e.to_string() })
    }
}

/// The identities of what a NIC puts on the buses (its MSI-X and virtio BARs).
fn bar_identities(device: &Arc<Mutex<VirtioNet>>) -> Vec<usize> {
    let d = lock(device);
    [MSIX_BAR, MODERN_BAR].into_iter().filter_map(|i| d.bar_device(i)).map(|b| device_identity(&b)).collect()
}

/// Every NIC's fragment, with the identities of the bus devices it saves.
pub fn fragments(d: &Devices) -> Vec<(Box<dyn Persist>, Vec<usize>)> {
    d.nics
        .iter()
        .map(|n| {
            let p: Box<dyn Persist> = Box::new(NetPersist { bdf: n.bdf, device: n.device.clone() });
            (p, bar_identities(&n.device))
        })
        .collect()
}
