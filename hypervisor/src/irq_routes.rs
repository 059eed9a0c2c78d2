//! KVM interrupt routing of one VM: the IOAPIC/PIC default routes plus one MSI route per
//! device vector, and the irqfds that raise them.
//!
//! KVM_SET_GSI_ROUTING replaces the VM's whole routing table, so the table lives in one place
//! per VM ([`GsiRouter`]): every change rebuilds it from the default routes KVM_CREATE_IRQCHIP
//! installs (GSIs 0-15 to both the PIC and the IOAPIC pin of the same number, 16-23 to the
//! IOAPIC only; the same table the kernel's `default_routing` has, so ISA interrupts keep
//! working) and the MSI routes currently set.
//!
//! A device's MSI-X vectors get GSIs from [`FIRST_MSI_GSI`] up (above the IOAPIC's 24 pins),
//! allocated per VM when a vector is first routed ([`KvmMsiRoutes`]); each has an eventfd
//! registered as an irqfd on its GSI, so the device's I/O thread raises an interrupt with one
//! `write` and no exit. A masked vector (or MSI-X off) keeps its GSI and irqfd but loses its
//! route: a write to its irqfd then reaches no CPU (KVM finds no route for the GSI). The device
//! model keeps the pending bit and does not trigger masked vectors; this is the backstop.
//! Dropping a [`KvmMsiRoutes`] unregisters its irqfds and frees its GSIs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use devices::latch::Latch;
use devices::virtio::{MsiMessage, MsiRoutes};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// The IOAPIC's pins: GSIs below this are the default routes.
pub const IOAPIC_PINS: u32 = 24;
/// The first GSI handed out for MSI vectors.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// At most this many MSI GSIs per VM (KVM's table holds 4096 routes).
pub const MAX_MSI_GSIS: u32 = 1024;
/// At most this many vectors per device.
pub const MAX_VECTORS: u16 = 64;

/// Errors routing interrupts.
#[derive(Debug, Error)]
pub enum RouteError {
    #[error("no free GSI for an MSI vector: this VM already routes {MAX_MSI_GSIS}")]
    NoGsi,
    #[error("KVM_SET_GSI_ROUTING with {entries} routes: {source}")]
    SetRouting { entries: usize, source: kvm_ioctls::Error },
    #[error("building the routing table of {entries} routes: {reason}")]
    Table { entries: usize, reason: String },
    #[error("creating the eventfd of MSI vector {vector}: {source}")]
    EventFd { vector: u16, source: std::io::Error },
    #[error("KVM_IRQFD for MSI vector {vector} on GSI {gsi}: {source}")]
    Irqfd { vector: u16, gsi: u32, source: kvm_ioctls::Error },
    #[error("MSI vector {vector} is out of range (a device has at most {MAX_VECTORS})")]
    Vector { vector: u16 },
}

struct RouterInner {
    /// GSIs handed out and not released, with the MSI message each routes to (none: masked).
    msi: BTreeMap<u32, Option<MsiMessage>>,
}

