//! Slowing chosen threads of a process down without touching the product: a cgroup (v1 `cpu`
//! controller, which takes single threads) with a CPU quota of 1%, into which the threads
//! whose name starts with a prefix (`uffd-fill`: a lazy restore's fill) are moved. The guest
//! and every other thread run at full speed, so a fill that normally ends in a fraction of a
//! second lasts as long as the test wants. Needs root and the v1 `cpu` hierarchy.

use std::path::PathBuf;

const ROOT: &str = "/sys/fs/cgroup/cpu";

/// Threads of `pid` moved into a throttled cgroup; dropped, they go back and it is removed.
pub struct Throttle {
    dir: PathBuf,
    tids: Vec<u32>,
}

/// Thread ids of `pid` whose name (`comm`) starts with `prefix`.
pub fn threads(pid: u32, prefix: &str) -> Vec<u32> {
    let task = PathBuf::from(format!("/proc/{pid}/task"));
    std::fs::read_dir(&task)
        .map(|d| {
            d.filter_map(|e| {
                let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(task.join(tid.to_string()).join("comm")).ok()?;
                comm.starts_with(prefix).then_some(tid)
            })
            .collect()
        })
        .unwrap_or_default()
}

impl Throttle {
    /// Moves every thread of `pid` named `prefix*` into a cgroup allowed 1% of one CPU. Panics
    /// if there is none.
    pub fn threads(pid: u32, prefix: &str) -> Throttle {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = PathBuf::from(ROOT).join(format!("snapvisor-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e} (needs root)", dir.display()));
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000").expect("period");
        std::fs::write(dir.join("cpu.cfs_quota_us"), "1000").expect("quota");
        let tids = threads(pid, prefix);
        assert!(!tids.is_empty(), "process {pid} has no thread named {prefix}*");
        for t in &tids {
            // A thread that ended meanwhile cannot be moved: nothing to slow down.
            let _ = std::fs::write(dir.join("tasks"), t.to_string());
        }
        Throttle { dir, tids }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        for t in &self.tids {
            let _ = std::fs::write(PathBuf::from(ROOT).join("tasks"), t.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
