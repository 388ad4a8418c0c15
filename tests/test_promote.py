"""`autodeploy.py promote` (issue #21, part 1): a rollout's next step decided
from the fleet's own metrics.

Simulated hosts (the real agent, real nix, signed pointers) write their
textfiles; a Debian `prometheus-node-exporter` per host exposes them; a
Debian `prometheus` scrapes them every second; `promote` asks it through
/api/v1/query and writes (or does not write) the next signed pointer, which
the hosts then fetch and obey.  All on 127.0.0.1, bounded, every process
stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import NODE_EXPORTER, PROMETHEUS, FakePrometheus, FleetMonitor, free_port, stop
from util import bucket, make_key
from world import AGENT, METRICS, REPO, Host

sys.path.insert(0, str(REPO))
import autodeploy as ad  # noqa: E402

MISSING = [p for p in (PROMETHEUS, NODE_EXPORTER) if not os.path.exists(p)]
needs_prometheus = pytest.mark.skipif(bool(MISSING) and os.environ.get("CI") != "true",
                                      reason=f"{MISSING} not installed (tests/run.sh installs them)")
EXIT = {"advance": 0, "hold": 10, "halt": 11, "complete": 12}


def promote(pointer: Path, prometheus: str, key, out: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(AGENT), "promote", "--pointer", str(pointer), "--prometheus", prometheus,
            "--key", str(key.private), "-o", str(out), "--timeout", "5", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def sign(key, out: Path, path: str, revision: int, *extra: str) -> Path:
    argv = [sys.executable, str(AGENT), "sign", "--key", str(key.private), "--revision", str(revision),
            "--all-hosts", *extra, "-o", str(out), path]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def fields(pointer: Path) -> dict[str, str]:
    lines = pointer.read_text().splitlines()
    return {"path": lines[0], **dict(line.split(": ", 1) for line in lines[1:])}


class Fleet:
    """Hosts that share one signed pointer route on the test's server."""

    def __init__(self, world, server, tmp_path: Path, key, names: dict[str, str], route: str) -> None:
        self.server, self.route, self.names = server, route, names
        tmp_path.mkdir(exist_ok=True)
        self.keys = tmp_path / "trusted_keys"
        self.keys.write_text(key.public + "\n")
        self.hosts: dict[str, Host] = {}
        for role in names:
            h = Host(tmp_path / role, world, server)
            h.install(world.path("a"))
            self.hosts[role] = h

    def publish(self, pointer: Path) -> None:
        self.server.set(self.route, pointer.read_bytes())
        self.server.set(self.route + ".sig", Path(str(pointer) + ".sig").read_bytes())

    def run(self, role: str, *args: str, expect: tuple[int, ...] = (0,)) -> None:
        h = self.hosts[role]
        r = h.once(self.server.base + self.route, "--trusted-keys", str(self.keys), "--hostname",
                   self.names[role], *args)
        assert r.returncode in expect, (role, r.returncode, r.stderr)

    def textfile_dirs(self) -> dict[str, Path]:
        return {role: h.var_lib / os.path.dirname(METRICS)[len("/var/lib/"):] for role, h in self.hosts.items()}


def states(monitor: FleetMonitor) -> dict[str, str]:
    return {r["metric"]["instance"]: r["metric"]["state"] for r in monitor.query("nixos_autodeploy_state == 1")}


