"""The deploy cycle against real nix: decision table, modes, reboots, bad pointers."""

from __future__ import annotations

import json
import time

import pytest

from util import promtool_ok, state_gauge
from world import METRICS


def manual(host, system: str, action: str) -> None:
    """What a human does with nixos-rebuild (no agent involved)."""
    set_profile = action in ("switch", "boot")
    host.sh(f"set -e; nix-store --realise {system} >/dev/null; "
            + (f"/usr/bin/nix-env -p /nix/var/nix/profiles/system --set {system}; " if set_profile else "")
            + f"{system}/bin/switch-to-configuration {action}")


# ---------------------------------------------------------------------------
# Decision table, row by row
# ---------------------------------------------------------------------------


def test_row1_no_record_current_is_upstream_starts_tracking(host, world):
    a = world.path("a")
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.state()["deployed"] == a
    assert state_gauge(host) == "tracking"
    assert host.metrics()["nixos_autodeploy_dirty"] == 0
    assert host.activations() == [] and host.calls() == []
    promtool_ok(host)


def test_row2_ours_up_to_date_runs_nothing(host, world):
    assert host.once(host.url).returncode == 0
    r = host.once(host.url)
    assert r.returncode == 0
    assert "plan: phase: settled; upstream: deployed: up to date" in r.stderr
    assert state_gauge(host) == "up_to_date"
    assert host.activations() == [] and host.calls() == []
    assert not host.link("/run/upstream-system")  # no nix command ran, not even a realise


def test_row3_ours_new_upstream_deploys(host, world, server):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0
    assert not host.store_has(b)
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and host.state()["deployed"] == b
    assert host.store_has(b)  # substituted from the loopback cache
    assert host.link("/run/upstream-system") == b  # GC root
    assert host.activations() == [f"{b} switch marker=1"]
    call = host.calls()[0].split()
    assert call[:1] == ["systemd-run"] and "--unit=nixos-autodeploy-activation" in call
    assert {"--wait", "--pipe", "--collect", "--service-type=exec"} <= set(call)
    assert "--setenv=NIXOS_AUTODEPLOY_ACTIVATION=1" in call
    assert call[-2:] == [f"{b}/bin/switch-to-configuration", "switch"]
    m = host.metrics()
    assert state_gauge(host) == "deployed"
    assert m["nixos_autodeploy_deploys_total"] == 1 and m["nixos_autodeploy_last_run_success"] == 1
    info = [k for k in m if k.startswith("nixos_autodeploy_info{")][0]
    assert f'deployed_generation="{b.split("/")[-1]}"' in info
    assert f'booted_generation="{a.split("/")[-1]}"' in info
    promtool_ok(host)


