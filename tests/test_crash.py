"""Crash safety against real nix: SIGKILL at every step of a deploy, power
loss, stop requests (SIGTERM to the agent, `systemctl stop` to its unit, a
killed activation) and a full /run; after each, the host is as it was or as
the deploy left it, and a normal cycle converges."""

from __future__ import annotations

import os
import signal
import time

import pytest

from util import (CHECK, assert_host, boot_default, fill_leaving, fl_once, kill, quarantined, reboot_calls, stage,
                  state_gauge, stop_during_download, track, wait_for)


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


# ---------------------------------------------------------------------------
# Power loss, a full /run, stop requests (issue #17): the lifecycle's crash joints
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
    proc = stop_during_download(host, server, b, how)
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


# ---------------------------------------------------------------------------
# Stops and a full /run during an activation (adversarial review)
# ---------------------------------------------------------------------------


def test_sigterm_while_recover_waits_for_the_activation_unit(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    host.ctl("hang").write_text(b + "\n")
    try:
        first = host.agent_background("--once", "--url", host.url)
        wait_for(lambda: host.activations(), what="the activation")
        first.kill()                        # the unit keeps running, as under systemd
        first.wait(10)
        intent = host.state()["intent"]
        assert intent and intent["phase"] == "activate"
        second = host.agent_background("--once", "--url", host.url)
        wait_for(lambda: "still running" in second.log_path.read_text(), what="the wait")
        started = time.monotonic()
        second.send_signal(signal.SIGTERM)
        second.wait(10)
        assert time.monotonic() - started < 3
        assert host.state()["intent"] == intent   # nothing changed; the next run converges
    finally:
        host.ctl("hang").unlink()
    host.kill_orphans()


def test_full_run_directory_during_activation_still_deploys(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    run_dir = host.small_disk("/run/nixos-autodeploy", "16k")
    fill_leaving(run_dir, 0)
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert "cannot write /run/nixos-autodeploy/activating" in r.stderr
    assert host.current == b and host.profile == b and host.state()["intent"] is None
