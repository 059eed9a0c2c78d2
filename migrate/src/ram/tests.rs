//! The resize rules, one test each, and the order of listeners and hook.

use std::sync::{Arc, Mutex};

use super::*;

const PAGE: u64 = 4096;

fn cfg(idstr: &str, size: u64, max: u64, resizeable: bool) -> RamBlockConfig {
    RamBlockConfig { idstr: idstr.into(), size, max_size: max, page_size: PAGE, resizeable }
}

/// Records every call, in order.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    veto: Option<String>,
}

impl RamBlockListener for Recorder {
    fn block_added(&self, b: &Arc<RamBlock>) {
        self.calls.lock().expect("lock").push(format!("added {}", b.idstr()));
    }
    fn block_removed(&self, b: &Arc<RamBlock>) {
        self.calls.lock().expect("lock").push(format!("removed {}", b.idstr()));
    }
    fn check_resize(&self, b: &RamBlock, old: u64, new: u64) -> Result<(), String> {
        self.calls.lock().expect("lock").push(format!("check {} {old:#x}->{new:#x}", b.idstr()));
        self.veto.clone().map_or(Ok(()), Err)
    }
    fn block_resized(&self, b: &RamBlock, old: u64, new: u64) {
        // The block still has its old length while listeners hear of the change.
        assert_eq!(b.used_length(), old);
        self.calls.lock().expect("lock").push(format!("resized {} {old:#x}->{new:#x}", b.idstr()));
    }
}

type HookLog = Arc<Mutex<Vec<String>>>;

fn setup(resizeable: bool) -> (Arc<RamRegistry>, Arc<RamBlock>, Arc<Recorder>, HookLog) {
    let reg = RamRegistry::new();
    let rec = Arc::new(Recorder::default());
    reg.add_listener(rec.clone());
    let max = if resizeable { 0x20_0000 } else { 0x1800 };
    let b = reg.add(cfg("/rom@etc/acpi/tables", 0x1800, max, resizeable)).expect("add");
    let log = rec.clone();
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let h = hooks.clone();
    b.set_resized_hook(Box::new(move |idstr, len| {
        // The hook runs after every listener and sees the new length.
        log.calls.lock().expect("lock").push(format!("hook {idstr} {len:#x}"));
        h.lock().expect("lock").push(format!("{idstr} {len:#x}"));
    }));
    (reg, b, rec, hooks)
}

fn calls(rec: &Recorder) -> Vec<String> {
    rec.calls.lock().expect("lock").clone()
}

#[test]
fn new_block_is_aligned_and_keeps_its_unaligned_size() {
    let (_reg, b, rec, _) = setup(true);
    assert_eq!(b.used_length(), 0x2000);
    assert_eq!(b.unaligned_length(), 0x1800);
    assert_eq!(b.max_length(), 0x20_0000);
    assert_eq!(calls(&rec), vec!["added /rom@etc/acpi/tables"]);
}

#[test]
fn rule2_only_the_unaligned_size_changes() {
    let (reg, b, rec, hooks) = setup(true);
    reg.resize(b.idstr(), 0x1c00).expect("resize");
    assert_eq!(b.used_length(), 0x2000);
    assert_eq!(b.unaligned_length(), 0x1c00);
    assert_eq!(*hooks.lock().expect("lock"), vec!["/rom@etc/acpi/tables 0x1c00"]);
    // No listener hears of it: the aligned size did not change.
    assert_eq!(calls(&rec), vec!["added /rom@etc/acpi/tables", "hook /rom@etc/acpi/tables 0x1c00"]);
    // The same size again: nothing at all.
    reg.resize(b.idstr(), 0x1c00).expect("resize");
    assert_eq!(hooks.lock().expect("lock").len(), 1);
}

#[test]
fn rule2_applies_to_non_resizeable_blocks_too() {
    let (reg, b, _rec, hooks) = setup(false);
    reg.resize(b.idstr(), 0x1001).expect("same aligned size");
    assert_eq!(b.unaligned_length(), 0x1001);
    assert_eq!(hooks.lock().expect("lock").len(), 1);
}

