# nixos/modules/misc/assertions.nix: a module declaring `assertions` (a list of
# { assertion; message; }) and `warnings` (a list of strings). nixpkgs
# imports it both at the top level and inside the
# services.prometheus.exporters submodule; so does this harness.
{ lib, ... }:

{
  options = {
    assertions = lib.mkOption {
      type = lib.types.listOf lib.types.unspecified;
      internal = true;
      default = [ ];
      description = "Conditions that must hold; a failing one stops the build with its message.";
    };
    warnings = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      internal = true;
      default = [ ];
      description = "Messages printed during the build.";
    };
  };
}
