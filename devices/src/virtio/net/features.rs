//! virtio-net feature bits (virtio 1.x, 5.1.3) and how they map onto the tap's offloads.
//!
//! The guest's receive offloads (`GUEST_*`) say what the device may hand the guest: they
//! become the tap's `TUNSETOFFLOAD` flags, and are offered only when the tap takes them. The
//! transmit offloads (`HOST_*`, `CSUM`) say what the guest may send: the tap accepts GSO and
//! partial-checksum frames from its vnet header, so they are offered as the tap allows.
//!
//! # Dependencies (virtio 1.x, 5.1.3.1)
//!
//! Some features only make sense with others: the spec says the driver MUST NOT accept a
//! feature without the ones it requires, and a device may refuse such a set. [`check`] holds
//! the spec's whole list (also the control-queue features this device never offers, so a
//! later offer cannot forget its rule), and `VERSION_1`, which this modern-only transport
//! requires. At FEATURES_OK the device checks what the driver accepted: a set that breaks a
//! rule does not get FEATURES_OK (the driver reads the bit back clear, as the spec's 3.1.1
//! says it must check) and a warning names each missing dependency.

use thiserror::Error;

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
pub const CTRL_VQ: u64 = 1 << 17;
pub const CTRL_RX: u64 = 1 << 18;
pub const CTRL_VLAN: u64 = 1 << 19;
pub const GUEST_ANNOUNCE: u64 = 1 << 21;
pub const MQ: u64 = 1 << 22;
pub const CTRL_MAC_ADDR: u64 = 1 << 23;
pub const VERSION_1: u64 = 1 << 32;
pub const VQ_NOTF_COAL: u64 = 1 << 52;
pub const NOTF_COAL: u64 = 1 << 53;
pub const GUEST_USO4: u64 = 1 << 54;
pub const GUEST_USO6: u64 = 1 << 55;
pub const HOST_USO: u64 = 1 << 56;
pub const HASH_REPORT: u64 = 1 << 57;
pub const RSS: u64 = 1 << 60;
pub const RSC_EXT: u64 = 1 << 61;

/// A rule of 5.1.3.1: `feature` needs at least one of `needs` (names for messages).
struct Rule {
    feature: (u64, &'static str),
    needs: &'static [(u64, &'static str)],
}