#[test]
fn rule3_non_resizeable_size_mismatch() {
    let (reg, b, rec, hooks) = setup(false);
    let e = reg.resize(b.idstr(), 0x8000).expect_err("mismatch");
    assert_eq!(e.to_string(), "Size mismatch: /rom@etc/acpi/tables: 0x8000 != 0x2000");
    assert_eq!(e, RamError::SizeMismatch { idstr: b.idstr().into(), new: 0x8000, used: 0x2000 });
    assert_eq!(b.used_length(), 0x2000);
    assert!(hooks.lock().expect("lock").is_empty());
    assert_eq!(calls(&rec).len(), 1);
}

#[test]
fn rule3_reports_the_aligned_new_size() {
    let (reg, b, _, _) = setup(false);
    let e = reg.resize(b.idstr(), 0x2001).expect_err("mismatch");
    assert_eq!(e.to_string(), "Size mismatch: /rom@etc/acpi/tables: 0x3000 != 0x2000");
}

#[test]
fn rule4_beyond_max_length() {
    let (reg, b, _, hooks) = setup(true);
    let e = reg.resize(b.idstr(), 0x20_0001).expect_err("too large");
    assert_eq!(e.to_string(), "Size too large: /rom@etc/acpi/tables: 0x201000 > 0x200000");
    assert_eq!(b.used_length(), 0x2000);
    assert!(hooks.lock().expect("lock").is_empty());
}

#[test]
fn rule5_listeners_then_length_then_dirty_then_hook() {
    let (reg, b, rec, hooks) = setup(true);
    b.take_dirty();
    reg.resize(b.idstr(), 0x5123).expect("resize");
    assert_eq!(b.used_length(), 0x6000);
    assert_eq!(b.unaligned_length(), 0x5123);
    assert_eq!(
        calls(&rec),
        vec![
            "added /rom@etc/acpi/tables",
            "check /rom@etc/acpi/tables 0x2000->0x6000",
            "resized /rom@etc/acpi/tables 0x2000->0x6000",
            "hook /rom@etc/acpi/tables 0x5123",
        ]
    );
    assert_eq!(b.take_dirty(), vec![0, 1, 2, 3, 4, 5], "the whole new block is dirty");
    assert_eq!(*hooks.lock().expect("lock"), vec!["/rom@etc/acpi/tables 0x5123"]);
    // Shrinking follows the same path.
    reg.resize(b.idstr(), 0x1000).expect("shrink");
    assert_eq!(b.used_length(), 0x1000);
}

#[test]
fn a_veto_changes_nothing() {
    let reg = RamRegistry::new();
    let b = reg.add(cfg("blob", PAGE, 16 * PAGE, true)).expect("add");
    let rec = Arc::new(Recorder { veto: Some("still filling".into()), ..Default::default() });
    reg.add_listener(rec.clone());
    let e = reg.resize("blob", 4 * PAGE).expect_err("veto");
    assert_eq!(e.to_string(), "resize of RAM block 'blob' refused: still filling");
    assert_eq!(b.used_length(), PAGE);
    assert!(!calls(&rec).iter().any(|c| c.starts_with("resized")));
}

#[test]
fn listeners_hear_of_existing_blocks_and_removals() {
    let reg = RamRegistry::new();
    reg.add(cfg("a", PAGE, PAGE, false)).expect("add");
    let rec = Arc::new(Recorder::default());
    let id = reg.add_listener(rec.clone());
    reg.add(cfg("b", PAGE, PAGE, false)).expect("add");
    reg.remove("a").expect("remove");
    assert_eq!(calls(&rec), vec!["added a", "added b", "removed a"]);
    reg.remove_listener(id);
    reg.add(cfg("c", PAGE, PAGE, false)).expect("add");
    assert_eq!(calls(&rec).len(), 3);
    assert_eq!(reg.blocks().iter().map(|b| b.idstr().to_string()).collect::<Vec<_>>(), vec!["b", "c"]);
}

