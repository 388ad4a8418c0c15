"""Fixtures of the VM tier (tests/vm/): real systemd, systemd-boot and reboots.

Skipped unless AUTODEPLOY_VM_TESTS=1 (.ci/run and tests/vm/run.sh set it): a
scenario takes one to four minutes of emulated CPU, and the normal suite must
stay fast.  A failing scenario's console log, the harness's log and the
agent's journal are attached to its report.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

ENABLED = os.environ.get("AUTODEPLOY_VM_TESTS") == "1"
if ENABLED:
    # A timeout's SIGTERM ends pytest through SystemExit: atexit stops the qemus.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
REASON = None if ENABLED else "the VM tier runs with AUTODEPLOY_VM_TESTS=1 (tests/vm/run.sh, .ci/run)"
if REASON is None:
    REASON = harness.missing_prerequisites()
    if REASON is not None and os.environ.get("CI", "").lower() == "true":
        raise pytest.UsageError(f"AUTODEPLOY_VM_TESTS=1 under CI, but the VM tier cannot run: {REASON}")


# Rough seconds per scenario under TCG (for splitting the tier between two
# runners side by side: longest first, each to the less loaded runner).
WEIGHTS = {
    "test_switch_deploy": 50, "test_boot_deploy_reboot_and_verify": 160, "test_boot_counting_fallback": 160,
    "test_kexec_deploy": 210, "test_unhealthy_after_reboot_rolls_back_and_reboots": 190,
    "test_stop_during_realise_is_a_stop": 35, "test_activation_killed_by_sigterm_is_not_a_success": 45,
    "test_loader_variables_after_kexec_are_not_evidence": 270, "test_loader_entry_default_pattern_fallback": 150,
    "test_module_units_boot_check_keeps_boot_unblessed_and_rolls_back": 350,
    "test_manual_choice_in_the_boot_menu": 170, "test_power_loss_during_boot_activation_converges": 170,
    # Measured on a loaded machine (load 4-6 on 2 cores), scaled by the
    # older scenarios' ratio (about 1.6x their weights there).
    "test_power_loss_during_realise_converges": 135,
    "test_stop_during_activation_is_a_stop_and_the_next_run_converges": 50,
    "test_suspend_holds_a_staged_reboot": 140, "test_reboot_window_defers_a_rollback_reboot": 220,
}


def pytest_addoption(parser):
    parser.addoption("--vm-shard", default=None, metavar="I/N",
                     help="VM tier: run only the I-th (1-based) of N shares of the scenarios")


def pytest_configure(config):
    config.addinivalue_line("markers", "vm: a scenario of the VM tier (tests/vm/)")


def shard(items: list, index: int, count: int) -> list:
    loads = [0.0] * count
    mine = []
    for item in sorted(items, key=lambda i: -WEIGHTS.get(i.name, 120)):
        runner = loads.index(min(loads))
        loads[runner] += WEIGHTS.get(item.name, 120)
        if runner == index:
            mine.append(item)
    return mine


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--vm-shard")
    if spec:
        index, count = (int(x) for x in spec.split("/"))
        ours = [i for i in items if Path(str(i.fspath)).parent == Path(__file__).parent]
        keep = set(map(id, shard(ours, index - 1, count)))
        deselected = [i for i in ours if id(i) not in keep]
        items[:] = [i for i in items if id(i) in keep or i not in ours]
        config.hook.pytest_deselected(items=deselected)
    if REASON is None:
        return
    skip = pytest.mark.skip(reason=f"VM tier: {REASON}")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pointer_server():
    servers: list[harness.PointerServer] = []

    def make(cache: Path) -> harness.PointerServer:
        if not servers:
            servers.append(harness.PointerServer(cache))
        return servers[0]

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="session")
def base(pointer_server):
    return harness.ensure_base(pointer_server)


@pytest.fixture(scope="session")
def tier_log():
    """One line per scenario: wall time, boots through the firmware, kexecs."""
    path = harness.WORKDIR / "scenarios.log"
    yield path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    vm = getattr(item, "_vm_machine", None)
    if vm is None:
        return
    try:
        if vm.qemu is not None and vm.qemu.alive():
            journal = vm.sh("journalctl -b --no-pager -o short-monotonic -u nixos-autodeploy.service "
                            "-u nixos-autodeploy-activation.service -u nixos-autodeploy-check-boot.service "
                            "| tail -n 150", timeout=60, check=False).out
            report.sections.append(("agent journal (this boot)", journal))
    except Exception as exc:  # noqa: BLE001 - the report must not fail
        report.sections.append(("agent journal", f"unavailable: {exc}"))
    for name, lines in (("harness.log", 80), ("console.log", 150)):
        path = vm.dir / name
        if path.exists():
            text = path.read_text(errors="replace").splitlines()
            report.sections.append((f"{name} (last {lines} lines, {path})", "\n".join(text[-lines:])))
    agent_logs = vm.dir / "agent-runs.log"
    if agent_logs.exists():
        report.sections.append(("agent runs", agent_logs.read_text(errors="replace")[-12000:]))


@pytest.fixture
def vm(request, base, pointer_server, tmp_path_factory):
    """A guest resumed from the base state (running stand-in `a`, blessed),
    with the current autodeploy.py at /root/autodeploy.py."""
    import scenario
    server = pointer_server(base.systems.cache)
    server.routes.clear()
    name = request.node.name.replace("[", "-").replace("]", "")
    directory = harness.WORKDIR / "runs" / name
    started = time.monotonic()
    machine = harness.new_machine(base, directory, name, {harness.CACHE_HOST: server.port})
    request.node._vm_machine = machine
    guest = scenario.Guest(machine, base.systems, server)
    guest.install_agent()
    yield guest
    machine.close()
    wall = time.monotonic() - started
    rep = "kept"
    line = (f"{name}: {wall:.0f}s, {machine.boots} boots through the firmware, {machine.kexecs} kexecs; "
            f"logs in {directory}\n")
    with open(harness.WORKDIR / "scenarios.log", "a") as f:
        f.write(time.strftime("%H:%M:%S ") + line)
    print("\n" + line.strip(), file=sys.stderr)
    del rep
