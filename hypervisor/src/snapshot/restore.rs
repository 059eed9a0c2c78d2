//! Restoring a snapshot into a new VM: eagerly (every page before the vCPUs start) or lazily
//! (pages served by userfaultfd as the guest touches them, optionally prefetching the working
//! set a previous restore recorded).
//!
//! Order: build a VM of the snapshot's shape (while the manifest is read and checked on
//! another thread: see `restore`); check every RAM block against it and refuse,
//! listing every problem, before anything is written; resize the resizeable blocks (their
//! hooks run, so fw_cfg reports the snapshot's sizes); load or register pages; then device,
//! in-kernel device and vCPU state. The VM is returned ready to start.
//!
//! The destination's blocks are not blank (its fw_cfg files are written into theirs), so a
//! restore replaces every byte: eager zeroes the snapshot's all-zero chunks, lazy drops every
//! present page of a block before registering it, since userfaultfd serves only missing pages.
//! A lazy restore's fill threads wait for the guest's first exit (at most [`FILL_HOLD_OFF`]),
//! so that the restore and the first instruction have the cores (migrate's lazy/gate.rs).

use std::io::Write;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use migrate::lazy::{ChunkCache, LazyBlock, PageServer, ServerOptions, StatsSnapshot};
use migrate::snapshot::check::{apply_resizes, check_manifest, check_ram};
use migrate::snapshot::format::VmSnapshot;
use migrate::snapshot::ram_io::{load_block, StorePageSource};
use storage::Store;

use super::devices::persistables;
use super::handoff::Handoff;
use super::vcpu_state::{restore_vcpu, restore_vm, HostVcpuCaps, VcpuState, VmKvmState};
use super::SnapshotError;
use crate::boot::files::BootFile;
use crate::boot::firmware;
use crate::control::ExitReason;
use crate::vm::{BootSource, FwCfgFile, MachineSpec, Vm, VmConfig};

/// The store attachment holding a recorded working set: (block, offset) in fault order.
pub const PREFETCH_ATTACHMENT: &str = "prefetch";

/// How memory comes back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    /// Every page is read before the vCPUs start.
    #[default]
    Eager,
    /// Pages arrive on first touch, the rest in the background.
    Lazy,
    /// Lazy, loading the recorded working set first, alongside the first instructions.
    LazyPrefetch,
    /// Lazy, loading the recorded working set before the first instruction (on every core,
    /// the restoring thread included): a later first instruction, and a working set that
    /// never waits on a fault.
    LazyPrefetchBefore,
}

