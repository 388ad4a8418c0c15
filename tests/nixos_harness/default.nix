# The NixOS option declarations module.nix needs, with nixpkgs' structure
# (see each file's header for the nixpkgs file it follows), and the
# `pkgs`/`utils` module arguments NixOS passes (`_module.args`, like
# nixos/modules/misc/extra-arguments.nix and the nixpkgs module do).
{ lib }:

let
  pkgs = import ./pkgs.nix { inherit lib; };
  utils = import ./utils.nix { inherit lib; };
in
{
  inherit pkgs utils;
  modules = [
    ./misc.nix
    ./systemd.nix
    ./activation.nix
    ./exporters.nix
    { _module.args = { inherit pkgs utils; }; }
  ];
}
