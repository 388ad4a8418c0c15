# system.activationScripts and system.dryActivationScript with the structure
# of nixpkgs' nixos/modules/system/activation/activation-script.nix: each
# snippet is a string or a submodule { deps, text, supportsDryActivation };
# the option's `apply` adds `script`, the whole activation script (snippets
# ordered by deps with lib.textClosureMap, each under a headline, run by bash
# with an ERR trap); the dry-activation script replaces every snippet that
# does not support dry activation by a comment.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types;

  scriptType =
    withDry:
    types.either types.str (
      types.submodule {
        options = {
          deps = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = "Snippets this one runs after.";
          };
          text = mkOption {
            type = types.lines;
            description = "The snippet.";
          };
        }
        // lib.optionalAttrs withDry {
          supportsDryActivation = mkOption {
            type = types.bool;
            default = false;
            description = "Whether the snippet also runs on dry-activate (NIXOS_ACTION=dry-activate).";
          };
        };
      }
    );

  withHeadline = lib.mapAttrs (
    a: v:
    v
    // {
      text = ''
        #### Activation script snippet ${a}:
        _localstatus=0
        ${v.text}

        if (( _localstatus > 0 )); then
          printf "Activation script snippet '%s' failed (%s)\n" "${a}" "$_localstatus"
        fi
      '';
    }
  );

  systemActivationScript =
    set: onlyDry:
    let
      set' = lib.mapAttrs (
        _: v: if lib.isString v then (lib.noDepEntry v) // { supportsDryActivation = false; } else v
      ) set;
      headed = withHeadline set';
      dry = lib.mapAttrs (
        a: v:
        if onlyDry && !v.supportsDryActivation then
          v // { text = "#### Activation script snippet ${a} does not support dry activation."; }
        else
          v
      ) headed;
    in
    ''
      #!${pkgs.runtimeShell}

      systemConfig='@out@'

      export PATH=/empty
      for i in ${toString (map lib.getBin [ pkgs.coreutils pkgs.gnugrep pkgs.findutils ])}; do
          PATH=$PATH:$i/bin:$i/sbin
      done

      _status=0
      trap "_status=1 _localstatus=\$?" ERR

      # Ensure a consistent umask.
      umask 0022

      ${lib.textClosureMap lib.id dry (lib.attrNames dry)}

    ''
    + lib.optionalString (!onlyDry) ''
      # Make this configuration the current configuration.
      ln -sfn "$(readlink -f "$systemConfig")" /run/current-system

      exit $_status
    '';
in
{
  options.system = {
    activationScripts = mkOption {
      type = types.attrsOf (scriptType true);
      default = { };
      description = "Shell snippets run at every activation.";
      apply = set: set // { script = systemActivationScript set false; };
    };
    dryActivationScript = mkOption {
      readOnly = true;
      internal = true;
      description = "The script run by switch-to-configuration dry-activate.";
      default = systemActivationScript (removeAttrs config.system.activationScripts [ "script" ]) true;
    };
  };
}
