#!/usr/bin/env bash
# Installs the Debian packages snapvisor's build and tests need. Idempotent and quiet when
# everything is already there. Run as root.
#   libclang-dev    bindgen (userfaultfd-sys) needs libclang at build time
#   busybox-static, cpio   the test initramfs (deploy/fetch-guest.sh)
#   lz4             unpacks the ELF kernel from the bzImage (deploy/fetch-guest.sh)
#   seabios, ipxe-qemu     real firmware for the firmware tests
#   acpica-tools    iasl, to disassemble ACPI tables in tests
#   dnsmasq-base    DHCP for iPXE on a tap in the full iPXE test (hosts with hardware
#                   virtualisation); the binary only, no system service
#   iproute2, iputils-ping  network namespaces and taps for the virtio-net tests and
#                   `bench net` (ip), and the host's ping in netping's echo test
set -euo pipefail

packages=(libclang-dev busybox-static cpio lz4 seabios ipxe-qemu acpica-tools dnsmasq-base iproute2 iputils-ping)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
