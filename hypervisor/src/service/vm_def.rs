//! A VM's definition as the daemon keeps it: what it boots (a built-in guest, a kernel from
//! the image directory, or firmware), its size and NICs, and the snapshot it was restored or
//! is to be resumed from. Persisted as JSON in the state directory, one file per VM.

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::images::ImageDir;
use crate::boot::files::BootFile;
use crate::boot::firmware;
use crate::guests::Builtin;
use crate::vm::{BootSource, BuiltinParams, MachineSpec};

/// A VM as the daemon defines and persists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDef {
    pub name: String,
    /// A built-in guest to boot (or a kernel: exactly one of the two).
    #[serde(default)]
    pub guest: Option<Builtin>,
    /// A Linux kernel (bzImage or ELF) to boot, with an optional initrd and command line:
    /// names of images in the image directory ([`super::images`]), never paths.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Boot through firmware instead: `seabios` (Debian's SeaBIOS) or the name of a
    /// firmware image in the image directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    pub mem_mib: u64,
    #[serde(default = "one")]
    pub vcpus: u64,
    #[serde(default)]
    pub seed: u64,
    /// memfill passes (0: run until stopped).
    #[serde(default)]
    pub passes: u64,
    /// The snapshot it was restored from, if any.
    #[serde(default)]
    pub restored_from: Option<String>,
    /// The snapshot the daemon took of it when it shut down; restored when it starts again.
    #[serde(default)]
    pub resume_from: Option<String>,
    /// It was paused when that snapshot was taken: it comes back paused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_paused: bool,
    /// netping's options (`mode`, `guest_ip`, `ping`, `count`, `frame_size`,
    /// `ping_interval_ms`), for `"guest": "netping"` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netping: Option<Box<crate::cli::guest_args::NetpingDef>>,
    /// NICs (virtio-net on taps), NIC i at PCI 00:(3+i).0 (`super::net_api`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<super::net_api::ApiNic>,
}

fn one() -> u64 {
    1
}

/// The `firmware` that names the system's SeaBIOS rather than an image.
pub use crate::boot::firmware::SEABIOS;

/// The kernel command line a daemon VM gets unless it names one.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1";

impl VmDef {
    /// Exactly one of a built-in guest, a kernel and a firmware.
    pub fn check_boot(&self) -> Result<(), String> {
        let boot: Result<(), String> = match (&self.guest, &self.kernel, &self.firmware) {
            _ if self.kernel.is_none() && (self.initrd.is_some() || self.cmdline.is_some()) => {
                Err("\"initrd\" and \"cmdline\" go with \"kernel\" only".into())
            }
            (Some(_), None, None) | (None, Some(_), None) | (None, None, Some(_)) => Ok(()),
            _ => Err("give exactly one of \"guest\" (a built-in guest), \"kernel\" (a kernel image) and \"firmware\" \
                      (\"seabios\" or a firmware image)"
                .into()),
        };
        boot?;
        self.builtin_params().map(|_| ())
    }

    /// How many NICs the definition asks for.
    fn nics(&self) -> usize {
        self.net.len()
    }

