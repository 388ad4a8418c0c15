"""The demo: a full pull deploy on this machine, in private mount namespaces.

Run it through ../demo.sh (which installs nix when missing).  It reuses the
test world (tests/world.py): stand-in systems built with real nix, a signed
binary cache and a pointer served on 127.0.0.1, and a "host" whose /nix, /run
and /var/lib are private directories, so nothing on this machine changes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from world import Host, PointerServer, build_world, missing_prerequisites  # noqa: E402

SYSTEMS = {"v1": {}, "v2": {}, "v3": {"kernelVersion": "6.6"}, "hotfix": {}}


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def show(host: Host, result) -> None:
    for line in result.stderr.splitlines():
        if line.startswith("nixos-autodeploy: ") and "warning: the pointer is fetched over plain" not in line:
            print("  agent| " + line[len("nixos-autodeploy: "):])
    status = host.agent("status")
    print("  status:")
    for line in status.stdout.splitlines():
        print("    " + line)
    print("  metrics (non-zero state, gauges):")
    for line in host.metrics_text().splitlines():
        if line.startswith("#") or line.endswith(" 0") and "state{" in line:
            continue
        if "timestamp" in line or "duration" in line:
            continue
        print("    " + line)


def main() -> int:
    why = missing_prerequisites()
    if why:
        print(f"demo: cannot run: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="nixos-autodeploy-demo-"))
    try:
        say("CI side: building four stand-in NixOS systems with nix and publishing them "
            "to a signed binary cache served on 127.0.0.1")
        world = build_world(workdir / "world", SYSTEMS)
        for name in SYSTEMS:
            print(f"  {name:7} {world.path(name)}")
        server = PointerServer(world.cache)
        host = Host(workdir / "host", world, server)
        host.install(world.path("v1"))
        url = server.pointer(world.path("v1"))
        print(f"  pointer: {url}   cache: {server.cache_url}")
        print(f"  the host's store starts empty but for v1; it trusts the cache key {world.public_key}")

        say("1. The host runs v1 and the pointer says v1: the agent starts tracking")
        show(host, host.once(url))

        say("2. CI publishes v2: the agent substitutes it from the cache and switches to it")
        server.pointer(world.path("v2"))
        show(host, host.once(url))

        say("3. CI publishes v3 with a new kernel; --switch-mode smart stages it for the next boot")
        server.pointer(world.path("v3"))
        show(host, host.once(url, "--switch-mode", "smart"))

        say("4. The host reboots (simulated: /run is wiped, the boot loader's default starts); "
            "the agent checks the new system and reports it")
        host.reboot()
        show(host, host.once(url, "--switch-mode", "smart"))

        say("5. Someone deploys a hotfix by hand (nixos-rebuild switch): the agent sees it, "
            "marks the host dirty and stays out of the way")
        hotfix = world.path("hotfix")
        host.sh(f"nix-store --realise {hotfix} >/dev/null && "
                f"/usr/bin/nix-env -p /nix/var/nix/profiles/system --set {hotfix} && "
                f"{hotfix}/bin/switch-to-configuration switch >/dev/null")
        show(host, host.once(url))

        say("6. CI catches up and publishes the hotfix: the host runs upstream again, tracking resumes")
        server.pointer(hotfix)
        show(host, host.once(url))

        server.close()
        say(f"Done in {time.monotonic() - started:.1f}s: tracked v1, deployed v2, staged v3 for boot, "
            "rebooted into it, left a manual hotfix alone (dirty), resumed when upstream caught up.")
        print("Nothing outside " + str(workdir) + " was changed; it is removed now.")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
