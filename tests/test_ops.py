"""Operating a fleet: suspend/resume, hooks, status (human and JSON) and its
fields, the demo, the command line a newcomer meets (root, exit codes, help)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from util import error_kind, promtool_ok, state_gauge
from util import hook_script, read_env
from world import AGENT, REPO

sys.path.insert(0, str(REPO))

STATUS_FIELDS = {
    "version", "current", "booted", "profile", "deployed", "upstream", "upstream_revision", "state", "reason",
    "dirty", "suspended", "suspend_reason", "suspended_since", "quarantined", "quarantine_reason", "last_run",
    "last_run_success", "last_success", "last_error", "reboot_required", "reboot_reason", "rollbacks_total",
    "deploys_total", "interrupted_deploy", "boot_failure", "boot_free_bytes", "history", "revision_floor",
    "rollout", "reboot_slot", "fleetlock_error",  # fleet rollouts (issue #14)
    "phase",  # the lifecycle state machine (issue #17)
    "prefetched", "prefetch_failures_total", "prefetch_error",  # ready before its turn (issue #21)
    "manual_rollback", "manual_rollbacks_total",  # a manual rollback is a verdict (issue #21)
}


def test_suspend_and_resume_across_runs(host, world, server):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0
    r = host.agent("suspend", "--reason", "change freeze until Monday")
    assert r.returncode == 0 and "suspended" in r.stderr
    server.pointer(b)
    for _ in range(2):  # persisted: every run stays suspended
        r = host.once(host.url)
        assert r.returncode == 0, r.stderr
        assert "change freeze until Monday" in r.stderr
        assert host.current == a and host.profile == a and not host.store_has(b)
        assert state_gauge(host) == "suspended"
        m = host.metrics()
        assert m["nixos_autodeploy_suspended"] == 1
        info = [k for k in m if k.startswith("nixos_autodeploy_info{")][0]
        assert b.split("/")[-1] in info  # it still fetches and reports upstream
    status = json.loads(host.agent("status", "--json").stdout)
    assert status["suspended"] is True and status["suspend_reason"] == "change freeze until Monday"
    assert status["upstream"] == b
    assert "yes: change freeze until Monday" in host.agent("status").stdout
    promtool_ok(host)

    assert host.agent("resume").returncode == 0
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.state()["deployed"] == b
    assert host.metrics()["nixos_autodeploy_suspended"] == 0
    assert json.loads(host.agent("status", "--json").stdout)["suspended"] is False


def test_success_hook_gets_outcome_and_systems(host, world, server):
    a, b = world.path("a"), world.path("b")
    ok, bad = hook_script(host, "ok"), hook_script(host, "bad")
    assert host.once(host.url, "--on-success", ok, "--on-failure", bad).returncode == 0
    assert read_env(host, "ok") == {}  # tracking is not a deploy: no hook
    server.pointer(b)
    assert host.once(host.url, "--on-success", ok, "--on-failure", bad).returncode == 0
    env = read_env(host, "ok")
    assert env["NIXOS_AUTODEPLOY_OUTCOME"] == "deployed" and env["NIXOS_AUTODEPLOY_SUCCESS"] == "1"
    assert env["NIXOS_AUTODEPLOY_OLD_SYSTEM"] == a and env["NIXOS_AUTODEPLOY_NEW_SYSTEM"] == b
    assert env["NIXOS_AUTODEPLOY_ERROR"] == "" and env["NIXOS_AUTODEPLOY_EXIT_CODE"] == "0"
    assert read_env(host, "bad") == {}


def test_failure_hook_gets_the_error(host, world, server):
    b = world.path("b")
    ok, bad = hook_script(host, "ok"), hook_script(host, "bad")
    assert host.once(host.url).returncode == 0
    host.ctl("fail").write_text(b + "\n")
    server.pointer(b)
    assert host.once(host.url, "--on-success", ok, "--on-failure", bad).returncode == 5
    env = read_env(host, "bad")
    assert env["NIXOS_AUTODEPLOY_OUTCOME"] == "rolled_back" and env["NIXOS_AUTODEPLOY_SUCCESS"] == "0"
    assert env["NIXOS_AUTODEPLOY_NEW_SYSTEM"] == b and env["NIXOS_AUTODEPLOY_EXIT_CODE"] == "5"
    assert "exited with 4" in env["NIXOS_AUTODEPLOY_ERROR"]
    assert env["NIXOS_AUTODEPLOY_ERROR_KIND"] == "activation"
    assert read_env(host, "ok") == {}


def test_failing_and_hanging_hooks_change_nothing(host, world, server):
    b, c = world.path("b"), world.path("c")
    assert host.once(host.url).returncode == 0
    failing = hook_script(host, "failing", "exit 7\n")
    server.pointer(b)
    r = host.once(host.url, "--on-success", failing)
    assert r.returncode == 0, r.stderr
    assert "on-success hook exited with 7 (ignored)" in r.stderr
    assert host.current == b and host.state()["deployed"] == b
    assert state_gauge(host) == "deployed" and host.metrics()["nixos_autodeploy_last_run_success"] == 1

    hanging = hook_script(host, "hanging", "sleep 60\n")
    server.pointer(c)
    r = host.once(host.url, "--on-success", hanging, "--hook-timeout", "1")
    assert r.returncode == 0, r.stderr
    assert "on-success hook failed" in r.stderr and "timed out" in r.stderr
    assert host.current == c and state_gauge(host) == "deployed"


def test_status_json_has_every_documented_field(host, world, server):
    assert host.once(host.url).returncode == 0
    data = json.loads(host.agent("status", "--json").stdout)
    assert set(data) == STATUS_FIELDS
    reference = (REPO / "docs" / "reference" / "state.md").read_text()
    for name in STATUS_FIELDS:
        assert f"`{name}`" in reference, f"status field {name} is not documented in docs/reference/state.md"


@pytest.mark.tier("real nix")
def test_demo_runs_end_to_end(tmp_path):
    """The README's ./demo.sh, as root, with a `sudo` on PATH that fails if called
    (a minimal Debian root shell has none)."""
    (tmp_path / "sudo").write_text("#!/bin/sh\necho 'sudo was called' >&2\nexit 97\n")
    (tmp_path / "sudo").chmod(0o755)
    r = subprocess.run([str(REPO / "demo.sh")], capture_output=True, text=True, timeout=300, cwd="/",
                       env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sudo was called" not in r.stderr
    out = r.stdout
    for needle in ("start tracking", "state: deployed: switched to", "staging for the next boot",
                   "healthy after the reboot", 'nixos_autodeploy_dirty 1', "resume tracking",
                   "nixos_autodeploy_state{state=\"pending_reboot\"} 1"):
        assert needle in out, needle
    assert "Done in" in out


# ---------------------------------------------------------------------------
# Bad numeric option values (issue #18, item 10)

@pytest.mark.parametrize("args", [
    ["check-boot", "--wait", "nan"], ["check-boot", "--wait", "inf"], ["check-boot", "--wait", "-1"],
    ["check-boot", "--timeout", "inf"], ["check-boot", "--health-timeout", "nan"],
    ["run", "--once", "--timeout", "inf"], ["run", "--once", "--timeout", "nan"], ["run", "--once", "--timeout", "0"],
    ["run", "--once", "--timeout", "1e300"], ["run", "--once", "--interval", "inf"],
    ["run", "--once", "--health-timeout=-inf"], ["run", "--once", "--hook-timeout", "NaN"],
], ids=lambda a: " ".join(a))
def test_numeric_options_refuse_nan_inf_and_out_of_range(host, args):
    r = host.agent(args[0], "--url", host.url, *args[1:], timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "must be a number of seconds" in lines[0], r.stderr
    assert not (host.var_lib / "nixos-autodeploy").exists()  # refused before anything ran


def test_the_largest_seconds_values_work(host):
    r = host.agent("check-boot", "--url", host.url, "--wait", "0", "--timeout", "31622400")
    assert r.returncode == 0, r.stderr
    r = host.agent("run", "--once", "--url", host.url, "--timeout", "31622400", "--hook-timeout", "31622400")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# `status` for a non-root user, --help, alignment (issue #18, item 11 and "also")


def as_nobody(host, *args: str):
    import shlex
    import world
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", python, str(world.AGENT), *args]
    return host.sh(shlex.join(argv), check=False)


def test_status_as_non_root_says_it_cannot_read_and_how_to_run_it(host):
    assert host.once(host.url).returncode == 0
    r = as_nobody(host, "status")
    assert r.returncode == 9, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "permission denied" in lines[0] and "as root" in lines[0] and "sudo" in lines[0]
    assert "corrupt" not in lines[0] and "trust-reset" not in lines[0]
    assert host.agent("status").returncode == 0  # root still reads it


def test_help_lists_every_command_and_status_rows_align(host):
    import autodeploy
    import world
    r = subprocess.run([sys.executable, str(world.AGENT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    listed = r.stdout.split("other commands", 1)[1]
    for command in autodeploy.COMMANDS:
        if command != "run":
            assert f"\n  {command} " in listed, command
    text = host.agent("status").stdout  # never run: an empty history
    rows = [line for line in text.splitlines() if line and not line.startswith(" ")]
    columns = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in rows}
    assert len(columns) == 1, text
    assert any(line.startswith("history ") and line.endswith("none") for line in rows)


# ---------------------------------------------------------------------------
# status, human and JSON
# ---------------------------------------------------------------------------


def test_status_human_and_json(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    assert host.once(host.url, "--switch-mode", "boot").returncode == 0
    r = host.agent("status")
    assert r.returncode == 0
    assert f"current          {world.path('a')}" in r.stdout
    assert f"profile          {b}" in r.stdout
    assert "reboot required  yes" in r.stdout
    assert "state            pending_reboot" in r.stdout
    r = host.agent("status", "--json")
    data = json.loads(r.stdout)
    assert data["current"] == world.path("a") and data["profile"] == b and data["deployed"] == b
    assert data["upstream"] == b and data["reboot_required"] is True and data["dirty"] is False
    assert data["state"] == "pending_reboot" and data["last_run_success"] is True
    assert r.stderr == ""  # status is quiet: results on stdout only


def test_status_before_any_run(host):
    r = host.agent("status", "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert data["deployed"] is None and data["state"] is None and data["current"]


# ---------------------------------------------------------------------------
# The command line a newcomer meets
# ---------------------------------------------------------------------------


def test_not_root_exits_2_before_writing_anything(host, world, tmp_path):
    setpriv = "/usr/bin/setpriv"
    r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, str(AGENT),
                        "--once", "--url", host.url, "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "must run as root" in r.stderr
    assert not (tmp_path / "state").exists()


def test_dry_run_prints_its_errors(host, world, server):
    server.unreachable = True
    r = host.once(host.url, "--dry-run")
    assert r.returncode == 3 and "error: GET" in r.stderr


def test_not_a_nixos_host_has_its_own_exit_code(host, world):
    (host.run_dir / "current-system").unlink()
    r = host.once(host.url)
    assert r.returncode == 8 and "not a running NixOS system" in r.stderr, r.stderr
    assert state_gauge(host) == "failed" and error_kind(host) == "not_nixos"


def test_agent_is_executable_in_git():
    repo = Path(AGENT).parent
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "-C", str(repo), "ls-files", "-s", "autodeploy.py"], capture_output=True, text=True)
    assert r.stdout.startswith("100755 "), r.stdout
    r = subprocess.run([str(AGENT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--url" in r.stdout and "--once" in r.stdout and "trust-reset" in r.stdout
