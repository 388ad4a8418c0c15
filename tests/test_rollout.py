"""Rollout and reboot coordination: waves, the pause switch (issue #14,
part 1) and FleetLock (issue #14, part 2).

The share test drives the agent's own functions over 1,000 host names and
checks them against the rule written down independently here; the others run
the real agent against real nix.

The lock server is tests/servers.py's FleetLockServer, written from Zincati's
protocol document: a counting semaphore of N owned, recursive locks per group.
The stand-in systemctl records the reboot request and the test "reboots" the
host itself (host.reboot()).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from servers import FleetLockServer, HostileLockServer, free_port
from util import APP_ID, bucket, fl_once, lock_id, machine_id, promtool_ok, state_gauge, suspend
from world import AGENT, REPO, Host, app_specific_id

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


# ---------------------------------------------------------------------------
# FleetLock: coordinated reboots
# ---------------------------------------------------------------------------


def reboots(host) -> int:
    return sum(1 for c in host.calls() if c.split()[:2] in (["systemctl", "reboot"], ["systemctl", "kexec"]))


def post(url: str, body: object, header: bool = True) -> tuple[int, dict | None]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"fleet-lock-protocol": "true"} if header else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read(4096) or b"null")


def params(client_id: str, group: str = "default") -> dict:
    return {"client_params": {"id": client_id, "group": group}}


# ---------------------------------------------------------------------------
# The test server itself follows the protocol
# ---------------------------------------------------------------------------


def test_test_server_follows_the_protocol():
    srv = FleetLockServer(slots=2, group_slots={"db": 1})
    try:
        lock, unlock = srv.url + "/v1/pre-reboot", srv.url + "/v1/steady-state"
        status, error = post(lock, params("a"), header=False)
        assert status == 400 and error["kind"] and error["value"]
        status, error = post(lock, params("a", "no spaces"))
        assert status == 400 and set(error) == {"kind", "value"}
        assert post(lock, b"not json")[0] == 400
        assert post(lock, params(""))[0] == 400
        assert post(lock, params("a")) == (200, None)
        assert post(lock, params("a")) == (200, None)       # recursive
        assert post(lock, params("b")) == (200, None)       # two slots
        status, error = post(lock, params("c"))
        assert status == 409 and error["kind"] == "failed_lock_semaphore_full"
        assert post(unlock, params("c")) == (200, None)     # not a holder: fine, nothing happens
        assert srv.held() == ["a", "b"]
        assert post(lock, params("x", "db")) == (200, None)  # groups are separate semaphores
        assert post(lock, params("y", "db"))[0] == 409
        assert post(unlock, params("a")) == (200, None)
        assert post(lock, params("c")) == (200, None)
        assert srv.held() == ["b", "c"] and srv.held("db") == ["x"]
        assert srv.max_held == {"default": 2, "db": 1}
    finally:
        srv.close()


def test_lock_id_is_the_app_specific_machine_id(tmp_path):
    mid = tmp_path / "machine-id"
    raw = secrets.token_hex(16)
    mid.write_text(raw + "\n")
    derived = autodeploy.fleetlock_id(str(mid))
    assert derived == app_specific_id(raw, APP_ID) and derived != raw and len(derived) == 32
    assert derived[12] == "4" and derived[16] in "89ab"  # a v4 UUID, as systemd marks it
    tool = shutil.which("systemd-id128")
    if tool:
        # systemd's own implementation agrees for this machine's real id.
        real = subprocess.run([tool, "machine-id", f"--app-specific={APP_ID}"], capture_output=True, text=True)
        if real.returncode == 0:
            assert autodeploy.fleetlock_id("/etc/machine-id") == real.stdout.strip()
    mid.write_text("not a machine id\n")
    with pytest.raises(autodeploy.FleetLockError):
        autodeploy.fleetlock_id(str(mid))


@pytest.mark.parametrize("args", [["--fleetlock-group", "bad group"], ["--fleetlock-group", ""],
                                  ["--fleetlock-url", "ftp://lock"], ["--fleetlock-url", "lock.example"]])
def test_bad_fleetlock_options_are_usage_errors(args):
    r = subprocess.run([sys.executable, str(REPO / "autodeploy.py"), "--once", "--url", "http://127.0.0.1:9/p",
                        "--state-dir", "/nonexistent/x", *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "FleetLock" in r.stderr


# ---------------------------------------------------------------------------
# One host
# ---------------------------------------------------------------------------


def test_reboot_only_with_a_slot_and_release_when_healthy(host, world, server, fleetlock):
    a, b = world.path("a"), world.path("b")
    assert fl_once(host, fleetlock).returncode == 0  # tracking a (and initialization)
    assert fleetlock.events[-1][1:4] == ("steady-state", lock_id(host), "default")
    assert fleetlock.operate("pre-reboot", "someone-else", "default") == 200  # the only slot is taken

    server.pointer(b)
    r = fl_once(host, fleetlock)
    assert r.returncode == 0, r.stderr
    assert host.profile == b and host.ctl("boot-default").read_text().strip() == b  # fully staged
    assert host.state()["deployed"] == b and host.current == a
    assert reboots(host) == 0, host.calls()
    assert state_gauge(host) == "waiting_reboot_slot"
    assert "no FleetLock slot was granted" in r.stderr and "failed_lock_semaphore_full" in r.stderr
    m = host.metrics()
    assert m["nixos_autodeploy_reboot_slot_held"] == 0
    assert m['nixos_autodeploy_fleetlock_failures_total{operation="pre-reboot",kind="slot_busy"}'] == 1
    promtool_ok(host)
    status = host.agent("status").stdout
    assert "reboot slot" in status and "asked for in FleetLock group default" in status

    r = fl_once(host, fleetlock)  # still full: retried, still no reboot
    assert r.returncode == 0 and reboots(host) == 0 and state_gauge(host) == "waiting_reboot_slot"

    fleetlock.operate("steady-state", "someone-else", "default")
    r = fl_once(host, fleetlock)
    assert r.returncode == 0, r.stderr
    assert reboots(host) == 1 and fleetlock.held() == [lock_id(host)]
    assert state_gauge(host) == "pending_reboot" and host.metrics()["nixos_autodeploy_reboot_slot_held"] == 1
    assert "fleetlock_last_error_info" not in host.metrics_text()
    lock_requests = [e for e in fleetlock.events if e[1] == "pre-reboot"]
    assert all(e[2] == lock_id(host) for e in lock_requests) and machine_id(host) not in str(fleetlock.events)

    host.reboot()
    r = fl_once(host, fleetlock)
    assert r.returncode == 0, r.stderr
    assert host.current == b and state_gauge(host) == "deployed"
    assert fleetlock.held() == [] and fleetlock.events[-1][1] == "steady-state"
    assert host.state()["reboot_slot"] is None and host.metrics()["nixos_autodeploy_reboot_slot_held"] == 0
    assert "released the reboot slot" in r.stderr
    requests = len(fleetlock.events)
    assert fl_once(host, fleetlock).returncode == 0 and state_gauge(host) == "up_to_date"
    assert len(fleetlock.events) == requests  # steady and nothing held: no request at all


@pytest.mark.parametrize("failure", ["500", "garbage", "redirect", "close", "hang", "unreachable"])
def test_lock_server_errors_never_reboot_and_are_exported(host, world, server, fleetlock, failure):
    a, b = world.path("a"), world.path("b")
    assert fl_once(host, fleetlock).returncode == 0
    url = fleetlock.url
    if failure == "unreachable":
        url = f"http://127.0.0.1:{free_port()}"
    else:
        fleetlock.fail = failure
        fleetlock.hang_seconds = 4
    server.pointer(b)
    r = fl_once(host, fleetlock, "--timeout", "2", url=url)
    assert r.returncode == 0, r.stderr
    assert reboots(host) == 0
    assert host.profile == b and host.state()["deployed"] == b and host.state()["intent"] is None
    assert state_gauge(host) == "waiting_reboot_slot"
    text = host.metrics_text()
    expected_kind = {"500": "failed_etcd_unavailable", "garbage": "http_503", "redirect": "http_307",
                     "close": "unreachable", "hang": "unreachable", "unreachable": "unreachable"}[failure]
    assert f'nixos_autodeploy_fleetlock_failures_total{{operation="pre-reboot",kind="{expected_kind}"}} 1' in text
    assert f'nixos_autodeploy_fleetlock_last_error_info{{operation="pre-reboot",kind="{expected_kind}"' in text
    assert "\x00" not in text and "\\xff" not in host.agent("status").stdout
    promtool_ok(host)
    fleetlock.fail = None
    r = fl_once(host, fleetlock)
    assert r.returncode == 0, r.stderr
    assert reboots(host) == 1 and state_gauge(host) == "pending_reboot"
    assert "fleetlock_last_error_info" not in host.metrics_text()


def test_healthy_host_releases_a_stale_slot_once_per_boot(host, world, server, fleetlock):
    assert fleetlock.operate("pre-reboot", lock_id(host), "default") == 200  # held from before a crash
    assert fl_once(host, fleetlock).returncode == 0
    assert fleetlock.held() == []
    assert fleetlock.events[-1][1:3] == ("steady-state", lock_id(host))
    count = len(fleetlock.events)
    assert fl_once(host, fleetlock).returncode == 0
    assert len(fleetlock.events) == count  # initialized since this boot
    host.reboot()  # /run is wiped: the next start initializes again
    r = fl_once(host, fleetlock)
    assert r.returncode == 0 and len(fleetlock.events) == count + 1
    assert "FleetLock initialization" in r.stderr


def test_unlock_failure_is_retried_next_cycle(host, world, server, fleetlock):
    b = world.path("b")
    assert fl_once(host, fleetlock).returncode == 0
    server.pointer(b)
    assert fl_once(host, fleetlock).returncode == 0 and reboots(host) == 1
    host.reboot()
    fleetlock.fail = "500"
    r = fl_once(host, fleetlock)
    assert r.returncode == 0 and host.current == b and state_gauge(host) == "deployed"
    assert fleetlock.held() == [lock_id(host)]
    assert 'fleetlock_failures_total{operation="steady-state",kind="failed_etcd_unavailable"} 1' in host.metrics_text()
    fleetlock.fail = None
    assert fl_once(host, fleetlock).returncode == 0
    assert fleetlock.held() == [] and host.state()["reboot_slot"] is None


def test_failed_boot_rolls_back_with_the_same_slot_then_releases_it(host, world, server, fleetlock):
    a, b = world.path("a"), world.path("b")
    check = ("--health-check", "test ! -e /var/lib/standin/unhealthy")
    assert fl_once(host, fleetlock, *check).returncode == 0
    server.pointer(b)
    assert fl_once(host, fleetlock, *check).returncode == 0 and reboots(host) == 1
    host.reboot()
    assert host.current == b
    host.ctl("unhealthy").write_text("1\n")
    r = fl_once(host, fleetlock, *check)
    assert r.returncode == 5, r.stderr
    assert host.profile == a and reboots(host) == 2  # back to a, rebooting with the slot it holds (recursive)
    assert fleetlock.held() == [lock_id(host)]
    assert [e[4] for e in fleetlock.events if e[1] == "pre-reboot"] == [200, 200]
    host.ctl("unhealthy").unlink()
    host.reboot()
    r = fl_once(host, fleetlock, *check)
    assert r.returncode == 0, r.stderr
    assert host.current == a and state_gauge(host) == "quarantined"
    assert fleetlock.held() == [] and host.state()["reboot_slot"] is None


def test_host_whose_staged_system_did_not_boot_keeps_its_slot(host, world, server, fleetlock):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    assert fl_once(host, fleetlock).returncode == 0
    server.pointer(b)
    assert fl_once(host, fleetlock).returncode == 0 and reboots(host) == 1
    host.ctl("boot-default").write_text(a + "\n")  # the boot loader fell back to the previous entry
    host.reboot()
    r = fl_once(host, fleetlock)
    assert r.returncode == 5 and state_gauge(host) == "boot_failed", r.stderr
    for _ in range(2):  # the group stops rebooting into b while b is quarantined
        assert fleetlock.held() == [lock_id(host)]
        assert host.metrics()["nixos_autodeploy_reboot_slot_held"] == 1
        r = fl_once(host, fleetlock)
        assert r.returncode == 0 and state_gauge(host) == "quarantined", r.stderr
    server.pointer(c)                                # upstream moves on: deployed, rebooted, verified
    assert fl_once(host, fleetlock).returncode == 0 and reboots(host) == 2
    host.reboot()
    assert fl_once(host, fleetlock).returncode == 0 and host.current == c
    assert fleetlock.held() == []


def test_no_slot_is_taken_outside_the_reboot_window(host, world, server, fleetlock):
    b = world.path("b")
    assert fl_once(host, fleetlock).returncode == 0
    server.pointer(b)
    outside = {"NIXOS_AUTODEPLOY_NOW": "2026-11-23T12:00:00"}
    machine_id(host)
    env = {"NIXOS_AUTODEPLOY_MACHINE_ID_FILE": str(host.root / "machine-id"), **outside}
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot", "--reboot-window", "02:00-04:00",
                  "--fleetlock-url", fleetlock.url, env=env)
    assert r.returncode == 0 and "outside the reboot window" in r.stderr
    assert not [e for e in fleetlock.events if e[1] == "pre-reboot"] and reboots(host) == 0
    assert state_gauge(host) == "pending_reboot"


def test_kexec_takes_a_slot_first(host, world, server, fleetlock):
    b = world.path("b")
    assert fl_once(host, fleetlock).returncode == 0
    fleetlock.operate("pre-reboot", "other", "default")
    server.pointer(b)
    machine_id(host)
    env = {"NIXOS_AUTODEPLOY_MACHINE_ID_FILE": str(host.root / "machine-id")}
    args = ("--switch-mode", "boot", "--reboot-mode", "kexec", "--fleetlock-url", fleetlock.url)
    assert host.once(host.url, *args, env=env).returncode == 0
    assert not any(c.startswith("kexec") or c.startswith("systemctl kexec") for c in host.calls()), host.calls()
    fleetlock.operate("steady-state", "other", "default")
    assert host.once(host.url, *args, env=env).returncode == 0
    assert any(c.startswith("systemctl kexec") for c in host.calls()) and fleetlock.held() == [lock_id(host)]


# ---------------------------------------------------------------------------
# Several hosts in parallel
# ---------------------------------------------------------------------------


def test_groups_have_their_own_slots(world, server, fleetlock, tmp_path):
    a, b = world.path("a"), world.path("b")
    web, db = (Host(tmp_path / name, world, server) for name in ("web", "db"))
    for h, name in ((web, "web"), (db, "db")):
        h.install(a)
        h.url = server.pointer(a, f"/{name}")
        assert fl_once(h, fleetlock, "--fleetlock-group", name).returncode == 0
        server.pointer(b, f"/{name}")
    assert fl_once(web, fleetlock, "--fleetlock-group", "web").returncode == 0
    assert fl_once(db, fleetlock, "--fleetlock-group", "db").returncode == 0
    assert reboots(web) == reboots(db) == 1  # one slot each, both at once
    assert fleetlock.held("web") == [lock_id(web)] and fleetlock.held("db") == [lock_id(db)]
    assert fleetlock.held("default") == []


@pytest.mark.parametrize("hosts, slots", [(6, 2)])
def test_parallel_boot_deploys_never_exceed_the_slots(world, server, fleetlock, tmp_path, hosts, slots):
    a, b = world.path("a"), world.path("b")
    fleetlock.slots = slots
    fleet = []
    for i in range(hosts):
        h = Host(tmp_path / f"host{i}", world, server)
        h.install(a)
        h.url = server.pointer(a)
        fleet.append(h)
    for h in fleet:
        assert fl_once(h, fleetlock).returncode == 0
    server.pointer(b)
    guard = threading.Lock()
    in_reboot: set[int] = set()
    peak = [0]
    problems: list[str] = []
    done: list[int] = []

    def drive(i: int, h: Host) -> None:
        seen = 0
        for _ in range(80):
            r = fl_once(h, fleetlock)
            if r.returncode != 0:
                problems.append(f"host{i}: exit {r.returncode}: {r.stderr[-500:]}")
                return
            if reboots(h) > seen:
                seen = reboots(h)
                with guard:
                    held = fleetlock.held()
                    if lock_id(h) not in held:
                        problems.append(f"host{i} asked to reboot without holding a slot")
                    in_reboot.add(i)
                    # Hosts between their reboot request and the release of
                    # their slot, as the lock server knows it right now (the
                    # threads' own bookkeeping would lag behind a release).
                    rebooting = [j for j in in_reboot if lock_id(fleet[j]) in held]
                    peak[0] = max(peak[0], len(rebooting))
                time.sleep(0.5)  # the machine takes a while to come back
                h.reboot()
                continue
            if h.current == b and h.state().get("reboot_slot") is None and h.state().get("verified"):
                done.append(i)
                return
            time.sleep(0.2)
        problems.append(f"host{i} did not get through")

    threads = [threading.Thread(target=drive, args=(i, h)) for i, h in enumerate(fleet)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads)
    assert problems == []
    assert sorted(done) == list(range(hosts))
    full = [e for e in fleetlock.events if e[4] == 409]
    print(f"\n{hosts} hosts, {slots} slots: peak concurrent reboots {peak[0]}, server peak {fleetlock.max_held}, "
          f"{sum(reboots(h) for h in fleet)} reboot requests, {len(full)} 'semaphore full' answers, {elapsed:.1f}s")
    assert peak[0] <= slots and fleetlock.max_held["default"] <= slots
    assert peak[0] == slots  # the slots were used in parallel, not one host at a time
    assert all(reboots(h) == 1 for h in fleet) and fleetlock.held() == []
    assert len(full) > 0  # some hosts had to wait
    for h in fleet:
        assert state_gauge(h) in ("deployed", "up_to_date") and h.metrics()["nixos_autodeploy_reboot_slot_held"] == 0
        h.kill_orphans()


@pytest.mark.parametrize("status,body", [
    (423, b'{"kind": "locked", "value": "reboot lease unavailable, held by 4732348bf6e848878af464e4d2129bde"}'),
    (500, b'{"kind": "failed_lock", "value": "semaphore full"}'),                    # coreos/airlock
    (409, b'{"kind": "failed_lock_semaphore_full", "value": "all slots taken"}'),   # the protocol document
    (423, b"locked"),
])
def test_every_servers_all_slots_taken_is_one_kind(status, body):
    """What poseidon/fleetlock, coreos/airlock and the protocol document answer
    when the group is full: waiting, one metric kind, no alert."""
    import servers
    answer = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status, len(body), body)
    srv = servers.RawServer(lambda conn, n: conn.sendall(answer))
    try:
        with pytest.raises(autodeploy.FleetLockError) as exc:
            autodeploy.fleetlock_request(autodeploy.Fetcher(None), f"http://127.0.0.1:{srv.port}", "pre-reboot",
                                         "0" * 32, "default", 5)
    finally:
        srv.close()
    assert exc.value.kind == "slot_busy"
    assert b"fleet-lock-protocol: true" in srv.requests[0].lower()  # header names are case-insensitive


# ---------------------------------------------------------------------------
# Hostile lock replies (issue #18, items 1 and 2): the status decides
# ---------------------------------------------------------------------------


@pytest.fixture
def hostile_lock():
    srv = HostileLockServer()
    yield srv
    srv.srv.close()


@pytest.mark.parametrize("mode,kind", [("chunk", "http_500"), ("stall", "http_500"), ("reset", "http_503")])
def test_unreadable_error_reply_to_pre_reboot_is_a_counted_lock_error(host, world, server, hostile_lock, mode, kind):
    assert fl_once(host, None, url=hostile_lock.url).returncode == 0
    server.pointer(world.path("b"))
    hostile_lock.mode = mode
    started = time.monotonic()
    r = fl_once(host, None, "--timeout", "2", url=hostile_lock.url)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 30
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert reboots(host) == 0 and state_gauge(host) == "waiting_reboot_slot"
    assert host.state()["deployed"] == world.path("b")
    text = host.metrics_text()
    assert f'nixos_autodeploy_fleetlock_failures_total{{operation="pre-reboot",kind="{kind}"}} 1' in text
    assert "reply not read" in host.state()["fleetlock_error"]["message"]
    promtool_ok(host)


@pytest.mark.parametrize("mode", ["chunk", "stall", "reset"])
def test_unreadable_reply_to_release_after_a_healthy_reboot_keeps_the_deploy(host, world, server, hostile_lock,
                                                                            tmp_path, mode):
    b = world.path("b")
    hooks = ("--on-success", f"echo ok >> {tmp_path}/hooks", "--on-failure", f"echo failed >> {tmp_path}/hooks")
    assert fl_once(host, None, url=hostile_lock.url).returncode == 0
    server.pointer(b)
    assert fl_once(host, None, *hooks, url=hostile_lock.url).returncode == 0 and reboots(host) == 1
    host.reboot()
    hostile_lock.mode = mode
    r = fl_once(host, None, "--timeout", "2", *hooks, url=hostile_lock.url)
    assert r.returncode == 0, r.stderr
    assert "internal error" not in r.stderr
    assert host.current == b and state_gauge(host) == "deployed"
    state = host.state()
    assert state["verified"] is True and state["last_error"] is None and state["reboot_slot"] is not None
    assert state["history"][-1]["outcome"] == "deployed"
    hooks_run = (tmp_path / "hooks").read_text().split() if (tmp_path / "hooks").exists() else []
    assert "failed" not in hooks_run  # not the on-failure hook
    assert 'fleetlock_failures_total{operation="steady-state",kind="http_50' in host.metrics_text()
    hostile_lock.mode = "ok"
    assert fl_once(host, None, url=hostile_lock.url).returncode == 0  # retried next run
    assert host.state()["reboot_slot"] is None and hostile_lock.operations()[-1] == "/v1/steady-state"


def test_the_status_decides_before_the_reply_size(host, world, server, hostile_lock):
    assert fl_once(host, None, url=hostile_lock.url).returncode == 0
    server.pointer(world.path("b"))
    hostile_lock.mode = "big409"
    r = fl_once(host, None, url=hostile_lock.url)
    assert r.returncode == 0, r.stderr
    assert reboots(host) == 0 and state_gauge(host) == "waiting_reboot_slot"
    assert 'fleetlock_failures_total{operation="pre-reboot",kind="slot_busy"} 1' in host.metrics_text()
    hostile_lock.mode = "big200"  # granted: the server holds the slot for us, so we reboot
    r = fl_once(host, None, url=hostile_lock.url)
    assert r.returncode == 0, r.stderr
    assert reboots(host) == 1 and state_gauge(host) == "pending_reboot"
    assert host.state()["reboot_slot"]["granted"] is True


# ---------------------------------------------------------------------------
# FleetLock and suspend (issue #17): a group change while waiting, nothing to release
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
