"""The agent's state against real nix and hostile local users: planted
symlinks and writable directories never make root write elsewhere, a full
disk never truncates the state, one lock per host whatever the state
directory, what a server can make us persist is bounded, state.json with
wrong inner values fails closed, and state.json from an older agent keeps
working.  The numbered sections answer the adversarial review (issue
"Hostile servers, hostile local users"); its other items are in
test_fetch.py, test_trust.py, test_crash.py and test_ops.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from util import INSIDE, WINDOW, error_kind, fill_leaving, pointer_requests, reboot_calls, state_gauge, wait_for


# ---------------------------------------------------------------------------
# 2. Planted symlinks never make root write elsewhere


def test_planted_temp_file_symlinks_in_a_shared_metrics_directory(host, world):
    metrics_dir = host.var_lib / "prometheus-node-exporter-text"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    metrics_dir.chmod(0o1777)               # shared with another account
    victim = host.var_lib / "victim"
    victim.write_text("precious\n")
    last_pid = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    for pid in range(last_pid + 1, last_pid + 3000):
        os.symlink("/var/lib/victim", metrics_dir / f".nixos-autodeploy.prom.{pid}.tmp")
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"
    metrics = metrics_dir / "nixos-autodeploy.prom"
    assert metrics.is_file() and not metrics.is_symlink() and "nixos_autodeploy_state" in metrics.read_text()
    assert (metrics.stat().st_mode & 0o777) == 0o644


@pytest.mark.parametrize("setup,needle", [
    (lambda d: d.chmod(0o777), "writable by group or others"),
    (lambda d: d.chmod(0o770), "writable by group or others"),
    (lambda d: os.chown(d, 1000, 1000), "owned by uid 1000"),
], ids=["world-writable", "group-writable", "other-owner"])
def test_unsafe_state_directory_is_refused(host, world, setup, needle):
    state_dir = host.var_lib / "nixos-autodeploy"
    state_dir.mkdir(mode=0o700, exist_ok=True)
    setup(state_dir)
    r = host.once(host.url)
    assert r.returncode == 9, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0]
    assert list(state_dir.iterdir()) == []  # nothing written there
    assert host.profile == world.path("a")


def test_state_directory_symlink_owned_by_a_user_is_refused(host, world):
    elsewhere = host.var_lib / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = host.var_lib / "nixos-autodeploy"
    os.symlink("/var/lib/elsewhere", link)
    os.lchown(link, 1000, 1000)
    r = host.once(host.url)
    assert r.returncode == 9 and "symlink owned by uid 1000" in r.stderr, r.stderr
    assert list(elsewhere.iterdir()) == []


def test_planted_lock_symlink_is_not_followed(host, world):
    run_dir = host.run_dir / "nixos-autodeploy"
    run_dir.mkdir(mode=0o755, exist_ok=True)
    victim = host.var_lib / "victim"
    victim.write_text("precious\n")
    os.symlink("/var/lib/victim", run_dir / "lock")
    r = host.once(host.url)
    assert r.returncode == 9 and "lock" in r.stderr, r.stderr
    assert victim.read_text() == "precious\n"


def test_world_writable_runtime_directory_is_refused(host, world):
    run_dir = host.run_dir / "nixos-autodeploy"
    run_dir.mkdir(exist_ok=True)
    run_dir.chmod(0o777)
    r = host.once(host.url)
    assert r.returncode == 9 and "/run/nixos-autodeploy" in r.stderr and "writable" in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# 3, 11. A full disk never truncates the state and never strands the host


def test_full_disk_keeps_the_old_state_and_says_so(host, world, server):
    state_dir = host.small_disk("/var/lib/nixos-autodeploy", "64k")
    state_dir.chmod(0o700)
    assert host.once(host.url).returncode == 0
    old = (state_dir / "state.json").read_text()
    filler = fill_leaving(state_dir, 8192)
    # A pointer whose record (kept for 304s) makes state.json larger than 8 KiB.
    server.set("/pointer", world.path("a") + "\nx-build-log: " + "z" * 7000 + "\n", etag=True)
    r = host.once(host.url)
    assert r.returncode == 9, r.stderr
    assert "state was NOT saved" in r.stderr
    assert (state_dir / "state.json").read_text() == old   # whole, and the old one
    assert sorted(p.name for p in state_dir.iterdir()) == ["filler", "state.json"]  # no temp file left
    assert state_gauge(host) == "failed" and error_kind(host) == "state"
    status = host.agent("status", "--json")
    assert status.returncode == 0, status.stderr
    filler.unlink()
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert json.loads((state_dir / "state.json").read_text())["pointer"]["body"].startswith(world.path("a"))


def test_disk_full_right_after_the_profile_changed_rolls_back(host, world, server):
    a, b = world.path("a"), world.path("b")
    state_dir = host.small_disk("/var/lib/nixos-autodeploy", "64k")
    state_dir.chmod(0o700)
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    host.ctl("fill-after-nix-env").write_text("")
    host.ctl("fail").write_text(a + "\n")   # a unit of `a` fails when restarted: no activation may happen
    activations = len(host.activations())
    r = host.once(host.url)
    assert r.returncode == 9, r.stderr
    assert host.profile == a and host.current == a, r.stderr   # converged: nothing half-done
    assert len(host.activations()) == activations               # nothing was activated, not even `a`
    host.ctl("fail").unlink()
    (state_dir / "filler").unlink()
    r = host.once(host.url)                  # the next run converges and deploys
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and host.state()["intent"] is None


# ---------------------------------------------------------------------------
# 7. One lock per host, whatever the state directory


def test_two_agents_with_different_state_dirs_never_run_together(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    host.ctl("hang-after-nix-env").write_text("")
    first = host.agent_background("--once", "--url", host.url)
    try:
        wait_for(lambda: host.profile == b, what="the first agent to set the profile")
        second = host.once(host.url, "--state-dir", "/var/lib/other-agent")
        assert second.returncode == 6, second.stderr
        assert "host lock" in second.stderr
    finally:
        host.ctl("hang-after-nix-env").unlink()
    first.wait(timeout=60)
    assert first.returncode == 0, first.log_path.read_text()
    assert host.current == b and host.state()["deployed"] == b


# ---------------------------------------------------------------------------
# What a server can make us persist is bounded


def test_what_a_server_can_make_us_persist_is_bounded(host, world, server):
    server.set("/pointer", world.path("a") + "\n" + "".join(f"x-junk-{i}: {'z' * 900}\n" for i in range(60)),
               etag=True)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    assert host.state()["pointer"] is None          # over 8 KiB: never kept, never replayed
    assert state_file.stat().st_size < 8 * 1024
    r = host.once(host.url)
    assert r.returncode == 0 and "If-None-Match" not in pointer_requests(server)[-1]["headers"]


# ---------------------------------------------------------------------------
# The state's schema (issue #18, item 5): right outer types, wrong inside


@pytest.mark.parametrize("field,raw", [
    ("fleetlock_error", '{"operation": "pre-reboot", "kind": 1, "message": "x", "time": "1"}'),
    ("deploys_total", "1" + "0" * 400),
    ("history", "[1]"),
    ("history", '[{"time": "yesterday", "action": "switch"}]'),
    ("last_error", '{"kind": 5}'),
    ("rollout", '{"target": 1}'),
    ("interrupted", '{"/nix/store/x": 1e400}'),
    ("last_run", "1e400"),
    # Review of #18: inner values `status` and the agent divide by or index.
    ("last_error", '{"kind": "fetch"}'),
    ("rollout", '{"target": "/nix/store/x", "bucket": 5, "start_percent": 0, "percent": 0, "start": 0, '
                '"duration": 0, "paused": false}'),
], ids=["lock-kind-int", "count-10e400", "history-int", "history-time-str", "last-error-kind-int",
        "rollout-target-int", "interrupted-inf", "last-run-inf", "last-error-no-message", "rollout-duration-0"])
def test_state_with_bad_inner_values_fails_closed(host, world, server, field, raw):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0  # tracking a
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    state = json.loads(state_file.read_text())
    state.pop(field, None)
    text = json.dumps(state)[:-1] + f', "{field}": {raw}}}\n'
    state_file.write_text(text)
    server.pointer(b)
    r = host.once(host.url, "--on-failure", "echo $NIXOS_AUTODEPLOY_ERROR_KIND > /run/hook")
    assert r.returncode == 9, r.stderr
    assert f"({field} is not" in r.stderr and "trust-reset" in r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert host.current == a and host.profile == a  # nothing deployed
    assert state_file.read_text() == text  # left as it is
    assert state_gauge(host) == "failed" and error_kind(host) == "state"
    assert (host.run_dir / "hook").read_text().strip() == "state"
    status = host.agent("status")
    assert status.returncode == 9 and f"({field} is not" in status.stderr, status.stderr
    assert "internal error" not in status.stderr and "Traceback" not in status.stderr


# ---------------------------------------------------------------------------
# state.json written by the agent of 1abd54b (issue #17)
# ---------------------------------------------------------------------------


# What 1abd54b wrote after a boot deploy of b failed its check after the reboot
# (rolled back to a, reboot into a deferred), plus a key from a newer agent.
OLD_STATE = {
    "activation": "boot", "behind_since": 1764000000.0, "boot_failure": None, "boot_failures_total": 0,
    "boot_free_bytes": None, "boot_needed_bytes": None, "deployed": "@a", "deployed_at": 1764000300.0,
    "deploys_total": 1, "dirty": False, "fleetlock_error": None, "fleetlock_failures": {}, "highest_revision": None,
    "history": [], "intent": None, "interrupted": {}, "last_error": None, "last_reason": "x", "last_run": 1764000300.0,
    "last_run_duration": 1.0, "last_run_success": False, "last_state": "rolled_back", "last_success": 1764000000.0,
    "pointer": None, "previous": "@b", "quarantine_reason": "health", "quarantined": "@b", "reboot_reason": None,
    "reboot_required": True, "reboot_slot": None, "reboot_window_wait": True, "revision_path": None,
    "rollbacks_total": 1, "rollout": None, "staged_boot_id": "BOOT", "staged_from": "@b", "upstream": "@b",
    "upstream_revision": None, "verified": True, "x_future_field": {"kept": [1, 2]},
}


def test_state_from_the_previous_agent_keeps_working_and_keeps_unknown_keys(host, world, server):
    a, b = world.path("a"), world.path("b")
    host.sh(f"nix-store --realise {b} >/dev/null; /usr/bin/nix-env -p /nix/var/nix/profiles/system --set {a}; "
            f"ln -sfn {b} /run/current-system; ln -sfn {b} /run/booted-system")
    state = {k: (a if v == "@a" else b if v == "@b" else v) for k, v in OLD_STATE.items()}
    state["staged_boot_id"] = host.boot_id_file.read_text().strip()
    state_dir = host.var_lib / "nixos-autodeploy"
    state_dir.mkdir(mode=0o700, exist_ok=True)
    (state_dir / "state.json").write_text(json.dumps(state))
    server.pointer(b)
    r = host.once(host.url, "--reboot-mode", "reboot", *WINDOW, env=INSIDE)
    assert r.returncode == 0, r.stderr
    assert reboot_calls(host) == 1  # the deferred rollback reboot, from an old record
    assert json.loads(host.agent("status", "--json").stdout)["phase"] == "rolled_back_awaiting_reboot"
    saved = host.state()
    assert saved["x_future_field"] == {"kept": [1, 2]} and saved["rollback_of"] == b