@needs_prometheus
def test_promote_through_real_prometheus(world, server, tmp_path):
    a, b, c, d = (world.path(n) for n in "abcd")
    key = make_key(tmp_path, "ci")
    # Two canaries admitted at 50% for b and for c, one host admitted for
    # neither, one boot-mode host on a pointer of its own.
    candidates = [f"web-{i}" for i in range(2000)]
    canaries = [n for n in candidates if bucket(n, b) < 5000 and bucket(n, c) < 5000][:2]
    late = next(n for n in candidates if bucket(n, b) >= 5000 and bucket(n, c) >= 5000)
    names = {"canary1": canaries[0], "canary2": canaries[1], "late": late}
    fleet = Fleet(world, server, tmp_path, key, names, "/fleet")
    boot = Fleet(world, server, tmp_path / "boot", key, {"boot": "boot-0"}, "/boot-fleet")

    fleet.publish(sign(key, tmp_path / "p0", a, 1))
    for role in fleet.hosts:
        fleet.run(role)  # tracking a
    p1 = sign(key, tmp_path / "p1", b, 2, "--rollout", "50%")
    fleet.publish(p1)
    for role in fleet.hosts:
        fleet.run(role)  # canaries deploy b; late waits for its wave
    boot.publish(sign(key, tmp_path / "q1", a, 1))
    boot.run("boot")
    assert fleet.hosts["canary1"].current == b and fleet.hosts["late"].current == a

    monitor = FleetMonitor(tmp_path, {**fleet.textfile_dirs(), **boot.textfile_dirs()})
    try:
        base = monitor.base
        monitor.wait_for("the fleet's states", lambda: states(monitor) == {
            "canary1": "deployed", "canary2": "deployed", "late": "waiting_rollout", "boot": "tracking"})
        out = tmp_path / "next"

        # The step is younger than the bake time: hold, nothing written.
        r = promote(p1, base, key, out, "--steps", "50,100", "--bake", "1h")
        assert r.returncode == EXIT["hold"], r.stderr
        assert r.stdout.startswith("HOLD: the step has baked") and "2 admitted: 2 healthy" in r.stdout, r.stdout
        assert not out.exists()

        # Too few healthy canaries: hold.
        r = promote(p1, base, key, out, "--steps", "50,100", "--bake", "0s", "--min-healthy", "3")
        assert r.returncode == EXIT["hold"] and "2 admitted host(s) run it healthy, 3 needed" in r.stdout, r.stdout

        # A selector that matches no host: nobody reports the build, hold.
        r = promote(p1, base, key, out, "--bake", "0s", "--selector", 'job="elsewhere"')
        assert r.returncode == EXIT["hold"] and "0 host(s) report it" in r.stdout, r.stdout

        # A query Prometheus refuses (a broken regex): exit 3, nothing written.
        r = promote(p1, base, key, out, "--bake", "0s", "--selector", 'job=~"("')
        assert r.returncode == 3 and "query error" in r.stderr and not out.exists(), (r.stdout, r.stderr)

        # Healthy canaries, baked: advance to the next step, signed, one revision up.
        r = promote(p1, base, key, out, "--steps", "50,100", "--bake", "0s", "--trusted-keys", str(fleet.keys))
        assert r.returncode == EXIT["advance"], (r.stdout, r.stderr)
        assert "Wrote" in r.stdout and "rollout 100%" in r.stdout
        nxt = fields(out)
        assert (nxt["path"], nxt["revision"], nxt["rollout"], nxt["hosts"]) == (b, "3", "100%", "*")
        assert "x-step-started" in nxt and "not-after" in nxt
        fleet.publish(out)
        for role in fleet.hosts:
            fleet.run(role)  # the hosts accept what promote signed
        assert fleet.hosts["late"].current == b
        p2 = tmp_path / "p2"
        out.rename(p2)
        Path(str(out) + ".sig").rename(str(p2) + ".sig")
        monitor.wait_for("late deployed b", lambda: states(monitor).get("late") == "deployed")
        r = promote(p2, base, key, out, "--steps", "50,100", "--bake", "0s")
        assert r.returncode == EXIT["complete"] and not out.exists(), r.stdout

        # c at 50%: one canary rolls it back: halt with pause.
        fleet.hosts["canary1"].ctl("fail").write_text(c + "\n")
        p3 = sign(key, tmp_path / "p3", c, 4, "--rollout", "50%")
        fleet.publish(p3)
        fleet.run("canary1", expect=(5,))
        fleet.run("canary2")
        monitor.wait_for("canary1 rolled back", lambda: states(monitor).get("canary1") == "rolled_back")
        r = promote(p3, base, key, out, "--steps", "50,100", "--bake", "0s")
        assert r.returncode == EXIT["halt"], (r.stdout, r.stderr)
        assert r.stdout.startswith("HALT: 1 admitted host(s) failed it") and "1 rolled back" in r.stdout
        assert "(canary1)" in r.stdout
        halted = fields(out)
        assert (halted["path"], halted["revision"], halted["pause"], halted["rollout"]) == (c, "5", "true", "50%")
        fleet.publish(out)
        fleet.run("late")
        assert fleet.hosts["late"].current == b  # paused: no new deploys
        # A paused pointer holds: a human decides.
        p4 = tmp_path / "p4"
        out.rename(p4)
        Path(str(out) + ".sig").rename(str(p4) + ".sig")
        r = promote(p4, base, key, out, "--bake", "0s")
        assert r.returncode == EXIT["hold"] and "pause" in r.stdout and not out.exists(), r.stdout
        # The same halt by reverting: the previous build for every host at once.
        r = promote(p3, base, key, out, "--steps", "50,100", "--bake", "0s", "--on-halt", "revert",
                    "--revert-to", b)
        assert r.returncode == EXIT["halt"], r.stdout
        reverted = fields(out)
        assert reverted["path"] == b and reverted["revision"] == "5" and "rollout" not in reverted
        assert reverted["x-reverted-from"] == c

        # A boot deploy the host does not boot (boot loader fallback): halt.
        boot_host = boot.hosts["boot"]
        q2 = sign(key, tmp_path / "q2", d, 2)
        boot.publish(q2)
        boot.run("boot", "--switch-mode", "boot")
        boot_host.ctl("boot-default").write_text(a + "\n")  # the loader falls back
        boot_host.reboot()
        boot.run("boot", expect=(5,))
        monitor.wait_for("boot_failed", lambda: states(monitor).get("boot") == "boot_failed")
        out.unlink()
        r = promote(q2, base, key, out, "--bake", "0s")
        assert r.returncode == EXIT["halt"] and "1 did not boot (boot)" in r.stdout, r.stdout
        assert fields(out)["pause"] == "true"
    finally:
        monitor.close()
        for h in [*fleet.hosts.values(), *boot.hosts.values()]:
            h.kill_orphans()
    assert all(proc.poll() is not None for proc in monitor.procs)


