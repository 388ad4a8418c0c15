"""Helpers the test files share, one home for each: what a host's metrics
say, waiting for a condition, killing the agent, filling a disk, the
documented rollout bucket, suspend, reboot requests, a failing health check
and a reboot window, signing keys, hooks that write down their environment
and a host's FleetLock identity and cycle.  Servers are in servers.py, the test world in
world.py, fixtures in conftest.py."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from world import METRICS, REPO, app_specific_id

sys.path.insert(0, str(REPO))
import autodeploy  # noqa: E402


def promtool_ok(host) -> None:
    """The metrics file is valid Prometheus text (promtool when installed)."""
    text = host.metrics_text()
    assert text.endswith("\n")
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        # promtool exits 0 or lists lint problems; either way it must parse.
        assert r.returncode == 0, r.stdout + r.stderr


def state_gauge(host) -> str:
    m = host.metrics()
    ones = [k for k, v in m.items() if k.startswith("nixos_autodeploy_state{") and v == 1]
    assert len(ones) == 1, ones
    return ones[0].split('"')[1]


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def assert_host(host, *, current: str, profile: str, deployed: str) -> None:
    assert host.current == current, "current system"
    assert host.profile == profile, "profile target"
    assert host.state()["deployed"] == deployed, "record"
    assert host.state().get("intent") is None, "no interrupted deploy left behind"


def quarantined(host) -> dict[str, float]:
    return {k: v for k, v in host.metrics().items() if k.startswith("nixos_autodeploy_quarantined{")}


def track(host) -> None:
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr


def kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def fill_leaving(directory: Path, keep: int) -> Path:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - keep))
    return filler


def bucket(hostname: str, path: str) -> int:
    """The documented rule: sha256(hostname NUL store path) as an integer, mod 10000."""
    return int.from_bytes(hashlib.sha256(f"{hostname}\0{path}".encode()).digest(), "big") % 10000


# A health check the test fails by creating /var/lib/standin/unhealthy, and a
# reboot window with a time outside and one inside it.
CHECK = ("--health-check", "test ! -e /var/lib/standin/unhealthy")
WINDOW = ("--reboot-window", "02:00-04:00")
OUTSIDE = {"NIXOS_AUTODEPLOY_NOW": "2026-11-23T12:00:00"}
INSIDE = {"NIXOS_AUTODEPLOY_NOW": "2026-11-24T03:00:00"}


def suspend(host, reason: str = "maintenance") -> None:
    r = host.agent("suspend", "--reason", reason)
    assert r.returncode == 0, r.stderr


def reboot_calls(host) -> int:
    return sum(1 for c in host.calls() if c in ("systemctl reboot", "systemctl kexec"))


def everything_persisted(host) -> str:
    """state.json, the revision floor and the metrics file, as written."""
    parts = []
    for path in (host.var_lib / "nixos-autodeploy" / "state.json",
                 host.var_lib / "nixos-autodeploy" / "revision-floor",
                 host.var_lib / METRICS[len("/var/lib/"):]):
        if path.exists():
            parts.append(path.read_text())
    return "\n".join(parts)


def pointer_requests(server, path="/pointer"):
    return [q for q in server.requests if q["path"] == path]


def error_kind(host) -> str | None:
    kinds = re.findall(r'^nixos_autodeploy_last_error_info\{kind="([^"]*)"', host.metrics_text(), re.M)
    assert len(kinds) <= 1, kinds
    return kinds[0] if kinds else None


# ---------------------------------------------------------------------------
# Signing keys (ssh-keygen -t ed25519)
# ---------------------------------------------------------------------------

SSH_KEYGEN = "/usr/bin/ssh-keygen"


@dataclass(frozen=True)
class Key:
    name: str
    private: Path
    public: str  # "ssh-ed25519 AAAA... comment"

    @property
    def blob(self) -> str:
        return " ".join(self.public.split()[:2])


def make_key(directory: Path, name: str) -> Key:
    private = directory / name
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@ci", "-f", str(private)],
                   check=True, capture_output=True)
    return Key(name, private, (directory / f"{name}.pub").read_text().strip())


# ---------------------------------------------------------------------------
# Hooks that write down the NIXOS_AUTODEPLOY_* environment they were given
# ---------------------------------------------------------------------------


def hook_script(host, name: str, body: str = "") -> str:
    out = host.root / f"{name}.env"
    script = host.root / f"{name}.sh"
    script.write_text("#!/bin/sh\nenv | grep ^NIXOS_AUTODEPLOY_ | sort > " + str(out) + "\n" + body)
    script.chmod(0o755)
    return str(script)


def read_env(host, name: str) -> dict[str, str]:
    path = host.root / f"{name}.env"
    return dict(line.split("=", 1) for line in path.read_text().splitlines()) if path.exists() else {}


# ---------------------------------------------------------------------------
# FleetLock: a host's client id and a cycle that asks for a reboot slot
# ---------------------------------------------------------------------------

APP_ID = autodeploy.FLEETLOCK_APP_ID


def machine_id(host) -> str:
    """Each simulated host gets its own /etc/machine-id stand-in (test-only variable)."""
    path = host.root / "machine-id"
    if not path.exists():
        path.write_text(secrets.token_hex(16) + "\n")
    return path.read_text().strip()


def lock_id(host) -> str:
    return app_specific_id(machine_id(host), APP_ID)


def fl_once(host, fleetlock, *args: str, url: str | None = None):
    machine_id(host)
    return host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot",
                     "--fleetlock-url", url or fleetlock.url, *args,
                     env={"NIXOS_AUTODEPLOY_MACHINE_ID_FILE": str(host.root / "machine-id")})


# -- boot: stage a system, fall back, systemd-boot's EFI variables ----------

LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
MiB = 1024 * 1024


def boot_default(host) -> str:
    return host.ctl("boot-default").read_text().strip()


def stage(host, system: str, *args: str) -> None:
    """Track what runs, then stage `system` for the next boot."""
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    host.server.pointer(system)
    r = host.once(host.url, "--switch-mode", "boot", *args)
    assert r.returncode == 0, r.stderr
    assert state_gauge(host) == "pending_reboot"
    assert boot_default(host) == system


def fall_back(host, previous: str) -> None:
    """The boot loader gives up on the staged entry and boots the previous one."""
    host.ctl("boot-default").write_text(previous + "\n")
    host.reboot()
    assert host.current == previous


def efivars(host, selected: str, default: str) -> str:
    """systemd-boot's Boot Loader Interface variables as efivarfs shows them."""
    d = host.root / "efivars"
    d.mkdir(exist_ok=True)
    for name, value in (("LoaderEntrySelected", selected), ("LoaderEntryDefault", default)):
        (d / f"{name}-{LOADER_GUID}").write_bytes(b"\x06\x00\x00\x00" + (value + "\0").encode("utf-16-le"))
    return str(d)


def stop_during_download(host, server, path: str, how: str):
    """Start a run, wait until it downloads `path` from the cache, then stop
    it: SIGTERM, or `systemctl stop` (SIGTERM to every process of the unit,
    nix included).  Returns the stopped process."""
    proc = host.agent_background("--once", "--url", host.url, "--prometheus-path",
                                 "/var/lib/prometheus-node-exporter-text/nixos-autodeploy.prom")
    digest = os.path.basename(path)[:32]
    wait_for(lambda: any(str(q["path"]).startswith(f"/cache/{digest}") for q in server.requests),
             what="the download")
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        host.stop_unit(proc)
    proc.wait(30)
    return proc