/// How to restore.
pub struct RestoreOptions {
    pub mode: RestoreMode,
    /// Where the restored VM's serial output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Where the restored VM's debug console (port 0x402) writes.
    pub debugcon_out: Option<Box<dyn Write + Send>>,
    /// Build the destination with this much memory instead of the snapshot's.
    pub mem_mib: Option<u64>,
    /// Build the destination with these fw_cfg files instead of blank ones of the snapshot's
    /// sizes (their contents are then replaced by the snapshot's).
    pub fw_cfg_files: Option<Vec<FwCfgFile>>,
    /// Build the destination with these extra ACPI tables instead of the snapshot's (the
    /// blobs' blocks are then resized to the snapshot's sizes and hold its bytes).
    pub acpi_tables: Option<Vec<crate::acpi::AcpiTable>>,
    /// Give the restored VM a new generation ID (VMGenID), if it has the device (firmware VMs):
    /// clones, `restore --new-generation`.
    pub new_generation: bool,
    /// The NICs instead of the snapshot's (`restore --net`, clone overrides): as many as the
    /// snapshot has, in PCI order; one without a MAC keeps the snapshot's (see `new_macs`).
    pub net: Option<Vec<crate::net::NetSpec>>,
    /// Or changes to some of the snapshot's NICs (the API's `network_overrides`).
    pub net_overrides: Vec<crate::net::overrides::NetOverride>,
    /// Give every NIC whose MAC `net` does not set a new one (clones).
    pub new_macs: bool,
    /// Lazy: stream in all memory in the background (otherwise only faults and prefetch).
    pub background_fill: bool,
    /// Lazy: a cache of decompressed chunks shared with other restores (clones).
    pub cache: Option<Arc<ChunkCache>>,
    /// Lazy: threads loading the prefetch list and the background fill (default: one per
    /// core, see [`migrate::lazy::default_fill_threads`]).
    pub fill_threads: usize,
    /// Who the snapshot is pinned for while the restore reads it (`VM 'web1'`): a delete of
    /// the snapshot names it in its error.
    pub pin_holder: String,
    /// Start dirty tracking at the restore, so the VM's next snapshot can be incremental on
    /// this one (lineage.rs). It costs the guest a write-protection fault on its first write
    /// to each page, and KVM maps guest memory in 4 KiB pages while it is on: `bench restore`
    /// measured the working set of a resident guest 4-5x slower with it, and the lazy
    /// restore's first instruction 2-3x later. Off (the default: restores stay fast; `restore
    /// --track-dirty` turns it on): the VM's first snapshot is full, and from then on it keeps
    /// tracking and its repeat snapshots are incremental.
    pub track_dirty: bool,
    /// Lazy: the fill threads wait for the guest's first exit, at most this long, before they
    /// load anything (gate.rs in migrate::lazy); `None`: they start with the page server.
    /// Default [`FILL_HOLD_OFF`].
    pub fill_hold_off: Option<Duration>,
    /// Lazy, with a hold-off: fill threads that start loading at once all the same (default
    /// 0: every one waits; gate.rs in migrate::lazy has what was measured).
    pub fill_ungated: usize,
    /// Lazy: map the snapshot's memory from a base shared with the other clones of it in this
    /// process (shared_base.rs) instead of giving this VM a private copy of every page.
    pub shared_base: Option<Arc<migrate::lazy::BaseRegistry>>,
    /// Build the VM from a pre-built shell when the process's pool has one of its shape
    /// (crate::shell; the pool is off unless enabled). Default true.
    pub prebuilt_shell: bool,
}

impl RestoreOptions {
    pub fn new(mode: RestoreMode, serial_out: Box<dyn Write + Send>) -> Self {
        RestoreOptions {
            mode,
            serial_out,
            debugcon_out: None,
            mem_mib: None,
            fw_cfg_files: None,
            acpi_tables: None,
            new_generation: false,
            net: None,
            net_overrides: Vec::new(),
            new_macs: false,
            background_fill: true,
            cache: Some(shared_cache()),
            fill_threads: migrate::lazy::default_fill_threads(),
            pin_holder: format!("a restore in process {}", std::process::id()),
            track_dirty: false,
            shared_base: None,
            fill_hold_off: Some(FILL_HOLD_OFF),
            fill_ungated: 0,
            prebuilt_shell: true,
        }
    }
}

/// What a restore did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreReport {
    pub name: String,
    pub mode: RestoreMode,
    /// From the request to the VM being ready to start.
    pub ready_ms: f64,
    /// Bytes read into guest memory before the start (eager).
    pub bytes_loaded: u64,
    /// RAM blocks resized to the snapshot's sizes: (idstr, size).
    pub resized: Vec<(String, u64)>,
    /// Chunks in the prefetch list used: those of served blocks, each once (the list comes
    /// from the store and is checked).
    pub prefetch_chunks: usize,
    /// The new generation ID given (`new_generation`) and the guest address it was written at
    /// (0: the firmware had not placed it yet).
    pub new_generation: Option<(String, u64)>,
    /// Where the time until ready went (wall clock).
    pub phases: RestorePhases,
    /// The restoring thread's CPU time in each phase (user and kernel): what the phases cost
    /// apart from waiting for a core, on a loaded host.
    pub phases_cpu: RestorePhases,
}

/// Milliseconds spent in each step of a restore (their sum is about `ready_ms`; the VM is
/// built first, then the manifest thread is waited for).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct RestorePhases {
    /// Once the VM is built, what of the manifest's reading, checking and pinning (and the
    /// prefetch list's reading) the helper thread had not done: waited for, or done by the
    /// restoring thread where the helper had not begun it (handoff.rs). Its CPU time is that
    /// of the work done here.
    pub manifest_ms: f64,
    /// Decoding the snapshot's state and building the VM: KVM VM, vCPUs, RAM mappings and
    /// memory slots, devices.
    pub vm_ms: f64,
    /// Checking and resizing the RAM blocks.
    pub check_ms: f64,
    /// Eager: loading every page; lazy: dropping the blocks' pages, registering them with
    /// userfaultfd and starting the page server.
    pub memory_ms: f64,
    /// Device state, in-kernel VM state and vCPU state.
    pub state_ms: f64,
}