def test_prometheus_down_holds_and_writes_nothing(world, tmp_path):
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", world.path("b"), 1, "--rollout", "5%")
    out = tmp_path / "next"
    started = time.monotonic()
    r = promote(pointer, f"http://127.0.0.1:{free_port()}", key, out, "--bake", "0s")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "refused" in r.stderr.lower() and not out.exists() and r.stdout == ""
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------
# The policy alone (no Prometheus): the table in the agent's promote section
# ---------------------------------------------------------------------------

POLICY = ad.PromotePolicy(steps=(5.0, 25.0, 100.0), bake=3600.0, min_healthy=2, max_failures=0)


@pytest.mark.parametrize("count, rollout, age, policy, verdict, step", [
    (ad.FleetCount(reporting=4, admitted=4, healthy=4), ad.Rollout(5.0), 7200.0, POLICY, "advance", 25.0),
    (ad.FleetCount(reporting=4, admitted=4, healthy=4), ad.Rollout(25.0), 7200.0, POLICY, "advance", 100.0),
    (ad.FleetCount(reporting=4, admitted=4, healthy=4), ad.Rollout(30.0), 7200.0, POLICY, "advance", 100.0),
    (ad.FleetCount(reporting=4, admitted=4, healthy=4), ad.Rollout(5.0), 60.0, POLICY, "hold", None),
    (ad.FleetCount(reporting=4, admitted=4, healthy=4), ad.Rollout(5.0), None, POLICY, "hold", None),
    (ad.FleetCount(reporting=4, admitted=4, healthy=1), ad.Rollout(5.0), 7200.0, POLICY, "hold", None),
    (ad.FleetCount(reporting=4, admitted=4, healthy=3, rolled_back=1), ad.Rollout(5.0), 7200.0, POLICY, "halt", None),
    (ad.FleetCount(reporting=4, admitted=4, healthy=3, boot_failed=1), ad.Rollout(100.0), 7200.0, POLICY, "halt", None),
    (ad.FleetCount(reporting=4, admitted=4, healthy=4), ad.Rollout(100.0), 7200.0, POLICY, "complete", None),
    (ad.FleetCount(reporting=4, admitted=4, healthy=4), ad.Rollout(5.0, paused=True), 7200.0, POLICY, "hold", None),
    (ad.FleetCount(reporting=4, admitted=4, rolled_back=4), ad.Rollout(5.0, paused=True), 7200.0, POLICY, "hold", None),
    (ad.FleetCount(reporting=4, admitted=4, healthy=4), ad.Rollout(5.0, start=0.0, duration=60.0), 7200.0, POLICY,
     "hold", None),
    # 1 of 20 is 5%: within a 10% limit once --max-failures allows one.
    (ad.FleetCount(reporting=20, admitted=20, healthy=19, rolled_back=1), ad.Rollout(5.0), 7200.0,
     ad.PromotePolicy(min_healthy=2, max_failures=1, max_failure_percent=10.0), "advance", 25.0),
    (ad.FleetCount(reporting=5, admitted=5, healthy=4, rolled_back=1), ad.Rollout(5.0), 7200.0,
     ad.PromotePolicy(min_healthy=2, max_failures=1, max_failure_percent=10.0), "halt", None),
    # Nothing reports the build: no evidence, whatever --min-healthy says.
    (ad.FleetCount(), ad.Rollout(5.0), 7200.0, ad.PromotePolicy(min_healthy=0), "hold", None),
    (ad.FleetCount(reporting=3), ad.Rollout(5.0), 7200.0, ad.PromotePolicy(min_healthy=0), "advance", 25.0),
])
def test_promote_verdict(count, rollout, age, policy, verdict, step):
    got, percent, why = ad.promote_verdict(count, policy, rollout, age)
    assert (got, percent) == (verdict, step), why


def sample(name: str, value: float = 1, **labels: str) -> dict:
    return {"metric": {"__name__": f"nixos_autodeploy_{name}", "instance": labels.pop("instance"), **labels},
            "value": value}


def host_samples(instance: str, build: str, *, current: str, state: str, ok: float = 1, bucket: int | None = None,
                 quarantined: str = "", last_run: float | None = None) -> list[dict]:
    name = os.path.basename(build)
    out = [sample("info", instance=instance, upstream_generation=name, current_generation=current,
                  deployed_generation=current, booted_generation=current),
           sample("state", 1, instance=instance, state=state), sample("state", 0, instance=instance, state="dirty"),
           sample("last_run_success", ok, instance=instance),
           sample("last_run_timestamp_seconds", time.time() if last_run is None else last_run, instance=instance),
           sample("quarantined", int(bool(quarantined)), instance=instance, path=quarantined)]
    if bucket is not None:
        out.append(sample("rollout_bucket_number", bucket, instance=instance))
    return out


