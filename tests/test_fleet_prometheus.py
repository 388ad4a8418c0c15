"""The fleet view through real Prometheus (issue #14, part 3).

Several simulated hosts (real agent, real nix) write their textfiles; one
Debian `prometheus-node-exporter` per host exposes them; a Debian
`prometheus` scrapes them every second and loads contrib/alerts.yml.  Through
Prometheus' HTTP API: every query of contrib/grafana-dashboard.json returns
data, and an alert fires for the one host that is made to fail.  All on
127.0.0.1, bounded, every process stopped at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from servers import NODE_EXPORTER, PROMETHEUS, FleetLockServer, FleetMonitor
from util import bucket
from world import METRICS, REPO, Host

DASHBOARD = REPO / "contrib" / "grafana-dashboard.json"
ALERTS = REPO / "contrib" / "alerts.yml"
MISSING = [os.path.basename(path) for path in (PROMETHEUS, NODE_EXPORTER) if not os.path.exists(path)]
if MISSING and os.environ.get("CI") != "true":
    pytestmark = pytest.mark.skip(reason=f"{' and '.join(MISSING)} not installed (Debian: apt-get install "
                                         "prometheus prometheus-node-exporter; tests/run.sh does)")


def dashboard_queries() -> list[str]:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def test_dashboard_has_the_fleet_table_and_panels():
    dash = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dash["panels"]}
    assert {"Fleet", "Deploys", "Rollbacks", "Refusals"} <= titles
    (table,) = [p for p in dash["panels"] if p["type"] == "table"]
    organize = table["transformations"][1]["options"]
    columns = {organize["renameByName"].get(name, name) for name in organize["indexByName"]}
    for column in ("host", "state", "current", "upstream", "rollout bucket", "rollout %", "last success age",
                   "reboot required"):
        assert column in columns
    for expr in dashboard_queries():
        assert "$" not in expr, f"dashboard queries run as they are (no Grafana variables): {expr}"


def test_fleet_through_node_exporter_and_prometheus(world, server, tmp_path):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    # Three hosts: `web` is in the 50% wave and gets deployed, then made to
    # fail; `db` waits for its wave; `cache` boot-deploys and waits for a
    # FleetLock slot someone else holds.
    names = {}
    for role, admitted in (("web", True), ("db", False)):
        names[role] = next(f"{role}-{i}" for i in range(1000) if (bucket(f"{role}-{i}", b) < 5000) == admitted)
    hosts = {}
    for role in ("web", "db", "cache"):
        h = Host(tmp_path / role, world, server)
        h.install(a)
        h.url = server.pointer(a, f"/{role}")
        (h.root / "machine-id").write_text(hashlib.md5(role.encode()).hexdigest() + "\n")
        hosts[role] = h
    fleetlock = FleetLockServer(slots=1)
    fleetlock.operate("pre-reboot", "someone-else", "default")

    def run(role: str) -> None:
        h = hosts[role]
        extra = ["--hostname", names.get(role, role)]
        if role == "cache":
            extra += ["--switch-mode", "boot", "--reboot-mode", "reboot", "--fleetlock-url", fleetlock.url]
        r = h.once(h.url, *extra, env={"NIXOS_AUTODEPLOY_MACHINE_ID_FILE": str(h.root / "machine-id")})
        assert r.returncode in (0, 5), r.stderr

    for role in hosts:
        run(role)  # tracking a: every textfile exists before the exporters start

    textfiles = {role: h.var_lib / os.path.dirname(METRICS)[len("/var/lib/"):] for role, h in hosts.items()}
    monitor = FleetMonitor(tmp_path, textfiles, rule_files=(ALERTS,))
    started = time.monotonic()
    try:
        monitor.wait_for("agent metrics",
                         lambda: len(monitor.query("nixos_autodeploy_last_run_timestamp_seconds")) == 3)
        rules = monitor.get("/api/v1/rules")["data"]["groups"]
        assert [g["name"] for g in rules] == ["nixos-autodeploy"], "contrib/alerts.yml is loaded"

        # The fleet moves: a 50% wave of b for web and db, a boot deploy for cache.
        for role in ("web", "db"):
            server.set(f"/{role}", f"{b}\nrollout: 50%\n")
        server.pointer(b, "/cache")
        for role in hosts:
            run(role)
        assert hosts["web"].current == b and hosts["db"].current == a
        def new_states():
            now = {r["metric"]["instance"]: r["metric"]["state"]
                   for r in monitor.query("nixos_autodeploy_state == 1")}
            return now if len(now) == 3 and "tracking" not in now.values() else None
        states = monitor.wait_for("the new states in Prometheus", new_states)
        assert states == {"web": "deployed", "db": "waiting_rollout", "cache": "waiting_reboot_slot"}, states

        # Every query the dashboard uses returns data.
        empty: list[str] = []

        def all_queries_answer():
            empty[:] = [expr for expr in dashboard_queries() if not monitor.query(expr)]
            return not empty or None
        try:
            monitor.wait_for("every dashboard query to return data", all_queries_answer)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; dashboard queries without data: {empty}") from None
        table = {r["metric"]["instance"]: float(r["value"][1])
                 for r in monitor.query("max by (instance) (nixos_autodeploy_rollout_bucket_number)")}
        assert table == {"web": bucket(names["web"], b), "db": bucket(names["db"], b)}
        assert {r["metric"]["instance"] for r in monitor.query("nixos_autodeploy_fleetlock_failures_total")} == {"cache"}

        # One host is made to fail: its deploy of c is rolled back.
        assert not [x for x in monitor.get("/api/v1/alerts")["data"]["alerts"] if x["state"] == "firing"
                    and x["labels"]["alertname"] == "NixosAutodeployRolledBack"]
        hosts["web"].ctl("fail").write_text(c + "\n")
        server.pointer(c, "/web")
        r = hosts["web"].once(hosts["web"].url, "--hostname", names["web"])
        assert r.returncode == 5, r.stderr

        def rolled_back_alert():
            alerts = monitor.get("/api/v1/alerts")["data"]["alerts"]
            firing = [x for x in alerts if x["state"] == "firing"
                      and x["labels"]["alertname"] == "NixosAutodeployRolledBack"]
            return firing or None
        firing = monitor.wait_for("NixosAutodeployRolledBack to fire", rolled_back_alert)
        assert [x["labels"]["instance"] for x in firing] == ["web"]
        assert firing[0]["labels"]["severity"] == "warning"
        print(f"\nalert fired for web {time.monotonic() - started:.1f}s into the test; "
              f"{len(dashboard_queries())} dashboard queries answered")
    finally:
        monitor.close()
        fleetlock.close()
        for h in hosts.values():
            h.kill_orphans()
    assert all(proc.poll() is not None for proc in monitor.procs)
