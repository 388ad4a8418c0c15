"""A bad system never strands a host (issue #13), against real nix:
boot-loader fallback reported as a failure exactly once, the boot assessment
(`check-boot`), /boot space before the boot loader is touched, the deploy
history, and the metrics the new alerts use.

Boot-loader fallback is simulated the way the test world simulates every
reboot: `host.reboot()` boots the stand-in boot loader's default (which the
test sets back to the previous system, as systemd-boot does once the staged
entry has run out of tries) and gives the host a new boot ID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from util import (LOADER_GUID, MiB, assert_host, boot_default, efivars, fall_back, fill_leaving, hook_script,
                  promtool_ok, quarantined, read_env, stage, state_gauge)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autodeploy as ad  # noqa: E402

# ---------------------------------------------------------------------------
# Item 2: fallback is a failure, loudly, exactly once
# ---------------------------------------------------------------------------


def test_fallback_is_a_failure_reported_exactly_once(host, world, server):
    a, b = world.path("a"), world.path("b")
    failed, ok = hook_script(host, "failed"), hook_script(host, "ok")
    hooks = ("--on-failure", failed, "--on-success", ok)
    stage(host, b, "--reboot-mode", "reboot", *hooks)
    assert host.calls().count("systemctl reboot") == 1
    fall_back(host, a)

    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot", *hooks)
    assert r.returncode == 5, r.stderr
    assert "BOOT FAILED" in r.stderr and "boot loader fallback" in r.stderr
    # Profile and boot default are back on what runs; b is quarantined.
    assert_host(host, current=a, profile=a, deployed=a)
    assert boot_default(host) == a
    assert host.activations()[-1] == f"{a} boot marker=1"
    assert quarantined(host) == {f'nixos_autodeploy_quarantined{{path="{b}"}}': 1}
    m = host.metrics()
    assert state_gauge(host) == "boot_failed"
    assert m["nixos_autodeploy_last_run_success"] == 0
    assert m["nixos_autodeploy_boot_failures_total"] == 1
    assert m["nixos_autodeploy_reboot_required"] == 0
    assert any(k.startswith('nixos_autodeploy_last_error_info{kind="boot_failed"') for k in m)
    env = read_env(host, "failed")
    assert env["NIXOS_AUTODEPLOY_OUTCOME"] == "boot_failed" and env["NIXOS_AUTODEPLOY_ERROR_KIND"] == "boot_failed"
    assert env["NIXOS_AUTODEPLOY_NEW_SYSTEM"] == b and env["NIXOS_AUTODEPLOY_OLD_SYSTEM"] == a
    assert env["NIXOS_AUTODEPLOY_EXIT_CODE"] == "5"
    failure = host.state()["boot_failure"]
    assert failure["path"] == b and failure["booted"] == a and failure["choice"] == "unknown"
    promtool_ok(host)
    status = json.loads(host.agent("status", "--json").stdout)
    assert status["boot_failure"]["path"] == b
    assert "boot failure" in host.agent("status").stdout

    # Exactly once: later cycles are quiet (quarantined), no hook, no reboot, no second count.
    (host.root / "failed.env").unlink()
    (host.root / "ok.env").unlink()  # written by the staging deploy
    for _ in range(2):
        r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot", *hooks)
        assert r.returncode == 0, r.stderr
        assert state_gauge(host) == "quarantined"
        assert host.metrics()["nixos_autodeploy_boot_failures_total"] == 1
        assert host.metrics()["nixos_autodeploy_last_run_success"] == 1
    assert read_env(host, "failed") == {} and read_env(host, "ok") == {}
    assert host.calls().count("systemctl reboot") == 1
    assert_host(host, current=a, profile=a, deployed=a)
    assert boot_default(host) == a


def test_fallback_is_reported_before_a_newer_upstream_is_deployed(host, world, server):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    stage(host, b)
    fall_back(host, a)
    server.pointer(c)  # CI published the fix meanwhile
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 5, r.stderr
    assert state_gauge(host) == "boot_failed" and not host.store_has(c)
    assert_host(host, current=a, profile=a, deployed=a)
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert state_gauge(host) == "pending_reboot" and host.profile == c and boot_default(host) == c
    # Upstream moved on from b: its quarantine is lifted, the failure stays on record.
    assert host.state()["quarantined"] is None and host.state()["boot_failure"]["path"] == b


def test_no_reboot_yet_is_not_a_failure_even_without_the_runtime_marker(host, world, server):
    """The module's unit removes /run/nixos-autodeploy (its RuntimeDirectory)
    after every run: the boot ID, not the marker, tells that no reboot happened."""
    a, b = world.path("a"), world.path("b")
    stage(host, b)
    (host.run_dir / "nixos-autodeploy" / "staged").unlink()
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert state_gauge(host) == "pending_reboot"
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 1
    assert host.profile == b and host.current == a and host.state().get("quarantined") is None


def test_manual_choice_in_the_boot_menu_is_told_apart(host, world, server):
    a, b = world.path("a"), world.path("b")
    stage(host, b)
    fall_back(host, a)
    host.ctl("boot-default").write_text(b + "\n")  # a human picked a in the menu; the default is still b
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-generation-1.conf", "nixos-generation-2.conf")}
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 0, r.stderr
    assert state_gauge(host) == "booted_previous"
    assert "picked by hand" in r.stderr
    assert host.profile == b and boot_default(host) == b  # the staged system stays the default
    assert host.state().get("quarantined") is None
    assert host.metrics()["nixos_autodeploy_boot_failures_total"] == 0


def test_boot_loader_that_booted_its_default_is_a_fallback(host, world, server):
    a, b = world.path("a"), world.path("b")
    stage(host, b)
    fall_back(host, a)
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-generation-1.conf", "nixos-generation-1.conf")}
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 5, r.stderr
    assert state_gauge(host) == "boot_failed"
    assert host.state()["boot_failure"]["choice"] == "loader"
    assert host.profile == a and boot_default(host) == a


def loader_times(efivars_dir: str, init: str, exec_: str) -> None:
    """systemd-boot's timestamps of a firmware boot (new on every boot)."""
    for name, value in (("LoaderTimeInitUSec", init), ("LoaderTimeExecUSec", exec_)):
        (Path(efivars_dir) / f"{name}-{LOADER_GUID}").write_bytes(
            b"\x06\x00\x00\x00" + (value + "\0").encode("utf-16-le"))