/// Longest a lazy restore's fill threads wait for the guest's first exit before they start
/// loading anyway (a guest halted in its snapshot, or one that computes without exiting).
pub const FILL_HOLD_OFF: Duration = Duration::from_millis(50);

/// Bytes of decompressed chunks the process-wide cache keeps.
pub const SHARED_CACHE_BYTES: usize = 256 << 20;

/// The cache of decompressed chunks every lazy restore in this process shares by default:
/// clones of one snapshot restored together read and decompress each chunk once
/// (`snapvisor bench clones` measures it).
pub fn shared_cache() -> Arc<ChunkCache> {
    static CACHE: std::sync::OnceLock<Arc<ChunkCache>> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| ChunkCache::new(SHARED_CACHE_BYTES)).clone()
}

/// Decodes a prefetch attachment: lines of `<offset hex> <idstr>` (a line that is not one is
/// skipped; an idstr that is not UTF-8 is read lossily). Each distinct idstr is allocated
/// once and shared by its entries: a 4 GiB working set is thousands of lines naming `pc.ram`.
pub fn decode_prefetch(bytes: &[u8]) -> Vec<(Arc<str>, u64)> {
    let mut names: std::collections::HashMap<&[u8], Arc<str>> = std::collections::HashMap::new();
    // One entry per line, and a usable line holds at least "h n\n": a list of bare newlines
    // (untrusted bytes) must not reserve 24 bytes of entries for each byte.
    let lines = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
    let mut out = Vec::with_capacity(lines.min(bytes.len() / 4 + 1));
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        // As `str::lines`: a line ends in "\n" or "\r\n", the last one maybe in neither.
        let line = match line.strip_suffix(b"\n") {
            Some(l) => l.strip_suffix(b"\r").unwrap_or(l),
            None => line,
        };
        let Some(space) = line.iter().position(|&b| b == b' ') else {
            continue;
        };
        let (off, idstr) = (&line[..space], &line[space + 1..]);
        let Some(off) = std::str::from_utf8(off).ok().and_then(|o| u64::from_str_radix(o, 16).ok()) else {
            continue;
        };
        let name = names.entry(idstr).or_insert_with(|| String::from_utf8_lossy(idstr).into());
        out.push((name.clone(), off));
    }
    out
}

/// The entries of `list` that count for `blocks` (migrate's `prefetch_list`), as the first
/// offset of each chunk they name, in order.
fn served_once(list: &[(Arc<str>, u64)], blocks: &[LazyBlock], chunk: u64) -> Vec<(Arc<str>, u64)> {
    let (chunks, _) =
        migrate::lazy::prefetch_list::chunks_of(list, blocks.iter().map(|b| (b.idstr.as_str(), b.len)), chunk);
    let names: Vec<Arc<str>> = blocks.iter().map(|b| Arc::from(b.idstr.as_str())).collect();
    chunks.into_iter().map(|(bi, ci)| (names[bi].clone(), ci * chunk)).collect()
}

/// Encodes a prefetch list for the store.
pub fn encode_prefetch(list: &[(String, u64)]) -> Vec<u8> {
    list.iter().map(|(idstr, off)| format!("{off:x} {idstr}\n")).collect::<String>().into_bytes()
}

