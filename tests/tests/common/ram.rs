//! Guest RAM compared byte for byte: every block's used bytes, read through the VM's own
//! mappings, against a copy taken earlier (at a snapshot's pause).

use hypervisor::vm::Vm;

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
