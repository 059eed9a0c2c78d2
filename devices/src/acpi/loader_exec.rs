//! Runs a bios-linker-loader script the way SeaBIOS's `romfile_loader_execute` does, on files
//! held as byte buffers instead of guest memory: for `snapvisor acpi dump`, and for tests
//! that check the tables as a guest would see them.
//!
//! The caller supplies the fw_cfg files by name and an allocator callback that chooses the
//! guest address of each ALLOCATE (SeaBIOS takes high-zone files from the top of RAM below
//! 4 GiB and FSEG files from 0xe0000-0xfffff). The result is every allocated file's address
//! and its bytes after all pointers and checksums were patched, plus the WRITE_POINTER writes
//! the firmware would have sent back through fw_cfg DMA.
//!
//! The script is untrusted: every check of [`super::loader::parse`] applies, and commands
//! that reach outside a file, name a file that was never allocated, or store a pointer that
//! does not fit its size are errors naming the entry index.
//!
//! Where SeaBIOS is lenient this executor is strict, so that a script it accepts also runs
//! under SeaBIOS: SeaBIOS skips commands it does not know, silently skips ALLOCATE of a
//! missing or empty file, and truncates an ADD_POINTER sum to the field's size; here the
//! first two are errors (an empty file is allocated) and a sum that does not fit is an error.

use std::collections::BTreeMap;

use super::loader::{parse, Command, LoaderError, Zone};

/// An allocated file, as it lies in guest memory after the script ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub name: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// A WRITE_POINTER: `value` written as `size` little-endian bytes into the fw_cfg file `file`
/// at `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointerWrite {
    pub file: String,
    pub offset: u32,
    pub size: u8,
    pub value: u64,
}

/// What a script did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Executed {
    /// Allocated files in allocation order.
    pub files: Vec<Placed>,
    pub writes: Vec<PointerWrite>,
}

