//! Store integrity (issue 9, items 5, 7, 8): damage to the index is an error and never turns
//! into deletion; read-only commands never write or collect; `store repair` rebuilds the
//! index from the packs and the manifest files; collected packs free their space in the same
//! process; hostile files where the store opens them are refused.
//!
//! Some cases need an uncleanly closed store: the test re-executes its own binary with
//! `STORE_INTEGRITY_CHILD=<dir>`, and the child exits without closing the store.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use hypervisor::cli::store as cli_store;
use storage::{BlockSpec, ChunkRef, Store, StoreOptions};

const CS: u32 = 16 * 1024;
const CHILD_ENV: &str = "STORE_INTEGRITY_CHILD";

fn opts() -> StoreOptions {
    StoreOptions { chunk_size: CS, ..Default::default() }
}

#[derive(Debug, clap::Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Debug, clap::Subcommand)]
enum Top {
    Store(cli_store::StoreArgs),
}

/// Runs `snapvisor store ARGV...` in process: Ok(output) or Err((exit status, message)).
fn cli(argv: &[&str]) -> Result<String, (u8, String)> {
    let mut full = vec!["snapvisor", "store"];
    full.extend_from_slice(argv);
    let Cli { cmd: Top::Store(args) } = Cli::try_parse_from(full).expect("parse");
    match cli_store::render(&args) {
        Ok((out, Ok(()))) => Ok(out),
        Ok((out, Err(e))) => Err((e.exit_code(), format!("{e}\n{out}"))),
        Err(e) => Err((e.exit_code(), e.to_string())),
    }
}

/// Incompressible-ish content of snapshot `name`, block `b`: a pure function of both.
fn content(name: &str, b: usize, len: usize) -> Vec<u8> {
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3));
    let mut x = (seed ^ (b as u64 + 1)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 64) as u8
        })
        .collect();
    // One zero chunk and, unless the name starts with "solo", one chunk shared by every
    // snapshot (dedup).
    out[CS as usize..2 * CS as usize].fill(0);
    if !name.starts_with("solo") {
        out[2 * CS as usize..3 * CS as usize].fill(0x5a);
    }
    out
}

const SNAPS: [&str; 3] = ["alpha", "beta", "gamma"];
const LEN: usize = 40 * CS as usize + 4096;

fn write(store: &Store, name: &str) {
    let specs = (0..2)
        .map(|b| BlockSpec {
            idstr: format!("block{b}"),
            used_length: LEN as u64,
            max_length: LEN as u64,
            page_size: 4096,
            resizeable: b == 1,
        })
        .collect();
    let w = store.begin(name, specs).expect("begin");
    for b in 0..2 {
        w.put(&format!("block{b}"), 0, &content(name, b, LEN)).expect("put");
    }
    w.commit(format!("state of {name}").into_bytes()).expect("commit");
}

/// A store holding [`SNAPS`], closed cleanly.
fn populated() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path(), opts()).expect("open");
    for name in SNAPS {
        write(&store, name);
    }
    drop(store);
    dir
}

/// Every snapshot in [`SNAPS`] is listed and reads back byte-exact.
fn check_all(store: &Store) {
    assert_eq!(store.list().expect("list"), SNAPS.to_vec());
    for name in SNAPS {
        let r = store.reader(name).expect("reader");
        assert_eq!(r.manifest().state, format!("state of {name}").into_bytes());
        for b in 0..2 {
            let mut buf = vec![0xee; LEN];
            r.read_at(&format!("block{b}"), 0, &mut buf).unwrap_or_else(|e| panic!("{name} block{b}: {e}"));
            assert!(buf == content(name, b, LEN), "{name} block{b} differs");
        }
    }
}

