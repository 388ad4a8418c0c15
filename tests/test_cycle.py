"""The deploy cycle against real nix: the decision table row by row, switch
modes, boot and reboot, health checks with rollback and quarantine, reboot
windows, a manual rollback as a verdict (issue #21, part 3), and the joints
of the lifecycle (issue #17): holds, dry-run = the plan, suspend."""

from __future__ import annotations

import json
import time

import pytest

from util import boot_default, efivars, fall_back, stage
from util import (CHECK, INSIDE, OUTSIDE, WINDOW, assert_host, lock_id, machine_id, promtool_ok, quarantined,
                  reboot_calls, state_gauge, suspend, track)
from world import METRICS


def manual(host, system: str, action: str) -> None:
    """What a human does with nixos-rebuild (no agent involved)."""
    set_profile = action in ("switch", "boot")
    host.sh(f"set -e; nix-store --realise {system} >/dev/null; "
            + (f"/usr/bin/nix-env -p /nix/var/nix/profiles/system --set {system}; " if set_profile else "")
            + f"{system}/bin/switch-to-configuration {action}")


# ---------------------------------------------------------------------------
# Decision table, row by row
# ---------------------------------------------------------------------------


def test_row1_no_record_current_is_upstream_starts_tracking(host, world):
    a = world.path("a")
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.state()["deployed"] == a
    assert state_gauge(host) == "tracking"
    assert host.metrics()["nixos_autodeploy_dirty"] == 0
    assert host.activations() == [] and host.calls() == []
    promtool_ok(host)


def test_row2_ours_up_to_date_runs_nothing(host, world):
    assert host.once(host.url).returncode == 0
    r = host.once(host.url)
    assert r.returncode == 0
    assert "plan: phase: settled; upstream: deployed: up to date" in r.stderr
    assert state_gauge(host) == "up_to_date"
    assert host.activations() == [] and host.calls() == []
    assert not host.link("/run/upstream-system")  # no nix command ran, not even a realise


def test_row3_ours_new_upstream_deploys(host, world, server):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0
    assert not host.store_has(b)
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and host.state()["deployed"] == b
    assert host.store_has(b)  # substituted from the loopback cache
    assert host.link("/run/upstream-system") == b  # GC root
    assert host.activations() == [f"{b} switch marker=1"]
    call = host.calls()[0].split()
    assert call[:1] == ["systemd-run"] and "--unit=nixos-autodeploy-activation" in call
    assert {"--wait", "--pipe", "--collect", "--service-type=exec"} <= set(call)
    assert "--setenv=NIXOS_AUTODEPLOY_ACTIVATION=1" in call
    assert call[-2:] == [f"{b}/bin/switch-to-configuration", "switch"]
    m = host.metrics()
    assert state_gauge(host) == "deployed"
    assert m["nixos_autodeploy_deploys_total"] == 1 and m["nixos_autodeploy_last_run_success"] == 1
    info = [k for k in m if k.startswith("nixos_autodeploy_info{")][0]
    assert f'deployed_generation="{b.split("/")[-1]}"' in info
    assert f'booted_generation="{a.split("/")[-1]}"' in info
    promtool_ok(host)


