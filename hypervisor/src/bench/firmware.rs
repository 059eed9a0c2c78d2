//! `snapvisor bench boot --firmware seabios`: how fast firmware boots in a snapvisor VM.
//!
//! Per run: a VM booting the firmware from its reset vector, with COM1 and the debug console
//! captured. Reported: VM creation, start to the firmware's first serial line (its banner),
//! start to its boot attempt (`No bootable device` on either output), and where the exits to the VMM went: count and handling time per port or MMIO
//! page, summed over the runs ([`crate::exit_profile`]).
//!
//! `SNAPVISOR_SAMPLE_RIP_MS=N` also samples vCPU 0 every N ms (pausing the VM for a moment)
//! and prints the 25 most frequent linear instruction addresses, with the CPU mode, to stderr:
//! where the firmware spends its time when the exits do not explain it.

use std::time::{Duration, Instant};

use super::stats::{summarize, Summary};
use crate::boot::files::BootFile;
use crate::cli::run::vm_error;
use crate::cli::CliError;
use crate::exit_profile::{ExitKind, ExitSite};
use crate::vm::{BootSource, SharedOutput, Vm, VmConfig};

/// What SeaBIOS prints first on the serial console.
pub const BANNER: &str = "SeaBIOS (version";
/// The line that means SeaBIOS has tried every boot device.
pub const BOOT_ATTEMPT: [&str; 1] = ["No bootable device"];

#[derive(Debug, serde::Serialize)]
pub struct FirmwareBootReport {
    pub firmware: String,
    pub runs: usize,
    pub mem_mib: u64,
    pub vcpus: u64,
    pub create: Summary,
    pub banner: Summary,
    /// Runs that reached the boot attempt within the timeout.
    pub boot_attempt_reached: usize,
    pub boot_attempt: Option<Summary>,
    /// Exits per run (mean).
    pub exits_per_run: f64,
    /// Handling time of all exits over all runs, and the wall time of the runs.
    pub exit_handling_ms: f64,
    pub wall_ms: f64,
    /// The most expensive exit sites, summed over the runs.
    pub sites: Vec<ExitSite>,
}

/// `text` without ANSI escape sequences (`ESC [ ... final byte`, `ESC c` and other two-byte
/// escapes) and carriage returns, which SeaBIOS's serial console sends around its text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.next() == Some('[') {
                    for d in chars.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

fn reached(out: &SharedOutput, needles: &[&str]) -> bool {
    let text = out.text();
    needles.iter().any(|n| text.contains(n))
}