/// Name and full contents of every pack file: compared before and after an operation that
/// must not touch chunk data.
fn packs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir.join("packs"))
        .expect("packs dir")
        .map(|e| {
            let p = e.expect("entry").path();
            let bytes = std::fs::read(&p).expect("read pack");
            (p, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty() && out.iter().all(|(_, b)| !b.is_empty()), "no pack data to protect");
    out
}

/// Truncates sled's `db` file to half its size (the store was cut at 60000 bytes;
/// this small store's db is about 40 KiB).
fn truncate_db(dir: &Path) {
    let db = dir.join("db");
    let before = std::fs::metadata(&db).expect("db").len();
    assert!(before > 8192, "db is only {before} bytes");
    let len = before / 2;
    std::fs::OpenOptions::new().write(true).open(&db).expect("open db").set_len(len).expect("truncate");
}

fn flip_db_bytes(dir: &Path) {
    let db = dir.join("db");
    let mut bytes = std::fs::read(&db).expect("read db");
    let n = bytes.len();
    assert!(n > 4096, "db is only {n} bytes");
    for i in (0..n).step_by(n / 64) {
        bytes[i] ^= 0xa5;
    }
    std::fs::write(&db, bytes).expect("write db");
}

#[test]
fn truncated_index_is_an_error_and_keeps_every_pack_byte() {
    let dir = populated();
    let d = dir.path().to_str().expect("utf-8");
    let before = packs(dir.path());
    truncate_db(dir.path());
    let verify = cli(&["verify", "--store", d]);
    let (code, msg) = verify.expect_err("verify of a store with a truncated index must fail");
    assert_ne!(code, 0, "{msg}");
    eprintln!("verify after truncation: exit {code}: {msg}");
    let gc = cli(&["gc", "--store", d]);
    let (_, msg) = gc.expect_err("gc of a store with a truncated index must fail");
    assert!(msg.contains("repair"), "the error must say how to recover: {msg}");
    assert!(packs(dir.path()) == before, "pack data changed");
    let e = Store::open_with(dir.path(), opts()).expect_err("open of a truncated index");
    eprintln!("open after truncation: {e}");
}

#[test]
fn deleted_index_is_an_error_and_is_not_recreated() {
    let dir = populated();
    let d = dir.path().to_str().expect("utf-8");
    let before = packs(dir.path());
    std::fs::remove_file(dir.path().join("db")).expect("delete db");
    let (code, msg) = cli(&["gc", "--store", d]).expect_err("gc without an index must fail");
    eprintln!("gc without db: exit {code}: {msg}");
    assert!(msg.contains("db") && msg.contains("repair"), "{msg}");
    assert!(cli(&["list", "--store", d]).is_err(), "list without an index must fail, not show an empty store");
    let e = Store::open_with(dir.path(), opts()).expect_err("open without db").to_string();
    assert!(e.contains(d) && e.contains("repair"), "{e}");
    assert!(!dir.path().join("db").exists(), "a fresh index was created inside the store");
    assert!(packs(dir.path()) == before, "pack data changed");
}

#[test]
fn repair_rebuilds_the_index_after_deletion_truncation_and_flipped_bytes() {
    for damage in ["delete", "truncate", "flip"] {
        let dir = populated();
        let d = dir.path().to_str().expect("utf-8");
        match damage {
            "delete" => std::fs::remove_file(dir.path().join("db")).expect("delete db"),
            "truncate" => truncate_db(dir.path()),
            _ => flip_db_bytes(dir.path()),
        }
        let out = cli(&["repair", "--store", d]).unwrap_or_else(|(c, m)| panic!("repair after {damage}: {c}: {m}"));
        eprintln!("repair after {damage}:\n{out}");
        assert!(out.contains("3 snapshots"), "{out}");
        let store = Store::open_with(dir.path(), opts()).expect("open after repair");
        check_all(&store);
        assert!(store.verify_all().expect("verify").iter().all(|r| r.ok()));
        drop(store);
        cli(&["verify", "--store", d]).unwrap_or_else(|(c, m)| panic!("verify after repair ({damage}): {c}: {m}"));
    }
}

/// Child: commits `kept`, leaves an uncommitted writer's chunks in the index, and exits
/// without closing the store.
fn unclean_child(dir: &str) -> ! {
    let store = Store::open_with(dir, opts()).expect("child open");
    write(&store, "kept");
    let spec = BlockSpec {
        idstr: "ram".into(),
        used_length: 8 * 16384,
        max_length: 8 * 16384,
        page_size: 4096,
        resizeable: false,
    };
    let w = store.begin("never-committed", vec![spec]).expect("begin");
    w.put("ram", 0, &content("never-committed", 0, LEN)[..8 * 16384]).expect("put");
    store.flush().expect("flush");
    std::process::exit(0)
}

fn unclean_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current_exe");
    let status = Command::new(exe)
        .args(["read_only_commands_never_collect", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .status()
        .expect("run child");
    assert!(status.success(), "child failed: {status}");
    dir
}

fn du_chunks(d: &str) -> u64 {
    let out = cli(&["du", "--store", d, "--json"]).expect("du");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["chunks"].as_u64().expect("chunks")
}

#[test]
fn read_only_commands_never_collect() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        unclean_child(&dir);
    }
    let dir = unclean_store();
    let d = dir.path().to_str().expect("utf-8");
    let before = packs(dir.path());
    let chunks = du_chunks(d);
    // `kept`: 2 blocks x 39 private non-zero chunks + 1 shared; the interrupted writer added
    // 6 more (of its 8 chunks one is zero and one is the shared one).
    assert_eq!(chunks, 2 * 39 + 1 + 6, "du collected the interrupted writer's chunks");
    cli(&["list", "--store", d]).expect("list");
    cli(&["inspect", "kept", "--store", d]).expect("inspect");
    cli(&["verify", "--store", d]).expect("verify");
    assert_eq!(du_chunks(d), chunks, "a read-only command collected chunks");
    assert!(packs(dir.path()) == before, "a read-only command changed pack data");
    // A read-write open does recover: it removes exactly the interrupted writer's chunks.
    let store = Store::open_with(dir.path(), opts()).expect("open");
    assert_eq!(store.usage().expect("usage").chunks, 2 * 39 + 1);
    assert!(store.verify("kept").expect("verify").ok());
}

