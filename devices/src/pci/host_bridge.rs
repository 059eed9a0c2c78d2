//! The host bridge at 00:00.0, as an Intel 440FX PMC (8086:1237 rev 02, class 0600), which
//! is how firmware recognises the machine (SeaBIOS: "Running on QEMU (i440fx)").
//!
//! Its chipset registers are stored, never acted on: the PAM registers 0x59-0x5f (shadow RAM
//! attributes of 0xc0000-0xfffff; on this machine that area is always plain RAM) and SMRAM
//! at 0x72 (no SMM here).

use super::config::{PciConfig, PciHeader};
use super::PciDevice;

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_I440FX: u16 = 0x1237;
pub const REVISION: u8 = 0x02;
/// PAM0..PAM6.
pub const PAM_FIRST: usize = 0x59;
pub const PAM_LAST: usize = 0x5f;
/// SMRAM control.
pub const SMRAM: usize = 0x72;
/// SMRAM at power-on (as QEMU's i440FX: compatible SMRAM at 0xa0000).
const SMRAM_RESET: u8 = 0x02;

/// The i440FX host bridge.
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    pub fn new() -> Self {
        let mut config = PciConfig::new(PciHeader {
            vendor: VENDOR_INTEL,
            device: DEVICE_I440FX,
            revision: REVISION,
            class: (0x06, 0x00, 0x00),
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
            interrupt_pin: 0,
        });
        // The ranges are constant and inside the 256 bytes.
        let _ = config.set_wmask(PAM_FIRST, &[0xff; PAM_LAST - PAM_FIRST + 1]);
        let _ = config.set_initial(SMRAM, &[SMRAM_RESET]);
        let _ = config.set_wmask(SMRAM, &[0xff]);
        HostBridge { config }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge::new()
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &'static str {
        "i440FX host bridge"
    }
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}