/// Boots `image` `runs` times.
pub fn measure(
    image: &BootFile,
    runs: usize,
    mem_mib: u64,
    vcpus: u64,
    timeout: Duration,
) -> Result<FirmwareBootReport, CliError> {
    let (mut create, mut banner, mut attempt) = (Vec::new(), Vec::new(), Vec::new());
    let (mut exits, mut handling, mut wall) = (0u64, Duration::ZERO, Duration::ZERO);
    let mut sites: Vec<ExitSite> = Vec::new();
    let sample_every =
        std::env::var("SNAPVISOR_SAMPLE_RIP_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis);
    let mut samples: std::collections::BTreeMap<(&str, u64), u64> = Default::default();
    for run in 0..runs {
        let (serial, debugcon) = (SharedOutput::default(), SharedOutput::default());
        let t0 = Instant::now();
        let mut cfg = VmConfig::new(mem_mib, vcpus, BootSource::Firmware, Box::new(serial.clone()));
        cfg.firmware = Some(image.clone());
        cfg.debugcon_out = Some(Box::new(debugcon.clone()));
        let mut vm = Vm::new(cfg).map_err(vm_error)?;
        create.push(t0.elapsed());
        vm.control().profile.enable(true);
        let start = Instant::now();
        vm.start().map_err(vm_error)?;
        let (mut t_banner, mut t_attempt) = (None, None);
        let mut last_sample = Instant::now();
        while start.elapsed() < timeout && t_attempt.is_none() {
            if sample_every.is_some_and(|every| last_sample.elapsed() >= every) {
                last_sample = Instant::now();
                if vm.pause() {
                    if let Some(fd) = vm.vcpu_fds().first() {
                        let fd = fd.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if let (Ok(r), Ok(sr)) = (fd.get_regs(), fd.get_sregs()) {
                            let at = sr.cs.base.wrapping_add(r.rip);
                            let mode = if sr.cr0 & 1 == 0 {
                                "real"
                            } else if sr.cs.l == 1 {
                                "long"
                            } else {
                                "prot"
                            };
                            *samples.entry((mode, at)).or_insert(0u64) += 1;
                        }
                    }
                    vm.resume();
                }
            }
            if t_banner.is_none() && reached(&serial, &[BANNER]) {
                t_banner = Some(start.elapsed());
            }
            if reached(&serial, &BOOT_ATTEMPT) || reached(&debugcon, &BOOT_ATTEMPT) {
                t_attempt = Some(start.elapsed());
            }
            if vm.control().exit_reason().is_some() && t_attempt.is_none() {
                let why = vm.control().exit_reason().map(|r| r.to_string()).unwrap_or_default();
                return Err(CliError::Internal(format!(
                    "run {run}: the VM ended before the firmware's boot attempt: {why}; its debug console ends with: {}",
                    tail(&debugcon.text(), 400)
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let elapsed = start.elapsed();
        vm.stop("benchmark run done");
        let Some(b) = t_banner.or_else(|| reached(&serial, &[BANNER]).then_some(elapsed)) else {
            return Err(CliError::Internal(format!(
                "run {run}: no `{BANNER}` on the serial console within {timeout:?}; it printed: {}",
                tail(&strip_ansi(&serial.text()), 400)
            )));
        };
        banner.push(b);
        if let Some(a) = t_attempt {
            attempt.push(a);
        }
        wall += elapsed;
        exits += vm.control().exits();
        handling += vm.control().profile.total();
        for s in vm.control().profile.sites() {
            match sites.iter_mut().find(|x| x.kind == s.kind && x.addr == s.addr) {
                Some(x) => {
                    x.count += s.count;
                    x.handling_ns += s.handling_ns;
                }
                None => sites.push(s),
            }
        }
    }
    sites.sort_by_key(|s| std::cmp::Reverse(s.handling_ns));
    if !samples.is_empty() {
        let mut v: Vec<_> = samples.into_iter().collect();
        v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        for ((mode, at), n) in v.iter().take(25) {
            eprintln!("sample {mode} {at:#x} {n}");
        }
    }
    Ok(FirmwareBootReport {
        firmware: image.name.clone(),
        runs,
        mem_mib,
        vcpus,
        create: summarize(&create),
        banner: summarize(&banner),
        boot_attempt_reached: attempt.len(),
        boot_attempt: (!attempt.is_empty()).then(|| summarize(&attempt)),
        exits_per_run: exits as f64 / runs.max(1) as f64,
        exit_handling_ms: handling.as_secs_f64() * 1e3,
        wall_ms: wall.as_secs_f64() * 1e3,
        sites,
    })
}

fn tail(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
    s[start..].to_string()
}

/// Prints the report as a table.
pub fn print(r: &FirmwareBootReport) {
    println!("snapvisor bench boot --firmware {}: {} runs, {} MiB, {} vCPU(s)", r.firmware, r.runs, r.mem_mib, r.vcpus);
    println!("{:<34} {:>12} {:>12} {:>12}", "phase", "median", "p90", "max");
    let ms = |s: &Summary| (s.median_us / 1e3, s.p90_us / 1e3, s.max_us / 1e3);
    let mut rows = vec![("VM creation", ms(&r.create)), ("start -> banner on serial", ms(&r.banner))];
    if let Some(a) = &r.boot_attempt {
        rows.push(("start -> boot attempt", ms(a)));
    }
    for (name, (m, p, x)) in rows {
        println!("{name:<34} {m:>9.1} ms {p:>9.1} ms {x:>9.1} ms");
    }
    if r.boot_attempt_reached < r.runs {
        println!("boot attempt reached in {} of {} runs", r.boot_attempt_reached, r.runs);
    }
    println!(
        "exits: {:.0} per run; handling them took {:.1} ms of {:.1} ms ({:.1}%)",
        r.exits_per_run,
        r.exit_handling_ms,
        r.wall_ms,
        100.0 * r.exit_handling_ms / r.wall_ms.max(f64::MIN_POSITIVE)
    );
    println!("{:<6} {:>12} {:>10} {:>12} {:>8}", "kind", "address", "exits", "handling", "share");
    for s in r.sites.iter().take(12) {
        let kind = match s.kind {
            ExitKind::Pio => "port",
            ExitKind::Mmio => "mmio",
        };
        println!(
            "{kind:<6} {:>#12x} {:>10} {:>9.2} ms {:>7.1}%",
            s.addr,
            s.count,
            s.handling_ns as f64 / 1e6,
            100.0 * s.handling_ns as f64 / 1e6 / r.exit_handling_ms.max(f64::MIN_POSITIVE)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_escapes_are_stripped() {
        assert_eq!(strip_ansi("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\r\n"), "SeaBIOS (version 1.16.2)\n");
        assert_eq!(strip_ansi("plain"), "plain");
        assert_eq!(strip_ansi("cut \x1b["), "cut ");
    }
}
