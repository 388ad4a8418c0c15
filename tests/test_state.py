"""Attacks from an adversarial review, replayed against the real agent, real
nix and the real ssh-keygen, each asserting the safe outcome.

Hostile servers: 304 replays, echoed tokens, escape sequences, redirects to
internal endpoints, lenient metadata.  Hostile local users: planted symlinks,
writable state directories, full disks.  Every test names the item of the
review it answers (issue "Hostile servers, hostile local users").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import servers
from util import INSIDE, WINDOW, fill_leaving, reboot_calls, wait_for
from test_trust import (AGENT, Signed, error_kind, keygen_sign, keys, serve, sign, signed,  # noqa: F401
                        state_gauge, trust_file)
from world import METRICS

TOKEN = "tok-8c1f2e-SECRET-TOKEN"


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


# ---------------------------------------------------------------------------
# 1. A 304 replays only a pointer verified under the current keys, URL, host


def test_304_never_replays_a_pointer_stored_by_a_keyless_run(signed: Signed, host, world, server):
    a, b = world.path("a"), world.path("b")
    server.pointer(b, etag=True)            # unsigned, for another system, with an ETag
    server.routes.pop("/pointer.sig", None)
    assert host.agent("suspend", "--reason", "maintenance").returncode == 0
    r = host.once(host.url)                 # an operator's manual run without --trusted-keys
    assert r.returncode == 0, r.stderr
    assert host.state()["pointer"]["keys"] is None and host.state()["pointer"]["etag"]
    assert host.agent("resume").returncode == 0
    before = len(pointer_requests(server))
    r = signed.once()
    assert r.returncode == 4, r.stderr      # fetched unconditionally and refused: unsigned
    last = pointer_requests(server)[before]
    assert "If-None-Match" not in last["headers"] and last["status"] == 200
    assert host.current == a and host.profile == a and error_kind(host) == "signature"


def test_304_replay_under_other_keys_fetches_unconditionally(signed: Signed, host, world, server, tmp_path, keys):
    server.routes["/pointer"].etag = True
    assert signed.once().returncode == 0    # record verified under ci1, with the ETag
    assert host.state()["pointer"]["etag"]
    other = trust_file(tmp_path / "other.pub", keys["ci2"].public)
    before = len(pointer_requests(server))
    r = host.once(host.url, "--trusted-keys", str(other))
    assert r.returncode == 4 and error_kind(host) == "signature", r.stderr
    assert "If-None-Match" not in pointer_requests(server)[before]["headers"]


def test_304_replay_checks_expiry_again(signed: Signed, host, world, server):
    b = world.path("b")
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 6))
    signed.publish("ci1", 2, b, not_after=expiry)
    server.routes["/pointer"].etag = True
    assert signed.once().returncode == 0 and host.current == b
    time.sleep(max(0.0, time.mktime(time.strptime(expiry, "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime()) + 1.5))
    r = signed.once()
    assert pointer_requests(server)[-1]["status"] == 304
    assert r.returncode == 4 and "expired" in r.stderr and error_kind(host) == "expired"


# ---------------------------------------------------------------------------
# 2. Planted symlinks never make root write elsewhere


def test_planted_temp_file_symlinks_in_a_shared_metrics_directory(host, world):
    metrics_dir = host.var_lib / "prometheus-node-exporter-text"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    metrics_dir.chmod(0o1777)               # shared with another account
    victim = host.var_lib / "victim"
    victim.write_text("precious\n")
    last_pid = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    for pid in range(last_pid + 1, last_pid + 3000):
        os.symlink("/var/lib/victim", metrics_dir / f".nixos-autodeploy.prom.{pid}.tmp")
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"
    metrics = metrics_dir / "nixos-autodeploy.prom"
    assert metrics.is_file() and not metrics.is_symlink() and "nixos_autodeploy_state" in metrics.read_text()
    assert (metrics.stat().st_mode & 0o777) == 0o644


@pytest.mark.parametrize("setup,needle", [
    (lambda d: d.chmod(0o777), "writable by group or others"),
    (lambda d: d.chmod(0o770), "writable by group or others"),
    (lambda d: os.chown(d, 1000, 1000), "owned by uid 1000"),
], ids=["world-writable", "group-writable", "other-owner"])
def test_unsafe_state_directory_is_refused(host, world, setup, needle):
    state_dir = host.var_lib / "nixos-autodeploy"
    state_dir.mkdir(mode=0o700, exist_ok=True)
    setup(state_dir)
    r = host.once(host.url)
    assert r.returncode == 9, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0]
    assert list(state_dir.iterdir()) == []  # nothing written there
    assert host.profile == world.path("a")


def test_state_directory_symlink_owned_by_a_user_is_refused(host, world):
    elsewhere = host.var_lib / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = host.var_lib / "nixos-autodeploy"
    os.symlink("/var/lib/elsewhere", link)
    os.lchown(link, 1000, 1000)
    r = host.once(host.url)
    assert r.returncode == 9 and "symlink owned by uid 1000" in r.stderr, r.stderr
    assert list(elsewhere.iterdir()) == []


def test_planted_lock_symlink_is_not_followed(host, world):
    run_dir = host.run_dir / "nixos-autodeploy"
    run_dir.mkdir(mode=0o755, exist_ok=True)
    victim = host.var_lib / "victim"
    victim.write_text("precious\n")
    os.symlink("/var/lib/victim", run_dir / "lock")
    r = host.once(host.url)
    assert r.returncode == 9 and "lock" in r.stderr, r.stderr
    assert victim.read_text() == "precious\n"


def test_world_writable_runtime_directory_is_refused(host, world):
    run_dir = host.run_dir / "nixos-autodeploy"
    run_dir.mkdir(exist_ok=True)
    run_dir.chmod(0o777)
    r = host.once(host.url)
    assert r.returncode == 9 and "/run/nixos-autodeploy" in r.stderr and "writable" in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# 3, 11. A full disk never truncates the state and never strands the host


def test_full_disk_keeps_the_old_state_and_says_so(host, world, server):
    state_dir = host.small_disk("/var/lib/nixos-autodeploy", "64k")
    state_dir.chmod(0o700)
    assert host.once(host.url).returncode == 0
    old = (state_dir / "state.json").read_text()
    filler = fill_leaving(state_dir, 8192)
    # A pointer whose record (kept for 304s) makes state.json larger than 8 KiB.
    server.set("/pointer", world.path("a") + "\nx-build-log: " + "z" * 7000 + "\n", etag=True)
    r = host.once(host.url)
    assert r.returncode == 9, r.stderr
    assert "state was NOT saved" in r.stderr
    assert (state_dir / "state.json").read_text() == old   # whole, and the old one
    assert sorted(p.name for p in state_dir.iterdir()) == ["filler", "state.json"]  # no temp file left
    assert state_gauge(host) == "failed" and error_kind(host) == "state"
    status = host.agent("status", "--json")
    assert status.returncode == 0, status.stderr
    filler.unlink()
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert json.loads((state_dir / "state.json").read_text())["pointer"]["body"].startswith(world.path("a"))


def test_disk_full_right_after_the_profile_changed_rolls_back(host, world, server):
    a, b = world.path("a"), world.path("b")
    state_dir = host.small_disk("/var/lib/nixos-autodeploy", "64k")
    state_dir.chmod(0o700)
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    host.ctl("fill-after-nix-env").write_text("")
    host.ctl("fail").write_text(a + "\n")   # a unit of `a` fails when restarted: no activation may happen
    activations = len(host.activations())
    r = host.once(host.url)
    assert r.returncode == 9, r.stderr
    assert host.profile == a and host.current == a, r.stderr   # converged: nothing half-done
    assert len(host.activations()) == activations               # nothing was activated, not even `a`
    host.ctl("fail").unlink()
    (state_dir / "filler").unlink()
    r = host.once(host.url)                  # the next run converges and deploys
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and host.state()["intent"] is None


# ---------------------------------------------------------------------------
# 4. The revision floor fails closed


@pytest.fixture
def at_revision_5(signed: Signed, world, host):
    signed.publish("ci1", 5, world.path("b"))
    assert signed.once().returncode == 0 and host.current == world.path("b")
    assert host.metrics()["nixos_autodeploy_revision_floor"] == 5
    return signed


def test_corrupt_state_fails_closed_until_trust_reset(at_revision_5: Signed, host, world):
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    state_file.write_text('{"deployed": "/nix/store/x", "highest_revision": ')
    at_revision_5.publish("ci1", 6, world.path("c"))
    r = at_revision_5.once()
    assert r.returncode == 9, r.stderr
    assert "trust-reset --min-revision" in r.stderr
    assert host.current == world.path("b")
    assert state_file.read_text().endswith('"highest_revision": ')  # left for inspection
    assert state_gauge(host) == "failed" and error_kind(host) == "state"
    assert host.metrics()["nixos_autodeploy_last_run_success"] == 0
    reset = host.agent("trust-reset", "--min-revision", "6")
    assert reset.returncode == 0 and "TRUST RESET" in reset.stderr and "floor set to 6" in reset.stderr
    assert list(state_file.parent.glob("state.json.corrupt-*"))
    at_revision_5.publish("ci1", 5, world.path("a"))
    r = at_revision_5.once()
    assert r.returncode == 4 and "lower than revision 6" in r.stderr
    at_revision_5.publish("ci1", 6, world.path("b"))
    r = at_revision_5.once()
    assert r.returncode == 0 and state_gauge(host) == "tracking", r.stderr


@pytest.mark.parametrize("tamper", ["delete", "null"])
def test_lost_floor_in_state_json_still_refuses_old_revisions(at_revision_5: Signed, host, world, tamper):
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    if tamper == "delete":
        state_file.unlink()
    else:
        data = json.loads(state_file.read_text())
        data["highest_revision"] = None
        state_file.write_text(json.dumps(data))
    at_revision_5.publish("ci1", 1, world.path("a"))   # an old, validly signed pointer
    r = at_revision_5.once()
    assert r.returncode == 4 and "lower than revision 5" in r.stderr, r.stderr
    assert host.current == world.path("b")


def test_trust_reset_is_root_only_and_validated(host):
    r = host.agent("trust-reset", "--min-revision", "-1")
    assert r.returncode == 2
    r = host.agent("trust-reset")
    assert r.returncode == 2 and "--min-revision" in r.stderr


# ---------------------------------------------------------------------------
# 5, 6. Server bytes are escaped and secrets never leak


def hook_dump(host, tmp_path) -> tuple[str, Path]:
    dump = host.var_lib / "hook.env"
    return "env | grep NIXOS_AUTODEPLOY_ > /var/lib/hook.env", dump


def test_escape_sequences_and_nul_from_the_server_reach_no_one(host, world, server, tmp_path):
    hook, dump = hook_dump(host, tmp_path)
    server.set("/start", "", status=302,
               headers={"Location": "/x\x1b[2K\rnixos-autodeploy: state: up_to_date\x1b]0;pwned\x07\x00end"})
    server.set("/bad", "\x1b[2J\x1b[Hnixos-autodeploy: state: up_to_date\x00\n")
    for path in ("/start", "/bad"):
        r = host.once(server.base + path, "-v", "--on-failure", hook)
        assert r.returncode in (3, 4), r.stderr
        assert "\x1b" not in r.stderr and "\x00" not in r.stderr and "\x07" not in r.stderr
        assert not any(line.startswith("nixos-autodeploy: state:") for line in r.stderr.splitlines())
        env = dump.read_text()
        assert "NIXOS_AUTODEPLOY_ERROR=" in env and "\x1b" not in env
        dump.unlink()
        persisted = everything_persisted(host)
        assert "\x1b" not in persisted and "\\u001b" not in persisted
        status = host.agent("status")
        assert status.returncode == 0 and "\x1b" not in status.stdout


def test_nul_in_a_redirect_does_not_kill_loop_mode(host, world, server):
    server.set("/start", "", status=302, headers={"Location": "/\x00"})
    proc = host.agent_background("--url", server.base + "/start", "--interval", "0.05",
                                 "--on-failure", "true", "--prometheus-path", METRICS)
    try:
        wait_for(lambda: sum(q["path"] == "/start" for q in server.requests) >= 4, what="4 polls")
        assert proc.poll() is None, proc.log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0 and "ValueError" not in proc.log_path.read_text()


def test_echoed_token_leaks_nowhere(host, world, server, tmp_path):
    token_file = host.var_lib / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    server.set("/pointer", f"unauthorized, token was {TOKEN}", status=401,
               headers={"WWW-Authenticate": f'Bearer realm="{TOKEN}"', "X-Echo": TOKEN})
    hook, dump = hook_dump(host, tmp_path)
    r = host.once(host.url, "-v", "--token-file", "/var/lib/token", "--on-failure", hook)
    assert r.returncode == 3 and "HTTP 401" in r.stderr, r.stderr
    assert pointer_requests(server)[-1]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    seen = [r.stderr, everything_persisted(host), dump.read_text(), host.agent("status").stdout,
            host.agent("status", "--json").stdout]
    assert not [s for s in seen if TOKEN in s]
    # The pointer itself echoing the token: refused, with the excerpt redacted.
    server.set("/pointer", f"<html>{TOKEN}</html>")
    r = host.once(host.url, "--token-file", "/var/lib/token")
    assert r.returncode == 4 and "***" in r.stderr and TOKEN not in r.stderr + everything_persisted(host)


def test_redirect_to_an_internal_endpoint_reads_nothing_back(host, world, server):
    internal = type(server)(world.cache)
    try:
        internal.set("/admin", "INTERNAL-SECRET: db password hunter2\n")
        server.set("/pointer", "", status=302, headers={"Location": internal.base + "/admin"})
        r = host.once(host.url)
        assert r.returncode == 4, r.stderr
        assert "redirect target on another host" in r.stderr
        assert "INTERNAL-SECRET" not in r.stderr + everything_persisted(host)
    finally:
        internal.close()


# ---------------------------------------------------------------------------
# 7. One lock per host, whatever the state directory


def test_two_agents_with_different_state_dirs_never_run_together(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    host.ctl("hang-after-nix-env").write_text("")
    first = host.agent_background("--once", "--url", host.url)
    try:
        wait_for(lambda: host.profile == b, what="the first agent to set the profile")
        second = host.once(host.url, "--state-dir", "/var/lib/other-agent")
        assert second.returncode == 6, second.stderr
        assert "host lock" in second.stderr
    finally:
        host.ctl("hang-after-nix-env").unlink()
    first.wait(timeout=60)
    assert first.returncode == 0, first.log_path.read_text()
    assert host.current == b and host.state()["deployed"] == b


# ---------------------------------------------------------------------------
# 8. Signed pointers name their hosts


def test_signed_pointer_without_hosts_is_refused(signed: Signed, host, world, keys, tmp_path):
    body, sig = keygen_sign(keys["ci1"], f"{world.path('b')}\nrevision: 2\n".encode(), tmp_path / "nohosts")
    serve(signed.server, body, sig)
    r = signed.once()
    assert r.returncode == 4 and "no `hosts:` line" in r.stderr and error_kind(host) == "host"
    assert host.current == world.path("a")


def test_mix_and_match_across_hosts_is_refused(signed: Signed, host, world):
    signed.publish("ci1", 2, world.path("b"), hosts=("web-1",))   # web-1's pointer, served to db-1
    r = signed.once("--hostname", "db-1")
    assert r.returncode == 4 and error_kind(host) == "host"
    r = signed.once("--hostname", "web-1")
    assert r.returncode == 0 and host.current == world.path("b"), r.stderr


# ---------------------------------------------------------------------------
# 9. Strict metadata


def test_huge_revision_is_refused_and_later_runs_work(signed: Signed, host, world, keys, tmp_path):
    body, sig = keygen_sign(keys["ci1"], f"{world.path('b')}\nrevision: 1{'0' * 400}\nhosts: *\n".encode(),
                            tmp_path / "huge")
    serve(signed.server, body, sig)
    r = signed.once()
    assert r.returncode == 4 and "whole number" in r.stderr
    signed.publish("ci1", 2, world.path("b"))
    r = signed.once()
    assert r.returncode == 0 and host.metrics()["nixos_autodeploy_revision_floor"] == 2, r.stderr


# ---------------------------------------------------------------------------
# 10. Options in a key file are honoured or refused, never read as a name


def test_key_line_with_leading_options_is_refused(host, world, keys, tmp_path):
    trusted = trust_file(tmp_path / "opts.pub", f'namespaces="git" {keys["ci1"].public}')
    r = host.once(host.url, "--trusted-keys", str(trusted))
    assert r.returncode == 2 and "starts with options" in r.stderr, r.stderr
    assert not (host.var_lib / "nixos-autodeploy" / "state.json").exists()


def test_allowed_signers_options_are_honoured(host, world, server, keys, tmp_path):
    trusted = trust_file(tmp_path / "signers", f'ci namespaces="git" {keys["ci1"].public}')
    body, sig = sign(keys["ci1"], 1, world.path("a"), tmp_path / "p")
    serve(server, body, sig)
    r = host.once(host.url, "--trusted-keys", str(trusted))
    assert r.returncode == 4 and error_kind(host) == "signature", r.stderr


# ---------------------------------------------------------------------------
# 12. A SIGTERM while waiting for an activation unit ends the run at once


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


# ---------------------------------------------------------------------------
# 13. A bearer token over plain http:// is warned about, once


def test_token_over_plain_http_warns_once(host, world, tmp_path):
    token_file = host.var_lib / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    r = host.once(host.url, "--token-file", "/var/lib/token")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("credentials are sent over plain http://") == 1


# ---------------------------------------------------------------------------
# Fetching on real networks (issue "Fetching on real networks"), agent level


def test_trickling_server_ends_the_run_within_the_timeout(host, world):
    def handler(conn, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        while srv.sleep(0.5):
            conn.sendall(b"x")
    srv = servers.RawServer(handler)
    try:
        started = time.monotonic()
        r = host.once(srv.url, "--timeout", "3")
        took = time.monotonic() - started
    finally:
        srv.close()
    assert r.returncode == 3, r.stderr
    assert [line for line in r.stderr.splitlines() if "error:" in line] == [
        f"nixos-autodeploy: error: GET {srv.url}: timed out after 3s"]
    assert took < 5.5


def test_flood_with_a_negative_chunk_size_stays_small(host, world):
    def handler(conn, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n")
        end = time.monotonic() + 10
        while time.monotonic() < end and not srv.closed.is_set():
            conn.sendall(b"x" * 65536)
    srv = servers.RawServer(handler)
    try:
        proc = subprocess.Popen([servers_unshare(host), *host.agent_argv("--once", "--url", srv.url)],
                                env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = proc.stderr.read().decode()   # until the agent exits
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        srv.close()
    assert proc.returncode == 3, err
    assert "invalid chunk size" in err
    # The agent itself takes 15-25 MiB; the flood is sent for 10 s on loopback
    # (gigabytes): buffering any of it would show at once.
    assert usage.ru_maxrss < 100 * 1024, f"peak RSS {usage.ru_maxrss} KiB: {err}"


def servers_unshare(host) -> str:
    """A wrapper script that enters the host's namespace (for wait4 on the agent itself)."""
    script = host.root / "enter.sh"
    from world import bind_script
    script.write_text(f"#!/bin/sh\nexec unshare -m --propagation private /bin/sh -c '{bind_script(host.binds)} "
                      f"&& exec \"$@\"' sh \"$@\"\n")
    script.chmod(0o755)
    return str(script)


