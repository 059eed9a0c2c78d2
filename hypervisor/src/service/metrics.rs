//! Prometheus metrics of the daemon, rendered in the text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the duration histograms.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// A histogram of durations.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i].load(Relaxed));
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Counters the daemon keeps.
#[derive(Default)]
pub struct Metrics {
    pub snapshots: Histogram,
    pub restores: Histogram,
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    /// The store's size when last asked.
    pub last_stored_bytes: AtomicU64,
    /// VM definition files found damaged at the start and not deleted since (defs.rs).
    damaged_definitions: AtomicU64,
}

impl Metrics {
    pub fn snapshot_done(&self, d: Duration) {
        self.snapshots.observe(d);
    }

    pub fn restore_done(&self, d: Duration) {
        self.restores.observe(d);
    }

    pub fn set_damaged_definitions(&self, n: usize) {
        self.damaged_definitions.store(n as u64, Relaxed);
    }

    /// The exposition text; `vms` counts VMs by state, `per_vm` is (name, exits, lazy faults)
    /// of each VM, `bytes_stored` is the store's size.
    pub fn render(&self, vms: &[(&str, usize)], per_vm: &[(String, u64, u64)], bytes_stored: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP snapvisor_vms VMs by state.\n# TYPE snapvisor_vms gauge");
        for (state, n) in vms {
            let _ = writeln!(out, "snapvisor_vms{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP snapvisor_vm_exits_total Exits of a VM's vCPUs to the VMM.\n# TYPE snapvisor_vm_exits_total counter");
        for (vm, exits, _) in per_vm {
            let _ = writeln!(out, "snapvisor_vm_exits_total{{vm=\"{vm}\"}} {exits}");
        }
        let _ = writeln!(out, "# HELP snapvisor_lazy_faults_total Page faults served to a lazily restored VM.\n# TYPE snapvisor_lazy_faults_total counter");
        for (vm, _, faults) in per_vm {
            let _ = writeln!(out, "snapvisor_lazy_faults_total{{vm=\"{vm}\"}} {faults}");
        }
        self.snapshots.render(&mut out, "snapvisor_snapshot_duration_seconds", "Time to take a snapshot.");
        self.restores.render(
            &mut out,
            "snapvisor_restore_duration_seconds",
            "Time from a restore request to a running VM.",
        );
        let _ = writeln!(
            out,
            "# HELP snapvisor_store_bytes Bytes the snapshot store holds.\n# TYPE snapvisor_store_bytes gauge"
        );
        let _ = writeln!(out, "snapvisor_store_bytes {bytes_stored}");
        let _ = writeln!(
            out,
            "# HELP snapvisor_api_requests_total API requests served.\n# TYPE snapvisor_api_requests_total counter"
        );
        let _ = writeln!(out, "snapvisor_api_requests_total {}", self.requests.load(Relaxed));
        let _ = writeln!(out, "# HELP snapvisor_api_errors_total API requests answered with an error.\n# TYPE snapvisor_api_errors_total counter");
        let _ = writeln!(out, "snapvisor_api_errors_total {}", self.request_errors.load(Relaxed));
        let _ = writeln!(out, "# HELP snapvisor_vm_definitions_damaged VM definition files the daemon could not load (the log names each).\n# TYPE snapvisor_vm_definitions_damaged gauge");
        let _ = writeln!(out, "snapvisor_vm_definitions_damaged {}", self.damaged_definitions.load(Relaxed));
        out
    }
}

/// The daemon process itself: its caches with their bounds, resident memory, threads and
/// open files. The caches are the memory the daemon keeps on purpose when no VM is left:
/// the decompressed-chunk cache shared by lazy restores (LRU, at most
/// [`crate::snapshot::restore::SHARED_CACHE_BYTES`]) and sled's page cache (at most
/// `StoreOptions::cache_capacity`, 64 MiB by default).
pub fn render_process(out: &mut String) {
    let cache = crate::snapshot::restore::shared_cache();
    let bases = crate::snapshot::shared_base::shared_bases().live();
    let base_filled: u64 = bases.iter().map(|b| b.stats().bytes_filled).sum();
    let gauges: [(&str, &str, u64); 6] = [
        ("snapvisor_shared_bases", "Snapshots whose memory lazy clones share (one base each).", bases.len() as u64),
        ("snapvisor_shared_base_filled_bytes", "Snapshot memory held in shared bases.", base_filled),
        (
            "snapvisor_lazy_store_read_bytes",
            "Bytes lazy restores and shared bases have read from the store since the daemon started.",
            migrate::snapshot::ram_io::LAZY_STORE_BYTES_READ.load(std::sync::atomic::Ordering::Relaxed),
        ),
        ("snapvisor_chunk_cache_bytes", "Decompressed chunks held for lazy restores.", cache.bytes() as u64),
        (
            "snapvisor_chunk_cache_capacity_bytes",
            "Bound of the decompressed-chunk cache.",
            crate::snapshot::restore::SHARED_CACHE_BYTES as u64,
        ),
        (
            "snapvisor_store_cache_capacity_bytes",
            "Bound of the store index's page cache (sled).",
            storage::StoreOptions::default().cache_capacity,
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    drop(bases);
    // Pre-built VM shells (shell.rs): one kept ready at most.
    let (taken, built) = crate::shell::counts();
    let ready = u64::from(crate::shell::ready_shape().is_some());
    let _ = writeln!(
        out,
        "# HELP snapvisor_vm_shells_ready Pre-built VM shells kept for the next restore (0 or 1).\n# TYPE snapvisor_vm_shells_ready gauge\nsnapvisor_vm_shells_ready {ready}"
    );
    let _ = writeln!(
        out,
        "# HELP snapvisor_vm_shells_taken_total Restores that took a pre-built VM shell.\n# TYPE snapvisor_vm_shells_taken_total counter\nsnapvisor_vm_shells_taken_total {taken}"
    );
    let _ = writeln!(
        out,
        "# HELP snapvisor_vm_shells_built_total VM shells built ahead of time.\n# TYPE snapvisor_vm_shells_built_total counter\nsnapvisor_vm_shells_built_total {built}"
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    if let Some(kib) = field("VmRSS:") {
        let _ = writeln!(
            out,
            "# HELP snapvisor_process_resident_bytes Resident memory of the daemon (guest RAM included).\n# TYPE snapvisor_process_resident_bytes gauge\nsnapvisor_process_resident_bytes {}",
            kib * 1024
        );
    }
    let (rss, pss) = guest_memory_usage();
    let _ = writeln!(
        out,
        "# HELP snapvisor_guest_memory_rss_bytes Resident guest memory (every VM's RAM blocks; pages shared between clones counted in each).\n# TYPE snapvisor_guest_memory_rss_bytes gauge\nsnapvisor_guest_memory_rss_bytes {rss}"
    );
    let _ = writeln!(
        out,
        "# HELP snapvisor_guest_memory_pss_bytes Proportional guest memory (a page shared by N mappings counts 1/N in each): what the VMs' memory costs the host.\n# TYPE snapvisor_guest_memory_pss_bytes gauge\nsnapvisor_guest_memory_pss_bytes {pss}"
    );
    if let Some(n) = field("Threads:") {
        let _ = writeln!(out, "# HELP snapvisor_process_threads Threads of the daemon.\n# TYPE snapvisor_process_threads gauge\nsnapvisor_process_threads {n}");
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(out, "# HELP snapvisor_process_open_fds Open file descriptors of the daemon.\n# TYPE snapvisor_process_open_fds gauge\nsnapvisor_process_open_fds {}", fds.count());
    }
}

/// (Rss, Pss) in bytes of the mappings of every live RAM block in this process, from
/// /proc/self/smaps.
pub fn guest_memory_usage() -> (u64, u64) {
    let ranges = migrate::ram::live_ram_ranges();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    usage_in(&smaps, &ranges)
}

/// (Rss, Pss) in bytes of the parts of the mappings in `smaps` (a /proc/PID/smaps text) that
/// lie in `ranges` (host address ranges, end exclusive).
fn usage_in(smaps: &str, ranges: &[(usize, usize)]) -> (u64, u64) {
    let (mut rss, mut pss) = (0, 0);
    // The share of the current mapping that lies in guest RAM. The kernel may merge a block's
    // mapping with a neighbouring anonymous one (smaps then shows one mapping reaching past
    // the block), so a mapping counts by its overlap with the blocks, pro rata: exact for
    // mappings inside a block, an estimate for a merged one.
    let mut share = 0.0f64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                let overlap: usize = ranges.iter().map(|&(s, e)| e.min(b).saturating_sub(s.max(a))).sum();
                share = if b > a { overlap.min(b - a) as f64 / (b - a) as f64 } else { 0.0 };
                continue;
            }
        }
        if share == 0.0 {
            continue;
        }
        let kib = |v: &str| v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
        let part = |bytes: u64| (bytes as f64 * share) as u64;
        if let Some(v) = line.strip_prefix("Rss:") {
            rss += part(kib(v));
        } else if let Some(v) = line.strip_prefix("Pss:") {
            pss += part(kib(v));
        }
    }
    (rss, pss)
}

#[cfg(test)]
mod tests {
    use super::usage_in;

