"""Checks of the NixOS module (module.nix), the flake and the VM test script.

* test_nix_files_parse: `nix-instantiate --parse` on every *.nix file.
* Everything else evaluates module.nix with the real nixpkgs `lib.evalModules`
  plus tests/nixos_harness/: declarations of every NixOS option the module
  reads or defines, written after nixpkgs' own (services.prometheus.exporters
  is one submodule-typed option, systemd units merge and render like
  systemd-lib.nix, activation scripts are string-or-submodule, ...). A whole
  matrix of configurations is evaluated in one `nix-instantiate --eval
  --strict --readonly-mode` call (no store writes: that also proves the module
  copies nothing into the store), and the rendered unit files are asserted.
* The VM test's testScript is rendered and run against a stand-in of the
  NixOS test driver (tests/nixos_harness/driver_standin.py).

nixpkgs' lib/ is found by tests/nixpkgs_lib.py ($NIXPKGS_LIB, then
../shared/nixpkgs-lib/lib next to the repository, then <nixpkgs/lib> as nix
resolves it). Without it (or without nix-instantiate) the evaluation tests are
skipped with one line saying how to get it; in CI (CI=true, or
NIXOS_AUTODEPLOY_REQUIRE_EVAL=1 as the flake check sets) they fail instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nixpkgs_lib import find_nixpkgs_lib, skip_or_fail

pytestmark = pytest.mark.tier("module evaluation")

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "module.nix"
HARNESS = REPO / "tests" / "nixos_harness"
NIX_INSTANTIATE = shutil.which("nix-instantiate")
NIXPKGS_LIB, _LIB_SOURCE = find_nixpkgs_lib()



def _nix_env():
    env = dict(os.environ)
    env.pop("NIX_PATH", None)
    # Never read or write the machine's /etc/nix or ~/.config/nix state.
    env.setdefault("NIX_CONFIG", "")
    return env


def _eval_reason():
    if NIX_INSTANTIATE is None:
        return "nix-instantiate not found (Debian: apt-get install nix-bin)"
    if NIXPKGS_LIB is None:
        return _LIB_SOURCE
    return None


_REASON = _eval_reason()


@pytest.fixture(scope="session")
def can_eval():
    if _REASON:
        skip_or_fail(_REASON)


def nix_eval(expr_file: Path, *args: str, check=True):
    res = subprocess.run(
        [NIX_INSTANTIATE, "--eval", "--strict", "--json", "--readonly-mode", str(expr_file), *args],
        capture_output=True, text=True, env=_nix_env())
    if check:
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)
    return res


def harness_eval(cases: dict[str, str], tmp: Path, channel: str = "26.11", check=True):
    """Evaluate {name: nix module expression} in one nix-instantiate call,
    with the option set of a channel ("26.11": unstable, "26.05": stable)."""
    cases_file = tmp / f"cases-{channel}.nix"
    cases_file.write_text("{\n" + "".join(
        f"  {json.dumps(name)} = {body};\n" for name, body in cases.items()) + "}\n")
    return nix_eval(HARNESS / "eval.nix", "--arg", "libPath", str(NIXPKGS_LIB),
                    "--arg", "modulePath", str(MODULE), "--arg", "cases", f"import {cases_file}",
                    "--argstr", "channel", channel, check=check)


# --------------------------------------------------------------------------
# nix-instantiate --parse on every .nix file

def _nix_files():
    return sorted(p for p in REPO.rglob("*.nix")
                  if ".git" not in p.relative_to(REPO).parts)


@pytest.mark.parametrize("path", _nix_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_nix_files_parse(path):
    if NIX_INSTANTIATE is None:
        skip_or_fail("nix-instantiate not found (Debian: apt-get install nix-bin)")
    res = subprocess.run([NIX_INSTANTIATE, "--parse", str(path)],
                         capture_output=True, text=True, env=_nix_env())
    assert res.returncode == 0, res.stderr


def test_expected_nix_files_exist():
    for name in ("module.nix", "flake.nix", "package.nix", "tests/vm-test.nix",
                 "tests/vm-test-machine.nix", "tests/module-check-host.nix"):
        assert (REPO / name).is_file(), name


# --------------------------------------------------------------------------
# reading unit files and command lines

def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file -> [(key, value)] in order; continuation lines
    (a trailing backslash) are joined like systemd does."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    lines = iter(text.split("\n"))
    for line in lines:
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines, "")
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), [])
            continue
        assert current is not None and "=" in line, f"stray line {line!r} in:\n{text}"
        key, _, value = line.partition("=")
        current.append((key, value))
    return sections


def values(text: str, section: str, key: str) -> list[str]:
    return [v for k, v in parse_unit(text).get(section, []) if k == key]


def value(text: str, section: str, key: str) -> str | None:
    found = values(text, section, key)
    assert len(found) <= 1, f"{key}= given {len(found)} times in [{section}]:\n{text}"
    return found[0] if found else None


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


def environment(text: str) -> dict[str, str]:
    """Environment= lines (JSON-quoted "NAME=value") of a service unit."""
    env = {}
    for v in values(text, "Service", "Environment"):
        name, _, val = json.loads(v).partition("=")
        env[name] = val
    return env


# --------------------------------------------------------------------------
# the configuration matrix: every case is evaluated in one call

def _store(name, text=""):
    return f"/nix/store/{hashlib.sha256((name + text).encode()).hexdigest()[:32]}-{name}"


PACKAGE = _store("nixos-autodeploy-0.1.0")
SYSTEMD = _store("systemd-256")
CURL = _store("curl-8.9.1")
JQ = _store("jq-1.7.1")
URL = "https://cache.example.org/pointers/web-1"
TEXTFILE_DIR = "/var/lib/prometheus-node-exporter-text"
PROM = f"{TEXTFILE_DIR}/nixos-autodeploy.prom"
KEY1, KEY2 = "ssh-ed25519 AAAAkey1 ci", "ssh-ed25519 AAAAkey2 ci2"
SVC, TIMER, TRIGGER, EXPORTER = ("nixos-autodeploy.service", "nixos-autodeploy.timer",
                                 "nixos-autodeploy-trigger.service",
                                 "prometheus-node-exporter.service")


def ad(body="", extra=""):
    """A configuration: system.autoDeploy enabled with URL plus `body`."""
    return ("{ pkgs, lib, ... }: { " + extra
            + f' system.autoDeploy = {{ enable = true; url = "{URL}"; {body} }}; }}')


def node(body, autodeploy=""):
    return ad(autodeploy, "services.prometheus.exporters.node = { " + body + " };")


README_TEXT = (REPO / "README.md").read_text()


def readme_quick_start():
    m = re.search(r"```nix\n# hosts/web-1\.nix\n(.*?)```", README_TEXT, re.S)
    assert m, "README: the quick start's hosts/web-1.nix block is missing"
    return m.group(1)


VM_MACHINE = REPO / "tests" / "vm-test-machine.nix"
VM_VARIANTS = ["next", "token", "signed", "boot-a", "boot-b"]

CASES = {
    "defaults": ad(),
    "every": ad(f'''
        interval = "*:0/5";
        randomizedDelay = "4min";
        switchMode = "boot";
        rebootMode = "kexec";
        rebootWindow = "23:30-04:00";
        prometheusFilePath = "/run/metrics/autodeploy.prom";
        stateDir = "/persist/autodeploy";
        timeout = 7;
        healthChecks = [ "systemctl is-active nginx.service" "curl -fsS 'http://localhost/a b'" ];
        healthTimeout = 33;
        path = [ pkgs.curl pkgs.jq ];
        environment = {{ https_proxy = "http://proxy:3128"; no_proxy = "localhost"; }};
        connectivityCheck = false;
        acceptManualRollback = true;
        trustedKeys = [ "{KEY1}" "{KEY2}" ];
        signatureUrl = "{URL}.signature";
        hostname = "web-1";
        tokenFile = "/run/keys/token";
        onSuccess = "echo ok";
        onFailure = "logger -t autodeploy failed";
        extraArgs = [ "--verbose" "--hook-timeout" "5" ];
    '''),
    "escaping": ("{ system.autoDeploy = { enable = true; "
                 f'url = "{URL}?a=%41&b=$HOME"; tokenFile = "/run/keys/token"; '
                 'onSuccess = "echo 100% $USER"; }; }'),
    "short-flags": ad('switchMode = "switch"; extraArgs = [ "-f" "-s" "boot" "-r" "kexec" ];'),
    # the original's spelling of kexec (clap ValueEnum: KExec -> k-exec), item 5
    "short-flags-k-exec": ad('extraArgs = [ "-r" "k-exec" ];'),
    "reboot-mode-reboot": ad('rebootMode = "reboot"; switchMode = "smart";'),
    "state-var-lib": ad('stateDir = "/var/lib/autodeploy-b";'),
    "token": ad('tokenFile = "/run/keys/token";'),
    # another credential added by the user, as a string and as a list (item 3)
    "token-user-cred-string": ad('tokenFile = "/run/keys/token"; bootAssessment.enable = true;',
                                 'systemd.services.nixos-autodeploy.serviceConfig.LoadCredential = "db:/run/keys/db"; '
                                 'systemd.services.nixos-autodeploy-boot-check.serviceConfig.LoadCredential = "db:/run/keys/db";'),
    "token-user-cred-list": ad('tokenFile = "/run/keys/token";',
                               'systemd.services.nixos-autodeploy.serviceConfig.LoadCredential = [ "db:/run/keys/db" ];'),
    "user-cred-no-token": ad('', 'systemd.services.nixos-autodeploy.serviceConfig.LoadCredential = "db:/run/keys/db";'),
    "keys": ad(f'trustedKeys = [ "{KEY1}" ];'),
    "keys-file": ad('trustedKeysFile = "/etc/autodeploy/allowed_signers";'),
    "keys-both": ad(f'trustedKeys = [ "{KEY1}" ]; trustedKeysFile = "/etc/autodeploy/allowed_signers";'),
    "json": ad('jsonField = "buildoutputs.out.path";'),
    "json-keys": ad(f'jsonField = "buildoutputs.out.path"; trustedKeys = [ "{KEY1}" ];'),
    "signature-without-keys": ad(f'signatureUrl = "{URL}.sig";'),
    "missing-url": "{ system.autoDeploy.enable = true; }",
    "empty-url": '{ system.autoDeploy = { enable = true; url = ""; }; }',
    "disabled": "{ }",
    "disabled-with-exporter": "{ services.prometheus.exporters.node.enable = true; }",
    # node exporter on/off x wiring unset/true/false
    "node-on-wire-unset": node("enable = true;"),
    "node-on-wire-true": node("enable = true;", "wireNodeExporter = true;"),
    "node-on-wire-false": node("enable = true;", "wireNodeExporter = false;"),
    "node-off-wire-unset": node("enable = false;"),
    "node-off-wire-true": node("enable = false;", "wireNodeExporter = true;"),
    "node-off-wire-false": node("enable = false;", "wireNodeExporter = false;"),
    # the exporter already has a textfile directory (several spellings)
    "node-has-dir": node('enable = true; extraFlags = [ "--collector.textfile.directory=/srv/prom" ];'),
    "node-has-dir-split": node('enable = true; extraFlags = [ "--web.max-requests=5" '
                               '"--collector.textfile.directory" "/srv/prom" ];'),
    "node-has-dir-space": node('enable = true; extraFlags = [ "--collector.textfile.directory /srv/prom" ];'),
    # a function-form definition (legal: exporters is a submodule) the module cannot look into
    "node-fn-form": ad("", 'services.prometheus.exporters = { ... }: { node = { enable = true; '
                           'enabledCollectors = [ "textfile" "systemd" ]; }; };'),
    "env-percent": ad('environment = { https_proxy = "http://u:p%40ss@proxy:3128"; };'),
    "node-has-dir-mkif": node('enable = true; extraFlags = lib.mkIf true '
                              '(lib.mkBefore [ "--collector.textfile.directory=/srv/prom" ]);'),
    # a profile's lists given with mkDefault (or below a mkDefault node): they stay, ours join them
    "node-has-dir-mkdefault": node('enable = true; extraFlags = lib.mkDefault [ "--collector.textfile.directory=/srv/prom" ]; '
                                   'enabledCollectors = lib.mkDefault [ "systemd" ];'),
    "node-mkdefault-node": ad("", 'services.prometheus.exporters.node = lib.mkDefault { enable = true; '
                                  'extraFlags = [ "--collector.textfile.directory=/srv/prom" ]; '
                                  'enabledCollectors = [ "systemd" ]; };'),
    # ... also where the agent is off: importing the module must not remove the exporter
    "disabled-mkdefault-node": ('{ lib, ... }: { services.prometheus.exporters.node = lib.mkDefault '
                                '{ enable = true; enabledCollectors = [ "systemd" ]; }; }'),
    # flags forced by the host: they win, and a warning says ours is not passed
    "node-has-dir-forced": node('enable = true; extraFlags = lib.mkForce [ "--collector.textfile.directory=/srv/prom" ];'),
    "node-has-dir-conflict": node('enable = true; extraFlags = [ "--collector.textfile.directory=/srv/prom" ];',
                                  'textfileDirectory = "/srv/other";'),
    "node-custom-dir": node("enable = true;", 'textfileDirectory = "/srv/metrics";'),
    "node-has-our-dir": node(f'enable = true; extraFlags = [ "--collector.textfile.directory={TEXTFILE_DIR}" ];'),
    # ... spelled with a trailing slash: still the same directory
    "node-has-our-dir-slash": node(f'enable = true; extraFlags = [ "--collector.textfile.directory={TEXTFILE_DIR}/" ];'),
    # the NixOS manual's exporter example (services/monitoring/prometheus), as is
    "node-manual-example": node('enable = true; port = 9100; enabledCollectors = [ "logind" "systemd" ]; '
                                'disabledCollectors = [ "textfile" ]; openFirewall = true; '
                                'firewallFilter = "-i br0 -p tcp -m tcp --dport 9100";'),
    "node-manual-example-wire": node('enable = true; disabledCollectors = [ "textfile" ];',
                                     "wireNodeExporter = true;"),
    "node-fn-form-dir": ad("", 'services.prometheus.exporters = { ... }: { node = { enable = true; '
                               f'extraFlags = [ "--collector.textfile.directory={TEXTFILE_DIR}" ]; }}; }};'),
    "node-prom-elsewhere": node("enable = true;", 'prometheusFilePath = "/tmp/elsewhere.prom";'),
    "node-textfile-listed": node('enable = true; enabledCollectors = [ "systemd" "textfile" ];'),
    "node-textfile-disabled": node('enable = true; disabledCollectors = [ "textfile" ];'),
    # the boot assessment (issue #13): its check unit shares path and token
    "boot-assessment": ad('''bootAssessment.enable = true; tokenFile = "/run/keys/token";
        healthChecks = [ "curl -fsS http://localhost/" ]; path = [ pkgs.curl ];'''),
    "boot-assessment-elsewhere": ad('''bootAssessment.enable = true; connectivityCheck = false;
        stateDir = "/persist/autodeploy"; tokenFile = "/run/secrets/token";'''),
    # where the boot loader's files are (item 8): $BOOT from the boot loader options
    "esp-boot": ad("", "boot.loader.systemd-boot.enable = true;"),
    "esp-boot-efi": ad("", 'boot.loader.systemd-boot.enable = true; boot.loader.efi.efiSysMountPoint = "/boot/efi";'),
    "esp-efi": ad("", 'boot.loader.systemd-boot.enable = true; boot.loader.efi.efiSysMountPoint = "/efi";'),
    "esp-xbootldr": ad("", 'boot.loader.systemd-boot = { enable = true; xbootldrMountPoint = "/boot"; }; '
                           'boot.loader.efi.efiSysMountPoint = "/efi";'),
    "esp-override": ad('bootDir = "/mnt/esp";', "boot.loader.systemd-boot.enable = true;"),
    "grub-efi": ad("", 'boot.loader.grub.efiSupport = true; boot.loader.efi.efiSysMountPoint = "/boot/efi";'),
    # fleet rollouts (issue #14): FleetLock reboot slots
    "fleetlock": ad('''switchMode = "boot"; rebootMode = "reboot"; fleetlock.url = "http://fleetlock.example.org:8080";
        fleetlock.group = "workers"; extraArgs = [ "--verbose" ];'''),
    "fleetlock-off": ad('fleetlock.group = "workers";'),
    # the README quick start, the flake's module-nixos host, the VM test's nodes
    "readme-quick-start": readme_quick_start(),
    "flake-check-host": str(REPO / "tests" / "module-check-host.nix"),
    "vm-machine": f"(import {VM_MACHINE} {{ }}).base",
    **{f"vm-{v}": (f"let m = import {VM_MACHINE} {{ }}; in {{ imports = [ m.base ]; "
                   f'system.autoDeploy = m.variants."{v}".autoDeploy; }}')
       for v in VM_VARIANTS},
}


@pytest.fixture(scope="session")
def matrix(can_eval, tmp_path_factory):
    return harness_eval(CASES, tmp_path_factory.mktemp("matrix"))


# Where the channels differ (boot.loader.systemd-boot.bootCounting, 26.11 only):
# these cases on both option sets, and the one only 26.11 can evaluate.
CHANNEL_CASES = {name: CASES[name] for name in (
    "defaults", "boot-assessment", "boot-assessment-elsewhere", "esp-boot-efi", "readme-quick-start",
    "flake-check-host", "vm-machine")}
COUNTING_CASE = ad("bootAssessment.enable = true;",
                   "boot.loader.systemd-boot = { enable = true; bootCounting.enable = true; };")


@pytest.fixture(scope="session")
def channels(can_eval, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("channels")
    return {
        "26.11": harness_eval({**CHANNEL_CASES, "counting": COUNTING_CASE}, tmp, "26.11"),
        "26.05": harness_eval(CHANNEL_CASES, tmp, "26.05"),
        "26.05-counting": harness_eval({"counting": COUNTING_CASE}, tmp, "26.05", check=False),
    }


def svc(r):
    return r["units"][SVC]


def argv_of(r):
    return parse_exec(value(svc(r), "Service", "ExecStart"))


def ok(r):
    assert r["failedAssertions"] == [], r["failedAssertions"]
    return r


# --------------------------------------------------------------------------
# the harness has nixpkgs' structure: the released module's bug reproduces

RECURSION_MODULE = """\
{ config, lib, ... }:
let wire = config.services.prometheus.exporters.node.enable; in
{
  config = lib.mkIf wire {
    services.prometheus.exporters.node.extraFlags = [ "--collector.textfile.directory=/x" ];
  };
}
"""


def test_harness_reproduces_the_exporter_recursion(can_eval, tmp_path):
    """A mkIf around services.prometheus.exporters.node whose condition reads
    the exporter is discharged at the exporters option and recurses in
    nixpkgs; a harness declaring `node.*` as plain options would not notice."""
    bad = tmp_path / "bad.nix"
    bad.write_text(RECURSION_MODULE)
    res = nix_eval(HARNESS / "eval.nix", "--arg", "libPath", str(NIXPKGS_LIB),
                   "--arg", "modulePath", str(bad),
                   "--arg", "cases", "{ x = { services.prometheus.exporters.node.enable = true; }; }",
                   "--arg", "select", '[ "node" ]', check=False)
    assert res.returncode != 0
    assert "infinite recursion" in res.stderr


def test_harness_unit_option_merge(can_eval, tmp_path):
    """systemd unit options: lists concatenate, equal scalars merge,
    different scalars conflict (nixpkgs' unitOption)."""
    cases = {
        "lists": ('{ systemd.services.x.serviceConfig.ExecStartPre = [ "a" ]; }',
                  '{ systemd.services.x.serviceConfig.ExecStartPre = [ "b" ]; }'),
        # nixpkgs #290946: one list definition lifts the strings into the list
        "lifted": ('{ systemd.services.x.serviceConfig.LoadCredential = "a:/a"; }',
                   '{ systemd.services.x.serviceConfig.LoadCredential = [ "b:/b" ]; }'),
        "equal": ('{ systemd.services.x.serviceConfig.Type = "oneshot"; }',
                  '{ systemd.services.x.serviceConfig.Type = "oneshot"; }'),
    }
    mods = {k: "{ imports = [ " + " ".join(f"({m})" for m in v) + " ]; }" for k, v in cases.items()}
    f = tmp_path / "merge.nix"
    f.write_text(textwrap.dedent(f"""\
        let
          lib = import {NIXPKGS_LIB};
          h = import {HARNESS}/default.nix {{ inherit lib; }};
          unit = m: (lib.evalModules {{ modules = h.modules ++ [ m ]; }}).config.systemd.units."x.service".text;
        in {{ {" ".join(f'{k} = unit ({m});' for k, m in mods.items())} }}
        """))
    r = nix_eval(f)
    assert values(r["lists"], "Service", "ExecStartPre") == ["a", "b"]
    assert sorted(values(r["lifted"], "Service", "LoadCredential")) == ["a:/a", "b:/b"]
    assert value(r["equal"], "Service", "Type") == "oneshot"
    conflict = tmp_path / "conflict.nix"
    conflict.write_text(textwrap.dedent(f"""\
        let
          lib = import {NIXPKGS_LIB};
          h = import {HARNESS}/default.nix {{ inherit lib; }};
        in (lib.evalModules {{ modules = h.modules ++ [
          {{ systemd.services.x.serviceConfig.Type = "oneshot"; }}
          {{ systemd.services.x.serviceConfig.Type = "simple"; }}
        ]; }}).config.systemd.units."x.service".text
        """))
    res = nix_eval(conflict, check=False)
    assert res.returncode != 0 and "conflicting definition values" in res.stderr, res.stderr


# --------------------------------------------------------------------------
# the service's command line

def test_defaults(matrix):
    r = ok(matrix["defaults"])
    argv = argv_of(r)
    assert argv[:2] == [f"{PACKAGE}/bin/nixos-autodeploy", "--once"]
    assert flag_values(argv, "--url") == [URL]
    assert flag_values(argv, "--switch-mode") == ["switch"]
    assert flag_values(argv, "--timeout") == ["30"]
    assert flag_values(argv, "--health-timeout") == ["120"]
    for flag in ("--reboot-mode", "--reboot-window", "--prometheus-path", "--state-dir",
                 "--health-check", "--no-connectivity-check", "--trusted-keys",
                 "--signature-url", "--hostname", "--token-file", "--json-field",
                 "--on-success", "--on-failure", "--boot-dir", "--accept-manual-rollback"):
        assert flag not in argv, flag
    assert "null" not in argv
    assert r["systemPackages"] == [PACKAGE]
    assert r["warnings"] == []


def test_every_option_reaches_the_agent(matrix):
    r = ok(matrix["every"])
    argv = argv_of(r)
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
        "--trusted-keys": [_store("nixos-autodeploy-trusted-keys", f"{KEY1}\n{KEY2}\n")],
    }
    for flag, vals in expect.items():
        assert flag_values(argv, flag) == vals, flag
    assert "--no-connectivity-check" in argv
    assert argv.count("--accept-manual-rollback") == 1
    # extraArgs come last, only followed by the credential path
    assert argv[-5:] == ["--verbose", "--hook-timeout", "5", "--token-file", "%d/token"]
    text = svc(r)
    assert value(text, "Service", "LoadCredential") == "token:/run/keys/token"
    assert "/run/keys/token\"" not in value(text, "Service", "ExecStart")
    # stateDir outside /var/lib: no StateDirectory=, a tmpfiles rule instead
    assert value(text, "Service", "StateDirectory") is None
    assert "d /persist/autodeploy 0700 root root - -" in r["tmpfiles"]
    # path and environment
    env = environment(text)
    path = env["PATH"].split(":")
    assert path[:2] == [f"{CURL}/bin", f"{JQ}/bin"], path  # the operator's first
    assert f"{SYSTEMD}/bin" in path and f"{CURL}/sbin" in path
    assert env["https_proxy"] == "http://proxy:3128" and env["no_proxy"] == "localhost"
    timer = r["units"][TIMER]
    assert value(timer, "Timer", "OnCalendar") == "*:0/5"
    assert value(timer, "Timer", "RandomizedDelaySec") == "4min"


