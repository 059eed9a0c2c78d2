//! The built-in guests on real KVM, through the library and through `snapvisor run`.

mod common;

use common::{run_builtin, snapvisor};
use hypervisor::control::ExitReason;
use hypervisor::guests::{hello, memfill, BootInfo, Builtin, MemfillMode};
use hypervisor::vm::BuiltinParams;

#[test]
fn hello_prints_its_line_and_exits_zero() {
    let (reason, out, _vm) = run_builtin(Builtin::Hello, 16, BuiltinParams::default());
    assert_eq!(reason, ExitReason::GuestExit { status: 0 });
    assert_eq!(out, hello::GREETING);
}

#[test]
fn hello_through_the_cli() {
    let o = snapvisor(&["run", "--builtin", "hello", "--mem-mib", "16"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), hello::GREETING);
}

/// Parses `pio|dma <name> size <n> select 0x<k>` lines.
fn directory(out: &str, prefix: &str) -> Vec<(String, u64, u64)> {
    out.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 5, "bad directory line {l:?}");
            let sel = u64::from_str_radix(f[4].trim_start_matches("0x"), 16).expect("hex selector");
            (f[0].to_string(), f[2].parse().expect("decimal size"), sel)
        })
        .collect()
}

#[test]
fn fwcfg_reads_the_same_directory_through_pio_and_dma() {
    for vcpus in ["1", "2"] {
        let o = snapvisor(&["run", "--builtin", "fwcfg", "--mem-mib", "32", "--vcpus", vcpus]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {}", String::from_utf8_lossy(&o.stderr));
        assert!(out.contains("fw_cfg signature: QEMU\n"), "{out}");
        assert!(out.contains("fw_cfg features: 0x3\n"), "{out}");
        let pio = directory(&out, "pio ");
        let dma = directory(&out, "dma ");
        assert_eq!(pio, dma);
        // etc/e820 holds the five entries of a 32 MiB guest, 20 bytes each, at the first file key.
        let e820 = pio.iter().find(|(n, ..)| n == "etc/e820").expect("etc/e820 listed");
        let entries = hypervisor::memory::e820_map(32 << 20).len() as u64;
        assert_eq!(e820.1, entries * 20);
        assert!(e820.2 >= 0x20);
        let names: Vec<&String> = pio.iter().map(|(n, ..)| n).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "directory is sorted by name");
        assert!(out.contains(&format!("fw_cfg: PIO and DMA agree on {} files\n", pio.len())), "{out}");
    }
}

fn pass_line(pass: u64, seed: u64, checksum: u64) -> String {
    format!("memfill pass {pass} seed {seed:#x} checksum {checksum:#x} mismatches 0\n")
}

#[test]
fn memfill_fills_all_ram_and_checks_the_previous_pass() {
    let mem_mib = 64;
    let seed = 7;
    let params = BuiltinParams { seed, passes: 3, mode: MemfillMode::Fill, ..Default::default() };
    let (reason, out, vm) = run_builtin(Builtin::Memfill, mem_mib, params);
    assert_eq!(reason, ExitReason::GuestExit { status: 0 }, "{out}");
    let ranges = BootInfo::fill_ranges(&hypervisor::memory::e820_map(mem_mib << 20));
    let expected: String = (0..3).map(|p| pass_line(p, seed + p, memfill::checksum(&ranges, seed + p))).collect();
    assert_eq!(out, expected);
    // The host sees the last pass's pattern in every word of pc.ram it covered.
    let block = vm.ram().block().clone();
    let mut buf = vec![0u8; 1 << 20];
    for &(start, end) in &ranges {
        let mut a = start;
        while a < end {
            let n = (end - a).min(buf.len() as u64) as usize;
            block.read(a, &mut buf[..n]).expect("read pc.ram");
            for (i, w) in buf[..n].chunks_exact(8).enumerate() {
                let addr = a + 8 * i as u64;
                let got = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                assert_eq!(got, memfill::pattern(addr, seed + 2), "word at {addr:#x}");
            }
            a += n as u64;
        }
    }
}

#[test]
fn memfill_verify_reports_a_wrong_pattern() {
    // Fresh memory is zero: verify must fail, exit 1 and name the first bad word.
    let params = BuiltinParams { seed: 5, passes: 1, mode: MemfillMode::Verify, ..Default::default() };
    let (reason, out, _vm) = run_builtin(Builtin::Memfill, 16, params);
    assert_eq!(reason, ExitReason::GuestExit { status: 1 }, "{out}");
    let words = ((16u64 << 20) - memfill_fill_start()) / 8;
    assert!(out.starts_with("memfill verify seed 0x5 checksum "), "{out}");
    assert!(out.contains(&format!(" mismatches {words} first {:#x}\n", memfill_fill_start())), "{out}");
}

fn memfill_fill_start() -> u64 {
    hypervisor::guests::FILL_START
}

#[test]
fn memfill_covers_ram_above_4g() {
    // 3.25 GiB: pc.ram is split, 3 GiB below the hole and 256 MiB from 4 GiB.
    let mem_mib = 3 * 1024 + 256;
    let params = BuiltinParams { seed: 11, passes: 1, mode: MemfillMode::Fill, ..Default::default() };
    let (reason, out, vm) = run_builtin(Builtin::Memfill, mem_mib, params);
    assert_eq!(reason, ExitReason::GuestExit { status: 0 }, "{out}");
    let ranges = BootInfo::fill_ranges(&vm.ram().e820());
    assert_eq!(ranges.last().map(|r| r.0), Some(1 << 32));
    assert_eq!(out, pass_line(0, 11, memfill::checksum(&ranges, 11)));
    // The last word of RAM sits at the end of pc.ram (block offset = size - 8).
    let mut w = [0u8; 8];
    vm.ram().block().read((mem_mib << 20) - 8, &mut w).expect("read pc.ram");
    assert_eq!(u64::from_le_bytes(w), memfill::pattern((1u64 << 32) + (256 << 20) - 8, 11));
}

#[test]
fn idle_guest_runs_until_stopped() {
    let (mut vm, out) = common::start_builtin(Builtin::Idle, 16, BuiltinParams::default());
    let reason = vm.wait(Some(std::time::Duration::from_millis(500)));
    assert_eq!(reason, ExitReason::Timeout { after_ms: 500 });
    assert_eq!(out.text(), hypervisor::guests::idle::READY);
}