    const SMAPS: &str = "\
10000-30000 rw-p 00000000 00:00 0
Size:                128 kB
Rss:                 100 kB
Pss:                  40 kB
30000-70000 rw-p 00000000 00:00 0
Size:                256 kB
Rss:                 200 kB
Pss:                 200 kB
7f0000-7f1000 r-xp 00000000 08:01 42 /usr/bin/x
Rss:                   4 kB
Pss:                   4 kB
";

    #[test]
    fn mappings_count_by_their_overlap_with_guest_ram() {
        // A mapping wholly inside a block counts whole.
        assert_eq!(usage_in(SMAPS, &[(0x10000, 0x30000)]), (100 << 10, 40 << 10));
        // A block merged with a neighbour into one mapping (the hostile tester's case: the
        // block is the first half of 0x30000-0x70000) counts its half, not nothing.
        assert_eq!(usage_in(SMAPS, &[(0x30000, 0x50000)]), (100 << 10, 100 << 10));
        // Both, and nothing outside guest RAM.
        assert_eq!(usage_in(SMAPS, &[(0x10000, 0x30000), (0x30000, 0x70000)]), (300 << 10, 240 << 10));
        assert_eq!(usage_in(SMAPS, &[(0x100000, 0x200000)]), (0, 0));
    }
}
