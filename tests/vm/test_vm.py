"""The VM tier: the unchanged autodeploy.py inside a guest with real systemd
(PID 1), systemd-boot with boot counting, OVMF, real reboots and kexec.

Every scenario starts from the saved base state: the guest runs the stand-in
system `a` (booted through the firmware, its boot entry blessed).  Systems
`b`, `c` boot and pass the health check; `broken` never comes up (its init
exits: kernel panic); `unhealthy` boots and fails the scenarios' health check.

Run with AUTODEPLOY_VM_TESTS=1 (tests/vm/run.sh [-k NAME]); see README.md,
"Development".
"""

from __future__ import annotations

import pytest

from scenario import Guest

pytestmark = pytest.mark.vm


def track_a(vm: Guest, *args: str) -> None:
    """The agent adopts what runs (a), the starting point of every deploy."""
    vm.point("a")
    vm.configure(*args)
    assert vm.run_agent() == 0, vm.last_journal
    assert vm.state()["deployed"] == vm.systems["a"]


def test_switch_deploy(vm: Guest) -> None:
    track_a(vm)
    b = vm.point("b")
    assert vm.run_agent() == 0, vm.last_journal
    assert vm.current() == b and vm.profile() == b
    assert vm.booted() == vm.systems["a"]
    state = vm.state()
    assert state["deployed"] == b and state["last_state"] == "deployed", state
    # The activation ran in its own transient unit, marked as the agent's.
    log = vm.sh("cat /var/lib/standin/activations.log").out
    assert f"{b} switch marker=1" in log, log
    # switch-to-configuration switch made b the boot default (counted entry).
    entry = vm.entry_of("b")
    assert entry is not None and entry.endswith("+3.conf"), vm.entries()


def test_boot_deploy_reboot_and_verify(vm: Guest) -> None:
    """-s boot -r reboot: the agent's own `systemctl reboot`, systemd-boot
    boots the new entry (one try used), systemd-bless-boot blesses it, and
    the next run verifies the booted system."""
    track_a(vm, "-s", "boot", "-r", "reboot")
    b = vm.point("b")
    old_boot = vm.m.boot_id
    vm.start_agent()
    vm.reboot_and_wait()
    assert vm.m.boot_id != old_boot
    vm.agent_log_after_boot()
    assert vm.booted() == b and vm.current() == b
    # The firmware boot selected b's counted entry (the ID as it was at boot).
    selected = vm.loader_variable("LoaderEntrySelected") or ""
    assert selected.startswith(vm.entry_id("b") + "+"), selected
    # Blessed by systemd-bless-boot after boot-complete.target: no counter.
    assert vm.entry_of("b") is not None and "+" not in vm.entry_of("b"), vm.entries()
    state = vm.state()
    assert state["deployed"] == b and state["verified"] is False, state
    assert vm.run_agent() == 0, vm.last_journal
    state = vm.state()
    assert state["verified"] is True and state["last_state"] == "deployed", state
    assert "healthy after the reboot" in vm.last_journal
    assert vm.run_agent() == 0
    assert vm.state()["last_state"] == "up_to_date"


def test_boot_counting_fallback(vm: Guest) -> None:
    """A staged system that never comes up: systemd-boot counts the try down,
    the next boot skips the exhausted entry and boots a again; the agent
    reports boot_failed once, puts profile and boot default back on a and
    quarantines the broken system."""
    track_a(vm, "-s", "boot", "-r", "reboot")
    vm.sh("echo 1 > /var/lib/standin/boot-tries")  # boot.loader.systemd-boot.bootCounting.tries = 1
    broken = vm.point("broken")
    vm.start_agent()
    # The agent reboots; the broken system's init exits (panic, reset); the
    # firmware boots again and systemd-boot falls back to a.
    reason = vm.m.wait_reset(300)
    assert reason == "guest-reset", reason
    vm.m.wait_boots(1)
    vm.m.wait_ready(300)
    vm.m.wait_running()
    assert vm.booted() == vm.systems["a"]
    exhausted = vm.entry_of("broken")
    assert exhausted is not None and exhausted.endswith("+0-1.conf"), vm.entries()
    assert "never comes up" in (vm.m.dir / "console.log").read_text(errors="replace")
    status = vm.run_agent()
    assert status == 5, vm.last_journal
    state = vm.state()
    assert state["last_state"] == "boot_failed", state
    assert state["quarantined"] == broken and state["boot_failures_total"] == 1, state
    assert vm.profile() == vm.systems["a"]
    # Reported once: the next run is quiet (quarantined upstream, up to date).
    assert vm.run_agent() == 0, vm.last_journal
    state = vm.state()
    assert state["boot_failures_total"] == 1 and state["last_state"] != "boot_failed", state
    assert vm.metrics().get("nixos_autodeploy_boot_failures_total") == 1


def test_kexec_deploy(vm: Guest) -> None:
    """-s boot -r kexec: the new system runs after a kexec (no firmware)."""
    track_a(vm, "-s", "boot", "-r", "kexec")
    b = vm.point("b")
    old_boot = vm.m.boot_id
    vm.start_agent()
    vm.m.wait_kexec(old_boot, timeout=400)
    vm.m.wait_running()
    vm.agent_log_after_boot()
    assert vm.booted() == b and vm.current() == b
    assert vm.m.boots == 0  # resumed, then only kexec: no firmware boot
    assert vm.run_agent() == 0, vm.last_journal
    state = vm.state()
    assert state["deployed"] == b and state["verified"] is True and state["last_state"] == "deployed", state


def test_unhealthy_after_reboot_rolls_back_and_reboots(vm: Guest) -> None:
    """A boot deploy of a system that boots but fails its health check: the
    run after the reboot rolls the profile back to a, stages it and reboots
    into it."""
    track_a(vm, "-s", "boot", "-r", "reboot")
    bad = vm.point("unhealthy")
    vm.start_agent()
    vm.reboot_and_wait()
    assert vm.booted() == bad
    vm.start_agent()  # verify: fails, rolls back, reboots
    vm.reboot_and_wait()
    vm.agent_log_after_boot()
    assert vm.booted() == vm.systems["a"] and vm.profile() == vm.systems["a"]
    state = vm.state()
    assert state["quarantined"] == bad and state["rollbacks_total"] == 1, state
    assert vm.run_agent() == 0, vm.last_journal
    assert vm.state()["deployed"] == vm.systems["a"]
