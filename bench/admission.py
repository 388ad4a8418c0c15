#!/usr/bin/env python3
"""Admission to running: how long a host takes, once its rollout wave admits
a build, until it runs that build, with and without the prefetch (issue #21).

    sudo bench/run.sh admission            # or: sudo python3 bench/admission.py [--reps N]

Same world as bench/bench.py and the tests (tests/world.py: real nix, a signed
binary cache on 127.0.0.1, hosts in private mount namespaces); the new system
has the 1,000-path closure of bench.py's deploy.  Measured inside the host's
namespace (bench.py's measurer: posix_spawn + wait4), the agent as packaged:

- without prefetch: the host first sees the build when it is already admitted
  (as every admission was before the prefetch): one cycle realises the whole
  closure, then activates;
- with prefetch: the host saw the build while waiting for its wave (one cycle
  prefetched it, timed too), then the pointer admits it: the admission cycle;
- activation alone: `nix-env --set` and the activation through `systemd-run`
  (the stand-ins), what the agent does after the realise.

The target: with prefetch <= activation alone + 1 s.  It prints numbers; it
is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench as B  # noqa: E402  (bench/bench.py: the measurer and the packaged agent)

W = B.W
TARGET_MARGIN_S = 1.0


def cache_requests(server: W.PointerServer) -> int:
    return sum(1 for r in server.requests if str(r["path"]).startswith("/cache/"))


def agent_once(url: str) -> list[str]:
    return [B.PY, B.LAUNCHER, "--once", "--url", url, "--prometheus-path", B.METRICS]


def one(host: W.Host, name: str, steps: list[list[str]], log: Path) -> dict:
    return B.measure(host, {name: {"steps": steps}}, reps=1, warmup=0, logfile=log)[name][0]


def bench_admission(root: Path, world: W.World, server: W.PointerServer, reps: int) -> dict[str, list]:
    a, big = world.path("a"), world.path("big")
    rows: dict[str, list] = {"without prefetch": [], "with prefetch": [], "prefetch while waiting": [],
                             "activation alone": [], "cache requests at admission (with)": [],
                             "cache requests at admission (without)": []}
    for rep in range(reps):
        for variant in ("without", "with"):
            host = W.Host(root / f"{variant}-{rep}", world, server, python=B.PY)
            host.install(a)
            path = f"/{variant}-{rep}"
            url = server.pointer(a, path=path)
            first = host.once(url)  # tracking a
            if first.returncode != 0:
                raise SystemExit(f"agent failed ({first.returncode}):\n{first.stderr}")
            if variant == "with":
                server.set(path, f"{big}\nrollout: 0%\n")  # published, this host not admitted yet
                rows["prefetch while waiting"].append(one(host, "wait", [agent_once(url)], root / "wait.log"))
                if host.current != a or not host.store_has(big):
                    raise SystemExit("the waiting cycle did not prefetch (or deployed)")
            server.set(path, f"{big}\nrollout: 100%\n")  # admitted
            before = cache_requests(server)
            rows[f"{variant} prefetch"].append(one(host, "admission", [agent_once(url)], root / "admission.log"))
            rows[f"cache requests at admission ({variant})"].append(cache_requests(server) - before)
            if host.current != big:
                raise SystemExit(f"the admission cycle did not switch to {big}: current is {host.current}")
            shutil.rmtree(host.root, ignore_errors=True)
        # The activation alone, the closure already realised.
        host = W.Host(root / f"activation-{rep}", world, server, python=B.PY)
        host.install(a)
        host.sh(f"nix-store --realise {big} >/dev/null")
        rows["activation alone"].append(one(host, "activation", [
            ["nix-env", "--profile", "/nix/var/nix/profiles/system", "--set", big],
            ["systemd-run", "--unit=nixos-autodeploy-activation", "--wait", "--pipe", "--collect",
             "--service-type=exec", "--", f"{big}/bin/switch-to-configuration", "switch"]], root / "activation.log"))
        if host.current != big:
            raise SystemExit("the bare activation did not switch")
        shutil.rmtree(host.root, ignore_errors=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="hosts per variant (default 3)")
    p.add_argument("--deps", type=int, default=998,
                   help="extra closure paths of the new system (default 998: closure of 1,000 paths)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    why = W.missing_prerequisites()
    if why:
        print(f"cannot run: {why}")
        return 2
    root = Path(tempfile.mkdtemp(prefix="autodeploy-admission-"))
    server = None
    try:
        print(f"building the test world in {root} ({args.deps} extra paths) ...", flush=True)
        started = time.monotonic()
        world = W.build_world(root / "world", {"a": {}, "big": {"deps": args.deps}})
        print(f"  built in {time.monotonic() - started:.1f} s", flush=True)
        B.LAUNCHER = B.package_agent(root / "package")
        server = W.PointerServer(world.cache)
        B.instrument(server)  # TCP_NODELAY, as real servers have
        print(f"admission to running, {args.reps} hosts per variant ...", flush=True)
        rows = bench_admission(root, world, server, args.reps)
        closure = args.deps + 2
        med = {name: statistics.median(r["wall"] for r in values) for name, values in rows.items()
               if values and isinstance(values[0], dict)}
        print(f"\n## Admission to running a {closure}-path system (median of {args.reps}, wall, "
              f"inside the host's namespace)\n")
        print("| | wall | min-max | cache requests |")
        print("|---|---:|---:|---:|")
        for name, label, requests in (
                ("without prefetch", "admission cycle, without prefetch (realise + activate)",
                 rows["cache requests at admission (without)"]),
                ("with prefetch", "admission cycle, with prefetch (activate)", rows["cache requests at admission (with)"]),
                ("activation alone", "activation alone (`nix-env --set` + `systemd-run … switch`)", None),
                ("prefetch while waiting", "the earlier waiting cycle that prefetched", None)):
            walls = [r["wall"] for r in rows[name]]
            shown = f"{statistics.median(requests):.0f}" if requests else "-"
            print(f"| {label} | {med[name]:.2f} s | {min(walls):.2f}-{max(walls):.2f} s | {shown} |")
        target = med["activation alone"] + TARGET_MARGIN_S
        ok = med["with prefetch"] <= target
        print(f"\nTarget: with prefetch <= activation alone + {TARGET_MARGIN_S:g} s = {target:.2f} s: "
              f"{'met' if ok else '**missed**'} ({med['with prefetch']:.2f} s; "
              f"{med['with prefetch'] - med['activation alone']:.2f} s above the activation; "
              f"{med['without prefetch'] / med['with prefetch']:.1f}x faster than without).")
    finally:
        if server is not None:
            server.close()
        if args.keep:
            print(f"\n(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
