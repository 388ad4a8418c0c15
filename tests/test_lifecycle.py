"""The deploy lifecycle as one state machine (issue #17), against real nix.

One test per joint that broke when each feature decided on its own: a
deferred rollback reboot, follow-through of the previous deploy while the
next release is held, dry-run = the plan, suspend, power loss during a boot
activation, a full /run, stop requests (SIGTERM to the agent, `systemctl
stop` to its whole unit, a killed activation), kexec and the boot loader's
variables, a FleetLock group change, and state.json from an older agent.
Each failed against the agent of 1abd54b (AUTODEPLOY_AGENT=old.py).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from test_boot import boot_default, efivars, fall_back, stage
from test_rollout import fl_once, lock_id, machine_id, reboots
from util import assert_host, quarantined, state_gauge, track, wait_for

CHECK = ("--health-check", "test ! -e /var/lib/standin/unhealthy")
OUTSIDE = {"NIXOS_AUTODEPLOY_NOW": "2026-11-23T12:00:00"}
INSIDE = {"NIXOS_AUTODEPLOY_NOW": "2026-11-24T03:00:00"}
WINDOW = ("--reboot-window", "02:00-04:00")


def suspend(host, reason: str = "maintenance") -> None:
    r = host.agent("suspend", "--reason", reason)
    assert r.returncode == 0, r.stderr


def reboot_calls(host) -> int:
    return sum(1 for c in host.calls() if c in ("systemctl reboot", "systemctl kexec"))


# ---------------------------------------------------------------------------
# A deferred rollback reboot is never lost
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("deferred_by", ["window", "slot"])
def test_deferred_rollback_reboot_is_retried_while_upstream_names_the_failed_build(
        host, world, server, fleetlock, deferred_by):
    a, b = world.path("a"), world.path("b")
    args = ("--switch-mode", "boot", "--reboot-mode", "reboot", *CHECK)
    if deferred_by == "window":
        args += WINDOW
    machine_id(host)
    env_ok = {"NIXOS_AUTODEPLOY_MACHINE_ID_FILE": str(host.root / "machine-id"), **INSIDE}
    extra = ("--fleetlock-url", fleetlock.url) if deferred_by == "slot" else ()
    assert host.once(host.url, *args, *extra, env=env_ok).returncode == 0
    server.pointer(b)
    assert host.once(host.url, *args, *extra, env=env_ok).returncode == 0 and reboot_calls(host) == 1
    host.reboot()
    host.ctl("unhealthy").write_text("")
    blocked = dict(env_ok, **OUTSIDE) if deferred_by == "window" else env_ok
    if deferred_by == "slot":
        fleetlock.operate("steady-state", lock_id(host), "default")
        assert fleetlock.operate("pre-reboot", "someone-else", "default") == 200
    r = host.once(host.url, *args, *extra, env=blocked)
    assert r.returncode == 5, r.stderr  # b failed its check: profile back on a, reboot due but deferred
    assert host.profile == a and host.current == b and boot_default(host) == a and reboot_calls(host) == 1
    for _ in range(2):  # upstream still names the quarantined b: the reboot stays due
        r = host.once(host.url, *args, *extra, env=blocked)
        assert r.returncode == 0 and reboot_calls(host) == 1, r.stderr
    if deferred_by == "slot":
        fleetlock.operate("steady-state", "someone-else", "default")
    r = host.once(host.url, *args, *extra, env=env_ok)
    assert r.returncode == 0, r.stderr
    assert reboot_calls(host) == 2  # the rollback reboot, at last
    assert json.loads(host.agent("status", "--json").stdout)["phase"] == "rolled_back_awaiting_reboot"
    host.reboot()
    assert host.once(host.url, *args, *extra, env=env_ok).returncode == 0
    assert_host(host, current=a, profile=a, deployed=a)
    assert state_gauge(host) == "quarantined"


# ---------------------------------------------------------------------------
# Follow-through of the previous deploy while the next release is held
# ---------------------------------------------------------------------------


def hold_next_release(host, server, c: str, hold: str) -> None:
    if hold == "wave":
        server.set("/pointer", f"{c}\nrollout: 0%\n")
    elif hold == "pause":
        server.set("/pointer", f"{c}\npause: true\n")
    else:
        server.pointer(c)
        suspend(host)


@pytest.mark.parametrize("hold", ["wave", "pause", "suspend"])
def test_booted_release_is_verified_while_the_next_one_is_held(host, world, server, hold):
    b, c = world.path("b"), world.path("c")
    stage(host, b)
    host.reboot()
    hold_next_release(host, server, c, hold)
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert "healthy after the reboot" in r.stderr, r.stderr[-3000:]
    assert host.state()["verified"] is True and host.current == b
    # Only the wave lets the next release be prefetched; pause and suspend fetch nothing.
    assert host.store_has(c) == (hold == "wave") and not [a for a in host.activations() if a.startswith(c)]
    assert [(e["action"], e["outcome"]) for e in host.state()["history"]][-1] == ("verify", "deployed")
    assert state_gauge(host) == {"wave": "waiting_rollout", "pause": "rollout_paused", "suspend": "suspended"}[hold]


@pytest.mark.parametrize("hold", ["wave", "pause", "suspend"])
def test_fallback_is_reported_while_the_next_release_is_held(host, world, server, hold):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    stage(host, b)
    fall_back(host, a)
    hold_next_release(host, server, c, hold)
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 5, r.stderr
    assert "did not boot" in r.stderr or "BOOT FAILED" in r.stderr
    assert 'kind="boot_failed"' in host.metrics_text()
    if hold == "suspend":  # reported; the operator's host is not touched
        assert host.profile == b and host.state()["deployed"] == b and state_gauge(host) == "suspended"
        assert host.metrics()["nixos_autodeploy_boot_failures_total"] == 0
    else:
        assert host.profile == a and boot_default(host) == a and state_gauge(host) == "boot_failed"
        assert host.metrics()["nixos_autodeploy_boot_failures_total"] == 1


# ---------------------------------------------------------------------------
# Dry run = the plan, holds included
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("hold", ["suspend", "wave"])
def test_dry_run_prints_the_plan_with_the_holds(host, world, server, hold):
    a, b = world.path("a"), world.path("b")
    track(host)
    if hold == "suspend":
        suspend(host)
        server.pointer(b)
    else:
        server.set("/pointer", f"{b}\nrollout: 0%\n")
    before = host.state()
    r = host.once(host.url, "--dry-run")
    assert r.returncode == 0, r.stderr
    deploy = [line for line in r.stdout.splitlines() if f"deploy {b}" in line]
    assert len(deploy) == 1 and f"waits: {hold}:" in deploy[0], r.stdout
    assert "would deploy" not in r.stdout
    assert host.state() == before and host.current == a and not host.store_has(b)


# ---------------------------------------------------------------------------
# suspend: nothing changes on the host
# ---------------------------------------------------------------------------


def test_suspend_holds_back_the_reboot_into_a_staged_release(host, world, server):
    b = world.path("b")
    stage(host, b)
    suspend(host)
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot")
    assert r.returncode == 0, r.stderr
    assert reboot_calls(host) == 0 and state_gauge(host) == "suspended"
    assert host.agent("resume").returncode == 0
    assert host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot").returncode == 0
    assert reboot_calls(host) == 1


def test_suspend_holds_the_rollback_of_a_failing_booted_release_and_reports_it(host, world, server):
    a, b = world.path("a"), world.path("b")
    stage(host, b)
    host.reboot()
    host.ctl("unhealthy").write_text("")
    suspend(host)
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot", *CHECK)
    assert r.returncode == 5, r.stderr  # reported ...
    assert "failed its health checks" in r.stderr and "the rollback waits" in r.stderr
    assert_host(host, current=b, profile=b, deployed=b)  # ... but nothing changed
    assert boot_default(host) == b and reboot_calls(host) == 0 and host.metrics()["nixos_autodeploy_rollbacks_total"] == 0
    assert state_gauge(host) == "suspended" and 'kind="health"' in host.metrics_text()
    assert host.agent("resume").returncode == 0
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot", *CHECK)
    assert r.returncode == 5 and host.profile == a and reboot_calls(host) == 1, r.stderr


# ---------------------------------------------------------------------------
# Recovery from facts; a full /run
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("healthy", [True, False])
def test_power_loss_during_a_boot_activation_then_the_staged_system_boots(host, world, server, healthy):
    a, b = world.path("a"), world.path("b")
    track(host)
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url, "--switch-mode", "boot")
    wait_for(lambda: host.activations(), what="the boot activation")
    os.killpg(proc.pid, signal.SIGKILL)  # power loss: the agent ...
    proc.wait(30)
    host.kill_orphans()                 # ... and the activation die
    host.ctl("hang").unlink()
    host.ctl("boot-default").write_text(b + "\n")  # the boot loader was already installed
    host.reboot()
    assert host.current == b and host.profile == b and host.state()["intent"]["phase"] == "activate"
    if not healthy:
        host.ctl("unhealthy").write_text("")
    r = host.once(host.url, "--switch-mode", "boot", *CHECK)
    if healthy:
        assert r.returncode == 0, r.stderr
        assert "verifying it" in r.stderr and "healthy after the reboot" in r.stderr
        assert_host(host, current=b, profile=b, deployed=b)
        assert host.state()["verified"] is True and host.metrics()["nixos_autodeploy_dirty"] == 0
    else:
        assert r.returncode == 5, r.stderr
        assert host.profile == a and boot_default(host) == a and host.state()["deployed"] == a
        assert quarantined(host) == {f'nixos_autodeploy_quarantined{{path="{b}"}}': 1}
        assert host.metrics()["nixos_autodeploy_dirty"] == 0 and host.metrics()["nixos_autodeploy_reboot_required"] == 1


def test_full_run_while_writing_the_staged_marker_is_a_warning(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    runtime = host.small_disk("/run/nixos-autodeploy", "64k")
    fd = os.open(runtime / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    server.pointer(b)
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert "warning: cannot write /run/nixos-autodeploy/staged" in r.stderr
    assert state_gauge(host) == "pending_reboot" and host.state()["intent"] is None
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert "ROLLING BACK" not in r.stderr and host.profile == b and boot_default(host) == b
    assert len(host.activations()) == 1 and state_gauge(host) == "pending_reboot"


# ---------------------------------------------------------------------------
# Stop requests
# ---------------------------------------------------------------------------


def test_sigterm_while_waiting_for_the_lock_server_ends_the_wait_and_never_reboots(host, world, server, fleetlock):
    b = world.path("b")
    assert fl_once(host, fleetlock).returncode == 0
    server.pointer(b)
    fleetlock.fail, fleetlock.hang_seconds = "hang", 15
    proc = host.agent_background("--once", "--url", host.url, "--switch-mode", "boot", "--reboot-mode", "reboot",
                                 "--fleetlock-url", fleetlock.url, "--timeout", "30",
                                 env={"NIXOS_AUTODEPLOY_MACHINE_ID_FILE": str(host.root / "machine-id")})
    wait_for(lambda: (host.state().get("reboot_slot") or {}).get("granted") is False, what="the slot request")
    time.sleep(0.5)
    before = host.state()
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert time.monotonic() - started < 3, proc.log_path.read_text()
    assert proc.returncode == 0
    fleetlock.fail = None
    time.sleep(0.5)
    after = host.state()
    assert reboot_calls(host) == 0, proc.log_path.read_text()
    # The deploy this run did is reported; the slot request and the record stay as they were.
    assert after["reboot_slot"] == before["reboot_slot"] and after["deployed"] == before["deployed"] == b
    assert after["intent"] is None and after["last_state"] == "pending_reboot"


@pytest.mark.parametrize("how", ["sigterm", "systemctl_stop"])
def test_stop_during_the_download_changes_nothing_and_is_no_failure(host, world, server, how):
    a, b = world.path("a"), world.path("b")
    track(host)
    before = host.state()
    server.cache_delay = 3
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url, "--prometheus-path",
                                 "/var/lib/prometheus-node-exporter-text/nixos-autodeploy.prom")
    digest = os.path.basename(b)[:32]
    wait_for(lambda: any(q["path"].startswith(f"/cache/{digest}") for q in server.requests), what="the download")
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        host.stop_unit(proc)
    proc.wait(30)
    server.cache_delay = 0
    log = proc.log_path.read_text()
    assert proc.returncode == 0, log
    assert "cannot realise" not in log and host.activations() == []
    assert host.current == a and host.profile == a
    assert host.state() == before  # nothing written: no failure recorded
    r = host.once(host.url)
    assert r.returncode == 0 and host.current == b, r.stderr


def test_an_activation_killed_by_sigterm_is_a_failed_activation(host, world, server):
    """Real `systemd-run --wait` exits 0 when the unit's main process died of
    SIGTERM; its report says `code=killed/status=TERM`."""
    a, b = world.path("a"), world.path("b")
    track(host)
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url)
    pidfile = host.run_dir / "standin-units" / "nixos-autodeploy-activation.pid"
    wait_for(lambda: host.activations() and pidfile.exists(), what="the activation")
    os.killpg(int(pidfile.read_text()), signal.SIGTERM)  # `systemctl stop nixos-autodeploy-activation`
    proc.wait(60)
    host.ctl("hang").unlink()
    log = proc.log_path.read_text()
    assert proc.returncode == 5, log
    assert "Main processes terminated with: code=killed/status=TERM" in log
    assert "killed by signal TERM" in log and "ROLLING BACK" in log
    assert_host(host, current=a, profile=a, deployed=a)
    assert host.state()["quarantined"] == b and host.state()["last_error"]["kind"] == "activation"


# ---------------------------------------------------------------------------
# kexec: the boot loader's variables describe the boot before
# ---------------------------------------------------------------------------


def test_a_kexeced_boot_is_not_judged_by_the_loader_variables(host, world, server):
    a, b = world.path("a"), world.path("b")
    stage(host, b, "--reboot-mode", "kexec")
    assert "systemctl kexec" in host.calls()
    fall_back(host, a)  # the kexec'ed system did not come up; the machine is back on a
    # Stale variables from the firmware boot before the kexec: they would read as "picked by hand".
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-generation-1.conf", "nixos-generation-2.conf")}
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "kexec", env=env)
    assert r.returncode == 5, r.stderr
    assert state_gauge(host) == "boot_failed" and host.state()["boot_failure"]["choice"] == "kexec"
    assert host.profile == a and boot_default(host) == a


# ---------------------------------------------------------------------------
# FleetLock: a host moved to another group while it waits
# ---------------------------------------------------------------------------


def test_group_change_while_waiting_asks_the_new_group_and_releases_the_old(host, world, server, fleetlock):
    b = world.path("b")
    assert fl_once(host, fleetlock).returncode == 0
    fleetlock.operate("pre-reboot", "other", "default")  # group default is full
    server.pointer(b)
    assert fl_once(host, fleetlock).returncode == 0 and reboots(host) == 0
    assert host.state()["reboot_slot"]["group"] == "default"
    r = fl_once(host, fleetlock, "--fleetlock-group", "web")
    assert r.returncode == 0, r.stderr
    assert reboots(host) == 1 and fleetlock.held("web") == [lock_id(host)]
    steady = [e for e in fleetlock.events if e[1] == "steady-state" and e[3] == "default"]
    assert steady and steady[-1][2] == lock_id(host)  # the old group's slot given back
    assert host.state()["reboot_slot"]["group"] == "web"


# ---------------------------------------------------------------------------
# state.json written by the agent of 1abd54b
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


# ---------------------------------------------------------------------------
# Found by the model-based test (tests/test_model.py)
# ---------------------------------------------------------------------------


def test_suspended_settled_host_with_nothing_to_release_reports_no_waiting_release(host, world, server, fleetlock):
    """The model saw a suspended, settled host report `suspended: release the
    FleetLock slot ... waits` although it held no slot and had initialized
    FleetLock in this boot: a held step that would do nothing is no hold."""
    assert fl_once(host, fleetlock).returncode == 0  # tracking, FleetLock initialized in this boot
    suspend(host)
    r = fl_once(host, fleetlock)
    assert r.returncode == 0, r.stderr
    assert "release the FleetLock slot (once settled): waits" not in r.stderr
    assert state_gauge(host) == "up_to_date"


# ---------------------------------------------------------------------------
# Adversarial review: a failed switch deploy on a host with a reboot due
# ---------------------------------------------------------------------------


def test_failed_switch_deploy_on_a_staged_host_keeps_the_staged_boot_default(host, world, server):
    """Staged b (profile b, boot default b, a runs); c comes and its switch
    activation fails: the rollback switches back to a, which must not make a
    the boot default (the staged b would then read as a boot failure)."""
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    stage(host, b)
    host.ctl("fail").write_text(c + "\n")
    server.pointer(c)
    r = host.once(host.url, "--switch-mode", "switch")
    assert r.returncode == 5, r.stderr
    assert host.current == a and host.profile == b and boot_default(host) == b, r.stderr
    host.reboot()
    r = host.once(host.url, "--switch-mode", "switch")
    assert "BOOT FAILED" not in r.stderr and host.state()["boot_failure"] is None, r.stderr
    assert host.current == b and host.state()["deployed"] == b and host.state()["verified"] is True


def test_failed_switch_deploy_while_a_rollback_reboot_is_due_keeps_the_rollback_boot_default(host, world, server):
    """Rolled back from b (profile a, boot default a, b runs), reboot deferred
    by the window; c comes and its switch activation fails: the rollback
    switches back to b, which must not make the failed b the boot default."""
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    args = ("--switch-mode", "boot", "--reboot-mode", "reboot", *WINDOW, *CHECK)
    stage(host, b)
    host.reboot()
    host.ctl("unhealthy").write_text("")
    r = host.once(host.url, *args, env=OUTSIDE)
    assert r.returncode == 5 and host.profile == a and boot_default(host) == a and host.current == b, r.stderr
    host.ctl("unhealthy").unlink()
    host.ctl("fail").write_text(c + "\n")
    server.pointer(c)
    r = host.once(host.url, "--switch-mode", "switch", "--reboot-mode", "reboot", *WINDOW, *CHECK, env=OUTSIDE)
    assert r.returncode == 5, r.stderr
    assert host.current == b and host.profile == a and boot_default(host) == a, r.stderr
    assert json.loads(host.agent("status", "--json").stdout)["phase"] == "rolled_back_awaiting_reboot"


def test_power_loss_during_the_rollback_of_a_failed_booted_release_keeps_the_rollback_reboot(host, world, server):
    """b booted and failed its check; power is lost while the rollback's
    `switch-to-configuration boot` of a runs (the boot default is still b),
    so b boots again.  The next run finishes the rollback; the reboot into a
    is still due (this boot is not the one the rollback was waiting for)."""
    a, b = world.path("a"), world.path("b")
    args = ("--switch-mode", "boot", "--reboot-mode", "reboot", *CHECK)
    stage(host, b)
    host.reboot()
    host.ctl("unhealthy").write_text("")
    host.ctl("hang").write_text(a + "\n")
    proc = host.agent_background("--once", "--url", host.url, *args)
    wait_for(lambda: any(line.startswith(f"{a} boot") for line in host.activations()), what="the rollback")
    os.killpg(proc.pid, signal.SIGKILL)  # power loss
    proc.wait(30)
    host.kill_orphans()
    host.ctl("hang").unlink()
    host.reboot()
    assert host.current == b and host.state()["intent"]["phase"] == "rollback"
    r = host.once(host.url, *args)
    assert r.returncode == 0, r.stderr
    assert "needs a human" not in r.stderr and host.profile == a and boot_default(host) == a
    assert reboot_calls(host) == 1, r.stderr  # the rollback reboot
    host.reboot()
    assert host.once(host.url, *args).returncode == 0
    assert_host(host, current=a, profile=a, deployed=a)


def test_stop_during_an_activation_records_the_finished_deploy_and_never_reboots(host, world, server):
    """SIGTERM to the agent alone while its boot activation runs: the
    activation finishes and the deploy is recorded; the stop ends the run
    before the reboot, but what was done is reported (history, last state,
    metrics), not left for a run that may come an hour later."""
    a, b = world.path("a"), world.path("b")
    track(host)
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url, "--switch-mode", "boot", "--reboot-mode", "reboot",
                                 "--prometheus-path", "/var/lib/prometheus-node-exporter-text/nixos-autodeploy.prom")
    wait_for(lambda: host.activations(), what="the boot activation")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    host.ctl("hang").unlink()
    proc.wait(60)
    log = proc.log_path.read_text()
    assert proc.returncode == 0, log
    assert reboot_calls(host) == 0 and host.profile == b and boot_default(host) == b, log
    state = host.state()
    assert state["deployed"] == b and state["intent"] is None, log
    assert state["last_state"] == "pending_reboot", log
    assert [(e["path"], e["outcome"]) for e in state["history"]][-1] == (b, "pending_reboot"), log
    assert state_gauge(host) == "pending_reboot" and host.metrics()["nixos_autodeploy_reboot_required"] == 1


@pytest.mark.parametrize("when", ["switch", "verify"])
def test_systemctl_stop_during_a_health_check_is_a_stop_not_a_failed_check(host, world, server, when):
    """`systemctl stop` signals every process of the agent's cgroup, the
    health check command too (its own session does not take it out of the
    cgroup): a check killed by the stop is no failed check, and a healthy
    release is not rolled back and quarantined for it."""
    a, b = world.path("a"), world.path("b")
    pid = host.ctl("check.pid")
    check = ("--health-check", "echo $$ > /var/lib/standin/check.pid; sleep 20")
    if when == "switch":
        track(host)
        server.pointer(b)
        args = ("--switch-mode", "switch")
    else:
        stage(host, b)
        host.reboot()
        args = ("--switch-mode", "boot")
    proc = host.agent_background("--once", "--url", host.url, *args, *check)
    wait_for(lambda: pid.exists() and pid.read_text().strip(), what="the health check")
    proc.send_signal(signal.SIGTERM)          # systemctl stop: the agent ...
    time.sleep(0.2)
    os.killpg(int(pid.read_text()), signal.SIGTERM)  # ... and the rest of its cgroup
    proc.wait(30)
    log = proc.log_path.read_text()
    assert "ROLLING BACK" not in log and host.state()["quarantined"] is None, log
    assert host.current == b and host.profile == b, log
    pid.unlink()
    r = host.once(host.url, *args, "--health-check", "true")
    assert r.returncode == 0, r.stderr
    assert_host(host, current=b, profile=b, deployed=b)
    assert host.state()["verified"] is True


@pytest.mark.parametrize("how", ["sigterm", "systemctl_stop"])
def test_stop_while_kexec_loads_never_reboots(host, world, server, how):
    """A stop request that arrives while `kexec --load` runs (after the
    reboot gate said yes) ends the run: no kexec, and no "kexec failed:
    falling back to a normal reboot" when the stop killed kexec too."""
    b = world.path("b")
    track(host)
    host.ctl("kexec-hang").write_text("")
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url, "--switch-mode", "boot", "--reboot-mode", "kexec")
    wait_for(lambda: any(c.startswith("kexec --load") for c in host.calls()), what="kexec --load")
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        host.stop_unit(proc)
    time.sleep(0.3)
    host.ctl("kexec-hang").unlink()
    proc.wait(30)
    log = proc.log_path.read_text()
    assert reboot_calls(host) == 0, log
    assert host.profile == b and boot_default(host) == b and host.state()["deployed"] == b, log
    state = host.state()  # the deploy done before the stop is reported
    assert state["history"][-1]["path"] == b and state["history"][-1]["outcome"] == "pending_reboot"
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "kexec")
    assert r.returncode == 0 and reboot_calls(host) == 1, r.stderr  # the next run reboots


