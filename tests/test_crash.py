"""Safety against real nix: health checks, rollback, quarantine, reboots
across boots, reboot windows, and SIGKILL at every step of a deploy."""

from __future__ import annotations

import time

import pytest

from util import assert_host, kill, promtool_ok, quarantined, state_gauge, track, wait_for


# ---------------------------------------------------------------------------
# Rollback after a switch, quarantine
# ---------------------------------------------------------------------------


def test_activation_exit_4_rolls_back_and_quarantines(host, world, server):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    track(host)
    host.ctl("fail").write_text(b + "\n")
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 5, r.stderr
    assert "ROLLING BACK" in r.stderr and "exited with 4" in r.stderr
    assert_host(host, current=a, profile=a, deployed=a)
    assert host.activations() == [f"{b} switch marker=1", f"{a} switch marker=1"]
    assert host.ctl("boot-default").read_text().strip() == a
    m = host.metrics()
    assert m["nixos_autodeploy_rollbacks_total"] == 1
    assert quarantined(host) == {f'nixos_autodeploy_quarantined{{path="{b}"}}': 1}
    assert state_gauge(host) == "rolled_back"
    promtool_ok(host)

    # The next cycle does not try b again.
    host.ctl("fail").unlink()
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert "quarantined" in r.stderr
    assert len(host.activations()) == 2
    assert state_gauge(host) == "quarantined"
    assert host.metrics()["nixos_autodeploy_rollbacks_total"] == 1  # kept across runs
    assert "quarantined" in host.agent("status").stdout

    # A new upstream lifts the quarantine and deploys.
    server.pointer(c)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert_host(host, current=c, profile=c, deployed=c)
    assert quarantined(host) == {'nixos_autodeploy_quarantined{path=""}': 0}


def test_force_retries_a_quarantined_upstream(host, world, server):
    b = world.path("b")
    track(host)
    host.ctl("fail").write_text(b + "\n")
    server.pointer(b)
    assert host.once(host.url).returncode == 5
    host.ctl("fail").unlink()
    r = host.once(host.url, "--force")
    assert r.returncode == 0, r.stderr
    assert_host(host, current=b, profile=b, deployed=b)


