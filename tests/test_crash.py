"""Crash safety against real nix: SIGKILL at every step of a deploy, power
loss, stop requests (SIGTERM to the agent, `systemctl stop` to its unit, a
killed activation) and full disks; after each, the host is as it was or as
the deploy left it, and a normal cycle converges."""

from __future__ import annotations

from util import assert_host, kill, state_gauge, track, wait_for


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
