{
  description = "nixos-autodeploy: a pull-based NixOS deployment agent";

  # No flake.lock is committed (none could be produced without network access);
  # `nix flake lock` or the first `nix build` creates one.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # An attribute set, not the bare path: Nix 2.8's `nix flake check`
      # accepts a function or an attribute set and refuses a path ("module
      # must be a function or an attribute set"); current Nix accepts all
      # three. Importing the file by path keeps its name in error messages
      # and lets the module system deduplicate it when several names are
      # imported.
      module = {
        _file = ./flake.nix;
        imports = [ ./module.nix ];
      };
    in
    {
      nixosModules = {
        nixos-autodeploy = module;
        # The name hlsb-fulda/nixos-autodeploy's flake uses.
        autodeploy = module;
        default = module;
      };

      packages = forAllSystems (pkgs: {
        nixos-autodeploy = pkgs.callPackage ./package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.nixos-autodeploy;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          meta.description = "Run the nixos-autodeploy agent";
        };
      });

      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
        in
        {
          # Builds the agent; pytestCheckHook runs tests/test_unit.py.
          package = self.packages.${system}.default;

          # tests/test_module.py run through Nix: module.nix under the real
          # lib.evalModules and the option harness of tests/nixos_harness/,
          # and the VM test's script against the driver stand-in; a nested
          # nix-instantiate with a private store, as nixpkgs' own lib tests do.
          module-eval =
            pkgs.runCommand "nixos-autodeploy-module-eval"
              {
                src = lib.fileset.toSource {
                  root = ./.;
                  fileset = lib.fileset.unions [
                    # autodeploy.py: its argument parser checks every
                    # generated command line.
                    ./autodeploy.py
                    ./module.nix
                    ./package.nix
                    ./flake.nix
                    ./README.md
                    ./tests
                  ];
                };
                nativeBuildInputs = [
                  pkgs.nix
                  (pkgs.python3.withPackages (ps: [ ps.pytest ]))
                ];
                NIXPKGS_LIB = "${nixpkgs}/lib";
                NIXOS_AUTODEPLOY_REQUIRE_EVAL = "1";
              }
              ''
                export TEST_ROOT=$PWD/test-tmp
                export HOME=$(mktemp -d)
                export NIX_BUILD_HOOK=
                export NIX_CONF_DIR=$TEST_ROOT/etc
                export NIX_LOCALSTATE_DIR=$TEST_ROOT/var
                export NIX_LOG_DIR=$TEST_ROOT/var/log/nix
                export NIX_STATE_DIR=$TEST_ROOT/var/nix
                export NIX_STORE_DIR=$TEST_ROOT/store
                nix-store --init
                cp -r $src source && chmod -R u+w source && cd source
                python3 -m pytest -q -p no:cacheprovider tests/test_module.py
                touch $out
              '';

          # The module inside a real NixOS evaluation: the generated unit file
          # must carry the options, and the configuration must pass its
          # assertions.
          module-nixos =
            let
              nixos = lib.nixosSystem {
                modules = [
                  self.nixosModules.default
                  # The same host tests/test_module.py evaluates in its harness.
                  ./tests/module-check-host.nix
                  {
                    nixpkgs.hostPlatform = system;
                    boot.isContainer = true;
                    system.stateVersion = lib.trivial.release;
                  }
                ];
              };
              failed = map (a: a.message) (lib.filter (a: !a.assertion) nixos.config.assertions);
              units = nixos.config.systemd.units;
            in
            assert lib.assertMsg (failed == [ ]) (lib.concatLines failed);
            pkgs.runCommand "nixos-autodeploy-module-nixos" { } ''
              service=${units."nixos-autodeploy.service".unit}/nixos-autodeploy.service
              timer=${units."nixos-autodeploy.timer".unit}/nixos-autodeploy.timer
              exporter=${units."prometheus-node-exporter.service".unit}/prometheus-node-exporter.service
              cat $service $timer
              for want in '"--switch-mode" "smart"' '"--reboot-mode" "kexec"' \
                  '"--reboot-window" "02:00-05:00"' '"--no-connectivity-check"' \
                  '"--trusted-keys" "/nix/store/' '"--hostname" "web-1"' \
                  ' --token-file %d/token' \
                  '"--prometheus-path" "/var/lib/prometheus-node-exporter-text/nixos-autodeploy.prom"' \
                  'LoadCredential=token:/run/keys/nixos-autodeploy-token' \
                  'Type=oneshot' 'X-RestartIfChanged=false' 'X-StopOnRemoval=false' \
                  'RuntimeDirectoryPreserve=yes' '-curl-'; do
                grep -qF -- "$want" $service || { echo "missing in service: $want"; exit 1; }
              done
              if grep -q '^Restart=' $service; then echo "unexpected Restart="; exit 1; fi
              for want in 'OnCalendar=*:0/5' 'FixedRandomDelay=true' 'Persistent=true' 'OnBootSec=2min'; do
                grep -qF -- "$want" $timer || { echo "missing in timer: $want"; exit 1; }
              done
              test "$(grep -o -- '--collector.textfile.directory=[^ ]*' $exporter)" = \
                '--collector.textfile.directory=/var/lib/prometheus-node-exporter-text'
              touch $out
            '';

        }
        # The end-to-end NixOS VM test (needs KVM). x86_64-linux only: its
        # `machine` node boots with BIOS GRUB, which aarch64 does not have.
        # On 26.05 (no systemd-boot boot counting) it runs without the
        # `counted` node (tests/vm-test.nix).
        // lib.optionalAttrs (system == "x86_64-linux") {
          vm-test = pkgs.testers.nixosTest (
            import ./tests/vm-test.nix {
              inherit pkgs;
              nixosModule = self.nixosModules.default;
            }
          );
        }
      );
    };
}
