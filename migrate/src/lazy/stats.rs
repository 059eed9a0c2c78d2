//! Per-restore statistics of the page server, updated with relaxed atomics on the fault path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Upper bounds (µs) of the fault service time histogram buckets; the last bucket is open.
pub const FAULT_BUCKETS_US: [u64; 12] = [10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000];

/// Live counters.
#[derive(Debug)]
pub struct LazyStats {
    started: Instant,
    pub faults: AtomicU64,
    pub chunks_on_fault: AtomicU64,
    pub chunks_prefetched: AtomicU64,
    pub chunks_background: AtomicU64,
    pub zero_chunks: AtomicU64,
    /// Times a thread found the chunk it wanted claimed by another (a fault then waits for it).
    pub races: AtomicU64,
    pub bytes_stored_read: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub fault_time_ns: AtomicU64,
    /// Chunks of the working set loaded (on a fault or from the prefetch list, not by the
    /// background fill) and the time spent on them reading them from the source (store read,
    /// decompression, hash check) and placing them (`UFFDIO_COPY` / `UFFDIO_ZEROPAGE`).
    pub ws_chunks: AtomicU64,
    pub source_ns: AtomicU64,
    pub place_ns: AtomicU64,
    /// CPU time (of the threads themselves, `CLOCK_THREAD_CPUTIME_ID`) the loaders of the
    /// prefetch list spent loading it: what a listed chunk costs whatever else the host runs.
    pub list_cpu_ns: AtomicU64,
    hist: [AtomicU64; FAULT_BUCKETS_US.len() + 1],
    resident: OnceLock<Duration>,
}

/// A copy of the counters at one moment, for reports.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StatsSnapshot {
    pub faults: u64,
    pub chunks_on_fault: u64,
    pub chunks_prefetched: u64,
    pub chunks_background: u64,
    pub zero_chunks: u64,
    pub races: u64,
    pub bytes_stored_read: u64,
    pub bytes_copied: u64,
    pub mean_fault_us: f64,
    /// Mean time per working-set chunk (loaded on a fault or from the prefetch list) reading
    /// it from the source: store read, decompression and hash check.
    pub mean_source_us: f64,
    /// Mean time per working-set chunk placing it into guest memory.
    pub mean_place_us: f64,
    /// CPU time the loaders of the prefetch list spent on it, ms (their own threads' time:
    /// store read, decompression, hash check, placing, claims), for `chunks_prefetched`.
    pub list_cpu_ms: f64,
    /// Faults per bucket of [`FAULT_BUCKETS_US`] (last: slower than the last bound).
    pub fault_histogram: Vec<u64>,
    /// Time from the server's start until every chunk was resident.
    pub resident_after_ms: Option<f64>,
}

impl LazyStats {
    pub fn new() -> Self {
        LazyStats {
            started: Instant::now(),
            faults: AtomicU64::new(0),
            chunks_on_fault: AtomicU64::new(0),
            chunks_prefetched: AtomicU64::new(0),
            chunks_background: AtomicU64::new(0),
            zero_chunks: AtomicU64::new(0),
            races: AtomicU64::new(0),
            bytes_stored_read: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            fault_time_ns: AtomicU64::new(0),
            ws_chunks: AtomicU64::new(0),
            source_ns: AtomicU64::new(0),
            place_ns: AtomicU64::new(0),
            list_cpu_ns: AtomicU64::new(0),
            hist: Default::default(),
            resident: OnceLock::new(),
        }
    }

    pub fn record_fault(&self, took: Duration) {
        self.faults.fetch_add(1, Relaxed);
        self.fault_time_ns.fetch_add(took.as_nanos() as u64, Relaxed);
        let us = took.as_micros() as u64;
        let bucket = FAULT_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(FAULT_BUCKETS_US.len());
        self.hist[bucket].fetch_add(1, Relaxed);
    }

    /// A working-set chunk was loaded: `source` reading it, `place` placing it.
    pub fn record_load(&self, source: Duration, place: Duration) {
        self.ws_chunks.fetch_add(1, Relaxed);
        self.source_ns.fetch_add(source.as_nanos() as u64, Relaxed);
        self.place_ns.fetch_add(place.as_nanos() as u64, Relaxed);
    }

    /// A loader spent `cpu_ns` of its own CPU time on the prefetch list.
    pub fn record_list_cpu(&self, cpu_ns: u64) {
        self.list_cpu_ns.fetch_add(cpu_ns, Relaxed);
    }

    pub fn mark_resident(&self) {
        self.resident.get_or_init(|| self.started.elapsed());
    }

    pub fn resident_after(&self) -> Option<Duration> {
        self.resident.get().copied()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let faults = self.faults.load(Relaxed);
        let loaded = self.ws_chunks.load(Relaxed);
        let per_chunk = |ns: &AtomicU64| if loaded == 0 { 0.0 } else { ns.load(Relaxed) as f64 / loaded as f64 / 1e3 };
        StatsSnapshot {
            faults,
            chunks_on_fault: self.chunks_on_fault.load(Relaxed),
            chunks_prefetched: self.chunks_prefetched.load(Relaxed),
            chunks_background: self.chunks_background.load(Relaxed),
            zero_chunks: self.zero_chunks.load(Relaxed),
            races: self.races.load(Relaxed),
            bytes_stored_read: self.bytes_stored_read.load(Relaxed),
            bytes_copied: self.bytes_copied.load(Relaxed),
            mean_fault_us: if faults == 0 {
                0.0
            } else {
                self.fault_time_ns.load(Relaxed) as f64 / faults as f64 / 1e3
            },
            mean_source_us: per_chunk(&self.source_ns),
            mean_place_us: per_chunk(&self.place_ns),
            list_cpu_ms: self.list_cpu_ns.load(Relaxed) as f64 / 1e6,
            fault_histogram: self.hist.iter().map(|h| h.load(Relaxed)).collect(),
            resident_after_ms: self.resident_after().map(|d| d.as_secs_f64() * 1e3),
        }
    }
}

impl Default for LazyStats {
    fn default() -> Self {
        Self::new()
    }
}

/// CPU time of the calling thread, ns (0 if the clock cannot be read).
pub(super) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let s = LazyStats::new();
        s.record_fault(Duration::from_micros(5));
        s.record_fault(Duration::from_micros(15));
        s.record_fault(Duration::from_secs(1));
        let snap = s.snapshot();
        assert_eq!(snap.faults, 3);
        assert_eq!(snap.fault_histogram[0], 1);
        assert_eq!(snap.fault_histogram[1], 1);
        assert_eq!(snap.fault_histogram[FAULT_BUCKETS_US.len()], 1);
        assert!(snap.resident_after_ms.is_none());
        s.mark_resident();
        assert!(s.snapshot().resident_after_ms.is_some());
    }
}
