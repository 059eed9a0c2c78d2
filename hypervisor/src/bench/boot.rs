//! `snapvisor bench boot`: how fast a VM comes up and how little an idle one costs.
//!
//! Per iteration: create a VM running `hello` (KVM VM, irqchip, memory, devices, guest load,
//! vCPU set-up), start it, and wait for its exit. Reported: VM creation, start to the guest's
//! first exit to the VMM (its first port write: the closest observable point to "first
//! instruction"), start to guest exit. Then `--idle-vms` VMs running `idle` are kept alive at
//! once and the process's resident memory and thread count are read before and after.

use std::time::{Duration, Instant};

use clap::Args;

use super::stats::{summarize, Summary};
use crate::cli::run::vm_error;
use crate::cli::CliError;
use crate::control::ExitReason;
use crate::guests::Builtin;
use crate::vm::{BootSource, BuiltinParams, SharedOutput, Vm, VmConfig};

#[derive(Debug, Args)]
pub struct BootBenchArgs {
    /// Boots of `hello` to time.
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
    /// Idle VMs to hold at once for the density measurement (0 to skip).
    #[arg(long, default_value_t = 200)]
    pub idle_vms: usize,
    /// Guest memory of each VM, MiB.
    #[arg(long, default_value_t = 64)]
    pub mem_mib: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Boot firmware instead of `hello`: `seabios` or an image path (see `bench::firmware`).
    #[arg(long)]
    pub firmware: Option<String>,
    /// With --firmware: boots to time.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// With --firmware: vCPUs per VM.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u64,
    /// With --firmware: give up on a run after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct BootReport {
    pub iterations: usize,
    pub mem_mib: u64,
    pub create: Summary,
    pub first_exit: Summary,
    pub guest_exit: Summary,
    pub idle: Option<IdleReport>,
}

#[derive(Debug, serde::Serialize)]
pub struct IdleReport {
    pub vms: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_vm_kib: f64,
    pub threads_after: u64,
    pub setup_seconds: f64,
}

fn builtin(guest: Builtin, mem_mib: u64) -> VmConfig {
    VmConfig::new(
        mem_mib,
        1,
        BootSource::Builtin { guest, params: BuiltinParams::default() },
        Box::new(SharedOutput::default()),
    )
}

/// A field of /proc/self/status, in its unit (kB for memory).
fn proc_status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn idle_density(n: usize, mem_mib: u64) -> Result<IdleReport, CliError> {
    let before = proc_status("VmRSS:");
    let t0 = Instant::now();
    let mut vms = Vec::with_capacity(n);
    for _ in 0..n {
        let mut vm = Vm::new(builtin(Builtin::Idle, mem_mib)).map_err(vm_error)?;
        vm.start().map_err(vm_error)?;
        vms.push(vm);
    }
    // Every idle guest has printed its line and halted before we measure.
    for vm in &vms {
        let deadline = Instant::now() + Duration::from_secs(30);
        while vm.control().first_exit().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = proc_status("VmRSS:");
    let threads = proc_status("Threads:");
    let setup_seconds = t0.elapsed().as_secs_f64();
    for mut vm in vms {
        vm.stop("benchmark done");
    }
    Ok(IdleReport {
        vms: n,
        rss_before_kib: before,
        rss_after_kib: after,
        rss_per_vm_kib: after.saturating_sub(before) as f64 / n.max(1) as f64,
        threads_after: threads,
        setup_seconds,
    })
}

pub fn measure(args: &BootBenchArgs) -> Result<BootReport, CliError> {
    let (mut create, mut first, mut exit) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.iterations {
        let t0 = Instant::now();
        let mut vm = Vm::new(builtin(Builtin::Hello, args.mem_mib)).map_err(vm_error)?;
        create.push(t0.elapsed());
        let t1 = Instant::now();
        vm.start().map_err(vm_error)?;
        let reason = vm.wait(Some(Duration::from_secs(30)));
        let done = t1.elapsed();
        if reason != (ExitReason::GuestExit { status: 0 }) {
            return Err(CliError::Internal(format!("boot {i}: hello did not exit cleanly: {reason}")));
        }
        first.push(vm.time_to_first_exit().unwrap_or(done));
        exit.push(done);
    }
    let idle = (args.idle_vms > 0).then(|| idle_density(args.idle_vms, args.mem_mib)).transpose()?;
    Ok(BootReport {
        iterations: args.iterations,
        mem_mib: args.mem_mib,
        create: summarize(&create),
        first_exit: summarize(&first),
        guest_exit: summarize(&exit),
        idle,
    })
}

pub fn run(args: BootBenchArgs) -> Result<(), CliError> {
    if let Some(fw) = &args.firmware {
        let image = crate::cli::run::read_firmware(fw)?;
        let r =
            super::firmware::measure(&image, args.runs, args.mem_mib, args.vcpus, Duration::from_secs(args.timeout))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r).map_err(|e| CliError::Internal(e.to_string()))?);
        } else {
            super::firmware::print(&r);
        }
        return Ok(());
    }
    let r = measure(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).map_err(|e| CliError::Internal(e.to_string()))?);
        return Ok(());
    }
    println!("snapvisor bench boot: {} boots of `hello`, {} MiB each", r.iterations, r.mem_mib);
    println!("{:<28} {:>12} {:>12} {:>12}", "phase", "median", "p90", "max");
    for (name, s) in [
        ("VM creation", &r.create),
        ("start -> first guest exit", &r.first_exit),
        ("start -> guest exit", &r.guest_exit),
    ] {
        println!("{:<28} {:>9.0} us {:>9.0} us {:>9.0} us", name, s.median_us, s.p90_us, s.max_us);
    }
    if let Some(i) = &r.idle {
        println!(
            "idle density: {} VMs alive, RSS {} -> {} KiB, {:.0} KiB per idle VM, {} threads, set up in {:.1} s",
            i.vms, i.rss_before_kib, i.rss_after_kib, i.rss_per_vm_kib, i.threads_after, i.setup_seconds
        );
    }
    Ok(())
}
