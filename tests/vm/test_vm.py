"""The VM tier: the unchanged autodeploy.py inside a guest with real systemd
(PID 1), systemd-boot with boot counting, OVMF, real reboots and kexec.

Every scenario starts from the saved base state: the guest runs the stand-in
system `a` (booted through the firmware, its boot entry blessed).  Systems
`b`, `c` boot and pass the health check; `broken` never comes up (its init
exits: kernel panic); `unhealthy` boots and fails the scenarios' health check.

Run with AUTODEPLOY_VM_TESTS=1 (tests/vm/run.sh [-k NAME]); see
docs/development/tests.md.
"""

from __future__ import annotations

import time

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
    vm.m.follow_resets(2)
    vm.m.wait_ready(300)
    assert vm.m.boots == 2
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


# ---------------------------------------------------------------------------
# Facts of real systemd that the stand-ins of the other tiers do not model.
# Each scenario asserts the correct behaviour; where the agent does not
# handle the fact yet, it is marked xfail with what is missing.
# ---------------------------------------------------------------------------


def test_stop_during_realise_is_a_stop(vm: Guest) -> None:
    """`systemctl stop nixos-autodeploy` while nix downloads: systemd sends
    SIGTERM to every process of the unit (nix included).  A stop is not a
    failed deploy: nothing changes, nothing is quarantined, the next run
    deploys."""
    track_a(vm)
    b = vm.point("b")
    vm.server.cache_delay = 4.0  # every cache file takes 4 s: the realise takes a while
    vm.start_agent()
    vm.sh("for i in $(seq 600); do pgrep -f '[n]ix-store --realise' >/dev/null && exit 0; sleep 0.1; done; exit 1",
          timeout=90)
    vm.sh("systemctl stop nixos-autodeploy.service")
    vm.server.cache_delay = 0.0
    status = int(vm.sh("systemctl show -p ExecMainStatus --value nixos-autodeploy.service").out.strip())
    journal = vm.sh("journalctl -b --no-pager -o cat -u nixos-autodeploy.service").out
    (vm.m.dir / "agent-runs.log").open("a").write(f"--- stopped run, exit {status}\n{journal}\n")
    state = vm.state()
    assert vm.profile() == vm.systems["a"] and vm.current() == vm.systems["a"]
    assert state.get("quarantined") != b, state
    assert status == 0 and state.get("last_state") not in ("failed", "deploy_failed", "rolled_back"), (status, state)
    assert vm.run_agent() == 0, vm.last_journal
    assert vm.current() == b


def test_activation_killed_by_sigterm_is_not_a_success(vm: Guest) -> None:
    """The activation unit's main process killed by SIGTERM (as a shutdown
    does): `systemd-run --wait` exits 0 (systemd counts SIGTERM as a clean
    exit).  The agent must not record b as deployed while a still runs."""
    track_a(vm)
    b = vm.point("b")
    vm.sh(f"echo {b} > /var/lib/standin/hang")  # b's switch-to-configuration waits before switching
    vm.start_agent()
    vm.wait_unit_state("nixos-autodeploy-activation.service", {"active"}, timeout=180)
    vm.sh("systemctl kill --kill-who=main --signal=SIGTERM nixos-autodeploy-activation.service")
    vm.wait_unit_state("nixos-autodeploy.service", {"inactive", "failed"}, timeout=180)
    vm.sh("rm -f /var/lib/standin/hang")
    status = int(vm.sh("systemctl show -p ExecMainStatus --value nixos-autodeploy.service").out.strip())
    journal = vm.sh("journalctl -b --no-pager -o cat -u nixos-autodeploy.service "
                    "-u nixos-autodeploy-activation.service").out
    (vm.m.dir / "agent-runs.log").open("a").write(f"--- run with the killed activation, exit {status}\n{journal}\n")
    assert vm.current() == vm.systems["a"]  # the activation never switched
    state = vm.state()
    assert not (state.get("deployed") == b and state.get("last_state") == "deployed"), (status, state)
    assert vm.profile() == vm.systems["a"], state