def test_count_fleet_classifies_each_host_once():
    b = "/nix/store/" + "1" * 32 + "-b"
    nb = os.path.basename(b)
    samples = (host_samples("ok", b, current=nb, state="up_to_date", bucket=10)
               + host_samples("rb", b, current="a", state="quarantined", bucket=20, quarantined=b)
               + host_samples("bf", b, current="a", state="boot_failed", ok=0, bucket=30)
               + host_samples("stuck", b, current="a", state="failed", ok=0, bucket=40)
               + host_samples("going", b, current="a", state="waiting_reboot_slot", bucket=50)
               + host_samples("later", b, current="a", state="waiting_rollout", bucket=9000)
               + host_samples("other", "/nix/store/" + "2" * 32 + "-c", current="a", state="up_to_date"))
    count = ad.count_fleet(samples, b, 5.0)
    assert (count.reporting, count.admitted, count.healthy, count.rolled_back, count.boot_failed, count.stuck,
            count.on_the_way) == (6, 5, 1, 1, 1, 1, 1)
    assert count.failed_hosts == ["bf", "rb"]


@pytest.mark.parametrize("text", ['job="node"', '{job="node", env=~"prod|stage"}', ""])
def test_selector_accepts_label_matchers(text):
    ad.label_matchers(text)


@pytest.mark.parametrize("text", ['job="node"} or vector(1) or {x="', "job", 'job="a\nb"', "up == 1", 'a="b",'])
def test_selector_refuses_anything_but_matchers(text):
    with pytest.raises(Exception):
        ad.label_matchers(text)


@pytest.mark.parametrize("text", ["5,25,100", "100", "0.5,50,100"])
def test_steps_accepted(text):
    assert ad.parse_steps(text)[-1] == 100


@pytest.mark.parametrize("text", ["5,25", "25,5,100", "0,100", "5,5,100", "nan,100", "5,,100", "101"])
def test_steps_refused(text):
    with pytest.raises(Exception):
        ad.parse_steps(text)


# ---------------------------------------------------------------------------
# A Prometheus that answers what the test says (FakePrometheus), hostile pointers
# ---------------------------------------------------------------------------

B = "/nix/store/" + "1" * 32 + "-b"


def vector(samples: list[dict], **extra) -> dict:
    return {"status": "success", "data": {"resultType": "vector", "result": samples}, **extra}


def api_samples(samples: list[dict]) -> list[dict]:
    """count_fleet's samples as /api/v1/query writes them."""
    return [{"metric": s["metric"], "value": [1700000000.0, repr(float(s["value"]))]} for s in samples]


@pytest.fixture
def fake_prometheus():
    made = []

    def serve(body, status: int = 200):
        made.append(FakePrometheus(body, status))
        return made[-1].url
    yield serve
    for srv in made:
        srv.close()


def healthy_fleet(build: str, n: int = 3) -> list[dict]:
    name = os.path.basename(build)
    return api_samples([s for i in range(n) for s in
                        host_samples(f"h{i}", build, current=name, state="deployed", bucket=i)])


def test_empty_answer_never_advances_even_without_min_healthy(fake_prometheus, tmp_path):
    """Issue #21: an empty answer never advances a rollout, also with
    --min-healthy 0 (no canary required once hosts report the build)."""
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", B, 5, "--rollout", "5%")
    out = tmp_path / "next"
    r = promote(pointer, fake_prometheus(vector([])), key, out, "--bake", "0s", "--min-healthy", "0")
    assert r.returncode == EXIT["hold"] and not out.exists(), (r.stdout, r.stderr)
    assert "0 host(s) report it" in r.stdout
    # Hosts that report it, none admitted yet: --min-healthy 0 says go on.
    r = promote(pointer, fake_prometheus(vector(healthy_fleet(B))), key, out, "--bake", "0s", "--min-healthy", "0")
    assert r.returncode == EXIT["advance"], (r.stdout, r.stderr)


def failing_fleet(build: str, n: int = 1) -> list[dict]:
    return api_samples([s for i in range(n) for s in
                        host_samples(f"f{i}", build, current="a", state="rolled_back", ok=0, bucket=i)])


def test_revert_to_the_failing_build_itself_pauses(fake_prometheus, tmp_path):
    """--revert-to naming the pointer's own build (a CI variable that already
    points at it) must not turn a halt into that build for every host."""
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", B, 5, "--rollout", "5%")
    out = tmp_path / "next"
    r = promote(pointer, fake_prometheus(vector(failing_fleet(B) + healthy_fleet(B))), key, out, "--bake", "0s",
                "--on-halt", "revert", "--revert-to", B)
    assert r.returncode == EXIT["halt"], (r.stdout, r.stderr)
    halted = fields(out)
    assert (halted["path"], halted["pause"], halted["rollout"]) == (B, "true", "5%"), halted
    assert "x-reverted-from" not in halted and "pause: true" in r.stdout


