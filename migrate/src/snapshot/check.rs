//! Checking a snapshot's RAM-block table against a destination VM, before anything is
//! written, and resizing the resizeable blocks to the snapshot's sizes.
//!
//! QEMU stops at the first block that does not fit and prints a bare size mismatch. Here every
//! block is checked first and all problems are reported together, each naming the block, both
//! sizes, and what to change; only when every block fits is anything resized. The resize then
//! goes through [`RamRegistry::resize`], so the rules, listeners and `resized` hooks are QEMU's
//! (fw_cfg's directory shows the snapshot's sizes afterwards).
//!
//! Option ROMs (`0000:00:03.0/virtio-net-pci.rom`) get QEMU's cases with better answers:
//! a size mismatch or a ROM the destination lacks is refused with the `romsize=`/`romfile=`
//! that fixes it; a destination ROM the snapshot lacks is kept (the restore leaves that block
//! alone); a destination with `romsize` at least the snapshot's has a resizeable block and is
//! resized to the snapshot's length like any resizeable block.

use std::fmt;

use thiserror::Error;

use super::format::RamBlockDesc;
use crate::ram::{RamError, RamRegistry};

/// One way a snapshot's RAM does not fit the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RamProblem {
    /// The snapshot has a block the destination lacks.
    Unknown {
        idstr: String,
        used: u64,
    },
    /// The destination has a block the snapshot lacks.
    Missing {
        idstr: String,
        used: u64,
    },
    PageSize {
        idstr: String,
        snapshot: u64,
        destination: u64,
    },
    /// A non-resizeable block of another size.
    SizeMismatch {
        idstr: String,
        new: u64,
        used: u64,
    },
    /// A resizeable block that cannot grow that far.
    TooLarge {
        idstr: String,
        new: u64,
        max: u64,
    },
}

/// The blocks of the ACPI blobs fw_cfg serves (their maximum sizes are fixed by the build).
fn is_acpi_blob(idstr: &str) -> bool {
    matches!(idstr, "/rom@etc/acpi/tables" | "/rom@etc/acpi/rsdp" | "/rom@etc/table-loader")
}

/// Whether `idstr` is a PCI device's option ROM (`0000:00:03.0/virtio-net-pci.rom`), as
/// opposed to a fw_cfg file that happens to end in `.rom` (`/rom@genroms/x.rom`).
pub fn is_option_rom(idstr: &str) -> bool {
    !idstr.starts_with("/rom@") && idstr.ends_with(".rom") && idstr.contains('/')
}

/// The PCI address in an option ROM's idstr.
fn rom_device(idstr: &str) -> &str {
    idstr.rsplit_once('/').map_or(idstr, |(d, _)| d)
}

/// What to do about a size mismatch of `idstr`.
fn size_hint(idstr: &str, new: u64, used: u64) -> String {
    if is_option_rom(idstr) {
        // A pinned (romsize) block is resizeable up to its size: it takes any snapshot ROM
        // block not larger, and must hold this VM's ROM file too, hence the larger of the two.
        let dev = rom_device(idstr);
        format!(
            "the snapshot's option ROM block is {new:#x} bytes and this VM's {used:#x}: restore the NIC at {dev} with \
             romsize={:#x} (a pinned ROM block takes the snapshot's ROM), or with romfile= the ROM the snapshot \
             was taken with (a {new:#x}-byte block)",
            new.max(used)
        )
    } else if idstr == "pc.ram" {
        format!("restore into a VM with --mem-mib {}", new >> 20)
    } else {
        "restore into a VM built with the same configuration as the one snapshotted".into()
    }
}