def test_loader_variables_after_kexec_are_not_evidence(vm: Guest) -> None:
    """b is staged; the operator kexecs into the running system a.  Every
    Loader* variable still describes the firmware boot before the kexec (the
    default, pinned with `bootctl set-default`, equals the entry selected
    then), so they say nothing about who chose this boot: the agent must not
    report that the boot loader booted its default entry."""
    track_a(vm, "-s", "boot")
    selected = vm.loader_variable("LoaderEntrySelected")
    assert selected and selected.startswith(vm.entry_id("a")), selected
    vm.sh(f"bootctl set-default {selected}")
    vm.point("b")
    assert vm.run_agent() == 0, vm.last_journal
    # A firmware boot (systemd-boot's EFI handover) is no kexec to the kernel.
    assert vm.sh("od -An -tx1 -j 528 -N 1 /sys/kernel/boot_params/data").out.strip() != "d0"
    a = vm.systems["a"]
    old = vm.m.boot_id
    vm.sh(f"kexec --load {a}/kernel --initrd={a}/initrd --append=\"$(cat {a}/kernel-params) init={a}/init\"")
    vm.sh_nowait("systemctl kexec")
    vm.m.wait_kexec(old, timeout=400)
    vm.m.wait_running()
    # The fact: the variables did not change with the kexec.
    assert vm.loader_variable("LoaderEntrySelected") == selected
    assert vm.loader_variable("LoaderEntryDefault") == selected
    # What the guest has to tell this boot from the firmware boot: systemd-boot
    # 252 sets no LoaderTime* here (no usable TSC under emulation), so the
    # kernel's boot parameters (type_of_loader 0xD0: kexec) say it.
    facts = vm.sh("ls /sys/firmware/efi/efivars | grep 4a67b082 | cut -d- -f1 | sort | tr '\\n' ' '; echo; "
                  "od -An -tx1 -j 528 -N 1 /sys/kernel/boot_params/data").out
    with open(vm.m.dir / "agent-runs.log", "a") as f:
        f.write(f"--- Loader* variables and type_of_loader after the kexec\n{facts}\n")
    assert facts.split("\n")[1].strip() == "d0", facts
    assert vm.run_agent() == 0, vm.last_journal
    state = vm.state()
    failure = state.get("boot_failure") or {}
    assert failure.get("choice") != "loader", state
    assert "booted its default entry" not in vm.last_journal, vm.last_journal
    # The operator chose a: b is no failed boot and stays staged.
    assert state["last_state"] == "booted_previous" and state.get("boot_failures_total", 0) == 0, state
    assert vm.profile() == vm.systems["b"] and state.get("quarantined") is None, state


def test_loader_entry_default_pattern_fallback(vm: Guest) -> None:
    """`bootctl set-default 'nixos-*'`: LoaderEntryDefault is a pattern, not an
    entry ID.  A boot-counting fallback must still be reported as the boot
    loader's (boot_failed), never as a manual choice."""
    track_a(vm, "-s", "boot", "-r", "reboot")
    vm.sh("bootctl set-default 'nixos-*' && echo 1 > /var/lib/standin/boot-tries")
    broken = vm.point("broken")
    vm.start_agent()
    vm.m.follow_resets(2)
    vm.m.wait_ready(300)
    vm.m.wait_running()
    assert vm.loader_variable("LoaderEntryDefault") == "nixos-*"
    selected = vm.loader_variable("LoaderEntrySelected") or ""
    assert selected.startswith(vm.entry_id("a")), selected
    assert vm.run_agent() == 5, vm.last_journal
    state = vm.state()
    assert state["last_state"] == "boot_failed" and state["quarantined"] == broken, state
    assert (state.get("boot_failure") or {}).get("choice") == "loader", state


# ---------------------------------------------------------------------------
# The units module.nix renders, loaded by real systemd
# ---------------------------------------------------------------------------

