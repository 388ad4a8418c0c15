# boot.loader.* and boot.isContainer as the module and the VM test's nodes use
# them, with nixpkgs' structure, for one channel:
#   nixos/modules/system/boot/loader/loader.nix     boot.loader.timeout
#   nixos/modules/system/boot/loader/efi.nix        boot.loader.efi.{canTouchEfiVariables,efiSysMountPoint}
#   nixos/modules/system/boot/loader/systemd-boot/systemd-boot.nix
#       boot.loader.systemd-boot.{enable,xbootldrMountPoint,configurationLimit,editor,consoleMode}
#       and, from 26.11 on only (release notes rl-2611, "Automatic Boot
#       Assessment"), boot.loader.systemd-boot.bootCounting.{enable,tries}
#   nixos/modules/system/boot/loader/grub/grub.nix  boot.loader.grub.{enable,efiSupport,device}
#   nixos/modules/system/boot/grow-partition.nix    boot.growPartition
# `channel` is "26.05" (the latest stable) or "26.11" (unstable): on 26.05
# setting bootCounting is "The option ... does not exist", as with nixpkgs.
{ channel }:
{ lib, ... }:

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
  options.boot = {
    isContainer = bool false "Whether this is a container (no boot loader).";
    growPartition = bool false "Grow the root partition to the disk at boot (initrd).";
    loader = {
      timeout = mkOption {
        type = types.nullOr types.int;
        default = 5;
        description = "Seconds until the boot loader boots the default entry.";
      };
      efi = {
        canTouchEfiVariables = bool false "Whether the installer may write EFI variables.";
        efiSysMountPoint = mkOption {
          type = types.str;
          default = "/boot";
          description = "Where the EFI System Partition is mounted.";
        };
      };
      grub = {
        enable = mkOption {
          type = types.bool;
          default = true;
          description = "Whether to enable GRUB.";
        };
        efiSupport = bool false "Whether GRUB is built for EFI.";
        device = mkOption {
          type = types.str;
          default = "";
          description = "The device GRUB is installed on (BIOS).";
        };
      };
      systemd-boot = {
        enable = bool false "Whether to enable the systemd-boot EFI boot manager.";
        xbootldrMountPoint = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Where the XBOOTLDR partition is mounted ($BOOT instead of the ESP).";
        };
        configurationLimit = mkOption {
          type = types.nullOr types.int;
          default = null;
          description = "Maximum number of generations in the boot menu.";
        };
        editor = bool true "Whether the kernel command line may be edited at boot.";
        consoleMode = mkOption {
          type = types.enum [ "0" "1" "2" "5" "auto" "max" "keep" ];
          default = "keep";
          description = "The resolution of the console.";
        };
      }
      // lib.optionalAttrs (channel != "26.05") {
        bootCounting = {
          enable = lib.mkEnableOption "automatic boot assessment (boot counting) for NixOS entries";
          tries = mkOption {
            type = types.ints.positive;
            default = 3;
            description = "Tries of a new entry before it is marked bad.";
          };
        };
      };
    };
  };
}
