//! Reading a `memfill` guest's output: its pass lines, and whether a restored guest's output
//! continues the original's exactly.

use std::time::{Duration, Instant};

use hypervisor::guests::{memfill, BootInfo};
use hypervisor::vm::SharedOutput;

/// Waits until `out` holds at least `n` lines (or `timeout` passed); returns the text.
pub fn wait_lines(out: &SharedOutput, n: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let t = out.text();
        if t.lines().count() >= n || Instant::now() >= deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `(pass, checksum, mismatches)` of each complete memfill line.
pub fn passes(out: &str) -> Vec<(u64, u64, u64)> {
    let complete = out.rfind('\n').map_or("", |i| &out[..=i]);
    complete
        .lines()
        .filter(|l| l.starts_with("memfill pass "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 9, "malformed line {l:?}");
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
            (f[2].parse().expect("pass"), hex(f[6]), f[8].parse().expect("mismatches"))
        })
        .collect()
}

/// The restored guest's output continues the original's exactly (even mid-line): together they
/// are consecutive passes from 0, each with the right checksum and the previous pattern intact.
pub fn check_continues(before: &str, after: &str, seed: u64, mem_mib: u64) {
    let ranges = BootInfo::fill_ranges(&hypervisor::memory::e820_map(mem_mib << 20));
    let all = format!("{before}{after}");
    let p = passes(&all);
    let done_before = passes(before).len();
    assert!(p.len() > done_before, "the restored guest completed no pass:\nbefore {before:?}\nafter {after:?}");
    assert!(done_before > 0 || !before.is_empty(), "snapshot taken before any output");
    for (i, (pass, sum, mis)) in p.iter().enumerate() {
        assert_eq!(*pass, i as u64, "passes run in order: {all}");
        assert_eq!(*mis, 0, "pass {pass} found the previous pattern damaged: {all}");
        assert_eq!(*sum, memfill::checksum(&ranges, seed + pass), "pass {pass} checksum");
    }
}