def test_loader_variables_seen_in_an_earlier_boot_are_no_evidence_after_a_kexec(host, world, server):
    """The VM tier's fact: after a kexec every Loader* variable still
    describes the firmware boot before it.  b is staged while the variables
    describe a's firmware boot (its default, so they read as "the boot loader
    booted its default"); then someone kexecs into a.  The same fingerprint
    (timestamps, entry) in another boot says no boot loader ran: the
    operator chose a, so b is no failed boot and stays staged."""
    a, b = world.path("a"), world.path("b")
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-generation-1.conf", "nixos-generation-1.conf")}
    loader_times(env["NIXOS_AUTODEPLOY_EFIVARS"], "5123456", "9876543")
    r = host.once(host.url, env=env)
    assert r.returncode == 0, r.stderr
    assert host.state()["loader_boot"]["fingerprint"] == "5123456 9876543 nixos-generation-1.conf"
    server.pointer(b)
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 0 and state_gauge(host) == "pending_reboot", r.stderr
    fall_back(host, a)  # a kexec into a: a new boot ID, the variables unchanged
    host.ctl("boot-default").write_text(b + "\n")
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 0, r.stderr
    assert state_gauge(host) == "booted_previous", r.stderr
    assert "kexec'ed by someone else" in r.stderr and "booted its default entry" not in r.stderr, r.stderr
    state = host.state()
    assert state.get("boot_failure") is None and state.get("quarantined") is None, state
    assert host.profile == b and boot_default(host) == b


