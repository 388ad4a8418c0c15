"""Checks of the NixOS module (module.nix) and of the Nix files.

* test_nix_files_parse: `nix-instantiate --parse` on every *.nix file of the
  repository (skipped when nix-instantiate is missing).
* everything else evaluates module.nix with the real nixpkgs `lib.evalModules`
  plus minimal declarations of the NixOS options the module sets (no nixpkgs
  package set, no NixOS). It runs when NIXPKGS_LIB points at a nixpkgs `lib/`
  directory, e.g.

      NIXPKGS_LIB=/path/to/nixpkgs/lib python3 -m pytest tests/test_module.py

  and is skipped otherwise, unless NIXOS_AUTODEPLOY_REQUIRE_EVAL=1 (the flake
  check sets it), which turns the skip into a failure.

No network and no Nix store writes are needed: evaluation runs with
--readonly-mode, which also proves the module copies nothing into the store.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "module.nix"
NIX_INSTANTIATE = shutil.which("nix-instantiate")
NIXPKGS_LIB = os.environ.get("NIXPKGS_LIB", "")

FAKE_HASH = "0" * 32
PACKAGE = f"/nix/store/{FAKE_HASH}-nixos-autodeploy-0.1.0"
SYSTEMD = f"/nix/store/{'1' * 32}-systemd"


def _nix_env():
    env = dict(os.environ)
    env.pop("NIX_PATH", None)
    # Never read or write the machine's /etc/nix or ~/.config/nix state.
    env.setdefault("NIX_CONFIG", "")
    return env


def _eval_reason():
    if NIX_INSTANTIATE is None:
        return "nix-instantiate not found"
    if not NIXPKGS_LIB:
        return ("NIXPKGS_LIB is not set; point it at a nixpkgs lib/ directory "
                "(e.g. a checkout of nix-community/nixpkgs.lib) to evaluate module.nix")
    if not (Path(NIXPKGS_LIB) / "default.nix").is_file():
        return f"NIXPKGS_LIB={NIXPKGS_LIB} has no default.nix; it must be nixpkgs' lib/ directory"
    return None


_REASON = _eval_reason()
if _REASON and os.environ.get("NIXOS_AUTODEPLOY_REQUIRE_EVAL") == "1":
    raise RuntimeError(f"module evaluation required but impossible: {_REASON}")
needs_eval = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


# --------------------------------------------------------------------------
# nix-instantiate --parse on every .nix file

def _nix_files():
    return sorted(p for p in REPO.rglob("*.nix")
                  if ".git" not in p.relative_to(REPO).parts)


@pytest.mark.skipif(NIX_INSTANTIATE is None, reason="nix-instantiate not found")
@pytest.mark.parametrize("path", _nix_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_nix_files_parse(path):
    res = subprocess.run([NIX_INSTANTIATE, "--parse", str(path)],
                         capture_output=True, text=True, env=_nix_env())
    assert res.returncode == 0, res.stderr


def test_expected_nix_files_exist():
    for name in ("module.nix", "flake.nix", "package.nix", "tests/vm-test.nix"):
        assert (REPO / name).is_file(), name


# --------------------------------------------------------------------------
# evaluation harness

# Minimal declarations of the NixOS options module.nix sets or reads, plus a
# faithful copy of nixos/lib/utils.nix's escapeSystemdExecArg(s) and a tiny
# `pkgs`. writeText returns a store path whose hash part is derived from the
# text, so a test can tell which content a file has.
HARNESS = r"""
{ libPath, modulePath, config }:
let
  lib = import libPath;
  inherit (lib) mkOption types;

  utils = rec {
    escapeSystemdExecArg = arg:
      let
        s = if builtins.isPath arg then "${arg}"
          else if builtins.isString arg then arg
          else if builtins.isInt arg || builtins.isFloat arg || lib.isDerivation arg then toString arg
          else throw "escapeSystemdExecArg only allows strings, paths, numbers and derivations";
      in lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);
    escapeSystemdExecArgs = lib.concatMapStringsSep " " escapeSystemdExecArg;
  };

  fakePath = text: name:
    "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" text)}-${name}";

  pkgs = {
    callPackage = _fn: _args: {
      type = "derivation";
      name = "nixos-autodeploy-0.1.0";
      outPath = "@PACKAGE@";
      meta.mainProgram = "nixos-autodeploy";
    };
    writeText = name: text: {
      type = "derivation";
      inherit name text;
      outPath = fakePath text name;
    };
  };

  anyAttrs = mkOption { type = types.attrsOf types.anything; default = { }; };

  stubs = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      nix.package = mkOption { type = types.unspecified; default = "nix-stub"; };
      systemd.package = mkOption { type = types.unspecified; default = "@SYSTEMD@"; };
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

  eval = lib.evalModules {
    modules = [ stubs modulePath config ];
    specialArgs = { inherit pkgs utils; };
  };
  c = eval.config;
  enabled = c.system.autoDeploy.enable;
