mkdir -p "$out/lib/modules/$kernelVersion"
echo "stand-in kernel $kernelVersion" > "$out/bzImage"
echo "stand-in initrd $kernelVersion" > "$out/initrd"
