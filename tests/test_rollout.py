"""Rollout waves and the pause switch (issue #14, part 1).

The share test drives the agent's own functions over 1,000 host names and
checks them against the rule written down independently here; the others run
the real agent against real nix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from util import bucket, promtool_ok, state_gauge
from world import AGENT, REPO

sys.path.insert(0, str(REPO))
import autodeploy  # noqa: E402

START = datetime(2026, 11, 23, 6, 0, tzinfo=timezone.utc)
DAY = timedelta(hours=24)


def expected_percent(start_percent: float, at: datetime) -> float:
    if at <= START:
        return start_percent
    return min(100.0, start_percent + (100 - start_percent) * (at - START) / DAY)


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S+00:00")


def ramp_pointer(path: str, percent: str = "5%", **extra: str) -> str:
    lines = [path, f"rollout: {percent}", f"rollout-start: {iso(START)}", "rollout-duration: 24h"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def names_with(path: str, admitted: bool, percent: float, count: int = 1) -> list[str]:
    """Host names whose bucket is (not) inside the first `percent`."""
    out = []
    for i in range(100000):
        name = f"web-{i}"
        if (bucket(name, path) < percent * 100) == admitted:
            out.append(name)
            if len(out) == count:
                return out
    raise AssertionError("no such name")


# ---------------------------------------------------------------------------
# The wave arithmetic over 1,000 simulated hosts
# ---------------------------------------------------------------------------


def test_share_of_1000_hosts_within_two_points_along_a_ramp():
    path = "/nix/store/" + "a" * 32 + "-nixos-system-web-26.05"
    hosts = [f"host-{i:04d}" for i in range(1000)]
    rollout = autodeploy.parse_rollout({"rollout": "5%", "rollout-start": iso(START), "rollout-duration": "24h"})
    buckets = {h: autodeploy.rollout_bucket(h, path) for h in hosts}
    assert buckets == {h: bucket(h, path) for h in hosts}  # the agent follows the documented rule
    previous: set[str] = set()
    measured = []
    for hours in (-6, 0, 3, 6, 12, 18, 23, 24, 30):
        at = START + timedelta(hours=hours)
        target = expected_percent(5, at)
        assert rollout.percent_at(at.timestamp()) == pytest.approx(target)
        admitted = {h for h in hosts if rollout.admits(buckets[h], at.timestamp())}
        share = len(admitted) / len(hosts) * 100
        measured.append((hours, round(target, 2), share))
        assert abs(share - target) <= 2, (hours, target, share)
        assert previous <= admitted, "a host admitted earlier must stay admitted as the ramp grows"
        # Every poll gives the same answer: recomputing changes nothing.
        assert admitted == {h for h in hosts if rollout.admits(autodeploy.rollout_bucket(h, path), at.timestamp())}
        previous = admitted
    assert measured[-1][2] == 100.0
    print("measured wave shares (hours after start, target %, deploying %):", measured)


def test_fixed_percentages_and_a_new_release_picks_new_canaries():
    hosts = [f"db-{i}" for i in range(1000)]
    old, new = "/nix/store/" + "b" * 32 + "-system", "/nix/store/" + "c" * 32 + "-system"
    for percent in (1, 5, 10, 25, 50, 90):
        rollout = autodeploy.parse_rollout({"rollout": f"{percent}%"})
        chosen = [h for h in hosts if rollout.admits(autodeploy.rollout_bucket(h, old), 0)]
        assert abs(len(chosen) / 10 - percent) <= 2, (percent, len(chosen))
    ten = autodeploy.parse_rollout({"rollout": "10%"})
    first = {h for h in hosts if ten.admits(autodeploy.rollout_bucket(h, old), 0)}
    second = {h for h in hosts if ten.admits(autodeploy.rollout_bucket(h, new), 0)}
    assert len(first & second) < len(first) / 2  # not the same machines again
    assert autodeploy.parse_rollout({"rollout": "0%"}).admits(0, 0) is False
    assert autodeploy.parse_rollout({"rollout": "100%"}).admits(9999, 0) is True


def test_turn_time_is_when_the_ramp_reaches_the_bucket():
    rollout = autodeploy.parse_rollout({"rollout": "10%", "rollout-start": iso(START), "rollout-duration": "1d"})
    for b in (0, 999, 1000, 5000, 9999):
        turn = rollout.turn_at(b)
        assert not rollout.admits(b, turn - 60) or b < 1000
        assert rollout.admits(b, turn + 60)
    assert autodeploy.parse_rollout({"rollout": "10%"}).turn_at(5000) is None


@pytest.mark.parametrize("text, seconds", [("24h", 86400), ("90m", 5400), ("1d12h", 129600), ("3600", 3600),
                                           ("2w", 1209600), ("45s", 45)])
def test_durations(text, seconds):
    assert autodeploy.parse_duration(text) == seconds


# ---------------------------------------------------------------------------
# The real agent
# ---------------------------------------------------------------------------


def test_real_agent_decides_like_the_rule_for_many_names(host, world, server):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0  # tracking a
    server.set("/pointer", f"{b}\nrollout: 30%\n")
    names = [f"node-{i}" for i in range(24)]
    answers = {}
    for name in names:
        outs = [host.once(host.url, "--dry-run", "--hostname", name).stdout for _ in range(2)]
        assert outs[0] == outs[1]  # the same answer on every poll
        assert f"bucket {bucket(name, b)} of 10000, rollout at 30.00%" in outs[0], outs[0]
        answers[name] = "waits: wave:" not in outs[0]
        assert answers[name] == (bucket(name, b) < 3000), (name, outs[0])
    assert any(answers.values()) and not all(answers.values())
    assert host.current == a and not host.store_has(b)


def test_host_waits_for_its_wave_then_deploys_when_the_ramp_reaches_it(host, world, server):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0
    server.set("/pointer", ramp_pointer(b))
    (name,) = names_with(b, admitted=False, percent=50)
    my_bucket = bucket(name, b)
    turn = START + DAY * ((my_bucket / 100 - 5) / 95)
    before = {"NIXOS_AUTODEPLOY_NOW": iso(turn - timedelta(minutes=30))}
    for _ in range(2):
        r = host.once(host.url, "--hostname", name, env=before)
        assert r.returncode == 0, r.stderr
        # Not deployed while waiting, but ready for its turn (issue #21: prefetch).
        assert host.current == a and host.profile == a and host.activations() == []
        assert host.store_has(b) and host.state()["prefetched"]["path"] == b
        assert state_gauge(host) == "waiting_rollout"
        m = host.metrics()
        assert m["nixos_autodeploy_rollout_bucket_number"] == my_bucket
        assert m["nixos_autodeploy_rollout_percent"] == pytest.approx(expected_percent(5, turn - timedelta(minutes=30)),
                                                                      abs=0.01)
        assert m["nixos_autodeploy_rollout_turn_timestamp_seconds"] == pytest.approx(turn.timestamp(), abs=1)
        promtool_ok(host)
    status = host.agent("status", env=before).stdout
    assert "waiting_rollout" in status and f"bucket {my_bucket}" in status
    assert f"this host's turn comes at {turn.strftime('%Y-%m-%d %H:%M')}" in status, status
    fields = json.loads(host.agent("status", "--json").stdout)
    assert fields["rollout"]["bucket"] == my_bucket and fields["rollout"]["admitted"] is False

    server.requests.clear()
    r = host.once(host.url, "--hostname", name, env={"NIXOS_AUTODEPLOY_NOW": iso(turn + timedelta(minutes=5))})
    assert r.returncode == 0, r.stderr
    assert host.current == b and state_gauge(host) == "deployed"
    assert not [q for q in server.requests if str(q["path"]).startswith("/cache/")]  # only the activation was left
    assert "deployed on this host" in host.agent("status").stdout


def test_pause_stops_new_deploys_and_hosts_on_it_stay(host, world, server, tmp_path):
    import world as world_mod
    a, b = world.path("a"), world.path("b")
    early = world_mod.Host(tmp_path / "early", world, server)
    early.install(a)
    assert early.once(host.url).returncode == 0 and host.once(host.url).returncode == 0
    server.set("/pointer", f"{b}\n")
    assert early.once(host.url).returncode == 0 and early.current == b  # deployed before the pause
    server.set("/pointer", f"{b}\npause: true\n")
    r = early.once(host.url)
    assert r.returncode == 0 and early.current == b and state_gauge(early) == "up_to_date"
    for extra in ((), ("--force",)):  # --force skips waves, never a pause
        r = host.once(host.url, *extra)
        assert r.returncode == 0, r.stderr
        assert host.current == a and not host.store_has(b)
        assert state_gauge(host) == "rollout_paused" and host.metrics()["nixos_autodeploy_rollout_paused"] == 1
        assert "paused by the pointer" in r.stderr
    server.set("/pointer", f"{b}\npause: hold\n")
    assert host.once(host.url).returncode == 0 and state_gauge(host) == "rollout_paused"
    server.set("/pointer", f"{b}\npause: false\n")  # resumed
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.metrics()["nixos_autodeploy_rollout_paused"] == 0
    early.kill_orphans()


def test_force_deploys_outside_the_wave(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.set("/pointer", f"{b}\nrollout: 0%\n")
    r = host.once(host.url)
    assert r.returncode == 0 and state_gauge(host) == "waiting_rollout" and host.current != b
    assert host.store_has(b) and host.activations() == []  # prefetched while it waits, not deployed
    assert "waits until the pointer's rollout exceeds" in r.stderr
    r = host.once(host.url, "--force")
    assert r.returncode == 0, r.stderr
    assert "--force: deploying outside this host's wave" in r.stderr and host.current == b


def test_a_host_already_on_the_target_is_not_affected(host, world, server):
    a = world.path("a")
    server.set("/pointer", f"{a}\nrollout: 0%\npause: true\n")
    r = host.once(host.url)
    assert r.returncode == 0 and state_gauge(host) == "tracking"
    assert host.once(host.url).returncode == 0 and state_gauge(host) == "up_to_date"


@pytest.mark.parametrize("lines, needle", [
    ("rollout: 110%", "not a percentage between 0% and 100%"),
    ("rollout: ten", "not a percentage"),
    ("rollout: -5%", "not a percentage"),
    ("rollout: 5%\nrollout-start: 2026-11-23T06:00:00Z", "a ramp needs both"),
    ("rollout-duration: 24h", "a ramp needs both"),
    ("rollout-start: tomorrow\nrollout-duration: 24h", "rollout-start is not an RFC 3339 time"),
    ("rollout-start: 2026-11-23T06:00:00Z\nrollout-duration: soon", "not a duration"),
    ("rollout-start: 2026-11-23T06:00:00Z\nrollout-duration: 0s", "above 0"),
    ("pause: maybe", "pause is not true, hold or false"),
    ("rollout: 5", "not a percentage"),                       # the % is part of the value
    ("rollout: \u0665%", "not a percentage"),                 # an Arabic-Indic five
    ("rollout: 5%\nrollout-start: 2026-11-23T06:00:00Z\nrollout-duration: \u0661\u0662h", "not a duration"),
])
def test_malformed_rollout_fields_are_refused(host, world, server, lines, needle):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0
    server.set("/pointer", f"{b}\n{lines}\n")
    r = host.once(host.url)
    assert r.returncode == 4, r.stderr
    assert needle in r.stderr
    assert host.current == a and not host.store_has(b)
    assert state_gauge(host) == "refused"
    assert 'nixos_autodeploy_last_error_info{kind="pointer"' in host.metrics_text()


def test_sign_writes_rollout_fields_that_the_agent_honours(host, world, server, tmp_path):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0  # tracking a
    key = tmp_path / "ci_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    out = tmp_path / "pointer"

    def sign(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(AGENT), "sign", "--key", str(key), "--revision", "7",
                               "--hosts", "web-1", *extra, "-o", str(out), b], capture_output=True, text=True)

    r = sign("--rollout", "5", "--rollout-start", iso(START), "--rollout-duration", "24h", "--pause")
    assert r.returncode == 0, r.stderr
    body = out.read_text()
    for line in ("rollout: 5%", f"rollout-start: {iso(START)}", "rollout-duration: 24h", "pause: true"):
        assert line in body.splitlines(), body
    server.set("/pointer", out.read_bytes())
    server.set("/pointer.sig", (tmp_path / "pointer.sig").read_bytes())
    trusted = tmp_path / "trusted"
    trusted.write_text((tmp_path / "ci_ed25519.pub").read_text())
    r = host.once(host.url, "--trusted-keys", str(trusted), "--hostname", "web-1")
    assert r.returncode == 0, r.stderr
    assert state_gauge(host) == "rollout_paused" and host.current == a
    for bad in (("--rollout", "150"), ("--rollout-start", iso(START)), ("--rollout-duration", "1y",
                                                                         "--rollout-start", iso(START))):
        r = sign(*bad)
        assert r.returncode == 2, (bad, r.stderr)


def test_a_ramp_without_a_rollout_line_starts_at_zero():
    """`sign --rollout-start T --rollout-duration 24h` without --rollout: 0% at T, not 100%."""
    ramp = autodeploy.parse_rollout({"rollout-start": "2026-11-23T00:00:00Z", "rollout-duration": "24h"})
    start = datetime(2026, 11, 23, tzinfo=timezone.utc).timestamp()
    assert ramp.percent_at(start - 3600) == 0 and ramp.percent_at(start + 1) < 0.01
    assert abs(ramp.percent_at(start + 12 * 3600) - 50) < 0.01
    assert autodeploy.parse_rollout({}).percent == 100


def test_pause_holds_back_the_reboot_into_a_staged_release(host, world, server):
    a, b = world.path("a"), world.path("b")
    args = ("--switch-mode", "boot", "--reboot-mode", "reboot", "--reboot-window", "02:00-04:00")
    outside, inside = {"NIXOS_AUTODEPLOY_NOW": "2026-11-23T12:00:00"}, {"NIXOS_AUTODEPLOY_NOW": "2026-11-24T03:00:00"}
    assert host.once(host.url, *args, env=outside).returncode == 0
    server.set("/pointer", f"{b}\n")
    assert host.once(host.url, *args, env=outside).returncode == 0 and host.profile == b  # staged, reboot deferred
    server.set("/pointer", f"{b}\npause: true\n")             # the stop button
    r = host.once(host.url, *args, env=inside)
    assert r.returncode == 0 and state_gauge(host) == "rollout_paused", r.stderr
    assert not [c for c in host.calls() if c.endswith("reboot")]
    server.set("/pointer", f"{b}\npause: false\n")
    r = host.once(host.url, *args, env=inside)
    assert r.returncode == 0 and [c for c in host.calls() if c.endswith("reboot")], r.stderr
    assert host.current == a  # not rebooted for real: the stand-in only records the request