def test_an_activation_killed_by_sigterm_after_much_output_is_a_failed_activation(host, world, server):
    """systemd-run's report comes last, after the unit's own output: an
    activation that wrote more than the agent reads of it is still judged by
    that report."""
    a, b = world.path("a"), world.path("b")
    track(host)
    hook = host.ctl("activate-hook")
    hook.write_text("#!/bin/sh\nhead -c 1200000 /dev/zero | tr '\\0' x >&2\necho >&2\n")
    hook.chmod(0o755)
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url)
    pidfile = host.run_dir / "standin-units" / "nixos-autodeploy-activation.pid"
    wait_for(lambda: host.activations() and pidfile.exists(), what="the activation")
    time.sleep(0.5)
    os.killpg(int(pidfile.read_text()), signal.SIGTERM)
    proc.wait(60)
    host.ctl("hang").unlink()
    hook.unlink()
    assert proc.returncode == 5
    assert_host(host, current=a, profile=a, deployed=a)
    assert host.state()["quarantined"] == b and host.state()["last_error"]["kind"] == "activation"


def test_an_activation_unit_that_outlasts_the_recovery_wait_is_a_failure_not_a_rollback(host, world, server,
                                                                                         tmp_path, monkeypatch):
    """The agent died during an activation whose unit keeps running; the next
    run waits for the unit (here 3 s instead of 600 s) and gives up: nothing
    was rolled back, so the run is `failed` (not `rolled_back`), the intent
    stays, and the run after the unit has ended recovers."""
    import world as world_mod
    text = world_mod.AGENT.read_text()
    assert "ACTIVATION_WAIT_SECONDS: Final = 600" in text
    short = tmp_path / "autodeploy.py"
    short.write_text(text.replace("ACTIVATION_WAIT_SECONDS: Final = 600", "ACTIVATION_WAIT_SECONDS: Final = 3"))
    monkeypatch.setattr(world_mod, "AGENT", short)
    b = world.path("b")
    track(host)
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url)
    pidfile = host.run_dir / "standin-units" / "nixos-autodeploy-activation.pid"
    wait_for(lambda: host.activations() and pidfile.exists(), what="the activation")
    os.kill(proc.pid, signal.SIGKILL)          # the agent dies; its activation unit keeps running
    proc.wait(30)
    r = host.once(host.url)
    state = host.state()
    assert r.returncode == 5, r.stderr
    assert "still running" in r.stderr and "recovered when it has ended" in r.stderr
    assert state["last_state"] == "failed" and state["last_error"]["kind"] == "deploy"
    assert state["rollbacks_total"] == 0 and state["intent"] is not None
    assert host.metrics()["nixos_autodeploy_rollbacks_total"] == 0
    host.kill_orphans()
    host.ctl("hang").unlink()
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.state()["intent"] is None
