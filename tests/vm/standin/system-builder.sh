set -e
mkdir -p "$out/bin"
echo "$label" > "$out/label"
echo "26.05.vmtest-$label" > "$out/nixos-version"
echo "x86_64-linux" > "$out/system"
ln -s "$kernelFile" "$out/kernel"
ln -s "$initrdFile" "$out/initrd"
echo "root=/dev/vda2 ro console=ttyS0 loglevel=4 panic=1" > "$out/kernel-params"
sed -e "s|@out@|$out|g" -e "s|@broken@|$broken|g" "$initScript" > "$out/init"
chmod +x "$out/init"
sed "s|@out@|$out|g" "$stc" > "$out/bin/switch-to-configuration"
chmod +x "$out/bin/switch-to-configuration"
if [ -n "$unhealthy" ]; then echo "this system fails its health check" > "$out/unhealthy"; fi
