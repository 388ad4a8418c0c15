"""Cheap polls: a no-op cycle spawns nothing, conditional requests, loop mode."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import world as world_mod
from servers import TLSServer
from util import wait_for

TOOLS = ("nix", "nix-store", "nix-env", "nix-build", "systemd-run", "systemctl", "kexec", "ssh-keygen", "sh",
         "curl", "hostname", "uname")


def test_noop_cycle_spawns_no_process(host, world, tmp_path):
    assert host.once(host.url).returncode == 0
    spy = tmp_path / "spy"
    spy.mkdir()
    log = tmp_path / "spawned.log"
    for tool in TOOLS:
        (spy / tool).write_text(f"#!/bin/sh\necho {tool} >> {log}\nexit 99\n")
        (spy / tool).chmod(0o755)
    r = host.once(host.url, env={"PATH": str(spy)})
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stderr
    assert not log.exists(), log.read_text()


def test_conditional_requests_make_304_a_bodyless_noop(host, world, server):
    b = world.path("b")
    server.pointer(world.path("a"), etag=True)
    assert host.once(host.url).returncode == 0
    assert host.state()["pointer"]["etag"]
    sent = server.bytes_sent
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    last = [q for q in server.requests if q["path"] == "/pointer"][-1]
    assert last["headers"].get("If-None-Match") == host.state()["pointer"]["etag"]
    assert last["status"] == 304 and server.bytes_sent == sent  # no body
    assert "up to date" in r.stderr and host.metrics()["nixos_autodeploy_last_run_success"] == 1

    server.pointer(b, etag=True)  # a new pointer: new ETag, 200 with body
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.state()["deployed"] == b


def open_fds(pid: int) -> int:
    """The most descriptors seen over half a second (a poll may be under way)."""
    most = 0
    for _ in range(25):
        most = max(most, len(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(0.02)
    return most


def test_loop_mode_leaks_no_descriptor_and_stops_on_sigterm(host, world, server):
    """100 polls, each through redirects to two other servers: urllib keeps no
    connection alive, and nothing is left open between polls."""
    hop, last = world_mod.PointerServer(world.cache), world_mod.PointerServer(world.cache)
    try:
        last.pointer(world.path("a"), etag=True)
        hop.set("/hop", "", status=307, headers={"Location": last.base + "/pointer"})
        server.set("/start", "", status=302, headers={"Location": hop.base + "/hop"})
        proc = host.agent_background("--url", server.base + "/start", "--interval", "0.02",
                                     "--prometheus-path", "/run/m.prom")
        try:
            wait_for(lambda: "autodeploy.py" in Path(f"/proc/{proc.pid}/cmdline").read_text(), what="exec")
            polls = lambda: sum(q["path"] == "/pointer" for q in last.requests)  # noqa: E731
            wait_for(lambda: polls() >= 10, what="10 polls")
            early = open_fds(proc.pid)
            wait_for(lambda: polls() >= 110, what="110 polls", timeout=120)
            late = open_fds(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        out = proc.log_path.read_text()
        assert proc.returncode == 0, out
        assert "stopped" in out
        assert late <= early, f"descriptors: {early} after 10 polls, {late} after 110"
        statuses = [q["status"] for q in last.requests if q["path"] == "/pointer"]
        assert statuses[0] == 200 and statuses[1:].count(304) >= len(statuses) - 3
    finally:
        hop.close()
        last.close()


def test_loop_mode_writes_what_matters_at_once_and_held_timestamps_on_sigterm(host, world, server):
    """Loop mode holds a state.json that differs only in the run timestamps
    (up to TIMESTAMPS_WRITTEN_EVERY_SECONDS, see test_unit), but a deploy is
    on disk before the metrics that report it, and SIGTERM writes what is
    held: after the stop, state.json says what the last metrics say."""
    b = world.path("b")
    assert host.once(host.url).returncode == 0  # tracking a
    proc = host.agent_background("--url", host.url, "--interval", "0.05", "--prometheus-path", world_mod.METRICS)
    last_run = lambda: host.metrics()["nixos_autodeploy_last_run_timestamp_seconds"]  # noqa: E731
    try:
        wait_for(lambda: "autodeploy.py" in Path(f"/proc/{proc.pid}/cmdline").read_text(), what="exec")
        start = host.state()["last_run"]
        wait_for(lambda: last_run() > start + 0.01, what="a poll of the loop")
        server.pointer(b)  # within the bound of the loop's first write: only "at once" puts it on disk
        wait_for(lambda: host.metrics()["nixos_autodeploy_deploys_total"] == 1, what="the deploy", timeout=60)
        state = host.state()
        assert state["deployed"] == b and state["deploys_total"] == 1, "the deploy was not written at once"
        # The next poll is a no-op; its new last_state is written, and then only timestamps change.
        wait_for(lambda: host.state()["last_state"] == "up_to_date", what="the no-op poll after the deploy")
        written = host.state()["last_run"]
        wait_for(lambda: last_run() > written + 0.01, what="no-op polls after the deploy")
        assert host.state()["last_run"] == written, "a timestamp-only change was written at once"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.log_path.read_text()
    assert abs(host.state()["last_run"] - last_run()) < 0.002, "the held timestamps were not written on SIGTERM"
    assert host.state()["deployed"] == b


def test_sigterm_during_activation_waits_for_it(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    proc = host.agent_background("--url", host.url, "--interval", "3600")
    try:
        wait_for(lambda: host.activations(), what="the activation")
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert proc.poll() is None, "the agent must not stop in the middle of an activation"
    finally:
        host.ctl("hang").unlink()
    proc.wait(timeout=60)
    assert proc.returncode == 0, proc.log_path.read_text()
    assert host.current == b and host.state()["deployed"] == b and host.state()["intent"] is None


# -- TLS -----------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path):
    try:
        srv = TLSServer(tmp_path)
    except RuntimeError as e:
        pytest.skip(str(e))
    yield srv.url
    srv.close()


def test_untrusted_tls_certificate_is_a_clear_fetch_error(host, world, tls_server):
    r = host.once(tls_server)
    assert r.returncode == 3, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "TLS error" in errors[0] and "CERTIFICATE_VERIFY_FAILED" in errors[0]
    assert "Traceback" not in r.stderr
    assert host.current == world.path("a")


def test_http_redirect_to_https_is_followed(host, world, server, tls_server):
    server.set("/moved", "", status=302, headers={"Location": tls_server})
    r = host.once(server.base + "/moved")
    assert r.returncode == 3, r.stderr  # followed to the https URL, whose certificate is untrusted
    assert "TLS error" in r.stderr
