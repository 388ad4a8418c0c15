"""Ready before its turn (issue #21, part 2), against real nix.

A host that sees a build it may not deploy yet (waiting for its rollout
wave) realises the closure from the binary cache at once, GC-rooted at
/run/nixos-autodeploy-prefetch; when its turn comes, only the activation
remains: no request reaches the cache any more.  Nothing is fetched while
the host is suspended, the rollout paused or the build quarantined; a failed
prefetch is counted and retried, never a failed deploy; a newer build
replaces the older one's root.
"""

from __future__ import annotations

import json

import pytest

from util import promtool_ok, state_gauge, stop_during_download, track

ROOT = "/run/nixos-autodeploy-prefetch"


def cache_requests(server) -> list[str]:
    return [str(r["path"]) for r in server.requests if str(r["path"]).startswith("/cache/")]


def waiting(server, path: str, *extra: str) -> None:
    """Publish `path` with a rollout that admits no host yet."""
    server.set("/pointer", "\n".join([path, "rollout: 0%", *extra]) + "\n")


def gc(host) -> None:
    """Collect garbage in the host's store: what no root holds goes."""
    host.sh("nix-store --gc >/dev/null 2>&1")


def roots_of(host, path: str) -> list[str]:
    """The GC roots in the host that keep `path` (its links; not the runtime
    roots nix finds in /proc, which other processes on this machine can add)."""
    out = host.sh(f"nix-store --query --roots {path}").stdout.splitlines()
    return sorted(line.split(" -> ")[0] for line in out if line.startswith("/") and not line.startswith("/proc/"))


def prefetched_series(host) -> dict[str, float]:
    return {k: v for k, v in host.metrics().items() if k.startswith("nixos_autodeploy_prefetched{")}


