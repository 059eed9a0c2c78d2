//! virtio-net feature bits (virtio 1.x, 5.1.3) and how they map onto the tap's offloads.
//!
//! The guest's receive offloads (`GUEST_*`) say what the device may hand the guest: they
//! become the tap's `TUNSETOFFLOAD` flags, and are offered only when the tap takes them. The
//! transmit offloads (`HOST_*`, `CSUM`) say what the guest may send: the tap accepts GSO and
//! partial-checksum frames from its vnet header, so they are offered as the tap allows.

use crate::net::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};

pub const CSUM: u64 = 1 << 0;
pub const GUEST_CSUM: u64 = 1 << 1;
pub const MTU: u64 = 1 << 3;
pub const MAC: u64 = 1 << 5;
pub const GUEST_TSO4: u64 = 1 << 7;
pub const GUEST_TSO6: u64 = 1 << 8;
pub const GUEST_ECN: u64 = 1 << 9;
pub const GUEST_UFO: u64 = 1 << 10;
pub const HOST_TSO4: u64 = 1 << 11;
pub const HOST_TSO6: u64 = 1 << 12;
pub const HOST_ECN: u64 = 1 << 13;
pub const HOST_UFO: u64 = 1 << 14;
pub const MRG_RXBUF: u64 = 1 << 15;
pub const STATUS: u64 = 1 << 16;
pub const VERSION_1: u64 = 1 << 32;

/// The features offered with a backend that takes the `TUN_F_*` offloads `tun`.
pub fn offered(tun: u32) -> u64 {
    let mut f = MAC | STATUS | VERSION_1 | MRG_RXBUF | CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN;
    if tun & TUN_F_UFO != 0 {
        f |= HOST_UFO;
    }
    if tun & TUN_F_CSUM != 0 {
        f |= GUEST_CSUM;
        for (t, g) in
            [(TUN_F_TSO4, GUEST_TSO4), (TUN_F_TSO6, GUEST_TSO6), (TUN_F_TSO_ECN, GUEST_ECN), (TUN_F_UFO, GUEST_UFO)]
        {
            if tun & t != 0 {
                f |= g;
            }
        }
    }
    f
}

/// The tap offloads for the features a driver accepted.
pub fn tun_offloads(driver: u64) -> u32 {
    if driver & GUEST_CSUM == 0 {
        return 0;
    }
    let mut t = TUN_F_CSUM;
    for (g, f) in
        [(GUEST_TSO4, TUN_F_TSO4), (GUEST_TSO6, TUN_F_TSO6), (GUEST_ECN, TUN_F_TSO_ECN), (GUEST_UFO, TUN_F_UFO)]
    {
        if driver & g != 0 {
            t |= f;
        }
    }
    t
}
