#!/usr/bin/env bash
# Fetches Debian's cloud kernel and busybox-static (downloaded with apt-get, not installed)
# and builds a small initramfs, for the Linux boot tests. Outputs:
#   deploy/cache/guest/vmlinuz            the kernel (bzImage)
#   deploy/cache/guest/vmlinux            the ELF kernel inside it (its LZ4 payload, unpacked):
#                                         under emulated CPL0 it prints its banner in ~20 s
#                                         where the bzImage spends ~2 min decompressing itself
#   deploy/cache/guest/initramfs.cpio.gz  busybox and an /init that reports and powers off
# Does nothing when all three exist. Prints the paths of the bzImage and the initramfs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/cache"
guest="$cache/guest"
kernel="$guest/vmlinuz"
initrd="$guest/initramfs.cpio.gz"
elf="$guest/vmlinux"

# The bzImage's payload (setup header: payload_offset at 0x248, payload_length at 0x24c,
# counted from the end of the setup sectors) is an LZ4 legacy frame holding the ELF vmlinux.
extract_elf() {
    command -v lz4 >/dev/null || "$here/install-deps.sh"
    python3 - "$kernel" "$elf.lz4" <<'PY'
import struct, sys
d = open(sys.argv[1], "rb").read()
sects = d[0x1F1] or 4
off, length = struct.unpack_from("<II", d, 0x248)
start = (sects + 1) * 512 + off
payload = d[start:start + length]
if payload[:4] != bytes.fromhex("02214c18"):
    sys.exit("fetch-guest: the bzImage payload is not LZ4 (magic %s)" % payload[:4].hex())
open(sys.argv[2], "wb").write(payload)
PY
    # The payload ends with the decompressed size, which lz4 reports as trailing garbage.
    lz4 -dc "$elf.lz4" > "$elf.tmp" 2>/dev/null || true
    rm -f "$elf.lz4"
    if [ "$(head -c 4 "$elf.tmp" | od -An -tx1 | tr -d ' ')" != "7f454c46" ]; then
        echo "fetch-guest: unpacking the ELF kernel from $kernel failed" >&2
        exit 1
    fi
    mv "$elf.tmp" "$elf"
}

if [ -s "$kernel" ] && [ -s "$initrd" ]; then
    [ -s "$elf" ] || extract_elf
    echo "$kernel"
    echo "$initrd"
    exit 0
fi
mkdir -p "$cache/debs" "$guest"
command -v cpio >/dev/null || "$here/install-deps.sh"

# The metapackage names the real kernel package.
apt-get update -qq >/dev/null 2>&1 || true
pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$pkg" ]; then
    echo "fetch-guest: cannot resolve linux-image-cloud-amd64 to a kernel package" >&2
    exit 1
fi
(cd "$cache/debs" && apt-get download -qq "$pkg" busybox-static >/dev/null 2>&1)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$cache/debs/${pkg}"_*.deb "$work/kernel"
cp "$(ls "$work"/kernel/boot/vmlinuz-* | head -n 1)" "$kernel.tmp"
mv "$kernel.tmp" "$kernel"
extract_elf

dpkg-deb -x "$cache/debs"/busybox-static_*.deb "$work/busybox"
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cat > "$root/init" <<'INIT'
#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
echo "snapvisor-initramfs: init started"
/bin/busybox uname -a
# Tell snapvisor we are done: status 0 to the exit device at port 0x501.
/bin/busybox printf '\000' | /bin/busybox dd of=/dev/port bs=1 seek=1281 count=1 2>/dev/null
/bin/busybox poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$initrd.tmp"
mv "$initrd.tmp" "$initrd"
gzip -dc "$initrd" | cpio -t --quiet | grep -qx init

echo "$kernel"
echo "$initrd"
