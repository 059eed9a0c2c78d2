//! NICs in the API: the VM definition's `net` list and how it becomes the machine's
//! [`NetSpec`]s.
//!
//! An entry is `{"tap": "tap0", "mac": "52:54:00:12:34:56", "romfile": "efi-virtio.rom",
//! "romsize": 262144}`; only `tap` is required. As everywhere in the API, files are images:
//! `romfile` names an image in the image directory (like `kernel` and `firmware`), or is
//! `"none"` for no ROM; absent, the NIC gets the default ROM. Never a host path.

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::images::ImageDir;
use crate::net::{Mac, NetSpec, RomChoice};

/// `romfile` meaning no option ROM.
pub const ROMFILE_NONE: &str = "none";

/// One NIC of a VM definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiNic {
    pub tap: String,
    /// Absent: the daemon picks a unique locally administered MAC when the VM is built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    /// An image name, or `"none"`; absent: the default ROM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub romfile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub romsize: Option<u64>,
}

impl ApiNic {
    fn spec_with(&self, rom: RomChoice) -> NetSpec {
        NetSpec { tap: self.tap.clone(), mac: self.mac, rom, romsize: self.romsize }
    }

    /// Checks the entry without touching the image directory. Errors name the JSON field
    /// (`net[1].tap: ...`), not the CLI's `--net` syntax.
    pub fn check(&self, index: usize) -> Result<(), String> {
        let field = |f: &str, e: String| format!("net[{index}].{f}: {e}");
        crate::net::spec::check_tap_name(&self.tap).map_err(|e| field("tap", e))?;
        if let Some(size) = self.romsize {
            crate::net::spec::check_romsize(size).map_err(|e| field("romsize", e))?;
            if self.romfile.as_deref() == Some(ROMFILE_NONE) {
                return Err(field(
                    "romsize",
                    format!("{size:#x} with \"romfile\": \"none\": a NIC without a ROM has no ROM block to size"),
                ));
            }
        }
        match self.romfile.as_deref() {
            None | Some(ROMFILE_NONE) => Ok(()),
            Some(name) => super::images::validate_name(name).map_err(|e| field("romfile", e.to_string())),
        }
    }

    /// The machine's spec: `romfile` resolved in the image directory.
    pub fn to_spec(&self, index: usize, images: &ImageDir) -> Result<NetSpec, ApiError> {
        self.check(index).map_err(ApiError::BadRequest)?;
        let rom = match self.romfile.as_deref() {
            None => RomChoice::Default,
            Some(name) => resolve_romfile(name, images)?,
        };
        Ok(self.spec_with(rom))
    }

    /// A NIC as a restored machine has it, for the restored VM's definition.
    pub fn from_spec(s: &NetSpec) -> ApiNic {
        let romfile = match &s.rom {
            RomChoice::Default => None,
            RomChoice::None => Some(ROMFILE_NONE.to_string()),
            RomChoice::File(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            RomChoice::Image { name, .. } => Some(name.clone()),
        };
        ApiNic { tap: s.tap.clone(), mac: s.mac, romfile, romsize: s.romsize }
    }
}

/// An API `romfile`: `"none"`, or an image name resolved in the image directory.
pub fn resolve_romfile(name: &str, images: &ImageDir) -> Result<RomChoice, ApiError> {
    if name == ROMFILE_NONE {
        return Ok(RomChoice::None);
    }
    super::images::validate_name(name).map_err(|e| ApiError::BadRequest(format!("romfile: {e}")))?;
    images.check("option ROM", name).map_err(ApiError::from_image)?;
    Ok(RomChoice::Image { name: name.to_string(), path: images.path(name).map_err(ApiError::from_image)? })
}

/// Resolves the `romfile` of each of `overrides` (API restores and clones).
pub fn resolve_overrides(
    overrides: &mut [crate::net::overrides::NetOverride],
    images: &ImageDir,
) -> Result<(), ApiError> {
    for o in overrides.iter_mut() {
        if let Some(name) = &o.romfile {
            o.rom = Some(resolve_romfile(name, images)?);
        }
    }
    Ok(())
}

impl ApiNic {
    /// A `--net` of `snapvisor vm create` as an API entry: a `romfile=` value is an image name.
    pub fn from_cli(s: &NetSpec) -> ApiNic {
        let romfile = match &s.rom {
            RomChoice::Default => None,
            RomChoice::None => Some(ROMFILE_NONE.to_string()),
            RomChoice::File(p) => Some(p.display().to_string()),
            RomChoice::Image { name, .. } => Some(name.clone()),
        };
        ApiNic { tap: s.tap.clone(), mac: s.mac, romfile, romsize: s.romsize }
    }
}

/// Checks a definition's NIC list: each entry, the count, MACs given twice.
pub fn check_list(net: &[ApiNic]) -> Result<(), String> {
    for (i, n) in net.iter().enumerate() {
        n.check(i)?;
    }
    let specs: Vec<NetSpec> = net.iter().map(|n| n.spec_with(RomChoice::None)).collect();
    crate::net::nic::check_specs(&specs).map_err(|e| e.to_string())
}

/// The machine's NIC list for a definition's `net`.
pub fn to_specs(net: &[ApiNic], images: &ImageDir) -> Result<Vec<NetSpec>, ApiError> {
    check_list(net).map_err(ApiError::BadRequest)?;
    net.iter().enumerate().map(|(i, n)| n.to_spec(i, images)).collect()
}

/// A clone request's `new_tap`s, before anything is restored: a tap holds one VM, so one tap
/// given to two clones (or two NICs of one) is a bad request naming both, nothing cloned.
pub fn check_clone_taps(
    names: &[String],
    overrides: &[Vec<crate::net::overrides::NetOverride>],
) -> Result<(), ApiError> {
    let mut given: Vec<(&str, usize, usize)> = Vec::new();
    for (c, list) in overrides.iter().enumerate() {
        for (k, o) in list.iter().enumerate() {
            let Some(t) = o.new_tap.as_deref() else { continue };
            if let Some(&(_, c0, k0)) = given.iter().find(|(g, _, _)| *g == t) {
                let name = |i: usize| names.get(i).map_or("?", String::as_str);
                let (a, b) = (name(c0), name(c));
                let whom = if c0 == c { format!("two NICs of clone '{a}'") } else { format!("clones '{a}' and '{b}'") };
                return Err(ApiError::BadRequest(format!(
                    "new_tap '{t}' is given to {whom} (network_overrides[{c0}][{k0}].new_tap and \
                     network_overrides[{c}][{k}].new_tap); a tap carries one NIC; nothing was cloned"
                )));
            }
            given.push((t, c, k));
        }
    }
    Ok(())
}

#[cfg(test)]
mod clone_tap_tests {
    use super::*;

    #[test]
    fn one_new_tap_for_two_clones_is_refused_naming_both() {
        let names: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
        let o = |tap: &str| -> Vec<crate::net::overrides::NetOverride> {
            serde_json::from_value(serde_json::json!([{"nic": 0, "new_tap": tap}])).expect("override")
        };
        check_clone_taps(&names, &[o("t0"), o("t1"), o("t2")]).expect("distinct taps");
        let e = check_clone_taps(&names, &[o("t0"), o("t1"), o("t1")]).expect_err("duplicate");
        assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("new_tap 't1' is given to clones 'c1' and 'c2'"), "{e}");
        assert!(e.contains("nothing was cloned"), "{e}");
    }
}