impl fmt::Display for RamProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RamProblem::Unknown { idstr, used } if is_option_rom(idstr) => write!(
                f,
                "Unknown ramblock \"{idstr}\" (snapshot has {used:#x} bytes): the snapshot's NIC at {dev} has an option \
                 ROM and this VM's has none (romfile=none, or no such NIC): give it a ROM whose block holds {used:#x} \
                 bytes: romfile= the ROM the snapshot was taken with, or romsize={used:#x} with a ROM of at most \
                 that size (the default ROM when romfile is not given)",
                dev = rom_device(idstr)
            ),
            RamProblem::Unknown { idstr, used } => write!(
                f,
                "Unknown ramblock \"{idstr}\" (snapshot has {used:#x} bytes): the destination has no such RAM block; add the device that owns it"
            ),
            RamProblem::Missing { idstr, used } => write!(
                f,
                "RAM block \"{idstr}\" ({used:#x} bytes) is not in the snapshot: remove the device that owns it, or use a snapshot taken with it"
            ),
            RamProblem::PageSize { idstr, snapshot, destination } => write!(
                f,
                "Mismatched RAM page size {idstr} (local) {destination:#x} != {snapshot:#x}: back the block with the same page size as the source"
            ),
            RamProblem::SizeMismatch { idstr, new, used } => {
                write!(f, "Size mismatch: {idstr}: {new:#x} != {used:#x}: {}", size_hint(idstr, *new, *used))
            }
            RamProblem::TooLarge { idstr, new, max } if is_acpi_blob(idstr) => write!(
                f,
                "Size too large: {idstr}: {new:#x} > {max:#x}: this snapvisor serves ACPI blobs of at most {max:#x} bytes, \
                 so the snapshot was taken by a build with a larger limit: restore it with that build"
            ),
            RamProblem::TooLarge { idstr, new, max } if is_option_rom(idstr) => write!(
                f,
                "Size too large: {idstr}: {new:#x} > {max:#x}: the snapshot's option ROM block is {new:#x} bytes, more \
                 than this VM's romsize={max:#x}: restore the NIC at {dev} with romsize={new:#x}",
                dev = rom_device(idstr)
            ),
            RamProblem::TooLarge { idstr, new, max } => write!(
                f,
                "Size too large: {idstr}: {new:#x} > {max:#x}: the destination reserves less room for this resizeable block than the snapshot uses"
            ),
        }
    }
}

/// Errors loading RAM-block state.
#[derive(Debug, Error)]
pub enum CheckError {
    #[error("snapshot RAM does not fit this VM ({} problem{}):\n  {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Mismatch(Vec<RamProblem>),
    #[error("resizing RAM block to the snapshot's size: {0}")]
    Resize(#[from] RamError),
    #[error("the snapshot's VM state and its manifest describe its RAM differently, so one of them is damaged or forged ({} problem{}):\n  {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Inconsistent(Vec<Disagreement>),
}

/// One way a snapshot's RAM-block table (in its VM state) and its manifest's blocks (whose
/// chunk tables are what a restore loads) disagree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disagreement {
    /// The block is listed by one of the two only.
    OneSided { idstr: String, listed_in: &'static str },
    /// A length or page size differs.
    Field { idstr: String, field: &'static str, state: u64, manifest: u64 },
    /// One says resizeable, the other fixed.
    Resizeable { idstr: String, state: bool },
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disagreement::OneSided { idstr, listed_in } => {
                write!(f, "RAM block \"{idstr}\" is listed only in the snapshot's {listed_in}")
            }
            Disagreement::Field { idstr, field, state, manifest } => {
                write!(f, "RAM block \"{idstr}\": {field} {state:#x} in the VM state != {manifest:#x} in the manifest")
            }
            Disagreement::Resizeable { idstr, state } => write!(
                f,
                "RAM block \"{idstr}\" is {} in the VM state and {} in the manifest",
                if *state { "resizeable" } else { "fixed" },
                if *state { "fixed" } else { "resizeable" }
            ),
        }
    }
}

