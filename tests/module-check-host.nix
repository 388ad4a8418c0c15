# The host configuration of the flake's `module-nixos` check (a real NixOS
# evaluation) and of the "flake check host" case of tests/test_module.py (the
# option harness): the same file, so both assert the same units.
{ pkgs, ... }:

{
  services.prometheus.exporters.node.enable = true;
  system.autoDeploy = {
    enable = true;
    url = "https://cache.example.org/pointers/web-1";
    interval = "*:0/5";
    switchMode = "smart";
    rebootMode = "kexec";
    rebootWindow = "02:00-05:00";
    healthChecks = [
      "systemctl is-active multi-user.target"
      "curl -fsS http://localhost:9100/metrics"
    ];
    path = [ pkgs.curl ];
    connectivityCheck = false;
    trustedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJd4bmNxDPMJgwPUd0KgYHeFvVXbBHiTNm0GlzGlxyTL ci" ];
    tokenFile = "/run/keys/nixos-autodeploy-token";
    hostname = "web-1";
    onSuccess = "true";
    onFailure = "true";
  };
}