def test_sigterm_during_a_fetch_changes_nothing(host, world):
    srv = servers.RawServer(lambda conn, n: srv.sleep(60))
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    try:
        assert host.once(host.url).returncode == 0
        before = state_file.read_bytes(), os.stat(state_file).st_mtime_ns
        proc = host.agent_background("--once", "--url", srv.url, "--timeout", "60")
        wait_for(lambda: srv.requests, what="the request")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert time.monotonic() - started < 1.5
    finally:
        srv.close()
    assert (state_file.read_bytes(), os.stat(state_file).st_mtime_ns) == before


def test_gzip_from_nginx_is_a_fetch_error_not_a_refusal(host, world, tmp_path):
    nginx = servers.Nginx(tmp_path / "nginx")
    try:
        nginx.publish(world.path("b") + "\n")
        r = host.once(f"{nginx.base}/forced-gzip")
    finally:
        nginx.close()
    assert r.returncode == 3 and "Content-Encoding 'gzip'" in r.stderr, r.stderr
    assert host.current == world.path("a")


def test_validators_belong_to_one_url(host, world, tmp_path):
    """Two pointers with nginx's identical ETags (same size, same second)."""
    a, b = world.path("a"), world.path("b")
    nginx = servers.Nginx(tmp_path / "nginx")
    try:
        now = int(time.time())
        url_a = nginx.publish(a + "\n", "pa", mtime=now)
        url_b = nginx.publish(b + "\n", "pb", mtime=now)
        assert host.once(url_a).returncode == 0
        r = host.once(url_b)
        assert r.returncode == 0 and host.current == b, r.stderr
        assert '"GET /pb HTTP/1.1" 200' in "\n".join(nginx.access_log())
    finally:
        nginx.close()