const fn rule(feature: (u64, &'static str), needs: &'static [(u64, &'static str)]) -> Rule {
    Rule { feature, needs }
}

const F_CSUM: (u64, &str) = (CSUM, "CSUM");
const F_GUEST_CSUM: (u64, &str) = (GUEST_CSUM, "GUEST_CSUM");
const F_GUEST_TSO4: (u64, &str) = (GUEST_TSO4, "GUEST_TSO4");
const F_GUEST_TSO6: (u64, &str) = (GUEST_TSO6, "GUEST_TSO6");
const F_HOST_TSO4: (u64, &str) = (HOST_TSO4, "HOST_TSO4");
const F_HOST_TSO6: (u64, &str) = (HOST_TSO6, "HOST_TSO6");
const F_CTRL_VQ: (u64, &str) = (CTRL_VQ, "CTRL_VQ");

/// The feature requirements of virtio 1.2/1.3, 5.1.3.1, in the spec's order.
const RULES: &[Rule] = &[
    rule(F_GUEST_TSO4, &[F_GUEST_CSUM]),
    rule(F_GUEST_TSO6, &[F_GUEST_CSUM]),
    rule((GUEST_ECN, "GUEST_ECN"), &[F_GUEST_TSO4, F_GUEST_TSO6]),
    rule((GUEST_UFO, "GUEST_UFO"), &[F_GUEST_CSUM]),
    rule((GUEST_USO4, "GUEST_USO4"), &[F_GUEST_CSUM]),
    rule((GUEST_USO6, "GUEST_USO6"), &[F_GUEST_CSUM]),
    rule(F_HOST_TSO4, &[F_CSUM]),
    rule(F_HOST_TSO6, &[F_CSUM]),
    rule((HOST_ECN, "HOST_ECN"), &[F_HOST_TSO4, F_HOST_TSO6]),
    rule((HOST_UFO, "HOST_UFO"), &[F_CSUM]),
    rule((HOST_USO, "HOST_USO"), &[F_CSUM]),
    rule((CTRL_RX, "CTRL_RX"), &[F_CTRL_VQ]),
    rule((CTRL_VLAN, "CTRL_VLAN"), &[F_CTRL_VQ]),
    rule((GUEST_ANNOUNCE, "GUEST_ANNOUNCE"), &[F_CTRL_VQ]),
    rule((MQ, "MQ"), &[F_CTRL_VQ]),
    rule((CTRL_MAC_ADDR, "CTRL_MAC_ADDR"), &[F_CTRL_VQ]),
    rule((NOTF_COAL, "NOTF_COAL"), &[F_CTRL_VQ]),
    rule((VQ_NOTF_COAL, "VQ_NOTF_COAL"), &[F_CTRL_VQ]),
    rule((RSC_EXT, "RSC_EXT"), &[F_HOST_TSO4, F_HOST_TSO6]),
    rule((RSS, "RSS"), &[F_CTRL_VQ]),
    rule((HASH_REPORT, "HASH_REPORT"), &[F_CTRL_VQ]),
];

/// A feature set a driver may not accept.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FeatureError {
    #[error("features {features:#x}: VERSION_1 (bit 32) is not accepted; this modern-only device requires it")]
    NoVersion1 { features: u64 },
    #[error("features {features:#x}: {}", missing.join("; "))]
    Missing { features: u64, missing: Vec<String> },
}

/// Checks a driver's accepted `features` against 5.1.3.1 and VERSION_1; the error lists every
/// feature whose dependency is missing (`GUEST_ECN (bit 9) needs GUEST_TSO4 or GUEST_TSO6`).
pub fn check(features: u64) -> Result<(), FeatureError> {
    if features & VERSION_1 == 0 {
        return Err(FeatureError::NoVersion1 { features });
    }
    let missing: Vec<String> = RULES
        .iter()
        .filter(|r| features & r.feature.0 != 0 && r.needs.iter().all(|n| features & n.0 == 0))
        .map(|r| {
            let needs: Vec<&str> = r.needs.iter().map(|n| n.1).collect();
            format!("{} (bit {}) needs {}", r.feature.1, r.feature.0.trailing_zeros(), needs.join(" or "))
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(FeatureError::Missing { features, missing })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid base every test adds to.
    const BASE: u64 = VERSION_1 | MAC | STATUS | MRG_RXBUF;

    #[test]
    fn every_rule_refuses_its_feature_alone_and_accepts_it_with_each_dependency() {
        assert_eq!(check(BASE), Ok(()));
        for r in RULES {
            let e = check(BASE | r.feature.0).expect_err(r.feature.1).to_string();
            let needs: Vec<&str> = r.needs.iter().map(|n| n.1).collect();
            let want = format!("{} (bit {}) needs {}", r.feature.1, r.feature.0.trailing_zeros(), needs.join(" or "));
            assert!(e.contains(&want), "{e}");
            for n in r.needs {
                // A dependency may itself need one (GUEST_ECN -> GUEST_TSO4 -> GUEST_CSUM).
                let deps = RULES.iter().find(|d| d.feature.0 == n.0).map_or(0, |d| d.needs[0].0);
                assert_eq!(check(BASE | r.feature.0 | n.0 | deps), Ok(()), "{} with {}", r.feature.1, n.1);
            }
        }
    }

    #[test]
    fn the_rules_the_issue_names() {
        for (f, e) in [
            (GUEST_TSO4, "GUEST_TSO4 (bit 7) needs GUEST_CSUM"),
            (GUEST_TSO6, "GUEST_TSO6 (bit 8) needs GUEST_CSUM"),
            (GUEST_UFO, "GUEST_UFO (bit 10) needs GUEST_CSUM"),
            (GUEST_CSUM | GUEST_ECN, "GUEST_ECN (bit 9) needs GUEST_TSO4 or GUEST_TSO6"),
            (HOST_TSO4, "HOST_TSO4 (bit 11) needs CSUM"),
            (HOST_TSO6, "HOST_TSO6 (bit 12) needs CSUM"),
            (HOST_UFO, "HOST_UFO (bit 14) needs CSUM"),
            (CSUM | HOST_ECN, "HOST_ECN (bit 13) needs HOST_TSO4 or HOST_TSO6"),
            (MQ, "MQ (bit 22) needs CTRL_VQ"),
        ] {
            let got = check(BASE | f).expect_err(e).to_string();
            assert!(got.contains(e), "{got}");
        }
        assert_eq!(check(BASE | GUEST_CSUM | GUEST_TSO6 | GUEST_ECN), Ok(()));
        assert_eq!(check(BASE | CSUM | HOST_TSO4 | HOST_ECN | HOST_UFO), Ok(()));
    }

    #[test]
    fn every_missing_dependency_is_named_and_version_1_is_required() {
        let e = check(BASE | GUEST_TSO4 | HOST_TSO6).expect_err("two missing").to_string();
        assert!(e.contains("GUEST_TSO4 (bit 7) needs GUEST_CSUM; HOST_TSO6 (bit 12) needs CSUM"), "{e}");
        assert_eq!(check(MAC), Err(FeatureError::NoVersion1 { features: MAC }));
        assert!(check(MAC).expect_err("v1").to_string().contains("VERSION_1 (bit 32)"));
        // Everything this device offers, with a tap that takes every offload, is consistent.
        let all = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;
        assert_eq!(check(offered(all)), Ok(()));
        assert_eq!(check(offered(0)), Ok(()));
    }

    #[test]
    fn a_driver_accepting_an_invalid_set_reads_features_ok_back_clear() {
        use super::super::core::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK};
        use super::super::test_util::rig_with;
        let all = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;
        for (accepted, sticks) in [
            (BASE | GUEST_TSO4, false),
            (BASE | GUEST_CSUM | GUEST_ECN, false),
            (BASE | HOST_UFO, false),
            (BASE | CSUM | HOST_ECN, false),
            (BASE | GUEST_CSUM | GUEST_TSO4 | GUEST_ECN | CSUM | HOST_TSO6 | HOST_ECN, true),
        ] {
            let r = rig_with(all);
            r.w8(0x14, 0);
            let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
            r.w8(0x14, s);
            for sel in 0..2u32 {
                r.w32(0x08, sel);
                r.w32(0x0c, (accepted >> (32 * sel)) as u32);
            }
            r.w8(0x14, s | STATUS_FEATURES_OK);
            let want = if sticks { s | STATUS_FEATURES_OK } else { s };
            assert_eq!(r.status(), want, "features {accepted:#x}");
        }
    }
}
