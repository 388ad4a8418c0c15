# End-to-end NixOS VM test of the module and the agent (needs KVM):
#
#   nix build .#checks.x86_64-linux.vm-test -L
#
# Two nodes: `cache` serves a binary cache (written with `nix copy --to
# file://`) and the pointers over HTTP (a public one, one behind a bearer
# token, one for signed pointers); `machine` runs the agent. The systems the
# machine is deployed to are variants of its own configuration
# (tests/vm-test-machine.nix, built with extendModules like specialisations,
# but *not* part of its closure, so the agent really has to fetch them from
# the cache); each variant's unit is the one that runs after it is deployed.
#
# Covered: the original tool's matrix (missing state / tracking / dirty, each
# with the same or a different upstream), a manual activation triggering a run
# while the agent's own activations do not, a token handed over with
# LoadCredential=, signed pointers with trustedKeys, the module's own
# switchMode = "boot" / rebootMode = "reboot" staging a system and rebooting
# into it, the metrics as scraped from node-exporter, and the timer.
# A third node, `counted`, boots with systemd-boot and boot counting
# (boot.loader.systemd-boot.bootCounting) and system.autoDeploy.bootAssessment:
# a staged system whose boot check fails is not blessed, systemd-boot falls
# back to the previous generation, and the agent reports boot_failed once.
# Boot counting for systemd-boot exists from NixOS 26.11 on (nixpkgs release
# notes rl-2611); on 26.05 the test has no `counted` node and covers the rest.
#
# Scope: x86_64-linux (flake.nix). `machine` boots with BIOS GRUB, which
# aarch64 does not have. Three VMs and four reboots: the global timeout is
# two hours, not the framework's default of one.
#
# tests/test_module.py evaluates the `machine` and `counted` nodes (module,
# variants, boot loader and qemu-vm options) under its option harness for
# both channels, renders testScript with them and runs it against a stand-in
# of the test driver with the real driver's method signatures. The `cache`
# node (nginx) is not evaluated there.
{
  pkgs,
  nixosModule,
  # Whether this nixpkgs has boot.loader.systemd-boot.bootCounting (26.11).
  hasBootCounting ? pkgs.lib.hasAttrByPath [ "boot" "loader" "systemd-boot" "bootCounting" ] (pkgs.nixos { }).options,
}:

let
  inherit (pkgs) lib;
  agent = import ./vm-test-machine.nix { };
  textfileDir = "/var/lib/prometheus-node-exporter-text";
  # With useBootLoader, qemu-vm.nix boots a disk image made by
  # make-disk-image.nix with `diskSize = "auto"` and no additional space: the
  # root file system is sized to the closure whatever
  # virtualisation.diskSize says (that only sizes the qcow2 around it;
  # nixpkgs issue 408452). Systems the agent downloads and the kernels the
  # boot loader copies would fill it: grow the partition and the file system
  # to the disk at boot. qemu-vm.nix sets fileSystems from
  # virtualisation.fileSystems with mkVMOverride, so that is where
  # autoResize goes.
  growRoot = {
    boot.growPartition = true;
    virtualisation.fileSystems."/".autoResize = true;
  };
  promFile = "${textfileDir}/nixos-autodeploy.prom";
  # Test-only secrets: they protect nothing.
  token = "vm-test-token-5b3d9e";
  signingKey = ''
    -----BEGIN OPENSSH PRIVATE KEY-----
    b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
    QyNTUxOQAAACBlCusWvsSN1ZhZ/eM9b8V2B/vAnUqJc/Pvkp46DetQGAAAAJiYELD0mBCw
    9AAAAAtzc2gtZWQyNTUxOQAAACBlCusWvsSN1ZhZ/eM9b8V2B/vAnUqJc/Pvkp46DetQGA
    AAAEDhb1/j61Ue0Wl1yJQ7TrvyMucpCkXGK6gLvGBejrz3hmUK6xa+xI3VmFn94z1vxXYH
    +8CdSolz8++SnjoN61AYAAAAEmF1dG9kZXBsb3ktdm0tdGVzdAECAw==
    -----END OPENSSH PRIVATE KEY-----
  '';