def test_a_new_firmware_boot_with_the_same_entry_is_evidence(host, world, server):
    """The counterpart: the firmware booted again (new timestamps), the boot
    loader chose its default a: a fallback, reported as the boot loader's."""
    a, b = world.path("a"), world.path("b")
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-generation-1.conf", "nixos-generation-1.conf")}
    loader_times(env["NIXOS_AUTODEPLOY_EFIVARS"], "5123456", "9876543")
    assert host.once(host.url, env=env).returncode == 0
    server.pointer(b)
    assert host.once(host.url, "--switch-mode", "boot", env=env).returncode == 0
    fall_back(host, a)
    loader_times(env["NIXOS_AUTODEPLOY_EFIVARS"], "5123999", "9877111")
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 5, r.stderr
    assert state_gauge(host) == "boot_failed" and host.state()["boot_failure"]["choice"] == "loader"
    assert host.state()["loader_boot"]["fingerprint"] == "5123999 9877111 nixos-generation-1.conf"


def boot_params(host, type_of_loader: int) -> None:
    """The host's x86 boot parameters with this type_of_loader (0x210)."""
    params = bytearray(4096)
    params[0x210] = type_of_loader
    (host.root / "boot_params").write_bytes(bytes(params))


def test_a_kernel_started_by_kexec_does_not_read_the_loader_variables(host, world, server):
    """Where systemd-boot sets no timestamps (in a VM without a usable TSC,
    as in the VM tier's guest) the kernel says it: type_of_loader 0xD? in
    the x86 boot parameters is kexec, whoever ran it."""
    a, b = world.path("a"), world.path("b")
    stage(host, b)
    fall_back(host, a)
    host.ctl("boot-default").write_text(b + "\n")
    boot_params(host, 0xD0)
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-generation-1.conf", "nixos-generation-1.conf")}
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 0 and state_gauge(host) == "booted_previous", r.stderr
    assert host.profile == b and host.state().get("boot_failure") is None
    # A boot loader's own type (here systemd-boot's 0xFF... any but 0xD?): the variables count.
    boot_params(host, 0xFF)
    fall_back(host, a)
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 5 and state_gauge(host) == "boot_failed", r.stderr


# ---------------------------------------------------------------------------
# Item 1: the boot assessment (check-boot)
# ---------------------------------------------------------------------------


def check_boot(host, *args: str, timeout: float = 120):
    return host.agent("check-boot", "--url", host.url, *args, timeout=timeout)


def test_a_password_never_masks_the_boot_checks_own_words(host, world, server):
    """Review of #18 (item 9): boot-check.json keeps the agent's own words; only the URL's password is masked."""
    url = host.url.replace("http://", "http://ops:check@").replace("/pointer", "/missing")
    r = host.agent("check-boot", "--url", url, "--wait", "0", timeout=120)
    assert r.returncode == 5, r.stderr
    record = json.loads((host.var_lib / "nixos-autodeploy" / "boot-check.json").read_text())
    assert record["ok"] is False
    assert record["error"].startswith("connectivity check failed: GET http://***@127.0.0.1:"), record
    assert "ops:check" not in record["error"] and "answered HTTP 404" in record["error"]


def test_failed_boot_check_rolls_the_staged_system_back(host, world, server):
    a, b = world.path("a"), world.path("b")
    check = "test ! -e /var/lib/standin/unhealthy"
    stage(host, b)
    host.reboot()  # into b: it boots, but its boot check fails
    assert host.current == b
    host.ctl("unhealthy").write_text("")
    r = check_boot(host, "--health-check", check, "--wait", "0")
    assert r.returncode == 5, r.stderr
    assert "BOOT CHECK FAILED" in r.stderr
    record = json.loads((host.var_lib / "nixos-autodeploy" / "boot-check.json").read_text())
    assert record["ok"] is False and record["system"] == b
    # The agent's own checks pass by now, but the boot was not blessed: roll back.
    host.ctl("unhealthy").unlink()
    r = host.once(host.url, "--switch-mode", "boot", "--health-check", check)
    assert r.returncode == 5, r.stderr
    assert "boot assessment failed" in r.stderr
    assert host.profile == a and boot_default(host) == a
    assert quarantined(host) == {f'nixos_autodeploy_quarantined{{path="{b}"}}': 1}