def test_token_specifier_is_raw_and_user_percent_is_escaped(matrix):
    line = value(svc(matrix["escaping"]), "Service", "ExecStart")
    # user text: %/$ doubled inside a JSON-quoted word -> no specifier expansion
    assert '"https://cache.example.org/pointers/web-1?a=%%41&b=$$HOME"' in line
    assert '"echo 100%% $$USER"' in line
    # our own specifier: unquoted and single
    assert line.endswith(" --token-file %d/token")
    assert flag_values(parse_exec(line), "--url") == [URL + "?a=%41&b=$HOME"]


def test_original_short_flags_reach_the_agent_last(matrix):
    """hlsb-fulda/nixos-autodeploy users pass -f, -s MODE, -r MODE in
    extraArgs; they come after the module's own flags, so they win."""
    argv = argv_of(ok(matrix["short-flags"]))
    assert argv[-5:] == ["-f", "-s", "boot", "-r", "kexec"]
    assert argv.index("--switch-mode") < argv.index("-s")


def test_reboot_mode_and_state_dir_below_var_lib(matrix):
    argv = argv_of(ok(matrix["reboot-mode-reboot"]))
    assert flag_values(argv, "--reboot-mode") == ["reboot"]
    assert flag_values(argv, "--switch-mode") == ["smart"]
    r = ok(matrix["state-var-lib"])
    assert value(svc(r), "Service", "StateDirectory") == "autodeploy-b"
    assert value(svc(r), "Service", "StateDirectoryMode") == "0700"
    assert flag_values(argv_of(r), "--state-dir") == ["/var/lib/autodeploy-b"]
    assert not any("autodeploy-b" in rule for rule in r["tmpfiles"])


