use super::*;

fn sum(d: &[u8]) -> u8 {
    let image = usize::from(d[2]) * 512;
    d[..image.min(d.len())].iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

fn bdf() -> Bdf {
    crate::net::nic_bdf(0)
}

#[test]
fn a_rom_for_1041_is_taken_as_it_is() {
    let d = synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE);
    assert_eq!(sum(&d), 0, "the synthetic ROM is checksummed");
    let rom = parse("a.rom", d.clone()).expect("valid");
    assert_eq!(rom.image, d);
    assert_eq!(rom.patched_from, None);
}

#[test]
fn a_transitional_rom_is_patched_with_its_checksum_kept() {
    let d = synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_TRANSITIONAL);
    let rom = parse("t.rom", d.clone()).expect("patched");
    assert_eq!(rom.patched_from, Some(VIRTIO_NET_TRANSITIONAL));
    assert_eq!(&rom.image[0x22..0x24], &VIRTIO_NET_DEVICE.to_le_bytes());
    assert_eq!(sum(&rom.image), 0, "checksum byte fixed");
    assert_ne!(rom.image[CHECKSUM_BYTE], d[CHECKSUM_BYTE]);
    let diff: Vec<usize> = (0..d.len()).filter(|&i| d[i] != rom.image[i]).collect();
    assert_eq!(
        diff,
        vec![CHECKSUM_BYTE, 0x22],
        "only the device ID's low byte (0x00 -> 0x41) and the checksum byte change"
    );
}

#[test]
fn the_system_rom_parses_when_installed() {
    let Ok(rom) = read(DEFAULT_ROM_PATH, Path::new(DEFAULT_ROM_PATH), RomOrigin::Cli) else {
        eprintln!("{DEFAULT_ROM_PATH} is not installed; skipped");
        return;
    };
    assert_eq!(rom.patched_from, None, "Debian's efi-virtio.rom says 1af4:1041");
    assert_eq!(block_size(rom.image.len() as u64), 0x40000, "249344 bytes round up to 256 KiB");
}

#[test]
fn hostile_images_are_refused_by_name() {
    let good = synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut d = good.clone();
        f(&mut d);
        d
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "is empty"),
        ("truncated header", good[..0x19].to_vec(), "too short"),
        ("no signature", with(&|d| d[1] = 0x55), "not the signature"),
        ("size byte 0", with(&|d| d[2] = 0), "size byte is 0"),
        ("PCIR pointer 0", with(&|d| d[0x18..0x1a].copy_from_slice(&[0, 0])), "outside the image"),
        ("PCIR pointer into the header", with(&|d| d[0x18] = 0x10), "outside the image"),
        ("PCIR past the file", with(&|d| d[0x18..0x1a].copy_from_slice(&0xfff0u16.to_le_bytes())), "outside"),
        // The file is 4 KiB but the size byte says one 512-byte block: PCIR at 0x400 is in
        // the file but not in the image.
        (
            "PCIR past the declared image",
            with(&|d| {
                d[2] = 1;
                d[0x18..0x1a].copy_from_slice(&0x400u16.to_le_bytes());
                d[0x400..0x404].copy_from_slice(b"PCIR");
            }),
            "outside the image",
        ),
        ("truncated PCIR", good[..0x30].to_vec(), "outside the image"),
        ("no PCIR signature", with(&|d| d[0x1c] = b'X'), "no \"PCIR\""),
        ("wrong device", with(&|d| d[0x22..0x24].copy_from_slice(&0x1001u16.to_le_bytes())), "1af4:1001"),
        ("wrong vendor", with(&|d| d[0x20..0x22].copy_from_slice(&0x8086u16.to_le_bytes())), "8086:1041"),
    ];
    for (what, data, needle) in cases {
        let e = parse("evil.rom", data).expect_err(what).to_string();
        assert!(e.contains(needle), "{what}: {e}");
        assert!(e.contains("evil.rom"), "{what}: the error names the file: {e}");
    }
}

#[test]
fn files_that_are_not_plain_roms_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.rom");
    std::fs::write(&good, synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE)).expect("write");
    let spec = |p: &Path| NetSpec { tap: "t".into(), mac: None, rom: RomChoice::File(p.into()), romsize: None };
    assert!(load(&spec(&good), RomOrigin::Cli).expect("good").is_some());

    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let e = load(&spec(&fifo), RomOrigin::Cli).expect_err("fifo").to_string();
    assert!(e.contains("a FIFO") && e.contains("fifo"), "{e}");

    let e = load(&spec(dir.path()), RomOrigin::Cli).expect_err("directory").to_string();
    assert!(e.contains("a directory"), "{e}");

    let e = load(&spec(Path::new("/dev/zero")), RomOrigin::Cli).expect_err("device").to_string();
    assert!(e.contains("a device") && e.contains("/dev/zero"), "{e}");

    let huge = dir.path().join("huge.rom");
    let f = std::fs::File::create(&huge).expect("create");
    f.set_len(MAX_ROM_SIZE + 1).expect("sparse");
    let e = load(&spec(&huge), RomOrigin::Cli).expect_err("huge").to_string();
    assert!(e.contains("huge.rom") && e.contains(&format!("{}", MAX_ROM_SIZE + 1)), "{e}");

    // Symlinks: the CLI follows them (as for --kernel); an image an API client named may not
    // be one.
    let link = dir.path().join("link.rom");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    assert!(load(&spec(&link), RomOrigin::Cli).expect("CLI follows symlinks").is_some());
    let e = load(&spec(&link), RomOrigin::Api).expect_err("nofollow").to_string();
    assert!(e.contains("symlink") && e.contains("link.rom"), "{e}");
    assert!(load(&spec(&good), RomOrigin::Api).expect("a regular image").is_some());

    let e = load(&spec(&dir.path().join("missing.rom")), RomOrigin::Cli).expect_err("missing").to_string();
    assert!(e.contains("missing.rom") && e.contains("no such file"), "{e}");

    let none = NetSpec { rom: RomChoice::None, ..spec(&good) };
    assert!(load(&none, RomOrigin::Api).expect("none").is_none());
}

