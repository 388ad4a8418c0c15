# A bootable stand-in NixOS toplevel for the VM tier, built with plain
# `derivation` (no nixpkgs): the guest's own kernel and initrd, an `init` that
# does what NixOS' stage 2 does for the agent (points /run/booted-system and
# /run/current-system at itself) and execs systemd, and a
# switch-to-configuration that installs systemd-boot entries as nixpkgs'
# systemd-boot builder does with boot counting.
#   broken:    the init exits at once (kernel panic: a boot that never comes up)
#   unhealthy: has a file `unhealthy` (the scenarios' health check fails on it)
{ name, kernel, initrd, broken ? false, unhealthy ? false }:
derivation {
  name = "nixos-system-${name}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ ./system-builder.sh ];
  PATH = "/usr/bin:/bin";
  label = name;
  kernelFile = builtins.path { path = /. + kernel; name = "vmtest-bzImage"; };
  initrdFile = builtins.path { path = /. + initrd; name = "vmtest-initrd"; };
  broken = if broken then "1" else "";
  unhealthy = if unhealthy then "1" else "";
  stc = ./switch-to-configuration.sh;
  initScript = ./init.sh;
}