def test_token_file_is_a_credential(matrix):
    text = svc(ok(matrix["token"]))
    assert value(text, "Service", "LoadCredential") == "token:/run/keys/token"
    assert flag_values(argv_of(matrix["token"]), "--token-file") == ["%d/token"]
    assert value(svc(matrix["defaults"]), "Service", "LoadCredential") is None


def test_load_credential_is_a_list_users_can_add_to(matrix):
    """Item 3: LoadCredential= as a list, so that a user's own credential, as
    a string or a list, merges instead of "conflicting definition values"."""
    for case in ("token-user-cred-string", "token-user-cred-list"):
        text = svc(ok(matrix[case]))
        assert sorted(values(text, "Service", "LoadCredential")) == [
            "db:/run/keys/db", "token:/run/keys/token"], case
    check = ok(matrix["token-user-cred-string"])["units"]["nixos-autodeploy-boot-check.service"]
    assert sorted(values(check, "Service", "LoadCredential")) == ["db:/run/keys/db", "token:/run/keys/token"]
    assert values(svc(ok(matrix["user-cred-no-token"])), "Service", "LoadCredential") == ["db:/run/keys/db"]


def test_trusted_keys(matrix):
    assert flag_values(argv_of(ok(matrix["keys"])), "--trusted-keys") == [
        _store("nixos-autodeploy-trusted-keys", KEY1 + "\n")]
    assert flag_values(argv_of(ok(matrix["keys-file"])), "--trusted-keys") == [
        "/etc/autodeploy/allowed_signers"]
    assert any("mutually exclusive" in m for m in matrix["keys-both"]["failedAssertions"])
    assert flag_values(argv_of(ok(matrix["json"])), "--json-field") == ["buildoutputs.out.path"]
    assert any("jsonField cannot be combined" in m for m in matrix["json-keys"]["failedAssertions"])
    assert any("signatureUrl is set but no trusted keys" in w
               for w in matrix["signature-without-keys"]["warnings"])


