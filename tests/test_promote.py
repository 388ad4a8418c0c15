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

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import NODE_EXPORTER, PROMETHEUS, FleetMonitor, free_port
from test_trust import make_key
from world import AGENT, METRICS, REPO, Host

sys.path.insert(0, str(REPO))
import autodeploy as ad  # noqa: E402

MISSING = [p for p in (PROMETHEUS, NODE_EXPORTER) if not os.path.exists(p)]
needs_prometheus = pytest.mark.skipif(bool(MISSING) and os.environ.get("CI") != "true",
                                      reason=f"{MISSING} not installed (tests/run.sh installs them)")
EXIT = {"advance": 0, "hold": 10, "halt": 11, "complete": 12}


def bucket(hostname: str, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{hostname}\0{path}".encode()).digest(), "big") % 10000


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
    (ad.FleetCount(admitted=4, healthy=4), ad.Rollout(5.0), 7200.0, POLICY, "advance", 25.0),
    (ad.FleetCount(admitted=4, healthy=4), ad.Rollout(25.0), 7200.0, POLICY, "advance", 100.0),
    (ad.FleetCount(admitted=4, healthy=4), ad.Rollout(30.0), 7200.0, POLICY, "advance", 100.0),
    (ad.FleetCount(admitted=4, healthy=4), ad.Rollout(5.0), 60.0, POLICY, "hold", None),
    (ad.FleetCount(admitted=4, healthy=4), ad.Rollout(5.0), None, POLICY, "hold", None),
    (ad.FleetCount(admitted=4, healthy=1), ad.Rollout(5.0), 7200.0, POLICY, "hold", None),
    (ad.FleetCount(admitted=4, healthy=3, rolled_back=1), ad.Rollout(5.0), 7200.0, POLICY, "halt", None),
    (ad.FleetCount(admitted=4, healthy=3, boot_failed=1), ad.Rollout(100.0), 7200.0, POLICY, "halt", None),
    (ad.FleetCount(admitted=4, healthy=4), ad.Rollout(100.0), 7200.0, POLICY, "complete", None),
    (ad.FleetCount(admitted=4, healthy=4), ad.Rollout(5.0, paused=True), 7200.0, POLICY, "hold", None),
    (ad.FleetCount(admitted=4, rolled_back=4), ad.Rollout(5.0, paused=True), 7200.0, POLICY, "hold", None),
    (ad.FleetCount(admitted=4, healthy=4), ad.Rollout(5.0, start=0.0, duration=60.0), 7200.0, POLICY, "hold",
     None),
    # 1 of 20 is 5%: within a 10% limit once --max-failures allows one.
    (ad.FleetCount(admitted=20, healthy=19, rolled_back=1), ad.Rollout(5.0), 7200.0,
     ad.PromotePolicy(min_healthy=2, max_failures=1, max_failure_percent=10.0), "advance", 25.0),
    (ad.FleetCount(admitted=5, healthy=4, rolled_back=1), ad.Rollout(5.0), 7200.0,
     ad.PromotePolicy(min_healthy=2, max_failures=1, max_failure_percent=10.0), "halt", None),
])
def test_promote_verdict(count, rollout, age, policy, verdict, step):
    got, percent, why = ad.promote_verdict(count, policy, rollout, age)
    assert (got, percent) == (verdict, step), why


def sample(name: str, value: float = 1, **labels: str) -> dict:
    return {"metric": {"__name__": f"nixos_autodeploy_{name}", "instance": labels.pop("instance"), **labels},
            "value": value}


def host_samples(instance: str, build: str, *, current: str, state: str, ok: float = 1, bucket: int | None = None,
                 quarantined: str = "") -> list[dict]:
    name = os.path.basename(build)
    out = [sample("info", instance=instance, upstream_generation=name, current_generation=current,
                  deployed_generation=current, booted_generation=current),
           sample("state", 1, instance=instance, state=state), sample("state", 0, instance=instance, state="dirty"),
           sample("last_run_success", ok, instance=instance),
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
