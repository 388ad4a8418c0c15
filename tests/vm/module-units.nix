# The units module.nix renders for the VM tier, evaluated with the NixOS
# option harness of tests/test_module.py (tests/nixos_harness/), plus the
# text of their `script`s (NixOS writes each to a unit-script-NAME store path
# that ExecStart runs).
#
#   nix-instantiate --eval --strict --json --readonly-mode tests/vm/module-units.nix \
#     --arg libPath ../shared/nixpkgs-lib/lib --arg modulePath ./module.nix --arg config ./host.nix
{ libPath, modulePath, config }:
let
  lib = import libPath;
  harness = import ../nixos_harness/default.nix { inherit lib; };
  c = (lib.evalModules { modules = harness.modules ++ [ modulePath config ]; }).config;
  ours = lib.filterAttrs (n: _: lib.hasPrefix "nixos-autodeploy" n) c.systemd.units;
  services = lib.filterAttrs (n: _: lib.hasPrefix "nixos-autodeploy" n) c.systemd.services;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  inherit (c) warnings;
  units = lib.mapAttrs (_: u: u.text) ours;
  unitsWantedBy = lib.mapAttrs (_: u: u.wantedBy) ours;
  unitsRequiredBy = lib.mapAttrs (_: u: u.requiredBy) ours;
  scripts = lib.mapAttrs' (n: s: lib.nameValuePair "${n}-start" (s.script or "")) services;
  tmpfiles = c.systemd.tmpfiles.rules;
}
