//! `--net tap=NAME[,mac=52:54:00:..][,romfile=PATH|none][,romsize=BYTES]`, parsed and
//! checked. The same structure is the API's `net` entry (JSON fields `tap`, `mac`, `romfile`,
//! `romsize`).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors in a NIC specification.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("--net '{spec}': {reason}")]
    Bad { spec: String, reason: String },
}

/// Largest option ROM (and `romsize`) a NIC may have.
pub const MAX_ROM_SIZE: u64 = 16 << 20;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_TAP_NAME: usize = 15;

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("MAC '{s}' is not six hex octets separated by ':'"));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!("MAC '{s}': octet '{p}' is not two hex digits"));
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("MAC '{s}': octet '{p}' is not hex"))?;
        }
        if m[0] & 1 != 0 {
            return Err(format!("MAC '{s}' is a multicast address; a NIC needs a unicast one"));
        }
        if m == [0; 6] {
            return Err(format!("MAC '{s}' is all zeros"));
        }
        Ok(Mac(m))
    }
}

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(s: String) -> Result<Mac, String> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

/// Which option ROM a NIC has.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RomChoice {
    /// Debian `ipxe-qemu`'s `efi-virtio.rom`.
    #[default]
    Default,
    /// No ROM (`romfile=none`): BAR 6 reads 0.
    None,
    /// A ROM file (CLI only: the API takes no host paths).
    File(std::path::PathBuf),
    /// An image of the daemon's image directory an API client named: messages name the
    /// image, never its host path, and a symlink there is refused.
    Image { name: String, path: std::path::PathBuf },
}

/// One NIC as asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// The tap interface (created if missing, attached if it exists).
    pub tap: String,
    /// None: snapvisor picks a unique locally administered address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    #[serde(default)]
    pub rom: RomChoice,
    /// Pins the ROM block's size (and its maximum), so a bigger ROM fits a later restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub romsize: Option<u64>,
}

/// Checks an interface name as Linux would take it.
pub fn check_tap_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TAP_NAME {
        return Err(format!("tap name '{name}' must be 1 to {MAX_TAP_NAME} bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("tap name '{name}' is not an interface name"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("tap name '{name}' has '{}'; use letters, digits, '-', '_' and '.'", c.escape_default()));
    }
    Ok(())
}

/// Parses a size: decimal, or hexadecimal with `0x`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    v.map_err(|_| format!("'{s}' is not a size in bytes (decimal or 0x hex)"))
}

/// Checks a `romsize`: a power of two from 4 KiB to [`MAX_ROM_SIZE`].
pub fn check_romsize(size: u64) -> Result<(), String> {
    if !size.is_power_of_two() || !(0x1000..=MAX_ROM_SIZE).contains(&size) {
        return Err(format!("romsize {size:#x} must be a power of two from 0x1000 to {MAX_ROM_SIZE:#x}"));
    }
    Ok(())
}

impl NetSpec {
    /// Checks a spec that came from the API (or anywhere else not through [`parse`]).
    pub fn check(&self) -> Result<(), SpecError> {
        let bad = |reason: String| SpecError::Bad { spec: format!("tap={}", self.tap), reason };
        check_tap_name(&self.tap).map_err(bad)?;
        if let Some(s) = self.romsize {
            check_romsize(s).map_err(bad)?;
            if self.rom == RomChoice::None {
                return Err(bad(format!(
                    "romsize {s:#x} with romfile=none: a NIC without a ROM has no ROM block to size"
                )));
            }
        }
        Ok(())
    }

