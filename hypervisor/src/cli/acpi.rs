//! `snapvisor acpi dump`: the ACPI tables of a machine as its guest would see them, one file
//! per table, for `iasl -d`.
//!
//! The tables are built for the machine `--vcpus`/`--mem-mib` describe (the same
//! [`crate::acpi::acpi_config`] a VM uses), then the loader script runs through
//! [`devices::acpi::loader_exec`] with addresses chosen the way SeaBIOS chooses them: high-zone
//! files downward from the top of RAM below 4 GiB, FSEG files upward from 0xf0000. The
//! addresses are illustrative; a real firmware's differ with what it allocated before. Every
//! pointer and checksum in the files written is patched for those addresses, and the tables
//! are found by following the pointers from the RSDP, as an OS does.
//!
//! Output: `DIR/RSDP.dat` and `DIR/<SIGNATURE>.dat` (`SSDT.dat`, `SSDT1.dat`, ... for repeats).
//! DIR is created if missing; a DIR or table path that is a symlink, or a DIR that is not a
//! directory, is refused.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use devices::acpi::guest_view::{load, GuestTable, GuestViewError};
use devices::acpi::loader::Zone;
use devices::acpi::{AcpiError, TABLES_MAX};
use thiserror::Error;

use super::CliError;

/// Where the FSEG zone starts and ends (SeaBIOS's F-segment).
const FSEG_START: u64 = 0xf_0000;
const FSEG_END: u64 = 0x10_0000;
/// Lowest address a high-zone allocation may take.
const HIGH_FLOOR: u64 = 0x10_0000;

