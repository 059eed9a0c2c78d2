//! The XSAVE area of a vCPU (x87, SSE, AVX and later register state), whose size depends on
//! the host: the legacy `struct kvm_xsave` holds 4096 bytes; with KVM_CAP_XSAVE2 KVM reports
//! the size it really moves (more with AVX-512 and AMX when the guest may use them), returns
//! it with KVM_GET_XSAVE2 and reads that many bytes on KVM_SET_XSAVE.
//!
//! A snapshot stores the first 4096 bytes as `kvm_xsave` and the rest as u32 words
//! (`VcpuState::xsave_extra`). On restore the saved words must fit in what this host's KVM
//! takes; the area handed to KVM is padded with zeros to exactly that size, because KVM reads
//! its full size whatever the buffer holds (components the XSAVE header does not list as in
//! use are not read from the area).

use kvm_bindings::{kvm_xsave, Xsave};
use kvm_ioctls::VcpuFd;

use super::vcpu_state::{HostVcpuCaps, StateError, VcpuState};

/// Size of the legacy `struct kvm_xsave`, what KVM_GET_XSAVE and KVM_SET_XSAVE move unless
/// KVM_CAP_XSAVE2 reports more.
pub const XSAVE_LEGACY_SIZE: usize = std::mem::size_of::<kvm_xsave>();
/// Largest XSAVE area accepted from a snapshot or a host (AMX tiles need about 11 KiB).
pub const XSAVE_MAX_SIZE: usize = 64 << 10;

/// Reads the whole XSAVE area: KVM_GET_XSAVE2 when KVM's size exceeds the legacy 4096 bytes.
pub(super) fn read_xsave(vcpu: &VcpuFd, id: u8, caps: &HostVcpuCaps) -> Result<(kvm_xsave, Vec<u32>), StateError> {
    let words = caps.xsave_extra_words();
    if words == 0 {
        let xsave = vcpu.get_xsave().map_err(|source| StateError::Vcpu { vcpu: id, what: "KVM_GET_XSAVE", source })?;
        return Ok((xsave, Vec::new()));
    }
    let mut area =
        Xsave::new(words).map_err(|e| StateError::Invalid { vcpu: id, reason: format!("XSAVE area: {e:?}") })?;
    // SAFETY: `area` holds 4096 bytes plus `words` u32s, at least the KVM_CAP_XSAVE2 size
    // KVM_GET_XSAVE2 writes.
    unsafe { vcpu.get_xsave2(&mut area) }.map_err(|source| StateError::Vcpu {
        vcpu: id,
        what: "KVM_GET_XSAVE2",
        source,
    })?;
    let legacy = kvm_xsave { region: area.as_fam_struct_ref().xsave.region, ..Default::default() };
    Ok((legacy, area.as_slice().to_vec()))
}

/// Checks a snapshot's XSAVE area against this host: the words past 4096 bytes must fit in
/// what this host's KVM takes. Returns how many words to hand KVM_SET_XSAVE past 4096 bytes.
pub fn xsave_restore_words(saved_extra: usize, caps: &HostVcpuCaps) -> Result<usize, String> {
    let host = caps.xsave_extra_words();
    if saved_extra > host {
        return Err(format!(
            "the snapshot's XSAVE area is {} bytes, this host's KVM takes {} (KVM_CAP_XSAVE2)",
            XSAVE_LEGACY_SIZE + 4 * saved_extra,
            XSAVE_LEGACY_SIZE.max(caps.xsave_size)
        ));
    }
    Ok(host)
}

/// Writes the XSAVE area, padded with zeros to this host's KVM_CAP_XSAVE2 size: KVM_SET_XSAVE
/// reads that many bytes whatever the buffer holds.
pub(super) fn write_xsave(vcpu: &VcpuFd, state: &VcpuState, words: usize) -> Result<(), StateError> {
    let id = state.id;
    let e = |what| move |source| StateError::Vcpu { vcpu: id, what, source };
    if words == 0 {
        // SAFETY: `state.xsave` is a whole `kvm_xsave` (4096 bytes plus its zero-length tail),
        // and this host's KVM reads no more than that (its KVM_CAP_XSAVE2 size is at most
        // 4096, checked by `xsave_restore_words`).
        return unsafe { vcpu.set_xsave(&state.xsave) }.map_err(e("KVM_SET_XSAVE"));
    }
    let mut area =
        Xsave::new(words).map_err(|err| StateError::Invalid { vcpu: id, reason: format!("XSAVE area: {err:?}") })?;
    // SAFETY: only the fixed-size region is written; the FAM length stays as allocated.
    unsafe { area.as_mut_fam_struct() }.xsave.region = state.xsave.region;
    area.as_mut_slice()[..state.xsave_extra.len()].copy_from_slice(&state.xsave_extra);
    // SAFETY: `area` holds 4096 bytes plus `words` u32s, this host's KVM_CAP_XSAVE2 size,
    // which is what KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave2(&area) }.map_err(e("KVM_SET_XSAVE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(xsave_size: usize) -> HostVcpuCaps {
        HostVcpuCaps { msr_indices: Vec::new(), xsave_size }
    }

    #[test]
    fn xsave_area_must_fit_this_host() {
        assert_eq!(xsave_restore_words(0, &caps(0)), Ok(0), "no KVM_CAP_XSAVE2: the legacy area");
        assert_eq!(xsave_restore_words(0, &caps(4096)), Ok(0));
        assert_eq!(xsave_restore_words(0, &caps(4096 + 8192)), Ok(2048), "padded to what KVM reads");
        assert_eq!(xsave_restore_words(2048, &caps(4096 + 8192)), Ok(2048));
        let err = xsave_restore_words(2049, &caps(4096 + 8192)).expect_err("larger than the host's");
        assert!(err.contains("12292 bytes") && err.contains("takes 12288"), "{err}");
        let err = xsave_restore_words(1, &caps(4096)).expect_err("this host has no XSAVE2 area");
        assert!(err.contains("4100 bytes") && err.contains("takes 4096"), "{err}");
    }
}