    /// Parses `tap=NAME[,mac=..][,romfile=PATH|none][,romsize=BYTES]`.
    pub fn parse(spec: &str) -> Result<NetSpec, SpecError> {
        let bad = |reason: String| SpecError::Bad { spec: spec.to_string(), reason };
        let (mut tap, mut mac, mut rom, mut romsize) = (None, None, None, None);
        for part in spec.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| bad(format!("'{part}' is not key=value")))?;
            let dup = |k: &str| bad(format!("'{k}' given twice"));
            match k {
                "tap" => {
                    check_tap_name(v).map_err(bad)?;
                    if tap.replace(v.to_string()).is_some() {
                        return Err(dup(k));
                    }
                }
                "mac" => {
                    if mac.replace(v.parse::<Mac>().map_err(bad)?).is_some() {
                        return Err(dup(k));
                    }
                }
                "romfile" => {
                    let choice = match v {
                        "" => return Err(bad("romfile is empty; say romfile=none for no ROM".into())),
                        "none" => RomChoice::None,
                        p => RomChoice::File(p.into()),
                    };
                    if rom.replace(choice).is_some() {
                        return Err(dup(k));
                    }
                }
                "romsize" => {
                    let s = parse_size(v).map_err(bad)?;
                    check_romsize(s).map_err(bad)?;
                    if romsize.replace(s).is_some() {
                        return Err(dup(k));
                    }
                }
                other => {
                    return Err(bad(format!("unknown key '{other}' (known: tap, mac, romfile, romsize)")));
                }
            }
        }
        let tap = tap.ok_or_else(|| bad("tap=NAME is required".into()))?;
        let spec = NetSpec { tap, mac, rom: rom.unwrap_or_default(), romsize };
        spec.check().map_err(|SpecError::Bad { reason, .. }| bad(reason))?;
        Ok(spec)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let s = NetSpec::parse("tap=tap0,mac=52:54:00:12:34:56,romfile=/x/y.rom,romsize=0x40000").unwrap();
        assert_eq!(s.tap, "tap0");
        assert_eq!(s.mac, Some(Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(s.rom, RomChoice::File("/x/y.rom".into()));
        assert_eq!(s.romsize, Some(0x40000));
        let s = NetSpec::parse("tap=t,romfile=none").unwrap();
        assert_eq!((s.rom, s.mac, s.romsize), (RomChoice::None, None, None));
        assert_eq!(NetSpec::parse("tap=t").unwrap().rom, RomChoice::Default);
    }

    #[test]
    fn refuses_bad_specs_by_name() {
        for (spec, needle) in [
            ("mac=52:54:00:00:00:01", "tap=NAME is required"),
            ("tap=", "1 to 15"),
            ("tap=abcdefghijklmnop", "1 to 15"),
            ("tap=a/b", "has '/'"),
            ("tap=..", "not an interface"),
            ("tap=t,tap=u", "given twice"),
            ("tap=t,mac=01:00:00:00:00:01", "multicast"),
            ("tap=t,mac=00:00:00:00:00:00", "all zeros"),
            ("tap=t,mac=52:54:00:00:01", "six hex octets"),
            ("tap=t,mac=52:54:00:00:01:zz", "not hex"),
            ("tap=t,romsize=0x3000", "power of two"),
            ("tap=t,romsize=0x2000000", "power of two"),
            ("tap=t,romsize=big", "not a size"),
            ("tap=t,romfile=", "romfile=none"),
            ("tap=t,queues=2", "unknown key 'queues'"),
            ("tap=t,x", "not key=value"),
            ("tap=t,romfile=none,romsize=0x1000", "romfile=none"),
        ] {
            let e = NetSpec::parse(spec).expect_err(spec).to_string();
            assert!(e.contains(needle), "{spec}: {e}");
            assert!(e.contains(spec), "{spec}: {e}");
        }
    }

    #[test]
    fn json_round_trip_checks_the_mac() {
        let s = NetSpec::parse("tap=t,mac=52:54:00:aa:bb:cc,romsize=0x20000").unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<NetSpec>(&j).unwrap(), s);
        let bad = r#"{"tap":"t","mac":"ff:ff:ff:ff:ff:ff"}"#;
        assert!(serde_json::from_str::<NetSpec>(bad).unwrap_err().to_string().contains("multicast"));
    }
}
