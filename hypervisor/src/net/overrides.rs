//! Network overrides for restores and clones through the API, after Firecracker's
//! `network_overrides`: each names one NIC of the snapshot, by index (`"nic": 0`) or by the tap
//! it was on (`"tap": "tap0"`), and gives it a new tap (`"new_tap"`), MAC (`"mac"`), option ROM
//! (`"romfile"`: an image name or `"none"`, resolved by the daemon into [`NetOverride::rom`])
//! and/or pinned ROM size (`"romsize"`): the ROM options are how an API restore answers the
//! ROM restore checks' fixes, as `restore --net tap=..,romsize=..` does on the command line.
//! NICs no override names keep their tap; their MAC follows the restore's rule (a clone gets a
//! new one, a plain restore keeps it).

use serde::{Deserialize, Serialize};

use super::spec::check_tap_name;
use super::{Mac, NetSpec};

/// One NIC's override.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetOverride {
    /// The NIC's index (PCI order) in the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<usize>,
    /// Or: the tap the NIC was on in the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The tap to put it on instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_tap: Option<String>,
    /// The MAC to give it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    /// The option ROM to build it with: an image name, or `"none"` (the daemon resolves it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub romfile: Option<String>,
    /// The ROM block size to pin it to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub romsize: Option<u64>,
    /// `romfile` resolved (never from JSON).
    #[serde(skip)]
    pub rom: Option<super::RomChoice>,
}

/// `overrides` applied to the snapshot's NICs `saved`. The result has a MAC only where the
/// snapshot had one and the override sets none (the caller decides whether to keep it) or the
/// override sets one; [`OverrideOutcome::mac_given`] says which NICs got theirs from an
/// override.
#[derive(Debug, PartialEq, Eq)]
pub struct OverrideOutcome {
    pub nics: Vec<NetSpec>,
    pub mac_given: Vec<bool>,
}

/// Applies `overrides` (untrusted) to `saved`; errors name the override and what is wrong.
pub fn apply(saved: &[NetSpec], overrides: &[NetOverride]) -> Result<OverrideOutcome, String> {
    let mut nics = saved.to_vec();
    let mut mac_given = vec![false; saved.len()];
    let mut seen = vec![false; saved.len()];
    for (k, o) in overrides.iter().enumerate() {
        let what = format!("network_overrides[{k}]");
        let index = match (o.nic, &o.tap) {
            (Some(i), None) if i < saved.len() => i,
            (Some(i), None) => {
                return Err(format!("{what}: NIC {i} does not exist; the snapshot has {} NIC(s)", saved.len()))
            }
            (None, Some(t)) => saved.iter().position(|s| &s.tap == t).ok_or_else(|| {
                let taps: Vec<&str> = saved.iter().map(|s| s.tap.as_str()).collect();
                format!("{what}: no NIC of the snapshot is on tap '{t}' (its taps: {})", taps.join(", "))
            })?,
            _ => return Err(format!("{what}: name the NIC by exactly one of \"nic\" (its index) and \"tap\"")),
        };
        if std::mem::replace(&mut seen[index], true) {
            return Err(format!("{what}: NIC {index} is overridden twice"));
        }
        if o.new_tap.is_none() && o.mac.is_none() && o.rom.is_none() && o.romfile.is_none() && o.romsize.is_none() {
            return Err(format!("{what}: gives none of \"new_tap\", \"mac\", \"romfile\" and \"romsize\""));
        }
        if o.romfile.is_some() && o.rom.is_none() {
            return Err(format!("{what}: romfile was not resolved to an image"));
        }
        if let Some(size) = o.romsize {
            super::spec::check_romsize(size).map_err(|e| format!("{what}: {e}"))?;
            nics[index].romsize = Some(size);
        }
        if let Some(rom) = &o.rom {
            nics[index].rom = rom.clone();
        }
        if let Some(t) = &o.new_tap {
            check_tap_name(t).map_err(|e| format!("{what}: new_tap: {e}"))?;
            nics[index].tap = t.clone();
        }
        if let Some(m) = o.mac {
            nics[index].mac = Some(m);
            mac_given[index] = true;
        }
    }
    Ok(OverrideOutcome { nics, mac_given })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(tap: &str, last: u8) -> NetSpec {
        NetSpec { tap: tap.into(), mac: Some(Mac([0x52, 0x54, 0, 0, 0, last])), rom: Default::default(), romsize: None }
    }

    #[test]
    fn overrides_by_index_and_by_tap() {
        let saved = [nic("a", 1), nic("b", 2)];
        let o: Vec<NetOverride> =
            serde_json::from_str(r#"[{"nic": 1, "new_tap": "b2"}, {"tap": "a", "mac": "52:54:00:00:00:09"}]"#)
                .expect("json");
        let r = apply(&saved, &o).expect("apply");
        assert_eq!(r.nics[0].tap, "a");
        assert_eq!(r.nics[0].mac, Some(Mac([0x52, 0x54, 0, 0, 0, 9])));
        assert_eq!(r.nics[1].tap, "b2");
        assert_eq!(r.mac_given, vec![true, false]);
    }

    #[test]
    fn bad_overrides_are_named() {
        let saved = [nic("a", 1)];
        for (json, needle) in [
            (r#"[{"nic": 3, "new_tap": "x"}]"#, "NIC 3 does not exist"),
            (r#"[{"tap": "zz", "new_tap": "x"}]"#, "no NIC of the snapshot is on tap 'zz'"),
            (r#"[{"nic": 0, "tap": "a", "new_tap": "x"}]"#, "exactly one"),
            (r#"[{"nic": 0}]"#, "gives none of"),
            (r#"[{"nic": 0, "romsize": 12288}]"#, "power of two"),
            (r#"[{"nic": 0, "romfile": "x.rom"}]"#, "not resolved"),
            (r#"[{"nic": 0, "new_tap": "x"}, {"tap": "a", "new_tap": "y"}]"#, "overridden twice"),
            (r#"[{"nic": 0, "new_tap": "a/b"}]"#, "new_tap"),
        ] {
            let o: Vec<NetOverride> = serde_json::from_str(json).expect(json);
            let e = apply(&saved, &o).expect_err(json);
            assert!(e.contains(needle), "{json}: {e}");
        }
        assert!(serde_json::from_str::<Vec<NetOverride>>(r#"[{"nic": 0, "queues": 2}]"#).is_err());
        assert!(serde_json::from_str::<Vec<NetOverride>>(r#"[{"nic": 0, "rom": "none"}]"#).is_err());
    }

    #[test]
    fn rom_overrides_set_the_rom_and_its_size() {
        let saved = [nic("a", 1)];
        let mut o: Vec<NetOverride> =
            serde_json::from_str(r#"[{"nic": 0, "romfile": "none", "romsize": 131072}]"#).expect("json");
        o[0].rom = Some(super::super::RomChoice::None);
        let r = apply(&saved, &o).expect("apply");
        assert_eq!(r.nics[0].rom, super::super::RomChoice::None);
        assert_eq!(r.nics[0].romsize, Some(0x20000));
        assert_eq!(r.mac_given, vec![false]);
    }
}
