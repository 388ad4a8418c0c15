# The NixOS option declarations module.nix and the VM test's nodes need,
# with nixpkgs' structure (see each file's header for the nixpkgs file it
# follows), and the `pkgs`/`utils` module arguments NixOS passes
# (`_module.args`, like nixos/modules/misc/extra-arguments.nix and the
# nixpkgs module do). `channel`: "26.11" (nixos-unstable) or "26.05" (the
# latest stable); they differ in boot.loader.systemd-boot.bootCounting.
{
  lib,
  channel ? "26.11",
}:

let
  pkgs = import ./pkgs.nix { inherit lib; };
  utils = import ./utils.nix { inherit lib; };
in
{
  inherit pkgs utils channel;
  modules = [
    ./misc.nix
    ./systemd.nix
    ./activation.nix
    ./exporters.nix
    ./system.nix
    ./virtualisation.nix
    (import ./boot.nix { inherit channel; })
    { _module.args = { inherit pkgs utils; }; }
  ];
}