    /// What a VM restored from a snapshot lacks to boot afresh from its definition once it has
    /// stopped: a snapshot records the guest and the machine, not every boot option.
    pub fn unknown_for_a_fresh_boot(&self) -> Option<&'static str> {
        self.restored_from.as_ref()?;
        if self.kernel.is_some() {
            return Some("its kernel's initrd and command line");
        }
        if self.guest == Some(Builtin::Netping) && self.netping.is_none() {
            return Some("netping's options (guest_ip, ping, mode, ...)");
        }
        None
    }

    /// The built-in guest's parameters, netping's checked as the CLI checks them.
    pub fn builtin_params(&self) -> Result<BuiltinParams, String> {
        let (mode, args) = match &self.netping {
            Some(n) => (n.mode, n.args.clone()),
            None => (None, Default::default()),
        };
        let (_, net) =
            args.params(self.guest, mode, self.nics(), self.mem_mib).map_err(|e| format!("\"netping\": {e}"))?;
        Ok(BuiltinParams { seed: self.seed, passes: self.passes, net, ..Default::default() })
    }

    /// The firmware image to map, if the VM boots through firmware: `seabios` is the system's
    /// SeaBIOS, anything else an image in the image directory.
    pub fn firmware_image(&self, images: &ImageDir) -> Result<Option<BootFile>, ApiError> {
        let Some(name) = &self.firmware else { return Ok(None) };
        if name == SEABIOS {
            return firmware::read_seabios().map(Some).map_err(ApiError::Internal);
        }
        let file = images.read("firmware", name, firmware::MAX_IMAGE).map_err(ApiError::from_image)?;
        firmware::named(name, file).map(Some).map_err(|e| ApiError::BadRequest(e.to_string()))
    }

    /// What to boot: a kernel and initrd are read from the image directory, at most as large
    /// as guest memory.
    pub(super) fn boot(&self, params: BuiltinParams, images: &ImageDir) -> Result<BootSource, ApiError> {
        let limit = self.mem_mib.saturating_mul(1 << 20);
        Ok(match (&self.kernel, self.guest) {
            (Some(kernel), _) => BootSource::Kernel {
                kernel: images.read("kernel", kernel, limit).map_err(ApiError::from_image)?,
                initrd: match &self.initrd {
                    Some(i) => Some(images.read("initrd", i, limit).map_err(ApiError::from_image)?),
                    None => None,
                },
                cmdline: self.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.into()),
            },
            (None, _) if self.firmware.is_some() => BootSource::Firmware,
            (None, guest) => BootSource::Builtin { guest: guest.unwrap_or(Builtin::Idle), params },
        })
    }

    /// The definition of VM `name` restored from `snapshot`, as far as the snapshot's machine
    /// says: the guest or kernel image it booted, its firmware, size, NICs and, for built-in
    /// guests, the parameters it was started with (so a fresh boot after a stop runs it as
    /// defined; none in snapshots taken before they were recorded). A kernel's initrd and
    /// command line are not recorded ([`Self::unknown_for_a_fresh_boot`]).
    pub fn restored(name: &str, snapshot: &str, spec: &MachineSpec) -> VmDef {
        let (guest, kernel) = match spec.guest.split_once(':') {
            Some(("builtin", g)) => (g.parse().ok(), None),
            Some(("kernel", image)) => (None, Some(image.to_string())),
            _ => (None, None),
        };
        VmDef {
            name: name.to_string(),
            guest,
            kernel,
            initrd: None,
            cmdline: None,
            firmware: spec.firmware.as_ref().map(|f| f.name.clone()),
            mem_mib: spec.mem_mib,
            vcpus: spec.vcpus,
            seed: spec.builtin.map_or(0, |b| b.seed),
            passes: spec.builtin.map_or(0, |b| b.passes),
            restored_from: Some(snapshot.to_string()),
            resume_from: None,
            resume_paused: false,
            netping: None,
            net: spec.net.iter().map(super::net_api::ApiNic::from_spec).collect(),
        }
    }

    /// Checks that the kernel and initrd images (and NIC ROM images) exist and are regular
    /// files (without reading).
    pub fn check_images(&self, images: &ImageDir) -> Result<(), ApiError> {
        super::net_api::to_specs(&self.net, images)?;
        let firmware = self.firmware.as_ref().filter(|n| n.as_str() != SEABIOS);
        for (what, name) in [("kernel", &self.kernel), ("initrd", &self.initrd), ("firmware", &firmware.cloned())] {
            if let Some(name) = name {
                images.check(what, name).map_err(ApiError::from_image)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::VmDef;

    fn def(v: serde_json::Value) -> VmDef {
        serde_json::from_value(v).expect("a VM definition")
    }

    /// A restored netping or kernel VM cannot boot afresh once stopped (its snapshot lacks the
    /// boot options); a defined one, or a restored memfill, can (a hostile finding: the start
    /// failed with netping's CLI error).
    #[test]
    fn restored_vms_without_their_boot_options_are_named() {
        let restored = |guest: serde_json::Value| {
            let mut v = serde_json::json!({"name": "c0", "mem_mib": 64, "restored_from": "s"});
            v.as_object_mut().expect("object").extend(guest.as_object().expect("object").clone());
            def(v)
        };
        let netping = restored(serde_json::json!({"guest": "netping"}));
        assert!(netping.unknown_for_a_fresh_boot().expect("netping").contains("netping's options"));
        let kernel = restored(serde_json::json!({"kernel": "vmlinuz"}));
        assert!(kernel.unknown_for_a_fresh_boot().expect("kernel").contains("initrd and command line"));
        assert_eq!(restored(serde_json::json!({"guest": "memfill"})).unknown_for_a_fresh_boot(), None);
        let defined = def(serde_json::json!({"name": "n", "mem_mib": 64, "guest": "netping"}));
        assert_eq!(defined.unknown_for_a_fresh_boot(), None, "a defined VM boots from its own definition");
    }
}