in {
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);
  warnings = c.warnings;
  services = c.systemd.services;
  timers = c.systemd.timers;
  activation = c.system.activationScripts;
  tmpfiles = c.systemd.tmpfiles.rules;
  nodeExporter = c.services.prometheus.exporters.node;
  systemPackages = map (p: p.outPath or p) c.environment.systemPackages;
  prometheusFilePath = c.system.autoDeploy.prometheusFilePath;
}
""".replace("@PACKAGE@", PACKAGE).replace("@SYSTEMD@", SYSTEMD)


def _nix_eval(tmp_path, config_nix, attr=None):
    harness = tmp_path / "harness.nix"
    harness.write_text(HARNESS)
    expr = tmp_path / "eval.nix"
    select = f".{attr}" if attr else ""
    expr.write_text(textwrap.dedent(f"""\
        (import {harness} {{
          libPath = {NIXPKGS_LIB};
          modulePath = {MODULE};
          config = {config_nix};
        }}){select}
        """))
    return subprocess.run(
        [NIX_INSTANTIATE, "--eval", "--strict", "--json", "--readonly-mode", str(expr)],
        capture_output=True, text=True, env=_nix_env())


def evaluate(tmp_path, config_nix, attr=None):
    res = _nix_eval(tmp_path, config_nix, attr)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def cfg(body):
    return "{ system.autoDeploy = { enable = true; " + body + " }; }"


def parse_exec(line):
    """Split an ExecStart= value into argv the way systemd does for what
    escapeSystemdExecArgs produces: JSON-quoted words with %% and $$ doubled;
    unquoted words (our own %d specifier) are returned as they are."""
    dec = json.JSONDecoder()
    argv, i = [], 0
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


def exec_argv(result):
    return parse_exec(result["services"]["nixos-autodeploy"]["serviceConfig"]["ExecStart"])


URL = "https://cache.example.org/pointers/web-1"


# --------------------------------------------------------------------------
# ExecStart

@needs_eval
def test_minimal_command_line(tmp_path):
    r = evaluate(tmp_path, cfg(f'url = "{URL}";'))
    assert r["failedAssertions"] == []
    argv = exec_argv(r)
    assert argv[0] == f"{PACKAGE}/bin/nixos-autodeploy"
    assert argv[1] == "--once"
    assert flag_values(argv, "--url") == [URL]
    assert flag_values(argv, "--switch-mode") == ["switch"]
    assert flag_values(argv, "--timeout") == ["30"]
    assert flag_values(argv, "--health-timeout") == ["120"]
    # null / default options stay off the command line
    for flag in ("--reboot-mode", "--reboot-window", "--prometheus-path", "--state-dir",
                 "--health-check", "--no-connectivity-check", "--trusted-keys",
                 "--signature-url", "--hostname", "--token-file", "--json-field",
                 "--on-success", "--on-failure"):
        assert flag not in argv, flag
    assert "null" not in argv
    svc = r["services"]["nixos-autodeploy"]
    assert "LoadCredential" not in svc["serviceConfig"]
    assert r["systemPackages"] == [PACKAGE]


@needs_eval
def test_every_option_reaches_the_agent(tmp_path):
    r = evaluate(tmp_path, cfg(f'''
        url = "{URL}";
        switchMode = "boot";
        rebootMode = "kexec";
        rebootWindow = "23:30-04:00";
        prometheusFilePath = "/run/metrics/autodeploy.prom";
        stateDir = "/persist/autodeploy";
        timeout = 7;
        healthChecks = [ "systemctl is-active nginx.service" "curl -fsS 'http://localhost/a b'" ];
        healthTimeout = 33;
        connectivityCheck = false;
        trustedKeys = [ "ssh-ed25519 AAAAkey1 ci" "ssh-ed25519 AAAAkey2 ci2" ];
        signatureUrl = "{URL}.signature";
        hostname = "web-1";
        tokenFile = "/run/keys/token";
        onSuccess = "echo ok";
        onFailure = "logger -t autodeploy failed";
        extraArgs = [ "--verbose" "--hook-timeout" "5" ];
    '''))
    assert r["failedAssertions"] == []
    argv = exec_argv(r)
    expect = {
        "--url": [URL],
        "--switch-mode": ["boot"],
        "--reboot-mode": ["kexec"],
        "--reboot-window": ["23:30-04:00"],
        "--prometheus-path": ["/run/metrics/autodeploy.prom"],
        "--state-dir": ["/persist/autodeploy"],
        "--timeout": ["7"],
        "--health-check": ["systemctl is-active nginx.service", "curl -fsS 'http://localhost/a b'"],
        "--health-timeout": ["33"],
        "--signature-url": [URL + ".signature"],
        "--hostname": ["web-1"],
        "--on-success": ["echo ok"],
        "--on-failure": ["logger -t autodeploy failed"],
        "--hook-timeout": ["5"],
        # the credential, not the original path: the secret never reaches the store
        "--token-file": ["%d/token"],
    }
    for flag, values in expect.items():
        assert flag_values(argv, flag) == values, flag
    assert "--no-connectivity-check" in argv
    assert "--verbose" in argv
    # extraArgs come last, only followed by the credential path
    assert argv[-5:] == ["--verbose", "--hook-timeout", "5", "--token-file", "%d/token"]

    keys_text = "ssh-ed25519 AAAAkey1 ci\nssh-ed25519 AAAAkey2 ci2\n"
    digest = hashlib.sha256(keys_text.encode()).hexdigest()[:32]
    assert flag_values(argv, "--trusted-keys") == [
        f"/nix/store/{digest}-nixos-autodeploy-trusted-keys"]

    sc = r["services"]["nixos-autodeploy"]["serviceConfig"]
    assert sc["LoadCredential"] == "token:/run/keys/token"
    assert "/run/keys/token" not in sc["ExecStart"]
    # stateDir outside /var/lib: no StateDirectory=, a tmpfiles rule instead
    assert "StateDirectory" not in sc
    assert any(rule.startswith("d /persist/autodeploy 0700 root root") for rule in r["tmpfiles"])


@needs_eval
def test_token_specifier_is_raw_and_user_percent_is_escaped(tmp_path):
    r = evaluate(tmp_path, cfg(f'''
        url = "{URL}?a=%41&b=$HOME";
        tokenFile = "/run/keys/token";
        onSuccess = "echo 100% $USER";
    '''))
    line = r["services"]["nixos-autodeploy"]["serviceConfig"]["ExecStart"]
    # user text: %/$ doubled inside a JSON-quoted word -> no specifier expansion
    assert '"https://cache.example.org/pointers/web-1?a=%%41&b=$$HOME"' in line
    assert '"echo 100%% $$USER"' in line
    # our own specifier: unquoted and single
    assert line.endswith(" --token-file %d/token")
    argv = parse_exec(line)
    assert flag_values(argv, "--url") == [URL + "?a=%41&b=$HOME"]


@needs_eval
def test_reboot_mode_values(tmp_path):
    for mode in ("reboot", "kexec"):
        argv = exec_argv(evaluate(tmp_path, cfg(f'url = "{URL}"; rebootMode = "{mode}";')))
        assert flag_values(argv, "--reboot-mode") == [mode]
    res = _nix_eval(tmp_path, cfg(f'url = "{URL}"; rebootMode = "poweroff";'), "services")
    assert res.returncode != 0
    assert "rebootMode" in res.stderr


@needs_eval
def test_null_reboot_mode_is_not_passed(tmp_path):
    argv = exec_argv(evaluate(tmp_path, cfg(f'url = "{URL}"; rebootMode = null; switchMode = "smart";')))
    assert "--reboot-mode" not in argv
    assert flag_values(argv, "--switch-mode") == ["smart"]


@needs_eval
def test_bad_reboot_window_is_a_type_error(tmp_path):
    res = _nix_eval(tmp_path, cfg(f'url = "{URL}"; rebootWindow = "25:00-03:00";'), "services")
    assert res.returncode != 0
    assert "rebootWindow" in res.stderr


@needs_eval
def test_trusted_keys_file(tmp_path):
    argv = exec_argv(evaluate(tmp_path, cfg(
        f'url = "{URL}"; trustedKeysFile = "/etc/autodeploy/allowed_signers";')))
    assert flag_values(argv, "--trusted-keys") == ["/etc/autodeploy/allowed_signers"]


@needs_eval
def test_trusted_keys_and_file_are_exclusive(tmp_path):
    r = evaluate(tmp_path, cfg(f'''url = "{URL}"; trustedKeys = [ "ssh-ed25519 AAAA x" ];
        trustedKeysFile = "/etc/autodeploy/allowed_signers";'''), "failedAssertions")
    assert any("mutually exclusive" in m for m in r)


@needs_eval
def test_token_file_must_not_be_a_nix_path(tmp_path):
    # A path literal would be copied into the world-readable store: refused.
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    res = _nix_eval(tmp_path, cfg(f'url = "{URL}"; tokenFile = {secret};'), "services")
    assert res.returncode != 0
    assert "tokenFile" in res.stderr


@needs_eval
def test_missing_url_fails_the_assertion(tmp_path):
    r = evaluate(tmp_path, "{ system.autoDeploy.enable = true; }", "failedAssertions")
    assert any("system.autoDeploy.url must be set" in m for m in r), r
    r = evaluate(tmp_path, cfg('url = "";'), "failedAssertions")
    assert any("system.autoDeploy.url must be set" in m for m in r), r


@needs_eval
def test_disabled_module_defines_nothing(tmp_path):
    r = evaluate(tmp_path, "{ }")
    assert r["services"] == {} and r["timers"] == {} and r["activation"] == {}
    assert r["failedAssertions"] == [] and r["tmpfiles"] == []


# --------------------------------------------------------------------------
# units

@needs_eval
def test_service_unit(tmp_path):
    r = evaluate(tmp_path, cfg(f'url = "{URL}";'))
    svc = r["services"]["nixos-autodeploy"]
    sc = svc["serviceConfig"]
    assert sc["Type"] == "oneshot"
    assert "Restart" not in sc
    assert svc["restartIfChanged"] is False
    assert svc["unitConfig"]["X-StopOnRemoval"] is False
    assert "network-online.target" in svc["after"]
    assert "network-online.target" in svc["wants"]
    assert sc["StateDirectory"] == "nixos-autodeploy"
    assert sc["RuntimeDirectory"] == "nixos-autodeploy"
    assert "wantedBy" not in svc  # the timer starts it


@needs_eval
def test_state_dir_below_var_lib(tmp_path):
    r = evaluate(tmp_path, cfg(f'url = "{URL}"; stateDir = "/var/lib/autodeploy-b";'))
    assert r["services"]["nixos-autodeploy"]["serviceConfig"]["StateDirectory"] == "autodeploy-b"
    assert flag_values(exec_argv(r), "--state-dir") == ["/var/lib/autodeploy-b"]


@needs_eval
def test_timer_defaults(tmp_path):
    r = evaluate(tmp_path, cfg(f'url = "{URL}";'))
    t = r["timers"]["nixos-autodeploy"]
    tc = t["timerConfig"]
    assert t["wantedBy"] == ["timers.target"]
    assert tc["OnCalendar"] == "*:0/5"
    assert tc["RandomizedDelaySec"] == "0"
    assert tc["FixedRandomDelay"] is True
    assert tc["Persistent"] is True
    assert tc["OnBootSec"] == "2min"
    assert tc["Unit"] == "nixos-autodeploy.service"


@needs_eval
def test_timer_settings(tmp_path):
    r = evaluate(tmp_path, cfg(f'url = "{URL}"; interval = "hourly"; randomizedDelay = "45min";'))
    tc = r["timers"]["nixos-autodeploy"]["timerConfig"]
    assert tc["OnCalendar"] == "hourly"
    assert tc["RandomizedDelaySec"] == "45min"


@needs_eval
def test_trigger_unit_does_not_block(tmp_path):
    r = evaluate(tmp_path, cfg(f'url = "{URL}";'))
    trig = r["services"]["nixos-autodeploy-trigger"]
    assert trig["serviceConfig"]["Type"] == "oneshot"
    assert parse_exec(trig["serviceConfig"]["ExecStart"]) == [
        f"{SYSTEMD}/bin/systemctl", "start", "--no-block", "nixos-autodeploy.service"]


# --------------------------------------------------------------------------
# node exporter wiring

@needs_eval
def test_node_exporter_wiring(tmp_path):
    conf = ("{ services.prometheus.exporters.node.enable = true; "
            f'system.autoDeploy = {{ enable = true; url = "{URL}"; }}; }}')
    r = evaluate(tmp_path, conf)
    path = "/var/lib/prometheus-node-exporter-text/nixos-autodeploy.prom"
    assert r["prometheusFilePath"] == path
    assert flag_values(exec_argv(r), "--prometheus-path") == [path]
    assert "textfile" in r["nodeExporter"]["enabledCollectors"]
    assert ("--collector.textfile.directory=/var/lib/prometheus-node-exporter-text"
            in r["nodeExporter"]["extraFlags"])
    assert any(rule.startswith("d /var/lib/prometheus-node-exporter-text 0755")
               for rule in r["tmpfiles"])
    assert r["warnings"] == []


@needs_eval
def test_no_node_exporter_no_metrics_by_default(tmp_path):
    r = evaluate(tmp_path, cfg(f'url = "{URL}";'))
    assert r["prometheusFilePath"] is None
    assert r["nodeExporter"]["extraFlags"] == []
    assert "--prometheus-path" not in exec_argv(r)


@needs_eval
def test_node_exporter_wiring_opt_out_and_mismatch_warning(tmp_path):
    conf = ("{ services.prometheus.exporters.node.enable = true; "
            f'system.autoDeploy = {{ enable = true; url = "{URL}"; wireNodeExporter = false; }}; }}')
    r = evaluate(tmp_path, conf)
    assert r["prometheusFilePath"] is None
    assert r["nodeExporter"]["extraFlags"] == []
    conf = ("{ services.prometheus.exporters.node.enable = true; "
            f'system.autoDeploy = {{ enable = true; url = "{URL}"; '
            'prometheusFilePath = "/tmp/elsewhere.prom"; }; }')
    r = evaluate(tmp_path, conf)
    assert any("textfileDirectory" in w for w in r["warnings"])


# --------------------------------------------------------------------------
# activation trigger: run the generated snippet for real, with its absolute
# paths redirected into tmp_path, the way NixOS' activate script runs it
# (bash with an ERR trap; a failing command would fail the whole activation).

def _run_snippet(tmp_path, text, env_extra, existing=None):
    run = tmp_path / "rt"
    shutil.rmtree(run, ignore_errors=True)
    (run / "nixos-autodeploy").mkdir(parents=True)
    text = text.replace("/run/nixos-autodeploy/", f"{run}/nixos-autodeploy/")
    text = re.sub(r"(?<![\w/])/run/nixos(?![\w-])", f"{run}/nixos", text)
    # never touch the real /run of the machine running the tests
    assert "/run/" not in text.replace(str(run), ""), text
    restart_list = run / "nixos" / "activation-restart-list"
    if existing is not None:
        (run / "nixos").mkdir()
        restart_list.write_text(existing)
    marker = env_extra.pop("_MARKER", None)
    if marker is not None:
        (run / "nixos-autodeploy" / "activating").write_text(marker)
    script = ('_status=0\ntrap "_status=1" ERR\n' + text + '\nexit $_status\n')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env.update(env_extra)
    res = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return restart_list.read_text() if restart_list.exists() else None


@needs_eval
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_activation_snippet_behaviour(tmp_path):
    act = evaluate(tmp_path, cfg(f'url = "{URL}";'), "activation")
    snippet = act["nixos-autodeploy"]
    text = snippet["text"]
    assert snippet.get("supportsDryActivation", False) is False
    assert ">> /run/nixos/activation-restart-list" in text
    assert "> /run/nixos/activation-restart-list" not in text.replace(">>", "")
    assert "NIXOS_AUTODEPLOY_ACTIVATION" in text
    assert "/run/nixos-autodeploy/activating" in text
    line = "nixos-autodeploy-trigger.service\n"

    # manual `nixos-rebuild switch` / `test`: trigger, appended to what is there
    assert _run_snippet(tmp_path, text, {"NIXOS_ACTION": "switch"}) == line
    assert _run_snippet(tmp_path, text, {"NIXOS_ACTION": "test"}, "foo.service\n") == \
        "foo.service\n" + line
    # boot-time activation (no NIXOS_ACTION): nothing
    assert _run_snippet(tmp_path, text, {}) is None
    # our own activation, marked by the environment
    assert _run_snippet(tmp_path, text, {"NIXOS_ACTION": "switch",
                                         "NIXOS_AUTODEPLOY_ACTIVATION": "1"}) is None
    # ... or by the marker file holding the PID of a live agent
    assert _run_snippet(tmp_path, text, {"NIXOS_ACTION": "switch",
                                         "_MARKER": f"{os.getpid()}\n"}) is None
    # a stale marker (dead PID) or garbage does not silence the trigger
    assert _run_snippet(tmp_path, text, {"NIXOS_ACTION": "switch",
                                         "_MARKER": "4194305\n"}) == line
    assert _run_snippet(tmp_path, text, {"NIXOS_ACTION": "switch",
                                         "_MARKER": "not-a-pid"}) == line
    assert _run_snippet(tmp_path, text, {"NIXOS_ACTION": "switch",
                                         "_MARKER": ""}) == line


@needs_eval
def test_json_field_reaches_the_agent_and_excludes_trusted_keys(tmp_path):
    r = evaluate(tmp_path, cfg(f'url = "{URL}"; jsonField = "buildoutputs.out.path";'))
    assert r["failedAssertions"] == []
    assert flag_values(exec_argv(r), "--json-field") == ["buildoutputs.out.path"]
    r = evaluate(tmp_path, cfg(f'''url = "{URL}"; jsonField = "buildoutputs.out.path";
                                  trustedKeys = [ "ssh-ed25519 AAAAkey1 ci" ];'''))
    assert any("jsonField cannot be combined" in m for m in r["failedAssertions"])