def test_failing_health_check_rolls_back(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    server.pointer(b)
    r = host.once(host.url, "--health-check", "true", "--health-check", "test -e /run/no-such-thing")
    assert r.returncode == 5, r.stderr
    assert "health check 'test -e /run/no-such-thing' exited with 1" in r.stderr
    assert_host(host, current=a, profile=a, deployed=a)
    assert host.metrics()["nixos_autodeploy_rollbacks_total"] == 1
    assert 'kind="health"' in host.metrics_text()


def test_health_check_timeout_rolls_back(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    server.pointer(b)
    started = time.monotonic()
    r = host.once(host.url, "--health-check", "sleep 30", "--health-timeout", "1")
    assert r.returncode == 5, r.stderr
    assert time.monotonic() - started < 20
    assert "timed out" in r.stderr
    assert_host(host, current=a, profile=a, deployed=a)


def test_passing_health_checks_see_the_new_system(host, world, server):
    b = world.path("b")
    track(host)
    server.pointer(b)
    r = host.once(host.url, "--health-check", f"test $(readlink /run/current-system) = {b}")
    assert r.returncode == 0, r.stderr
    assert_host(host, current=b, profile=b, deployed=b)


def test_connectivity_lost_after_switch_rolls_back(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    # b's activation "breaks the network": the pointer server stops answering.
    server.set("/break", "ok", hook=lambda _headers: setattr(server, "unreachable", True))
    hook = host.ctl("activate-hook")
    hook.write_text(f'#!/bin/sh\n[ "$1" = "{b}" ] && curl -fsS {server.base}/break >/dev/null || true\n')
    hook.chmod(0o755)
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 5, r.stderr
    assert "connectivity check failed" in r.stderr and "HTTP 503" in r.stderr
    assert_host(host, current=a, profile=a, deployed=a)
    assert state_gauge(host) == "rolled_back"

    # Connectivity back: b stays quarantined.
    server.unreachable = False
    assert host.once(host.url).returncode == 0
    assert_host(host, current=a, profile=a, deployed=a)
    assert state_gauge(host) == "quarantined"


def test_no_connectivity_check_flag(host, world, server):
    b = world.path("b")
    track(host)
    server.set("/break", "ok", hook=lambda _headers: setattr(server, "unreachable", True))
    hook = host.ctl("activate-hook")
    hook.write_text(f'#!/bin/sh\ncurl -fsS {server.base}/break >/dev/null || true\n')
    hook.chmod(0o755)
    server.pointer(b)
    r = host.once(host.url, "--no-connectivity-check")
    assert r.returncode == 0, r.stderr
    assert_host(host, current=b, profile=b, deployed=b)


# ---------------------------------------------------------------------------
# Across reboots
# ---------------------------------------------------------------------------


def test_boot_deploy_reboot_failing_check_rolls_profile_back_and_reboots(host, world, server):
    a, b = world.path("a"), world.path("b")
    check = "test ! -e /var/lib/standin/unhealthy"
    track(host)
    server.pointer(b)
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot", "--health-check", check)
    assert r.returncode == 0, r.stderr
    assert host.calls().count("systemctl reboot") == 1
    host.ctl("unhealthy").write_text("")
    host.reboot()
    assert host.current == b
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot", "--health-check", check)
    assert r.returncode == 5, r.stderr
    assert "failed its health checks after the reboot" in r.stderr
    assert host.profile == a and host.current == b
    assert host.ctl("boot-default").read_text().strip() == a
    assert host.calls().count("systemctl reboot") == 2
    assert host.state()["deployed"] == a
    m = host.metrics()
    assert m["nixos_autodeploy_rollbacks_total"] == 1 and m["nixos_autodeploy_reboot_required"] == 1
    assert quarantined(host) == {f'nixos_autodeploy_quarantined{{path="{b}"}}': 1}

    # Back in a after the reboot: tracking a, b stays quarantined.
    host.reboot()
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot", "--health-check", check)
    assert r.returncode == 0, r.stderr
    assert_host(host, current=a, profile=a, deployed=a)
    assert state_gauge(host) == "quarantined"
    assert host.metrics()["nixos_autodeploy_dirty"] == 0
    assert host.calls().count("systemctl reboot") == 2


def test_boot_deploy_verified_after_reboot(host, world, server):
    b = world.path("b")
    track(host)
    server.pointer(b)
    assert host.once(host.url, "--switch-mode", "boot", "--health-check", "true").returncode == 0
    assert host.state()["verified"] is False
    host.reboot()
    r = host.once(host.url, "--switch-mode", "boot", "--health-check", "true")
    assert r.returncode == 0, r.stderr
    assert "healthy after the reboot" in r.stderr
    assert host.state()["verified"] is True
    assert_host(host, current=b, profile=b, deployed=b)


def test_booted_previous_system_is_a_boot_failure_not_dirty(host, world, server):
    """Issue #13: a boot loader fallback is a failed deploy, reported once
    (tests/test_boot.py has the details), never dirty, never a reboot loop."""
    a, b = world.path("a"), world.path("b")
    track(host)
    server.pointer(b)
    assert host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot").returncode == 0
    host.ctl("boot-default").write_text(a + "\n")  # the boot loader fell back to a
    host.reboot()
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot")
    assert r.returncode == 5, r.stderr
    assert state_gauge(host) == "boot_failed"
    for _ in range(2):
        assert host.metrics()["nixos_autodeploy_dirty"] == 0
        assert host.metrics()["nixos_autodeploy_reboot_required"] == 0
        r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot")
        assert r.returncode == 0, r.stderr
        assert state_gauge(host) == "quarantined"
    assert host.calls().count("systemctl reboot") == 1  # no reboot loop
    assert '"reboot_required": false' in host.agent("status", "--json").stdout
    assert "boot loader fallback" in host.agent("status").stdout


@pytest.mark.parametrize("window,now,reboots", [
    ("02:00-04:00", "2026-11-22T12:00:00", False),
    ("02:00-04:00", "2026-11-22T02:00:00", True),   # start inclusive
    ("02:00-04:00", "2026-11-22T04:00:00", False),  # end exclusive
    ("23:00-01:00", "2026-11-22T00:30:00", True),   # wraps past midnight
    ("23:00-01:00", "2026-11-22T22:59:00", False),
])
def test_reboot_window(host, world, server, window, now, reboots):
    track(host)
    server.pointer(world.path("b"))
    args = ("--switch-mode", "boot", "--reboot-mode", "reboot", "--reboot-window", window)
    r = host.once(host.url, *args, env={"NIXOS_AUTODEPLOY_NOW": now})
    assert r.returncode == 0, r.stderr
    assert ("systemctl reboot" in host.calls()) == reboots
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 1
    if not reboots:
        assert "outside the reboot window" in r.stderr


def test_deferred_reboot_happens_in_a_later_cycle_inside_the_window(host, world, server):
    track(host)
    server.pointer(world.path("b"))
    args = ("--switch-mode", "boot", "--reboot-mode", "reboot", "--reboot-window", "02:00-04:00")
    assert host.once(host.url, *args, env={"NIXOS_AUTODEPLOY_NOW": "2026-11-22T13:00:00"}).returncode == 0
    assert host.once(host.url, *args, env={"NIXOS_AUTODEPLOY_NOW": "2026-11-22T20:00:00"}).returncode == 0
    assert "systemctl reboot" not in host.calls()
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 1
    r = host.once(host.url, *args, env={"NIXOS_AUTODEPLOY_NOW": "2026-11-23T03:10:00"})
    assert r.returncode == 0, r.stderr
    assert host.calls().count("systemctl reboot") == 1
    assert len(host.activations()) == 1  # no redeploy, only the reboot


# ---------------------------------------------------------------------------
# SIGKILL at each step of a deploy, then a normal cycle converges
# ---------------------------------------------------------------------------


def test_sigkill_while_fetching(host, world, server):
    b = world.path("b")
    track(host)
    server.pointer(b, delay=20)
    proc = host.agent_background("--once", "--url", host.url)
    wait_for(lambda: sum(r["path"] == "/pointer" for r in server.requests) >= 2, what="the fetch")
    kill(proc)
    assert_host(host, current=world.path("a"), profile=world.path("a"), deployed=world.path("a"))
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert_host(host, current=b, profile=b, deployed=b)


def test_sigkill_while_realising(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    server.cache_delay = 5
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url)
    wait_for(lambda: any(r["path"].startswith("/cache/") for r in server.requests), what="the realise")
    kill(proc)
    assert_host(host, current=a, profile=a, deployed=a)
    server.cache_delay = 0
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert_host(host, current=b, profile=b, deployed=b)


def test_sigkill_between_profile_and_activation(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    host.ctl("hang-after-nix-env").write_text("")
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url)
    wait_for(lambda: host.profile == b, what="the profile switch")
    kill(proc)
    host.ctl("hang-after-nix-env").unlink()
    assert host.current == a and host.profile == b and host.state()["intent"]["phase"] == "profile"
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert "interrupted deploy" in r.stderr
    assert_host(host, current=b, profile=b, deployed=b)
    assert host.metrics()["nixos_autodeploy_rollbacks_total"] == 0
    assert host.activations() == [f"{b} switch marker=1"]


def test_sigkill_during_activation_that_then_completes(host, world, server):
    b = world.path("b")
    track(host)
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url)
    wait_for(lambda: host.activations(), what="the activation")
    kill(proc)
    assert host.state()["intent"]["phase"] == "activate"
    host.ctl("hang").unlink()  # the transient unit outlives the agent and finishes
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert "active and healthy" in r.stderr
    assert_host(host, current=b, profile=b, deployed=b)
    assert host.metrics()["nixos_autodeploy_rollbacks_total"] == 0
    assert host.metrics()["nixos_autodeploy_deploys_total"] == 1


def test_sigkill_during_activation_that_dies_too(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url)
    wait_for(lambda: host.activations(), what="the activation")
    kill(proc)
    host.kill_orphans()  # power loss: the activation never finished
    host.ctl("hang").unlink()
    assert host.current == a and host.profile == b
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert "ROLLING BACK" in r.stderr
    # Rolled back to a, then the same cycle deployed b again.
    assert_host(host, current=b, profile=b, deployed=b)
    assert host.metrics()["nixos_autodeploy_rollbacks_total"] == 1


def test_sigkill_during_health_check_before_recording(host, world, server):
    b = world.path("b")
    track(host)
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url, "--health-check", "sleep 60")
    wait_for(lambda: host.state().get("intent", {}) and host.state()["intent"]["phase"] == "check",
             what="the health check")
    kill(proc)
    assert host.current == b and host.state()["deployed"] == world.path("a")
    r = host.once(host.url, "--health-check", "true")
    assert r.returncode == 0, r.stderr
    assert_host(host, current=b, profile=b, deployed=b)
    assert host.metrics()["nixos_autodeploy_rollbacks_total"] == 0


def test_sigkill_during_health_check_then_check_fails(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    server.pointer(b)
    proc = host.agent_background("--once", "--url", host.url, "--health-check", "sleep 60")
    wait_for(lambda: host.state().get("intent", {}) and host.state()["intent"]["phase"] == "check",
             what="the health check")
    kill(proc)
    r = host.once(host.url, "--health-check", "false")
    assert r.returncode == 5, r.stderr  # the recovery finished the deploy's checks, which failed
    assert "ROLLING BACK" in r.stderr
    assert_host(host, current=a, profile=a, deployed=a)
    assert host.metrics()["nixos_autodeploy_rollbacks_total"] == 1
    assert state_gauge(host) == "rolled_back"
    r = host.once(host.url, "--health-check", "false")
    assert r.returncode == 0, r.stderr  # b stays quarantined: no deploy/rollback loop
    assert state_gauge(host) == "quarantined"
