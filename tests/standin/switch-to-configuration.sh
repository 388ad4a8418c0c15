#!/bin/sh
# Stand-in for NixOS' switch-to-configuration, driven by files in
# /var/lib/standin (the test world's control panel):
#   fail      store paths whose activation exits 4 (after switching, like NixOS)
#   hang      store paths whose activation waits while the file lists them
#   activate-hook   an executable run first with (system, action)
PATH=/usr/bin:/bin:$PATH
self=@out@
action="$1"
ctl=/var/lib/standin
mkdir -p "$ctl"
# The agent marks its own activation twice: an environment variable, and its
# PID in /run/nixos-autodeploy/activating (the one module.nix's manual-switch
# trigger reads).  marker=1 only when both are there and the PID is alive.
marker="${NIXOS_AUTODEPLOY_ACTIVATION:-}"
pid=$(cat /run/nixos-autodeploy/activating 2>/dev/null || true)
if [ -n "$marker" ] && ! { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }; then marker="env-only"; fi
echo "$self $action marker=$marker" >> "$ctl/activations.log"
case "$action" in
  switch|boot|test|dry-activate) ;;
  *) echo "switch-to-configuration: unknown action $action" >&2; exit 1 ;;
esac
if [ -x "$ctl/activate-hook" ]; then "$ctl/activate-hook" "$self" "$action"; fi
while [ -f "$ctl/hang" ] && grep -qxF "$self" "$ctl/hang"; do sleep 0.05; done
echo "activating the configuration... ($action $self)"
case "$action" in
  switch|test) ln -sfn "$self" /run/current-system ;;
esac
# The boot loader installer copies kernel and initrd into a separate /boot
# before it changes the default, named as systemd-boot-builder.py's
# copy_from_file() or install-grub.pl's copyToKernelsDir() name them; when
# /boot is full the activation fails half-way (nixpkgs #23926). Only for a
# host whose test gave it a /boot (Host.mount_boot), never the machine's.
case "$action" in
  switch|boot)
    if [ -e "$ctl/boot-copies" ]; then
      # $BOOT: /boot, or the ESP at /boot/efi or /efi (Host.mount_boot(at=)).
      boot=$(cat "$ctl/boot-dir" 2>/dev/null || echo /boot)
      for f in kernel initrd; do
        src=$(readlink -f "$self/$f")
        rel=${src#/nix/store/}
        if [ -d "$boot/EFI/nixos" ]; then
          dir=${rel%%/*}
          if [ "$dir" = "$rel" ]; then dest="$boot/EFI/nixos/$rel.efi"; else dest="$boot/EFI/nixos/$dir-${src##*/}.efi"; fi
        elif [ -d "$boot/kernels" ]; then
          dest="$boot/kernels/$(printf %s "$rel" | tr / -)"
        else
          continue
        fi
        if [ ! -e "$dest" ]; then
          if ! { cp "$src" "$dest.tmp" && mv "$dest.tmp" "$dest"; }; then
            rm -f "$dest.tmp"
            echo "error: cannot copy $src to $dest" >&2
            exit 1
          fi
        fi
      done
    fi
    echo "$self" > "$ctl/boot-default"
    ;;
esac
if [ -f "$ctl/fail" ] && grep -qxF "$self" "$ctl/fail"; then
  echo "warning: the following units failed: standin-broken.service" >&2
  exit 4
fi
exit 0
