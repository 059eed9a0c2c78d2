//! A snapshot deleted and taken again under the same name, and GC run, while a restore of it
//! starts or serves faults (hostile3), many rounds through the daemon. Two memfill VMs with
//! different seeds run; snapshot `s` is taken from one of them; each round restores `s`
//! (eager, lazy, lazy-prefetch in turn) while another thread, after a random delay, deletes
//! `s` (retrying while a restore pins it), takes `s` again from the *other* VM and runs GC.
//! The restore either fails clearly (409 "taken again", 404) or its guest runs on exactly one
//! snapshot's memory: memfill checks all its RAM against the previous pass's pattern at every
//! pass, so memory mixed from two snapshots (other seeds, other passes) shows mismatches.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::json;

const ROUNDS: u64 = 32;

#[test]
fn delete_and_retake_during_restores_never_mixes_two_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Arc::new(Daemon::start(dir.path(), &[]));
    for (vm, seed) in [("a", 11), ("b", 22)] {
        d.ok(
            "POST",
            "/vms",
            Some(json!({"name": vm, "guest": "memfill", "mem_mib": 16, "seed": seed, "passes": 0, "start": true})),
        );
        d.wait_serial(vm, "memfill pass 1 ", Duration::from_secs(60));
    }
    d.ok("POST", "/vms/a/snapshot", Some(json!({"name": "s", "mode": "stop"})));
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut made, mut refused, mut retaken) = (0, 0, 0);
    for round in 0..ROUNDS {
        let mode = ["eager", "lazy", "lazy-prefetch", "clone"][(round % 4) as usize];
        // Odd rounds: the retake starts first and the restore comes 0-10 ms later (it meets a
        // deleted, half-retaken or new snapshot); even rounds the other way round.
        let delay = Duration::from_micros(rnd() % 10_000);
        let (retake_delay, restore_delay) =
            if round % 8 < 4 { (delay, Duration::ZERO) } else { (Duration::ZERO, delay) };
        let source = if round % 16 < 8 { "b" } else { "a" };
        let d2 = d.clone();
        let retake = std::thread::spawn(move || {
            std::thread::sleep(retake_delay);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (s, v) = d2.call("DELETE", "/snapshots/s", None);
                match s {
                    200..=299 => break,
                    409 => {
                        assert!(v.to_string().contains("VM"), "a refused delete names the VMs: {v}");
                        assert!(Instant::now() < deadline, "s stayed pinned: {v}");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    _ => panic!("delete s: {s} {v}"),
                }
            }
            d2.ok("POST", &format!("/vms/{source}/snapshot"), Some(json!({"name": "s", "mode": "stop"})));
            d2.ok("POST", "/store/gc", None);
        });
        let vm = format!("r{round}");
        std::thread::sleep(restore_delay);
        let (s, v) = if mode == "clone" {
            // Two clones sharing one base (the default memory), named `r{round}c0`, `r{round}c1`.
            d.call("POST", "/snapshots/s/clone", Some(json!({"prefix": format!("{vm}c"), "count": 2})))
        } else {
            d.call("POST", "/snapshots/s/restore", Some(json!({"vm": vm, "mode": mode})))
        };
        let vms: Vec<String> =
            if mode == "clone" { (0..2).map(|i| format!("{vm}c{i}")).collect() } else { vec![vm.clone()] };
        match s {
            200..=299 => {
                made += 1;
                for vm in &vms {
                    // Two complete passes, each checking the whole of RAM.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let (_, out) = d.call("GET", &format!("/vms/{vm}/serial"), None);
                        let text = out.as_str().map(String::from).unwrap_or_default();
                        let p = common::memfill::passes(&text);
                        if p.len() >= 2 {
                            assert!(
                                p.iter().all(|(_, _, mis)| *mis == 0),
                                "round {round} ({mode}, {vm}, retake after {delay:?}): the restored guest found mixed memory: {text}"
                            );
                            break;
                        }
                        let info = d.ok("GET", &format!("/vms/{vm}"), None);
                        assert_eq!(
                            info.get("state").and_then(|s| s.as_str()),
                            Some("running"),
                            "round {round}: {info}"
                        );
                        assert!(Instant::now() < deadline, "round {round}: no passes: {text}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            409 | 404 => {
                refused += 1;
                let msg = v.to_string();
                eprintln!("round {round} ({mode}): {s} {msg}");
                assert!(msg.contains("'s'"), "round {round}: the error names the snapshot: {msg}");
            }
            _ => panic!("round {round} ({mode}): restore answered {s} {v}"),
        }
        retake.join().expect("retake thread");
        retaken += 1;
        for vm in &vms {
            d.call("DELETE", &format!("/vms/{vm}"), None);
        }
    }
    eprintln!("{made} restores ran, {refused} refused, {retaken} retakes");
    assert!(made > 0, "no restore ran");
    // The store is consistent: every chunk of the last `s` is there.
    let (s, v) = d.call("POST", "/snapshots/s/restore", Some(json!({"vm": "last", "mode": "eager"})));
    assert!((200..300).contains(&s), "{s} {v}");
}
