# What the VM test's `machine` and `counted` nodes set for the agent, and the
# variants of `machine` the test deploys. Shared by tests/vm-test.nix (which adds the VM-only
# parts: boot loader, disk, the /etc marker file) and tests/test_module.py,
# which evaluates `base` and every variant under the option harness and
# asserts their units, so that what the VM runs is checked in CI too.
{
  pointerUrl ? "http://cache/pointer",
  privateUrl ? "http://cache/private/pointer",
  signedUrl ? "http://cache/signed/pointer",
}:

rec {
  # Test-only key pair for signed pointers (tests/vm-test.nix installs the
  # private half on the cache node); it protects nothing.
  signingPublicKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGUK6xa+xI3VmFn94z1vxXYH+8CdSolz8++SnjoN61AY autodeploy-vm-test";
  tokenFile = "/run/keys/autodeploy-token";

  base =
    { lib, pkgs, ... }:
    {
      system.autoDeploy = {
        enable = true;
        # Variants set their own.
        url = lib.mkDefault pointerUrl;
        # `curl` is not on a service's default PATH: `path` provides it.
        healthChecks = [
          "test -e /etc/autodeploy-test"
          "curl -fsS -o /dev/null http://cache/"
        ];
        path = [ pkgs.curl ];
      };
      # Wires the textfile collector (system.autoDeploy.wireNodeExporter
      # follows this) and sets the default prometheusFilePath.
      services.prometheus.exporters.node.enable = true;

      # The test starts every run itself (and the timer once, at the end).
      systemd.timers.nixos-autodeploy.wantedBy = lib.mkForce [ ];
      systemd.services.nixos-autodeploy.unitConfig.StartLimitIntervalSec = 0;
    };

  # The `counted` node (boot counting, issue #13): the agent's part. Its
  # "broken" variant fails the health check, at boot and after a switch.
  # switchMode/rebootMode are the module's own: a deploy stages and reboots.
  counted =
    { lib, ... }:
    {
      system.autoDeploy = {
        enable = true;
        url = "http://cache/pointer-counted";
        switchMode = "boot";
        rebootMode = "reboot";
        healthChecks = [ "! grep -qx broken /etc/autodeploy-test" ];
        bootAssessment = {
          enable = true;
          # Long enough for the cache node to come up during the first boot.
          wait = 120;
        };
      };
      services.prometheus.exporters.node.enable = true;
      systemd.timers.nixos-autodeploy.wantedBy = lib.mkForce [ ];
      systemd.services.nixos-autodeploy.unitConfig.StartLimitIntervalSec = 0;
    };

  # name -> { marker (the content of /etc/autodeploy-test); autoDeploy
  # (settings of system.autoDeploy on top of `base`) }. Each variant is a
  # whole system the agent deploys; its unit is the one that runs next.
  variants = {
    next = {
      marker = "next";
      autoDeploy = { };
    };
    # Pointer behind a bearer token, handed over with LoadCredential=.
    token = {
      marker = "token";
      autoDeploy = {
        url = privateUrl;
        inherit tokenFile;
      };
    };
    # Signed pointers only.
    signed = {
      marker = "signed";
      autoDeploy = {
        url = signedUrl;
        trustedKeys = [ signingPublicKey ];
      };
    };
    # The module's own switchMode/rebootMode: stage, then reboot.
    boot-a = {
      marker = "boot-a";
      autoDeploy = {
        switchMode = "boot";
        rebootMode = "reboot";
      };
    };
    boot-b = {
      marker = "boot-b";
      autoDeploy = {
        switchMode = "boot";
        rebootMode = "reboot";
      };
    };
  };
}
