# nixos/lib/utils.nix: escapeSystemdExecArg(s), written after nixpkgs'
# definition (JSON-quote every argument, then double `%` and `$` so systemd
# expands neither specifiers nor variables; only strings, paths, numbers and
# derivations are accepted).
{ lib }:

rec {
  escapeSystemdExecArg =
    arg:
    let
      s =
        if builtins.isPath arg then
          "${arg}"
        else if builtins.isString arg then
          arg
        else if builtins.isInt arg || builtins.isFloat arg || lib.isDerivation arg then
          toString arg
        else
          throw "escapeSystemdExecArg only allows strings, paths, numbers and derivations";
    in
    lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);

  escapeSystemdExecArgs = lib.concatMapStringsSep " " escapeSystemdExecArg;
}