impl Executed {
    pub fn file(&self, name: &str) -> Option<&Placed> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// Chooses the guest address of a file: `(name, len, align, zone) -> address`.
pub type Allocator<'a> = dyn FnMut(&str, u64, u32, Zone) -> Result<u64, String> + 'a;

fn range_in(index: usize, file: &str, start: u64, len: u64, file_len: usize) -> Result<(usize, usize), LoaderError> {
    let end = start.checked_add(len);
    match end {
        Some(end) if end <= file_len as u64 => Ok((start as usize, end as usize)),
        _ => Err(LoaderError::OutsideFile { index, file: file.into(), start, len, file_len: file_len as u64 }),
    }
}

fn fits(value: u64, size: u8) -> bool {
    size >= 8 || value < (1u64 << (u32::from(size) * 8))
}

fn placed_index(files: &[Placed], index: usize, name: &str) -> Result<usize, LoaderError> {
    files.iter().position(|f| f.name == name).ok_or(LoaderError::NotAllocated { index, file: name.into() })
}

/// Runs `script` over `files` (fw_cfg file name -> contents).
pub fn execute(
    script: &[u8],
    files: &BTreeMap<String, Vec<u8>>,
    alloc: &mut Allocator,
) -> Result<Executed, LoaderError> {
    let mut out = Executed::default();
    for (index, cmd) in parse(script)? {
        match cmd {
            Command::Allocate { file, align, zone } => {
                let data = files.get(&file).ok_or_else(|| LoaderError::UnknownFile { index, file: file.clone() })?;
                if out.file(&file).is_some() {
                    return Err(LoaderError::AllocatedTwice { index, file });
                }
                let len = data.len() as u64;
                let addr = alloc(&file, len, align, zone).map_err(|reason| LoaderError::Alloc {
                    index,
                    file: file.clone(),
                    len,
                    reason,
                })?;
                out.files.push(Placed { name: file, addr, bytes: data.clone() });
            }
            Command::AddPointer { dest, src, offset, size } => {
                let s = placed_index(&out.files, index, &src)?;
                let src_addr = out.files[s].addr;
                let d = placed_index(&out.files, index, &dest)?;
                let bytes = &mut out.files[d].bytes;
                let (a, b) = range_in(index, &dest, offset.into(), size.into(), bytes.len())?;
                let mut raw = [0u8; 8];
                raw[..b - a].copy_from_slice(&bytes[a..b]);
                let value = u64::from_le_bytes(raw).wrapping_add(src_addr);
                if !fits(value, size) {
                    return Err(LoaderError::PointerOverflow { index, value, size });
                }
                bytes[a..b].copy_from_slice(&value.to_le_bytes()[..b - a]);
            }
            Command::AddChecksum { file, offset, start, length } => {
                let f = placed_index(&out.files, index, &file)?;
                let bytes = &mut out.files[f].bytes;
                let (a, b) = range_in(index, &file, start.into(), length.into(), bytes.len())?;
                let (o, _) = range_in(index, &file, offset.into(), 1, bytes.len())?;
                let sum = bytes[a..b].iter().fold(0u8, |s, &x| s.wrapping_add(x));
                bytes[o] = bytes[o].wrapping_sub(sum);
            }
            Command::WritePointer { dest, src, dest_offset, src_offset, size } => {
                let dest_len =
                    files.get(&dest).ok_or_else(|| LoaderError::UnknownFile { index, file: dest.clone() })?.len();
                range_in(index, &dest, dest_offset.into(), size.into(), dest_len)?;
                let s = placed_index(&out.files, index, &src)?;
                let src_file = &out.files[s];
                range_in(index, &src, src_offset.into(), 0, src_file.bytes.len())?;
                let value = src_file.addr.wrapping_add(src_offset.into());
                if !fits(value, size) {
                    return Err(LoaderError::PointerOverflow { index, value, size });
                }
                out.writes.push(PointerWrite { file: dest, offset: dest_offset, size, value });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::loader::LoaderBuilder;
    use super::*;

    fn files() -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        m.insert("t".to_string(), vec![0u8; 64]);
        m.insert("r".to_string(), vec![0u8; 16]);
        m.insert("w".to_string(), vec![0u8; 8]);
        m
    }

    fn bump() -> impl FnMut(&str, u64, u32, Zone) -> Result<u64, String> {
        let mut high = 0x800_0000u64;
        move |_, len, align, zone| match zone {
            Zone::FSeg => Ok(0xf_0000),
            Zone::High => {
                high = (high - len) & !(u64::from(align) - 1);
                Ok(high)
            }
        }
    }

    fn run(b: &LoaderBuilder) -> Result<Executed, LoaderError> {
        let script = b.encode(128, 1 << 16).expect("encode");
        execute(&script, &files(), &mut bump())
    }

    #[test]
    fn allocate_places_and_copies() {
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).allocate("r", 16, Zone::FSeg);
        let x = run(&b).expect("run");
        assert_eq!(x.files.len(), 2);
        assert_eq!(x.files[0].addr, 0x800_0000 - 64);
        assert_eq!(x.files[1].addr, 0xf_0000);
        assert_eq!(x.files[1].bytes.len(), 16);
    }

    #[test]
    fn add_pointer_adds_source_address() {
        let mut f = files();
        f.get_mut("r").expect("r")[4..8].copy_from_slice(&0x10u32.to_le_bytes());
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).allocate("r", 16, Zone::FSeg).add_pointer("r", 4, 4, "t");
        let script = b.encode(128, 4096).expect("encode");
        let x = execute(&script, &f, &mut bump()).expect("run");
        let r = x.file("r").expect("r");
        assert_eq!(u32::from_le_bytes(r.bytes[4..8].try_into().expect("4")), 0x800_0000 - 64 + 0x10);
    }

    #[test]
    fn add_checksum_makes_range_sum_zero() {
        let mut f = files();
        f.get_mut("t").expect("t")[10..20].fill(0x37);
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).add_checksum("t", 9, 0, 64);
        let script = b.encode(128, 4096).expect("encode");
        let x = execute(&script, &f, &mut bump()).expect("run");
        let t = &x.file("t").expect("t").bytes;
        assert_eq!(t.iter().fold(0u8, |s, &v| s.wrapping_add(v)), 0);
        assert_ne!(t[9], 0);
    }