#[test]
fn bad_configurations_and_names() {
    let reg = RamRegistry::new();
    reg.add(cfg("a", PAGE, PAGE, false)).expect("add");
    assert_eq!(reg.add(cfg("a", PAGE, PAGE, false)).expect_err("dup"), RamError::Duplicate("a".into()));
    assert!(matches!(reg.add(cfg("z", 0, PAGE, false)), Err(RamError::Config { .. })));
    assert!(matches!(reg.add(cfg("z", PAGE, 4 * PAGE, false)), Err(RamError::Config { .. })));
    assert!(matches!(
        reg.add(RamBlockConfig { page_size: 3000, ..cfg("z", PAGE, PAGE, false) }),
        Err(RamError::Config { .. })
    ));
    assert_eq!(reg.resize("nope", 1).expect_err("unknown"), RamError::Unknown("nope".into()));
    assert!(reg.remove("nope").is_err());
}

#[test]
fn reads_and_writes_are_bounded_by_used_length_and_mark_dirty() {
    let reg = RamRegistry::new();
    let b = reg.add(cfg("r", 2 * PAGE, 8 * PAGE, true)).expect("add");
    b.write(PAGE + 10, b"hello").expect("write");
    let mut buf = [0u8; 5];
    b.read(PAGE + 10, &mut buf).expect("read");
    assert_eq!(&buf, b"hello");
    assert_eq!(b.take_dirty(), vec![1]);
    assert!(b.take_dirty().is_empty());
    let e = b.read(2 * PAGE - 2, &mut buf).expect_err("beyond used");
    assert!(matches!(e, RamError::OutOfRange { .. }));
    assert!(b.write(u64::MAX, b"x").is_err());
    reg.resize("r", 4 * PAGE).expect("grow");
    b.read(2 * PAGE - 2, &mut buf).expect("now inside");
}

#[test]
fn device_writes_through_guest_memory_mark_the_block_dirty() {
    let reg = RamRegistry::new();
    let b = reg.add(cfg("pc.ram", 8 * PAGE, 8 * PAGE, false)).expect("add");
    let c = reg.add(cfg("high", 4 * PAGE, 4 * PAGE, false)).expect("add");
    let mem = GuestMemory::new(vec![
        GuestRegion { gpa: 0, len: 8 * PAGE, block: b.clone(), block_offset: 0 },
        GuestRegion { gpa: 8 * PAGE, len: 4 * PAGE, block: c.clone(), block_offset: 0 },
    ])
    .expect("guest memory");
    assert!(b.take_dirty().is_empty() && c.take_dirty().is_empty());
    // A write across the two regions lands in both blocks and dirties the pages it touched.
    let data: Vec<u8> = (0..2 * PAGE).map(|i| i as u8).collect();
    mem.write(7 * PAGE + 16, &data).expect("write");
    assert_eq!(b.take_dirty(), vec![7]);
    assert_eq!(c.take_dirty(), vec![0, 1]);
    let mut back = vec![0u8; data.len()];
    mem.read(7 * PAGE + 16, &mut back).expect("read");
    assert_eq!(back, data);
    assert!(b.take_dirty().is_empty(), "reads dirty nothing");
    // Outside guest RAM: an error naming the address, and nothing written.
    let err = mem.write(12 * PAGE - 4, &[1; 8]).expect_err("runs off the end");
    assert_eq!(err, GuestMemoryError::Outside { gpa: 12 * PAGE - 4, len: 8 });
    assert!(c.take_dirty().is_empty());
    // Overlapping regions are refused.
    let overlap = GuestMemory::new(vec![
        GuestRegion { gpa: 0, len: 8 * PAGE, block: b.clone(), block_offset: 0 },
        GuestRegion { gpa: 4 * PAGE, len: 4 * PAGE, block: c, block_offset: 0 },
    ]);
    assert!(matches!(overlap, Err(GuestMemoryError::Region { .. })));
}