def test_pointer_not_signed_by_ci_is_not_resigned(fake_prometheus, tmp_path):
    """Without --trusted-keys promote verifies the current pointer against
    the public half of --key: otherwise whoever can write the pointer (or
    its web server) chooses what CI's key signs next (here a revision that
    would leave no room above it, and `hosts: *`)."""
    key = make_key(tmp_path, "ci")
    other = make_key(tmp_path, "intruder")
    url = fake_prometheus(vector(healthy_fleet(B)))
    out = tmp_path / "next"
    forged = tmp_path / "forged"
    forged.write_text(f"{B}\nrevision: {2**63 - 2}\nhosts: *\nrollout: 5%\nx-step-started: 2020-01-01T00:00:00Z\n")
    unsigned = promote(forged, url, key, out, "--bake", "0s")
    sign(other, forged, B, 2**63 - 2, "--rollout", "5%")
    by_other = promote(forged, url, key, out, "--bake", "0s")
    for r in (unsigned, by_other):
        assert r.returncode not in (0, 11) and not out.exists(), (r.stdout, r.stderr)
    assert "not made by a trusted key" in by_other.stderr
    # Signed by the key promote signs with: trusted without --trusted-keys.
    sign(key, forged, B, 7, "--rollout", "5%")
    r = promote(forged, url, key, out, "--bake", "0s")
    assert r.returncode == EXIT["advance"] and fields(out)["revision"] == "8", (r.stdout, r.stderr)


@pytest.mark.parametrize("status", [203, 500, 503])
def test_http_error_with_a_success_body_is_no_answer(fake_prometheus, tmp_path, status):
    """Only a 200 is Prometheus's answer; an error page that happens to hold
    a success document (a proxy's cached body) is not the fleet's state."""
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", B, 5, "--rollout", "5%")
    out = tmp_path / "next"
    r = promote(pointer, fake_prometheus(vector(healthy_fleet(B)), status), key, out, "--bake", "0s")
    assert r.returncode == 3 and not out.exists() and f"HTTP {status}" in r.stderr, (r.stdout, r.stderr)


def test_partial_answer_with_warnings_is_no_answer(fake_prometheus, tmp_path):
    """Prometheus's API: warnings are errors that did not stop the query, and
    the data field holds what was collected (a Thanos querier with a store
    down answers so): hosts may be missing, failures among them.  infos
    (hints about the query) are not such errors."""
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", B, 5, "--rollout", "5%")
    out = tmp_path / "next"
    partial = vector(healthy_fleet(B), warnings=["partial response: store 10.0.0.3:10901 unavailable"])
    r = promote(pointer, fake_prometheus(partial), key, out, "--bake", "0s")
    assert r.returncode == 3 and not out.exists() and "store 10.0.0.3" in r.stderr, (r.stdout, r.stderr)
    hinted = vector(healthy_fleet(B), infos=["PromQL info: metric might not be a counter"])
    r = promote(pointer, fake_prometheus(hinted), key, out, "--bake", "0s")
    assert r.returncode == EXIT["advance"], (r.stdout, r.stderr)


def test_explanation_names_each_failed_host_under_its_failure(fake_prometheus, tmp_path):
    """The paragraph a human acts on: a host that rolled the build back is
    not listed as one that did not boot it."""
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", B, 5, "--rollout", "5%")
    out = tmp_path / "next"
    samples = api_samples(host_samples("rb-host", B, current="a", state="rolled_back", ok=0, bucket=1)
                          + host_samples("bf-host", B, current="a", state="boot_failed", ok=0, bucket=2))
    r = promote(pointer, fake_prometheus(vector(samples)), key, out, "--bake", "0s")
    assert r.returncode == EXIT["halt"], (r.stdout, r.stderr)
    assert "1 rolled back (rb-host), 1 did not boot (bf-host)," in r.stdout, r.stdout
    samples = api_samples(host_samples("rb-host", B, current="a", state="rolled_back", ok=0, bucket=1))
    r = promote(pointer, fake_prometheus(vector(samples)), key, out, "--bake", "0s")
    assert "1 rolled back (rb-host), 0 did not boot," in r.stdout, r.stdout


def test_not_after_in_the_past_writes_nothing(fake_prometheus, tmp_path):
    """A next pointer every host would refuse as expired is no step: not an
    advance, and above all not a halt (the hosts would not pause)."""
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", B, 5, "--rollout", "5%")
    out = tmp_path / "next"
    for samples in (healthy_fleet(B), failing_fleet(B)):
        r = promote(pointer, fake_prometheus(vector(samples)), key, out, "--bake", "0s",
                    "--not-after", "2020-01-01T00:00:00Z")
        assert r.returncode == 2 and not out.exists(), (r.stdout, r.stderr)
        assert "--not-after" in r.stderr