/// Restores snapshot `name` from `store` into a new VM, not yet started.
///
/// The snapshot is pinned for `opts.pin_holder` while it is read (storage's pin.rs): until
/// the restore returns (eager), or until the VM is fully resident or gone (lazy: the page
/// server holds the pin).
pub fn restore(store: &Store, name: &str, mut opts: RestoreOptions) -> Result<(Vm, RestoreReport), SnapshotError> {
    let t0 = Instant::now();
    let cpu0 = thread_cpu_ms();
    let wants_list = matches!(opts.mode, RestoreMode::LazyPrefetch | RestoreMode::LazyPrefetchBefore);
    let holder = opts.pin_holder.clone();
    // The manifest (a 4 GiB guest's chunk tables are 2 MiB) is read, checked and pinned on a
    // thread of its own, with the prefetch list, while this one builds the VM (its memory
    // slots are most of that) from the state read from the same stored bytes unchecked
    // (storage's `peek_state`). Those bytes build nothing but the VM, and only stand once
    // the checked manifest holds the same state: otherwise the restore fails, and a VM built
    // from them is dropped unstarted. Without that read (an unusual manifest) the VM is
    // built from the checked state, after the thread. Both pieces of the thread's work are
    // handed off (handoff.rs): whatever the thread has not begun once the VM is built, this
    // thread does itself, so a restore never waits for a thread the host has not yet run.
    let manifest = {
        let (store, name, holder) = (store.clone(), name.to_string(), holder.clone());
        Handoff::new(move || -> Result<_, SnapshotError> {
            let (start, cpu) = (Instant::now(), thread_cpu_ms());
            let opened = store.pinned_reader(&name, &holder)?;
            tracing::debug!(
                target: "snapvisor::restore",
                snapshot = name,
                thread = std::thread::current().name().unwrap_or("?"),
                started_ms = start.saturating_duration_since(t0).as_secs_f64() * 1e3,
                ms = start.elapsed().as_secs_f64() * 1e3,
                cpu_ms = thread_cpu_ms() - cpu,
                "restore manifest read, checked and pinned"
            );
            Ok(opened)
        })
    };
    let list = {
        let (store, name) = (store.clone(), name.to_string());
        Handoff::new(move || if wants_list { read_prefetch_list(&store, &name) } else { Vec::new() })
    };
    let helper = {
        let (manifest, list) = (manifest.clone(), list.clone());
        std::thread::Builder::new().name("restore-manifest".into()).spawn(move || {
            manifest.run();
            list.run();
        })
    };
    // Not joined: once both pieces are taken below, the thread holds nothing.
    drop(helper);
    let early = store.unchecked_state(name).map(|state| (build_vm(name, &state, &mut opts), state));
    let (waited, cpu_waited) = (Instant::now(), thread_cpu_ms());
    let panicked = |p: Box<dyn std::any::Any + Send>| {
        let message = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        SnapshotError::ManifestThread { name: name.to_string(), message }
    };
    // The list first: this thread loads it while the helper is still on the manifest. Both
    // are taken before either result is looked at, so that nothing is left to the helper.
    let prefetch = list.take();
    let opened = manifest.take();
    let prefetch = prefetch.map_err(panicked)?;
    let (reader, pin) = opened.map_err(panicked)??;
    let (snap, spec, mut vm) = match early {
        Some((built, state)) if state == reader.manifest().state => built?,
        Some(_) => return Err(SnapshotError::Replaced { name: name.to_string() }),
        None => build_vm(name, &reader.manifest().state, &mut opts)?,
    };
    let mut lap = Instant::now();
    let mut cpu_lap = thread_cpu_ms();
    let wait_ms = lap.saturating_duration_since(waited).as_secs_f64() * 1e3;
    let mut phases = RestorePhases {
        vm_ms: lap.saturating_duration_since(t0).as_secs_f64() * 1e3 - wait_ms,
        manifest_ms: wait_ms,
        ..Default::default()
    };
    let mut phases_cpu =
        RestorePhases { vm_ms: cpu_waited - cpu0, manifest_ms: cpu_lap - cpu_waited, ..Default::default() };
    let mut mark = |pick: fn(&mut RestorePhases) -> &mut f64, phases: &mut RestorePhases, cpu: &mut RestorePhases| {
        let (now, cpu_now) = (Instant::now(), thread_cpu_ms());
        *pick(phases) = now.saturating_duration_since(lap).as_secs_f64() * 1e3;
        *pick(cpu) = cpu_now - cpu_lap;
        (lap, cpu_lap) = (now, cpu_now);
    };
    vm.set_guest_description(spec.guest.clone(), spec.builtin);
    // The NICs' I/O waits until the VM starts: nothing touches guest memory or the queues
    // while their state is loaded.
    for nic in &vm.devices().nics {
        nic.pause();
    }

    // Nothing is written before every block is known to fit, and before the state's table,
    // which the check follows, is known to describe the chunk tables that will be loaded.
    check_manifest(&snap.ram, &reader.manifest().blocks)?;
    let plan = check_ram(&snap.ram, vm.registry())?;
    apply_resizes(&plan, vm.registry())?;
    mark(|p| &mut p.check_ms, &mut phases, &mut phases_cpu);

    // Only the snapshot's blocks are loaded: a destination block it lacks passed the check
    // only if it is an option ROM, which keeps the destination's ROM file.
    let blocks: Vec<_> =
        vm.registry().blocks().into_iter().filter(|b| snap.ram.iter().any(|s| s.idstr == b.idstr())).collect();
    let mut bytes_loaded = 0;
    let mut prefetch_chunks = 0;
    match opts.mode {
        RestoreMode::Eager => {
            for b in &blocks {
                bytes_loaded += load_block(&reader, b)?;
            }
        }
        RestoreMode::Lazy | RestoreMode::LazyPrefetch | RestoreMode::LazyPrefetchBefore => {
            let sub1 = (Instant::now(), thread_cpu_ms());
            // Whatever the destination put in its blocks (its fw_cfg files) goes: a present
            // page would never be served, and the guest would see it instead of the snapshot.
            // Only the pages in use are dropped: a MADV_DONTNEED over all of a 4 GiB block
            // nobody wrote was ~1.5 ms of the restore's time to its first instruction (KVM
            // walks the memory slot for it), and finding them page by page with mincore
            // ~0.65 ms; the page tables are asked instead (migrate's ram/present.rs: a few µs
            // for an untouched block). The page server checks again after registering, so a
            // page missed here is an error, never served.
            for b in &blocks {
                b.discard_present().map_err(migrate::snapshot::ram_io::RamIoError::from)?;
            }
            let sub2 = (Instant::now(), thread_cpu_ms());
            let lazy: Vec<LazyBlock> = blocks
                .iter()
                .map(|b| LazyBlock { idstr: b.idstr().to_string(), host: b.host_addr() as usize, len: b.used_length() })
                .collect();
            let control = vm.control().clone();
            let on_error: Box<dyn Fn(&migrate::lazy::LazyError) + Send + Sync> =
                Box::new(move |e| control.stop(ExitReason::Crash { detail: e.to_string() }));
            let server = match &opts.shared_base {
                Some(bases) => {
                    // The clone keeps its list too: a base made by an earlier clone may have
                    // none, and prefetch-before loads it into the base on this thread. Only
                    // the entries naming a chunk of a block, each once, are copied: the list
                    // is untrusted and may be long.
                    let prefetch = served_once(&prefetch, &lazy, u64::from(reader.chunk_size()));
                    let base_opts = migrate::lazy::BaseOptions {
                        prefetch: prefetch.clone(),
                        background_fill: opts.background_fill,
                        ..Default::default()
                    };
                    let base = super::shared_base::base_for(bases, store, name, &reader, base_opts)?;
                    super::shared_base::start_on_base(&blocks, base, &prefetch, on_error)?
                }
                None => PageServer::start(
                    lazy,
                    Arc::new(StorePageSource::new(reader.clone(), opts.cache.clone())),
                    ServerOptions {
                        prefetch,
                        background_fill: opts.background_fill,
                        record_faults: true,
                        fill_threads: opts.fill_threads,
                        fill_hold_off: opts.fill_hold_off,
                        fill_ungated: opts.fill_ungated,
                    },
                    on_error,
                )?,
            };
            // The fill threads wait for the guest's first exit (it runs), so that the restore
            // and the first instruction have the cores; at most FILL_HOLD_OFF.
            let gate = server.fill_gate();
            vm.control().on_first_exit(Box::new(move || gate.open()));
            let sub3 = (Instant::now(), thread_cpu_ms());
            tracing::debug!(
                target: "snapvisor::restore",
                snapshot = name,
                discard_ms = sub2.0.saturating_duration_since(sub1.0).as_secs_f64() * 1e3,
                discard_cpu_ms = sub2.1 - sub1.1,
                server_start_cpu_ms = sub3.1 - sub2.1,
                "restore memory phase (ms)"
            );
            prefetch_chunks = server.prefetch_len();
            vm.registry().add_listener(server.resize_guard());
            server.hold_until_resident(Box::new(pin));
            vm.set_page_server(server);
        }
    }

    mark(|p| &mut p.memory_ms, &mut phases, &mut phases_cpu);
    // Memory now equals the snapshot's (lazily: by construction). Dirty tracking starts here,
    // before device state and a new generation ID write anything, so the next snapshot of
    // this VM can be incremental against this one (lineage.rs).
    if opts.track_dirty {
        super::save::start_tracking(&vm, u64::from(reader.chunk_size()))?;
        vm.lineage().set(reader.manifest_shared());
    }

    for mut p in persistables(vm.devices()) {
        let name = p.persist_name();
        let bytes = snap.fragments.get(&name).ok_or_else(|| migrate::persist::PersistError::Invalid {
            name: name.clone(),
            reason: "missing from the snapshot".into(),
        })?;
        p.restore_state(&bytes.0)?;
    }
    let kvm_state: VmKvmState = snap.get("kvm/vm")?;
    restore_vm(vm.fd(), &kvm_state)?;
    let caps = HostVcpuCaps::query(vm.kvm(), vm.fd())?;
    for (i, fd) in vm.vcpu_fds().iter().enumerate() {
        let state: VcpuState = snap.get(&format!("vcpu/{i}"))?;
        if usize::from(state.id) != i {
            return Err(migrate::persist::PersistError::Invalid {
                name: format!("vcpu/{i}"),
                reason: format!("holds vCPU {}", state.id),
            }
            .into());
        }
        let fd = fd.lock().unwrap_or_else(PoisonError::into_inner);
        restore_vcpu(&fd, &state, &caps)?;
    }
    mark(|p| &mut p.state_ms, &mut phases, &mut phases_cpu);
    // Where a restore's time goes (the fleet profile: `SNAPVISOR_LOG=snapvisor::restore=debug`).
    tracing::debug!(target: "snapvisor::restore", snapshot = name, mode = ?opts.mode, ?phases, ?phases_cpu, "restore phases (ms)");
    // The working set before the first instruction: the loading overlaps the device and vCPU
    // state above only in the fill threads; here the restoring thread joins them. A chunk that
    // cannot be read fails the restore, naming it; the VM is never started.
    if opts.mode == RestoreMode::LazyPrefetchBefore {
        if let Some(server) = vm.page_server() {
            server.load_prefetch()?;
        }
    }
    // VMs without firmware have no VMGenID device; they keep what they have.
    let new_generation = if opts.new_generation && vm.devices().vmgenid.is_some() {
        let (guid, addr) = crate::acpi::new_generation(vm.devices())?;
        Some((guid.to_string(), addr))
    } else {
        None
    };
    // The next restore of this shape finds a shell ready (shell.rs), built once this VM has
    // reached its first instruction; a refused restore asks for none.
    if opts.prebuilt_shell {
        let control = vm.control().clone();
        crate::shell::request(vm.shape(), move || control.first_exit().is_some() || control.exit_reason().is_some());
    }
    Ok((
        vm,
        RestoreReport {
            name: name.to_string(),
            mode: opts.mode,
            ready_ms: t0.elapsed().as_secs_f64() * 1e3,
            bytes_loaded,
            resized: plan.0,
            prefetch_chunks,
            new_generation,
            phases,
            phases_cpu,
        },
    ))
}

