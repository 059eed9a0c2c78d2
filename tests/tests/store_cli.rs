//! `snapvisor store ...` and `snapvisor bench store`: argument parsing, output and exit codes.

use hypervisor::bench::store as bench_store;
use hypervisor::cli::store as cli_store;

use clap::Parser;
use storage::{BlockSpec, Store};

#[derive(Debug, clap::Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Debug, clap::Subcommand)]
enum Top {
    Store(cli_store::StoreArgs),
    BenchStore(bench_store::BenchStoreArgs),
}

fn store_args(argv: &[&str]) -> cli_store::StoreArgs {
    let mut full = vec!["snapvisor", "store"];
    full.extend_from_slice(argv);
    match Cli::try_parse_from(full).expect("parse") {
        Cli { cmd: Top::Store(a) } => a,
        other => panic!("parsed as {other:?}"),
    }
}

fn render(argv: &[&str]) -> (String, Result<(), cli_store::StoreCliError>) {
    cli_store::render(&store_args(argv)).expect("render")
}

#[test]
fn store_subcommands_print_tables_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    {
        let store = Store::open(dir.path()).expect("open");
        let spec = BlockSpec {
            idstr: "pc.ram".into(),
            used_length: 1 << 20,
            max_length: 1 << 20,
            page_size: 4096,
            resizeable: false,
        };
        let w = store.begin("vm-a", vec![spec]).expect("begin");
        let mut ram = vec![0u8; 1 << 20];
        ram[..4096].fill(7);
        w.put("pc.ram", 0, &ram).expect("put");
        w.commit(vec![1, 2, 3]).expect("commit");
        store.put_attachment("vm-a", "prefetch", b"0,1").expect("attach");
    }
    let (out, r) = render(&["list", "--store", d]);
    assert!(r.is_ok() && out.contains("vm-a") && out.contains("prefetch") && out.contains("1.00 MiB"), "{out}");
    let (out, _) = render(&["--store", d, "--json", "list"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["name"], "vm-a");
    assert_eq!(v[0]["memory_bytes"], 1 << 20);
    let (out, _) = render(&["inspect", "vm-a", "--store", d]);
    assert!(out.contains("pc.ram") && out.contains("0x100000"), "{out}");
    let (out, _) = render(&["inspect", "vm-a", "--store", d, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["blocks"][0]["chunks"], 16);
    assert_eq!(v["blocks"][0]["zero_chunks"], 15);
    let (out, r) = render(&["verify", "--store", d]);
    assert!(r.is_ok() && out.contains("ok"), "{out}");
    let (out, _) = render(&["du", "--store", d, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["chunks"], 1);
    let (out, r) = render(&["gc", "--store", d]);
    assert!(r.is_ok() && out.contains("removed 0 chunks"), "{out}");

    let e = cli_store::render(&store_args(&["inspect", "nope", "--store", d])).expect_err("missing");
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("'nope'"));
    let e = cli_store::render(&store_args(&["list", "--store", "/nonexistent/store"])).expect_err("no store");
    assert!(e.to_string().contains("/nonexistent/store"), "{e}");
    let e = cli_store::render(&store_args(&["list"])).expect_err("no --store");
    assert!(e.to_string().contains("--store"));
}

#[test]
fn verify_reports_corruption_with_exit_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let store = Store::open(dir.path()).expect("open");
    let spec =
        BlockSpec { idstr: "ram".into(), used_length: 65536, max_length: 65536, page_size: 4096, resizeable: false };
    let w = store.begin("x", vec![spec]).expect("begin");
    w.put("ram", 0, &[5u8; 65536]).expect("put");
    let m = w.commit(Vec::new()).expect("commit");
    let storage::ChunkRef::Stored(h) = m.blocks[0].chunks[0] else { panic!("stored") };
    let loc = store.debug_chunk_location(&h).expect("loc").expect("indexed");
    let path = store.debug_pack_path(loc.pack);
    let mut pack = std::fs::read(&path).expect("read");
    pack[loc.offset as usize + 6] ^= 0xff;
    std::fs::write(&path, pack).expect("write");
    drop(store);
    let (out, r) = render(&["verify", "x", "--store", d]);
    let e = r.expect_err("corrupt");
    assert_eq!(e.exit_code(), 1);
    assert!(out.contains("CORRUPT") && out.contains("'ram'"), "{out}");
}

#[test]
fn verify_reports_a_damaged_attachment_naming_snapshot_and_attachment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    {
        let store = Store::open(dir.path()).expect("open");
        let spec = BlockSpec {
            idstr: "ram".into(),
            used_length: 65536,
            max_length: 65536,
            page_size: 4096,
            resizeable: false,
        };
        let w = store.begin("x", vec![spec]).expect("begin");
        w.put("ram", 0, &[5u8; 65536]).expect("put");
        w.commit(Vec::new()).expect("commit");
        store.put_attachment("x", "prefetch", b"a working-set list").expect("attach");
    }
    let (out, r) = render(&["verify", "x", "--store", d]);
    assert!(r.is_ok() && out.contains(" ok "), "intact before the damage: {out}");
    // One bit of the stored attachment flipped: its crc no longer holds.
    {
        let db = sled::open(dir.path()).expect("the store's sled database");
        let tree = db.open_tree("attachments").expect("attachments");
        let key = [b"x".as_slice(), &[0], b"prefetch"].concat();
        let mut v = tree.get(&key).expect("get").expect("the attachment is stored").to_vec();
        let last = v.len() - 1;
        v[last] ^= 1;
        tree.insert(key, v).expect("insert");
        db.flush().expect("flush");
    }
    for argv in [&["verify", "x", "--store", d][..], &["verify", "--store", d][..]] {
        let (out, r) = render(argv);
        let e = r.expect_err("a damaged attachment is a problem, never ok");
        assert_eq!(e.exit_code(), 1, "{argv:?}: {out}");
        assert!(out.contains("CORRUPT"), "{argv:?}: {out}");
        assert!(out.contains("snapshot 'x' attachment 'prefetch' is corrupt: crc32"), "{argv:?}: {out}");
    }
}

#[test]
fn bench_store_runs_small() {
    let args =
        match Cli::try_parse_from(["snapvisor", "bench-store", "--size-mib", "8", "--clones", "2"]).expect("parse") {
            Cli { cmd: Top::BenchStore(a) } => a,
            other => panic!("parsed as {other:?}"),
        };
    assert_eq!(args.chunk_size, storage::DEFAULT_CHUNK_SIZE);
    let cfg =
        storage::bench::BenchConfig { size_mib: args.size_mib, clones: args.clones, reads: 200, ..Default::default() };
    let r = storage::bench::run(&cfg).expect("bench");
    assert!(r.compression_ratio > 1.5, "{r:?}");
    assert!(r.zero_fraction > 0.3 && r.zero_fraction < 0.9, "{r:?}");
    assert!(r.clone_stored_growth_bytes > 0 && r.clone_stored_growth_bytes < r.stored_bytes, "{r:?}");
    let t = bench_store::table(&r);
    assert!(t.contains("MB/s") && t.contains("p99"), "{t}");
}