    #[test]
    fn write_pointer_reports_address_plus_offset() {
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).write_pointer("w", 0, 8, "t", 40);
        let x = run(&b).expect("run");
        assert_eq!(x.writes, vec![PointerWrite { file: "w".into(), offset: 0, size: 8, value: 0x800_0000 - 64 + 40 }]);
    }

    #[test]
    fn allocate_unknown_or_twice() {
        let mut b = LoaderBuilder::new();
        b.allocate("nope", 64, Zone::High);
        assert_eq!(run(&b), Err(LoaderError::UnknownFile { index: 0, file: "nope".into() }));
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).allocate("t", 64, Zone::High);
        assert_eq!(run(&b), Err(LoaderError::AllocatedTwice { index: 1, file: "t".into() }));
    }

    #[test]
    fn allocator_failure_names_file() {
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High);
        let script = b.encode(128, 4096).expect("encode");
        let err = execute(&script, &files(), &mut |_, _, _, _| Err("full".to_string()));
        assert_eq!(err, Err(LoaderError::Alloc { index: 0, file: "t".into(), len: 64, reason: "full".into() }));
    }

    #[test]
    fn commands_on_unallocated_files() {
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).add_pointer("r", 0, 4, "t");
        assert_eq!(run(&b), Err(LoaderError::NotAllocated { index: 1, file: "r".into() }));
        let mut b = LoaderBuilder::new();
        b.add_checksum("t", 0, 0, 4);
        assert_eq!(run(&b), Err(LoaderError::NotAllocated { index: 0, file: "t".into() }));
        let mut b = LoaderBuilder::new();
        b.write_pointer("w", 0, 8, "t", 0);
        assert_eq!(run(&b), Err(LoaderError::NotAllocated { index: 0, file: "t".into() }));
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).write_pointer("missing", 0, 8, "t", 0);
        assert_eq!(run(&b), Err(LoaderError::UnknownFile { index: 1, file: "missing".into() }));
    }

    #[test]
    fn pointers_outside_files() {
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).add_pointer("t", 60, 8, "t");
        assert_eq!(
            run(&b),
            Err(LoaderError::OutsideFile { index: 1, file: "t".into(), start: 60, len: 8, file_len: 64 })
        );
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).add_pointer("t", u32::MAX, 8, "t");
        assert!(matches!(run(&b), Err(LoaderError::OutsideFile { index: 1, .. })));
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).write_pointer("w", 4, 8, "t", 0);
        assert!(matches!(run(&b), Err(LoaderError::OutsideFile { index: 1, start: 4, len: 8, .. })));
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).write_pointer("w", 0, 8, "t", 65);
        assert!(matches!(run(&b), Err(LoaderError::OutsideFile { index: 1, start: 65, .. })));
    }

    #[test]
    fn checksums_outside_files() {
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).add_checksum("t", 9, 32, 33);
        assert!(matches!(run(&b), Err(LoaderError::OutsideFile { index: 1, start: 32, len: 33, .. })));
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).add_checksum("t", 64, 0, 64);
        assert!(matches!(run(&b), Err(LoaderError::OutsideFile { index: 1, start: 64, len: 1, .. })));
    }

    #[test]
    fn pointer_that_does_not_fit() {
        let mut b = LoaderBuilder::new();
        b.allocate("t", 64, Zone::High).add_pointer("t", 0, 1, "t");
        assert!(matches!(run(&b), Err(LoaderError::PointerOverflow { index: 1, size: 1, .. })));
    }
}
