# A stand-in for the few parts of nixpkgs' package set that module.nix and
# the option declarations of this harness touch. Packages are fake
# derivations (attribute sets with `type = "derivation"`, an `outPath` and
# `out` pointing back at themselves, which is what lib.getBin/getOutput and
# types.package look at); nothing is built, nothing is written to the store.
# A store path's hash part is derived from the name (and the text, for
# writeText), so a test can tell which content a file has.
{ lib }:

let
  hashOf = s: builtins.substring 0 32 (builtins.hashString "sha256" s);
  fakeDrv =
    name: extra:
    let
      self = {
        type = "derivation";
        inherit name;
        outPath = "/nix/store/${hashOf (name + (extra.text or ""))}-${name}";
        outputName = "out";
        outputs = [ "out" ];
        out = self;
        meta = extra.meta or { };
        passthru = { };
      }
      // builtins.removeAttrs extra [ "meta" ];
    in
    self;
in
{
  inherit fakeDrv hashOf;

  # module.nix's default package: `pkgs.callPackage ./package.nix { ... }`.
  callPackage =
    fn: _args:
    fakeDrv "nixos-autodeploy-0.1.0" { meta.mainProgram = "nixos-autodeploy"; };

  writeText = name: text: fakeDrv name { inherit text; };

  runtimeShell = "/nix/store/${hashOf "bash"}-bash-5.2/bin/bash";

  coreutils = fakeDrv "coreutils-9.5" { };
  findutils = fakeDrv "findutils-4.10.0" { };
  gnugrep = fakeDrv "gnugrep-3.11" { };
  gnused = fakeDrv "gnused-4.9" { };
  systemd = fakeDrv "systemd-256" { };
  curl = fakeDrv "curl-8.9.1" { };
  jq = fakeDrv "jq-1.7.1" { };
  nix = fakeDrv "nix-2.24" { };
  prometheus-node-exporter = fakeDrv "node_exporter-1.9.1" { version = "1.9.1"; };
}
