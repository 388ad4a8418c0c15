# Evaluates module.nix under the harness for a set of configurations at once
# (one nix-instantiate for the whole matrix) and returns, per configuration,
# what the tests assert on: the rendered unit files, failed assertions,
# warnings, tmpfiles rules, activation scripts, the exporter's options.
#
#   nix-instantiate --eval --strict --json --readonly-mode tests/nixos_harness/eval.nix \
#     --arg libPath ../shared/nixpkgs-lib/lib --arg cases '{ minimal = { ... }; }'
{
  libPath,
  modulePath ? ../../module.nix,
  cases,
  # Only these attributes of each result (null: all).
  select ? null,
  # The nixpkgs channel whose option set is declared (see default.nix).
  channel ? "26.11",
}:

let
  lib = import libPath;
  harness = import ./default.nix { inherit lib channel; };

  evalCase =
    module:
    let
      c =
        (lib.evalModules {
          modules = harness.modules ++ [
            modulePath
            module
          ];
        }).config;
      ours = lib.filterAttrs (n: _: lib.hasPrefix "nixos-autodeploy" n || lib.hasPrefix "prometheus-" n) c.systemd.units;
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
      result = {
        inherit failedAssertions;
        inherit (c) warnings;
        units = lib.mapAttrs (_: u: u.text) ours;
        unitsWantedBy = lib.mapAttrs (_: u: u.wantedBy) ours;
        unitsRequiredBy = lib.mapAttrs (_: u: u.requiredBy) ours;
        tmpfiles = c.systemd.tmpfiles.rules;
        activation = {
          script = c.system.activationScripts.script;
          dry = c.system.dryActivationScript;
          snippet = c.system.activationScripts.nixos-autodeploy or null;
        };
        # The manual-activation trigger's shell script (`script`, run by bash).
        triggerScript = c.systemd.services.nixos-autodeploy-trigger.script or null;
        node = {
          inherit (c.services.prometheus.exporters.node) enable enabledCollectors extraFlags;
        };
        autoDeploy = {
          inherit (c.system.autoDeploy)
            enable
            prometheusFilePath
            textfileDirectory
            wireNodeExporter
            interval
            ;
        };
        # Every option of the module, forced: a bad value is a type error
        # even where no unit reads it.
        settings = c.system.autoDeploy;
        systemPackages = map (p: p.outPath or p) c.environment.systemPackages;
      };
      # Like system.build.toplevel: failed assertions stop the evaluation
      # before any unit is built.
      checked = if failedAssertions == [ ] then result else { inherit failedAssertions; };
    in
    if select == null || failedAssertions != [ ] then checked else lib.getAttrs select result;
in
lib.mapAttrs (_: evalCase) cases
