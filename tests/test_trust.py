"""The pointer and trust against real nix and the real ssh-keygen: signed
pointers, revisions and the revision floor, host lists, expiry, 304 replays
under other keys, bearer tokens, URL credentials, Hydra JSON pointers, bad
pointers.

Keys are generated here with ``ssh-keygen -t ed25519 -N ''``; pointers are
signed with ``autodeploy.py sign`` run *outside* the host's namespace (as CI
would), then served at /pointer and /pointer.sig.  Every refusal must exit 4,
change nothing on the host and show in the metrics.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from util import SSH_KEYGEN, Key, error_kind, fill_leaving, make_key, pointer_requests, promtool_ok, state_gauge
from world import AGENT, METRICS

NAMESPACE = "nixos-autodeploy"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def sign(key: Key, revision: int, path: str, out: Path, hosts: tuple[str, ...] = (),
         not_after: str | None = None) -> tuple[bytes, bytes]:
    """`autodeploy.py sign`, outside the host namespace; returns (body, signature).

    `-o FILE STOREPATH` comes after --hosts so the greedy `--hosts H [H ...]`
    ends there (see test_sign_documented_argument_order for the spec's order)."""
    argv = [sys.executable, str(AGENT), "sign", "--key", str(key.private), "--revision", str(revision)]
    argv += ["--hosts", *hosts] if hosts else ["--all-hosts"]
    if not_after:
        argv += ["--not-after", not_after]
    argv += ["-o", str(out), path]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out.read_bytes(), Path(str(out) + ".sig").read_bytes()


def keygen_sign(key: Key, body: bytes, out: Path, namespace: str = NAMESPACE) -> tuple[bytes, bytes]:
    """Sign an arbitrary body with plain `ssh-keygen -Y sign`."""
    out.write_bytes(body)
    Path(str(out) + ".sig").unlink(missing_ok=True)
    subprocess.run([SSH_KEYGEN, "-Y", "sign", "-f", str(key.private), "-n", namespace, str(out)],
                   check=True, capture_output=True)
    return body, Path(str(out) + ".sig").read_bytes()


def serve(server, body: bytes, sig: bytes | None) -> None:
    server.set("/pointer", body)
    if sig is None:
        server.routes.pop("/pointer.sig", None)
    else:
        server.set("/pointer.sig", sig)


def trust_file(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def snapshot(host) -> tuple:
    return host.current, host.profile, host.state().get("deployed"), len(host.activations())


def assert_refused(host, r, kind: str, before: tuple, needle: str | None = None) -> None:
    """Exit 4, nothing changed on the host, the refusal shows in the metrics."""
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    if needle:
        assert needle in r.stderr, r.stderr
    assert snapshot(host) == before
    assert state_gauge(host) == "refused"
    assert host.metrics()["nixos_autodeploy_state{state=\"refused\"}"] == 1
    assert host.metrics()["nixos_autodeploy_last_run_success"] == 0
    assert error_kind(host) == kind, host.metrics_text()
    assert host.state()["last_error"]["kind"] == kind


def wrap_ssh_keygen(host, tmp_path: Path) -> Path:
    """Put a recording ssh-keygen first on the host's PATH; returns its log."""
    bindir = tmp_path / "wrapbin"
    bindir.mkdir()
    log = tmp_path / "ssh-keygen.calls"
    log.write_text("")
    script = bindir / "ssh-keygen"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec {SSH_KEYGEN} "$@"\n')
    script.chmod(0o755)
    host.env["PATH"] = f"{bindir}:{host.env['PATH']}"
    return log


def read_all(host) -> str:
    """Everything the agent persisted: state.json and the metrics file."""
    state = host.var_lib / "nixos-autodeploy" / "state.json"
    metrics = host.var_lib / METRICS[len("/var/lib/"):]
    return (state.read_text() if state.exists() else "") + (metrics.read_text() if metrics.exists() else "")


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Key]:
    d = tmp_path_factory.mktemp("keys")
    return {name: make_key(d, name) for name in ("ci1", "ci2", "evil")}


@dataclass
class Signed:
    """A host tracking system `a` from a pointer signed by ci1 at revision 1."""

    host: object
    server: object
    world: object
    keys: dict[str, Key]
    trusted: Path
    dir: Path

    def sign(self, name: str, revision: int, path: str, **kw) -> tuple[bytes, bytes]:
        out = self.dir / f"p-{name}-{revision}-{os.path.basename(path)[:8]}-{time.monotonic_ns()}"
        return sign(self.keys[name], revision, path, out, **kw)

    def publish(self, name: str, revision: int, path: str, **kw) -> tuple[bytes, bytes]:
        body, sig = self.sign(name, revision, path, **kw)
        serve(self.server, body, sig)
        return body, sig

    def once(self, *args: str, env: dict[str, str] | None = None):
        return self.host.once(self.host.url, "--trusted-keys", str(self.trusted), *args, env=env)


@pytest.fixture
def signed(host, server, world, keys, tmp_path) -> Signed:
    d = tmp_path / "signed"
    d.mkdir()
    s = Signed(host, server, world, keys, trust_file(tmp_path / "trusted.pub", keys["ci1"].public), d)
    s.publish("ci1", 1, world.path("a"))
    r = s.once()
    assert r.returncode == 0, r.stderr
    assert host.state()["deployed"] == world.path("a") and host.state()["highest_revision"] == 1
    assert state_gauge(host) == "tracking"
    return s


# ---------------------------------------------------------------------------
# Signed pointers that deploy
# ---------------------------------------------------------------------------


def test_valid_signed_pointer_deploys_and_persists_revision(signed, host, world):
    b = world.path("b")
    signed.publish("ci1", 2, b)
    r = signed.once()
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and host.state()["deployed"] == b
    assert host.activations() == [f"{b} switch marker=1"]
    assert state_gauge(host) == "deployed"
    st = host.state()
    assert st["highest_revision"] == 2 and st["revision_path"] == b
    m = host.metrics()
    assert m["nixos_autodeploy_upstream_revision"] == 2
    assert m["nixos_autodeploy_last_run_success"] == 1
    assert error_kind(host) is None
    assert "plain http://" not in r.stderr  # --trusted-keys given: no warning


def test_signed_pointer_for_this_host_and_not_yet_expired_deploys(signed, host, world):
    b = world.path("b")
    signed.publish("ci1", 2, b, hosts=("web1", "web2"), not_after="2999-01-01T00:00:00Z")
    r = signed.once("--hostname", "web2")
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.state()["deployed"] == b


def test_rollback_on_purpose_old_path_under_higher_revision(signed, host, world):
    a, b = world.path("a"), world.path("b")
    signed.publish("ci1", 2, b)
    assert signed.once().returncode == 0 and host.current == b
    signed.publish("ci1", 3, a)  # roll back: the old path, a new (higher) revision
    r = signed.once()
    assert r.returncode == 0, r.stderr
    assert host.current == a and host.profile == a and host.state()["deployed"] == a
    assert host.state()["highest_revision"] == 3


# ---------------------------------------------------------------------------
# Refusals: exit 4, nothing changes, metrics say refused with a kind
# ---------------------------------------------------------------------------


def test_missing_signature_is_refused(signed, host, world):
    body, _ = signed.sign("ci1", 2, world.path("b"))
    serve(signed.server, body, None)
    before = snapshot(host)
    assert_refused(host, signed.once(), "signature", before, "signature")
    assert not host.store_has(world.path("b"))


def test_unsigned_pointer_with_keys_configured_is_refused(signed, host, world, server):
    server.routes.pop("/pointer.sig", None)
    server.pointer(world.path("b"))
    before = snapshot(host)
    assert_refused(host, signed.once(), "signature", before)


def test_corrupted_signature_is_refused(signed, host, world):
    body, sig = signed.sign("ci1", 2, world.path("b"))
    lines = sig.decode().splitlines()
    # Flip one byte of the ed25519 signature itself (the end of the blob).
    blob = bytearray(base64.b64decode("".join(lines[1:-1])))
    blob[-5] ^= 0x01
    armored = base64.b64encode(bytes(blob)).decode()
    bad = "\n".join([lines[0], *[armored[i:i + 70] for i in range(0, len(armored), 70)], lines[-1]]) + "\n"
    serve(signed.server, body, bad.encode())
    before = snapshot(host)
    assert_refused(host, signed.once(), "signature", before)


def test_garbage_signature_is_refused(signed, host, world):
    body, _ = signed.sign("ci1", 2, world.path("b"))
    serve(signed.server, body, b"-----BEGIN SSH SIGNATURE-----\nnot base64 at all\n-----END SSH SIGNATURE-----\n")
    before = snapshot(host)
    assert_refused(host, signed.once(), "signature", before)


def test_signature_by_untrusted_key_is_refused(signed, host, world):
    signed.publish("evil", 2, world.path("b"))
    before = snapshot(host)
    assert_refused(host, signed.once(), "signature", before, "not made by a trusted key")


def test_body_changed_after_signing_is_refused(signed, host, world):
    b, c = world.path("b"), world.path("c")
    body, sig = signed.sign("ci1", 2, b)
    serve(signed.server, body.replace(b.encode(), c.encode()), sig)
    before = snapshot(host)
    assert_refused(host, signed.once(), "signature", before)
    assert not host.store_has(c)


def test_revision_line_changed_after_signing_is_refused(signed, host, world):
    body, sig = signed.sign("ci1", 2, world.path("b"))
    serve(signed.server, body.replace(b"revision: 2", b"revision: 9"), sig)
    before = snapshot(host)
    assert_refused(host, signed.once(), "signature", before)
    assert host.state()["highest_revision"] == 1


def test_signature_in_another_namespace_is_refused(signed, host, world):
    body = f"{world.path('b')}\nrevision: 2\n".encode()
    body, sig = keygen_sign(signed.keys["ci1"], body, signed.dir / "other-ns", namespace="other")
    serve(signed.server, body, sig)
    before = snapshot(host)
    assert_refused(host, signed.once(), "signature", before)


def test_signed_pointer_without_revision_is_refused(signed, host, world):
    body, sig = keygen_sign(signed.keys["ci1"], f"{world.path('b')}\n".encode(), signed.dir / "norev")
    serve(signed.server, body, sig)
    before = snapshot(host)
    assert_refused(host, signed.once(), "revision", before)


def test_downgrade_and_same_revision_other_path_are_refused(signed, host, world):
    b, c, d = world.path("b"), world.path("c"), world.path("d")
    signed.publish("ci1", 5, b)
    assert signed.once().returncode == 0 and host.current == b
    assert host.state()["highest_revision"] == 5

    signed.publish("ci1", 4, c)  # lower revision: a downgrade (or a replay)
    before = snapshot(host)
    assert_refused(host, signed.once(), "revision", before, "downgrade")
    assert not host.store_has(c)

    signed.publish("ci1", 1, world.path("a"))  # replay of an older, genuinely signed pointer
    assert_refused(host, signed.once(), "revision", before)

    signed.publish("ci1", 5, c)  # same revision, another path
    assert_refused(host, signed.once(), "revision", before)
    st = host.state()
    assert st["highest_revision"] == 5 and st["revision_path"] == b

    # A refusal does not poison anything: the next higher revision deploys.
    signed.publish("ci1", 6, d)
    r = signed.once()
    assert r.returncode == 0, r.stderr
    assert host.current == d and host.state()["highest_revision"] == 6
    assert state_gauge(host) == "deployed" and error_kind(host) is None


def test_pointer_for_other_hosts_is_refused(signed, host, world):
    signed.publish("ci1", 2, world.path("b"), hosts=("web1", "web2"))
    before = snapshot(host)
    assert_refused(host, signed.once("--hostname", "db1"), "host", before, "db1")
    assert host.state()["highest_revision"] == 1  # a refused revision is not accepted


def test_expired_pointer_is_refused(signed, host, world, keys, server, tmp_path):
    # `sign` refuses to write it (test_sign_refuses_what_hosts_refuse): signed by hand.
    body = f"{world.path('b')}\nrevision: 2\nhosts: *\nnot-after: 2001-01-01T00:00:00Z\n".encode()
    serve(server, *keygen_sign(keys["ci1"], body, tmp_path / "expired"))
    before = snapshot(host)
    assert_refused(host, signed.once(), "expired", before, "expired")
    assert host.state()["highest_revision"] == 1


@pytest.mark.parametrize("etag", [False, True], ids=["plain", "etag"])
def test_revoked_key_is_refused_even_for_a_pointer_verified_before(signed, host, world, keys, server, etag):
    """Key rotation that drops a (compromised) key must take effect at once:
    a pointer signed by the removed key, still served, is refused on the next
    run, even though the agent verified these exact bytes while the key was
    trusted (neither the digest cache nor a 304 Not Modified may bypass it)."""
    b = world.path("b")
    body, sig = signed.sign("ci1", 2, b)
    server.set("/pointer", body, etag=etag)
    server.set("/pointer.sig", sig)
    assert signed.once().returncode == 0 and host.current == b
    r = signed.once()
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr
    if etag:
        assert any(q["path"] == "/pointer" and "If-None-Match" in q["headers"] for q in server.requests)
    trust_file(signed.trusted, keys["ci2"].public)  # ci1 revoked, only ci2 trusted now
    before = snapshot(host)
    assert_refused(host, signed.once(), "signature", before)


# ---------------------------------------------------------------------------
# Key formats and rotation
# ---------------------------------------------------------------------------


def test_two_trusted_public_keys_either_deploys(signed, host, world, keys):
    b, c = world.path("b"), world.path("c")
    trust_file(signed.trusted, "# rotation: old and new CI keys", keys["ci1"].public, "", keys["ci2"].public)
    signed.publish("ci1", 2, b)
    r = signed.once()
    assert r.returncode == 0, r.stderr
    assert host.current == b
    signed.publish("ci2", 3, c)
    r = signed.once()
    assert r.returncode == 0, r.stderr
    assert host.current == c and host.state()["highest_revision"] == 3
    # ... and then the old key is dropped: only ci2 works from now on.
    trust_file(signed.trusted, keys["ci2"].public)
    signed.publish("ci1", 4, b)
    assert_refused(host, signed.once(), "signature", snapshot(host))


def test_allowed_signers_format(host, world, server, keys, tmp_path):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    trusted = trust_file(tmp_path / "allowed_signers",
                         f'ci1@example.org namespaces="{NAMESPACE}" {keys["ci1"].blob}',
                         f'ci2@example.org namespaces="{NAMESPACE}" {keys["ci2"].public}')
    for rev, (name, path) in enumerate([("ci1", a), ("ci2", b), ("ci1", c)], start=1):
        serve(server, *sign(keys[name], rev, path, tmp_path / f"p{rev}"))
        r = host.once(host.url, "--trusted-keys", str(trusted), "-v")
        assert r.returncode == 0, r.stderr
        assert host.state()["deployed"] == path and host.current == path
        assert f"signed by {name}@example.org" in r.stderr
    serve(server, *sign(keys["evil"], 4, world.path("d"), tmp_path / "p4"))
    before = snapshot(host)
    assert_refused(host, host.once(host.url, "--trusted-keys", str(trusted)), "signature", before)


def test_allowed_signers_restricted_to_another_namespace_is_refused(host, world, server, keys, tmp_path):
    trusted = trust_file(tmp_path / "allowed_signers", f'ci1 namespaces="git" {keys["ci1"].blob}')
    serve(server, *sign(keys["ci1"], 1, world.path("b"), tmp_path / "p"))
    before = snapshot(host)
    assert_refused(host, host.once(host.url, "--trusted-keys", str(trusted)), "signature", before)


# ---------------------------------------------------------------------------
# The sign command
# ---------------------------------------------------------------------------


def test_sign_output_verifies_with_plain_ssh_keygen(keys, world, tmp_path):
    b = world.path("b")
    out = tmp_path / "pointer"
    body, sig = sign(keys["ci1"], 42, b, out, hosts=("web1", "web2"), not_after="2999-12-31T23:59:59Z")
    assert body.decode().splitlines() == [b, "revision: 42", "hosts: web1 web2",
                                          "not-after: 2999-12-31T23:59:59Z"]
    assert sig.startswith(b"-----BEGIN SSH SIGNATURE-----")
    signers = trust_file(tmp_path / "allowed", f'ci namespaces="{NAMESPACE}" {keys["ci1"].public}')
    r = subprocess.run([SSH_KEYGEN, "-Y", "verify", "-f", str(signers), "-I", "ci", "-n", NAMESPACE,
                        "-s", f"{out}.sig"], input=body, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"Good" in r.stdout
    # Another namespace or another body does not verify.
    r = subprocess.run([SSH_KEYGEN, "-Y", "verify", "-f", str(signers), "-I", "ci", "-n", "other",
                        "-s", f"{out}.sig"], input=body, capture_output=True)
    assert r.returncode != 0
    r = subprocess.run([SSH_KEYGEN, "-Y", "verify", "-f", str(signers), "-I", "ci", "-n", NAMESPACE,
                        "-s", f"{out}.sig"], input=body + b"x", capture_output=True)
    assert r.returncode != 0


def test_sign_documented_argument_order(keys, world, tmp_path):
    """SPEC: `sign --key KEY --revision N [--hosts H [H ...]] [--not-after RFC3339] STOREPATH -o FILE`."""
    b = world.path("b")
    out = tmp_path / "pointer"
    r = subprocess.run([sys.executable, str(AGENT), "sign", "--key", str(keys["ci1"].private), "--revision", "7",
                        "--hosts", "web1", "web2", b, "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[:3] == [b, "revision: 7", "hosts: web1 web2"] and len(lines) == 4
    # not-after is written by default, 30 days ahead (TUF's freshness rule)
    assert lines[3].startswith("not-after: ")
    expiry = datetime.fromisoformat(lines[3].split(": ", 1)[1].replace("Z", "+00:00"))
    assert timedelta(days=29, hours=23) < expiry - datetime.now(timezone.utc) <= timedelta(days=30)
    assert Path(f"{out}.sig").exists()


def test_sign_requires_a_host_list_or_all_hosts(keys, world, tmp_path):
    b, out = world.path("b"), tmp_path / "pointer"
    base = [sys.executable, str(AGENT), "sign", "--key", str(keys["ci1"].private), "--revision", "7"]
    r = subprocess.run(base + ["-o", str(out), b], capture_output=True, text=True)
    assert r.returncode == 2 and "--all-hosts" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not out.exists()
    r = subprocess.run(base + ["--all-hosts", "--no-expiry", "-o", str(out), b], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text().splitlines() == [b, "revision: 7", "hosts: *"]
    for bad in (["--hosts", "*"], ["--hosts", "a,b"], ["--hosts", "web1", "--all-hosts"],
                ["--all-hosts", "--no-expiry", "--not-after", "2030-01-01T00:00:00Z"]):
        r = subprocess.run(base + bad + ["-o", str(out), b], capture_output=True, text=True)
        assert r.returncode == 2, (bad, r.stderr)


def test_sign_rejects_a_drv_and_a_bad_expiry(keys, world, tmp_path):
    base = [sys.executable, str(AGENT), "sign", "--key", str(keys["ci1"].private), "--revision", "1",
            "--all-hosts", "-o", str(tmp_path / "p")]
    r = subprocess.run(base + [world.drv], capture_output=True, text=True)
    assert r.returncode == 4 and ".drv" in r.stderr
    r = subprocess.run(base[:-2] + ["--not-after", "next tuesday", "-o", str(tmp_path / "p"), world.path("b")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "RFC 3339" in r.stderr
    assert not (tmp_path / "p.sig").exists()


# ---------------------------------------------------------------------------
# Verification is cached by digest
# ---------------------------------------------------------------------------


def test_second_noop_cycle_spawns_no_ssh_keygen(signed, host, world, tmp_path):
    b, c = world.path("b"), world.path("c")
    calls = wrap_ssh_keygen(host, tmp_path)
    signed.publish("ci1", 2, b)
    r = signed.once()
    assert r.returncode == 0, r.stderr
    assert host.current == b
    first = calls.read_text().splitlines()
    assert any("-Y verify" in line for line in first), first  # the wrapper is what the agent runs

    calls.write_text("")
    r = signed.once("-v")
    assert r.returncode == 0, r.stderr
    assert "plan: phase: settled; upstream: deployed: up to date" in r.stderr
    assert calls.read_text() == ""
    assert "running: ssh-keygen" not in r.stderr
    assert host.state()["highest_revision"] == 2

    # A new pointer is verified again.
    signed.publish("ci1", 3, c)
    r = signed.once()
    assert r.returncode == 0, r.stderr
    assert host.current == c
    assert any("-Y verify" in line for line in calls.read_text().splitlines())


# ---------------------------------------------------------------------------
# Bearer token
# ---------------------------------------------------------------------------

TOKEN = "tok-7f3a9c1e5b2d4f60a8e1c3b5d7f9a2c4"


def token_file(tmp_path: Path, mode: int) -> Path:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    p.chmod(mode)
    return p


def test_token_is_sent_and_never_logged(host, world, server, tmp_path):
    b = world.path("b")
    tok = token_file(tmp_path, 0o600)
    r = host.once(host.url, "--token-file", str(tok), "-v")
    assert r.returncode == 0, r.stderr
    server.pointer(b)
    r2 = host.once(host.url, "--token-file", str(tok), "-v")  # deploys: connectivity check too
    assert r2.returncode == 0, r2.stderr
    assert host.current == b
    pointer_requests = [q for q in server.requests if q["path"] == "/pointer"]
    assert len(pointer_requests) >= 3  # run 1, run 2, connectivity check
    for q in pointer_requests:
        assert q["headers"].get("Authorization") == f"Bearer {TOKEN}", q["headers"]
    for out in (r.stdout, r.stderr, r2.stdout, r2.stderr, read_all(host)):
        assert TOKEN not in out
    assert "token file" not in r.stderr  # 0600: no warning
    # A failing run does not leak it either.
    r3 = host.once(server.base + "/nothing-here", "--token-file", str(tok), "-v")
    assert r3.returncode == 3
    assert "HTTP 404" in r3.stderr
    for out in (r3.stdout, r3.stderr, read_all(host)):
        assert TOKEN not in out


def test_token_is_sent_for_the_signature_too(signed, host, world, server, tmp_path):
    tok = token_file(tmp_path, 0o600)
    signed.publish("ci1", 2, world.path("b"))
    server.requests.clear()
    r = signed.once("--token-file", str(tok), "-v")
    assert r.returncode == 0, r.stderr
    sig_requests = [q for q in server.requests if q["path"] == "/pointer.sig"]
    assert sig_requests and all(q["headers"].get("Authorization") == f"Bearer {TOKEN}" for q in sig_requests)
    assert TOKEN not in r.stderr + r.stdout + read_all(host)


def test_world_readable_token_file_warns(host, tmp_path):
    tok = token_file(tmp_path, 0o644)
    r = host.once(host.url, "--token-file", str(tok))
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln and str(tok) in ln]
    assert len(warnings) == 1, r.stderr
    assert "644" in warnings[0]
    assert TOKEN not in r.stderr


def test_credentials_in_url_are_masked(host, world, server):
    b = world.path("b")
    secret = "hunter2-Sup3rSecret"
    url = f"http://deployer:{secret}@127.0.0.1:{server.port}/pointer"
    assert host.once(url, "-v").returncode == 0  # tracking a
    server.pointer(b)
    r = host.once(url, "-v")
    assert r.returncode == 0, r.stderr
    assert host.current == b
    auth = [q["headers"].get("Authorization") for q in server.requests if q["path"] == "/pointer"]
    assert auth and all(a == "Basic " + base64.b64encode(f"deployer:{secret}".encode()).decode() for a in auth)
    # An HTTP error names the URL: masked.
    bad = f"http://deployer:{secret}@127.0.0.1:{server.port}/nothing-here"
    r404 = host.once(bad, "-v")
    assert r404.returncode == 3
    assert "HTTP 404" in r404.stderr and "***@127.0.0.1" in r404.stderr
    for res in (r, r404):
        for line in (res.stderr + res.stdout).splitlines():
            assert secret not in line and "deployer:" not in line, line
    assert secret not in read_all(host)


def test_credentials_in_url_masked_in_signature_errors(signed, host, world, server):
    secret = "s3cret-in-url-99"
    body, _ = signed.sign("ci1", 2, world.path("b"))
    serve(server, body, None)
    url = f"http://ci:{secret}@127.0.0.1:{server.port}/pointer"
    before = snapshot(host)
    r = host.once(url, "-v", "--trusted-keys", str(signed.trusted))
    assert_refused(host, r, "signature", before, "***@127.0.0.1")
    assert secret not in r.stderr + r.stdout + read_all(host)


# ---------------------------------------------------------------------------
# Plain http:// warning
# ---------------------------------------------------------------------------

HTTP_WARNING = "plain http://"


def test_plain_http_without_keys_warns_once_per_run(host, world, server):
    assert host.once(host.url).returncode == 0  # tracking a
    server.pointer(world.path("b"))  # deploys: fetch + connectivity check
    r = host.once(host.url, "-v")
    assert r.returncode == 0, r.stderr
    assert host.current == world.path("b")
    assert r.stderr.count(HTTP_WARNING) == 1, r.stderr


def test_plain_http_warning_once_in_loop_mode(host, world, server):
    proc = host.agent_background("--url", host.url, "--interval", "1")
    try:
        deadline = time.time() + 60
        runs: set[float] = set()
        while time.time() < deadline and len(runs) < 3:
            last = host.state().get("last_run") if (host.var_lib / "nixos-autodeploy" / "state.json").exists() else None
            if last:
                runs.add(last)
            time.sleep(0.2)
        assert len(runs) >= 3, "the loop did not run three cycles"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # Output went to proc.log_path (tests/world.py), or to pipes in older versions.
    err = Path(proc.log_path).read_text() if hasattr(proc, "log_path") else proc.stderr.read()
    assert err.count("state: ") >= 3, err
    assert err.count(HTTP_WARNING) == 1, err


def test_plain_http_with_keys_does_not_warn(signed, host, world):
    signed.publish("ci1", 2, world.path("b"))
    r = signed.once("-v")
    assert r.returncode == 0, r.stderr
    assert HTTP_WARNING not in r.stderr


# ---------------------------------------------------------------------------
# Hydra JSON pointers
# ---------------------------------------------------------------------------


def hydra(path: str | None) -> str:
    outputs = {} if path is None else {"out": {"path": path}}
    return json.dumps({"id": 123456, "finished": 1, "buildstatus": 0, "job": "nixos.host1",
                       "nixname": "nixos-system-host1", "system": "x86_64-linux", "buildoutputs": outputs})


def test_hydra_json_pointer_deploys(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0  # tracking a
    server.requests.clear()
    server.set("/pointer", hydra(b), content_type="application/json")
    r = host.once(host.url, "--json-field", "buildoutputs.out.path")
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and host.state()["deployed"] == b
    assert host.activations() == [f"{b} switch marker=1"]
    first = [q for q in server.requests if q["path"] == "/pointer"][0]
    assert first["headers"].get("Accept") == "application/json"


@pytest.mark.parametrize("case", ["missing_field", "drv", "not_json", "not_a_string"])
def test_bad_hydra_json_is_refused(host, world, server, case):
    assert host.once(host.url).returncode == 0  # tracking a
    body = {"missing_field": hydra(None), "drv": hydra(world.drv), "not_json": "<html>Hydra is down</html>",
            "not_a_string": json.dumps({"buildoutputs": {"out": {"path": 42}}})}[case]
    server.set("/pointer", body, content_type="application/json")
    before = snapshot(host)
    r = host.once(host.url, "--json-field", "buildoutputs.out.path")
    assert_refused(host, r, "pointer", before)


def test_token_is_not_sent_to_another_host_after_a_redirect(host, world, server, tmp_path):
    token = "tok-" + "9" * 24
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    # localhost is another origin than 127.0.0.1 (same server, other host name).
    target = server.pointer(world.path("a"), "/elsewhere").replace("127.0.0.1", "localhost")
    server.set("/pointer", "", status=302, headers={"Location": target})
    r = host.once(host.url, "--token-file", str(token_file), "--no-connectivity-check")
    assert r.returncode == 0, r.stderr
    first = [q for q in server.requests if q["path"] == "/pointer"][-1]
    moved = [q for q in server.requests if q["path"] == "/elsewhere"][-1]
    assert first["headers"].get("Authorization") == f"Bearer {token}"
    assert "Authorization" not in moved["headers"]


def test_url_credentials_and_token_file_together_are_a_usage_error(host, server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    token_file.chmod(0o600)
    url = host.url.replace("http://", "http://user:pw@")
    r = host.once(url, "--token-file", str(token_file))
    assert r.returncode == 2 and "not both" in r.stderr and "pw" not in r.stderr


# ---------------------------------------------------------------------------
# The signature's work directory (issue #18, item 6)
# ---------------------------------------------------------------------------


def test_dry_run_with_keys_before_the_state_directory_exists(host, world, server, keys, tmp_path):
    body, sig = sign(keys["ci1"], 1, world.path("b"), tmp_path / "pointer")
    serve(server, body, sig)
    trusted = trust_file(tmp_path / "trusted.pub", keys["ci1"].public)
    state_dir = host.var_lib / "nixos-autodeploy"
    assert not state_dir.exists()
    r = host.once(host.url, "--dry-run", "--trusted-keys", str(trusted))
    assert r.returncode == 0, r.stderr
    assert "internal error" not in r.stderr
    assert "phase: untracked; upstream: new" in r.stdout  # the plan was printed
    assert not state_dir.exists()  # a dry run creates nothing
    assert host.current == world.path("a")


def test_full_state_disk_while_verifying_is_a_state_error(host, world, server, keys, tmp_path):
    state_dir = host.small_disk("/var/lib/nixos-autodeploy", "64k")
    state_dir.chmod(0o700)
    trusted = trust_file(tmp_path / "trusted.pub", keys["ci1"].public)
    serve(server, *sign(keys["ci1"], 1, world.path("a"), tmp_path / "p1"))
    assert host.once(host.url, "--trusted-keys", str(trusted)).returncode == 0
    old = (state_dir / "state.json").read_text()
    filler = fill_leaving(state_dir, 0)
    serve(server, *sign(keys["ci1"], 2, world.path("b"), tmp_path / "p2"))
    r = host.once(host.url, "--trusted-keys", str(trusted))
    assert r.returncode == 9, r.stderr
    assert "internal error" not in r.stderr
    assert error_kind(host) == "state" and state_gauge(host) == "failed"
    assert host.current == world.path("a") and (state_dir / "state.json").read_text() == old
    assert not [p for p in state_dir.iterdir() if p.name.startswith(".verify-")]  # nothing left behind
    filler.unlink()
    r = host.once(host.url, "--trusted-keys", str(trusted))
    assert r.returncode == 0 and host.current == world.path("b"), r.stderr


# ---------------------------------------------------------------------------
# `sign` refuses what hosts refuse (issue #18, item 8)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--all-hosts", "--not-after", "2030-01-01\n00:00:00Z"],
    ["--all-hosts", "--not-after", "2030-01-01\x0b00:00:00Z"],
    ["--all-hosts", "--rollout-start", "2030-01-01\n00:00:00Z", "--rollout-duration", "1h"],
    ["--all-hosts", "--rollout-start", "2030-01-01\x0b00:00:00Z", "--rollout-duration", "1h"],
    ["--hosts", ""],
    ["--hosts", "web1", ""],
    # Review of #18: already expired (hosts: exit 4, "expired"), larger than a host reads (MAX_POINTER_BYTES).
    ["--all-hosts", "--not-after", "2020-01-01T00:00:00Z"],
    ["--hosts", *(f"host{i:05d}.example.org" for i in range(4000))],
], ids=["not-after-newline", "not-after-vtab", "rollout-start-newline", "rollout-start-vtab", "hosts-empty",
        "hosts-one-empty", "not-after-past", "larger-than-hosts-read"])
def test_sign_refuses_what_hosts_refuse(keys, tmp_path, args):
    out = tmp_path / "pointer"
    path = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-a"
    r = subprocess.run([sys.executable, str(AGENT), "sign", "--key", str(keys["ci1"].private), "--revision", "1",
                        *args, "-o", str(out), path], capture_output=True, text=True)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not (tmp_path / "pointer.sig").exists()


def test_hosts_and_sign_read_times_with_one_parser(keys, tmp_path):
    """What `sign` accepts, a host accepts: the same parse_rfc3339."""
    import importlib
    sys.path.insert(0, str(AGENT.parent))
    ad = importlib.import_module("autodeploy")
    for text in ("2030-01-01T00:00:00Z", "2030-01-01t00:00:00+02:00", "2030-01-01 00:00:00", "2030-01-01"):
        ad.parse_rfc3339(text)
        out = tmp_path / "p"
        r = subprocess.run([sys.executable, str(AGENT), "sign", "--key", str(keys["ci1"].private), "--revision", "1",
                            "--all-hosts", "--not-after", text, "-o", str(out),
                            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-a"], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        pointer = ad.parse_pointer(out.read_bytes())
        ad.check_expiry(pointer)


# ---------------------------------------------------------------------------
# Bad pointers: each refused, nothing changes, metrics stay valid
# ---------------------------------------------------------------------------


H = "0123456789abcdfghijklmnpqrsvwxyz"  # 32 valid nix-base32 characters


def bad_pointer_cases(world):
    a = world.path("a")
    return {
        "html": (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>\n", 4, "not a store path"),
        "empty": (b"", 4, "empty"),
        "blank": (b"\n \n\t\n", 4, "empty"),
        "nul": (a.encode() + b"\0\n", 4, "NUL"),
        "relative": (b"nix/store/" + H.encode() + b"-x\n", 4, "not a store path"),
        "dotdot": (f"/nix/store/../../etc/{H}-passwd\n".encode(), 4, "store hash"),
        "subpath": ((a + "/bin/switch-to-configuration\n").encode(), 4, "invalid store path name"),
        "non_utf8": (b"/nix/store/\xff\xfe" + H.encode() + b"\n", 4, "not UTF-8"),
        "bad_hash": (f"/nix/store/{'e' * 32}-nixos-system-x\n".encode(), 4, "store hash"),
        "drv": ((world.drv + "\n").encode(), 4, "derivation"),
        "junk_line": ((a + "\nthis is not metadata\n").encode(), 4, "key: value"),
        "missing_from_cache": ((world.path("missing") + "\n").encode(), 5, "cannot realise"),
        "not_a_system": ((world.path("notsystem") + "\n").encode(), 5, "not a NixOS system"),
        "foreign_platform": ((world.path("foreign") + "\n").encode(), 5, "aarch64-linux"),
        "oversized": (b"/nix/store/" + b"x" * (70 * 1024), 3, "limit"),
    }


@pytest.mark.parametrize("case", [
    "html", "empty", "blank", "nul", "relative", "dotdot", "subpath", "non_utf8", "bad_hash", "drv",
    "junk_line", "missing_from_cache", "not_a_system", "foreign_platform", "oversized"])
def test_bad_pointer_changes_nothing(host, world, server, case):
    a = world.path("a")
    assert host.once(host.url).returncode == 0
    state_before = host.state()
    body, code, needle = bad_pointer_cases(world)[case]
    server.set("/pointer", body)
    r = host.once(host.url)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert host.current == a and host.profile == a and host.state()["deployed"] == state_before["deployed"]
    assert host.activations() == []
    m = host.metrics()
    assert m["nixos_autodeploy_last_run_success"] == 0
    assert any(k.startswith("nixos_autodeploy_last_error_info{") for k in m)
    promtool_ok(host)


def test_error_shows_what_was_received_escaped_and_truncated(host, server):
    server.set("/pointer", b"<html>" + b"A" * 500 + b"\x1b[31m")
    r = host.once(host.url)
    assert r.returncode == 4
    line = [ln for ln in r.stderr.splitlines() if "error:" in ln][0]
    assert "<html>AAAA" in line and "... (" in line and len(line) < 400
    assert "\x1b" not in r.stderr


# ---------------------------------------------------------------------------
# Trust under attack (adversarial review): a 304 replays only a pointer
# verified under the current keys, URL and hosts; the revision floor fails
# closed; signed pointers name their hosts; strict metadata; options in a key
# file; plain http:// warned about
# ---------------------------------------------------------------------------


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


def test_huge_revision_is_refused_and_later_runs_work(signed: Signed, host, world, keys, tmp_path):
    body, sig = keygen_sign(keys["ci1"], f"{world.path('b')}\nrevision: 1{'0' * 400}\nhosts: *\n".encode(),
                            tmp_path / "huge")
    serve(signed.server, body, sig)
    r = signed.once()
    assert r.returncode == 4 and "whole number" in r.stderr
    signed.publish("ci1", 2, world.path("b"))
    r = signed.once()
    assert r.returncode == 0 and host.metrics()["nixos_autodeploy_revision_floor"] == 2, r.stderr


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


def test_token_over_plain_http_warns_once(host, world, tmp_path):
    token_file = host.var_lib / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    r = host.once(host.url, "--token-file", "/var/lib/token")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("credentials are sent over plain http://") == 1


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
