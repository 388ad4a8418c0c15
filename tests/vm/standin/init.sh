#!/bin/sh
# Stage 2 of a stand-in NixOS system (NixOS: stage-2-init.sh): the initrd
# mounted the root; point /run/booted-system and /run/current-system at this
# system and hand over to systemd.
system=@out@
if [ -n "@broken@" ]; then
  echo "vmtest: $system never comes up (broken stand-in): init exits" > /dev/console
  exit 1
fi
mountpoint -q /run || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
ln -sfn "$system" /run/booted-system
ln -sfn "$system" /run/current-system
echo "vmtest: stage 2 of $system" > /dev/console
exec /lib/systemd/systemd "$@"