def test_waiting_for_its_wave_the_closure_is_realised_and_rooted_not_activated(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    waiting(server, b)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert state_gauge(host) == "waiting_rollout"
    assert host.current == a and host.profile == a and host.activations() == []  # not activated
    assert host.store_has(b) and host.link(ROOT) == b  # realised and rooted
    assert cache_requests(server), "the closure came from the cache"
    assert roots_of(host, b) == [ROOT]
    gc(host)
    assert host.store_has(b), "the prefetch root keeps the closure through a garbage collection"
    state = host.state()
    assert state["prefetched"]["path"] == b and state["deploys_total"] == 0 and state["deployed"] == a
    assert prefetched_series(host) == {f'nixos_autodeploy_prefetched{{path="{b}"}}': 1}
    promtool_ok(host)
    status = host.agent("status").stdout
    assert f"prefetched       {b} (realised and rooted" in status, status
    assert json.loads(host.agent("status", "--json").stdout)["prefetched"]["path"] == b
    # The next cycles find it realised: no process, no request.
    server.requests.clear()
    r = host.once(host.url)
    assert r.returncode == 0 and state_gauge(host) == "waiting_rollout", r.stderr
    assert cache_requests(server) == [] and "prefetching" not in r.stderr


def test_when_its_turn_comes_only_the_activation_remains(host, world, server):
    a, b = world.path("a"), world.path("b")
    track(host)
    waiting(server, b)
    assert host.once(host.url).returncode == 0 and host.store_has(b)
    server.requests.clear()
    server.set("/pointer", f"{b}\nrollout: 100%\n")  # admitted
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and state_gauge(host) == "deployed"
    assert cache_requests(server) == [], "the turn fetched from the cache again"
    assert [line.split()[:2] for line in host.activations()] == [[b, "switch"]]
    # The deploy's own root holds it now; the prefetch root is given up.
    assert host.link(ROOT) is None and host.state()["prefetched"] is None
    assert prefetched_series(host) == {'nixos_autodeploy_prefetched{path=""}': 0}


@pytest.mark.parametrize("hold", ["suspend", "pause", "quarantine"])
def test_nothing_is_fetched_while_suspended_paused_or_for_a_quarantined_build(host, world, server, hold):
    a, b = world.path("a"), world.path("b")
    track(host)
    if hold == "quarantine":
        b = world.path("notsystem")  # realised, then refused and quarantined by its deploy
        server.pointer(b)
        assert host.once(host.url).returncode == 5 and host.state()["quarantined"] == b
        host.sh(f"rm -f /run/upstream-system; nix-store --delete {b} >/dev/null 2>&1")
        assert not host.store_has(b)
    if hold == "suspend":
        assert host.agent("suspend", "--reason", "maintenance").returncode == 0
    waiting(server, b, *(["pause: true"] if hold == "pause" else []))
    server.requests.clear()
    for _ in range(2):
        r = host.once(host.url)
        assert r.returncode == 0, r.stderr
        assert not host.store_has(b) and host.link(ROOT) is None and cache_requests(server) == []
        assert "prefetching" not in r.stderr
        assert f"waits: {hold}:" in r.stderr
    assert host.current == a and host.state().get("prefetched") is None
    assert state_gauge(host) == {"suspend": "suspended", "pause": "rollout_paused", "quarantine": "quarantined"}[hold]
    dry = host.once(host.url, "--dry-run").stdout
    (line,) = [line for line in dry.splitlines() if f"prefetch {b}" in line]
    assert f"waits: {hold}:" in line, dry


def test_a_failed_prefetch_is_counted_and_retried_not_a_failed_deploy(host, world, server):
    a, b, missing = world.path("a"), world.path("b"), world.path("missing")  # missing: not in the cache
    track(host)
    before = host.state()
    waiting(server, missing)
    for attempt in (1, 2):
        r = host.once(host.url)
        assert r.returncode == 0, r.stderr  # the cycle succeeded: the host waits for its wave
        assert "prefetch of" in r.stderr and "not a failed deploy" in r.stderr
        state = host.state()
        assert state["last_state"] == "waiting_rollout" and state["last_run_success"] is True
        assert state["prefetch_failures_total"] == attempt and state["prefetch_error"]["path"] == missing
        assert state["quarantined"] is None and state["deploys_total"] == before["deploys_total"]
        assert state["history"] == before["history"] and state["deployed"] == a and host.current == a
        m = host.metrics()
        assert m["nixos_autodeploy_prefetch_failures_total"] == attempt
        assert m["nixos_autodeploy_prefetch_last_failure_timestamp_seconds"] > 0
        assert m["nixos_autodeploy_last_run_success"] == 1 and 'nixos_autodeploy_last_error_info' not in host.metrics_text()
    assert "prefetch error" in host.agent("status").stdout
    waiting(server, b)  # a build the cache has: the prefetch succeeds, the error is resolved
    assert host.once(host.url).returncode == 0 and host.store_has(b)
    m = host.metrics()
    assert m["nixos_autodeploy_prefetch_last_failure_timestamp_seconds"] == 0
    assert m["nixos_autodeploy_prefetch_failures_total"] == 2 and host.state()["prefetch_error"] is None


def test_a_newer_build_replaces_the_older_ones_root(host, world, server):
    b, c = world.path("b"), world.path("c")
    track(host)
    waiting(server, b)
    assert host.once(host.url).returncode == 0 and host.link(ROOT) == b
    waiting(server, c)
    assert host.once(host.url).returncode == 0
    assert host.link(ROOT) == c and host.state()["prefetched"]["path"] == c
    assert roots_of(host, c) == [ROOT] and roots_of(host, b) == [], "one build at a time: b is no longer rooted"
    assert prefetched_series(host) == {f'nixos_autodeploy_prefetched{{path="{c}"}}': 1}


@pytest.mark.parametrize("how", ["sigterm", "systemctl_stop"])
def test_a_stop_during_the_prefetch_ends_it_and_is_no_failure(host, world, server, how):
    a, b = world.path("a"), world.path("b")
    track(host)
    before = host.state()
    server.cache_delay = 3
    waiting(server, b)
    proc = stop_during_download(host, server, b, how)
    server.cache_delay = 0
    log = proc.log_path.read_text()
    assert proc.returncode == 0 and "prefetching" in log, log
    assert "prefetch of" not in log  # not a failed prefetch: a stop
    after = host.state()
    assert after == before and host.link(ROOT) is None  # nothing recorded, nothing rooted
    r = host.once(host.url)  # the next cycle prefetches
    assert r.returncode == 0 and host.link(ROOT) == b and host.state()["prefetch_failures_total"] == 0, r.stderr


# ---------------------------------------------------------------------------
# Registered is not on disk: a power loss after nix registered a path
# ---------------------------------------------------------------------------


def test_a_registered_but_damaged_closure_is_repaired_from_the_cache(host, world, server):
    """nix registers a substituted path valid before its files reach the
    disk; after a power loss (found by the VM tier) the closure is valid in
    nix's database while files are gone or empty, and `nix-store --realise`
    does nothing.  The deploy verifies the closure after every realise and
    repairs what is damaged from the binary cache (never a build)."""
    a, b = world.path("a"), world.path("b")
    track(host)
    host.sh(f"nix-store --realise {b} >/dev/null")  # realised earlier (a prefetch, a deploy the power cut)
    kernel = host.sh(f"readlink {b}/kernel").stdout.strip()
    kernel_path = "/".join(kernel.split("/")[:4])
    assert kernel_path != b
    # The kernel's path is gone (verify-path stops there), b's script is
    # empty (reported as modified, and b comes after the kernel): both are
    # found and repaired.
    host.sh(f"chmod u+w {b}/bin {b}/bin/switch-to-configuration && : > {b}/bin/switch-to-configuration "
            f"&& chmod -R u+w {kernel_path} && rm -r {kernel_path}")
    assert host.sh(f"nix-store --verify-path {b} {kernel_path}", check=False).returncode != 0
    server.pointer(b)
    server.requests.clear()
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and host.state()["deployed"] == b
    assert "2 path(s) of" in r.stderr and "repairing them from the binary cache" in r.stderr, r.stderr
    assert host.sh(f"nix-store --verify-path $(nix-store --query --requisites {b})", check=False).returncode == 0
    assert any(p.startswith("/cache/") and p.endswith(".nar") for p in cache_requests(server)), cache_requests(server)
    # Intact: the next realise verifies and repairs nothing.
    server.pointer(a)
    r = host.once(host.url)
    assert r.returncode == 0 and "repairing" not in r.stderr, r.stderr


def test_a_damaged_path_the_cache_cannot_give_is_a_failed_realise_not_a_build(host, world, server):
    """Repair substitutes only (max-jobs 0): a damaged path missing from the
    cache fails the realise (tried again next cycle), nothing is activated
    and nothing quarantined."""
    a, b = world.path("a"), world.path("b")
    track(host)
    host.sh(f"nix-store --realise {b} >/dev/null && chmod u+w {b}/bin && rm {b}/bin/switch-to-configuration")
    server.pointer(b)
    nars = list((world.cache).glob("nar/*.nar*")) or list(world.cache.rglob("*.nar*"))
    hidden = [(p, p.with_name(p.name + ".hidden")) for p in nars]
    for p, h in hidden:
        p.rename(h)
    try:
        r = host.once(host.url)
    finally:
        for p, h in hidden:
            h.rename(p)
    assert r.returncode == 5, r.stderr
    assert "cannot realise" in r.stderr, r.stderr
    state = host.state()
    assert host.current == a and host.profile == a and state.get("quarantined") != b, state
    assert host.activations() == []


def test_a_closure_the_prefetch_verified_in_this_boot_is_not_hashed_again(host, world, server):
    """Verifying hashes the whole closure (seconds for a real system): the
    turn after a prefetch in the same boot skips it; after a reboot (a power
    loss is one) the deploy verifies again."""
    a, b = world.path("a"), world.path("b")
    track(host)
    waiting(server, b)
    r = host.once(host.url, "-v")
    assert r.returncode == 0 and "nix-store --verify-path" in r.stderr, r.stderr
    assert host.state()["prefetched"]["boot_id"] == host.boot_id_file.read_text().strip()
    server.set("/pointer", f"{b}\nrollout: 100%\n")
    r = host.once(host.url, "-v")
    assert r.returncode == 0 and host.current == b, r.stderr
    assert "nix-store --verify-path" not in r.stderr, r.stderr
    # Prefetched in an earlier boot: verified again.
    server.pointer(a)
    assert host.once(host.url).returncode == 0 and host.current == a
    waiting(server, b)
    assert host.once(host.url).returncode == 0
    host.reboot()
    server.set("/pointer", f"{b}\nrollout: 100%\n")
    r = host.once(host.url, "-v")
    assert r.returncode == 0 and "nix-store --verify-path" in r.stderr, r.stderr


REPAIR_WITH_A_DERIVER = r'''
set -eu
mount -t tmpfs none /nix
mkdir -p /nix/store /nix/var/nix
export NIX_CONFIG="sandbox = false
build-users-group =
substituters = http://127.0.0.1:9
connect-timeout = 1"
out=$(nix-build --no-out-link -E 'derivation {name="t"; system=builtins.currentSystem; builder="/bin/sh";
  args=["-c" "/bin/mkdir -p $out/lib; echo a > $out/lib/a; echo b > $out/lib/b"];}' 2>/dev/null)
chmod u+w "$out/lib" "$out/lib/a"; echo damaged > "$out/lib/a"
python3 -c "
import sys; sys.path.insert(0, sys.argv[1]); import autodeploy as ad
try:
    ad.realise_closure(sys.argv[2], '/nix/var/nix/gcroots/t')
    print('REALISED')
except ad.ProcessError as exc:
    print('FAILED', exc)
" "$1" "$out" 2>&1 | tail -n 1
ls "$out/lib"
'''


@pytest.mark.tier("real nix")
def test_a_failed_repair_never_deletes_the_damaged_path(tmp_path):
    """A host that once built its own system has the path's deriver in its
    store.  When the cache cannot give the damaged path, `nix-store
    --repair-path` turns to that deriver and nix 2.8 deletes the whole path
    before max-jobs 0 refuses the build: the path stays registered valid with
    no files (glibc, say).  The repair substitutes only, into a temporary
    path: a failed repair leaves the path as it was."""
    import os
    import shutil
    import subprocess
    import world as world_mod
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nix-build"):
        pytest.skip("needs root, unshare and nix")
    script = tmp_path / "repair.sh"
    script.write_text(REPAIR_WITH_A_DERIVER)
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    shutil.copy(world_mod.AGENT, agent_dir / "autodeploy.py")
    r = subprocess.run(["unshare", "-m", "sh", str(script), str(agent_dir)], capture_output=True, text=True,
                       timeout=120)
    lines = r.stdout.split()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" in r.stdout and "REALISED" not in r.stdout, r.stdout
    assert lines[-2:] == ["a", "b"], r.stdout      # both files still there