/// A VM's GSI routing table, and its paravirtual interrupt line.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    inner: Mutex<RouterInner>,
    /// Raised by devices whose MSI-X is disabled; waited for through the exit device's
    /// interrupt-wait register (see `devices::exit`). Not an interrupt controller input.
    line: Arc<Latch>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
    e.u.msi.address_lo = m.addr as u32;
    e.u.msi.address_hi = (m.addr >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

/// The routes KVM_CREATE_IRQCHIP installs on x86.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            v.push(irqchip_entry(gsi, chip, gsi % 8));
        }
    }
    v
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Arc<GsiRouter> {
        Arc::new(GsiRouter {
            vm,
            inner: Mutex::new(RouterInner { msi: BTreeMap::new() }),
            line: Arc::new(Latch::default()),
        })
    }

    /// The VM's paravirtual interrupt line (see the field).
    pub fn line(&self) -> Arc<Latch> {
        self.line.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The table as it should be: the default routes and every unmasked MSI route.
    fn table(inner: &RouterInner) -> Vec<kvm_irq_routing_entry> {
        let mut v = default_routes();
        v.extend(inner.msi.iter().filter_map(|(gsi, m)| m.map(|m| msi_entry(*gsi, m))));
        v
    }

    fn commit(&self, inner: &RouterInner) -> Result<(), RouteError> {
        let entries = Self::table(inner);
        let n = entries.len();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| RouteError::Table { entries: n, reason: format!("{e:?}") })?;
        self.vm.set_gsi_routing(&table).map_err(|source| RouteError::SetRouting { entries: n, source })
    }

    /// A GSI for a new MSI vector, routed nowhere yet.
    pub fn allocate(&self) -> Result<u32, RouteError> {
        let mut inner = self.lock();
        let gsi = (FIRST_MSI_GSI..FIRST_MSI_GSI + MAX_MSI_GSIS)
            .find(|g| !inner.msi.contains_key(g))
            .ok_or(RouteError::NoGsi)?;
        inner.msi.insert(gsi, None);
        Ok(gsi)
    }

    /// Routes `gsi` to `msg`, or nowhere.
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), RouteError> {
        let mut inner = self.lock();
        let old = inner.msi.insert(gsi, msg);
        if old == Some(msg) {
            return Ok(());
        }
        let r = self.commit(&inner);
        if r.is_err() {
            // KVM kept its old table; so does this record.
            match old {
                Some(o) => inner.msi.insert(gsi, o),
                None => inner.msi.remove(&gsi),
            };
        }
        r
    }

    /// Gives `gsi` back; its route goes.
    pub fn release(&self, gsi: u32) {
        let mut inner = self.lock();
        if let Some(Some(_)) = inner.msi.remove(&gsi) {
            if let Err(e) = self.commit(&inner) {
                tracing::warn!("removing the MSI route of GSI {gsi}: {e}");
            }
        }
    }

    /// The MSI routes now set: (GSI, message), for tests and diagnostics.
    pub fn msi_routes(&self) -> Vec<(u32, MsiMessage)> {
        self.lock().msi.iter().filter_map(|(g, m)| m.map(|m| (*g, m))).collect()
    }
}

struct Vector {
    gsi: u32,
    irqfd: EventFd,
}

/// One device's MSI-X vectors on KVM: a GSI and an irqfd per vector, made when the vector is
/// first routed.
pub struct KvmMsiRoutes {
    router: Arc<GsiRouter>,
    /// What the device calls its owner in logs (`virtio-net 0000:00:03.0`).
    owner: String,
    vectors: Mutex<BTreeMap<u16, Vector>>,
}