/// Checks that a snapshot's two descriptions of its RAM blocks agree: the VM state's table
/// (what [`check_ram`] and the resizes follow) and the manifest's blocks (whose chunk tables
/// are loaded or served). A snapshot writes both from the same blocks; each passes its own
/// checks alone, so a damaged or forged one is found only here, before anything is loaded
/// (a manifest block shorter than the state's left the tail of an eagerly loaded block as
/// the destination built it).
pub fn check_manifest(state: &[RamBlockDesc], manifest: &[storage::BlockManifest]) -> Result<(), CheckError> {
    let mut problems = Vec::new();
    for s in state {
        let Some(m) = manifest.iter().find(|m| m.idstr == s.idstr) else {
            problems.push(Disagreement::OneSided { idstr: s.idstr.clone(), listed_in: "VM state" });
            continue;
        };
        for (field, state, manifest) in [
            ("used length", s.used_length, m.used_length),
            ("max length", s.max_length, m.max_length),
            ("page size", s.page_size, m.page_size),
        ] {
            if state != manifest {
                problems.push(Disagreement::Field { idstr: s.idstr.clone(), field, state, manifest });
            }
        }
        if s.resizeable != m.resizeable {
            problems.push(Disagreement::Resizeable { idstr: s.idstr.clone(), state: s.resizeable });
        }
    }
    for m in manifest {
        if !state.iter().any(|s| s.idstr == m.idstr) {
            problems.push(Disagreement::OneSided { idstr: m.idstr.clone(), listed_in: "manifest" });
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CheckError::Inconsistent(problems))
    }
}

/// The resizes a load will make: (idstr, new unaligned size).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResizePlan(pub Vec<(String, u64)>);

/// Checks every block; returns the resizes to make, or every problem found. Changes nothing.
pub fn check_ram(snapshot: &[RamBlockDesc], registry: &RamRegistry) -> Result<ResizePlan, CheckError> {
    let mut problems = Vec::new();
    let mut plan = ResizePlan::default();
    for s in snapshot {
        let Some(d) = registry.get(&s.idstr) else {
            problems.push(RamProblem::Unknown { idstr: s.idstr.clone(), used: s.used_length });
            continue;
        };
        if d.page_size() != s.page_size {
            problems.push(RamProblem::PageSize {
                idstr: s.idstr.clone(),
                snapshot: s.page_size,
                destination: d.page_size(),
            });
            continue;
        }
        let want = if s.unaligned_length > 0 { s.unaligned_length } else { s.used_length };
        if s.used_length == d.used_length() {
            if d.resizeable() && want != d.unaligned_length() {
                plan.0.push((s.idstr.clone(), want));
            }
            continue;
        }
        if !d.resizeable() {
            problems.push(RamProblem::SizeMismatch {
                idstr: s.idstr.clone(),
                new: s.used_length,
                used: d.used_length(),
            });
        } else if s.used_length > d.max_length() {
            problems.push(RamProblem::TooLarge { idstr: s.idstr.clone(), new: s.used_length, max: d.max_length() });
        } else {
            plan.0.push((s.idstr.clone(), want));
        }
    }
    for d in registry.blocks() {
        // An option ROM the snapshot lacks stays as the destination built it (QEMU accepts
        // this too): the snapshot's device never mapped a ROM, and the block is the ROM file.
        if !snapshot.iter().any(|s| s.idstr == d.idstr()) && !is_option_rom(d.idstr()) {
            problems.push(RamProblem::Missing { idstr: d.idstr().to_string(), used: d.used_length() });
        }
    }
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(CheckError::Mismatch(problems))
    }
}

/// Makes the planned resizes through the registry (listeners, then hooks, per QEMU's rules).
pub fn apply_resizes(plan: &ResizePlan, registry: &RamRegistry) -> Result<(), CheckError> {
    for (idstr, size) in &plan.0 {
        registry.resize(idstr, *size)?;
    }
    Ok(())
}

/// The snapshot's description of each block in `registry`.
pub fn describe(registry: &RamRegistry) -> Vec<RamBlockDesc> {
    registry
        .blocks()
        .iter()
        .map(|b| RamBlockDesc {
            idstr: b.idstr().to_string(),
            used_length: b.used_length(),
            unaligned_length: b.unaligned_length(),
            max_length: b.max_length(),
            page_size: b.page_size(),
            resizeable: b.resizeable(),
        })
        .collect()
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