def test_missing_url_fails_the_assertion(matrix):
    for case in ("missing-url", "empty-url"):
        assert any("system.autoDeploy.url must be set" in m
                   for m in matrix[case]["failedAssertions"]), case


def test_disabled_module_defines_nothing(matrix):
    for case in ("disabled", "disabled-with-exporter"):
        r = matrix[case]
        assert not any(n.startswith("nixos-autodeploy") for n in r["units"]), case
        assert r["activation"]["snippet"] is None
        assert r["tmpfiles"] == [] and r["failedAssertions"] == []
    # the exporter is left alone when the agent is off
    r = matrix["disabled-with-exporter"]
    assert r["node"]["extraFlags"] == [] and r["node"]["enabledCollectors"] == []
    assert "--collector.textfile" not in r["units"][EXPORTER]


# --------------------------------------------------------------------------
# units

def test_service_unit(matrix):
    r = ok(matrix["defaults"])
    sections = parse_unit(svc(r))
    unit, service = dict(sections["Unit"]), dict(sections["Service"])
    assert unit["After"] == "network-online.target" and unit["Wants"] == "network-online.target"
    assert unit["X-StopOnRemoval"] == "false"
    assert service["Type"] == "oneshot"
    assert service["X-RestartIfChanged"] == "false"
    assert "Restart" not in service
    assert service["StateDirectory"] == "nixos-autodeploy" and service["StateDirectoryMode"] == "0700"
    # the host-wide lock lives here: root-owned 0755, kept when the unit stops
    assert service["RuntimeDirectory"] == "nixos-autodeploy"
    assert service["RuntimeDirectoryMode"] == "0755"
    assert service["RuntimeDirectoryPreserve"] == "yes"
    assert "d /run/nixos-autodeploy 0755 root root - -" in r["tmpfiles"]
    assert "Install" not in sections  # the timer starts it
    # NixOS' default service PATH, nothing else unless `path` says so
    assert environment(svc(r))["PATH"].split(":")[0].endswith("-coreutils-9.5/bin")
    assert CURL not in svc(r)


def test_timer_unit(matrix):
    t = matrix["defaults"]["units"][TIMER]
    # the original's default: swapping the flake input keeps the schedule
    assert value(t, "Timer", "OnCalendar") == "04:42"
    assert value(t, "Timer", "RandomizedDelaySec") == "0"
    assert value(t, "Timer", "FixedRandomDelay") == "true"
    assert value(t, "Timer", "Persistent") == "true"
    assert value(t, "Timer", "OnBootSec") == "2min"
    assert value(t, "Timer", "Unit") == SVC
    assert value(t, "Install", "WantedBy") == "timers.target"


# --------------------------------------------------------------------------
# node exporter wiring

def exporter_flags(r):
    """The exporter's argv (its ExecStart is a shell-style line)."""
    return value(r["units"][EXPORTER], "Service", "ExecStart").split()


@pytest.mark.parametrize("case,wired", [
    ("node-on-wire-unset", True), ("node-on-wire-true", True), ("node-on-wire-false", False),
    ("node-off-wire-unset", False), ("node-off-wire-true", True), ("node-off-wire-false", False),
])
def test_node_exporter_matrix(matrix, case, wired):
    r = ok(matrix[case])
    argv = argv_of(r)
    exporter_on = case.startswith("node-on")
    assert (EXPORTER in r["units"]) == exporter_on
    if wired:
        assert r["autoDeploy"]["prometheusFilePath"] == PROM
        assert flag_values(argv, "--prometheus-path") == [PROM]
        assert r["node"]["extraFlags"] == [f"--collector.textfile.directory={TEXTFILE_DIR}"]
        assert r["node"]["enabledCollectors"] == ["textfile"]
        assert f"d {TEXTFILE_DIR} 0755 root root - -" in r["tmpfiles"]
    else:
        assert r["autoDeploy"]["prometheusFilePath"] is None
        assert "--prometheus-path" not in argv
        assert r["node"]["extraFlags"] == [] and r["node"]["enabledCollectors"] == []
        assert not any(TEXTFILE_DIR in rule for rule in r["tmpfiles"])
    if exporter_on:
        flags = exporter_flags(r)
        dirs = [f for f in flags if f.startswith("--collector.textfile.directory")]
        assert dirs == ([f"--collector.textfile.directory={TEXTFILE_DIR}"] if wired else [])
        assert flags.count("--collector.textfile") == (1 if wired else 0)
    assert r["warnings"] == []


@pytest.mark.parametrize("case", ["node-has-dir", "node-has-dir-split", "node-has-dir-mkif", "node-has-dir-space"])
def test_an_existing_textfile_directory_is_kept_and_ours_added(matrix, case):
    """Item 4: node_exporter >= 1.9 reads several textfile directories
    (collector/textfile.go, `.Strings()`, node_exporter#3135): the host's stays
    as it is, the agent's own is added next to it."""
    r = ok(matrix[case])
    assert r["autoDeploy"]["textfileDirectory"] == TEXTFILE_DIR
    assert r["autoDeploy"]["prometheusFilePath"] == PROM
    assert flag_values(argv_of(r), "--prometheus-path") == [PROM]
    flags = " ".join(exporter_flags(r))
    assert flags.count("--collector.textfile.directory") == 2, flags
    assert f"--collector.textfile.directory={TEXTFILE_DIR}" in flags and "/srv/prom" in flags
    assert exporter_flags(r).count("--collector.textfile") == 1
    # ours is created, the owner's directory is left as it is
    assert f"d {TEXTFILE_DIR} 0755 root root - -" in r["tmpfiles"]
    assert not any("/srv/prom" in rule for rule in r["tmpfiles"])
    assert r["warnings"] == []


@pytest.mark.parametrize("case", ["node-has-dir-mkdefault", "node-mkdefault-node"])
def test_the_hosts_mkdefault_flags_and_collectors_are_kept(matrix, case):
    """A shared profile sets the exporter's lists with mkDefault: a plain
    definition of ours would win over it and drop the host's directory and
    collectors (the module system keeps only the strongest definitions of a
    list); ours joins them at their priority instead."""
    r = ok(matrix[case])
    flags = exporter_flags(r)
    assert "--collector.textfile.directory=/srv/prom" in flags, flags
    assert f"--collector.textfile.directory={TEXTFILE_DIR}" in flags, flags
    assert "--collector.systemd" in flags and flags.count("--collector.textfile") == 1, flags
    assert r["warnings"] == []
    r = ok(matrix["disabled-mkdefault-node"])
    assert "--collector.systemd" in exporter_flags(r), r["units"].keys()


def test_forced_exporter_flags_win_and_warn(matrix):
    r = ok(matrix["node-has-dir-forced"])
    flags = exporter_flags(r)
    assert [f for f in flags if f.startswith("--collector.textfile.directory")] == [
        "--collector.textfile.directory=/srv/prom"], flags
    assert any("does not pass" in w and TEXTFILE_DIR in w for w in r["warnings"]), r["warnings"]


def test_our_directory_already_passed_is_not_passed_twice(matrix):
    r = ok(matrix["node-has-our-dir"])
    flags = " ".join(exporter_flags(r))
    assert flags.count(f"--collector.textfile.directory={TEXTFILE_DIR}") == 1, flags
    assert r["warnings"] == []
    # node_exporter would read /dir/ and /dir both: every metric twice, failed scrapes
    r = ok(matrix["node-has-our-dir-slash"])
    flags = " ".join(exporter_flags(r))
    assert flags.count("--collector.textfile.directory") == 1, flags
    assert r["warnings"] == []


