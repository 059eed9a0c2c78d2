//! fw_cfg selector keys and interface constants (QEMU's docs/specs/fw_cfg.rst).

pub const FW_CFG_SIGNATURE: u16 = 0x00;
pub const FW_CFG_ID: u16 = 0x01;
pub const FW_CFG_UUID: u16 = 0x02;
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
pub const FW_CFG_NOGRAPHIC: u16 = 0x04;
pub const FW_CFG_NB_CPUS: u16 = 0x05;
pub const FW_CFG_MACHINE_ID: u16 = 0x06;
pub const FW_CFG_KERNEL_ADDR: u16 = 0x07;
pub const FW_CFG_KERNEL_SIZE: u16 = 0x08;
pub const FW_CFG_KERNEL_CMDLINE: u16 = 0x09;
pub const FW_CFG_INITRD_ADDR: u16 = 0x0a;
pub const FW_CFG_INITRD_SIZE: u16 = 0x0b;
pub const FW_CFG_BOOT_DEVICE: u16 = 0x0c;
pub const FW_CFG_NUMA: u16 = 0x0d;
pub const FW_CFG_BOOT_MENU: u16 = 0x0e;
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
pub const FW_CFG_KERNEL_ENTRY: u16 = 0x10;
pub const FW_CFG_KERNEL_DATA: u16 = 0x11;
pub const FW_CFG_INITRD_DATA: u16 = 0x12;
pub const FW_CFG_CMDLINE_ADDR: u16 = 0x13;
pub const FW_CFG_CMDLINE_SIZE: u16 = 0x14;
pub const FW_CFG_CMDLINE_DATA: u16 = 0x15;
pub const FW_CFG_SETUP_ADDR: u16 = 0x16;
pub const FW_CFG_SETUP_SIZE: u16 = 0x17;
pub const FW_CFG_SETUP_DATA: u16 = 0x18;
pub const FW_CFG_FILE_DIR: u16 = 0x19;
/// The first file selector; files follow in name order.
pub const FW_CFG_FILE_FIRST: u16 = 0x20;
/// Selectors files may use (QEMU's default is 0x20 slots; snapvisor allows more).
pub const FW_CFG_FILE_SLOTS: u16 = 0x400;
/// Selector bit of the (obsolete) write channel; ignored when selecting.
pub const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;
/// Selector bit of architecture-specific items.
pub const FW_CFG_ARCH_LOCAL: u16 = 0x8000;

/// Feature bits in FW_CFG_ID.
pub const FW_CFG_VERSION: u32 = 0x01;
pub const FW_CFG_VERSION_DMA: u32 = 0x02;

/// DMA control bits.
pub const DMA_CTL_ERROR: u32 = 0x01;
pub const DMA_CTL_READ: u32 = 0x02;
pub const DMA_CTL_SKIP: u32 = 0x04;
pub const DMA_CTL_SELECT: u32 = 0x08;
pub const DMA_CTL_WRITE: u32 = 0x10;

/// "QEMU CFG", what a read of the DMA address register returns (big-endian).
pub const DMA_SIGNATURE: u64 = u64::from_be_bytes(*b"QEMU CFG");

/// x86 port interface: selector at +0 (16-bit), data at +1 (8-bit), DMA address at +4 (64-bit
/// big-endian, or two 32-bit halves with the low one at +8 starting the transfer).
pub const PORT_BASE: u64 = 0x510;
pub const PORT_LEN: u64 = 0x0c;
pub const PORT_SELECTOR: u64 = 0;
pub const PORT_DATA: u64 = 1;
pub const PORT_DMA: u64 = 4;

/// Longest file name, with its NUL.
pub const FILE_NAME_LEN: usize = 56;
/// One directory entry: be32 size, be16 select, u16 reserved, name[56].
pub const DIR_ENTRY_LEN: usize = 64;