#[test]
fn verify_checks_the_index_against_the_packs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    let store = Store::open_with(dir.path(), opts()).expect("open");
    write(&store, "alpha");
    // An indexed chunk no snapshot references (an abandoned writer, not yet collected).
    let spec =
        BlockSpec { idstr: "ram".into(), used_length: 16384, max_length: 16384, page_size: 4096, resizeable: false };
    let data = content("abandoned", 0, LEN);
    let w = store.begin("abandoned", vec![spec]).expect("begin");
    w.put("ram", 0, &data[..16384]).expect("put");
    drop(w);
    let hash = storage::Hash::of(&data[..16384]);
    let loc = store.debug_chunk_location(&hash).expect("loc").expect("indexed");
    let path = store.debug_pack_path(loc.pack);
    drop(store);
    cli(&["verify", "--store", d]).expect("verify before damage");
    let mut pack = std::fs::read(&path).expect("read pack");
    pack[loc.offset as usize + loc.len as usize / 2] ^= 0xff;
    std::fs::write(&path, pack).expect("write pack");
    let (code, msg) = cli(&["verify", "--store", d]).expect_err("index and pack disagree");
    assert_eq!(code, 1, "{msg}");
    eprintln!("verify: {msg}");
}

#[test]
fn symlinked_or_fifo_pack_files_are_refused() {
    for kind in ["symlink", "fifo"] {
        let dir = populated();
        let pack = dir.path().join("packs").join("00000000.pack");
        let moved = dir.path().join("elsewhere.pack");
        std::fs::rename(&pack, &moved).expect("move pack");
        if kind == "symlink" {
            std::os::unix::fs::symlink(&moved, &pack).expect("symlink");
        } else {
            nix::unistd::mkfifo(&pack, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        }
        let store = Store::open_with(dir.path(), opts()).expect("open");
        let r = store.reader("alpha").expect("reader");
        let mut buf = vec![0u8; LEN];
        let e = r.read_at("block0", 0, &mut buf).expect_err("read through a replaced pack file").to_string();
        assert!(e.contains("00000000.pack") || e.contains("regular file"), "{kind}: {e}");
        assert!(buf.iter().all(|b| *b == 0), "{kind}: wrong bytes served");
    }
}

#[test]
fn gc_frees_disk_space_of_collected_packs_in_the_same_process() {
    let outer = tempfile::tempdir().expect("tempdir");
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(outer.path())
        .output()
        .expect("run mount(8)");
    assert!(out.status.success(), "needs root to mount a tmpfs: {}", String::from_utf8_lossy(&out.stderr));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _umount = Umount(outer.path().to_path_buf());
    let dir = outer.path().join("store");
    let free = || {
        let st = nix::sys::statvfs::statvfs(outer.path()).expect("statvfs");
        st.blocks_available() * st.fragment_size()
    };
    let old = {
        let store = Store::open_with(&dir, opts()).expect("open");
        write(&store, "solo-a"); // pack 0, closed with this handle
        store.list().expect("list")
    };
    assert_eq!(old, ["solo-a"]);
    let store = Store::open_with(&dir, opts()).expect("reopen");
    check_one(&store, "solo-a"); // opens pack 0 in this process
    write(&store, "solo-b"); // pack 1: shares no chunk with pack 0
    let before = free();
    store.delete("solo-a").expect("delete");
    let gc = store.gc().expect("gc");
    let after = free();
    eprintln!("gc {gc:?}: free space {before} -> {after}");
    assert!(!store.debug_pack_path(0).exists(), "pack 0 should be deleted");
    // solo-a's 2 x 40 chunks were about 1 MiB of values on disk.
    assert!(after >= before + 500_000, "free space {before} -> {after}: the deleted pack is still held open");
    check_one(&store, "solo-b");
}

fn check_one(store: &Store, name: &str) {
    let r = store.reader(name).expect("reader");
    for b in 0..2 {
        let mut buf = vec![0u8; LEN];
        r.read_at(&format!("block{b}"), 0, &mut buf).expect("read");
        assert!(buf == content(name, b, LEN), "{name} block{b}");
        assert!(matches!(r.manifest().blocks[b].chunks[1], ChunkRef::Zero));
    }
}

#[test]
fn damaged_index_of_an_unclean_store_stops_the_open_and_collects_nothing() {
    let dir = unclean_store();
    let before = packs(dir.path());
    truncate_db(dir.path());
    let e = Store::open_with(dir.path(), opts()).expect_err("recovery on a truncated index must fail").to_string();
    eprintln!("open: {e}");
    assert!(e.contains("repair"), "{e}");
    assert!(packs(dir.path()) == before, "a failed recovery changed pack data");
    // The failed open left the store unclean: the next open still refuses.
    assert!(Store::open_with(dir.path(), opts()).is_err());
    let out = cli(&["repair", "--store", dir.path().to_str().expect("utf-8")]).expect("repair");
    assert!(out.contains("1 snapshots: kept"), "{out}");
    let store = Store::open_with(dir.path(), opts()).expect("open after repair");
    assert!(store.verify("kept").expect("verify").ok());
}

#[test]
fn manifest_files_that_are_symlinks_or_damaged_are_errors() {
    let dir = populated();
    let d = dir.path().to_str().expect("utf-8");
    let file = dir.path().join("manifests").join("beta");
    let saved = std::fs::read(&file).expect("manifest file of beta");
    // A symlink where a manifest file belongs: opening the store is an error naming it.
    let elsewhere = dir.path().join("beta.elsewhere");
    std::fs::write(&elsewhere, &saved).expect("copy");
    std::fs::remove_file(&file).expect("remove");
    std::os::unix::fs::symlink(&elsewhere, &file).expect("symlink");
    let e = Store::open_with(dir.path(), opts()).expect_err("symlinked manifest file").to_string();
    assert!(e.contains("manifests/beta") && e.contains("symlink"), "{e}");
    // A flipped byte in a manifest file: verify fails; repair takes the index's copy.
    std::fs::remove_file(&file).expect("remove symlink");
    let mut damaged = saved.clone();
    let n = damaged.len();
    damaged[n / 2] ^= 0x10;
    std::fs::write(&file, &damaged).expect("write damaged");
    let (code, msg) = cli(&["verify", "--store", d]).expect_err("verify of a damaged manifest file");
    assert_eq!(code, 1, "{msg}");
    assert!(msg.contains("manifests/beta"), "{msg}");
    let out = cli(&["repair", "--store", d]).expect("repair");
    assert!(out.contains("3 snapshots") && out.contains("from the old index: beta"), "{out}");
    assert_eq!(std::fs::read(&file).expect("rewritten"), saved);
    check_all(&Store::open_with(dir.path(), opts()).expect("open"));
}

#[test]
fn a_store_without_its_marker_is_refused_with_its_format() {
    let dir = populated();
    let _ = std::fs::remove_file(dir.path().join("snapvisor-store"));
    let e = Store::open_with(dir.path(), opts()).expect_err("store without marker").to_string();
    assert!(e.contains("format 1") && e.contains("format 2"), "{e}");
    let e = Store::open_with(dir.path().join("packs"), opts()).expect_err("packs/ is no store");
    eprintln!("{e}");
}

#[test]
fn huge_planted_files_are_refused_without_reading_them() {
    let dir = populated();
    let d = dir.path().to_str().expect("utf-8");
    let start = std::time::Instant::now();
    // A 64 GiB sparse "manifest file" and a 64 GiB sparse pack without a header.
    let huge = dir.path().join("manifests").join("huge");
    std::fs::File::create(&huge).expect("create").set_len(64 << 30).expect("sparse manifest file");
    let e = Store::open_with(dir.path(), opts()).expect_err("open with a huge manifest file").to_string();
    assert!(e.contains("manifests/huge") && e.contains("more than"), "{e}");
    std::fs::remove_file(&huge).expect("remove");
    let pack = dir.path().join("packs").join("00000009.pack");
    std::fs::File::create(&pack).expect("create").set_len(64 << 30).expect("sparse pack");
    let (code, msg) = cli(&["verify", "--store", d]).expect_err("verify with a headerless pack");
    assert_eq!(code, 1, "{msg}");
    assert!(msg.contains("00000009.pack"), "{msg}");
    let out = cli(&["repair", "--store", d]).expect("repair");
    assert!(out.contains("unreadable pack") && out.contains("00000009.pack") && out.contains("3 snapshots"), "{out}");
    check_all(&Store::open_with(dir.path(), opts()).expect("open"));
    assert!(start.elapsed() < std::time::Duration::from_secs(60), "took {:?}", start.elapsed());
}

#[test]
fn damaged_pack_header_is_an_error_and_repair_rewrites_it() {
    let dir = populated();
    let d = dir.path().to_str().expect("utf-8");
    let pack = dir.path().join("packs").join("00000000.pack");
    let mut bytes = std::fs::read(&pack).expect("read pack");
    bytes[1] ^= 0xff;
    std::fs::write(&pack, &bytes).expect("write pack");
    let store = Store::open_with(dir.path(), opts()).expect("open");
    let mut buf = vec![0u8; LEN];
    let e = store.reader("alpha").expect("reader").read_at("block0", 0, &mut buf).expect_err("read").to_string();
    assert!(e.contains("00000000.pack") && e.contains("magic"), "{e}");
    let e = store.gc().expect_err("gc over a damaged pack header").to_string();
    assert!(e.contains("repair"), "{e}");
    drop(store);
    assert_eq!(std::fs::read(&pack).expect("read pack"), bytes, "gc changed the damaged pack");
    let (code, msg) = cli(&["verify", "--store", d]).expect_err("verify");
    assert_eq!(code, 1, "{msg}");
    let out = cli(&["repair", "--store", d]).expect("repair");
    assert!(out.contains("pack header rewritten") && out.contains("3 snapshots"), "{out}");
    check_all(&Store::open_with(dir.path(), opts()).expect("open"));
}

/// Flips one bit at byte `at` of file `rel` of the store in `dir` (`at` counts from the end
/// when negative).
fn flip(dir: &Path, rel: &str, at: i64) {
    let path = dir.join(rel);
    let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let i = if at < 0 { bytes.len() - at.unsigned_abs() as usize } else { at as usize };
    bytes[i] ^= 0x01;
    std::fs::write(&path, bytes).expect("write");
}

/// One damaged byte in any file of a cleanly closed store fails `store verify` (exit 1) with
/// an error naming the file. Before, verify passed a damaged crc of sled's `conf` (sled only
/// warns about it) and a damaged last record of sled's `db` (sled drops a log tail whose crc
/// fails as a torn write, here the clean mark); the files whose damage the open itself finds
/// (marker, `conf`, `db`'s tail, the clean-close witness) fail the open too. Which byte of
/// each file matters to whom: storage/src/sledfiles.rs.
#[test]
fn a_flipped_byte_in_any_file_of_the_store_is_an_error_naming_it() {
    // (file, byte, also refused by the open, what the error names)
    let cases: [(&str, i64, bool, &str); 11] = [
        ("snapvisor-store", -1, true, "snapvisor-store"),
        ("snapvisor-store", 0, true, "snapvisor-store"),
        ("conf", -1, true, "conf"),
        ("conf", -4, true, "conf"),
        ("conf", 0, true, "conf"),
        ("conf", 20, true, "conf"),
        ("db", -1, true, "db"),
        ("snapvisor-closed", -1, true, "snapvisor-closed"),
        ("manifests/beta", -1, false, "manifests/beta"),
        ("packs/00000000.pack", -1, false, "pack 0 "),
        ("packs/00000000.pack", 3, false, "pack 0:"),
    ];
    for (rel, at, at_open, names) in cases {
        let dir = populated();
        let d = dir.path().to_str().expect("utf-8");
        flip(dir.path(), rel, at);
        let (code, msg) =
            cli(&["verify", "--store", d]).expect_err(&format!("verify passed a flipped byte {at} of {rel}"));
        assert_eq!(code, 1, "{rel} byte {at}: {msg}");
        assert!(msg.contains(names), "{rel} byte {at}: the error does not name {names}: {msg}");
        if at_open {
            let e = Store::open_with(dir.path(), opts()).expect_err(&format!("open with byte {at} of {rel} flipped"));
            assert!(e.to_string().contains(names), "{rel} byte {at}: {e}");
        }
    }
}

/// sled treats a `conf` of 8 bytes or less as absent and writes a new one; a store whose
/// `conf` was truncated or deleted is refused instead, and repair rebuilds the index.
#[test]
fn a_truncated_or_missing_sled_conf_is_refused_and_repair_fixes_it() {
    for damage in ["truncate", "delete"] {
        let dir = populated();
        let d = dir.path().to_str().expect("utf-8");
        let conf = dir.path().join("conf");
        if damage == "truncate" {
            std::fs::OpenOptions::new().write(true).open(&conf).expect("open conf").set_len(8).expect("truncate");
        } else {
            std::fs::remove_file(&conf).expect("delete conf");
        }
        let (code, msg) = cli(&["verify", "--store", d]).expect_err(&format!("verify after {damage} of conf"));
        assert_eq!(code, 1, "{damage}: {msg}");
        assert!(msg.contains("conf") && msg.contains("repair"), "{damage}: {msg}");
        let e = Store::open_with(dir.path(), opts()).expect_err("open").to_string();
        assert!(e.contains("conf"), "{damage}: {e}");
        let out = cli(&["repair", "--store", d]).unwrap_or_else(|(c, m)| panic!("repair after {damage}: {c}: {m}"));
        assert!(out.contains("3 snapshots"), "{out}");
        check_all(&Store::open_with(dir.path(), opts()).expect("open after repair"));
        cli(&["verify", "--store", d]).unwrap_or_else(|(c, m)| panic!("verify after repair ({damage}): {c}: {m}"));
    }
}

/// A symlink planted at the clean-close witness's temporary name is not followed: the close
/// neither writes the witness text through it (the file it points to stays as it was) nor
/// renames it into place as `snapvisor-closed` (after which the store no longer opened: "is a
/// symlink"). Found by a hostile tester.
#[test]
fn a_symlink_at_the_witness_temporary_is_not_followed_and_the_store_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("s");
    drop(Store::open_with(&store_dir, opts()).expect("create"));
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious\n").expect("victim");
    std::os::unix::fs::symlink(&victim, store_dir.join(".snapvisor-closed.tmp")).expect("symlink");
    drop(Store::open_with(&store_dir, opts()).expect("reopen"));
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious\n", "the close wrote through the symlink");
    drop(Store::open_with(&store_dir, opts()).expect("the store opens after its clean close"));
}
