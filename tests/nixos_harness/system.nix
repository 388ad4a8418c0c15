# environment.etc (nixos/modules/system/etc/etc.nix: attrsOf submodule with
# `text`), documentation.enable, and system.build (nixos/modules/system/
# activation/top-level.nix: a submodule with a freeform lazyAttrsOf) whose
# `toplevel` this harness fakes: a store path whose hash follows the
# configuration's /etc texts and unit files, so two configurations that differ
# get different systems (as the VM test's variants must).
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types;
in
{
  options = {
    environment.etc = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            enable = mkOption {
              type = types.bool;
              default = true;
              description = "Whether the file is created.";
            };
            text = mkOption {
              type = types.nullOr types.lines;
              default = null;
              description = "Text of the file.";
            };
            mode = mkOption {
              type = types.str;
              default = "symlink";
              description = "Mode of the file (symlink: a link into the store).";
            };
          };
        }
      );
      default = { };
      description = "Files in /etc.";
    };
    documentation.enable = mkOption {
      type = types.bool;
      default = true;
      description = "Whether to install documentation.";
    };
    system.build = mkOption {
      type = types.submoduleWith {
        modules = [ { freeformType = types.lazyAttrsOf (types.uniq types.unspecified); } ];
      };
      default = { };
      description = "Derivations of the system (toplevel, ...).";
    };
  };

  config.system.build.toplevel = pkgs.fakeDrv "nixos-system-machine" {
    text = builtins.toJSON {
      etc = lib.mapAttrs (_: e: e.text) config.environment.etc;
      units = lib.mapAttrs (_: u: u.text) config.systemd.units;
    };
  };
}