def test_a_weak_etag_cannot_hide_a_change_for_more_than_an_hour(host, world, tmp_path):
    a, b = world.path("a"), world.path("b")
    nginx = servers.Nginx(tmp_path / "nginx")
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    try:
        now = int(time.time())
        url = nginx.publish(a + "\n", mtime=now)
        assert host.once(url).returncode == 0
        nginx.publish(b + "\n", mtime=now)   # same size, same second: the same ETag
        assert host.once(url).returncode == 0 and host.current == a  # 304: not seen yet
        assert nginx.access_log()[-1].split('"')[2].split()[0] == "304"
        data = json.loads(state_file.read_text())
        data["pointer"]["fetched_at"] -= 3601   # an hour later
        state_file.write_text(json.dumps(data))
        r = host.once(url)
        assert r.returncode == 0 and host.current == b, r.stderr
        assert nginx.access_log()[-2].split('"')[2].split()[0] == "200"
    finally:
        nginx.close()


def test_once_after_a_failure_fetches_unconditionally(host, world, server):
    server.pointer(world.path("a"), etag=True)
    assert host.once(host.url).returncode == 0
    server.unreachable = True
    assert host.once(host.url).returncode == 3
    server.unreachable = False
    assert host.once(host.url).returncode == 0
    assert "If-None-Match" not in pointer_requests(server)[-1]["headers"]
    assert host.once(host.url).returncode == 0
    assert "If-None-Match" in pointer_requests(server)[-1]["headers"]


