//! A stand-in virtio-net device with a scripted peer behind it, for testing the `netping`
//! guest on its own: the modern PCI transport's common and device configuration at the
//! contract's offsets, split virtqueues read from guest memory, and a "host" at 10.77.0.1 with
//! MAC 02:00:00:00:00:01 that answers ARP and ICMP echo requests at once (in the vCPU thread
//! that notifies). Every frame the guest sends is kept for the test to inspect.
//!
//! It trusts the guest (it serves the test's own guest); the real device is `VirtioNet`.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const PEER_IP: [u8; 4] = [10, 77, 0, 1];
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

#[derive(Default, Clone, Copy)]
struct Queue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    enabled: bool,
    next_avail: u16,
    next_used: u16,
}

pub struct MockNet {
    mem: GuestMemoryMmap,
    status: u8,
    dfselect: u32,
    gfselect: u32,
    accepted: [u32; 2],
    qsel: u16,
    queues: [Queue; 2],
    /// Whether the peer answers (ARP and ICMP).
    pub answer: bool,
    /// Every frame the guest sent, without the virtio-net header.
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The Internet checksum of `b` (0 when `b` holds a valid checksum).
pub fn csum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl MockNet {
    pub fn new(mem: GuestMemoryMmap) -> MockNet {
        MockNet {
            mem,
            status: 0,
            dfselect: 0,
            gfselect: 0,
            accepted: [0; 2],
            qsel: 0,
            queues: [Queue::default(); 2],
            answer: true,
            sent: Arc::default(),
        }
    }

    fn u16_at(&self, a: u64) -> u16 {
        self.mem.read_obj(GuestAddress(a)).expect("guest memory")
    }

    fn set_u16(&self, a: u64, v: u16) {
        self.mem.write_obj(v, GuestAddress(a)).expect("guest memory");
    }

    /// Takes the transmit queue's new chains.
    fn transmit(&mut self) {
        let q = self.queues[1];
        if !q.enabled {
            return;
        }
        let mut next = q.next_avail;
        let mut used = q.next_used;
        while next != self.u16_at(q.avail + 2) {
            let head = self.u16_at(q.avail + 4 + 2 * u64::from(next % q.size));
            let mut bytes = Vec::new();
            let mut i = head;
            for _ in 0..q.size {
                let d = q.desc + 16 * u64::from(i);
                let addr: u64 = self.mem.read_obj(GuestAddress(d)).expect("desc");
                let len: u32 = self.mem.read_obj(GuestAddress(d + 8)).expect("desc");
                let flags = self.u16_at(d + 12);
                // netping --mode evil posts buffers outside RAM: leave those out.
                let mut buf = vec![0u8; len.min(65536) as usize];
                if self.mem.read_slice(&mut buf, GuestAddress(addr)).is_ok() {
                    bytes.extend(buf);
                }
                if flags & 1 == 0 {
                    break;
                }
                i = self.u16_at(d + 14);
            }
            let ue = q.used + 4 + 8 * u64::from(used % q.size);
            self.mem.write_obj(u32::from(head), GuestAddress(ue)).expect("used");
            self.mem.write_obj(0u32, GuestAddress(ue + 4)).expect("used");
            used = used.wrapping_add(1);
            self.set_u16(q.used + 2, used);
            next = next.wrapping_add(1);
            let frame = bytes.get(12..).unwrap_or_default().to_vec();
            let replies = if self.answer { answer(&frame) } else { vec![] };
            self.sent.lock().expect("lock").push(frame);
            for r in replies {
                self.receive(&r);
            }
        }
        self.queues[1].next_avail = next;
        self.queues[1].next_used = used;
    }

    /// Puts `frame` in the guest's next receive buffer; false if it has none.
    pub fn receive(&mut self, frame: &[u8]) -> bool {
        let q = self.queues[0];
        if !q.enabled || q.next_avail == self.u16_at(q.avail + 2) {
            return false;
        }
        let head = self.u16_at(q.avail + 4 + 2 * u64::from(q.next_avail % q.size));
        let d = q.desc + 16 * u64::from(head);
        let addr: u64 = self.mem.read_obj(GuestAddress(d)).expect("desc");
        let mut bytes = vec![0u8; 12];
        bytes.extend_from_slice(frame);
        self.mem.write_slice(&bytes, GuestAddress(addr)).expect("rx buffer");
        let ue = q.used + 4 + 8 * u64::from(q.next_used % q.size);
        self.mem.write_obj(u32::from(head), GuestAddress(ue)).expect("used");
        self.mem.write_obj(bytes.len() as u32, GuestAddress(ue + 4)).expect("used");
        self.queues[0].next_avail = q.next_avail.wrapping_add(1);
        self.queues[0].next_used = q.next_used.wrapping_add(1);
        self.set_u16(q.used + 2, self.queues[0].next_used);
        true
    }
}

/// What the peer sends back for `f`: an ARP reply to who-has 10.77.0.1, an echo reply to an
/// echo request to 10.77.0.1 with valid checksums.
fn answer(f: &[u8]) -> Vec<Vec<u8>> {
    if f.len() >= 42 && be16(f, 12) == 0x0806 && be16(f, 20) == 1 && f[38..42] == PEER_IP {
        let mut r = vec![0u8; 60];
        r[0..6].copy_from_slice(&f[6..12]);
        r[6..12].copy_from_slice(&PEER_MAC);
        r[12..22].copy_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        r[22..28].copy_from_slice(&PEER_MAC);
        r[28..32].copy_from_slice(&PEER_IP);
        r[32..42].copy_from_slice(&f[22..32]);
        return vec![r];
    }
    if f.len() >= 42 && be16(f, 12) == 0x0800 && f[23] == 1 && f[30..34] == PEER_IP && f[34] == 8 {
        let total = usize::from(be16(f, 16));
        if csum(&f[14..34]) != 0 || 14 + total > f.len() || csum(&f[34..14 + total]) != 0 {
            return vec![];
        }
        let mut r = f[..14 + total].to_vec();
        r[0..6].copy_from_slice(&f[6..12]);
        r[6..12].copy_from_slice(&PEER_MAC);
        r[26..30].copy_from_slice(&f[30..34]);
        r[30..34].copy_from_slice(&f[26..30]);
        r[24..26].fill(0);
        let c = csum(&r[14..34]);
        r[24..26].copy_from_slice(&c.to_be_bytes());
        r[34] = 0;
        r[36..38].fill(0);
        let c = csum(&r[34..]);
        r[36..38].copy_from_slice(&c.to_be_bytes());
        return vec![r];
    }
    vec![]
}

impl devices::bus::BusDevice for MockNet {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let q = self.queues[usize::from(self.qsel.min(1))];
        let v: u64 = match offset {
            0x04 => match self.dfselect {
                0 => 1 << 5,
                1 => 1,
                _ => 0,
            },
            0x12 => 2,
            0x14 => u64::from(self.status),
            0x16 => u64::from(self.qsel),
            0x18 => u64::from(if q.size == 0 { 256 } else { q.size }),
            0x1a => 0xffff,
            0x1c => u64::from(q.enabled),
            0x1e => u64::from(self.qsel),
            0x2000..=0x2005 => u64::from(GUEST_MAC[(offset - 0x2000) as usize]),
            0x2006 => 1,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let qi = usize::from(self.qsel.min(1));
        let set_half = |old: u64, hi: bool| {
            if hi {
                (old & 0xffff_ffff) | (v << 32)
            } else {
                (old & !0xffff_ffff) | (v & 0xffff_ffff)
            }
        };
        match offset {
            0x00 => self.dfselect = v as u32,
            0x08 => self.gfselect = v as u32,
            0x0c => self.accepted[self.gfselect.min(1) as usize] = v as u32,
            0x14 => {
                self.status = v as u8;
                if v == 0 {
                    self.queues = [Queue::default(); 2];
                    self.accepted = [0; 2];
                }
            }
            0x16 => self.qsel = v as u16,
            0x18 => self.queues[qi].size = v as u16,
            0x1c => self.queues[qi].enabled = v != 0,
            0x20 | 0x24 => self.queues[qi].desc = set_half(self.queues[qi].desc, offset == 0x24),
            0x28 | 0x2c => self.queues[qi].avail = set_half(self.queues[qi].avail, offset == 0x2c),
            0x30 | 0x34 => self.queues[qi].used = set_half(self.queues[qi].used, offset == 0x34),
            0x3004 => self.transmit(),
            _ => {}
        }
    }
}

/// Adds a mock NIC to `vm` at NIC 0's virtio BAR; returns it.
pub fn attach(vm: &hypervisor::vm::Vm) -> Arc<Mutex<MockNet>> {
    let dev = Arc::new(Mutex::new(MockNet::new(vm.ram().memory().clone())));
    let (_, bar) = hypervisor::net::builtin_bars(0);
    vm.add_device("mock virtio-net", dev.clone(), hypervisor::machine::BusKind::Mmio, bar, 0x4000)
        .expect("place the mock NIC");
    dev
}