def test_passing_boot_check_lets_the_agent_verify(host, world, server):
    b = world.path("b")
    stage(host, b)
    host.reboot()
    r = check_boot(host, "--health-check", "test -x /run/current-system/bin/switch-to-configuration")
    assert r.returncode == 0, r.stderr
    assert "boot check passed" in r.stderr
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert "healthy after the reboot" in r.stderr
    assert_host(host, current=b, profile=b, deployed=b)


def test_a_failed_check_of_an_earlier_boot_does_not_count(host, world, server):
    b = world.path("b")
    stage(host, b)
    host.reboot()
    assert check_boot(host, "--health-check", "false", "--wait", "0").returncode == 5
    host.reboot()  # a later boot of b, whose check was not recorded as failed
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert host.state()["deployed"] == b and host.state()["verified"] is True


def test_boot_check_waits_for_the_network_within_bounds(host, world, server):
    server.unreachable = True
    timer = threading.Timer(2.0, lambda: setattr(server, "unreachable", False))
    timer.start()
    try:
        r = check_boot(host, "--wait", "60")
    finally:
        timer.cancel()
    assert r.returncode == 0, r.stderr
    assert "retrying" in r.stderr and "boot check passed" in r.stderr

    server.unreachable = True
    r = check_boot(host, "--wait", "1", timeout=30)
    assert r.returncode == 5, r.stderr
    assert "connectivity check failed" in r.stderr
    r = check_boot(host, "--wait", "0", "--no-connectivity-check", "--health-check", "true")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# Item 3: /boot space before the boot loader is touched
# ---------------------------------------------------------------------------


@pytest.fixture
def boot_host(host):
    yield host
    host.unmount_boot()


def test_full_boot_refuses_a_new_kernel_and_changes_nothing(boot_host, world, server):
    host = boot_host
    b, c, k = world.path("b"), world.path("c"), world.path("k")
    mount = host.mount_boot(16 * MiB)
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    # Named as systemd-boot-builder.py names them: <store dir>-<file>.efi.
    kernel_dir = os.path.basename(os.readlink(host.nix / "store" / os.path.basename(b) / "kernel").rsplit("/", 1)[0])
    copied = sorted(p.name for p in (mount / "EFI" / "nixos").iterdir())
    assert copied == [f"{kernel_dir}-bzImage.efi", f"{kernel_dir}-initrd.efi"], copied

    filler = fill_leaving(mount, 2 * MiB)
    # Same kernel and initrd as b: nothing new for /boot, a full /boot is fine.
    server.pointer(c)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == c and host.metrics()["nixos_autodeploy_boot_needed_bytes"] == 0

    # Another kernel: does not fit with the margin -> exit 5, nothing changed.
    before = sorted(p.name for p in (mount / "EFI" / "nixos").iterdir())
    activations = len(host.activations())
    server.pointer(k)
    r = host.once(host.url)
    assert r.returncode == 5, r.stderr
    assert "/boot has" in r.stderr and "not deploying" in r.stderr
    assert_host(host, current=c, profile=c, deployed=c)
    assert boot_default(host) == c and len(host.activations()) == activations
    assert sorted(p.name for p in (mount / "EFI" / "nixos").iterdir()) == before
    m = host.metrics()
    assert state_gauge(host) == "failed" and m["nixos_autodeploy_last_run_success"] == 0
    assert any(key.startswith('nixos_autodeploy_last_error_info{kind="boot_space"') for key in m)
    assert 0 < m["nixos_autodeploy_boot_free_bytes"] < m["nixos_autodeploy_boot_needed_bytes"]
    assert m["nixos_autodeploy_boot_needed_bytes"] >= ad.BOOT_SPACE_MARGIN_BYTES
    assert host.state().get("quarantined") is None  # room may be made: retried every cycle
    assert host.state()["history"][-1]["error_kind"] == "boot_space"
    promtool_ok(host)

    filler.unlink()
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == k and len(list((mount / "EFI" / "nixos").iterdir())) == 4


