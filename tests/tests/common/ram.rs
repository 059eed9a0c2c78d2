//! Guest RAM compared byte for byte: every block's used bytes, read through the VM's own
//! mappings, against a copy taken earlier (at a snapshot's pause).

use std::fs::File;
use std::os::unix::fs::FileExt;

use hypervisor::vm::Vm;
use storage::ChunkRef;

/// Every RAM block's used bytes, by idstr.
pub type Ram = Vec<(String, Vec<u8>)>;

pub fn ram_of(vm: &Vm) -> Ram {
    let mut out: Ram = vm
        .registry()
        .blocks()
        .iter()
        .map(|b| {
            let mut v = vec![0u8; b.used_length() as usize];
            b.read(0, &mut v).expect("read block");
            (b.idstr().to_string(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

pub fn assert_same_ram(got: &Ram, want: &Ram, what: &str) {
    let names = |r: &Ram| r.iter().map(|(n, v)| (n.clone(), v.len())).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: the same blocks and lengths");
    for ((name, g), (_, w)) in got.iter().zip(want) {
        if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
            let differ = (0..g.len()).filter(|&i| g[i] != w[i]).count();
            panic!(
                "{what}: block {name} differs from the memory at the pause from offset {i:#x} ({differ} bytes differ)"
            );
        }
    }
}

/// Every byte of every block of `vm` equals the snapshot's copy in `store`.
pub fn assert_blocks_match(vm: &Vm, store: &storage::Store, name: &str, what: &str) {
    assert_blocks_match_except(vm, store, name, &[], what);
}

/// [`assert_blocks_match`], except the chunks in `skip` ((idstr, offset)): reading them would
/// touch what a test keeps away from.
pub fn assert_blocks_match_except(vm: &Vm, store: &storage::Store, name: &str, skip: &[(&str, u64)], what: &str) {
    let reader = store.reader(name).expect("reader");
    let manifest = reader.manifest().clone();
    let cs = u64::from(manifest.chunk_size);
    let blocks = vm.registry().blocks();
    let mut names: Vec<&str> = blocks.iter().map(|b| b.idstr()).collect();
    let mut listed: Vec<&str> = manifest.blocks.iter().map(|b| b.idstr.as_str()).collect();
    names.sort_unstable();
    listed.sort_unstable();
    assert_eq!(names, listed, "{what}: the same blocks");
    let mut want = vec![0u8; cs as usize];
    let mut got = vec![0u8; cs as usize];
    for b in &blocks {
        let m = manifest.block(b.idstr()).expect("in the manifest");
        assert_eq!(b.used_length(), m.used_length, "{what}: used length of {}", b.idstr());
        for (i, c) in m.chunks.iter().enumerate() {
            let off = i as u64 * cs;
            if skip.contains(&(b.idstr(), off)) {
                continue;
            }
            let len = cs.min(m.used_length - off) as usize;
            match c {
                ChunkRef::Zero => want[..len].fill(0),
                ChunkRef::Stored(_) => {
                    let n = reader.read_chunk(b.idstr(), off, &mut want).expect("read chunk");
                    assert_eq!(n, len);
                }
            }
            b.read(off, &mut got[..len]).expect("read block");
            if got[..len] != want[..len] {
                let at = (0..len).find(|&k| got[k] != want[k]).unwrap_or(0);
                panic!(
                    "{what}: {} differs from the snapshot at offset {:#x}: {:#04x} != {:#04x}",
                    b.idstr(),
                    off + at as u64,
                    got[at],
                    want[at]
                );
            }
        }
    }
}

/// `/proc/pid/pagemap`: the page (or its pte marker) is userfaultfd write-protected.
const PM_UFFD_WP: u64 = 1 << 57;

/// Pages of the VM's RAM blocks still userfaultfd write-protected, per the page tables.
pub fn protected_pages(vm: &Vm) -> u64 {
    let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
    let mut n = 0;
    for b in vm.registry().blocks() {
        let pages = b.used_length() / 4096;
        let mut raw = vec![0u8; pages as usize * 8];
        pagemap.read_exact_at(&mut raw, b.host_addr() as u64 / 4096 * 8).expect("read pagemap");
        n += raw
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().expect("8 bytes")) & PM_UFFD_WP != 0)
            .count() as u64;
    }
    n
}