in
{
  name = "nixos-autodeploy";

  nodes = {
    cache =
      { nodes, ... }:
      {
        services.nginx = {
          enable = true;
          virtualHosts.cache = {
            default = true;
            root = "/srv/cache";
            # /srv/private/pointer, only with the token.
            locations."/private/" = {
              root = "/srv";
              extraConfig = ''
                if ($http_authorization != "Bearer ${token}") {
                  return 401;
                }
              '';
            };
            # /srv/signed/pointer and pointer.sig.
            locations."/signed/".root = "/srv";
          };
        };
        networking.firewall.allowedTCPPorts = [ 80 ];
        systemd.tmpfiles.rules = [
          "d /srv/cache 0755 root root - -"
          "d /srv/private 0755 root root - -"
          "d /srv/signed 0755 root root - -"
          # `counted` runs its boot check (connectivity included) on its very
          # first boot: its pointer must exist from the start.
        ]
        ++ lib.optional hasBootCounting "f /srv/cache/pointer-counted 0644 root root - ${nodes.counted.system.build.toplevel}";
        # CI's side of signed pointers: `nixos-autodeploy sign`.
        environment.systemPackages = [ nodes.machine.system.autoDeploy.package ];
        environment.etc."autodeploy-test-key" = {
          text = signingKey;
          mode = "0400";
        };
        nix.settings.experimental-features = [ "nix-command" ];
        # Everything the test publishes must be valid in the cache node's store.
        virtualisation.additionalPaths = [
          nodes.machine.system.build.toplevel
        ]
        ++ lib.attrValues nodes.machine.autodeployTest.systems
        ++ lib.optionals hasBootCounting [
          nodes.counted.system.build.toplevel
          nodes.counted.autodeployTest.broken
        ];
        virtualisation.diskSize = 8192;
        virtualisation.memorySize = 2048;
      };

    machine =
      {
        config,
        lib,
        extendModules,
        ...
      }:
      {
        imports = [
          nixosModule
          agent.base
          growRoot
        ];

        options.autodeployTest = {
          systems = lib.mkOption {
            type = lib.types.lazyAttrsOf lib.types.raw;
            internal = true;
            description = "Variants of this machine's system that the test deploys.";
          };
          variantConfigs = lib.mkOption {
            type = lib.types.lazyAttrsOf lib.types.raw;
            internal = true;
            description = "The evaluated configurations of those variants.";
          };
        };

        config = {
          autodeployTest.variantConfigs = lib.mapAttrs (
            _: variant:
            (extendModules {
              modules = [
                {
                  environment.etc."autodeploy-test".text = variant.marker;
                  system.autoDeploy = variant.autoDeploy;
                }
              ];
            }).config
          ) agent.variants;
          autodeployTest.systems = lib.mapAttrs (
            _: c: c.system.build.toplevel
          ) config.autodeployTest.variantConfigs;
          environment.etc."autodeploy-test".text = lib.mkDefault "base";

          nix.settings = {
            substituters = lib.mkForce [ "http://cache" ];
            # The test cache is written by `nix copy` without a signing key.
            require-sigs = false;
          };

          virtualisation = {
            # A real boot loader, so that a boot-mode deploy takes effect at
            # the next boot (without it the VM always boots its initial system).
            useBootLoader = true;
            # Downloaded systems must survive the reboot.
            writableStoreUseTmpfs = false;
            memorySize = 2048;
            # The disk; the root file system grows to it (growRoot).
            diskSize = 4096;
          };
          documentation.enable = false;
        };
      };
  }
  # systemd-boot with boot counting; its "broken" variant boots but fails the
  # boot check (the health check looks for the marker).
  // lib.optionalAttrs hasBootCounting {
    counted =
      {
        config,
        lib,
        extendModules,
        ...
      }:
      {
        imports = [
          nixosModule
          agent.counted
          growRoot
        ];

        options.autodeployTest = {
          broken = lib.mkOption {
            type = lib.types.raw;
            internal = true;
            description = "A variant of this machine's system that fails its boot check.";
          };
          brokenConfig = lib.mkOption {
            type = lib.types.raw;
            internal = true;
            description = "Its evaluated configuration.";
          };
        };

        config = {
          autodeployTest.brokenConfig =
            (extendModules {
              modules = [ { environment.etc."autodeploy-test".text = "broken"; } ];
            }).config;
          autodeployTest.broken = config.autodeployTest.brokenConfig.system.build.toplevel;
          environment.etc."autodeploy-test".text = lib.mkDefault "base";

          boot.loader.systemd-boot = {
            enable = true;
            # One try: the first boot that is not blessed makes the entry bad.
            bootCounting = {
              enable = true;
              tries = 1;
            };
          };
          boot.loader.efi.canTouchEfiVariables = true;

          nix.settings = {
            substituters = lib.mkForce [ "http://cache" ];
            require-sigs = false;
          };
          virtualisation = {
            useBootLoader = true;
            useEFIBoot = true;
            writableStoreUseTmpfs = false;
            memorySize = 2048;
            diskSize = 4096;
          };
          documentation.enable = false;
        };
      };
  };

  # Three VMs, four reboots (nixos/lib/testing: globalTimeout, meta.timeout).
  globalTimeout = 2 * 3600;
  meta.timeout = 2 * 3600;

  testScript =
    { nodes, ... }:
    let
      m = nodes.machine;
      c = nodes.counted or null;
      systems = m.autodeployTest.systems;
      exporterPort = toString m.services.prometheus.exporters.node.port;
    in
    ''
      import os
      import re
      import shlex
      import time

      BASE = "${m.system.build.toplevel}"
      NEXT = "${systems.next}"
      TOKEN_SYSTEM = "${systems.token}"
      SIGNED = "${systems.signed}"
      BOOT_A = "${systems.boot-a}"
      BOOT_B = "${systems.boot-b}"
      PROM = "${promFile}"
      METRICS_URL = "http://localhost:${exporterPort}/metrics"
      TOKEN = "${token}"
      TOKEN_FILE = "${agent.tokenFile}"
      POINTERS = {
          "public": "/srv/cache/pointer",
          "private": "/srv/private/pointer",
          "signed": "/srv/signed/pointer",
      }
      URLS = {
          "public": "http://cache/pointer",
          "private": "http://cache/private/pointer",
          "signed": "http://cache/signed/pointer",
      }


      def push(path):
          cache.succeed(f"nix copy --to 'file:///srv/cache?compression=none' {path}")


      def publish(path, where="public"):
          """What CI does: push the closure to the cache, then the pointer."""
          push(path)
          # ETag / Last-Modified have a one-second resolution: make sure the
          # new pointer never looks like the previous one.
          time.sleep(1.1)
          target = POINTERS[where]
          cache.succeed(f"echo {path} > {target}.new && mv {target}.new {target}")
          auth = f"-H 'Authorization: Bearer {TOKEN}' " if where == "private" else ""
          machine.succeed(f"curl -sf {auth}{URLS[where]} | grep -qx " + shlex.quote(path))


      def sign(path, revision):
          """A signed pointer (and pointer.sig) for this host only."""
          push(path)
          time.sleep(1.1)
          cache.succeed(
              "nixos-autodeploy sign --key /etc/autodeploy-test-key "
              f"--revision {revision} --hosts machine -o {POINTERS['signed']} {path}"
          )


      def current():
          return machine.succeed("readlink -f /run/current-system").strip()


      def run_agent():
          # Type=oneshot: returns when the run is over, fails if it failed.
          machine.succeed("systemctl start nixos-autodeploy.service")


      def forget_state():
          machine.succeed("find /var/lib/nixos-autodeploy -mindepth 1 -delete")


      def metrics():
          return machine.succeed(f"cat {PROM}")


      def gauge(name, text=None):
          text = metrics() if text is None else text
          m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
          assert m, f"{name} missing from:\n{text}"
          return float(m.group(1))


      def state(text=None):
          text = metrics() if text is None else text
          found = re.findall(r'^nixos_autodeploy_state\{state="(\w+)"\} 1(?:\.0)?$', text, re.M)
          assert len(found) == 1, f"expected exactly one state, got {found}:\n{text}"
          return found[0]


      def info_label(label, text=None):
          text = metrics() if text is None else text
          m = re.search(rf'^nixos_autodeploy_info\{{.*\b{label}="([^"]*)"', text, re.M)
          assert m, f"{label} missing from:\n{text}"
          return m.group(1)


      def trigger_runs():
          """Agent runs the manual-switch trigger started during this boot (it
          also runs, and stays quiet, on the agent's own switches)."""
          out = machine.succeed(
              "journalctl -b -q -o cat -u nixos-autodeploy-trigger.service"
              " | grep -c '^a manual switch: starting' || true"
          )
          return int(out.strip() or 0)

      def trigger_skips():
          """The trigger's runs on the agent's own switches (no agent run)."""
          out = machine.succeed(
              "journalctl -b -q -o cat -u nixos-autodeploy-trigger.service"
              " | grep -c '^activated by nixos-autodeploy' || true"
          )
          return int(out.strip() or 0)


      def expect(dirty, system, states=None):
          text = metrics()
          assert current() == system, f"current system {current()} != {system}"
          assert gauge("nixos_autodeploy_dirty", text) == dirty, text
          assert gauge("nixos_autodeploy_last_run_success", text) == 1, text
          if states is not None:
              assert state(text) in states, f"state {state(text)} not in {states}"
          return text


      def exec_start():
          return machine.succeed("systemctl show -P ExecStart nixos-autodeploy.service")


      start_all()
      cache.wait_for_unit("nginx.service")
      cache.wait_for_open_port(80)
      machine.wait_for_unit("multi-user.target")
      machine.wait_for_unit("prometheus-node-exporter.service")
      machine.wait_for_open_port(${exporterPort})

      with subtest("units are installed as configured"):
          assert current() == BASE
          machine.succeed("systemctl show -P Type nixos-autodeploy.service | grep -qx oneshot")
          line = exec_start()
          for want in ["--once", "--url http://cache/pointer", f"--prometheus-path {PROM}",
                       "--switch-mode switch", "--health-check test -e /etc/autodeploy-test",
                       "--health-check curl -fsS -o /dev/null http://cache/"]:
              assert want in line, f"{want!r} not in {line}"
          assert "--reboot-mode" not in line
          # system.autoDeploy.path: curl for the health check
          machine.succeed("systemctl show -P Environment nixos-autodeploy.service | grep -q -- '-curl-'")
          machine.succeed("systemctl show -P RuntimeDirectoryPreserve nixos-autodeploy.service | grep -qx yes")
          timer = machine.succeed("systemctl cat nixos-autodeploy.timer")
          for want in ["OnCalendar=04:42", "OnBootSec=2min", "FixedRandomDelay=true", "Persistent=true"]:
              assert want in timer, f"{want!r} not in timer:\n{timer}"
          # exactly one textfile directory for node_exporter
          flags = machine.succeed("systemctl show -P ExecStart prometheus-node-exporter.service")
          assert flags.count("--collector.textfile.directory") == 1, flags
          machine.fail(f"nix-store --check-validity {NEXT}")

      with subtest("missing state, same upstream: tracked, not dirty"):
          forget_state()
          publish(BASE)
          run_agent()
          expect(0, BASE)

      with subtest("tracking state, same upstream: up to date"):
          run_agent()
          expect(0, BASE, {"up_to_date"})

      with subtest("tracking state, different upstream: deployed from the cache"):
          publish(NEXT)
          run_agent()
          text = expect(0, NEXT, {"deployed", "up_to_date"})
          assert gauge("nixos_autodeploy_deploys_total", text) >= 1
          machine.succeed("grep -qx next /etc/autodeploy-test")
          machine.succeed(f"nix-store --check-validity {NEXT}")
          # The agent's own activation ran the trigger (sysinit-reactivation.target),
          # which saw the agent's marker and started nothing; the agent
          # survived it (systemctl start succeeded).
          assert trigger_runs() == 0
          assert trigger_skips() >= 1

      with subtest("missing state, different upstream: dirty, nothing deployed"):
          forget_state()
          publish(BASE)
          run_agent()
          expect(1, NEXT, {"dirty"})

      with subtest("missing state, same upstream again: tracking NEXT"):
          forget_state()
          publish(NEXT)
          run_agent()
          expect(0, NEXT)

      with subtest("a manual activation triggers a run that reports dirty"):
          before = gauge("nixos_autodeploy_last_run_timestamp_seconds")
          time.sleep(1.1)
          # switch-to-configuration must return without waiting for the agent.
          machine.succeed(f"timeout 300 {BASE}/bin/switch-to-configuration switch")
          retry(lambda _last: gauge("nixos_autodeploy_last_run_timestamp_seconds") > before,
                timeout_seconds=120)
          machine.wait_until_fails("systemctl is-active --quiet nixos-autodeploy.service", timeout=120)
          assert trigger_runs() == 1
          # deployed NEXT, current BASE, upstream NEXT
          expect(1, BASE, {"dirty"})

      with subtest("dirty state, different upstream: stays dirty, nothing deployed"):
          run_agent()
          expect(1, BASE, {"dirty"})

      with subtest("dirty state, same upstream: adopted, not dirty"):
          publish(BASE)
          run_agent()
          expect(0, BASE)
          assert state() != "dirty"

      with subtest("tokenFile: the token reaches the pointer through LoadCredential"):
          machine.succeed(
              "install -d -m 0700 /run/keys",
              f"printf %s {TOKEN} > {TOKEN_FILE}",
              f"chmod 0400 {TOKEN_FILE}",
          )
          publish(TOKEN_SYSTEM)
          run_agent()
          expect(0, TOKEN_SYSTEM)
          # Now the unit of TOKEN_SYSTEM runs: the private pointer, the token
          # as a credential, never in the unit or the store.
          assert "--url http://cache/private/pointer" in exec_start()
          machine.succeed(
              "systemctl show -P LoadCredential nixos-autodeploy.service | grep -qF " + shlex.quote(TOKEN_FILE)
          )
          machine.fail(f"systemctl cat nixos-autodeploy.service | grep -qF {TOKEN}")
          machine.fail("curl -sf http://cache/private/pointer")  # 401 without it
          publish(SIGNED, "private")
          run_agent()
          expect(0, SIGNED)
          machine.succeed("grep -qx signed /etc/autodeploy-test")

      with subtest("trustedKeys: an unsigned pointer is refused, a signed one deployed"):
          assert "--url http://cache/signed/pointer" in exec_start()
          assert "--trusted-keys /nix/store/" in exec_start()
          push(BOOT_A)
          cache.succeed(f"echo {BOOT_A} > {POINTERS['signed']}", f"rm -f {POINTERS['signed']}.sig")
          machine.fail("systemctl start nixos-autodeploy.service")
          text = metrics()
          assert state(text) == "refused", text
          assert gauge("nixos_autodeploy_last_run_success", text) == 0
          assert current() == SIGNED
          sign(BOOT_A, revision=1)
          run_agent()
          expect(0, BOOT_A)
          assert gauge("nixos_autodeploy_upstream_revision") == 1

      with subtest("switchMode/rebootMode: the module's boot-mode deploy reboots into it"):
          # BOOT_A's unit: the public pointer, --switch-mode boot --reboot-mode reboot.
          line = exec_start()
          assert "--switch-mode boot" in line and "--reboot-mode reboot" in line, line
          publish(BOOT_B)
          # The run stages BOOT_B and reboots the guest, so it cannot be
          # waited for. The VM runs with allow_reboot=False (QEMU's
          # -no-reboot): QEMU exits at the guest's reboot; start it again, it
          # boots the default entry the deploy installed.
          machine.succeed("systemctl start --no-block nixos-autodeploy.service")
          machine.wait_for_shutdown()
          machine.start()
          machine.wait_for_unit("multi-user.target")
          assert current() == BOOT_B, current()
          machine.succeed("grep -qx boot-b /etc/autodeploy-test")
          run_agent()
          text = expect(0, BOOT_B, {"up_to_date", "deployed"})
          assert gauge("nixos_autodeploy_reboot_required", text) == 0
          assert info_label("booted_generation", text) == os.path.basename(BOOT_B)
          assert info_label("current_generation", text) == os.path.basename(BOOT_B)
          # That first cycle after the reboot health-checked BOOT_B
          # ("deployed"); the next one is a plain no-op.
          run_agent()
          expect(0, BOOT_B, {"up_to_date"})
          # The activation at boot is not a manual activation.
          assert trigger_runs() == 0

      with subtest("node-exporter serves the agent's metrics"):
          machine.wait_for_unit("prometheus-node-exporter.service")
          out = machine.succeed(f"curl -sf {METRICS_URL} | grep '^nixos_autodeploy_'")
          for want in ["nixos_autodeploy_dirty 0", "nixos_autodeploy_reboot_required 0",
                       'nixos_autodeploy_state{state="up_to_date"} 1',
                       "nixos_autodeploy_last_run_timestamp_seconds ",
                       "nixos_autodeploy_last_success_timestamp_seconds ",
                       "nixos_autodeploy_info{"]:
              assert want in out, f"{want!r} not scraped:\n{out}"
          machine.succeed(f"curl -sf {METRICS_URL} | grep -qx 'node_textfile_scrape_error 0'")

      with subtest("the timer runs the agent"):
          before = gauge("nixos_autodeploy_last_run_timestamp_seconds")
          time.sleep(1.1)
          # OnBootSec=2min: elapses at once if the boot is older than that.
          machine.succeed("systemctl start nixos-autodeploy.timer")
          retry(lambda _last: gauge("nixos_autodeploy_last_run_timestamp_seconds") > before,
                timeout_seconds=300)
          expect(0, BOOT_B)

    ''
    + lib.optionalString hasBootCounting ''
      with subtest("a staged system that fails its boot check is not blessed and the host falls back"):
          COUNTED_BASE = "${c.system.build.toplevel}"
          BROKEN = "${c.autodeployTest.broken}"

          def counted_publish(path):
              cache.succeed(f"nix copy --to 'file:///srv/cache?compression=none' {path}")
              time.sleep(1.1)
              cache.succeed(f"echo {path} > /srv/cache/pointer-counted.new && "
                            "mv /srv/cache/pointer-counted.new /srv/cache/pointer-counted")

          def counted_current():
              return counted.succeed("readlink -f /run/current-system").strip()

          def counted_metrics():
              return counted.succeed(f"cat {PROM}")

          def counted_reboots():
              """QEMU runs with -no-reboot (allow_reboot=False): it exits at the
              guest's reboot; start it again."""
              counted.wait_for_shutdown()
              counted.start()
              counted.wait_for_unit("multi-user.target")

          counted.wait_for_unit("multi-user.target")
          # The first boot passed its boot check and was blessed.
          counted.wait_until_succeeds("systemctl is-active nixos-autodeploy-boot-check.service", timeout=300)
          # systemd-bless-boot removed the counter from the entry's name.
          counted.wait_until_succeeds("! ls /boot/loader/entries | grep -qF '+'", timeout=60)
          # nixpkgs 26.11 with boot counting names entries nixos-<content
          # hash>.conf and writes a pattern as loader.conf's default (which
          # systemd-boot does not copy into LoaderEntryDefault: the entry
          # files decide): the agent must never take the fallback below for
          # a manual choice.
          counted.succeed("grep -q '^default nixos-' /boot/loader/loader.conf")
          unit = counted.succeed("systemctl cat nixos-autodeploy-boot-check.service")
          assert "Before=boot-complete.target" in unit, unit
          assert "boot-complete.target" in counted.succeed(
              "systemctl show -P RequiredBy nixos-autodeploy-boot-check.service"
          )
          line = counted.succeed("systemctl show -P ExecStart nixos-autodeploy.service")
          assert "--switch-mode boot" in line and "--reboot-mode reboot" in line, line
          counted_publish(COUNTED_BASE)
          counted.succeed("systemctl start nixos-autodeploy.service")  # tracking
          counted_publish(BROKEN)
          # The module's switchMode/rebootMode: the run stages BROKEN and
          # reboots into it, whose entry carries a try counter.
          counted.succeed("systemctl start --no-block nixos-autodeploy.service")
          counted_reboots()
          assert counted_current() == BROKEN, counted_current()
          # The boot check fails (after its bounded wait): boot-complete.target
          # is not reached, systemd-bless-boot does not mark the entry good.
          counted.wait_until_succeeds("systemctl is-failed nixos-autodeploy-boot-check.service", timeout=400)
          counted.fail("systemctl is-active boot-complete.target")
          counted.succeed("ls /boot/loader/entries | grep -q '+0'")  # no tries left
          # Reboot without the agent: systemd-boot skips the bad entry.
          counted.succeed("systemctl start --no-block reboot.target")
          counted_reboots()
          assert counted_current() == COUNTED_BASE, counted_current()
          # Reported once, as a failure: exit 5, boot_failed, quarantined, the
          # profile back on what runs.
          counted.fail("systemctl start nixos-autodeploy.service")
          text = counted_metrics()
          assert 'nixos_autodeploy_state{state="boot_failed"} 1' in text, text
          assert "nixos_autodeploy_boot_failures_total 1" in text, text
          assert "nixos_autodeploy_last_run_success 0" in text, text
          assert f'nixos_autodeploy_quarantined{{path="{BROKEN}"}} 1' in text, text
          assert counted.succeed("readlink -f /nix/var/nix/profiles/system").strip() == COUNTED_BASE
          counted.succeed("systemctl start nixos-autodeploy.service")
          text = counted_metrics()
          assert 'nixos_autodeploy_state{state="quarantined"} 1' in text, text
          assert "nixos_autodeploy_boot_failures_total 1" in text, text
          status = counted.succeed("${c.system.autoDeploy.package}/bin/nixos-autodeploy status")
          assert "boot failure" in status and "history" in status, status
          assert "no tries left" in status, status
    '';
}