def test_textfile_directory_custom_and_next_to_the_hosts(matrix):
    r = ok(matrix["node-has-dir-conflict"])  # the released module refused this
    flags = exporter_flags(r)
    assert "--collector.textfile.directory=/srv/prom" in flags
    assert "--collector.textfile.directory=/srv/other" in flags
    assert flag_values(argv_of(r), "--prometheus-path") == ["/srv/other/nixos-autodeploy.prom"]
    assert r["warnings"] == []
    r = ok(matrix["node-custom-dir"])
    assert r["node"]["extraFlags"] == ["--collector.textfile.directory=/srv/metrics"]
    assert "d /srv/metrics 0755 root root - -" in r["tmpfiles"]
    assert flag_values(argv_of(r), "--prometheus-path") == ["/srv/metrics/nixos-autodeploy.prom"]
    assert any("not in system.autoDeploy.textfileDirectory" in w
               for w in matrix["node-prom-elsewhere"]["warnings"])


def test_textfile_collector_not_repeated(matrix):
    r = ok(matrix["node-textfile-listed"])
    assert r["node"]["enabledCollectors"] == ["systemd", "textfile"]
    assert exporter_flags(r).count("--collector.textfile") == 1


@pytest.mark.parametrize("case", ["node-textfile-disabled", "node-manual-example", "node-manual-example-wire"])
def test_a_disabled_textfile_collector_evaluates_and_warns(matrix, case):
    """Item 4: the NixOS manual's exporter example disables the textfile
    collector; switching to this module must not break its evaluation: nothing
    is wired (no collector, no directory flag), a warning explains why."""
    r = ok(matrix[case])
    flags = exporter_flags(r)
    assert "--no-collector.textfile" in flags and "--collector.textfile" not in flags
    assert not any(f.startswith("--collector.textfile.directory") for f in flags)
    assert r["node"]["extraFlags"] == []
    assert not any(TEXTFILE_DIR in rule for rule in r["tmpfiles"])
    assert [w for w in r["warnings"] if "disables the textfile collector" in w], r["warnings"]


def test_a_repeated_collector_is_a_warning_not_an_evaluation_error(matrix):
    """A definition the module cannot read (a function) can still end up with
    `--collector.textfile` twice: explained with advice, the evaluation goes on."""
    r = ok(matrix["node-fn-form"])
    assert any("lists a collector more than once" in w and "wireNodeExporter = false" in w
               for w in r["warnings"]), r["warnings"]
    r = ok(matrix["node-fn-form-dir"])
    assert any("textfile directory more than once" in w for w in r["warnings"]), r["warnings"]


# --------------------------------------------------------------------------
# the README quick start, the flake's checks and the VM test's nodes

def test_readme_quick_start(matrix):
    r = ok(matrix["readme-quick-start"])
    argv = argv_of(r)
    assert flag_values(argv, "--url") == [URL]
    checks = flag_values(argv, "--health-check")
    assert checks, "the quick start shows a health check"
    # whatever the health checks call besides the default PATH is on `path`
    if any(c.startswith("curl") for c in checks):
        assert environment(svc(r))["PATH"].startswith(f"{CURL}/bin:")
    assert value(r["units"][TIMER], "Timer", "OnCalendar") == "*:0/5"


def test_flake_check_host(matrix):
    """The configuration of flake.nix's module-nixos check, with the unit
    lines that check greps for."""
    r = ok(matrix["flake-check-host"])
    text, timer = svc(r), r["units"][TIMER]
    argv = argv_of(r)
    assert flag_values(argv, "--switch-mode") == ["smart"]
    assert flag_values(argv, "--reboot-mode") == ["kexec"]
    assert flag_values(argv, "--reboot-window") == ["02:00-05:00"]
    assert flag_values(argv, "--hostname") == ["web-1"]
    assert flag_values(argv, "--prometheus-path") == [PROM]
    assert "--no-connectivity-check" in argv
    assert flag_values(argv, "--trusted-keys")[0].startswith("/nix/store/")
    assert value(text, "Service", "LoadCredential") == "token:/run/keys/nixos-autodeploy-token"
    assert environment(text)["PATH"].startswith(f"{CURL}/bin:")
    assert value(timer, "Timer", "OnCalendar") == "*:0/5"
    assert f"--collector.textfile.directory={TEXTFILE_DIR}" in exporter_flags(r)
    flake = (REPO / "flake.nix").read_text()
    # every line the flake check greps for is in the rendered units
    for want in re.findall(r"'([^']*)'", flake.split("module-nixos", 1)[1].split("vm-test", 1)[0]):
        if "[" not in want and want.startswith((
                "--", "\"", "LoadCredential", "Type", "X-", "OnCalendar", "FixedRandom",
                "Persistent", "OnBootSec", " --token", "Runtime")):
            assert want in text or want in timer or want in r["units"][EXPORTER], want


def test_vm_test_nodes(matrix):
    base = ok(matrix["vm-machine"])
    argv = argv_of(base)
    assert flag_values(argv, "--url") == ["http://cache/pointer"]
    assert flag_values(argv, "--prometheus-path") == [PROM]
    assert flag_values(argv, "--health-check") == [
        "test -e /etc/autodeploy-test", "curl -fsS -o /dev/null http://cache/"]
    assert environment(svc(base))["PATH"].startswith(f"{CURL}/bin:")
    assert value(svc(base), "Unit", "StartLimitIntervalSec") == "0"
    assert base["unitsWantedBy"][TIMER] == []
    assert "Install" not in parse_unit(base["units"][TIMER])
    token = ok(matrix["vm-token"])
    assert value(svc(token), "Service", "LoadCredential") == "token:/run/keys/autodeploy-token"
    assert flag_values(argv_of(token), "--url") == ["http://cache/private/pointer"]
    signed = argv_of(ok(matrix["vm-signed"]))
    assert flag_values(signed, "--url") == ["http://cache/signed/pointer"]
    assert len(flag_values(signed, "--trusted-keys")) == 1
    for v in ("vm-boot-a", "vm-boot-b"):
        a = argv_of(ok(matrix[v]))
        assert flag_values(a, "--switch-mode") == ["boot"]
        assert flag_values(a, "--reboot-mode") == ["reboot"]
    assert flag_values(argv_of(ok(matrix["vm-next"])), "--switch-mode") == ["switch"]


# --------------------------------------------------------------------------
# each typed option given a bad value: a type error naming the option

BAD_VALUES = [
    ("enable", '"yes"'),
    ("url", "42"),
    ("interval", "5"),
    ("randomizedDelay", "5"),
    ("switchMode", '"reboot"'),
    ("rebootMode", '"poweroff"'),
    ("rebootWindow", '"25:00-03:00"'),
    ("wireNodeExporter", '"yes"'),
    ("textfileDirectory", '"relative/dir"'),
    ("prometheusFilePath", '"relative.prom"'),
    ("stateDir", '"/"'),
    ("stateDir", '"/var/lib"'),
    ("stateDir", '"/var/lib/"'),
    ("stateDir", '"/var/lib/nixos-autodeploy/"'),
    ("stateDir", '"/var/lib/auto deploy"'),
    ("stateDir", '"var/lib/autodeploy"'),
    ("stateDir", '"/var/lib/../etc"'),
    ("stateDir", "/tmp/state-as-a-nix-path"),
    ("timeout", "0"),
    ("healthChecks", '"true"'),
    ("healthTimeout", "-1"),
    ("path", '[ "curl" ]'),
    ("environment", "{ A = 1; }"),
    ("connectivityCheck", '"no"'),
    ("acceptManualRollback", '"yes"'),
    ("trustedKeys", f'"{KEY1}"'),
    ("trustedKeysFile", "5"),
    ("signatureUrl", "5"),
    ("hostname", "5"),
    ("tokenFile", '"relative/token"'),
    ("tokenFile", "./token-as-a-nix-path"),
    ("jsonField", "5"),
    ("onSuccess", "5"),
    ("onFailure", "[ ]"),
    ("extraArgs", '"-f"'),
    ("package", '"nixos-autodeploy"'),
    ("bootAssessment.enable", '"yes"'),
    ("fleetlock.url", '"fleetlock.example.org"'),
    ("fleetlock.group", '"two words"'),
    ("bootDir", '"boot/efi"'),
]


@pytest.fixture(scope="session")
def bad_results(can_eval, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")

    def run(item):
        i, (opt, val) = item
        cases = tmp / f"case{i}.nix"
        cases.write_text(
            f"let lib = import {NIXPKGS_LIB}; in {{ x = {{ imports = [ "
            f'{{ system.autoDeploy = {{ enable = true; url = "{URL}"; }}; }} ]; '
            f"system.autoDeploy.{opt} = lib.mkForce ({val}); }}; }}\n")
        return nix_eval(HARNESS / "eval.nix", "--arg", "libPath", str(NIXPKGS_LIB),
                        "--arg", "cases", f"import {cases}", "--arg", "select", '[ "units" "settings" ]',
                        check=False)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(run, enumerate(BAD_VALUES)))


@pytest.mark.parametrize("index", range(len(BAD_VALUES)),
                         ids=[f"{o}={v}" for o, v in BAD_VALUES])
