# What the VM test's nodes set of nixos/modules/virtualisation/qemu-vm.nix
# (and ./disk-size-option.nix), with its types and defaults, and the
# `fileSystems` entries the test touches (nixos/modules/tasks/filesystems.nix:
# attrsOf submodule, `autoResize`). As in qemu-vm.nix,
# `virtualisation.fileSystems` has the type of `fileSystems`, holds the VM's
# root file system, and becomes `fileSystems` with mkVMOverride: a plain
# `fileSystems."/"` definition of a node is overridden. Nothing is built: the
# options are checked and merged like nixpkgs checks and merges them.
{ config, lib, options, ... }:

let
  inherit (lib) mkOption types;
  bool =
    default: description:
    mkOption {
      type = types.bool;
      inherit default description;
    };
in
{
  options = {
    virtualisation = {
      memorySize = mkOption {
        type = types.ints.positive;
        default = 1024;
        description = "Memory of the VM in MiB.";
      };
      diskSize = mkOption {
        type = types.either (types.enum [ "auto" ]) types.ints.positive;
        default = 1024;
        description = "Disk size in MiB (with useBootLoader: the qcow2 only; the root file system in it is sized to the closure).";
      };
      useBootLoader = bool false "Boot through a boot loader from a full disk image.";
      useEFIBoot = bool false "Boot with OVMF (UEFI).";
      writableStoreUseTmpfs = bool true "Use a tmpfs for the writable store.";
      additionalPaths = mkOption {
        type = types.listOf types.path;
        default = [ ];
        description = "Paths whose closure is made available to the VM.";
      };
      fileSystems = options.fileSystems;
      cores = mkOption {
        type = types.ints.positive;
        default = 1;
        description = "Cores of the VM.";
      };
    };
    fileSystems = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            device = mkOption {
              type = types.nullOr types.str;
              default = null;
              description = "Device of the file system.";
            };
            fsType = mkOption {
              type = types.str;
              default = "auto";
              description = "Type of the file system.";
            };
            autoResize = bool false "Grow the file system to its partition at boot (resize2fs).";
            options = mkOption {
              type = types.listOf types.str;
              default = [ "defaults" ];
              description = "Mount options.";
            };
          };
        }
      );
      default = { };
      description = "The file systems to mount.";
    };
  };

  config = {
    virtualisation.fileSystems."/" = {
      device = "/dev/disk/by-label/nixos";
      fsType = "ext4";
    };
    fileSystems = lib.mkVMOverride config.virtualisation.fileSystems;
  };
}
