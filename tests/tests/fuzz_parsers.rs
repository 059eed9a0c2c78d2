//! Fuzzing the parsers an attacker reaches, on the stable toolchain: API request bodies (decoded
//! in process, and sent to a real daemon over its socket), the snapshot state file, the store
//! manifest, stored chunk values (every codec), and fw_cfg's port and DMA interface as a guest
//! drives it.
//!
//! Each target mutates valid seeds (bit flips, byte sets, insertions, deletions, duplicated
//! and spliced ranges, JSON/CBOR tokens) with a seeded RNG for `SNAPVISOR_FUZZ_SECS` seconds
//! (default 2) and checks that nothing panics and the target's invariants hold. A failure
//! prints the RNG seed and the input; `SNAPVISOR_FUZZ_SEED=N` replays a run. The test command
//! runs each target for the default few seconds; a longer run:
//!
//!     SNAPVISOR_FUZZ_SECS=600 cargo nextest run --release -p snapvisor-tests --test fuzz_parsers
//!
//! (cargo-fuzz/libFuzzer would need a nightly toolchain that CI does not install; this harness
//! needs nothing but `rand`.)

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn budget() -> Duration {
    let secs = std::env::var("SNAPVISOR_FUZZ_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(2.0);
    Duration::from_secs_f64(secs.max(0.1))
}

fn rng() -> (u64, StdRng) {
    let seed = std::env::var("SNAPVISOR_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    (seed, StdRng::seed_from_u64(seed))
}

/// Tokens worth inserting: JSON structure, edge numbers, CBOR headers.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\"\\u0000\"",
    b"\"../../etc/shadow\"",
    b"\xff",
    b"\x00",
    b"\x9f",
    b"\xbf",
    b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff",
];

/// One mutation of a seed (or a splice of two).
fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.gen_range(0..seeds.len())].clone();
    for _ in 0..rng.gen_range(1..=8) {
        let len = v.len();
        match rng.gen_range(0..7) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] = rng.gen();
            }
            2 => {
                let i = rng.gen_range(0..=len);
                let t = TOKENS[rng.gen_range(0..TOKENS.len())];
                v.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.gen_range(0..len);
                let b = rng.gen_range(a..=len.min(a + 64));
                v.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.gen_range(0..len);
                let b = rng.gen_range(a..=len.min(a + 64));
                let piece = v[a..b].to_vec();
                let at = rng.gen_range(0..=v.len());
                v.splice(at..at, piece);
            }
            5 => {
                let other = &seeds[rng.gen_range(0..seeds.len())];
                let cut = rng.gen_range(0..=len);
                let from = rng.gen_range(0..=other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ => {
                let i = rng.gen_range(0..=len);
                let n = rng.gen_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                v.splice(i..i, bytes);
            }
        }
    }
    v
}

/// Runs `check` on mutated seeds for the time budget; a panic fails with the seed and input.
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, mut check: impl FnMut(&[u8])) -> u64 {
    let (seed, mut rng) = rng();
    let deadline = Instant::now() + budget();
    let mut n = 0u64;
    // Every seed as it is first, then mutations.
    for s in &seeds {
        check(s);
    }
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &seeds);
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            panic!(
                "fuzz target {name}: input #{n} panicked (replay with SNAPVISOR_FUZZ_SEED={seed}); input {:02x?}",
                input
            );
        }
        n += 1;
    }
    eprintln!("fuzz target {name}: {n} inputs in {:?} (SNAPVISOR_FUZZ_SEED={seed})", budget());
    n
}

fn json_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"name":"a","guest":"memfill","mem_mib":64,"vcpus":2,"seed":7,"passes":0,"start":true}"#,
        r#"{"name":"k","kernel":"vmlinuz","initrd":"initrd.img","cmdline":"console=ttyS0","mem_mib":256}"#,
        r#"{"name":"s1","live":true,"async":true}"#,
        r#"{"vm":"r","mode":"lazy-prefetch"}"#,
        r#"{"prefix":"c","count":8,"mode":"eager","async":false}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

#[test]
fn fuzz_api_request_bodies() {
    let accepted = std::cell::Cell::new(0u64);
    let n = fuzz("api-bodies", json_seeds(), |input| {
        accepted.set(accepted.get() + hypervisor::service::api::decode_bodies(input) as u64);
    });
    assert!(n > 100, "only {n} inputs");
    assert!(accepted.get() > 0, "no mutated body was ever accepted: the seeds are not valid bodies");
}