def test_bad_value_is_a_type_error(bad_results, index):
    opt, _ = BAD_VALUES[index]
    res = bad_results[index]
    assert res.returncode != 0, f"system.autoDeploy.{opt} accepted a bad value"
    assert f"system.autoDeploy.{opt}" in res.stderr, res.stderr
    assert "is not of type" in res.stderr, res.stderr


# --------------------------------------------------------------------------
# the manual-activation trigger (item 2): started by sysinit-reactivation.target,
# which switch-to-configuration restarts on every switch/test; no activation
# script snippet, no /run/nixos/activation-restart-list

def _run_trigger(tmp_path, script, marker=None, activating=True):
    """The trigger's script under bash, with /run/nixos-autodeploy redirected
    and a `systemctl` that records what it starts and answers `is-active`
    for the agent's transient activation unit (`activating`)."""
    run = tmp_path / "rt"
    shutil.rmtree(run, ignore_errors=True)
    (run / "nixos-autodeploy").mkdir(parents=True)
    (run / "bin").mkdir()
    calls = run / "calls"
    (run / "bin" / "systemctl").write_text(
        '#!/bin/sh\ncase "$*" in *is-active*nixos-autodeploy-activation.service) '
        f'exit {0 if activating else 3};; esac\necho "$*" >> {calls}\n')
    (run / "bin" / "systemctl").chmod(0o755)
    text = script.replace("/run/nixos-autodeploy/", f"{run}/nixos-autodeploy/")
    assert "/run/" not in text.replace(str(run), ""), text  # never the machine's /run
    if marker is not None:
        (run / "nixos-autodeploy" / "activating").write_text(marker)
    env = {"PATH": f"{run / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    res = subprocess.run(["bash", "-e", "-c", text], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return calls.read_text() if calls.exists() else ""


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_manual_switch_trigger(matrix, tmp_path):
    r = ok(matrix["defaults"])
    # no deprecated hook: nothing in the activation script at all
    assert r["activation"]["snippet"] is None
    assert "activation-restart-list" not in r["activation"]["script"]
    assert "nixos-autodeploy" not in r["activation"]["script"]
    unit = r["units"][TRIGGER]
    # wanted (not required: a failing trigger never fails a switch) by the
    # target every switch/test restarts, and ordered before it
    assert r["unitsWantedBy"][TRIGGER] == ["sysinit-reactivation.target"]
    assert r["unitsRequiredBy"][TRIGGER] == []
    assert value(unit, "Unit", "Before") == "sysinit-reactivation.target"
    assert value(unit, "Service", "Type") == "oneshot"
    assert value(unit, "Service", "X-RestartIfChanged") == "false"
    assert value(unit, "Service", "ExecStart").endswith("/bin/nixos-autodeploy-trigger-start ")
    assert f"{SYSTEMD}/bin" in environment(unit)["PATH"].split(":")  # systemctl
    script = r["triggerScript"]
    start = f"start --no-block {SVC}\n"
    # a manual switch: the agent's unit is started without waiting for it
    assert _run_trigger(tmp_path, script) == start
    # our own activation: the marker holds the PID of a live agent
    assert _run_trigger(tmp_path, script, f"{os.getpid()}\n") == ""
    # a stale marker (dead PID) or garbage does not silence the trigger
    for marker in ("4194305\n", "not-a-pid", ""):
        assert _run_trigger(tmp_path, script, marker) == start, marker
    # nor does a stale marker whose PID was reused (a live process, but no
    # activation of the agent runs: the agent was killed with SIGKILL)
    assert _run_trigger(tmp_path, script, f"{os.getpid()}\n", activating=False) == start
    # the disabled module defines neither the unit nor a hook
    assert TRIGGER not in matrix["disabled"]["units"]


# --------------------------------------------------------------------------
# flake: nixosModules in a form every `nix flake check` accepts

FLAKE_EVAL = """\
let
  lib = import @LIB@;
  flake = import @REPO@/flake.nix;
  self = flake.outputs { inherit self; nixpkgs = { inherit lib; legacyPackages = { }; }; };
  # Nix 2.8's checkModule (src/nix/flake.cc): a function must take an open
  # attribute set, an attribute set has every attribute forced; anything else
  # (a path, too) is "module must be a function or an attribute set".
  check = name: m:
    let t = builtins.typeOf m; in
    if t == "lambda" then
      (let a = builtins.functionArgs m; in
        if a == { } then throw "${name}: module must match an open attribute set" else "lambda")
    else if t == "set" then builtins.deepSeq (lib.mapAttrs (_: v: builtins.seq v null) m) "set"
    else throw "${name}: module must be a function or an attribute set, not a ${t}";
  # checks per system: only the names (nothing is built or evaluated further)
  withPkgs = flake.outputs {
    self = withPkgs;
    nixpkgs = {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (s: { stdenv.hostPlatform.system = s; });
    };
  };
in {
  checkNames = lib.mapAttrs (_: builtins.attrNames) withPkgs.checks;
  kinds = lib.mapAttrs check self.nixosModules;
  names = builtins.attrNames self.nixosModules;
  # each module evaluates under the harness
  units = lib.mapAttrs (_: m: builtins.attrNames
    (lib.evalModules { modules = (import @HARNESS@/default.nix { inherit lib; }).modules ++ [
      m { system.autoDeploy = { enable = true; url = "https://x/p"; }; } ]; }).config.systemd.units)
    self.nixosModules;
}
"""


def test_flake_nixos_modules(can_eval, tmp_path):
    f = tmp_path / "flake-eval.nix"
    f.write_text(FLAKE_EVAL.replace("@LIB@", str(NIXPKGS_LIB)).replace("@REPO@", str(REPO))
                 .replace("@HARNESS@", str(HARNESS)))
    r = nix_eval(f)
    # `autodeploy` is the original's name: `nixosModules.autodeploy` keeps working
    assert set(r["names"]) >= {"default", "nixos-autodeploy", "autodeploy"}
    assert set(r["kinds"].values()) == {"set"}
    for name, units in r["units"].items():
        assert {SVC, TIMER, TRIGGER} <= set(units), name
    # item 7: the VM test (BIOS GRUB on `machine`) only where it can boot
    assert "vm-test" in r["checkNames"]["x86_64-linux"]
    assert "vm-test" not in r["checkNames"]["aarch64-linux"]
    assert {"package", "module-eval", "module-nixos"} <= set(r["checkNames"]["aarch64-linux"])


# --------------------------------------------------------------------------
# package.nix as nixpkgs would take it

PACKAGE_EVAL = """\
let
  lib = import @LIB@;
  drv = name: extra: { type = "derivation"; inherit name; outPath = "/nix/store/x-${name}"; } // extra;
  # python3 is the *host* platform's; pythonOnBuildForHost runs on the build platform.
  python3 = drv "python3-host" {
    meta.mainProgram = "python3";
    pythonOnBuildForHost = drv "python3-build" { interpreter = "/nix/store/x-python3-build/bin/python3"; };
    pkgs.pytestCheckHook = drv "pytest-check-hook" { };
  };
  p = import @REPO@/package.nix {
    inherit lib python3;
    stdenvNoCC = { mkDerivation = a: a; hostPlatform = lib.systems.elaborate "x86_64-linux"; };
    makeWrapper = drv "make-wrapper" { };
    nix = drv "nix" { };
    systemd = drv "systemd" { };
    kexec-tools = drv "kexec-tools" { meta.platforms = lib.platforms.linux; };
    openssh = drv "openssh" { };
  };
in {
  inherit (p) installPhase doCheck pytestFlags meta;
  checkPhase = p.checkPhase or null;
  nativeCheckInputs = map (d: d.name) p.nativeCheckInputs;
  nativeBuildInputs = map (d: d.name) p.nativeBuildInputs;
  functionArgs = builtins.attrNames (builtins.functionArgs (import @REPO@/package.nix));
}
"""


def test_package_nix(can_eval, tmp_path):
    f = tmp_path / "package-eval.nix"
    f.write_text(PACKAGE_EVAL.replace("@LIB@", str(NIXPKGS_LIB)).replace("@REPO@", str(REPO)))
    r = nix_eval(f)
    # cross-compilation: bytecode by the build platform's Python, never the host's
    assert "/nix/store/x-python3-build/bin/python3 -m compileall" in r["installPhase"]
    assert "x-python3-host/bin/python3 -m" not in r["installPhase"]
    assert "python3-build" in r["nativeBuildInputs"]
    # the host's Python is what the wrapper runs
    assert "makeWrapper /nix/store/x-python3-host/bin/python3" in r["installPhase"]
    # unit tests through the usual check hook
    assert r["doCheck"] is True and r["checkPhase"] is None
    assert r["nativeCheckInputs"] == ["pytest-check-hook"]
    assert r["pytestFlags"] == ["tests/test_unit.py"]
    assert r["meta"]["mainProgram"] == "nixos-autodeploy"
    assert r["meta"]["homepage"].startswith("https://")
    # callPackage arguments are packages only (no doCheck knob)
    assert "doCheck" not in r["functionArgs"]


# --------------------------------------------------------------------------
# the VM test's script, run against a stand-in of the NixOS test driver

VM_RENDER = """\
let
  lib = import @LIB@;
  channel = "@CHANNEL@";
  h = import @HARNESS@/default.nix { inherit lib channel; };
  vm = import @REPO@/tests/vm-test.nix {
    pkgs = { inherit lib; };
    nixosModule = @REPO@/module.nix;
    hasBootCounting = channel != "26.05";
  };
  # The VM test's own node modules, evaluated with nixpkgs' module system and
  # the harness' declarations of what they use (boot loader, qemu-vm, /etc,
  # the module's options) for this channel. `cache` (nginx) is left out.
  evalNode = node: (lib.evalModules { modules = h.modules ++ [ node ]; }).config;
  nodes = lib.mapAttrs (_: evalNode) (removeAttrs vm.nodes [ "cache" ]);
  ours = c: lib.filterAttrs
    (n: _: lib.hasPrefix "nixos-autodeploy" n || lib.hasPrefix "prometheus-" n) c.systemd.units;
  failed = c: map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  describe = c: {
    marker = c.environment.etc."autodeploy-test".text;
    units = lib.mapAttrs (_: u: u.text) (ours c);
    requiredBy = lib.mapAttrs (_: u: u.requiredBy) (ours c);
    failedAssertions = failed c;
    inherit (c) warnings;
  };
  path = c: c.system.build.toplevel.outPath;
  m = nodes.machine;
in {
  script = vm.testScript { inherit nodes; };
  nodeNames = builtins.attrNames vm.nodes;
  inherit (vm) globalTimeout meta;
  machineVirtualisation = m.virtualisation;
  machineGrow = { inherit (m.boot) growPartition; autoResize = m.virtualisation.fileSystems."/".autoResize; };
  systemNames = lib.mapAttrs (_: c: path c) m.autodeployTest.variantConfigs // { base = path m; };
  guests = {
    machine = {
      base = path m;
      systems = { ${path m} = describe m; }
        // lib.mapAttrs' (_: c: lib.nameValuePair (path c) (describe c)) m.autodeployTest.variantConfigs;
    };
  } // lib.optionalAttrs (nodes ? counted) {
    counted = let c = nodes.counted; in {
      base = path c;
      counting = true;
      bootCounting = c.boot.loader.systemd-boot.bootCounting;
      efi = c.boot.loader.efi;
      systems = {
        ${path c} = describe c;
        ${path c.autodeployTest.brokenConfig} = describe c.autodeployTest.brokenConfig;
      };
    };
  };
}
"""


@functools.lru_cache(maxsize=None)
def _agent_parser():
    """The agent's own command-line parser (autodeploy.build_parser)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("autodeploy_for_vm_test", REPO / "autodeploy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)

    def parse(argv):
        argv = list(argv)
        if argv and argv[0].endswith("/bin/nixos-autodeploy"):
            argv = argv[1:]
        if argv and argv[0] not in mod.COMMANDS:
            argv.insert(0, "run")
        return mod.build_parser().parse_args(argv)

    return parse


def _vm_render(tmp_path_factory, channel):
    f = tmp_path_factory.mktemp("vm") / "render.nix"
    f.write_text(VM_RENDER.replace("@LIB@", str(NIXPKGS_LIB)).replace("@REPO@", str(REPO))
                 .replace("@HARNESS@", str(HARNESS)).replace("@CHANNEL@", channel))
    return nix_eval(f)


@pytest.fixture(scope="session")
def vm_render(can_eval, tmp_path_factory):
    return _vm_render(tmp_path_factory, "26.11")


@pytest.fixture(scope="session")
def vm_render_stable(can_eval, tmp_path_factory):
    return _vm_render(tmp_path_factory, "26.05")


def _world(render):
    sys.path.insert(0, str(HARNESS))
    import driver_standin as ds
    script = render["script"]
    const = dict(re.findall(r'^([A-Z_]+) = "([^"]*)"$', script, re.M))
    world = ds.World(_agent_parser(), const["TOKEN"], const["TOKEN_FILE"], const["PROM"],
                     int(re.search(r"localhost:(\d+)/metrics", script).group(1)))
    for name, guest in render["guests"].items():
        systems = {
            path: ds.System(path, s["marker"], s["units"],
                            parse_exec(value(s["units"][SVC], "Service", "ExecStart")),
                            s["requiredBy"])
            for path, s in guest["systems"].items()}
        world.add_guest(name, systems, guest["base"], guest.get("counting", False))
    assert world.guests["machine"].current == const["BASE"]
    return ds, script, world


def test_driver_standin_has_the_real_signatures():
    sys.path.insert(0, str(HARNESS))
    import driver_standin as ds
    assert ds.signature_mismatches() == []


def test_vm_test_script_runs_against_the_driver_standin(vm_render):
    ds, script, world = _world(vm_render)
    assert sorted(vm_render["nodeNames"]) == ["cache", "counted", "machine"]
    driver = ds.run_script(script, world, vm_render["nodeNames"])
    assert len(driver.subtests) >= 13, driver.subtests
    for name in ("tokenFile", "trustedKeys", "switchMode/rebootMode", "boot check"):
        assert any(name in s for s in driver.subtests), name
    by_name = {m.name: m for m in driver.machines}
    # the reboots: the module's own wiring staged a system and rebooted; the
    # script waited for QEMU to exit and started the machine again
    for name, boots in (("machine", 2), ("counted", 3)):
        calls = [c[0] for c in by_name[name].calls if c[0] in ("start", "wait_for_shutdown")]
        assert calls == ["start"] + ["wait_for_shutdown", "start"] * (boots - 1), (name, calls)
    machine = world.guests["machine"]
    assert machine.booted == machine.current == vm_render["systemNames"]["boot-b"]
    counted = world.guests["counted"]
    assert counted.current == vm_render["guests"]["counted"]["base"] and counted.state.boot_failures == 1


def test_vm_test_nodes_evaluate_on_both_channels(vm_render, vm_render_stable):
    """Item 6/1/7: the VM test's `machine` and `counted` nodes, evaluated with
    what they use declared like nixpkgs declares it. On 26.11 `counted` has
    boot counting; on 26.05 (no such option) the test has no `counted` node
    and its script no boot-counting part, and `machine` evaluates the same."""
    for render in (vm_render, vm_render_stable):
        for name, guest in render["guests"].items():
            for path, system in guest["systems"].items():
                assert system["failedAssertions"] == [], (name, path)
        # every variant is a system of its own (the agent must fetch it)
        names = render["systemNames"]
        assert len(set(names.values())) == len(names) == 6, names
        # item 7: the root file system grows to the disk; two hours
        assert render["machineGrow"] == {"growPartition": True, "autoResize": True}
        assert render["machineVirtualisation"]["useBootLoader"] is True
        assert render["globalTimeout"] == 7200 and render["meta"]["timeout"] == 7200
    counted = vm_render["guests"]["counted"]
    assert counted["bootCounting"] == {"enable": True, "tries": 1}
    assert counted["efi"]["canTouchEfiVariables"] is True
    base = counted["systems"][counted["base"]]
    assert not [w for w in base["warnings"] if "bootCounting" in w or "boot counting" in w], base["warnings"]
    # the agent is told where the entries are: the ESP at /boot (qemu-vm)
    argv = parse_exec(value(base["units"][SVC], "Service", "ExecStart"))
    assert flag_values(argv, "--boot-dir") == ["/boot"]
    assert sorted(vm_render["nodeNames"]) == ["cache", "counted", "machine"]
    assert sorted(vm_render_stable["nodeNames"]) == ["cache", "machine"]
    assert "counted" not in vm_render_stable["guests"]
    assert "boot check" not in vm_render_stable["script"] and "counted" not in vm_render_stable["script"]
    assert "grep -q '^default nixos-' /boot/loader/loader.conf" in vm_render["script"]


def test_vm_test_script_runs_on_the_stable_channel(vm_render_stable):
    ds, script, world = _world(vm_render_stable)
    driver = ds.run_script(script, world, vm_render_stable["nodeNames"])
    assert not any("boot check" in s for s in driver.subtests)
    machine = world.guests["machine"]
    assert machine.booted == machine.current == vm_render_stable["systemNames"]["boot-b"]


@pytest.mark.parametrize("mutation,error", [
    # what the released test did: retry's argument is timeout_seconds
    (("timeout_seconds=120", "timeout=120"), TypeError),
    # reconnecting after the guest's reboot without waiting for QEMU to exit
    (("machine.wait_for_shutdown()\n    machine.start()\n",
      "machine.connected = False\n    machine.connect()\n"), RuntimeError),
    # a blocking start of a run that reboots the guest
    (('machine.succeed("systemctl start --no-block nixos-autodeploy.service")',
      'machine.succeed("systemctl start nixos-autodeploy.service")'), RuntimeError),
    # a keyword the driver does not have
    (('machine.wait_until_fails("systemctl is-active --quiet nixos-autodeploy.service", timeout=120)',
      'machine.wait_until_fails("systemctl is-active --quiet nixos-autodeploy.service", timeout_seconds=120)'),
     TypeError),
])
def test_driver_standin_rejects_what_the_driver_would(vm_render, mutation, error):
    ds, script, world = _world(vm_render)
    old, new = mutation
    assert old in script, old
    with pytest.raises(error):
        ds.run_script(script.replace(old, new, 1), world, vm_render["nodeNames"])


@pytest.mark.parametrize("case", [c for c in CASES if c not in (
    "missing-url", "empty-url", "keys-both", "json-keys",
    "disabled", "disabled-with-exporter", "disabled-mkdefault-node")])
def test_command_lines_parse_with_the_agents_parser(matrix, case):
    """Every flag the module passes exists in the agent (its own parser)."""
    argv = argv_of(ok(matrix[case]))
    argv = [a.replace("%d/", "/run/credentials/nixos-autodeploy.service/") for a in argv]
    parse = _agent_parser()
    if case == "short-flags":
        args = parse(argv)
        assert args.force is True
        assert str(getattr(args.switch_mode, "value", args.switch_mode)) == "boot"
        assert str(getattr(args.reboot_mode, "value", args.reboot_mode)) == "kexec"
        return
    args = parse(argv)
    assert args.url == flag_values(argv, "--url")[-1]
    if case == "short-flags-k-exec":
        assert args.reboot_mode.value == "kexec"


def test_original_k_exec_spelling_is_accepted_and_typos_are_not():
    """Item 5: hlsb-fulda/nixos-autodeploy's `-r k-exec` means kexec; anything
    else that is not a reboot mode still exits 2 (usage)."""
    for spelling in ("k-exec", "kexec"):
        res = subprocess.run([sys.executable, str(REPO / "autodeploy.py"), "run", "--url", "http://127.0.0.1:9/p",
                              "-r", spelling, "--help"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    parse = _agent_parser()
    assert parse(["--url", "http://x/p", "-r", "k-exec"]).reboot_mode.value == "kexec"
    res = subprocess.run([sys.executable, str(REPO / "autodeploy.py"), "--url", "http://127.0.0.1:9/p",
                          "-r", "kexe", "--once"], capture_output=True, text=True)
    assert res.returncode == 2 and "invalid reboot mode value" in res.stderr, res.stderr


def test_boot_check_unit_shares_path_token_and_checks(matrix):
    r = matrix["boot-assessment"]
    assert r["failedAssertions"] == []
    text = r["units"]["nixos-autodeploy-boot-check.service"]
    assert value(text, "Unit", "Before") == "boot-complete.target"
    assert environment(text)["PATH"].startswith(f"{CURL}/bin:")
    assert value(text, "Service", "LoadCredential") == "token:/run/keys/token"
    argv = parse_exec(value(text, "Service", "ExecStart"))
    assert argv[1] == "check-boot"
    assert flag_values(argv, "--health-check") == ["curl -fsS http://localhost/"]
    argv = [a.replace("%d/", "/run/credentials/x/") for a in argv]
    args = _agent_parser()(argv)
    assert args.command == "check-boot" and args.url == URL


# --------------------------------------------------------------------------
# the boot assessment (issue #13) and FleetLock (issue #14) in the harness


def test_boot_check_unit_is_required_by_and_ordered_before_boot_complete(matrix):
    r = ok(matrix["boot-assessment"])
    name = "nixos-autodeploy-boot-check.service"
    text = r["units"][name]
    assert r["unitsRequiredBy"][name] == ["boot-complete.target"]
    assert value(text, "Unit", "Before") == "boot-complete.target"
    assert "network-online.target" in value(text, "Unit", "After").split()
    assert "network-online.target" in value(text, "Unit", "Wants").split()
    assert value(text, "Service", "Type") == "oneshot"
    assert value(text, "Service", "RemainAfterExit") == "true"
    assert value(text, "Service", "TimeoutStartSec") is not None
    argv = parse_exec(value(text, "Service", "ExecStart"))
    assert flag_values(argv, "--wait") == ["300"] and "--once" not in argv
    assert "--no-connectivity-check" not in argv


def test_boot_check_unit_follows_connectivity_state_dir_and_token(matrix):
    r = ok(matrix["boot-assessment-elsewhere"])
    text = r["units"]["nixos-autodeploy-boot-check.service"]
    argv = parse_exec(value(text, "Service", "ExecStart"))
    assert "--no-connectivity-check" in argv
    assert flag_values(argv, "--state-dir") == ["/persist/autodeploy"]
    assert flag_values(argv, "--token-file") == ["%d/token"]
    assert value(text, "Service", "LoadCredential") == "token:/run/secrets/token"
    assert value(text, "Service", "StateDirectory") is None


def test_boot_assessment_without_boot_counting_warns_and_is_off_by_default(matrix):
    r = ok(matrix["boot-assessment"])
    assert len([w for w in r["warnings"] if "bootCounting" in w]) == 1
    d = ok(matrix["defaults"])
    assert "nixos-autodeploy-boot-check.service" not in d["units"]
    assert not any("bootCounting" in w for w in d["warnings"])


def test_the_module_evaluates_on_both_channels(channels):
    """Item 1: the same configurations evaluate with 26.05's and 26.11's option
    sets; only the boot-assessment warning differs, and it names what the
    channel has."""
    for channel in ("26.11", "26.05"):
        for case in CHANNEL_CASES:
            r = ok(channels[channel][case])
            assert argv_of(r)[0].endswith("/bin/nixos-autodeploy"), (channel, case)
    new, old = channels["26.11"], channels["26.05"]
    for case in CHANNEL_CASES:
        if case.startswith("boot-assessment"):
            continue
        assert new[case]["units"] == old[case]["units"], case
        assert new[case]["warnings"] == old[case]["warnings"] == [], case
    w_new = [w for w in new["boot-assessment"]["warnings"] if "boot counting" in w or "bootCounting" in w]
    w_old = [w for w in old["boot-assessment"]["warnings"] if "boot counting" in w or "bootCounting" in w]
    assert len(w_new) == 1 and "bootCounting.enable is not" in w_new[0]
    assert len(w_old) == 1 and "26.05 does not have it" in w_old[0] and "is not:" not in w_old[0]
    # with boot counting on (26.11): no warning, the check unit is there
    r = ok(new["counting"])
    assert not [w for w in r["warnings"] if "bootCounting" in w or "boot counting" in w], r["warnings"]
    assert r["unitsRequiredBy"]["nixos-autodeploy-boot-check.service"] == ["boot-complete.target"]
    # the option 26.05 does not have: nixpkgs' own error (what broke the VM test)
    res = channels["26.05-counting"]
    assert res.returncode != 0 and "boot.loader.systemd-boot.bootCounting' does not exist" in res.stderr, res.stderr


@pytest.mark.parametrize("case,boot_dir", [
    ("defaults", None), ("grub-efi", None), ("esp-boot", "/boot"), ("esp-boot-efi", "/boot/efi"),
    ("esp-efi", "/efi"), ("esp-xbootldr", "/boot"), ("esp-override", "/mnt/esp")])
def test_boot_dir_follows_the_boot_loader(matrix, case, boot_dir):
    """Item 8: the agent learns where $BOOT is from the boot loader options
    (systemd-boot: xbootldrMountPoint, else efiSysMountPoint); GRUB copies
    into /boot/kernels, so the agent's own search is left to it."""
    r = ok(matrix[case])
    argv = argv_of(r)
    assert flag_values(argv, "--boot-dir") == ([boot_dir] if boot_dir else [])
    args = _agent_parser()(argv)
    assert args.boot_dir == boot_dir


def test_fleetlock_options_reach_the_agent(matrix):
    argv = argv_of(ok(matrix["fleetlock"]))
    assert flag_values(argv, "--fleetlock-url") == ["http://fleetlock.example.org:8080"]
    assert flag_values(argv, "--fleetlock-group") == ["workers"]
    assert argv[-1] == "--verbose"  # extraArgs stay last
    args = _agent_parser()(argv)
    assert args.fleetlock_url == "http://fleetlock.example.org:8080" and args.fleetlock_group == "workers"
    argv = argv_of(ok(matrix["fleetlock-off"]))
    assert "--fleetlock-url" not in argv and "--fleetlock-group" not in argv


def test_environment_values_are_literal(matrix):
    env = environment(svc(ok(matrix["env-percent"])))
    assert env["https_proxy"] == "http://u:p%%40ss@proxy:3128"   # systemd turns %% into %


def test_fleetlock_with_the_daily_default_warns(matrix):
    assert any("fleetlock.url is set with the daily default interval" in w for w in matrix["fleetlock"]["warnings"])
    assert not any("fleetlock" in w for w in matrix["defaults"]["warnings"])