#[test]
fn discard_zeroes_pages_and_checks_its_range() {
    let reg = RamRegistry::new();
    let b = reg.add(cfg("pc.ram", 4 * PAGE, 4 * PAGE, false)).expect("add");
    b.write(0, &vec![0xab; 4 * PAGE as usize]).expect("write");
    b.take_dirty();
    b.discard(PAGE, 2 * PAGE).expect("discard");
    let mut got = vec![0u8; 4 * PAGE as usize];
    b.read(0, &mut got).expect("read");
    assert!(got[..PAGE as usize].iter().all(|&x| x == 0xab));
    assert!(got[PAGE as usize..3 * PAGE as usize].iter().all(|&x| x == 0));
    assert!(got[3 * PAGE as usize..].iter().all(|&x| x == 0xab));
    assert_eq!(b.take_dirty(), vec![1, 2]);
    assert!(matches!(b.discard(100, PAGE), Err(RamError::Discard { .. })));
    assert!(matches!(b.discard(0, 5 * PAGE), Err(RamError::Discard { .. })));
}

/// Pages of `b` that are present (mincore), by index.
fn present_pages(b: &RamBlock) -> Vec<u64> {
    let pages = b.max_length() / PAGE;
    let mut vec = vec![0u8; pages as usize];
    // SAFETY: the block's reservation is page-aligned and `pages` long; mincore writes one
    // byte per page into `vec`.
    let r = unsafe { libc::mincore(b.host_addr().cast(), b.max_length() as usize, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    (0..pages).filter(|&i| vec[i as usize] & 1 != 0).collect()
}

/// `discard_present` leaves no page present wherever the present ones were (first and last
/// page, runs crossing a 64-page scan block and a 16384-page mincore batch), drops only
/// those, and marks the block dirty like `discard`. Fails if a run or its last page is missed.
#[test]
fn discard_present_drops_every_present_page_and_only_those() {
    let pages = 16384 + 200;
    let reg = RamRegistry::new();
    let b = reg.add(cfg("pc.ram", pages * PAGE, pages * PAGE, false)).expect("add");
    assert_eq!(b.discard_present_unless(|| false).expect("nothing present"), 0);
    let runs = [(0, 1), (3, 2), (60, 10), (127, 1), (16380, 8), (pages - 1, 1)];
    for (start, n) in runs {
        b.write(start * PAGE, &vec![0xcd; (n * PAGE) as usize]).expect("write");
    }
    let written: u64 = runs.iter().map(|r| r.1).sum();
    assert_eq!(present_pages(&b).len() as u64, written);
    b.take_dirty();
    assert_eq!(b.discard_present_unless(|| false).expect("discard"), written * PAGE);
    assert_eq!(present_pages(&b), Vec::<u64>::new(), "a present page survived");
    let mut got = vec![0xffu8; (pages * PAGE) as usize];
    b.read(0, &mut got).expect("read");
    assert!(got.iter().all(|&x| x == 0), "discarded pages read zero");
    assert_eq!(b.take_dirty().len() as u64, pages, "the whole block is marked dirty");
}

/// With swap on, `discard_present` cannot trust `mincore` (a swapped-out page reads absent
/// and would come back with its old bytes): it drops the whole reservation, also when swap
/// comes on during the walk. Fails if the walk is used while the probe says swap is on.
#[test]
fn discard_present_drops_everything_when_swap_is_or_comes_on() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    fn on() -> bool {
        true
    }
    fn on_from_second_call() -> bool {
        CALLS.fetch_add(1, Ordering::SeqCst) >= 1
    }
    let pages = 64;
    let reg = RamRegistry::new();
    let b = reg.add(cfg("pc.ram", pages * PAGE, pages * PAGE, false)).expect("add");
    b.write(5 * PAGE, &vec![0xcd; PAGE as usize]).expect("write");
    assert_eq!(b.discard_present_unless(on).expect("discard"), pages * PAGE, "swap on: all dropped");
    assert_eq!(present_pages(&b), Vec::<u64>::new());
    b.write(7 * PAGE, &vec![0xcd; PAGE as usize]).expect("write");
    assert_eq!(b.discard_present_unless(on_from_second_call).expect("discard"), pages * PAGE, "swap came on");
    assert_eq!(CALLS.load(Ordering::SeqCst), 2, "probed before and after the walk");
    assert_eq!(present_pages(&b), Vec::<u64>::new());
    b.write(9 * PAGE, &vec![0xcd; PAGE as usize]).expect("write");
    assert_eq!(b.discard_present_unless(|| false).expect("discard"), PAGE, "no swap: only the present page");
}

/// A file of `len` bytes of `byte`, as a clone's base would be.
fn base_file(len: u64, byte: u8) -> std::fs::File {
    use std::io::Write;
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(&vec![byte; len as usize]).expect("fill");
    f
}

#[test]
fn a_base_backed_block_reads_the_base_writes_its_own_and_discards_to_zeros() {
    use std::os::fd::AsFd;
    let reg = RamRegistry::new();
    let b = reg.add(cfg("pc.ram", 4 * PAGE, 4 * PAGE, false)).expect("add");
    let file = base_file(4 * PAGE, 0x5a);
    b.map_base(file.as_fd(), 4 * PAGE).expect("map base");
    assert!(b.is_base_backed());
    let mut got = vec![0u8; 4 * PAGE as usize];
    b.read(0, &mut got).expect("read");
    assert!(got.iter().all(|&x| x == 0x5a), "reads see the base");
    b.write(0, &vec![0x11; PAGE as usize]).expect("write");
    let mut on_disk = vec![0u8; PAGE as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 0).expect("read file");
    assert!(on_disk.iter().all(|&x| x == 0x5a), "a write stays the block's own");
    // Discarding must give zeros, as for a private block: not the base's bytes again.
    b.take_dirty();
    b.discard(0, 2 * PAGE).expect("discard");
    b.read(0, &mut got).expect("read");
    assert!(got[..2 * PAGE as usize].iter().all(|&x| x == 0), "discarded pages read zero");
    assert!(got[2 * PAGE as usize..].iter().all(|&x| x == 0x5a), "the rest still maps the base");
    assert_eq!(b.take_dirty(), vec![0, 1]);
    assert!(matches!(b.map_base(file.as_fd(), 5 * PAGE), Err(RamError::Map { .. })), "larger than the block");
}

/// `mark_dirty` marks exactly the pages a range touches: boundaries, ranges over pages whose
/// bits are already set (skipped without a read-modify-write), the end of the mapping, and a
/// block page size larger than the host's.
#[test]
fn mark_dirty_marks_exactly_the_pages_touched() {
    let reg = RamRegistry::new();
    let b = reg.add(cfg("r", 200 * PAGE, 200 * PAGE, false)).expect("add");
    b.mark_dirty(PAGE - 1, 2);
    assert_eq!(b.take_dirty(), vec![0, 1], "one byte each side of a boundary");
    b.mark_dirty(PAGE, PAGE);
    assert_eq!(b.take_dirty(), vec![1], "exactly one page");
    b.mark_dirty(3 * PAGE, 0);
    assert!(b.take_dirty().is_empty(), "nothing for an empty range");
    // Bits already set in the middle and across a 64-page word boundary.
    b.mark_dirty(62 * PAGE, 1);
    b.mark_dirty(64 * PAGE, 1);
    b.mark_dirty(60 * PAGE + 5, 7 * PAGE);
    assert_eq!(b.take_dirty(), (60..=67).collect::<Vec<u64>>());
    // Clamped to the mapping; a range starting beyond it marks nothing.
    b.mark_dirty(199 * PAGE, 10 * PAGE);
    b.mark_dirty(200 * PAGE, PAGE);
    b.mark_dirty(u64::MAX - 3, 10);
    assert_eq!(b.take_dirty(), vec![199]);
    let big = reg
        .add(RamBlockConfig {
            idstr: "big".into(),
            size: 0x40000,
            max_size: 0x40000,
            page_size: 0x10000,
            resizeable: false,
        })
        .expect("64 KiB pages");
    big.mark_dirty(0xffff, 2);
    big.mark_dirty(0x30000, 0x10000);
    assert_eq!(big.take_dirty(), vec![0, 1, 3], "pages of the block's own size");
}

/// `mark_dirty` sets a word of 64 pages at a time: every range, starting and ending inside a
/// word or on its edges, dirties exactly its pages.
#[test]
fn mark_dirty_sets_exactly_the_pages_of_the_range() {
    let page = PAGE;
    let reg = RamRegistry::new();
    let b = reg.add(cfg("dirty", 300 * page, 300 * page, false)).expect("add");
    for (first, pages) in
        [(0, 1), (0, 64), (0, 300), (1, 63), (63, 2), (64, 64), (5, 200), (127, 1), (60, 140), (299, 1)]
    {
        b.take_dirty();
        b.mark_dirty(first * page, pages * page);
        let want: Vec<u64> = (first..first + pages).collect();
        assert_eq!(b.take_dirty(), want, "pages {first}..{}", first + pages);
    }
    // A byte range dirties every page it touches.
    b.mark_dirty(page - 1, 2);
    assert_eq!(b.take_dirty(), vec![0, 1]);
}

/// The pages a destination can have in use in odd ways are dropped too: zero pages mapped by
/// reads, transparent huge pages (written and read), a written page under another
/// protection (the block split into several VMAs), and a page the host wrote through
/// /proc/self/mem. After `discard_present` no page of any of
/// them is present (mincore, a second oracle) and every byte reads zero.
#[test]
fn discard_present_drops_zero_huge_split_and_foreign_written_pages() {
    const HUGE: u64 = 2 << 20;
    let pages = 4 * HUGE / PAGE;
    let reg = RamRegistry::new();
    let b = reg.add(cfg("pc.ram", pages * PAGE, pages * PAGE, false)).expect("add");
    let host = b.host_addr() as usize;
    // The first 2 MiB-aligned address inside the block, and huge pages asked for from there.
    let aligned = (host as u64).next_multiple_of(HUGE) - host as u64;
    // SAFETY: inside the block's reservation; MADV_HUGEPAGE only changes how faults fill it.
    let r = unsafe {
        libc::madvise((host + aligned as usize) as *mut libc::c_void, (2 * HUGE) as usize, libc::MADV_HUGEPAGE)
    };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
    // A huge page written, one only read (the huge zero page), a 4 KiB zero page read.
    b.write(aligned + 5 * PAGE, &[0xab; 16]).expect("write");
    let mut got = vec![0u8; 16];
    b.read(aligned + HUGE + 7 * PAGE, &mut got).expect("read");
    b.read(3 * PAGE, &mut got).expect("read");
    // A written page in a read-only stretch (written first, then protected: its own VMA).
    let last = pages * PAGE - 8 * PAGE;
    b.write(last + PAGE, &[0xcd; 16]).expect("write");
    // SAFETY: inside the reservation; only the protection of those pages changes.
    let r =
        unsafe { libc::mprotect((host + last as usize) as *mut libc::c_void, (4 * PAGE) as usize, libc::PROT_READ) };
    assert_eq!(r, 0, "mprotect: {}", std::io::Error::last_os_error());
    // A page written by the host through another path than the mapping (/proc/self/mem, as a
    // debugger or a process_vm_writev would).
    {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::OpenOptions::new().write(true).open("/proc/self/mem").expect("/proc/self/mem");
        mem.write_all_at(&[0xef; 8], host as u64 + 9 * PAGE).expect("write through /proc/self/mem");
    }
    let before = present_pages(&b);
    assert!(before.contains(&9), "{before:?}");
    assert!(before.contains(&3) && before.contains(&((aligned + 5 * PAGE) / PAGE)), "{before:?}");
    assert!(before.contains(&((last + PAGE) / PAGE)), "{before:?}");
    b.discard_present_unless(|| false).expect("discard");
    assert_eq!(present_pages(&b), Vec::<u64>::new(), "a page in use survived");
    let mut all = vec![0xffu8; (pages * PAGE) as usize];
    b.read(0, &mut all).expect("read");
    assert!(all.iter().all(|&x| x == 0), "discarded pages read zero");
}