def test_every_halt_pointer_is_one_the_real_agent_accepts(world, server, fake_prometheus, tmp_path):
    """The pointers a halt writes (a revert to the previous build; a pause of
    a ramp, which keeps its rollout lines), fetched and obeyed by the real
    agent: nothing refused."""
    a, c = world.path("a"), world.path("c")
    key = make_key(tmp_path, "ci")
    fleet = Fleet(world, server, tmp_path / "hosts", key, {"one": "one-0", "two": "two-0"}, "/halts")
    fleet.publish(sign(key, tmp_path / "p1", a, 1))
    for role in fleet.hosts:
        fleet.run(role)
    p2 = sign(key, tmp_path / "p2", c, 2)
    fleet.publish(p2)
    for role in fleet.hosts:
        fleet.run(role)
    assert {h.current for h in fleet.hosts.values()} == {c}
    prometheus = fake_prometheus(vector(failing_fleet(c)))
    out = tmp_path / "next"
    r = promote(p2, prometheus, key, out, "--bake", "0s", "--on-halt", "revert", "--revert-to", a)
    assert r.returncode == EXIT["halt"], (r.stdout, r.stderr)
    fleet.publish(out)
    for role in fleet.hosts:
        fleet.run(role)
    assert {h.current for h in fleet.hosts.values()} == {a}
    assert {h.state()["last_state"] for h in fleet.hosts.values()} <= {"deployed", "up_to_date"}

    ramp = sign(key, tmp_path / "p4", c, 4, "--rollout", "0%", "--rollout-start", "2020-01-01T00:00:00Z",
                "--rollout-duration", "1h")
    out.unlink()
    r = promote(ramp, prometheus, key, out, "--bake", "0s")
    assert r.returncode == EXIT["halt"], (r.stdout, r.stderr)
    paused = fields(out)
    assert (paused["pause"], paused["rollout-start"], paused["rollout-duration"]) == (
        "true", "2020-01-01T00:00:00Z", "1h")
    fleet.publish(out)
    for role in fleet.hosts:
        fleet.run(role)
    assert {h.current for h in fleet.hosts.values()} == {a}
    assert {h.state()["last_state"] for h in fleet.hosts.values()} == {"rollout_paused"}


