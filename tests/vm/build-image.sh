#!/bin/sh
# Build the VM tier's guest disk image from Debian's packages (as root):
#
#   tests/vm/build-image.sh OUTDIR
#
# OUTDIR/base.img   GPT disk: ESP (vfat, /boot, systemd-boot as the removable
#                   EFI/BOOT/BOOTX64.EFI) + root (ext4, made with mkfs.ext4 -d)
# OUTDIR/vmlinuz, OUTDIR/initrd.img
#                   the guest's kernel and initrd, for the bootable stand-in
#                   systems the tests deploy
#
# No loop devices and no mounts: the file systems are made from directories
# (mkfs.ext4 -d, mkfs.vfat -C + mcopy) and written into the disk at their
# offsets.  The guest boots a plain Debian entry (debian.conf) first; the
# tests install a stand-in NixOS system on it (see tests/vm/harness.py).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$1
suite=${VM_SUITE:-bookworm}
mkdir -p "$out"
work="$out/build"
rm -rf "$work"
mkdir -p "$work"
rootfs="$work/rootfs"

say() { echo "build-image: $(date -u +%T) $*" >&2; }

# The host's apt sources (only Debian's mirrors are reachable in CI).
sources=""
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
  [ -s "$f" ] && { sources=$f; break; }
done

packages="systemd,systemd-sysv,udev,dbus,systemd-boot,systemd-boot-efi,kexec-tools,nix-bin,python3,\
linux-image-amd64,initramfs-tools,e2fsprogs,dosfstools,util-linux,mount,procps,iproute2,kmod"

say "mmdebstrap $suite (minbase + $packages)"
# shellcheck disable=SC2016
mmdebstrap --mode=root --variant=minbase --include="$packages" \
  --aptopt='Apt::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"' \
  --setup-hook='printf "MODULES=list\nCOMPRESS=gzip\n" > "$1/etc/initramfs-tools/conf.d/vmtest.conf"' \
  --setup-hook='printf "virtio_pci\nvirtio_blk\next4\n" > "$1/usr/share/initramfs-tools/modules.d/vmtest"' \
  --essential-hook='echo "kexec-tools kexec-tools/load_kexec boolean false" | chroot "$1" debconf-set-selections' \
  --customize-hook="sh $here/customize-image.sh \"\$1\"" \
  "$suite" "$rootfs" ${sources:+"$sources"}

say "kernel and initrd"
kernel=$(ls "$rootfs"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$rootfs"/boot/initrd.img-* | sort -V | tail -1)
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"
ls -l "$work/vmlinuz" "$work/initrd.img" >&2

# The ESP: systemd-boot as the removable-media loader, a Debian entry.
esp_mb=160
root_mb=1400
say "ESP (${esp_mb} MiB vfat)"
esp="$work/esp.img"
mkfs.vfat -n ESP -F 32 -C "$esp" $((esp_mb * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/EFI/debian ::/loader ::/loader/entries
mcopy -i "$esp" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/systemd/systemd-bootx64.efi
mcopy -i "$esp" "$work/vmlinuz" ::/EFI/debian/vmlinuz
mcopy -i "$esp" "$work/initrd.img" ::/EFI/debian/initrd.img
printf 'timeout 0\ndefault debian.conf\n' > "$work/loader.conf"
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf
cat > "$work/debian.conf" <<EOF
title Debian (installer of the VM tier)
sort-key debian
linux /EFI/debian/vmlinuz
initrd /EFI/debian/initrd.img
options root=/dev/vda2 ro console=ttyS0 loglevel=4 panic=1
EOF
mcopy -i "$esp" "$work/debian.conf" ::/loader/entries/debian.conf

say "root file system (${root_mb} MiB ext4 from the directory)"
rm -rf "$rootfs/boot"/*
mkfs.ext4 -q -L vmroot -d "$rootfs" "$work/root.img" "${root_mb}M"

say "GPT disk"
img="$work/base.img"
total_mb=$((1 + esp_mb + root_mb + 1))
truncate -s "${total_mb}M" "$img"
sfdisk -q "$img" <<EOF
label: gpt
start=2048, size=$((esp_mb * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP
start=$((2048 + esp_mb * 2048)), size=$((root_mb * 2048)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root
EOF
dd if="$esp" of="$img" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/root.img" of="$img" bs=1M seek=$((1 + esp_mb)) conv=notrunc,sparse status=none

mv "$img" "$out/base.img"
mv "$work/vmlinuz" "$work/initrd.img" "$out/"
rm -rf "$work"
say "done: $(du -h "$out/base.img" | cut -f1) allocated"
