//! Hostile 8: a snapshot's two descriptions of its RAM blocks disagree. The VM state (its
//! RAM-block table, which the size check and the resizes follow) and the store's manifest
//! (whose chunk tables are what is loaded or served) each list every block's lengths and
//! page size. A damaged or forged manifest that is valid on its own but disagrees with the
//! state must be refused by every restore mode, naming the block and both values, before
//! anything is loaded: never a block whose tail keeps the destination's bytes, never a VM
//! that stops later on a chunk "beyond the snapshot's copy".

mod common;
use common::noise;
use common::ram::assert_blocks_match;

use std::sync::Arc;

use hypervisor::guests::Builtin;
use hypervisor::snapshot::{self, RestoreMode, RestoreOptions, SaveOptions};
use hypervisor::vm::{BootSource, BuiltinParams, FwCfgFile, SharedOutput, Vm, VmConfig};
use migrate::lazy::BaseRegistry;
use migrate::snapshot::format::VmSnapshot;
use storage::Manifest;

const BLOB: &str = "/rom@opt/snapvisor/blob";
/// Four 64 KiB chunks and a bit: the blob's block is 0x41000 bytes.
const BLOB_LEN: usize = 4 * 65536 + 100;

/// A stopped idle guest with a resizeable fw_cfg blob of noise, snapshotted as `name`.
fn snapshot_with_blob(store: &storage::Store, name: &str) {
    let mut cfg = VmConfig::new(
        8,
        1,
        BootSource::Builtin { guest: Builtin::Idle, params: BuiltinParams::default() },
        Box::new(SharedOutput::default()),
    );
    cfg.fw_cfg_files = vec![FwCfgFile { name: "opt/snapvisor/blob".into(), data: noise(BLOB_LEN, 8) }];
    let vm = Vm::new(cfg).expect("vm");
    // Some noise in guest RAM too, so that no chunk of pc.ram is all zero by chance.
    let ram = vm.registry().get("pc.ram").expect("pc.ram");
    ram.write(0x10_0000, &noise(0x30_0000, 9)).expect("fill pc.ram");
    snapshot::save(&vm, store, name, &SaveOptions::default(), &|_| {}).expect("snapshot");
}

/// Every restore mode, shared clones included.
fn every_mode() -> Vec<(&'static str, RestoreOptions)> {
    let out = || Box::new(SharedOutput::default());
    let clone =
        RestoreOptions { shared_base: Some(BaseRegistry::new()), ..RestoreOptions::new(RestoreMode::Lazy, out()) };
    vec![
        ("eager", RestoreOptions::new(RestoreMode::Eager, out())),
        ("lazy", RestoreOptions { background_fill: false, ..RestoreOptions::new(RestoreMode::Lazy, out()) }),
        ("lazy with fill", RestoreOptions::new(RestoreMode::Lazy, out())),
        ("prefetch", RestoreOptions::new(RestoreMode::LazyPrefetch, out())),
        ("prefetch-before", RestoreOptions::new(RestoreMode::LazyPrefetchBefore, out())),
        ("shared clone", clone),
    ]
}

/// Block `idstr` of `m`.
fn block<'a>(m: &'a mut Manifest, idstr: &str) -> &'a mut storage::BlockManifest {
    m.blocks.iter_mut().find(|b| b.idstr == idstr).expect("block")
}

/// Stores `m` (re-encoded, so that it passes the manifest's own checks) as `name`'s manifest.
fn put_manifest(store: &storage::Store, name: &str, m: &Manifest) {
    store.debug_put_raw_manifest(name, &m.encode().expect("encode")).expect("put manifest");
}

/// Every mode refuses `name`, its error containing each of `words`; no pin is left behind.
/// A disagreement between state and manifest is named as one.
fn refused_every_way(store: &Arc<storage::Store>, name: &str, words: &[&str], what: &str) {
    for (mode, opts) in every_mode() {
        let e = match snapshot::restore(store, name, opts) {
            Ok(_) => panic!("{what}: the {mode} restore succeeded"),
            Err(e) => e.to_string(),
        };
        for w in words {
            assert!(e.contains(w), "{what}: the {mode} restore's error names {w:?}: {e}");
        }
        assert!(store.pin_holders(name).is_empty(), "{what}: the refused {mode} restore left a pin");
    }
}