/// Most bytes of fw_cfg files a snapshot may ask a restore to allocate, all files together.
pub const MAX_FW_CFG_TOTAL: u64 = 256 << 20;

/// The VM a restore of snapshot `name` builds from its device and vCPU state `state`: of the
/// snapshot's shape (memory, vCPUs, fw_cfg files, firmware, NICs) unless `opts` says
/// otherwise. Takes the parts of `opts` that go into the VM (its outputs, files, tables, NICs).
fn build_vm(
    name: &str,
    state: &[u8],
    opts: &mut RestoreOptions,
) -> Result<(VmSnapshot, MachineSpec, Vm), SnapshotError> {
    let snap = VmSnapshot::decode(state)?;
    let spec: MachineSpec = snap.get("machine")?;
    let files = match opts.fw_cfg_files.take() {
        Some(f) => f,
        None => {
            // The sizes are snapshot bytes, untrusted: bounded in all before anything is
            // allocated (each file is also cut at 64 MiB, as fw_cfg blobs are).
            let total = spec
                .fw_cfg_files
                .iter()
                .fold(0u64, |t, (_, size)| t.saturating_add((*size).min(crate::machine::MAX_FW_CFG_FILE)));
            if total > MAX_FW_CFG_TOTAL {
                return Err(SnapshotError::FwCfgFiles {
                    name: name.to_string(),
                    reason: format!(
                        "{} files of {total} bytes in all, more than the {MAX_FW_CFG_TOTAL} a restore accepts",
                        spec.fw_cfg_files.len()
                    ),
                });
            }
            spec.fw_cfg_files
                .iter()
                .map(|(n, size)| FwCfgFile {
                    name: n.clone(),
                    data: vec![0; (*size).min(crate::machine::MAX_FW_CFG_FILE) as usize],
                })
                .collect()
        }
    };
    let net = restore_nics(name, &spec.net, opts.net.as_deref(), &opts.net_overrides, opts.new_macs)?;
    let serial_out = std::mem::replace(&mut opts.serial_out, Box::new(std::io::sink()));
    let mut cfg = VmConfig::new(opts.mem_mib.unwrap_or(spec.mem_mib), spec.vcpus, BootSource::Restore, serial_out);
    cfg.net = net;
    cfg.fw_cfg_files = files;
    cfg.debugcon_out = opts.debugcon_out.take();
    cfg.acpi_tables = opts.acpi_tables.take().unwrap_or_else(|| spec.acpi_tables.clone());
    cfg.uuid = spec.uuid;
    cfg.prebuilt_shell = opts.prebuilt_shell;
    // The firmware's contents come from the snapshot's pc.bios; the block is built blank, of a
    // size checked before anything is allocated (the spec is snapshot bytes, untrusted).
    if let Some(f) = &spec.firmware {
        firmware::check_image(&f.name, f.size).map_err(|e| SnapshotError::Vm(e.into()))?;
        cfg.firmware = Some(BootFile { name: f.name.clone(), data: vec![0; f.size as usize] });
    }
    let vm = Vm::new(cfg)?;
    Ok((snap, spec, vm))
}