@pytest.mark.parametrize("url", ["http://[::1/p", "http://127.0.0.1:99999/p", "http://127.0.0.1:1/p q", "http:///p"])
def test_malformed_pointer_url_is_a_usage_error(tmp_path, url):
    key = make_key(tmp_path, "ci")
    out = tmp_path / "next"
    argv = [sys.executable, str(AGENT), "promote", "--pointer", url, "--prometheus", "http://127.0.0.1:1",
            "--key", str(key.private), "-o", str(out), "--timeout", "1"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "internal error" not in r.stderr and not out.exists(), r.stderr


def test_key_held_by_ssh_agent(fake_prometheus, tmp_path):
    """`--key KEY.pub` with the private half in ssh-agent (ssh-keygen -Y sign
    takes either): the current pointer is verified against that public key."""
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", B, 5, "--rollout", "5%")
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ, **dict(line.split(";")[0].split("=", 1) for line in agent.splitlines() if "=" in line))
    try:
        subprocess.run(["ssh-add", "-q", str(key.private)], env=env, check=True, capture_output=True)
        out = tmp_path / "next"
        argv = [sys.executable, str(AGENT), "promote", "--pointer", str(pointer), "--prometheus",
                fake_prometheus(vector(healthy_fleet(B))), "--key", f"{key.private}.pub", "-o", str(out),
                "--bake", "0s", "--timeout", "5"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == EXIT["advance"], (r.stdout, r.stderr)
        assert fields(out)["rollout"] == "25%"
    finally:
        os.kill(int(env["SSH_AGENT_PID"]), 15)


def test_quarantined_state_is_a_failure_whatever_the_path_label_says(fake_prometheus, tmp_path):
    """The agent reports state `quarantined` only when its upstream (here the
    build) is quarantined.  Where the scrape target has a `path` label of its
    own, Prometheus renames the agent's to `exported_path` (honor_labels:
    false), and a metric_relabel_configs may drop it: the host that rolled
    the build back must still count as a failure on its next runs."""
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", B, 5, "--rollout", "5%")
    out = tmp_path / "next"
    host = host_samples("q", B, current="a", state="quarantined", bucket=3, quarantined=B)
    for s in host:
        if s["metric"]["__name__"].endswith("_quarantined"):
            s["metric"]["exported_path"] = s["metric"].pop("path")
        s["metric"]["path"] = "/node"  # the target's label
    r = promote(pointer, fake_prometheus(vector(api_samples(host) + healthy_fleet(B))), key, out, "--bake", "0s")
    assert r.returncode == EXIT["halt"] and "1 rolled back (q)" in r.stdout, (r.stdout, r.stderr)


@needs_prometheus
def test_target_labels_named_like_the_agents_own(world, server, tmp_path):
    """Scrape targets labelled `state` (a region) and `path`: the real
    Prometheus renames the agent's labels to exported_state and
    exported_path (honor_labels: false).  promote still sees each host once,
    its state, and the canary that rolled the build back."""
    a, b = world.path("a"), world.path("b")
    key = make_key(tmp_path, "ci")
    names = {"good1": "good-1", "good2": "good-2", "bad": "bad-1"}
    fleet = Fleet(world, server, tmp_path, key, names, "/labels")
    fleet.publish(sign(key, tmp_path / "p0", a, 1))
    for role in fleet.hosts:
        fleet.run(role)
    p1 = sign(key, tmp_path / "p1", b, 2)
    fleet.publish(p1)
    fleet.hosts["bad"].ctl("fail").write_text(b + "\n")
    fleet.run("good1")
    fleet.run("good2")
    fleet.run("bad", expect=(5,))
    fleet.run("bad")  # its next run: state quarantined
    monitor = FleetMonitor(tmp_path, fleet.textfile_dirs(), labels={"state": "CA", "path": "/node"})
    try:
        monitor.wait_for("the renamed labels", lambda: {
            r["metric"]["instance"]: r["metric"].get("exported_state")
            for r in monitor.query("nixos_autodeploy_state == 1")} == {
            "good1": "deployed", "good2": "deployed", "bad": "quarantined"})
        out = tmp_path / "next"
        r = promote(p1, monitor.base, key, out, "--bake", "0s", "--min-healthy", "2")
        assert r.returncode == EXIT["halt"], (r.stdout, r.stderr)
        assert "3 host(s) report it, 3 admitted: 2 healthy, 1 rolled back (bad)" in r.stdout, r.stdout
    finally:
        monitor.close()
        for h in fleet.hosts.values():
            h.kill_orphans()


def test_a_hosts_older_info_series_does_not_hide_its_failure(fake_prometheus, tmp_path):
    """A Prometheus restarted within its lookback writes no staleness markers
    for what vanished while it was down: a host's info series from before
    (other labels) is answered next to the current one, in label order.  A
    host whose current series names the build and which rolled it back
    counts as a failure whichever comes last."""
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", B, 5, "--rollout", "5%")
    out = tmp_path / "next"
    failed = host_samples("bad", B, current="a", state="rolled_back", ok=0, bucket=3)
    before = sample("info", instance="bad", upstream_generation="0" * 32 + "-a", current_generation="a",
                    deployed_generation="a", booted_generation="a")
    for order in ([failed[0], before], [before, failed[0]]):
        samples = api_samples(order + failed[1:]) + healthy_fleet(B)
        r = promote(pointer, fake_prometheus(vector(samples)), key, out, "--bake", "0s")
        assert r.returncode == EXIT["halt"] and "1 rolled back (bad)" in r.stdout, (r.stdout, r.stderr)
        out.unlink()


@needs_prometheus
def test_failure_seen_right_after_a_prometheus_restart(world, server, tmp_path):
    """The real sequence behind the test above: Prometheus stops, a canary
    rolls the build back meanwhile, Prometheus starts again on its data; for
    its lookback it answers the host's info series from before as well,
    after the current one when its labels sort after it (as here)."""
    paths = sorted((world.path(n) for n in "bcd"), key=os.path.basename)  # hosts start on a
    b, a = paths[0], paths[-1]  # the series from before (upstream a) is answered last
    key = make_key(tmp_path, "ci")
    fleet = Fleet(world, server, tmp_path, key, {"bad": "bad-1", "good": "good-1"}, "/restart")
    for revision, path in ((1, world.path("a")), (2, a)):
        fleet.publish(sign(key, tmp_path / f"p0-{revision}", path, revision))
        for role in fleet.hosts:
            fleet.run(role)
    monitor = FleetMonitor(tmp_path, fleet.textfile_dirs())
    try:
        monitor.wait_for("both deployed a", lambda: set(states(monitor).values()) == {"deployed"})
        time.sleep(2)
    finally:
        monitor.close()
    p1 = sign(key, tmp_path / "p1", b, 3)
    fleet.publish(p1)
    fleet.hosts["bad"].ctl("fail").write_text(b + "\n")
    fleet.run("bad", expect=(5,))
    fleet.run("good")
    monitor = FleetMonitor(tmp_path, fleet.textfile_dirs())
    try:
        monitor.wait_for("bad rolled back", lambda: states(monitor).get("bad") == "rolled_back")
        infos = [r["metric"]["upstream_generation"] for r in monitor.query('nixos_autodeploy_info{instance="bad"}')]
        assert infos == [os.path.basename(b), os.path.basename(a)]  # the premise
        r = promote(p1, monitor.base, key, tmp_path / "next", "--bake", "0s")
        assert r.returncode == EXIT["halt"] and "1 rolled back (bad)" in r.stdout, (r.stdout, r.stderr)
    finally:
        monitor.close()
        for h in fleet.hosts.values():
            h.kill_orphans()


def test_a_stale_report_is_not_healthy():
    """A textfile an agent wrote long ago (its timer broke with the new
    build) proves nothing: the host is stuck, not healthy."""
    b = "/nix/store/" + "1" * 32 + "-b"
    nb = os.path.basename(b)
    samples = host_samples("fresh", b, current=nb, state="up_to_date", last_run=10_000.0) + host_samples(
        "stale", b, current=nb, state="up_to_date", last_run=10_000.0 - 30 * 3600)
    count = ad.count_fleet(samples, b, 100.0, now=10_000.0, max_age=26 * 3600)
    assert (count.healthy, count.stuck) == (1, 1)
    assert ad.count_fleet(samples, b, 100.0).healthy == 2  # without an age limit


def test_a_finished_ramp_is_complete():
    ramp = ad.Rollout(5.0, start=0.0, duration=3600.0)
    count = ad.FleetCount(reporting=4, admitted=4, healthy=4)
    assert ad.promote_verdict(count, POLICY, ramp, 7200.0, now=1800.0)[0] == "hold"
    assert ad.promote_verdict(count, POLICY, ramp, 7200.0, now=3600.0)[0] == "complete"


def test_revert_to_without_revert_is_a_usage_error(world, tmp_path):
    key = make_key(tmp_path, "ci")
    pointer = sign(key, tmp_path / "p", world.path("b"), 1, "--rollout", "5%")
    r = promote(pointer, f"http://127.0.0.1:{free_port()}", key, tmp_path / "next", "--revert-to", world.path("a"))
    assert r.returncode == 2 and "--revert-to is used only with --on-halt revert" in r.stderr, r.stderr


def test_sign_writes_the_first_steps_start(world, tmp_path):
    key = make_key(tmp_path, "ci")
    before = time.time()
    pointer = fields(sign(key, tmp_path / "p", world.path("b"), 1, "--rollout", "5%"))
    started = ad.parse_rfc3339(pointer["x-step-started"]).timestamp()
    assert before - 1 <= started <= time.time() + 1
    assert "x-step-started" not in fields(sign(key, tmp_path / "q", world.path("b"), 2))


def test_a_host_that_went_silent_after_deploying_is_counted():
    """A host whose series all went away after it deployed the build (its
    exporter, or the host, is gone) is silent; one that still reports, or
    that deployed another build, is not."""
    nb = os.path.basename(B)
    now = api_samples(host_samples("h0", B, current=nb, state="deployed", bucket=1))
    recent = [{"metric": {"instance": i, "deployed_generation": g}, "value": [0, "1"]}
              for i, g in (("h0", nb), ("h1", nb), ("h2", "other"))]
    # The agent's label kept as exported_ beside a target label of that name.
    recent.append({"metric": {"instance": "h3", "deployed_generation": "t", "exported_deployed_generation": nb},
                   "value": [0, "1"]})
    count = ad.FleetCount()
    ad.count_silent(count, B, [{"metric": s["metric"], "value": 1.0} for s in recent],
                    [{"metric": s["metric"], "value": 1.0} for s in now])
    assert (count.silent, count.silent_hosts) == (2, ["h1", "h3"])
    rollout = ad.parse_rollout({"rollout": "50%"})
    count.healthy = count.admitted = count.reporting = 1
    verdict, _, why = ad.promote_verdict(count, ad.PromotePolicy(bake=0), rollout, 10.0)
    assert verdict == "hold" and "2 host(s) that deployed it" in why and "(h1, h3)" in why, why
    assert ad.promote_verdict(count, ad.PromotePolicy(bake=0, max_silent=2), rollout, 10.0)[0] == "advance"
    # A failure still halts, silent hosts or not.
    count.rolled_back = 1
    assert ad.promote_verdict(count, ad.PromotePolicy(bake=0), rollout, 10.0)[0] == "halt"


@needs_prometheus
def test_a_canary_that_goes_silent_holds_the_rollout(world, server, tmp_path):
    """Issue #21: a canary that deployed the build and then reports nothing
    (what a host that never came back from the reboot into it looks like)
    is not ignored: the rollout holds until --max-silent allows it, with
    the real Prometheus' staleness handling and last_over_time."""
    a, b = world.path("a"), world.path("b")
    key = make_key(tmp_path, "ci")
    candidates = [f"web-{i}" for i in range(2000)]
    canaries = [n for n in candidates if bucket(n, b) < 5000][:2]
    fleet = Fleet(world, server, tmp_path, key, {"canary1": canaries[0], "canary2": canaries[1]}, "/fleet")
    fleet.publish(sign(key, tmp_path / "p0", a, 1))
    for role in fleet.hosts:
        fleet.run(role)  # tracking a
    p1 = sign(key, tmp_path / "p1", b, 2, "--rollout", "50%")
    fleet.publish(p1)
    for role in fleet.hosts:
        fleet.run(role)
    assert all(h.current == b for h in fleet.hosts.values())
    monitor = FleetMonitor(tmp_path, fleet.textfile_dirs())
    try:
        monitor.wait_for("both deployed", lambda: states(monitor) == {"canary1": "deployed", "canary2": "deployed"},
                         timeout=60)
        out = tmp_path / "next"
        gone = monitor.exporters["canary2"]
        stop(gone)
        monitor.procs.remove(gone)
        monitor.wait_for("canary2's series gone", lambda: set(states(monitor)) == {"canary1"})
        r = promote(p1, monitor.base, key, out, "--steps", "50,100", "--bake", "0s")
        assert r.returncode == EXIT["hold"] and not out.exists(), (r.stdout, r.stderr)
        assert r.stdout.startswith("HOLD: 1 host(s) that deployed it within --max-report-age report nothing now "
                                   "(canary2)"), r.stdout
        assert "1 silent (canary2)" in r.stdout
        # Outside the look-back window it is forgotten: a decommissioned host
        # does not hold rollouts for ever.
        time.sleep(2)
        r = promote(p1, monitor.base, key, out, "--steps", "50,100", "--bake", "0s", "--max-report-age", "1s")
        assert "0 silent" in r.stdout, r.stdout
        r = promote(p1, monitor.base, key, out, "--steps", "50,100", "--bake", "0s", "--max-silent", "1")
        assert r.returncode == EXIT["advance"], (r.stdout, r.stderr)
    finally:
        monitor.close()
        for h in fleet.hosts.values():
            h.kill_orphans()