impl KvmMsiRoutes {
    pub fn new(router: Arc<GsiRouter>, owner: String) -> Arc<KvmMsiRoutes> {
        Arc::new(KvmMsiRoutes { router, owner, vectors: Mutex::new(BTreeMap::new()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, Vector>> {
        self.vectors.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn vector(&self, map: &mut BTreeMap<u16, Vector>, index: u16) -> Result<u32, RouteError> {
        if let Some(v) = map.get(&index) {
            return Ok(v.gsi);
        }
        if index >= MAX_VECTORS {
            return Err(RouteError::Vector { vector: index });
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| RouteError::EventFd { vector: index, source })?;
        let gsi = self.router.allocate()?;
        if let Err(source) = self.router.vm.register_irqfd(&irqfd, gsi) {
            self.router.release(gsi);
            return Err(RouteError::Irqfd { vector: index, gsi, source });
        }
        map.insert(index, Vector { gsi, irqfd });
        Ok(gsi)
    }

    /// The GSI of vector `index`, if it was ever routed.
    pub fn gsi(&self, index: u16) -> Option<u32> {
        self.lock().get(&index).map(|v| v.gsi)
    }
}

impl MsiRoutes for KvmMsiRoutes {
    fn set_route(&self, index: u16, msg: Option<MsiMessage>) -> Result<(), String> {
        let mut map = self.lock();
        if msg.is_none() && !map.contains_key(&index) {
            return Ok(());
        }
        let gsi = self.vector(&mut map, index).map_err(|e| format!("{}: {e}", self.owner))?;
        self.router.set_msi(gsi, msg).map_err(|e| format!("{}: vector {index}: {e}", self.owner))
    }

    fn trigger(&self, index: u16) {
        let map = self.lock();
        match map.get(&index) {
            Some(v) => {
                if let Err(e) = v.irqfd.write(1) {
                    tracing::warn!("{}: raising MSI vector {index} (GSI {}): {e}", self.owner, v.gsi);
                }
            }
            None => tracing::debug!("{}: MSI vector {index} raised but never routed; dropped", self.owner),
        }
    }

    fn raise_line(&self) {
        self.router.line.set();
    }
}

impl Drop for KvmMsiRoutes {
    fn drop(&mut self) {
        let map = std::mem::take(&mut *self.lock());
        for (index, v) in map {
            if let Err(e) = self.router.vm.unregister_irqfd(&v.irqfd, v.gsi) {
                tracing::warn!("{}: unregistering the irqfd of vector {index} (GSI {}): {e}", self.owner, v.gsi);
            }
            self.router.release(v.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let r = default_routes();
        // 24 IOAPIC pins plus 16 PIC pins.
        assert_eq!(r.len(), 40);
        let pic: Vec<(u32, u32, u32)> = r
            .iter()
            .filter(|e| {
                // SAFETY: every entry of the default table is an irqchip route.
                let chip = unsafe { e.u.irqchip.irqchip };
                chip != KVM_IRQCHIP_IOAPIC
            })
            // SAFETY: as above.
            .map(|e| unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert_eq!(pic[0], (0, KVM_IRQCHIP_PIC_MASTER, 0));
        assert_eq!(pic[9], (9, KVM_IRQCHIP_PIC_SLAVE, 1));
        assert_eq!(pic.len(), 16);
    }

    #[test]
    fn msi_routes_on_a_real_vm() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("create vm"));
        vm.create_irq_chip().expect("irqchip");
        let router = GsiRouter::new(vm);
        let a = KvmMsiRoutes::new(router.clone(), "a".into());
        let b = KvmMsiRoutes::new(router.clone(), "b".into());
        let m = MsiMessage { addr: 0xfee0_0000, data: 0x41 };
        a.set_route(0, Some(m)).expect("route a0");
        a.set_route(1, Some(MsiMessage { addr: 0xfee0_0000, data: 0x42 })).expect("route a1");
        b.set_route(0, Some(MsiMessage { addr: 0xfee0_0000, data: 0x43 })).expect("route b0");
        let (ga0, ga1, gb0) = (a.gsi(0).expect("a0"), a.gsi(1).expect("a1"), b.gsi(0).expect("b0"));
        assert!(ga0 >= FIRST_MSI_GSI && ga0 != ga1 && ga1 != gb0 && ga0 != gb0);
        assert_eq!(router.msi_routes().len(), 3);
        // Masking keeps the GSI, drops the route.
        a.set_route(1, None).expect("mask");
        assert_eq!(a.gsi(1), Some(ga1));
        assert_eq!(router.msi_routes().len(), 2);
        a.trigger(0);
        a.trigger(7); // never routed: ignored
        assert!(a.set_route(MAX_VECTORS, Some(m)).is_err());
        drop(a);
        assert_eq!(router.msi_routes(), vec![(gb0, MsiMessage { addr: 0xfee0_0000, data: 0x43 })]);
        // Freed GSIs are handed out again.
        let c = KvmMsiRoutes::new(router.clone(), "c".into());
        c.set_route(0, Some(m)).expect("route c0");
        assert_eq!(c.gsi(0), Some(ga0));
    }
}