/// The recorded working set of snapshot `name`. The list only orders loading: a damaged one
/// costs the head start, not the restore (every chunk is still verified as it is served).
fn read_prefetch_list(store: &Store, name: &str) -> Vec<(Arc<str>, u64)> {
    match store.attachment(name, PREFETCH_ATTACHMENT) {
        Ok(list) => list.map(|b| decode_prefetch(&b)).unwrap_or_default(),
        Err(e) => {
            tracing::warn!("snapshot '{name}': prefetch list unreadable, restoring without it: {e}");
            Vec::new()
        }
    }
}

/// CPU time of the calling thread so far, milliseconds (0 if the clock cannot be read).
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// The NICs a restore builds: the snapshot's (untrusted: checked) with `overrides` applied,
/// or `given` instead, which must be as many; a NIC keeps the snapshot's MAC unless `given` or
/// an override sets one or `new_macs` asks for a new one. Checked before anything is built,
/// so a refusal changes nothing.
pub fn restore_nics(
    name: &str,
    saved: &[crate::net::NetSpec],
    given: Option<&[crate::net::NetSpec]>,
    overrides: &[crate::net::overrides::NetOverride],
    new_macs: bool,
) -> Result<Vec<crate::net::NetSpec>, SnapshotError> {
    let bad = |reason: String| SnapshotError::NetSpec { name: name.to_string(), reason };
    if saved.len() > crate::net::MAX_NICS {
        return Err(bad(format!("{} NICs, more than the {} a VM may have", saved.len(), crate::net::MAX_NICS)));
    }
    for s in saved {
        s.check().map_err(|e| bad(e.to_string()))?;
    }
    let keep = |s: &crate::net::NetSpec| if new_macs { None } else { s.mac };
    match given {
        None => {
            let o = crate::net::overrides::apply(saved, overrides).map_err(bad)?;
            Ok(o.nics
                .into_iter()
                .zip(o.mac_given)
                .map(|(n, given)| crate::net::NetSpec { mac: if given { n.mac } else { keep(&n) }, ..n })
                .collect())
        }
        Some(g) if g.len() != saved.len() => {
            Err(SnapshotError::NetCount { name: name.to_string(), snapshot: saved.len(), given: g.len() })
        }
        Some(g) => {
            Ok(g.iter().zip(saved).map(|(g, s)| crate::net::NetSpec { mac: g.mac.or(keep(s)), ..g.clone() }).collect())
        }
    }
}