MODULE_SETTINGS = """switchMode = "boot"; rebootMode = "reboot";
    healthChecks = [ "test ! -e /run/current-system/unhealthy" ];
    bootAssessment = { enable = true; wait = 5; };"""


@pytest.fixture(scope="session")
def module_rendered(tmp_path_factory):
    import scenario
    from nixpkgs_lib import find_nixpkgs_lib, skip_or_fail
    lib, why = find_nixpkgs_lib()
    if lib is None:
        skip_or_fail(why)
    return scenario.module_units(MODULE_SETTINGS, tmp_path_factory.mktemp("module"))


def test_module_units_boot_check_keeps_boot_unblessed_and_rolls_back(vm: Guest, module_rendered) -> None:
    """The module's units in real systemd: `systemd-analyze verify` accepts
    them; after a boot deploy the boot check (RequiredBy and Before
    boot-complete.target) fails on the unhealthy system, so
    systemd-bless-boot does not bless its entry; the agent's next run rolls
    back to a and reboots into it.  The trigger a manual switch starts
    starts the agent."""
    import scenario
    names = scenario.install_module_units(vm, module_rendered)
    assert "nixos-autodeploy-boot-check.service" in names, names
    paths = " ".join(f"/etc/systemd/system/{n}" for n in names)
    verify = vm.sh(f"systemd-analyze verify {paths} 2>&1", check=False)
    assert verify.rc == 0 and "nixos-autodeploy" not in verify.out, verify.out
    # A manual switch starts the trigger (NixOS: through the activation's
    # restart list), which starts the agent without waiting for it.
    vm.point("a")
    vm.sh("systemctl start nixos-autodeploy-trigger.service")
    vm.sh("for i in $(seq 300); do test -s /var/lib/nixos-autodeploy/state.json && "
          "! systemctl -q is-active nixos-autodeploy.service && exit 0; sleep 0.5; done; exit 1", timeout=200)
    assert vm.state()["deployed"] == vm.systems["a"]
    vm.sh("echo 1 > /var/lib/standin/boot-tries")
    bad = vm.point("unhealthy")
    vm.start_agent()
    assert vm.reboot_and_wait() and vm.booted() == bad
    vm.agent_log_after_boot()
    check = vm.sh("systemctl is-failed nixos-autodeploy-boot-check.service; "
                  "systemctl show -p ActiveState --value systemd-bless-boot.service", check=False).out.split()
    assert check[0] == "failed", check
    entry = vm.entry_of("unhealthy")
    assert entry is not None and entry.endswith("+0-1.conf"), vm.entries()  # tried, not blessed
    vm.start_agent()  # the boot check failed during this boot: roll back, reboot
    vm.reboot_and_wait()
    vm.agent_log_after_boot()
    assert vm.booted() == vm.systems["a"] and vm.profile() == vm.systems["a"]
    state = vm.state()
    assert state["quarantined"] == bad, state
    assert "boot assessment failed" in (state.get("quarantine_reason") or ""), state


# ---------------------------------------------------------------------------
# The operator and the power supply
# ---------------------------------------------------------------------------


def test_manual_choice_in_the_boot_menu(vm: Guest) -> None:
    """b is staged (its entry the default, pinned with `bootctl set-default`);
    the operator boots a once (`bootctl set-oneshot`, as picking it in the
    menu does).  systemd-boot says so: LoaderEntrySelected (a) differs from
    LoaderEntryDefault (b).  The agent reports booted_previous, counts no
    failure, quarantines nothing and leaves b the default."""
    track_a(vm, "-s", "boot")
    b = vm.point("b")
    assert vm.run_agent() == 0, vm.last_journal
    b_entry, a_entry = vm.entry_of("b"), vm.entry_of("a")
    vm.sh(f"bootctl set-default {b_entry} && bootctl set-oneshot {a_entry}")
    vm.sh_nowait("systemctl reboot")
    vm.reboot_and_wait()
    assert vm.booted() == vm.systems["a"]
    assert vm.loader_variable("LoaderEntrySelected") == a_entry
    assert vm.run_agent() == 0, vm.last_journal
    state = vm.state()
    assert state["last_state"] == "booted_previous", state
    assert state.get("boot_failures_total", 0) == 0 and state.get("quarantined") != b, state
    assert vm.profile() == b and vm.entry_of("b") == b_entry


