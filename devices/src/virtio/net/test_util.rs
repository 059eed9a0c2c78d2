//! A fake backend, fake MSI routes, and a driver for the device's unit tests.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use migrate::ram::{GuestMemory, RamBlock, RamBlockConfig, RamRegistry, TrackedMemory};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::core::*;
use super::features::*;
use super::{NetConfig, VirtioNet};
use crate::net::NetBackend;
use crate::pci::PciDevice;
use crate::virtio::{MsiMessage, MsiRoutes, COMMON_OFFSET, MODERN_BAR, MSIX_BAR, NOTIFY_OFFSET};

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const MAC_ADDR: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const RAM: u64 = 0x40_0000;
/// Where the tests' queues live (see [`layout`]).
pub const RXQ: u64 = 0x1_0000;
pub const TXQ: u64 = 0x4_0000;
/// Buffers from here.
pub const BUF: u64 = 0x10_0000;

/// Frames in and out, and the offloads set, shared with the test.
#[derive(Default)]
pub struct FakeShared {
    pub rx: Mutex<VecDeque<Vec<u8>>>,
    pub tx: Mutex<Vec<Vec<u8>>>,
    pub offloads: Mutex<Vec<u32>>,
    /// While set, writes fail with this errno (a full or vanished tap).
    pub refuse_tx: Mutex<Option<i32>>,
    /// The entry lengths of every scattered read (`read_frame_iov`), in order.
    pub iov_reads: Mutex<Vec<Vec<usize>>>,
    /// Called at every read, its results kept in `probed` (what the guest could see then).
    #[allow(clippy::type_complexity)]
    pub probe: Mutex<Option<Box<dyn Fn() -> u16 + Send>>>,
    pub probed: Mutex<Vec<u16>>,
    evt: Mutex<Option<Arc<EventFd>>>,
}

impl FakeShared {
    /// A frame the "network" sends to the guest.
    pub fn push_rx(&self, frame: Vec<u8>) {
        self.rx.lock().expect("lock").push_back(frame);
        if let Some(e) = &*self.evt.lock().expect("lock") {
            e.write(1).expect("eventfd");
        }
    }
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.tx.lock().expect("lock").clone()
    }
}

pub struct FakeBackend {
    shared: Arc<FakeShared>,
    evt: Arc<EventFd>,
    offloads: u32,
}

impl FakeBackend {
    pub fn new(offloads: u32) -> (FakeBackend, Arc<FakeShared>) {
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let shared = Arc::new(FakeShared::default());
        *shared.evt.lock().expect("lock") = Some(evt.clone());
        (FakeBackend { shared: shared.clone(), evt, offloads }, shared)
    }
}