def test_the_stand_in_installer_fails_half_way_on_a_full_boot(boot_host, world, server):
    """What the check prevents (nixpkgs #23926): without it, the boot loader
    installer itself runs out of space in the middle of the activation."""
    host = boot_host
    k = world.path("k")
    mount = host.mount_boot(4 * MiB)
    fill_leaving(mount, 0)
    host.sh(f"nix-store --realise {k} >/dev/null")
    r = host.sh(f"{k}/bin/switch-to-configuration boot", check=False)
    assert r.returncode != 0 and "cannot copy" in r.stderr
    assert boot_default(host) != k


def test_grub_layout_counts_boot_kernels(boot_host, world, server):
    host = boot_host
    k = world.path("k")
    mount = host.mount_boot(8 * MiB, layout="grub")
    assert host.once(host.url).returncode == 0
    fill_leaving(mount, 1 * MiB)
    server.pointer(k)
    r = host.once(host.url)
    assert r.returncode == 5 and "/boot has" in r.stderr, r.stderr
    (mount / "filler").unlink()
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    kernel_dir = os.path.basename(os.readlink(host.nix / "store" / os.path.basename(k) / "kernel").rsplit("/", 1)[0])
    assert kernel_dir.endswith("-standin-kernel-6.6")
    names = sorted(p.name for p in (mount / "kernels").iterdir())
    assert names == [f"{kernel_dir}-bzImage", f"{kernel_dir}-initrd"], names