/// The same bodies through a real daemon: every request is answered, with a 2xx or 4xx (never
/// a 5xx, never a dropped connection), and the daemon stays up.
#[test]
fn fuzz_api_over_the_socket() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let mut child = Command::new(common::snapvisor_bin())
        .args(["serve", "--max-guest-memory", "64", "--socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let routes = ["/vms", "/vms/a/snapshot", "/snapshots/s1/restore", "/snapshots/s1/clone", "/vms/a/start"];
    let (seed, mut rng) = rng();
    let seeds = json_seeds();
    let end = Instant::now() + budget();
    let mut n = 0;
    while Instant::now() < end {
        let body = mutate(&mut rng, &seeds);
        let route = routes[rng.gen_range(0..routes.len())];
        let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("the daemon is up");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let head = format!(
            "POST {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("write");
        // The daemon may answer (e.g. 404) and close before reading the body.
        let _ = s.write_all(&body);
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("an answer");
        let (status, text) = hypervisor::service::client::parse_response(&out).expect("an HTTP response");
        assert!(
            status < 500,
            "POST {route} {:?} got {status} {text} (SNAPVISOR_FUZZ_SEED={seed})",
            String::from_utf8_lossy(&body)
        );
        n += 1;
    }
    eprintln!("fuzz target api-socket: {n} requests (SNAPVISOR_FUZZ_SEED={seed})");
    assert!(child.try_wait().expect("wait").is_none(), "the daemon died");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn fuzz_snapshot_state_file() {
    use hypervisor::vm::MachineSpec;
    use migrate::snapshot::format::{RamBlockDesc, VmSnapshot};
    let mut snap = VmSnapshot::default();
    snap.ram.push(RamBlockDesc {
        idstr: "pc.ram".into(),
        used_length: 64 << 20,
        unaligned_length: 64 << 20,
        max_length: 64 << 20,
        page_size: 4096,
        resizeable: false,
    });
    snap.ram.push(RamBlockDesc {
        idstr: "/rom@etc/acpi/tables".into(),
        used_length: 0x20000,
        unaligned_length: 0x1f123,
        max_length: 2 << 20,
        page_size: 4096,
        resizeable: true,
    });
    let spec = MachineSpec {
        mem_mib: 64,
        vcpus: 2,
        guest: "builtin:memfill".into(),
        fw_cfg_files: vec![("opt/x".into(), 5)],
        firmware: Some(hypervisor::vm::FirmwareSpec { name: "seabios".into(), size: 0x2_0000 }),
        acpi_tables: Vec::new(),
        uuid: None,
        net: Vec::new(),
        builtin: Some(hypervisor::vm::BuiltinSpec { seed: 7, passes: 0 }),
    };
    snap.put("machine", &spec).expect("put");
    snap.put("fw_cfg", &devices::fw_cfg::FwCfgState { selector: Some(0x19), offset: 3, dma_high: 0 }).expect("put");
    let seed = snap.encode().expect("encode");
    assert!(VmSnapshot::decode(&seed).is_ok(), "the seed decodes");
    fuzz_checksummed("snapshot-state", seed, (28, 16, 8, 24), |input| {
        if let Ok(s) = VmSnapshot::decode(input) {
            // What decode accepts is valid, and its fragments decode or fail cleanly.
            s.validate().expect("decode returned an invalid snapshot");
            let _ = s.get::<MachineSpec>("machine");
            let _ = s.get::<devices::fw_cfg::FwCfgState>("fw_cfg");
            if let Ok(again) = s.encode() {
                assert!(VmSnapshot::decode(&again).is_ok(), "a decoded snapshot re-encodes to something decodable");
            }
        }
    });
}

/// Re-wraps a mutated body under a header with the right length and CRC, so that mutations
/// reach the decoder behind the checksum: `len_at`/`len_size` and `crc_at` locate the fields.
fn rewrap(seed: &[u8], header: usize, len_at: usize, len_size: usize, crc_at: usize, body: &[u8]) -> Vec<u8> {
    let mut out = seed[..header].to_vec();
    out[len_at..len_at + len_size].copy_from_slice(&(body.len() as u64).to_le_bytes()[..len_size]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Fuzzes a checksummed format: a quarter of the inputs are mutated whole (header checks),
/// the rest mutate the body and get a valid header (the decoder behind the checksum).
fn fuzz_checksummed(
    name: &str,
    seed: Vec<u8>,
    layout: (usize, usize, usize, usize),
    mut check: impl FnMut(&[u8]),
) -> u64 {
    let (header, len_at, len_size, crc_at) = layout;
    let bodies = vec![seed[header..].to_vec()];
    let (rseed, mut rng) = rng();
    let deadline = Instant::now() + budget();
    let mut n = 0u64;
    check(&seed);
    while Instant::now() < deadline {
        let input = if rng.gen_range(0..4) == 0 {
            mutate(&mut rng, std::slice::from_ref(&seed))
        } else {
            rewrap(&seed, header, len_at, len_size, crc_at, &mutate(&mut rng, &bodies))
        };
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            panic!(
                "fuzz target {name}: input #{n} panicked (replay with SNAPVISOR_FUZZ_SEED={rseed}); input {input:02x?}"
            );
        }
        n += 1;
    }
    eprintln!("fuzz target {name}: {n} inputs in {:?} (SNAPVISOR_FUZZ_SEED={rseed})", budget());
    n
}

/// A stored chunk value (codec byte, length, payload: zstd, raw or LZ4) read from a pack:
/// whatever the bytes, decoding never panics, and it succeeds only with bytes that hash to
/// the chunk; on an error the buffer is zeroed.
#[test]
fn fuzz_store_chunk_values() {
    use storage::{Codec, Hash};
    const LEN: usize = 4096;
    let data: Vec<u8> = (0..LEN as u64 / 8)
        .flat_map(|i| if i % 4 == 0 { i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes() } else { [0; 8] })
        .collect();
    let hash = Hash::of(&data);
    let noise: Vec<u8> = (0..LEN as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let seeds = vec![
        storage::encode_chunk_with(&data, Codec::Lz4).expect("lz4"),
        storage::encode_chunk_with(&data, Codec::Zstd(-1)).expect("zstd"),
        storage::encode_chunk_with(&noise, Codec::Lz4).expect("raw"),
    ];
    let ok = std::cell::Cell::new(0u64);
    let mut buf = vec![0u8; LEN];
    let n = fuzz("store-chunk-value", seeds, |input| {
        buf.fill(0x5a);
        match storage::decode_chunk_into(&hash, input, LEN, &mut buf) {
            Ok(()) => {
                ok.set(ok.get() + 1);
                assert!(buf == data, "a value decoded to bytes other than the chunk's");
            }
            Err(_) => assert!(buf.iter().all(|b| *b == 0), "the buffer is zeroed after an error"),
        }
    });
    assert!(n > 100, "only {n} inputs");
    eprintln!("store-chunk-value: {} of {n} inputs decoded (to the right bytes)", ok.get());
}

#[test]
fn fuzz_store_manifest() {
    use storage::{BlockManifest, ChunkRef, Hash, Manifest};
    let m = Manifest {
        name: "s1".into(),
        chunk_size: 64 * 1024,
        created_unix_ms: 1_700_000_000_000,
        state: b"opaque state".to_vec(),
        blocks: vec![
            BlockManifest {
                idstr: "pc.ram".into(),
                used_length: 0x30000,
                max_length: 0x30000,
                page_size: 4096,
                resizeable: false,
                chunks: vec![ChunkRef::Zero, ChunkRef::Stored(Hash([7; 32])), ChunkRef::Zero],
            },
            BlockManifest {
                idstr: "/rom@etc/acpi/tables".into(),
                used_length: 0x1000,
                max_length: 0x20_0000,
                page_size: 4096,
                resizeable: true,
                chunks: vec![ChunkRef::Stored(Hash([9; 32]))],
            },
        ],
    };
    let seed = m.encode().expect("encode");
    assert_eq!(Manifest::decode(&seed).expect("the seed decodes"), m);
    let valid = std::cell::Cell::new(0u64);
    let n = fuzz_checksummed("store-manifest", seed, (16, 8, 4, 12), |input| {
        if let Ok(m) = Manifest::decode(input) {
            valid.set(valid.get() + 1);
            // Whatever decodes is consistent: one chunk per chunk_size of used_length.
            for b in &m.blocks {
                assert_eq!(b.chunks.len() as u64, b.used_length.div_ceil(u64::from(m.chunk_size)));
                assert!(b.used_length <= b.max_length);
            }
            let again = m.encode().expect("re-encode");
            assert_eq!(Manifest::decode(&again).expect("round trip"), m);
        }
    });
    assert!(n > 100, "only {n} inputs");
    eprintln!("store-manifest: {} of {n} mutated manifests decoded", valid.get());
}

#[test]
fn fuzz_fw_cfg_ports_and_dma() {
    use devices::bus::BusDevice;
    use devices::fw_cfg::{FwCfg, FwCfgState, PORT_BASE, PORT_DATA, PORT_DMA, PORT_SELECTOR};
    use migrate::ram::{GuestMemory, RamBlockConfig, RamRegistry};
    let (seed, mut rng) = rng();
    let deadline = Instant::now() + budget();
    let (mut runs, mut ops) = (0u64, 0u64);
    while Instant::now() < deadline {
        // A fresh device per run: 64 KiB of guest memory, a read-only and a writable file.
        let block = RamRegistry::new()
            .add(RamBlockConfig {
                idstr: "pc.ram".into(),
                size: 64 << 10,
                max_size: 64 << 10,
                page_size: 0,
                resizeable: false,
            })
            .expect("memory");
        let mem = GuestMemory::flat(block);
        let mut f = FwCfg::new(mem.clone());
        f.add_file("opt/ro", vec![0xaa; 100]).expect("ro file");
        f.add_file_with_callbacks("opt/rw", vec![0; 32], None, Some(Box::new(|_, _| {}))).expect("rw file");
        let trace = std::cell::RefCell::new(Vec::new());
        let run = catch_unwind(AssertUnwindSafe(|| {
            for _ in 0..rng.gen_range(1..200) {
                let op = rng.gen_range(0..8u8);
                trace.borrow_mut().push(op);
                match op {
                    0 => {
                        let key: u16 = if rng.gen() { rng.gen_range(0..0x24) } else { rng.gen() };
                        f.write(PORT_BASE, PORT_SELECTOR, &key.to_le_bytes());
                    }
                    1 | 2 => {
                        let mut b = vec![0u8; rng.gen_range(1..=8)];
                        f.read(PORT_BASE, PORT_DATA, &mut b);
                    }
                    3 => {
                        let mut b = vec![0u8; rng.gen_range(0..=9)];
                        let off = rng.gen_range(0..16);
                        f.read(PORT_BASE, off, &mut b);
                    }
                    4 => {
                        let b: Vec<u8> = (0..rng.gen_range(0..=9)).map(|_| rng.gen()).collect();
                        f.write(PORT_BASE, rng.gen_range(0..16), &b);
                    }
                    5 | 6 => {
                        // A DMA descriptor (control, length, address) somewhere in or past memory.
                        let at: u64 = if rng.gen() { rng.gen_range(0..(64 << 10)) } else { rng.gen() };
                        let control: u32 =
                            if rng.gen() { 1 << rng.gen_range(0..6) | rng.gen::<u32>() << 16 } else { rng.gen() };
                        let len: u32 = if rng.gen() { rng.gen_range(0..200) } else { rng.gen() };
                        let addr: u64 = if rng.gen() { rng.gen_range(0..(64 << 10)) } else { rng.gen() };
                        let mut d = Vec::new();
                        d.extend_from_slice(&control.to_be_bytes());
                        d.extend_from_slice(&len.to_be_bytes());
                        d.extend_from_slice(&addr.to_be_bytes());
                        let _ = mem.write(at, &d);
                        if op == 5 {
                            f.write(PORT_BASE, PORT_DMA, &((at >> 32) as u32).to_be_bytes());
                            f.write(PORT_BASE, PORT_DMA + 4, &(at as u32).to_be_bytes());
                        } else {
                            f.write(PORT_BASE, PORT_DMA, &at.to_be_bytes());
                        }
                    }
                    _ => {
                        // Restored state is untrusted too.
                        let s = FwCfgState {
                            selector: rng.gen::<bool>().then(|| rng.gen()),
                            offset: rng.gen(),
                            dma_high: rng.gen(),
                        };
                        let _ = f.restore(&s);
                    }
                }
                ops += 1;
            }
        }));
        assert!(run.is_ok(), "fw_cfg panicked on ops {:?} (replay with SNAPVISOR_FUZZ_SEED={seed})", trace.borrow());
        // Guest writes never resize an item.
        assert_eq!(f.file("opt/ro").map(|(_, size)| size), Some(100), "SNAPVISOR_FUZZ_SEED={seed}");
        assert_eq!(f.file("opt/rw").map(|(_, size)| size), Some(32), "SNAPVISOR_FUZZ_SEED={seed}");
        runs += 1;
    }
    eprintln!("fuzz target fw_cfg: {runs} devices, {ops} register operations (SNAPVISOR_FUZZ_SEED={seed})");
    assert!(ops > 1000, "only {ops} operations");
}
