set -e
mkdir -p "$out"
echo "$label" > "$out/label"
if [ -z "$isSystem" ]; then
  echo "not a system" > "$out/README"
  exit 0
fi
mkdir -p "$out/bin"
echo "26.05.standin-$label" > "$out/nixos-version"
echo "$platform" > "$out/system"
ln -s "$kernel/bzImage" "$out/kernel"
ln -s "$kernel/initrd" "$out/initrd"
ln -s "$kernel/lib/modules" "$out/kernel-modules"
echo "console=ttyS0 loglevel=4" > "$out/kernel-params"
printf '#!/bin/sh\nexec /bin/true\n' > "$out/init"
chmod +x "$out/init"
sed "s|@out@|$out|g" "$stc" > "$out/bin/switch-to-configuration"
chmod +x "$out/bin/switch-to-configuration"
if [ -n "$extraDeps" ]; then echo "$extraDeps" > "$out/extra-deps"; fi