def test_row4_not_ours_but_runs_upstream_resumes_tracking(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0  # tracking a
    manual(host, b, "switch")  # someone deployed b by hand ...
    server.pointer(b)          # ... and upstream caught up
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert "resume tracking" in r.stderr
    assert host.state()["deployed"] == b and host.metrics()["nixos_autodeploy_dirty"] == 0
    assert state_gauge(host) == "tracking"


@pytest.mark.parametrize("action", ["switch", "test", "boot"])
def test_row5_manual_deploy_is_dirty_and_left_alone(host, world, server, action):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    assert host.once(host.url).returncode == 0  # tracking a
    manual(host, c, action)
    before = (host.current, host.profile)
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr  # dirty is a completed cycle
    assert (host.current, host.profile) == before
    assert host.state()["deployed"] == a
    assert not host.store_has(b)  # nothing realised
    assert host.metrics()["nixos_autodeploy_dirty"] == 1
    assert state_gauge(host) == "dirty"
    promtool_ok(host)


def test_row5_no_record_and_current_differs_is_dirty(host, world, server):
    server.pointer(world.path("b"))
    r = host.once(host.url)
    assert r.returncode == 0
    assert host.current == world.path("a") and host.state().get("deployed") is None
    assert host.metrics()["nixos_autodeploy_dirty"] == 1


def test_force_deploys_on_a_dirty_host(host, world, server):
    b, c = world.path("b"), world.path("c")
    assert host.once(host.url).returncode == 0
    manual(host, c, "switch")
    server.pointer(b)
    r = host.once(host.url, "--force")
    assert r.returncode == 0, r.stderr
    assert host.current == b and host.profile == b and host.state()["deployed"] == b
    assert host.metrics()["nixos_autodeploy_dirty"] == 0


def test_dry_run_changes_nothing(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    state_before = host.state()
    metrics_before = host.metrics_text()
    server.pointer(b)
    r = host.once(host.url, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "phase: settled; upstream: new: upstream changed" in r.stdout and f"1. deploy {b} (switch)" in r.stdout
    assert host.current == world.path("a") and host.profile == world.path("a")
    assert host.state() == state_before and host.metrics_text() == metrics_before
    assert not host.store_has(b) and host.activations() == []


# ---------------------------------------------------------------------------
# Switch modes, boot + reboot, reboot requests
# ---------------------------------------------------------------------------


def test_boot_mode_then_second_run_then_reboot_then_next_upstream(host, world, server):
    a, b, c = world.path("a"), world.path("b"), world.path("c")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert host.profile == b and host.current == a
    assert host.ctl("boot-default").read_text().strip() == b
    assert host.activations() == [f"{b} boot marker=1"]
    assert state_gauge(host) == "pending_reboot"
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 1
    assert not any("reboot" in c_ for c_ in host.calls())  # no --reboot-mode: never reboots

    # A second run before the reboot: not dirty, no redeploy.
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert host.metrics()["nixos_autodeploy_dirty"] == 0
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 1
    assert state_gauge(host) == "pending_reboot"
    assert len(host.activations()) == 1

    host.reboot()
    assert host.current == host.booted == host.profile == b
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 0
    assert host.metrics()["nixos_autodeploy_dirty"] == 0

    server.pointer(c)
    r = host.once(host.url, "--switch-mode", "boot")
    assert r.returncode == 0, r.stderr
    assert host.profile == c and host.state()["deployed"] == c


def test_smart_switches_when_kernel_is_unchanged(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    assert host.once(host.url, "--switch-mode", "smart").returncode == 0
    assert host.activations() == [f"{b} switch marker=1"] and host.current == b


def test_smart_boots_when_kernel_changes(host, world, server):
    k = world.path("k")
    assert host.once(host.url).returncode == 0
    server.pointer(k)
    r = host.once(host.url, "--switch-mode", "smart")
    assert r.returncode == 0, r.stderr
    assert "kernel" in r.stderr and "staging for the next boot" in r.stderr
    assert host.activations() == [f"{k} boot marker=1"]
    assert host.profile == k and host.current == world.path("a")
    assert host.metrics()["nixos_autodeploy_reboot_required"] == 1


def test_reboot_mode_requests_a_reboot_after_boot(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "reboot")
    assert r.returncode == 0, r.stderr
    assert host.calls()[-1] == "systemctl reboot"


def test_reboot_mode_does_not_reboot_after_switch(host, world, server):
    assert host.once(host.url).returncode == 0
    server.pointer(world.path("b"))
    assert host.once(host.url, "--reboot-mode", "reboot").returncode == 0
    assert not any(c.startswith("systemctl") for c in host.calls())


def test_kexec_loads_the_new_kernel_then_kexecs(host, world, server):
    k = world.path("k")
    assert host.once(host.url).returncode == 0
    server.pointer(k)
    r = host.once(host.url, "--switch-mode", "smart", "--reboot-mode", "kexec")
    assert r.returncode == 0, r.stderr
    calls = host.calls()
    assert calls[-2] == (f"kexec --load {k}/kernel --initrd={k}/initrd "
                         f"--append=console=ttyS0 loglevel=4 init={k}/init")
    assert calls[-1] == "systemctl kexec"


def test_kexec_load_failure_falls_back_to_reboot(host, world, server):
    host.ctl("kexec-fail").write_text("")
    assert host.once(host.url).returncode == 0
    server.pointer(world.path("k"))
    r = host.once(host.url, "--switch-mode", "boot", "--reboot-mode", "kexec")
    assert r.returncode == 0, r.stderr
    assert "falling back to a normal reboot" in r.stderr
    assert host.calls()[-1] == "systemctl reboot"
    assert "systemctl kexec" not in host.calls()


def test_failed_activation_is_never_recorded(host, world, server):
    a, b = world.path("a"), world.path("b")
    assert host.once(host.url).returncode == 0
    host.ctl("fail").write_text(b + "\n")
    server.pointer(b)
    r = host.once(host.url)
    assert r.returncode == 5, r.stderr
    assert "rolled back" in r.stderr
    assert host.current == a and host.profile == a and host.state()["deployed"] == a
    assert host.metrics()["nixos_autodeploy_last_run_success"] == 0
    assert state_gauge(host) == "rolled_back"
    promtool_ok(host)


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


@pytest.mark.parametrize("kind", ["http_404", "http_500", "refused", "slow"])
def test_fetch_failures_change_nothing(host, world, server, kind):
    a = world.path("a")
    assert host.once(host.url).returncode == 0
    args: list[str] = []
    url = host.url
    if kind == "http_404":
        url = server.base + "/nothing-here"
    elif kind == "http_500":
        server.set("/pointer", "oops", status=500)
    elif kind == "refused":
        url = "http://127.0.0.1:9/pointer"
    elif kind == "slow":
        server.pointer(world.path("b"), delay=3)
        args = ["--timeout", "1"]
    started = time.monotonic()
    r = host.once(url, *args)
    assert r.returncode == 3, r.stderr
    assert time.monotonic() - started < 15
    msg = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(msg) == 1 and "Traceback" not in r.stderr
    assert {"http_404": "HTTP 404", "http_500": "HTTP 500", "refused": "refused",
            "slow": "timed out"}[kind] in msg[0]
    assert host.current == a and host.profile == a and host.state()["deployed"] == a
    assert state_gauge(host) == "failed"
    assert host.metrics()["nixos_autodeploy_last_success_timestamp_seconds"] > 0  # kept from the last success
    promtool_ok(host)


# ---------------------------------------------------------------------------
# Locking, status
# ---------------------------------------------------------------------------


def test_two_concurrent_runs_second_exits_at_once(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    host.ctl("hang").write_text(b + "\n")
    server.pointer(b)
    first = host.agent_background("--once", "--url", host.url)
    try:
        deadline = time.monotonic() + 30
        while not host.activations() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.activations(), "first run never reached activation"
        started = time.monotonic()
        second = host.once(host.url)
        assert second.returncode == 6
        assert "another run holds the" in second.stderr
        assert time.monotonic() - started < 5
        assert host.state()["deployed"] == world.path("a")
    finally:
        host.ctl("hang").unlink()
        first.wait(timeout=60)
    assert first.returncode == 0, first.log_path.read_text()
    assert host.current == b and host.state()["deployed"] == b


def test_status_human_and_json(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    assert host.once(host.url, "--switch-mode", "boot").returncode == 0
    r = host.agent("status")
    assert r.returncode == 0
    assert f"current          {world.path('a')}" in r.stdout
    assert f"profile          {b}" in r.stdout
    assert "reboot required  yes" in r.stdout
    assert "state            pending_reboot" in r.stdout
    r = host.agent("status", "--json")
    data = json.loads(r.stdout)
    assert data["current"] == world.path("a") and data["profile"] == b and data["deployed"] == b
    assert data["upstream"] == b and data["reboot_required"] is True and data["dirty"] is False
    assert data["state"] == "pending_reboot" and data["last_run_success"] is True
    assert r.stderr == ""  # status is quiet: results on stdout only


def test_status_before_any_run(host):
    r = host.agent("status", "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert data["deployed"] is None and data["state"] is None and data["current"]
