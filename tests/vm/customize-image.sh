#!/bin/sh
# mmdebstrap --customize-hook of build-image.sh: $1 is the guest's root.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$1

echo vmtest > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vmtest\n' > "$root/etc/hosts"
# A fixed machine ID: the boot loader entries and FleetLock IDs stay stable.
echo 5d1b0a9e6c2f4e0b8a7d3c1f2e4b6a80 > "$root/etc/machine-id"
# The ESP at /boot as on NixOS.  No `nofail`: with it systemd-bless-boot ran
# before /boot was mounted (and failed).
cat > "$root/etc/fstab" <<'FSTAB'
/dev/vda2 / ext4 rw,errors=remount-ro 0 1
/dev/vda1 /boot vfat umask=0077 0 2
FSTAB
mkdir -p "$root/boot"

# The guest agent (the control channel on the virtio-serial port `vmtest`).
install -D -m 0755 "$here/guest_agent.py" "$root/usr/local/lib/vmtest/guest_agent.py"
cat > "$root/etc/systemd/system/vmtest-agent.service" <<'UNIT'
[Unit]
Description=VM tier control agent (JSON lines on /dev/virtio-ports/vmtest)
DefaultDependencies=no
After=systemd-udevd.service local-fs.target
Wants=dev-virtio\x2dports-vmtest.device
After=dev-virtio\x2dports-vmtest.device

[Service]
ExecStart=/usr/bin/python3 -u /usr/local/lib/vmtest/guest_agent.py
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
UNIT

# qemu's user network: a static address (DHCP costs seconds per boot under TCG).
cat > "$root/etc/systemd/system/vmtest-network.service" <<'UNIT'
[Unit]
Description=Static address on qemu's user network
DefaultDependencies=no
Wants=network.target
Before=network.target network-online.target
After=systemd-udevd.service
Requires=sys-subsystem-net-devices-eth0.device
After=sys-subsystem-net-devices-eth0.device

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link set lo up
ExecStart=/sbin/ip link set eth0 up
ExecStart=/sbin/ip addr add 10.0.2.15/24 dev eth0
ExecStart=/sbin/ip route add default via 10.0.2.2

[Install]
WantedBy=network-online.target multi-user.target
UNIT
# Predictable names would call it enp0s...: keep eth0.
ln -sf /dev/null "$root/etc/systemd/network/99-default.link"

chroot "$root" systemctl enable vmtest-agent.service vmtest-network.service
chroot "$root" systemctl enable network-online.target 2>/dev/null || true
# What slows boots under TCG and means nothing here.
for u in apt-daily.timer apt-daily-upgrade.timer man-db.timer logrotate.timer e2scrub_all.timer \
         e2scrub_reap.service fstrim.timer dpkg-db-backup.timer systemd-tmpfiles-clean.timer \
         getty@tty1.service systemd-timesyncd.service nix-daemon.socket nix-daemon.service \
         kexec-load.service kexec.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$u"
done
# The journal persists, so a failed boot's messages can be read after it.
mkdir -p "$root/var/log/journal"
# nix as root, single-user (no daemon); the tests write substituters and keys.
mkdir -p "$root/etc/nix" "$root/nix/var/nix/profiles" "$root/nix/var/nix/gcroots"
printf 'sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\n' > "$root/etc/nix/nix.conf"
# Root's password is empty on the serial console (for debugging by hand).
chroot "$root" passwd -d root >/dev/null
rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