#[test]
fn block_sizes_follow_the_file_or_romsize() {
    assert_eq!(block_size(1), 0x1000);
    assert_eq!(block_size(0x1000), 0x1000);
    assert_eq!(block_size(0x1001), 0x2000);
    assert_eq!(block_size(249_344), 0x40000);
    let rom = parse("r.rom", synthetic(0x3000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE)).expect("valid");

    let c = block_config(bdf(), &rom, None).expect("natural");
    assert_eq!(c.idstr, "0000:00:03.0/virtio-net-pci.rom");
    assert_eq!((c.size, c.max_size, c.resizeable), (0x4000, 0x4000, false));

    let c = block_config(bdf(), &rom, Some(0x20000)).expect("pinned");
    assert_eq!((c.size, c.max_size, c.resizeable), (0x20000, 0x20000, true));
    let c = block_config(bdf(), &rom, Some(0x4000)).expect("pinned to the natural size");
    assert_eq!((c.size, c.max_size), (0x4000, 0x4000));

    let e = block_config(bdf(), &rom, Some(0x2000)).expect_err("romsize below the file").to_string();
    assert!(e.contains("r.rom") && e.contains("0x3000") && e.contains("romsize=0x2000"), "{e}");
    assert!(e.contains("romsize=0x4000 or more"), "{e}");
}

#[test]
fn the_block_holds_the_image_and_zeros_after_it() {
    let reg = RamRegistry::new();
    let rom = parse("r.rom", synthetic(0x1200, VIRTIO_VENDOR, VIRTIO_NET_TRANSITIONAL)).expect("valid");
    let b = create_block(&reg, crate::net::nic_bdf(2), &rom, None).expect("block");
    assert_eq!(b.idstr(), "0000:00:05.0/virtio-net-pci.rom");
    assert_eq!((b.used_length(), b.max_length(), b.resizeable()), (0x2000, 0x2000, false));
    let mut got = vec![0u8; 0x2000];
    b.read(0, &mut got).expect("read");
    assert_eq!(&got[..0x1200], &rom.image[..], "the patched image");
    assert!(got[0x1200..].iter().all(|&x| x == 0));
    let e = create_block(&reg, crate::net::nic_bdf(2), &rom, None).expect_err("duplicate").to_string();
    assert!(e.contains("0000:00:05.0/virtio-net-pci.rom"), "{e}");
}

struct RomDev(devices::pci::config::PciConfig);

impl PciDevice for RomDev {
    fn name(&self) -> &'static str {
        "romdev"
    }
    fn config(&self) -> &devices::pci::config::PciConfig {
        &self.0
    }
    fn config_mut(&mut self) -> &mut devices::pci::config::PciConfig {
        &mut self.0
    }
}

#[test]
fn a_restore_resize_of_a_pinned_block_resizes_the_rom_bar() {
    use devices::pci::config::{BarKind, PciConfig, PciHeader, ROM_ADDRESS, ROM_BAR};
    let reg = RamRegistry::new();
    let rom = parse("r.rom", synthetic(0x1000, VIRTIO_VENDOR, VIRTIO_NET_DEVICE)).expect("valid");
    let b = create_block(&reg, bdf(), &rom, Some(0x40000)).expect("pinned block");
    let mut config = PciConfig::new(PciHeader {
        vendor: VIRTIO_VENDOR,
        device: VIRTIO_NET_DEVICE,
        revision: 1,
        class: (2, 0, 0),
        subsystem_vendor: VIRTIO_VENDOR,
        subsystem: 1,
        interrupt_pin: 1,
    });
    config.add_bar(ROM_BAR, BarKind::Rom, b.used_length()).expect("rom bar");
    let dev: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(RomDev(config)));
    follow_resizes(&b, Arc::downgrade(&dev));
    reg.resize(b.idstr(), 0x1000).expect("resize as a restore does");
    let mut d = dev.lock().expect("lock");
    assert_eq!(d.config().bar(ROM_BAR).map(|(_, s)| s), Some(0x1000));
    // The saved address of a 4 KiB ROM BAR is taken as it is, not masked to 256 KiB.
    d.config_mut().write(ROM_ADDRESS, &0xfebf_1001u32.to_le_bytes());
    assert_eq!(d.config().bar_address(ROM_BAR), Some(0xfebf_1000));
}