impl NetBackend for FakeBackend {
    unsafe fn read_frame_iov(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.shared.iov_reads.lock().expect("lock").push(iov.iter().map(|v| v.iov_len).collect());
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut scratch = vec![0u8; total.min(1 << 17)];
        let n = self.read_frame(&mut scratch)?;
        let mut at = 0;
        for v in iov {
            let k = v.iov_len.min(n - at);
            // SAFETY: the caller guarantees each entry is valid for writes of its length;
            // `scratch[at..at + k]` is inside `scratch`.
            unsafe { std::ptr::copy_nonoverlapping(scratch.as_ptr().add(at), v.iov_base.cast::<u8>(), k) };
            at += k;
        }
        Ok(n)
    }
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(p) = &*self.shared.probe.lock().expect("lock") {
            self.shared.probed.lock().expect("lock").push(p());
        }
        let mut rx = self.shared.rx.lock().expect("lock");
        let Some(f) = rx.pop_front() else {
            let _ = self.evt.read();
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if rx.is_empty() {
            let _ = self.evt.read();
        }
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if let Some(errno) = *self.shared.refuse_tx.lock().expect("lock") {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.shared.tx.lock().expect("lock").push(frame.to_vec());
        Ok(())
    }
    fn supported_offloads(&self) -> u32 {
        self.offloads
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.shared.offloads.lock().expect("lock").push(flags);
        Ok(())
    }
    fn poll_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
    fn name(&self) -> String {
        "fake".into()
    }
}

/// MSI routes that record what the device asked for.
#[derive(Default)]
pub struct FakeRoutes {
    pub routes: Mutex<HashMap<u16, Option<MsiMessage>>>,
    pub triggered: Mutex<Vec<u16>>,
    /// Times the interrupt line was raised (MSI-X disabled).
    pub lines: std::sync::atomic::AtomicU64,
}

impl MsiRoutes for FakeRoutes {
    fn set_route(&self, index: u16, msg: Option<MsiMessage>) -> Result<(), String> {
        self.routes.lock().expect("lock").insert(index, msg);
        Ok(())
    }
    fn trigger(&self, index: u16) {
        self.triggered.lock().expect("lock").push(index);
    }
    fn raise_line(&self) {
        self.lines.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl FakeRoutes {
    pub fn take(&self) -> Vec<u16> {
        std::mem::take(&mut *self.triggered.lock().expect("lock"))
    }
}

/// A device on 4 MiB of guest RAM with a fake backend.
pub struct Rig {
    pub dev: VirtioNet,
    pub block: Arc<RamBlock>,
    pub mem: TrackedMemory,
    pub net: Arc<FakeShared>,
    pub routes: Arc<FakeRoutes>,
}

pub fn rig() -> Rig {
    rig_with(0x1f)
}

pub fn rig_with(offloads: u32) -> Rig {
    let reg = RamRegistry::new();
    let block = reg
        .add(RamBlockConfig { idstr: "pc.ram".into(), size: RAM, max_size: RAM, page_size: 0, resizeable: false })
        .expect("block");
    let gm = GuestMemory::flat(block.clone());
    let mem = gm.tracked().expect("view");
    let (backend, net) = FakeBackend::new(offloads);
    let routes = Arc::new(FakeRoutes::default());
    let dev = VirtioNet::build(NetConfig {
        mac: MAC_ADDR,
        backend: Box::new(backend),
        mem: gm,
        msi: routes.clone(),
        rom: None,
    })
    .expect("device");
    Rig { dev, block, mem, net, routes }
}

impl Rig {
    pub fn bar_w(&self, bar: usize, off: u64, data: &[u8]) {
        let d = self.dev.bar_device(bar).expect("bar");
        d.lock().expect("lock").write(0, off, data);
    }
    pub fn bar_r(&self, bar: usize, off: u64, len: usize) -> u64 {
        let d = self.dev.bar_device(bar).expect("bar");
        let mut b = [0u8; 8];
        d.lock().expect("lock").read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    pub fn w8(&self, off: u64, v: u8) {
        self.bar_w(MODERN_BAR, COMMON_OFFSET + off, &[v]);
    }
    pub fn w16(&self, off: u64, v: u16) {
        self.bar_w(MODERN_BAR, COMMON_OFFSET + off, &v.to_le_bytes());
    }
    pub fn w32(&self, off: u64, v: u32) {
        self.bar_w(MODERN_BAR, COMMON_OFFSET + off, &v.to_le_bytes());
    }
    pub fn r(&self, off: u64, len: usize) -> u64 {
        self.bar_r(MODERN_BAR, COMMON_OFFSET + off, len)
    }
    pub fn status(&self) -> u8 {
        self.r(0x14, 1) as u8
    }

    /// Programs queue `q` (size, rings at `base`: see [`layout`]), vector `vector`, enables it.
    pub fn setup_queue(&self, q: u16, base: u64, size: u16, vector: u16) {
        self.w16(0x16, q);
        self.w16(0x18, size);
        let (d, a, u) = layout(base);
        for (off, addr) in [(0x20, d), (0x28, a), (0x30, u)] {
            self.w32(off, addr as u32);
            self.w32(off + 4, (addr >> 32) as u32);
        }
        self.w16(0x1a, vector);
        self.w16(0x1c, 1);
    }

    /// The Linux-style init: reset, ACK, DRIVER, features, FEATURES_OK, queues, DRIVER_OK.
    pub fn init(&self, features: u64) {
        self.w8(0x14, 0);
        assert_eq!(self.status(), 0);
        self.w8(0x14, STATUS_ACKNOWLEDGE);
        self.w8(0x14, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for sel in 0..2u32 {
            self.w32(0x00, sel);
            let offered = self.r(0x04, 4) << (32 * sel);
            self.w32(0x08, sel);
            self.w32(0x0c, ((features & offered) >> (32 * sel)) as u32);
        }
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.w8(0x14, s);
        assert_eq!(self.status(), s, "FEATURES_OK sticks");
        assert_eq!(self.mac_read(), MAC_ADDR);
        self.w16(0x10, 0);
        self.setup_queue(0, RXQ, 256, 1);
        self.setup_queue(1, TXQ, 256, 2);
        self.w8(0x14, s | STATUS_DRIVER_OK);
    }

    /// Reads the MAC from the device configuration, a byte at a time.
    pub fn mac_read(&self) -> [u8; 6] {
        let mut m = [0u8; 6];
        for (i, b) in m.iter_mut().enumerate() {
            *b = self.bar_r(MODERN_BAR, crate::virtio::DEVICE_CFG_OFFSET + i as u64, 1) as u8;
        }
        m
    }

    /// Enables MSI-X in the capability and unmasks vectors 0..3 with messages 0xfee00000 / i.
    pub fn enable_msix(&mut self) {
        for i in 0..3u64 {
            self.bar_w(MSIX_BAR, 16 * i, &0xfee0_0000u32.to_le_bytes());
            self.bar_w(MSIX_BAR, 16 * i + 8, &(0x40 + i as u32).to_le_bytes());
            self.bar_w(MSIX_BAR, 16 * i + 12, &0u32.to_le_bytes());
        }
        let cap = self.dev.msix_cap;
        self.dev.write_config(cap + 2, &(0x8000u16 | 2).to_le_bytes());
    }

    pub fn notify(&self, q: u64) {
        self.bar_w(MODERN_BAR, NOTIFY_OFFSET + 4 * q, &(q as u16).to_le_bytes());
    }

    pub fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.dev.core.lock().expect("lock")
    }

    /// Used ring: (idx, entries).
    pub fn used(&self, base: u64) -> (u16, Vec<(u32, u32)>) {
        let (_, _, u) = layout(base);
        let idx: u16 = self.mem.read_obj(GuestAddress(u + 2)).expect("used idx");
        let mut e = Vec::new();
        for i in 0..idx {
            let id: u32 = self.mem.read_obj(GuestAddress(u + 4 + 8 * u64::from(i))).expect("id");
            let len: u32 = self.mem.read_obj(GuestAddress(u + 8 + 8 * u64::from(i))).expect("len");
            e.push((id, len));
        }
        (idx, e)
    }

    /// Puts descriptors (addr, len, flags, next) into the table of the queue at `base` from
    /// index `at` (with virtio-queue's mock descriptor table) and makes each chain available
    /// (a chain starts at the first descriptor and after each one without NEXT).
    pub fn add(&self, base: u64, descs: &[(u64, u32, u16, u16)], at: u16) {
        let (d, a, _) = layout(base);
        let table = virtio_queue::mock::DescriptorTable::new(&self.mem, GuestAddress(d), 256);
        let mut idx: u16 = self.mem.read_obj(GuestAddress(a + 2)).expect("avail idx");
        let mut starts_chain = true;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let ti = at + i as u16;
            table.store(ti, RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))).expect("desc");
            if starts_chain {
                self.mem.write_obj(ti, GuestAddress(a + 4 + 2 * u64::from(idx % 256))).expect("ring");
                idx = idx.wrapping_add(1);
            }
            starts_chain = flags & NEXT == 0;
        }
        self.mem.write_obj(idx, GuestAddress(a + 2)).expect("avail idx");
    }

    /// Sets the available ring's index (a driver that lies).
    pub fn set_avail_idx(&self, base: u64, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(layout(base).1 + 2)).expect("avail idx");
    }

    /// Sets the available ring's flags.
    pub fn set_avail_flags(&self, base: u64, flags: u16) {
        self.mem.write_obj(flags, GuestAddress(layout(base).1)).expect("avail flags");
    }
}

/// Where a test queue's rings are: descriptor table at `base`, available ring at +0x1000,
/// used ring at +0x2000.
pub fn layout(base: u64) -> (u64, u64, u64) {
    (base, base + 0x1000, base + 0x2000)
}

/// All features a Linux guest would take.
pub const ALL: u64 = VERSION_1 | MAC | STATUS | MRG_RXBUF | CSUM | GUEST_CSUM | GUEST_TSO4 | HOST_TSO4;

/// A frame of `len` bytes after a 12-byte header whose first byte is `flags`.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}
