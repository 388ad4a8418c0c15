#!/bin/sh
# Stand-in for NixOS' switch-to-configuration with systemd-boot and boot
# counting (nixpkgs' systemd-boot-builder.py): `switch` and `boot` copy kernel
# and initrd to /boot/EFI/nixos/<store dir>.efi, write the entry
# /boot/loader/entries/nixos-<hash>+<tries>.conf (an entry that exists keeps
# its name and counter: blessed stays blessed) and `default nixos-*` in
# loader.conf; the newest install sorts first (sort-key nixos, version N).
# Control files in /var/lib/standin (the test's panel):
#   fail        store paths whose activation exits 4 (after switching, like NixOS)
#   hang        store paths whose activation waits while the file lists them
#   boot-tries  tries of a new entry (default 3)
set -eu
PATH=/usr/bin:/bin:/usr/sbin:/sbin
self=@out@
action="${1:-}"
ctl=/var/lib/standin
mkdir -p "$ctl"
echo "$self $action marker=${NIXOS_AUTODEPLOY_ACTIVATION:-}" >> "$ctl/activations.log"
case "$action" in
  switch|boot|test|dry-activate) ;;
  *) echo "switch-to-configuration: unknown action $action" >&2; exit 1 ;;
esac
while [ -f "$ctl/hang" ] && grep -qxF "$self" "$ctl/hang"; do sleep 0.2; done
echo "activating the configuration... ($action $self)"
case "$action" in
  switch|test) ln -sfn "$self" /run/current-system ;;
esac

install_boot_entry() {
  esp=/boot
  mkdir -p "$esp/EFI/nixos" "$esp/loader/entries"
  paths=""
  for f in kernel initrd; do
    src=$(readlink -f "$self/$f")
    rel=${src#/nix/store/}
    dir=${rel%%/*}
    if [ "$dir" = "$rel" ]; then dest="EFI/nixos/$rel.efi"; else dest="EFI/nixos/$dir-${src##*/}.efi"; fi
    if [ ! -e "$esp/$dest" ]; then cp "$src" "$esp/$dest.tmp" && mv "$esp/$dest.tmp" "$esp/$dest"; fi
    paths="$paths $dest"
  done
  set -- $paths
  hash=$(basename "$self" | cut -c1-32)
  id="nixos-$hash"
  n=$(( $(cat "$esp/loader/vmtest-version" 2>/dev/null || echo 0) + 1 ))
  echo "$n" > "$esp/loader/vmtest-version"
  existing=$(cd "$esp/loader/entries" && ls | grep -E "^$id(\+[0-9]+(-[0-9]+)?)?\.conf\$" | head -n 1 || true)
  tries=$(cat "$ctl/boot-tries" 2>/dev/null || echo 3)
  if [ -n "$existing" ]; then name=$existing; elif [ "$tries" -gt 0 ]; then name="$id+$tries.conf"; else name="$id.conf"; fi
  cat > "$esp/loader/entries/$name.tmp" <<ENTRY
title NixOS ($(cat "$self/label"))
sort-key nixos
version $n
linux /$1
initrd /$2
options init=$self/init $(cat "$self/kernel-params")
machine-id $(cat /etc/machine-id)
ENTRY
  mv "$esp/loader/entries/$name.tmp" "$esp/loader/entries/$name"
  printf 'timeout 0\ndefault nixos-*\n' > "$esp/loader/loader.conf.tmp"
  mv "$esp/loader/loader.conf.tmp" "$esp/loader/loader.conf"
  sync
  echo "installed boot entry $name (version $n)"
}

case "$action" in
  switch|boot) install_boot_entry ;;
esac
if [ -f "$ctl/fail" ] && grep -qxF "$self" "$ctl/fail"; then
  echo "warning: the following units failed: standin-broken.service" >&2
  exit 4
fi
exit 0