def test_no_separate_boot_means_no_space_check(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    assert host.once(host.url).returncode == 0
    m = host.metrics()
    assert "nixos_autodeploy_boot_free_bytes" not in m and "nixos_autodeploy_boot_needed_bytes" not in m


def test_boot_copy_names_follow_the_installers(tmp_path, monkeypatch):
    """systemd-boot-builder.py: EFI/nixos/<store dir>-<file>.efi (or <store dir>.efi
    for a store path that is the file); install-grub.pl: kernels/<path with / -> ->."""
    store = tmp_path / "nix" / "store"
    kernel_dir = store / ("k" * 32 + "-linux-6.6")
    initrd_dir = store / ("i" * 32 + "-initrd-linux-6.6")
    system = store / ("s" * 32 + "-nixos-system")
    for d in (kernel_dir, initrd_dir, system):
        d.mkdir(parents=True)
    (kernel_dir / "bzImage").write_bytes(b"k" * 1000)
    (initrd_dir / "initrd").write_bytes(b"i" * 500)
    (system / "kernel").symlink_to(kernel_dir / "bzImage")
    (system / "initrd").symlink_to(initrd_dir / "initrd")
    boot = tmp_path / "boot"
    monkeypatch.setattr(ad, "STORE_DIR", str(store))
    monkeypatch.setattr(ad, "BOOT_DIR", str(boot))
    (boot / "EFI" / "nixos").mkdir(parents=True)
    names = [os.path.relpath(dest, boot) for _, dest in ad.boot_copies(str(system))]
    assert names == [f"EFI/nixos/{'k' * 32}-linux-6.6-bzImage.efi", f"EFI/nixos/{'i' * 32}-initrd-linux-6.6-initrd.efi"]
    assert ad.boot_space_needed(str(system)) == 1500
    (boot / names[0]).write_bytes(b"")
    assert ad.boot_space_needed(str(system)) == 500
    assert ad.with_margin(0) == 0 and ad.with_margin(500) == 500 + ad.BOOT_SPACE_MARGIN_BYTES

    grub = tmp_path / "grub-boot"
    monkeypatch.setattr(ad, "BOOT_DIR", str(grub))
    (grub / "grub").mkdir(parents=True)
    assert ad.boot_copies(str(system)) == []  # GRUB reads the kernels from the store
    (grub / "kernels").mkdir()
    names = [os.path.relpath(dest, grub) for _, dest in ad.boot_copies(str(system))]
    assert names == [f"kernels/{'k' * 32}-linux-6.6-bzImage", f"kernels/{'i' * 32}-initrd-linux-6.6-initrd"]


# ---------------------------------------------------------------------------
# Item 4: deployment history
# ---------------------------------------------------------------------------


def test_history_keeps_the_last_20_attempts(host, world, server):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    assert host.once(host.url).returncode == 0
    assert host.state()["history"] == []  # tracking is no deploy attempt
    host.ctl("fail").write_text(b + "\n")
    server.pointer(b)
    assert host.once(host.url).returncode == 5
    server.pointer(c)
    assert host.once(host.url).returncode == 0
    assert host.once(host.url).returncode == 0  # up to date: no attempt
    history = host.state()["history"]
    assert [(e["path"], e["action"], e["outcome"], e["error_kind"]) for e in history] == [
        (b, "switch", "rolled_back", "activation"), (c, "switch", "deployed", None)]
    assert all(e["duration"] >= 0 and e["time"] > 0 for e in history)

    # Bounded: 20 entries, oldest dropped; written atomically with the state.
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    state = json.loads(state_file.read_text())
    state["history"] = [dict(history[0], time=1000.0 + i, revision=i) for i in range(20)]
    state_file.write_text(json.dumps(state))
    server.pointer(a)
    assert host.once(host.url).returncode == 0
    history = host.state()["history"]
    assert len(history) == 20 and history[0]["revision"] == 1 and history[-1]["path"] == a

    status = json.loads(host.agent("status", "--json").stdout)
    assert status["history"] == history
    text = host.agent("status").stdout
    assert "history (last 20 deploy attempts, newest first):" in text
    table = text.split("history (last 20", 1)[1].splitlines()[1:]
    assert table[0].split() == ["time", "action", "outcome", "duration", "revision", "path", "error"]
    assert os.path.basename(a) in table[1] and "deployed" in table[1]
    assert len(table) == 21


def test_history_records_boot_attempts_and_their_verification(host, world, server):
    b = world.path("b")
    stage(host, b)
    host.reboot()
    assert host.once(host.url, "--switch-mode", "boot").returncode == 0
    history = host.state()["history"]
    assert [(e["action"], e["outcome"]) for e in history] == [("boot", "pending_reboot"), ("verify", "deployed")]


# ---------------------------------------------------------------------------
# Item 5: what the alerts read
# ---------------------------------------------------------------------------


def refused(host) -> dict[str, float]:
    return {k: v for k, v in host.metrics().items() if k.startswith("nixos_autodeploy_pointer_refused{")}


def test_pointer_refusals_are_split_by_reason(host, world, server, tmp_path):
    assert host.once(host.url).returncode == 0
    assert set(refused(host).values()) == {0}
    server.set("/html", b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
    assert host.once(server.base + "/html").returncode == 4
    assert refused(host)['nixos_autodeploy_pointer_refused{reason="malformed"}'] == 1
    assert sum(refused(host).values()) == 1

    key = tmp_path / "ci_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    keys = host.root / "trusted.pub"
    keys.write_text((tmp_path / "ci_key.pub").read_text())
    r = host.once(host.url, "--trusted-keys", str(keys))  # no .sig published
    assert r.returncode == 4, r.stderr
    assert refused(host)['nixos_autodeploy_pointer_refused{reason="signature"}'] == 1
    assert sum(refused(host).values()) == 1
    promtool_ok(host)
    assert host.once(host.url).returncode == 0
    assert set(refused(host).values()) == {0}


def test_behind_upstream_and_waiting_for_the_window(host, world, server):
    b = world.path("b")
    stage(host, b)
    m = host.metrics()
    since = m["nixos_autodeploy_behind_upstream_since_timestamp_seconds"]
    assert since > 0 and m["nixos_autodeploy_reboot_window_wait"] == 0
    outside = {"NIXOS_AUTODEPLOY_NOW": "2026-11-22T12:00:00"}
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot", "--reboot-window", "02:00-04:00",
                  env=outside)
    assert r.returncode == 0, r.stderr
    m = host.metrics()
    assert m["nixos_autodeploy_reboot_window_wait"] == 1
    assert m["nixos_autodeploy_behind_upstream_since_timestamp_seconds"] == since  # kept, not reset
    host.reboot()
    assert host.once(host.url, "--switch-mode", "boot").returncode == 0
    m = host.metrics()
    assert m["nixos_autodeploy_behind_upstream_since_timestamp_seconds"] == 0
    assert m["nixos_autodeploy_reboot_window_wait"] == 0


def test_sigkill_while_putting_the_boot_default_back_converges(host, world, server):
    from util import kill, wait_for
    a, b = world.path("a"), world.path("b")
    stage(host, b)
    fall_back(host, a)
    host.ctl("hang-after-nix-env").write_text("")
    proc = host.agent_background("--once", "--url", host.url, "--switch-mode", "boot")
    wait_for(lambda: host.profile == a, what="the profile going back")
    kill(proc)
    host.ctl("hang-after-nix-env").unlink()
    state = host.state()
    assert state["intent"]["phase"] == "rollback" and state["quarantined"] == b
    assert state["boot_failures_total"] == 1 and state["deployed"] == a
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert "interrupted deploy" in r.stderr
    assert_host(host, current=a, profile=a, deployed=a)
    assert boot_default(host) == a
    assert state_gauge(host) == "quarantined"
    assert host.metrics()["nixos_autodeploy_boot_failures_total"] == 1


def exhausted_b_after_falling_back_to_a(host, a: str, b: str) -> None:
    """b staged, the boot loader fell back to a, and b's entry has no tries
    left (`+0-3`)."""
    mount = host.mount_boot(8 * MiB)
    stage(host, b)
    fall_back(host, a)
    entries = mount / "loader" / "entries"
    (entries / "nixos-generation-1.conf").write_text(f"title NixOS\nlinux /x\noptions init={a}/init quiet\n")
    (entries / "nixos-generation-2+0-3.conf").write_text(f"title NixOS\nlinux /y\noptions init={b}/init quiet\n")


def test_an_entry_without_tries_left_is_a_fallback_whatever_the_variables_say(boot_host, world, server):
    """systemd-boot renames an entry that failed all its tries to `+0-N`: that
    settles it, even when LoaderEntryDefault (a default pinned earlier) names
    another entry than the one booted."""
    host = boot_host
    a, b = world.path("a"), world.path("b")
    exhausted_b_after_falling_back_to_a(host, a, b)
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-generation-1.conf", "nixos-generation-2.conf")}
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 5, r.stderr
    assert state_gauge(host) == "boot_failed"
    failure = host.state()["boot_failure"]
    assert failure["choice"] == "loader" and "nixos-generation-2+0-3.conf" in failure["reason"]
    assert host.profile == a and boot_default(host) == a


def test_after_someone_elses_kexec_an_exhausted_entry_still_settles_it(boot_host, world, server):
    """The entry files are no variables: an entry without tries left says the
    boot loader gave up on the staged system, kexec or not."""
    host = boot_host
    a, b = world.path("a"), world.path("b")
    exhausted_b_after_falling_back_to_a(host, a, b)
    boot_params(host, 0xD0)
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-generation-1.conf", "nixos-generation-1.conf")}
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 5 and state_gauge(host) == "boot_failed", r.stderr
    assert host.state()["boot_failure"]["choice"] == "loader"