#[test]
fn a_manifest_whose_block_lengths_disagree_with_the_state_is_refused_by_every_restore_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(storage::Store::open(dir.path()).expect("store"));
    snapshot_with_blob(&store, "s");
    let good = store.manifest("s").expect("manifest");
    let cs = u64::from(good.chunk_size);

    // Shorter in the manifest than in the state, chunk table cut to match: pc.ram and the blob.
    for idstr in ["pc.ram", BLOB] {
        let mut m = good.clone();
        let b = block(&mut m, idstr);
        let (was, now) = (b.used_length, b.used_length - 2 * cs);
        b.used_length = now;
        b.chunks.truncate(now.div_ceil(cs) as usize);
        put_manifest(&store, "s", &m);
        refused_every_way(
            &store,
            "s",
            &["manifest", idstr, &format!("{was:#x}"), &format!("{now:#x}")],
            &format!("{idstr} short"),
        );
    }
    // Longer in the manifest (the blob's max length allows it), chunk table extended.
    {
        let mut m = good.clone();
        let b = block(&mut m, BLOB);
        let (was, now) = (b.used_length, b.used_length + cs);
        b.used_length = now;
        b.max_length = b.max_length.max(now);
        b.chunks.push(storage::ChunkRef::Zero);
        put_manifest(&store, "s", &m);
        refused_every_way(&store, "s", &["manifest", BLOB, &format!("{was:#x}"), &format!("{now:#x}")], "blob long");
    }
    // Another page size or max length for the same used length.
    {
        let mut m = good.clone();
        block(&mut m, "pc.ram").page_size = 2 << 20;
        put_manifest(&store, "s", &m);
        refused_every_way(&store, "s", &["manifest", "pc.ram", "page size"], "page size");
        let mut m = good.clone();
        let b = block(&mut m, BLOB);
        b.max_length *= 2;
        let max = b.max_length;
        put_manifest(&store, "s", &m);
        refused_every_way(&store, "s", &["manifest", BLOB, &format!("{max:#x}")], "max length");
    }
    // A block the state lists and the manifest lacks, and one the manifest lists alone.
    {
        let mut m = good.clone();
        m.blocks.retain(|b| b.idstr != BLOB);
        put_manifest(&store, "s", &m);
        refused_every_way(&store, "s", &["manifest", BLOB], "blob missing from the manifest");
        let mut m = good.clone();
        let mut extra = block(&mut m, BLOB).clone();
        extra.idstr = "/rom@opt/snapvisor/other".into();
        m.blocks.push(extra);
        put_manifest(&store, "s", &m);
        refused_every_way(&store, "s", &["manifest", "/rom@opt/snapvisor/other"], "a block only in the manifest");
    }
    // The state's table forged instead (the manifest as written): the blob shorter there.
    {
        let mut m = good.clone();
        let mut state = VmSnapshot::decode(&m.state).expect("state");
        let d = state.ram.iter_mut().find(|d| d.idstr == BLOB).expect("blob in the state");
        d.used_length -= 2 * cs;
        d.unaligned_length = d.used_length - 100;
        let now = d.used_length;
        m.state = state.encode().expect("encode state");
        put_manifest(&store, "s", &m);
        refused_every_way(&store, "s", &["manifest", BLOB, &format!("{now:#x}")], "state short");
    }
    // The state's unaligned length of the blob in an earlier page than its used length: the
    // resize to it would leave the block shorter than what is loaded into it.
    {
        let mut m = good.clone();
        let mut state = VmSnapshot::decode(&m.state).expect("state");
        let d = state.ram.iter_mut().find(|d| d.idstr == BLOB).expect("blob in the state");
        d.unaligned_length = 1;
        let used = d.used_length;
        m.state = state.encode().expect("encode state");
        put_manifest(&store, "s", &m);
        refused_every_way(&store, "s", &[BLOB, "0x1 ", &format!("{used:#x}")], "state unaligned length");
    }

    // Whole again, it restores byte for byte in every mode.
    put_manifest(&store, "s", &good);
    for (mode, opts) in every_mode() {
        let (vm, _) = snapshot::restore(&store, "s", opts).unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_blocks_match(&vm, &store, "s", mode);
    }
}
