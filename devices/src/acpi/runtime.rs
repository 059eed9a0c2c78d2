//! ACPI at run time: the three blobs of [`super::build`] served through fw_cfg from resizeable
//! RAM blocks, rebuilt on the first select after a reset, as QEMU's `acpi_build_update` does.
//!
//! # Blocks
//!
//! | fw_cfg file        | RAM block              | max_length                 |
//! |--------------------|------------------------|----------------------------|
//! | `etc/acpi/tables`  | `/rom@etc/acpi/tables` | [`TABLES_MAX`]             |
//! | `etc/table-loader` | `/rom@etc/table-loader`| [`LOADER_MAX`]             |
//! | `etc/acpi/rsdp`    | `/rom@etc/acpi/rsdp`   | the first build's RSDP size|
//!
//! The blocks are made from a first build when the machine is assembled and registered with
//! fw_cfg as RAM-block files, so fw_cfg's directory shows each block's unaligned length (the
//! block's `resized` hook keeps it current).
//!
//! # Rebuild on select, and the `patched` flag
//!
//! Selecting any of the three files runs [`AcpiRuntime::update`]: unless `patched` is set, it
//! sets it, builds the blobs again (devices added since the last build are in them), checks
//! that each fits its block, then resizes each block through the registry (listeners run: a
//! live snapshot in progress is cancelled by the resize, a lazy restore still filling the
//! block refuses it) and writes the bytes. [`AcpiRuntime::reset`] clears `patched`, so the
//! first select after a reset rebuilds. A failed rebuild is logged and leaves the blocks as
//! they were; `patched` stays set (QEMU does the same), so the guest sees one consistent set.
//!
//! Every blob is checked against its block's `max_length` before any block changes, but a
//! resize a listener refuses midway (a lazy restore still filling that block) leaves the
//! blocks before it rebuilt and the rest as they were; the error names the block. This can
//! only happen to a restore of a snapshot taken before the firmware read the tables.
//!
//! SeaBIOS reads a file's size from the directory before selecting it, so a rebuild that
//! changes a size is consistent only across a reset; that is why the rebuild happens once.
//!
//! # Snapshots
//!
//! `patched` is the runtime's whole state ([`AcpiRuntimeState`]). The blocks are RAM blocks, so
//! snapshots carry their bytes and lengths, and a restore resizes the destination's blocks to
//! the snapshot's lengths before loading them. Restoring `patched = true` keeps the snapshot's
//! bytes (no select rebuilds over them); restoring `patched = false` rebuilds, with the
//! destination's own configuration, on the guest's next select.
//!
//! # Locks
//!
//! `update` runs inside fw_cfg's lock (from the select callback). It takes the builder's
//! mutex, then the registry (which runs listeners and the blocks' hooks; fw_cfg's hook only
//! stores an atomic). Nothing here ever takes fw_cfg's lock, so the order is always
//! fw_cfg → builder → registry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use migrate::ram::{RamBlock, RamBlockConfig, RamError, RamRegistry};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{AcpiBlobs, AcpiError, LOADER_FILE, LOADER_MAX, RSDP_FILE, TABLES_FILE, TABLES_MAX};
use crate::fw_cfg::{FwCfg, FwCfgError};

/// Builds the three blobs; called at assembly and on every rebuild.
pub type TableBuilder = Box<dyn FnMut() -> Result<AcpiBlobs, AcpiError> + Send>;

/// The RAM block that holds fw_cfg file `file` (QEMU's naming).
pub fn block_idstr(file: &str) -> String {
    format!("/rom@{file}")
}

/// Errors setting up or rebuilding the ACPI blobs.
#[derive(Debug, Error)]
pub enum AcpiRuntimeError {
    #[error("building the ACPI tables: {0}")]
    Build(#[from] AcpiError),
    #[error("ACPI blob {file} is empty")]
    Empty { file: &'static str },
    #[error("ACPI blob {file} is {len:#x} bytes; its RAM block holds at most {max:#x}")]
    TooLarge { file: &'static str, len: u64, max: u64 },
    #[error("RAM block of ACPI blob {file}: {source}")]
    Ram { file: &'static str, source: RamError },
    #[error("fw_cfg file {file}: {source}")]
    FwCfg { file: &'static str, source: FwCfgError },
}

/// The runtime's saved state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiRuntimeState {
    /// The blobs were built since the last reset; selects do not rebuild them.
    pub patched: bool,
}

/// One served blob.
struct Blob {
    file: &'static str,
    block: Arc<RamBlock>,
}

/// The ACPI blobs of one VM.
pub struct AcpiRuntime {
    registry: Arc<RamRegistry>,
    builder: Mutex<TableBuilder>,
    patched: AtomicBool,
    /// Tables, loader, RSDP.
    blobs: [Blob; 3],
}

impl std::fmt::Debug for AcpiRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiRuntime").field("patched", &self.patched.load(Ordering::Acquire)).finish()
    }
}

fn pick<'a>(b: &'a AcpiBlobs, file: &str) -> &'a [u8] {
    match file {
        TABLES_FILE => &b.tables,
        LOADER_FILE => &b.loader,
        _ => &b.rsdp,
    }
}