/// After a lazy restore has run for a while: stores the order in which the guest faulted
/// chunks in, as the snapshot's prefetch list, after the list this restore prefetched, if
/// any (its chunks did not fault: [`PageServer::working_set`]). Returns the number of chunks
/// recorded.
pub fn record_working_set(vm: &Vm, store: &Store, name: &str) -> Result<usize, SnapshotError> {
    let Some(server) = vm.page_server() else {
        return Ok(0);
    };
    let order = server.working_set();
    store.put_attachment(name, PREFETCH_ATTACHMENT, &encode_prefetch(&order))?;
    Ok(order.len())
}

/// Lazy restore statistics, if the VM was restored lazily.
pub fn lazy_stats(vm: &Vm) -> Option<StatsSnapshot> {
    vm.page_server().map(|s| s.stats().snapshot())
}

/// Waits until a lazily restored VM is fully resident.
pub fn wait_resident(vm: &Vm, timeout: Duration) -> bool {
    vm.page_server().is_none_or(|s| s.wait_resident(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_round_trip() {
        let list = vec![("pc.ram".to_string(), 0x10000), ("/rom@opt/x".to_string(), 0), ("pc.ram".to_string(), 0)];
        let strings = |v: Vec<(Arc<str>, u64)>| v.into_iter().map(|(n, o)| (n.to_string(), o)).collect::<Vec<_>>();
        assert_eq!(strings(decode_prefetch(&encode_prefetch(&list))), list);
        assert!(decode_prefetch(b"zz pc.ram\nnot a line\n").is_empty());
    }

    /// The decoder reads what `str::lines` and `split_once(' ')` read: CRLF endings, a last
    /// line without a newline, an idstr holding spaces, lossy UTF-8; bad offsets are skipped.
    #[test]
    fn prefetch_decoding_matches_the_line_reader() {
        let raw: &[u8] = b"10 pc.ram\r\n20 a b\n\n+30 pc.ram\nx1 pc.ram\n40 \xff\xfe\n 50 pc.ram\n60 pc.ram\r";
        let lines = String::from_utf8_lossy(raw)
            .lines()
            .filter_map(|l| {
                let (off, idstr) = l.split_once(' ')?;
                Some((idstr.to_string(), u64::from_str_radix(off, 16).ok()?))
            })
            .collect::<Vec<_>>();
        let got: Vec<(String, u64)> = decode_prefetch(raw).into_iter().map(|(n, o)| (n.to_string(), o)).collect();
        assert_eq!(got, lines);
        assert_eq!(got.len(), 5, "{got:?}");
        let shared = decode_prefetch(b"10 pc.ram\n20 pc.ram\n");
        assert!(Arc::ptr_eq(&shared[0].0, &shared[1].0), "one allocation per idstr");
    }

    #[test]
    fn a_list_of_bare_newlines_reserves_little() {
        // Untrusted bytes: 1 MiB of newlines has no entry, and must not reserve one per byte.
        let list = decode_prefetch(&vec![b'\n'; 1 << 20]);
        assert!(list.is_empty());
        assert!(list.capacity() <= (1 << 20) / 4 + 1, "reserved {} entries", list.capacity());
    }

    #[test]
    fn file_block_name() {
        assert_eq!(crate::machine::fw_cfg_file_block("opt/x"), "/rom@opt/x");
    }
}
