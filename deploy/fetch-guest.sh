#!/usr/bin/env bash
# Fetches Debian's cloud kernel and busybox-static (downloaded with apt-get, not installed)
# and builds a small initramfs, for the Linux boot tests. Outputs:
#   deploy/cache/guest/vmlinuz            the kernel (bzImage)
#   deploy/cache/guest/initramfs.cpio.gz  busybox and an /init that reports and powers off
# Does nothing when both exist. Prints the two paths.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/cache"
guest="$cache/guest"
kernel="$guest/vmlinuz"
initrd="$guest/initramfs.cpio.gz"

if [ -s "$kernel" ] && [ -s "$initrd" ]; then
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
