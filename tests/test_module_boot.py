"""module.nix: system.autoDeploy.bootAssessment (issue #13), evaluated with the
real nixpkgs `lib.evalModules` like tests/test_module.py: minimal
declarations of the NixOS options the module sets, no package set, no store
writes (--readonly-mode).  nixpkgs' lib comes from NIXPKGS_LIB, else from
../shared/nixpkgs-lib/lib next to the repository; skipped when neither exists."""

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "module.nix"
NIX_INSTANTIATE = shutil.which("nix-instantiate")
NIXPKGS_LIB = os.environ.get("NIXPKGS_LIB") or str((REPO / ".." / "shared" / "nixpkgs-lib" / "lib").resolve())
PACKAGE = f"/nix/store/{'0' * 32}-nixos-autodeploy-0.1.0"
URL = "https://cache.example.org/pointers/web-1"

_REASON = ("nix-instantiate not found" if NIX_INSTANTIATE is None
           else None if (Path(NIXPKGS_LIB) / "default.nix").is_file()
           else f"no nixpkgs lib at {NIXPKGS_LIB} (set NIXPKGS_LIB)")
if _REASON and os.environ.get("NIXOS_AUTODEPLOY_REQUIRE_EVAL") == "1":
    raise RuntimeError(f"module evaluation required but impossible: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

# `bootCounting` declares boot.loader.systemd-boot.bootCounting.enable, as
# nixpkgs versions with boot counting do; without it the option is absent.
HARNESS = r"""
{ libPath, modulePath, config, bootCounting }:
let
  lib = import libPath;
  inherit (lib) mkOption types;
  utils = rec {
    escapeSystemdExecArg = arg:
      let s = if builtins.isString arg then arg else toString arg;
      in lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);
    escapeSystemdExecArgs = lib.concatMapStringsSep " " escapeSystemdExecArg;
  };
  pkgs = {
    callPackage = _fn: _args: { type = "derivation"; name = "nixos-autodeploy-0.1.0"; outPath = "@PACKAGE@"; };
    writeText = name: text: { type = "derivation"; inherit name text; outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" text)}-${name}"; };
  };
  anyAttrs = mkOption { type = types.attrsOf types.anything; default = { }; };
  stubs = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      nix.package = mkOption { type = types.unspecified; default = "nix-stub"; };
      systemd.package = mkOption { type = types.unspecified; default = "systemd-stub"; };
      systemd.services = anyAttrs;
      systemd.timers = anyAttrs;
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      system.activationScripts = anyAttrs;
      services.prometheus.exporters.node = {
        enable = mkOption { type = types.bool; default = false; };
        enabledCollectors = mkOption { type = types.listOf types.str; default = [ ]; };
        extraFlags = mkOption { type = types.listOf types.str; default = [ ]; };
      };
    };
  };
  countingStub = {
    options.boot.loader.systemd-boot.bootCounting.enable = mkOption { type = types.bool; default = false; };
  };
  eval = lib.evalModules {
    modules = [ stubs modulePath config ] ++ lib.optional bootCounting countingStub;
    specialArgs = { inherit pkgs utils; };
  };
  c = eval.config;
in {
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);
  warnings = c.warnings;
  services = c.systemd.services;
}
""".replace("@PACKAGE@", PACKAGE)


def evaluate(tmp_path, body: str, boot_counting: bool = False) -> dict:
    (tmp_path / "harness.nix").write_text(HARNESS)
    expr = tmp_path / "eval.nix"
    expr.write_text(textwrap.dedent(f"""\
        import {tmp_path / "harness.nix"} {{
          libPath = {NIXPKGS_LIB};
          modulePath = {MODULE};
          bootCounting = {"true" if boot_counting else "false"};
          config = {body};
        }}
        """))
    env = dict(os.environ, NIX_CONFIG="")
    env.pop("NIX_PATH", None)
    r = subprocess.run([NIX_INSTANTIATE, "--eval", "--strict", "--json", "--readonly-mode", str(expr)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def exec_argv(line: str) -> list[str]:
    """ExecStart= as systemd splits what escapeSystemdExecArgs wrote."""
    dec, argv, i = json.JSONDecoder(), [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
        elif line[i] == '"':
            word, i = dec.raw_decode(line, i)
            argv.append(word.replace("%%", "%").replace("$$", "$"))
        else:
            j = line.find(" ", i)
            j = len(line) if j < 0 else j
            argv.append(line[i:j])
            i = j
    return argv


def flag_values(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_check_unit_is_required_by_and_ordered_before_boot_complete(tmp_path):
    r = evaluate(tmp_path, f'''{{
      system.autoDeploy = {{
        enable = true; url = "{URL}";
        healthChecks = [ "systemctl is-active nginx.service" "curl -fsS http://localhost/%h" ];
        healthTimeout = 90; timeout = 10;
        bootAssessment = {{ enable = true; wait = 120; }};
      }};
      boot.loader.systemd-boot.bootCounting.enable = true;
    }}''', boot_counting=True)
    assert r["failedAssertions"] == [] and r["warnings"] == []
    unit = r["services"]["nixos-autodeploy-boot-check"]
    assert unit["requiredBy"] == ["boot-complete.target"]
    assert unit["before"] == ["boot-complete.target"]
    assert "network-online.target" in unit["after"] and "network-online.target" in unit["wants"]
    assert unit["restartIfChanged"] is False
    sc = unit["serviceConfig"]
    assert sc["Type"] == "oneshot" and sc["RemainAfterExit"] is True
    assert sc["TimeoutStartSec"] == 120 + 90 + 60
    assert sc["StateDirectory"] == "nixos-autodeploy"
    argv = exec_argv(sc["ExecStart"])
    assert argv[:2] == [f"{PACKAGE}/bin/nixos-autodeploy", "check-boot"]
    assert flag_values(argv, "--url") == [URL]
    assert flag_values(argv, "--wait") == ["120"]
    assert flag_values(argv, "--health-timeout") == ["90"] and flag_values(argv, "--timeout") == ["10"]
    assert flag_values(argv, "--health-check") == ["systemctl is-active nginx.service",
                                                   "curl -fsS http://localhost/%h"]
    assert "--no-connectivity-check" not in argv and "--once" not in argv


def test_check_unit_follows_connectivity_state_dir_and_token(tmp_path):
    r = evaluate(tmp_path, f'''{{
      system.autoDeploy = {{
        enable = true; url = "{URL}"; connectivityCheck = false; stateDir = "/persist/autodeploy";
        tokenFile = "/run/secrets/token"; bootAssessment.enable = true;
      }};
    }}''')
    sc = r["services"]["nixos-autodeploy-boot-check"]["serviceConfig"]
    argv = exec_argv(sc["ExecStart"])
    assert "--no-connectivity-check" in argv
    assert flag_values(argv, "--state-dir") == ["/persist/autodeploy"]
    assert flag_values(argv, "--token-file") == ["%d/token"]
    assert sc["LoadCredential"] == "token:/run/secrets/token"
    assert "StateDirectory" not in sc
    assert flag_values(argv, "--wait") == ["300"]  # the default


def test_without_boot_counting_a_warning_says_the_check_will_not_run(tmp_path):
    for counting in (False, True):
        r = evaluate(tmp_path, f'{{ system.autoDeploy = {{ enable = true; url = "{URL}"; '
                               'bootAssessment.enable = true; }; }', boot_counting=counting)
        assert "nixos-autodeploy-boot-check" in r["services"]
        assert len([w for w in r["warnings"] if "bootCounting" in w]) == 1


def test_boot_assessment_is_off_by_default(tmp_path):
    r = evaluate(tmp_path, f'{{ system.autoDeploy = {{ enable = true; url = "{URL}"; }}; }}')
    assert "nixos-autodeploy-boot-check" not in r["services"]
    assert not any("bootCounting" in w for w in r["warnings"])
    r = evaluate(tmp_path, '{ system.autoDeploy.bootAssessment.enable = true; }')
    assert r["services"] == {}  # nothing without system.autoDeploy.enable
