# assertions/warnings (nixos/modules/misc/assertions.nix), and the few other
# top-level options module.nix or its examples touch, with nixpkgs' types:
# environment.systemPackages, nix.package, nix.settings, networking.proxy.envVars.
{ lib, pkgs, ... }:

let
  inherit (lib) mkOption types;
in
{
  imports = [ ./assertions.nix ];

  options = {
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
      description = "Packages in the system profile.";
    };
    nix.package = mkOption {
      type = types.package;
      default = pkgs.nix;
      description = "The Nix package.";
    };
    nix.settings = mkOption {
      type = types.submodule { freeformType = types.attrsOf types.anything; };
      default = { };
      description = "nix.conf settings.";
    };
    networking.proxy.envVars = mkOption {
      type = types.attrsOf types.str;
      default = { };
      internal = true;
      description = "Proxy variables derived from networking.proxy.*.";
    };
  };
}