def test_power_loss_during_boot_activation_converges(vm: Guest) -> None:
    """Power loss (qemu killed) while `switch-to-configuration boot` of b
    runs: the host boots again through the firmware, and the agent's next
    runs converge: b staged, profile and record on it, no intent left."""
    track_a(vm, "-s", "boot")
    b = vm.point("b")
    vm.sh(f"echo {b} > /var/lib/standin/hang && sync")
    vm.start_agent()
    vm.wait_unit_state("nixos-autodeploy-activation.service", {"active"}, timeout=180)
    vm.m.power_loss()
    vm.m.start()
    vm.m.wait_running()
    assert vm.booted() == vm.systems["a"]
    vm.sh("rm -f /var/lib/standin/hang")
    store = vm.sh(f"ls -la {b}/ ; nix-store --verify-path {b} 2>&1; echo verify-path=$?", check=False).out
    with open(vm.m.dir / "agent-runs.log", "a") as f:
        f.write(f"--- b in the store after the power loss\n{store}\n")
    for _ in range(3):
        vm.run_agent()
        state = vm.state()
        if state.get("deployed") == b and not state.get("intent"):
            break
    assert state.get("deployed") == b and not state.get("intent") and not state.get("dirty"), state
    assert vm.profile() == b and vm.entry_of("b") is not None, vm.entries()
    assert state.get("quarantined") != b, state
    assert vm.sh(f"nix-store --verify-path $(nix-store --query --requisites {b})", check=False).rc == 0


def test_power_loss_during_realise_converges(vm: Guest) -> None:
    """Power loss while nix downloads b's closure (a boot deploy): after the
    firmware boot the next runs realise what is missing, repair what nix
    registered but never wrote, and stage b."""
    track_a(vm, "-s", "boot")
    b = vm.point("b")
    vm.server.cache_delay = 3.0
    vm.start_agent()
    vm.sh("for i in $(seq 600); do pgrep -f '[n]ix-store --realise' >/dev/null && exit 0; sleep 0.1; done; exit 1",
          timeout=90)
    time.sleep(4)  # some paths in, some not
    vm.m.power_loss()
    vm.server.cache_delay = 0.0
    vm.m.start()
    vm.m.wait_running()
    assert vm.booted() == vm.systems["a"]
    for _ in range(3):
        vm.run_agent()
        state = vm.state()
        if state.get("deployed") == b and not state.get("intent"):
            break
    assert state.get("deployed") == b and state.get("last_state") == "pending_reboot", state
    assert state.get("quarantined") != b and vm.profile() == b, state
    assert vm.sh(f"nix-store --verify-path $(nix-store --query --requisites {b})", check=False).rc == 0


def test_stop_during_activation_is_a_stop_and_the_next_run_converges(vm: Guest) -> None:
    """`systemctl stop nixos-autodeploy` while b's activation runs (in its
    own unit): systemd sends SIGTERM to the agent and to systemd-run, not to
    the activation, which runs on.  The stop is no failed deploy: nothing
    rolled back or quarantined; the next run finds b active and records it."""
    track_a(vm)
    b = vm.point("b")
    vm.sh(f"echo {b} > /var/lib/standin/hang")
    vm.start_agent()
    vm.wait_unit_state("nixos-autodeploy-activation.service", {"active"}, timeout=180)
    vm.sh("systemctl stop nixos-autodeploy.service")
    status = int(vm.sh("systemctl show -p ExecMainStatus --value nixos-autodeploy.service").out.strip())
    journal = vm.sh("journalctl -b --no-pager -o cat -u nixos-autodeploy.service").out
    with open(vm.m.dir / "agent-runs.log", "a") as f:
        f.write(f"--- stopped run, exit {status}\n{journal}\n")
    assert vm.sh("systemctl is-active nixos-autodeploy-activation.service", check=False).out.strip() == "active"
    state = vm.state()
    assert status == 0, (status, journal)
    assert state.get("last_state") not in ("failed", "deploy_failed", "rolled_back"), state
    assert state.get("quarantined") != b and state.get("rollbacks_total", 0) == 0, state
    vm.sh("rm -f /var/lib/standin/hang")
    assert vm.run_agent() == 0, vm.last_journal
    state = vm.state()
    assert vm.current() == b and vm.profile() == b, state
    assert state["deployed"] == b and state["verified"] is True and not state.get("intent"), state
    assert "is active and healthy: recording it" in vm.last_journal, vm.last_journal
    assert state.get("rollbacks_total", 0) == 0 and state["deploys_total"] == 1, state