#[derive(Debug, Subcommand)]
pub enum AcpiCommand {
    /// Write each ACPI table, as the guest sees it after the table-loader ran, to DIR/NAME.dat.
    Dump(DumpArgs),
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// vCPUs of the machine.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem_mib: u64,
    /// An extra ACPI table (whole, with its header) to add, as `run --acpi-table` does.
    #[arg(long = "acpi-table", value_name = "FILE")]
    pub acpi_tables: Vec<PathBuf>,
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// List the tables as JSON (name, address, length) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Errors of `acpi dump`.
#[derive(Debug, Error)]
pub enum DumpError {
    #[error("--vcpus {0}: must be 1 to 255")]
    Vcpus(u64),
    #[error("--mem-mib {0}: must be at least 2")]
    Mem(u64),
    #[error("--acpi-table {path}: {reason}")]
    Table { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Out { path: PathBuf, reason: String },
    #[error("building the ACPI tables: {0}")]
    Build(#[from] AcpiError),
    #[error("running the table-loader: {0}")]
    Load(#[from] GuestViewError),
}

impl From<DumpError> for CliError {
    fn from(e: DumpError) -> Self {
        match e {
            DumpError::Load(_) => CliError::Internal(e.to_string()),
            _ => CliError::Input(e.to_string()),
        }
    }
}

pub fn run(cmd: AcpiCommand) -> Result<(), CliError> {
    match cmd {
        AcpiCommand::Dump(args) => dump(args).map_err(CliError::from),
    }
}

fn read_table(path: &Path) -> Result<Vec<u8>, DumpError> {
    let bad = |reason: String| DumpError::Table { path: path.to_path_buf(), reason };
    let meta = fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > TABLES_MAX {
        return Err(bad(format!("{} bytes is larger than all ACPI tables may be ({TABLES_MAX:#x})", meta.len())));
    }
    fs::read(path).map_err(|e| bad(e.to_string()))
}

/// Creates `dir` if missing; refuses a symlink or a non-directory.
fn prepare_dir(dir: &Path) -> Result<(), DumpError> {
    let bad = |reason: String| DumpError::Out { path: dir.to_path_buf(), reason };
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(bad("is a symlink; refusing to write through it".into())),
        Ok(m) if !m.is_dir() => Err(bad("exists and is not a directory".into())),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::create_dir_all(dir).map_err(|e| bad(e.to_string())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Writes `bytes` to `path`, never through a symlink and never into a non-regular file.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DumpError> {
    let bad = |reason: String| DumpError::Out { path: path.to_path_buf(), reason };
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Err(bad("is a symlink; refusing to write through it".into())),
        Ok(m) if !m.is_file() => return Err(bad("exists and is not a regular file".into())),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    f.write_all(bytes).map_err(|e| bad(e.to_string()))
}

/// Addresses as SeaBIOS would choose them for a guest with `ram_below_4g` bytes under 4 GiB.
fn seabios_allocator(ram_below_4g: u64) -> impl FnMut(&str, u64, u32, Zone) -> Result<u64, String> {
    let mut high = ram_below_4g;
    let mut fseg = FSEG_START;
    move |_, len, align, zone| {
        let align = u64::from(align.max(1));
        match zone {
            Zone::High => {
                let addr = high.checked_sub(len).map(|a| a & !(align - 1)).filter(|&a| a >= HIGH_FLOOR);
                let addr = addr.ok_or_else(|| format!("no room below {high:#x} in high memory"))?;
                high = addr;
                Ok(addr)
            }
            Zone::FSeg => {
                let addr = fseg.div_ceil(align) * align;
                if addr + len > FSEG_END {
                    return Err(format!("no room in the F-segment from {addr:#x}"));
                }
                fseg = addr + len;
                Ok(addr)
            }
        }
    }
}

/// Builds and loads the tables of the machine `args` describes.
pub fn guest_tables(args: &DumpArgs) -> Result<Vec<GuestTable>, DumpError> {
    let vcpus = u8::try_from(args.vcpus).ok().filter(|&v| v >= 1).ok_or(DumpError::Vcpus(args.vcpus))?;
    if args.mem_mib < 2 || args.mem_mib > (1 << 30) {
        return Err(DumpError::Mem(args.mem_mib));
    }
    let extra = args.acpi_tables.iter().map(|p| read_table(p)).collect::<Result<Vec<_>, _>>()?;
    let cfg = crate::acpi::acpi_config(vcpus, args.mem_mib << 20, extra);
    let blobs = devices::acpi::build(&cfg)?;
    let (_, tables) = load(&blobs, &mut seabios_allocator(cfg.ram_below_4g))?;
    Ok(tables)
}

fn dump(args: DumpArgs) -> Result<(), DumpError> {
    let tables = guest_tables(&args)?;
    prepare_dir(&args.out)?;
    for t in &tables {
        write_file(&args.out.join(format!("{}.dat", t.name)), &t.bytes)?;
    }
    tracing::info!(dir = %args.out.display(), tables = tables.len(), "ACPI tables written");
    if args.json {
        let rows: Vec<_> = tables
            .iter()
            .map(|t| serde_json::json!({ "name": t.name, "address": t.addr, "length": t.bytes.len() }))
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!("{:<8} {:>12} {:>8}", "name", "address", "length");
        for t in &tables {
            println!("{:<8} {:>#12x} {:>8}", t.name, t.addr, t.bytes.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(out: PathBuf) -> DumpArgs {
        DumpArgs { vcpus: 2, mem_mib: 64, acpi_tables: Vec::new(), out, json: false }
    }

    #[test]
    fn writes_every_table_and_creates_the_dir() {
        let tmp = tempfile::tempdir().expect("tmp");
        let out = tmp.path().join("a/b");
        dump(args(out.clone())).expect("dump");
        for n in ["RSDP", "XSDT", "FACP", "FACS", "DSDT", "APIC", "SSDT"] {
            assert!(out.join(format!("{n}.dat")).is_file(), "{n}");
        }
    }

    #[test]
    fn tables_lie_below_the_top_of_ram() {
        let tables = guest_tables(&args(PathBuf::new())).expect("tables");
        let rsdp = &tables[0];
        assert!((FSEG_START..FSEG_END).contains(&rsdp.addr));
        for t in &tables[1..] {
            assert!(t.addr >= HIGH_FLOOR && t.addr + t.bytes.len() as u64 <= 64 << 20, "{}", t.name);
        }
    }

    #[test]
    fn refuses_symlinked_dir_and_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let real = tmp.path().join("real");
        fs::create_dir(&real).expect("dir");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let e = dump(args(link.clone())).expect_err("symlinked dir");
        assert!(e.to_string().contains(&link.display().to_string()) && e.to_string().contains("symlink"), "{e}");

        let victim = tmp.path().join("victim");
        fs::write(&victim, b"keep").expect("victim");
        std::os::unix::fs::symlink(&victim, real.join("DSDT.dat")).expect("symlink");
        let e = dump(args(real.clone())).expect_err("symlinked file");
        assert!(e.to_string().contains("DSDT.dat"), "{e}");
        assert_eq!(fs::read(&victim).expect("victim"), b"keep");

        let file = tmp.path().join("file");
        fs::write(&file, b"x").expect("file");
        let e = dump(args(file)).expect_err("not a dir");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn bad_arguments_are_named() {
        let mut a = args(PathBuf::new());
        a.vcpus = 256;
        assert!(guest_tables(&a).expect_err("vcpus").to_string().contains("--vcpus 256"));
        let mut a = args(PathBuf::new());
        a.acpi_tables = vec![PathBuf::from("/nonexistent/t.dat")];
        assert!(guest_tables(&a).expect_err("table").to_string().contains("/nonexistent/t.dat"));
    }
}
