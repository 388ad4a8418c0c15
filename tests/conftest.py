"""Fixtures: one real-nix test world per session, a fresh host and server per
test, a FleetLock server with one slot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiers  # noqa: E402
import world as world_mod  # noqa: E402
from servers import FleetLockServer  # noqa: E402

REASON = world_mod.missing_prerequisites()


def pytest_configure(config):
    tiers.register(config)  # the last lines: one per tier with its counts


def pytest_collection_modifyitems(config, items):
    if REASON is None:
        return
    skip = pytest.mark.skip(reason=f"real-nix test world unavailable: {REASON}")
    needing = [item for item in items if "world" in getattr(item, "fixturenames", ())]
    for item in needing:
        item.add_marker(skip)
    if needing:
        config._autodeploy_skipped = len(needing)  # reported in the summary


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = getattr(config, "_autodeploy_skipped", 0)
    if skipped:
        terminalreporter.write_line(
            f"NOTE: {skipped} real-nix tests were skipped: {REASON}. "
            "Run the README's test command as root on Debian (it installs nix-bin).", yellow=True)


@pytest.fixture(scope="session")
@tiers.declare("real nix")
def world(tmp_path_factory) -> world_mod.World:
    return world_mod.build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def server(world):
    srv = world_mod.PointerServer(world.cache)
    yield srv
    srv.close()


@pytest.fixture
def host(world, server, tmp_path):
    """A host installed with system `a`, the pointer at /pointer naming `a`."""
    h = world_mod.Host(tmp_path / "host", world, server)
    h.install(world.path("a"))
    h.url = server.pointer(world.path("a"))
    yield h
    h.cleanup()


@pytest.fixture
def fleetlock():
    """A FleetLock server with one slot per group."""
    srv = FleetLockServer(slots=1)
    yield srv
    srv.close()
