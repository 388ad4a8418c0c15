"""The suite's last lines: one per tier with its counts, so a newcomer sees what
ran (and what was skipped) without reading the list of tests.

Registered by tests/conftest.py.  A test's tier, the first rule that decides:

1. a `tier("...")` marker on the test or its module (test_module.py: module
   evaluation; test_model.py: model-based);
2. the `vm` marker (tests/vm/): VM;
3. what the test uses: an object declared with `@declare("...")` (conftest's
   `world` fixture: real nix; servers.Nginx, Tinyproxy and FleetMonitor: real
   servers), found among the fixtures it requests (with what they request) and
   the names that its code, their code and the helpers they call in the tests
   refer to; of several, the one last in TIERS;
4. otherwise unit.
So a new test is placed by what it does, and every test lands in one tier.
No pytest import: servers.py (stdlib only) declares its servers with it.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

TIERS = ("unit", "real nix", "real servers", "module evaluation", "model-based", "VM")
ATTR = "__autodeploy_tier__"


def declare(tier: str):
    """Mark a fixture function or a class: a test that uses it is in `tier`."""
    assert tier in TIERS, tier

    def mark(obj):
        setattr(obj, ATTR, tier)
        return obj
    return mark


def register(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("autodeploy-tiers"):
        config.pluginmanager.register(TierSummary(), "autodeploy-tiers")


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _declared(obj) -> str | None:
    try:
        tier = getattr(obj, ATTR, None)
    except Exception:  # an object whose attribute lookup raises claims nothing
        return None
    return tier if tier in TIERS else None


def used_tiers(func, scope: Path, seen: set[int]) -> set[str]:
    """The tiers declared on `func`, on what its code refers to by name (a
    global, or an attribute of a module it refers to), and, recursively, on
    the functions it refers to that are defined under `scope` (the tests)."""
    if id(func) in seen:
        return set()
    seen.add(id(func))
    found = {t for t in (_declared(func),) if t}
    code = getattr(func, "__code__", None)
    namespace = getattr(func, "__globals__", None)
    if code is None or namespace is None:
        return found
    for co in _codes(code):
        names = co.co_names
        for name in names:
            obj = namespace.get(name)
            if obj is None:
                continue
            candidates = [obj]
            if isinstance(obj, types.ModuleType):
                candidates = [getattr(obj, attr, None) for attr in names]
            for cand in candidates:
                tier = _declared(cand)
                if tier:
                    found.add(tier)
                elif isinstance(cand, types.FunctionType) and scope in Path(cand.__code__.co_filename).parents:
                    found |= used_tiers(cand, scope, seen)
    return found


@functools.lru_cache(maxsize=None)  # a test's parameters, and tests, share functions and fixtures
def tiers_used_by(func, scope: Path) -> frozenset[str]:
    return frozenset(used_tiers(func, scope, set()))


def tier_of(item: pytest.Item) -> str:
    marker = item.get_closest_marker("tier")
    if marker is not None and marker.args:
        assert marker.args[0] in TIERS, f"{item.nodeid}: unknown tier {marker.args[0]!r}"
        return marker.args[0]
    if item.get_closest_marker("vm") is not None:
        return "VM"
    found: set[str] = set()
    scope = Path(item.path).resolve().parent
    obj = getattr(item, "obj", None)
    if obj is not None:
        found |= tiers_used_by(obj, scope)
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    for defs in getattr(fixtureinfo, "name2fixturedefs", {}).values():
        if defs:
            found |= tiers_used_by(defs[-1].func, scope)
    return max(found, key=TIERS.index, default="unit")


class TierSummary:
    def __init__(self) -> None:
        self.tiers: dict[str, str] = {}     # nodeid -> tier
        self.outcomes: dict[str, str] = {}  # nodeid -> passed, failed, skipped

    def pytest_configure(self, config: pytest.Config) -> None:
        config.addinivalue_line("markers", "tier(name): the tier the summary counts this test in "
                                           f"(one of: {', '.join(TIERS)})")

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # The items that will run, after every hook that adds markers or deselects.
        self.tiers = {item.nodeid: tier_of(item) for item in session.items}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        before = self.outcomes.get(report.nodeid)
        if report.failed:
            now = "failed"
        elif report.skipped and not hasattr(report, "wasxfail"):
            now = "skipped"
        elif report.when == "call":
            now = "passed"  # an expected failure too
        else:
            return
        if before != "failed" and not (before == "skipped" and now == "passed"):
            self.outcomes[report.nodeid] = now

    def pytest_terminal_summary(self, terminalreporter, config: pytest.Config) -> None:
        if config.option.collectonly or not self.tiers:
            return
        counts = {tier: dict.fromkeys(("passed", "failed", "skipped", "not run"), 0) for tier in TIERS}
        for nodeid, tier in self.tiers.items():
            counts[tier][self.outcomes.get(nodeid, "not run")] += 1
        terminalreporter.write_sep("-", "what ran, by tier")
        for tier in TIERS:
            c = counts[tier]
            if not sum(c.values()):
                continue
            line = f"{tier + ':':<19}{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
            if c["not run"]:
                line += f", {c['not run']} not run"
            terminalreporter.write_line(line, red=bool(c["failed"]), yellow=bool(c["skipped"] or c["not run"]))