def test_transient_failure_is_retried_within_the_run(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    calls = []

    def flaky(headers):
        calls.append(1)
        server.routes["/pointer"].status = 200 if len(calls) > 1 else 503
    server.routes["/pointer"].hook = flaky
    server.routes["/pointer"].status = 503
    r = host.once(host.url)
    assert r.returncode == 0 and host.current == b, r.stderr
    assert "HTTP 503 (try 1 of 4" in r.stderr


def test_proxy_only_host_deploys_through_the_proxy(host, world, tmp_path):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    proxy = servers.Tinyproxy(tmp_path / "proxy")
    nginx = servers.Nginx(tmp_path / "nginx", only_from=proxy.bind)
    try:
        url = nginx.publish(b + "\n")
        r = host.once(url)
        assert r.returncode == 3 and "HTTP 403" in r.stderr, r.stderr   # direct: refused
        r = host.once(url, env={"http_proxy": proxy.url})
        assert r.returncode == 0 and host.current == b, r.stderr
        assert any("/pointer" in line and "200" in line for line in nginx.access_log())
    finally:
        nginx.close()
        proxy.close()


# ---------------------------------------------------------------------------
# The command line a newcomer meets


def test_not_root_exits_2_before_writing_anything(host, world, tmp_path):
    setpriv = "/usr/bin/setpriv"
    r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, str(AGENT),
                        "--once", "--url", host.url, "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "must run as root" in r.stderr
    assert not (tmp_path / "state").exists()


def test_dry_run_prints_its_errors(host, world, server):
    server.unreachable = True
    r = host.once(host.url, "--dry-run")
    assert r.returncode == 3 and "error: GET" in r.stderr


def test_not_a_nixos_host_has_its_own_exit_code(host, world):
    (host.run_dir / "current-system").unlink()
    r = host.once(host.url)
    assert r.returncode == 8 and "not a running NixOS system" in r.stderr, r.stderr
    assert state_gauge(host) == "failed" and error_kind(host) == "not_nixos"


def test_agent_is_executable_in_git():
    repo = Path(AGENT).parent
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "-C", str(repo), "ls-files", "-s", "autodeploy.py"], capture_output=True, text=True)
    assert r.stdout.startswith("100755 "), r.stdout
    r = subprocess.run([str(AGENT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--url" in r.stdout and "--once" in r.stdout and "trust-reset" in r.stdout


def test_what_a_server_can_make_us_persist_is_bounded(host, world, server):
    server.set("/pointer", world.path("a") + "\n" + "".join(f"x-junk-{i}: {'z' * 900}\n" for i in range(60)),
               etag=True)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    assert host.state()["pointer"] is None          # over 8 KiB: never kept, never replayed
    assert state_file.stat().st_size < 8 * 1024
    r = host.once(host.url)
    assert r.returncode == 0 and "If-None-Match" not in pointer_requests(server)[-1]["headers"]


# ---------------------------------------------------------------------------
# Found by the adversarial review of this change (each reproduced first)


def test_token_echoed_as_a_pointer_key_leaks_nowhere(host, world, server, tmp_path):
    token = "deadbeefcafe0123456789abcdef0123"
    token_file = host.var_lib / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    hook, dump = hook_dump(host, tmp_path)
    for body in (f"{world.path('a')}\n{token}: echoed\n", f"{world.path('a')}\nx-{token}: 1\nx-{token}: 2\n"):
        server.set("/pointer", body)
        r = host.once(host.url, "--token-file", "/var/lib/token", "--on-failure", hook)
        assert r.returncode == 4, r.stderr
        assert token not in r.stderr + everything_persisted(host) + dump.read_text()


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


def test_credentials_to_a_plain_http_signature_url_are_warned_about(host, world, keys, tmp_path):
    token_file = host.var_lib / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    trusted = trust_file(tmp_path / "t.pub", keys["ci1"].public)
    r = host.once("https://127.0.0.1:9/pointer", "--signature-url", "http://127.0.0.1:9/pointer.sig",
                  "--trusted-keys", str(trusted), "--token-file", "/var/lib/token", "--timeout", "1")
    assert r.stderr.count("credentials are sent over plain http://") == 1, r.stderr


def test_a_key_past_valid_before_is_refused_within_the_hour(host, world, server, keys, tmp_path):
    valid_before = time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + 4))
    trusted = trust_file(tmp_path / "signers", f'ci valid-before="{valid_before}" {keys["ci1"].public}')
    body, sig = sign(keys["ci1"], 1, world.path("a"), tmp_path / "p")
    serve(server, body, sig)
    assert host.once(host.url, "--trusted-keys", str(trusted)).returncode == 0
    time.sleep(5)
    r = host.once(host.url, "--trusted-keys", str(trusted))
    assert r.returncode == 0, r.stderr      # the same pointer, verified less than an hour ago
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    data = json.loads(state_file.read_text())
    data["pointer"]["verified_at"] -= 3601
    state_file.write_text(json.dumps(data))
    r = host.once(host.url, "--trusted-keys", str(trusted))
    assert r.returncode == 4 and error_kind(host) == "signature", r.stderr


# ---------------------------------------------------------------------------
# The state's schema (issue #18, item 5): right outer types, wrong inside


@pytest.mark.parametrize("field,raw", [
    ("fleetlock_error", '{"operation": "pre-reboot", "kind": 1, "message": "x", "time": "1"}'),
    ("deploys_total", "1" + "0" * 400),
    ("history", "[1]"),
    ("history", '[{"time": "yesterday", "action": "switch"}]'),
    ("last_error", '{"kind": 5}'),
    ("rollout", '{"target": 1}'),
    ("interrupted", '{"/nix/store/x": 1e400}'),
    ("last_run", "1e400"),
    # Review of #18: inner values `status` and the agent divide by or index.
    ("last_error", '{"kind": "fetch"}'),
    ("rollout", '{"target": "/nix/store/x", "bucket": 5, "start_percent": 0, "percent": 0, "start": 0, '
                '"duration": 0, "paused": false}'),
], ids=["lock-kind-int", "count-10e400", "history-int", "history-time-str", "last-error-kind-int",
        "rollout-target-int", "interrupted-inf", "last-run-inf", "last-error-no-message", "rollout-duration-0"])
def test_state_with_bad_inner_values_fails_closed(host, world, server, field, raw):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0  # tracking a
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    state = json.loads(state_file.read_text())
    state.pop(field, None)
    text = json.dumps(state)[:-1] + f', "{field}": {raw}}}\n'
    state_file.write_text(text)
    server.pointer(b)
    r = host.once(host.url, "--on-failure", "echo $NIXOS_AUTODEPLOY_ERROR_KIND > /run/hook")
    assert r.returncode == 9, r.stderr
    assert f"({field} is not" in r.stderr and "trust-reset" in r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert host.current == a and host.profile == a  # nothing deployed
    assert state_file.read_text() == text  # left as it is
    assert state_gauge(host) == "failed" and error_kind(host) == "state"
    assert (host.run_dir / "hook").read_text().strip() == "state"
    status = host.agent("status")
    assert status.returncode == 9 and f"({field} is not" in status.stderr, status.stderr
    assert "internal error" not in status.stderr and "Traceback" not in status.stderr


@pytest.mark.parametrize("line", ["rollout: INTERNAL-SECRET", "rollout-start: INTERNAL-SECRET\nrollout-duration: 1h",
                                  "rollout-start: 2026-01-01T00:00:00Z\nrollout-duration: INTERNAL-SECRET",
                                  "pause: INTERNAL-SECRET"])
def test_rollout_text_from_another_origin_is_shown_nowhere(host, world, server, tmp_path, line):
    """Issue #18, item 7: the rule for pointer excerpts also holds for rollout fields."""
    internal = type(server)(world.cache)
    try:
        internal.set("/admin", f"{world.path('b')}\n{line}\n")
        server.set("/pointer", "", status=302, headers={"Location": internal.base + "/admin"})
        hook, dump = hook_dump(host, tmp_path)
        r = host.once(host.url, "--on-failure", hook, "--prometheus-path", METRICS)
        assert r.returncode == 4, r.stderr
        assert "redirect target on another host" in r.stderr
        seen = [r.stderr, everything_persisted(host), dump.read_text(), host.agent("status").stdout,
                host.agent("status", "--json").stdout]
        assert not [s for s in seen if "INTERNAL-SECRET" in s]
        # The same pointer from the pointer's own origin is shown (escaped): the rule is about origins.
        server.set("/pointer", f"{world.path('b')}\n{line}\n")
        r = host.once(host.url)
        assert r.returncode == 4 and "INTERNAL-SECRET" in r.stderr, r.stderr
    finally:
        internal.close()


# ---------------------------------------------------------------------------
# Masking only what came from outside (issue #18, item 9)


def test_a_password_never_masks_the_agents_own_words(host, world, server, tmp_path):
    b = world.path("b")
    url = host.url.replace("http://", "http://ops:deploy@")
    assert host.once(url).returncode == 0  # tracking a
    server.pointer(b)
    hook, dump = hook_dump(host, tmp_path)
    r = host.once(url, "--on-success", hook, "--prometheus-path", METRICS)
    assert r.returncode == 0, r.stderr
    assert host.current == b
    text = host.metrics_text()
    assert 'nixos_autodeploy_state{state="deployed"} 1' in text and "***ed" not in text
    assert "deployed" in r.stderr and "***ed" not in r.stderr
    assert "NIXOS_AUTODEPLOY_OUTCOME=deployed" in dump.read_text().splitlines()
    status = host.agent("status")
    assert "deployed" in status.stdout and "***" not in status.stdout
    assert host.state()["last_state"] == "deployed" and "***" not in host.state()["last_reason"]
    # What came from outside is still masked: the pointer echoing the password, in any case.
    server.set("/pointer", "<html>DePloy</html>\n")
    r = host.once(url)
    assert r.returncode == 4, r.stderr
    assert "***" in r.stderr and "DePloy" not in r.stderr + everything_persisted(host)
    assert "ops:deploy" not in r.stderr + everything_persisted(host)


# ---------------------------------------------------------------------------
# state.json written by the agent of 1abd54b (issue #17)
# ---------------------------------------------------------------------------


# What 1abd54b wrote after a boot deploy of b failed its check after the reboot
# (rolled back to a, reboot into a deferred), plus a key from a newer agent.
OLD_STATE = {
    "activation": "boot", "behind_since": 1764000000.0, "boot_failure": None, "boot_failures_total": 0,
    "boot_free_bytes": None, "boot_needed_bytes": None, "deployed": "@a", "deployed_at": 1764000300.0,
    "deploys_total": 1, "dirty": False, "fleetlock_error": None, "fleetlock_failures": {}, "highest_revision": None,
    "history": [], "intent": None, "interrupted": {}, "last_error": None, "last_reason": "x", "last_run": 1764000300.0,
    "last_run_duration": 1.0, "last_run_success": False, "last_state": "rolled_back", "last_success": 1764000000.0,
    "pointer": None, "previous": "@b", "quarantine_reason": "health", "quarantined": "@b", "reboot_reason": None,
    "reboot_required": True, "reboot_slot": None, "reboot_window_wait": True, "revision_path": None,
    "rollbacks_total": 1, "rollout": None, "staged_boot_id": "BOOT", "staged_from": "@b", "upstream": "@b",
    "upstream_revision": None, "verified": True, "x_future_field": {"kept": [1, 2]},
}


def test_state_from_the_previous_agent_keeps_working_and_keeps_unknown_keys(host, world, server):
    a, b = world.path("a"), world.path("b")
    host.sh(f"nix-store --realise {b} >/dev/null; /usr/bin/nix-env -p /nix/var/nix/profiles/system --set {a}; "
            f"ln -sfn {b} /run/current-system; ln -sfn {b} /run/booted-system")
    state = {k: (a if v == "@a" else b if v == "@b" else v) for k, v in OLD_STATE.items()}
    state["staged_boot_id"] = host.boot_id_file.read_text().strip()
    state_dir = host.var_lib / "nixos-autodeploy"
    state_dir.mkdir(mode=0o700, exist_ok=True)
    (state_dir / "state.json").write_text(json.dumps(state))
    server.pointer(b)
    r = host.once(host.url, "--reboot-mode", "reboot", *WINDOW, env=INSIDE)
    assert r.returncode == 0, r.stderr
    assert reboot_calls(host) == 1  # the deferred rollback reboot, from an old record
    assert json.loads(host.agent("status", "--json").stdout)["phase"] == "rolled_back_awaiting_reboot"
    saved = host.state()
    assert saved["x_future_field"] == {"kept": [1, 2]} and saved["rollback_of"] == b
