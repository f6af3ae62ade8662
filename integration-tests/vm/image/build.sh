#!/bin/bash
# Builds the VM tier's guest: a Debian 12 image (ext4 raw + kernel + initrd)
# from Debian packages only, with what ferry needs at run time in the guest.
# Usage: build.sh OUTDIR   (as root; needs mmdebstrap and e2fsprogs)
# The .deb cache in $VM_WORK/debcache makes rebuilds faster.
set -euo pipefail
OUT=$1
SIZE=${IMG_SIZE:-2G}
HERE=$(cd "$(dirname "$0")" && pwd)
# The mirrors this host's apt already uses (deb822 .sources or sources.list).
MIRRORS=$( { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null || true; grep -h '^deb ' /etc/apt/sources.list 2>/dev/null || true; } | awk '{print $2}')
MAIN=$(echo "$MIRRORS" | grep -v security | head -1)
SEC=$(echo "$MIRRORS" | grep security | head -1)
CACHE=${DEB_CACHE:-${VM_WORK:-/var/tmp/ferry-vm}/debcache}
mkdir -p "$OUT" "$CACHE"
ROOT="$OUT/rootfs"
rm -rf "$ROOT"; mkdir -p "$ROOT"

# What the tier needs in the guest: systemd/udev/dbus (the real platform),
# cryptsetup + dmsetup (LUKS drives), borgbackup (repositories to sync and
# back up), psmisc (fuser, a holder of a mount), python3-aiosmtpd (an SMTP
# sink), python3-dbus + python3-gi (checks on the bus), libnss-systemd
# (Priority: standard, so on every usual Debian install: it resolves the
# DynamicUser= of ferry-backup@ and ferry-notify-failure@, without which
# dbus-daemon drops their connections), dbus-user-session (a lingering
# user's session bus, for the user-level ferry-borg), openssh-server and
# openssh-client (that user backs up over SSH to a restricted account on the
# guest itself; the guest has no network but its loopback), smartmontools
# (ferry-crypt reads a drive's SMART health on attach; ferry's package
# recommends it).
PKGS=systemd,systemd-sysv,udev,dbus,cryptsetup,cryptsetup-bin,dmsetup,e2fsprogs,kmod,util-linux,mount,procps,\
linux-image-amd64,initramfs-tools,python3-minimal,usbutils,less,borgbackup,psmisc,python3-aiosmtpd,\
python3-dbus,python3-gi,libnss-systemd,dbus-user-session,libpam-systemd,openssh-server,openssh-client,smartmontools

t0=$(date +%s)
mmdebstrap --mode=root --skip=essential/unlink --variant=minbase --include="$PKGS" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --setup-hook='mkdir -p "$1/var/cache/apt/archives"; cp -a '"$CACHE"'/*.deb "$1/var/cache/apt/archives/" 2>/dev/null || true' \
  --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"; echo "MODULES=list" > "$1/etc/initramfs-tools/conf.d/vm.conf"; echo COMPRESS=zstd >> "$1/etc/initramfs-tools/conf.d/vm.conf"' \
  --setup-hook='mkdir -p "$1/etc/initramfs-tools/hooks"; printf "#!/bin/sh\n[ \"\$1\" = prereqs ] && exit 0\n. /usr/share/initramfs-tools/hook-functions\nfor m in virtio_pci virtio_blk ext4; do manual_add_modules \$m; done\n" > "$1/etc/initramfs-tools/hooks/ferryvm"; chmod +x "$1/etc/initramfs-tools/hooks/ferryvm"' \
  --customize-hook='cp -a "$1"/var/cache/apt/archives/*.deb '"$CACHE"'/ 2>/dev/null || true' \
  --customize-hook="$HERE/customize.sh \"\$1\"" \
  --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
  bookworm "$ROOT" \
  "deb $MAIN bookworm main" \
  "deb $MAIN bookworm-updates main" \
  ${SEC:+"deb $SEC bookworm-security main"}
t1=$(date +%s)
cp -L "$ROOT/vmlinuz" "$OUT/vmlinuz"
cp -L "$ROOT/initrd.img" "$OUT/initrd.img"
rm -f "$OUT/root.img"
mkfs.ext4 -q -F -L vmroot -d "$ROOT" "$OUT/root.img" "$SIZE"
rm -rf "$ROOT"
t2=$(date +%s)
echo "image: mmdebstrap $((t1-t0))s, mkfs.ext4 -d $((t2-t1))s"