def test_suspend_holds_a_staged_reboot(vm: Guest) -> None:
    """b is staged; the operator suspends the agent: its runs observe and
    report, and do not reboot.  After `resume` the next run reboots into b."""
    track_a(vm, "-s", "boot")
    b = vm.point("b")
    assert vm.run_agent() == 0, vm.last_journal
    assert vm.state()["last_state"] == "pending_reboot"
    vm.sh("/usr/bin/python3 /root/autodeploy.py suspend --reason 'vm tier: change freeze'")
    vm.configure("-s", "boot", "-r", "reboot")
    boot = vm.m.boot_id
    assert vm.run_agent() == 0, vm.last_journal
    assert vm.m.boot_id == boot and vm.sh("cat /proc/sys/kernel/random/boot_id").out.strip() == boot
    state = vm.state()
    assert vm.profile() == b and vm.current() == vm.systems["a"], state
    assert "rebooting" not in vm.last_journal, vm.last_journal
    vm.sh("/usr/bin/python3 /root/autodeploy.py resume")
    vm.start_agent()
    vm.reboot_and_wait()
    vm.agent_log_after_boot()
    assert vm.booted() == b
    assert vm.run_agent() == 0, vm.last_journal
    assert vm.state()["verified"] is True and vm.state()["deployed"] == b


def test_reboot_window_defers_a_rollback_reboot(vm: Guest) -> None:
    """The booted release fails its health check outside the reboot window:
    the profile and boot default go back to a at once, the reboot into a
    waits (no reboot, however often the agent runs) until the window opens."""
    track_a(vm, "-s", "boot", "-r", "reboot")
    bad = vm.point("unhealthy")
    vm.start_agent()
    vm.reboot_and_wait()
    vm.agent_log_after_boot()
    assert vm.booted() == bad
    hour = int(vm.sh("date +%H").out.strip())
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"
    vm.configure("-s", "boot", "-r", "reboot", "--reboot-window", closed)
    boot = vm.m.boot_id
    assert vm.run_agent() == 5, vm.last_journal  # verify fails: rolled back, the reboot waits
    state = vm.state()
    assert state["rollback_of"] == bad and state["quarantined"] == bad, state
    assert state["reboot_window_wait"] is True and vm.profile() == vm.systems["a"], state
    assert vm.run_agent() == 0, vm.last_journal  # still outside the window: nothing, no reboot
    assert vm.sh("cat /proc/sys/kernel/random/boot_id").out.strip() == boot
    assert vm.state()["rollback_of"] == bad and vm.state()["reboot_window_wait"] is True
    vm.configure("-s", "boot", "-r", "reboot")  # the window opens
    vm.start_agent()
    vm.reboot_and_wait()
    vm.agent_log_after_boot()
    assert vm.booted() == vm.systems["a"]
    assert vm.run_agent() == 0, vm.last_journal
    state = vm.state()
    # (rollback_of keeps naming the failed release until the next deploy
    # records anew; it only counts while the host does not run `deployed`.)
    assert state["deployed"] == vm.systems["a"] == vm.current() and state["quarantined"] == bad, state
