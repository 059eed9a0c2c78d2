//! Names of VMs being made are claimed by the request making them: of two requests for the
//! same names (two clones of one prefix, a clone and a restore), one makes its VMs and the
//! other fails at once with 409, having made nothing. Before, two clones of one prefix each
//! took some of the names and both failed, removing everything they had made.

mod common;

use common::daemon::Daemon;
use serde_json::{json, Value};

fn vm_names(d: &Daemon, prefix: &str) -> Vec<String> {
    let vms = d.ok("GET", "/vms", None);
    let mut names: Vec<String> = vms
        .as_array()
        .expect("a list of VMs")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect();
    names.sort();
    names
}

#[test]
fn of_two_concurrent_clones_of_one_prefix_exactly_one_is_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(dir.path(), &[]);
    d.ok("POST", "/vms", Some(json!({"name": "src", "guest": "idle", "mem_mib": 16, "start": true})));
    d.ok("POST", "/vms/src/snapshot", Some(json!({"name": "s"})));
    const COUNT: usize = 6;
    for round in 0..4 {
        let prefix = format!("r{round}-");
        let body = json!({"prefix": prefix, "count": COUNT});
        let results: Vec<(u16, Value)> = std::thread::scope(|s| {
            let calls: Vec<_> =
                (0..2).map(|_| s.spawn(|| d.call("POST", "/snapshots/s/clone", Some(body.clone())))).collect();
            calls.into_iter().map(|c| c.join().expect("a request thread")).collect()
        });
        let made: Vec<&Value> = results.iter().filter(|(st, _)| (200..300).contains(st)).map(|(_, v)| v).collect();
        assert_eq!(made.len(), 1, "round {round}: exactly one of two clones of prefix {prefix} is made: {results:?}");
        assert_eq!(made[0].as_array().map(Vec::len), Some(COUNT), "{results:?}");
        let (status, err) = results.iter().find(|(st, _)| !(200..300).contains(st)).expect("the other request");
        assert_eq!(*status, 409, "round {round}: the other request is a conflict: {err}");
        assert!(err.to_string().contains("nothing was cloned"), "{err}");
        let want: Vec<String> = (0..COUNT).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(vm_names(&d, &prefix), want, "round {round}: the clones of the request that won, no more");
    }
    // A restore to a name a clone made is refused and leaves that clone running.
    let (status, err) = d.call("POST", "/snapshots/s/restore", Some(json!({"vm": "r0-0", "mode": "lazy"})));
    assert_eq!(status, 409, "{err}");
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(d.ok("GET", "/vms/r0-0", None)["state"], "running");
}