def test_row4_not_ours_but_runs_upstream_resumes_tracking(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0  # tracking a
    manual(host, b, "switch")  # someone deployed b by hand ...
    server.pointer(b)          # ... and upstream caught up
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert "resume tracking" in r.stderr
    assert host.state()["deployed"] == b and host.metrics()["nixos_autodeploy_dirty"] == 0
    assert state_gauge(host) == "tracking"


@pytest.mark.parametrize("action", ["switch", "test", "boot"])
def test_row5_manual_deploy_is_dirty_and_left_alone(host, world, server, action):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    assert host.once(host.url).returncode == 0  # tracking a
    manual(host, c, action)
    before = (host.current, host.profile)
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr  # dirty is a completed cycle
    assert (host.current, host.profile) == before
    assert host.state()["deployed"] == a
    assert not host.store_has(b)  # nothing realised
    assert host.metrics()["nixos_autodeploy_dirty"] == 1
    assert state_gauge(host) == "dirty"
    promtool_ok(host)


def test_row5_no_record_and_current_differs_is_dirty(host, world, server):
    server.pointer(world.path("b"))
    r = host.once(host.url)
    assert r.returncode == 0
    assert host.current == world.path("a") and host.state().get("deployed") is None
    assert host.metrics()["nixos_autodeploy_dirty"] == 1


def test_force_deploys_on_a_dirty_host(host, world, server):
    b, c = world.path("b"), world.path("c")
    assert host.once(host.url).returncode == 0
    manual(host, c, "switch")
    server.pointer(b)
    r = host.once(host.url, "--force")
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and host.state()["deployed"] == b
    assert host.metrics()["nixos_autodeploy_dirty"] == 0


def test_dry_run_changes_nothing(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    state_before = host.state()
    metrics_before = host.metrics_text()
    server.pointer(b)
    r = host.once(host.url, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "phase: settled; upstream: new: upstream changed" in r.stdout and f"1. deploy {b} (switch)" in r.stdout
    assert host.current == world.path("a") and host.profile == world.path("a")
    assert host.state() == state_before and host.metrics_text() == metrics_before
    assert not host.store_has(b) and host.activations() == []


# ---------------------------------------------------------------------------
# Switch modes, boot + reboot, reboot requests
# ---------------------------------------------------------------------------


def test_boot_mode_then_second_run_then_reboot_then_next_upstream(host, world, server):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert host.profile == b and host.current == a
    assert host.ctl("boot-default").read_text().strip() == b
    assert host.activations() == [f"{b} boot marker=1"]
    assert state_gauge(host) == "pending_reboot"
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 1
    assert not any("reboot" in c_ for c_ in host.calls())  # no --reboot-mode: never reboots

    # A second run before the reboot: not dirty, no redeploy.
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert host.metrics()["nixos_autodeploy_dirty"] == 0
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 1
    assert state_gauge(host) == "pending_reboot"
    assert len(host.activations()) == 1

    host.reboot()
    assert host.current == host.booted == host.profile == b
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 0
    assert host.metrics()["nixos_autodeploy_dirty"] == 0

    server.pointer(c)
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert host.profile == c and host.state()["deployed"] == c


def test_smart_switches_when_kernel_is_unchanged(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    assert host.once(host.url, "--switch-mode", "smart").returncode == 0
    assert host.activations() == [f"{b} switch marker=1"] and host.current == b


def test_smart_boots_when_kernel_changes(host, world, server):
    k = world.path("k")
    assert host.once(host.url).returncode == 0
    server.pointer(k)
    r = host.once(host.url, "--switch-mode", "smart")
    assert r.returncode == 0, r.stderr
    assert "kernel" in r.stderr and "staging for the next boot" in r.stderr
    assert host.activations() == [f"{k} boot marker=1"]
    assert host.profile == k and host.current == world.path("a")
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 1


def test_reboot_mode_requests_a_reboot_after_boot(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot")
    assert r.returncode == 0, r.stderr
    assert host.calls()[-1] == "systemctl reboot"


def test_reboot_mode_does_not_reboot_after_switch(host, world, server):
    assert host.once(host.url).returncode == 0
    server.pointer(world.path("b"))
    assert host.once(host.url, "--reboot-mode", "reboot").returncode == 0
    assert not any(c.startswith("systemctl") for c in host.calls())


def test_kexec_loads_the_new_kernel_then_kexecs(host, world, server):
    k = world.path("k")
    assert host.once(host.url).returncode == 0
    server.pointer(k)
    r = host.once(host.url, "--switch-mode", "smart", "--reboot-mode", "kexec")
    assert r.returncode == 0, r.stderr
    calls = host.calls()
    assert calls[-2] == (f"kexec --load {k}/kernel --initrd={k}/initrd "
                         f"--append=console=ttyS0 loglevel=4 init={k}/init")
    assert calls[-1] == "systemctl kexec"


def test_kexec_load_failure_falls_back_to_reboot(host, world, server):
    host.ctl("kexec-fail").write_text("")
    assert host.once(host.url).returncode == 0
    server.pointer(world.path("k"))
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "kexec")
    assert r.returncode == 0, r.stderr
    assert "falling back to a normal reboot" in r.stderr
    assert host.calls()[-1] == "systemctl reboot"
    assert "systemctl kexec" not in host.calls()


def test_failed_activation_is_never_recorded(host, world, server):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0
    host.ctl("fail").write_text(b + "\n")
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 5, r.stderr
    assert "rolled back" in r.stderr
    assert host.current == a and host.profile == a and host.state()["deployed"] == a
    assert host.metrics()["nixos_autodeploy_last_run_success"] == 0
    assert state_gauge(host) == "rolled_back"
    promtool_ok(host)


# ---------------------------------------------------------------------------
# Locking
# ---------------------------------------------------------------------------


def test_two_concurrent_runs_second_exits_at_once(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    first = host.agent_background("--once", "--url", host.url)
    try:
        deadline = time.monotonic() + 30
        while not host.activations() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.activations(), "first run never reached activation"
        started = time.monotonic()
        second = host.once(host.url)
        assert second.returncode == 6
        assert "another run holds the" in second.stderr
        assert time.monotonic() - started < 5
        assert host.state()["deployed"] == world.path("a")
    finally:
        host.ctl("hang").unlink()
        first.wait(timeout=60)
    assert first.returncode == 0, first.log_path.read_text()
    assert host.current == b and host.state()["deployed"] == b


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
# Across reboots, reboot windows
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
# A manual rollback is a verdict (issue #21, part 3)
# ---------------------------------------------------------------------------


ACCEPT = "--accept-manual-rollback"


def deploy(host, server, system: str, *args: str) -> None:
    server.pointer(system)
    r = host.once(host.url, *args)
    assert r.returncode == 0, r.stderr
    assert host.current == system


def switch_rollback(host) -> None:
    """What `nixos-rebuild switch --rollback` does: the profile goes back one
    generation, then that system's switch-to-configuration switch runs."""
    host.sh("/usr/bin/nix-env -p /nix/var/nix/profiles/system --rollback >/dev/null 2>&1 && "
            "/nix/var/nix/profiles/system/bin/switch-to-configuration switch >/dev/null")


def a_b_c_then_rolled_back(host, world, server, *args: str) -> tuple[str, str, str]:
    """The agent deployed b, then c; an operator rolls the host back to b by hand."""
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    track(host)
    deploy(host, server, b, *args)
    deploy(host, server, c, *args)
    switch_rollback(host)
    assert host.current == host.profile == b and host.state()["deployed"] == c
    return a, b, c


def test_without_the_option_a_hand_rollback_leaves_the_host_dirty(host, world, server):
    a, b, c = a_b_c_then_rolled_back(host, world, server)
    for upstream in (c, world.path("d")):  # the rolled-back build, then the next one
        server.pointer(upstream)
        r = host.once(host.url)
        assert r.returncode == 0, r.stderr
        assert state_gauge(host) == "dirty" and host.metrics()["nixos_autodeploy_dirty"] == 1
        assert "without --accept-manual-rollback: change nothing" in r.stderr
        assert_host(host, current=b, profile=b, deployed=c)
        state = host.state()
        assert state["quarantined"] is None and state.get("manual_rollbacks_total", 0) == 0
        assert host.metrics()["nixos_autodeploy_manual_rollbacks_total"] == 0
    assert json.loads(host.agent("status", "--json").stdout)["phase"] == "rolled_back_by_hand"


def test_with_the_option_the_rolled_back_build_is_quarantined_and_the_next_one_deployed(host, world, server):
    a, b, c = a_b_c_then_rolled_back(host, world, server, ACCEPT)
    activations = len(host.activations())
    server.pointer(c)  # CI still publishes the build that was rolled back
    r = host.once(host.url, ACCEPT)
    assert r.returncode == 0, r.stderr
    assert "MANUAL ROLLBACK" in r.stderr
    assert_host(host, current=b, profile=b, deployed=b)  # tracked: deployed = current
    assert len(host.activations()) == activations  # nothing activated: the operator's choice stands
    state = host.state()
    assert state["quarantined"] == c and "rolled back by hand" in state["quarantine_reason"]
    assert state["manual_rollbacks_total"] == 1
    assert state["manual_rollback"]["path"] == c and state["manual_rollback"]["to"] == b
    assert state["manual_rollback"]["time"] > 0
    entry = state["history"][-1]
    assert (entry["action"], entry["path"], entry["outcome"]) == ("manual_rollback", c, "rolled_back")
    assert state_gauge(host) == "quarantined"
    m = host.metrics()
    assert m["nixos_autodeploy_manual_rollbacks_total"] == 1 and m["nixos_autodeploy_dirty"] == 0
    assert quarantined(host) == {f'nixos_autodeploy_quarantined{{path="{c}"}}': 1}
    promtool_ok(host)
    status = host.agent("status")
    assert f"switched back by hand from {c} to {b} (1 in all)" in status.stdout, status.stdout
    fields = json.loads(host.agent("status", "--json").stdout)
    assert fields["phase"] == "settled" and fields["manual_rollbacks_total"] == 1
    assert fields["manual_rollback"]["path"] == c
    # Recorded once: the next cycles are settled and quarantined, never counted again.
    r = host.once(host.url, ACCEPT)
    assert r.returncode == 0 and "MANUAL ROLLBACK" not in r.stderr, r.stderr
    assert host.state()["manual_rollbacks_total"] == 1 and host.current == b
    # CI publishes the fix: it is deployed, the quarantine is lifted.
    d = world.path("d")
    deploy(host, server, d, ACCEPT)
    assert_host(host, current=d, profile=d, deployed=d)
    assert host.state()["quarantined"] is None and state_gauge(host) == "deployed"


def test_the_next_build_already_published_is_deployed_in_the_same_cycle(host, world, server):
    a, b, c = a_b_c_then_rolled_back(host, world, server, ACCEPT)
    d = world.path("d")
    server.pointer(d)
    r = host.once(host.url, ACCEPT)
    assert r.returncode == 0, r.stderr
    assert "MANUAL ROLLBACK" in r.stderr
    assert_host(host, current=d, profile=d, deployed=d)
    state = host.state()
    assert [e["action"] for e in state["history"][-2:]] == ["manual_rollback", "switch"]
    assert state["manual_rollbacks_total"] == 1 and state_gauge(host) == "deployed"


@pytest.mark.parametrize("to", ["never-deployed", "only-tracked"])
def test_a_hand_switch_to_a_system_the_agent_never_deployed_stays_dirty(host, world, server, to):
    a, b, d = world.path("a"), world.path("b"), world.path("d")
    track(host)
    deploy(host, server, b, ACCEPT)
    if to == "never-deployed":  # nixos-rebuild switch to something built elsewhere
        host.sh(f"nix-store --realise {d} >/dev/null 2>&1 && "
                f"/usr/bin/nix-env -p /nix/var/nix/profiles/system --set {d} && "
                f"{d}/bin/switch-to-configuration switch >/dev/null")
    else:  # back to what the host ran when the agent adopted it: tracked, never deployed by it
        switch_rollback(host)
    other = d if to == "never-deployed" else a
    assert host.current == host.profile == other
    r = host.once(host.url, ACCEPT)
    assert r.returncode == 0, r.stderr
    assert state_gauge(host) == "dirty" and "MANUAL ROLLBACK" not in r.stderr
    assert_host(host, current=other, profile=other, deployed=b)
    assert host.state()["quarantined"] is None and host.metrics()["nixos_autodeploy_manual_rollbacks_total"] == 0
    assert json.loads(host.agent("status", "--json").stdout)["phase"] == "dirty"


def test_dry_run_prints_the_plan_and_changes_nothing(host, world, server):
    a, b, c = a_b_c_then_rolled_back(host, world, server, ACCEPT)
    before = host.state()
    r = host.once(host.url, ACCEPT, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("phase: rolled_back_by_hand; upstream: deployed:"), r.stdout
    assert lines[1] == (f"1. accept the manual rollback to {b.split('/')[-1]}: quarantine {c.split('/')[-1]}, "
                        f"record {b.split('/')[-1]} as deployed (then plan again)"), r.stdout
    assert host.state() == before and host.current == b
    off = host.once(host.url, "--dry-run")  # without the option: the dirty plan
    assert "nothing to do" in off.stdout and "without --accept-manual-rollback" in off.stdout, off.stdout


def test_suspend_holds_the_verdict(host, world, server):
    a, b, c = a_b_c_then_rolled_back(host, world, server, ACCEPT)
    assert host.agent("suspend", "--reason", "maintenance").returncode == 0
    r = host.once(host.url, ACCEPT)
    assert r.returncode == 0 and state_gauge(host) == "suspended", r.stderr
    assert host.state()["deployed"] == c and host.state()["quarantined"] is None
    assert host.agent("resume").returncode == 0
    r = host.once(host.url, ACCEPT)
    assert r.returncode == 0 and host.state()["quarantined"] == c and host.state()["deployed"] == b, r.stderr


# ---------------------------------------------------------------------------
# The lifecycle's joints (issue #17): a deferred rollback reboot, the previous
# deploy followed through while the next release is held, dry-run = the plan,
# suspend, kexec, a failed switch on a host with a reboot due
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