impl AcpiRuntime {
    /// Builds the blobs once and creates their RAM blocks in `registry`. Nothing is served
    /// until [`AcpiRuntime::register`].
    pub fn new(registry: Arc<RamRegistry>, mut builder: TableBuilder) -> Result<Arc<AcpiRuntime>, AcpiRuntimeError> {
        let first = builder()?;
        let make = |file: &'static str, max: u64| -> Result<Blob, AcpiRuntimeError> {
            let bytes = pick(&first, file);
            check_len(file, bytes, max)?;
            let ram = |source| AcpiRuntimeError::Ram { file, source };
            let block = registry
                .add(RamBlockConfig {
                    idstr: block_idstr(file),
                    size: bytes.len() as u64,
                    max_size: max,
                    page_size: 0,
                    resizeable: true,
                })
                .map_err(ram)?;
            block.write(0, bytes).map_err(ram)?;
            Ok(Blob { file, block })
        };
        let blobs =
            [make(TABLES_FILE, TABLES_MAX)?, make(LOADER_FILE, LOADER_MAX)?, make(RSDP_FILE, first.rsdp.len() as u64)?];
        Ok(Arc::new(AcpiRuntime { registry, builder: Mutex::new(builder), patched: AtomicBool::new(false), blobs }))
    }

    /// Offers the three blobs through `fw`, each rebuilding all of them when selected.
    pub fn register(self: &Arc<Self>, fw: &mut FwCfg) -> Result<(), AcpiRuntimeError> {
        for b in &self.blobs {
            let err = |source| AcpiRuntimeError::FwCfg { file: b.file, source };
            fw.add_ram_block_file(b.file, b.block.clone()).map_err(err)?;
            let me = self.clone();
            fw.set_select_callback(b.file, Box::new(move || me.update())).map_err(err)?;
        }
        Ok(())
    }

    /// What a select does: rebuilds the blobs unless they were built since the last reset.
    pub fn update(&self) {
        if self.patched.swap(true, Ordering::AcqRel) {
            return;
        }
        match self.rebuild() {
            Ok(()) => tracing::debug!("ACPI tables rebuilt on select"),
            Err(e) => tracing::warn!("ACPI tables not rebuilt, the guest keeps the previous ones: {e}"),
        }
    }

    /// Builds the blobs and puts them in their blocks, resizing them through the registry.
    /// Every blob is checked before any block changes.
    pub fn rebuild(&self) -> Result<(), AcpiRuntimeError> {
        let built = (self.builder.lock().unwrap_or_else(PoisonError::into_inner))()?;
        for b in &self.blobs {
            check_len(b.file, pick(&built, b.file), b.block.max_length())?;
        }
        for b in &self.blobs {
            let bytes = pick(&built, b.file);
            let ram = |source| AcpiRuntimeError::Ram { file: b.file, source };
            self.registry.resize(b.block.idstr(), bytes.len() as u64).map_err(ram)?;
            b.block.write(0, bytes).map_err(ram)?;
        }
        Ok(())
    }

    /// A machine reset: the next select rebuilds.
    pub fn reset(&self) {
        self.patched.store(false, Ordering::Release);
    }

    /// The RAM blocks: tables, loader, RSDP.
    pub fn blocks(&self) -> [Arc<RamBlock>; 3] {
        [self.blobs[0].block.clone(), self.blobs[1].block.clone(), self.blobs[2].block.clone()]
    }

    pub fn state(&self) -> AcpiRuntimeState {
        AcpiRuntimeState { patched: self.patched.load(Ordering::Acquire) }
    }

    /// Restores the flag. The blocks' bytes and lengths come with the snapshot's RAM; nothing
    /// is rebuilt here.
    pub fn restore(&self, s: &AcpiRuntimeState) -> Result<(), AcpiRuntimeError> {
        self.patched.store(s.patched, Ordering::Release);
        Ok(())
    }
}

fn check_len(file: &'static str, bytes: &[u8], max: u64) -> Result<(), AcpiRuntimeError> {
    let len = bytes.len() as u64;
    if len == 0 {
        return Err(AcpiRuntimeError::Empty { file });
    }
    if len > max {
        return Err(AcpiRuntimeError::TooLarge { file, len, max });
    }
    Ok(())
}

#[cfg(test)]
#[path = "runtime_tests.rs"]
mod tests;
