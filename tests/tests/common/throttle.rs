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
    /// Waits (at most 30 s, polling every 50 µs) for threads of `pid` named `prefix*` to
    /// appear, and moves them (and those that appear within the next 2 ms) into a cgroup
    /// allowed 1% of one CPU. Panics if none appeared.
    pub fn threads(pid: u32, prefix: &str) -> Throttle {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = PathBuf::from(ROOT).join(format!("snapvisor-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e} (needs root)", dir.display()));
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000").expect("period");
        std::fs::write(dir.join("cpu.cfs_quota_us"), "1000").expect("quota");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut tids = Vec::new();
        let mut first_seen = None;
        loop {
            for t in threads(pid, prefix) {
                if !tids.contains(&t) {
                    // A thread that ended meanwhile cannot be moved: nothing to slow down.
                    let _ = std::fs::write(dir.join("tasks"), t.to_string());
                    tids.push(t);
                    first_seen.get_or_insert_with(std::time::Instant::now);
                }
            }
            let now = std::time::Instant::now();
            if first_seen.is_some_and(|f| now - f > std::time::Duration::from_millis(2)) || now > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        let t = Throttle { dir, tids };
        assert!(!t.tids.is_empty(), "process {pid} started no thread named {prefix}*");
        t
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
