"""A manual rollback is a verdict (issue #21, part 3), against real nix.

`nixos-rebuild switch --rollback` moves the system profile to the previous
generation and switches to it.  Without --accept-manual-rollback the host is
then dirty until someone intervenes (the original's rule).  With it, a switch
back to a system this agent deployed earlier quarantines the build it
replaced, keeps the host tracked, is reported (history, metric, status) and
the next build CI publishes is deployed.  A hand switch to anything else
stays dirty.
"""

from __future__ import annotations

import json

import pytest

from util import assert_host, promtool_ok, quarantined, state_gauge, track

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
