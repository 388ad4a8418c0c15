# Stand-in NixOS toplevels, built with plain `derivation` (no nixpkgs).
# Each has what the agent inspects: bin/switch-to-configuration, nixos-version,
# system, kernel, initrd, kernel-modules, kernel-params, init.
{ name, kernelVersion ? "6.1", platform ? "x86_64-linux", isSystem ? true, deps ? 0 }:
let
  kernel = derivation {
    name = "standin-kernel-${kernelVersion}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ ./kernel-builder.sh ];
    PATH = "/usr/bin:/bin";
    inherit kernelVersion;
  };
  # Cheap extra closure members (for the benchmark's 1,000-path deploy):
  # builtins.toFile makes store paths at evaluation time, no build needed.
  extra = builtins.genList (i: builtins.toFile "standin-dep-${name}-${toString i}" "dependency ${toString i} of ${name}\n") deps;
in
derivation {
  name = "nixos-system-${name}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ ./system-builder.sh ];
  PATH = "/usr/bin:/bin";
  inherit kernel platform;
  isSystem = if isSystem then "1" else "";
  stc = ./switch-to-configuration.sh;
  extraDeps = builtins.concatStringsSep "\n" extra;
  label = name;
}
