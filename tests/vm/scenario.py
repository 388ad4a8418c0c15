"""What the scenarios do to a guest: install and run the agent, read its record."""

from __future__ import annotations

import json
import shlex
import sys
import time

import harness
from harness import CACHE_HOST, GUEST_AGENT_PATH, AGENT, Machine, PointerServer, Systems

sys.path.append(str(harness.REPO / "tests"))
from nixpkgs_lib import find_nixpkgs_lib  # noqa: E402  (tests/nixpkgs_lib.py: the one lookup)

POINTER_URL = f"http://{CACHE_HOST}/pointer"
METRICS = "/var/lib/prometheus-node-exporter-text/nixos-autodeploy.prom"
STATE = "/var/lib/nixos-autodeploy/state.json"
UNIT = "nixos-autodeploy.service"
# The scenarios' health check: a system with a file `unhealthy` fails it.
HEALTH_CHECK = "test ! -e /run/current-system/unhealthy"

UNIT_TEXT = """[Unit]
Description=nixos-autodeploy (VM tier)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ExecStart={exec_start}
"""


class Guest:
    """A machine plus the scenario's view of the agent in it."""

    def __init__(self, machine: Machine, systems: Systems, server: PointerServer) -> None:
        self.m, self.systems, self.server = machine, systems, server
        self.runs = 0

    def __getattr__(self, name: str):  # sh, put, link, entries, ... of the machine
        return getattr(self.m, name)

    def install_agent(self) -> None:
        self.m.put(GUEST_AGENT_PATH, AGENT.read_bytes(), 0o755)
        # nix's defaults (fsync-metadata on): with it off, a power loss left
        # nix's SQLite database malformed, and every later realise failed.
        self.m.put("/etc/nix/nix.conf", harness.NIX_CONF.format(host=CACHE_HOST, key=self.systems.public_key))

    def point(self, name: str) -> str:
        path = self.systems[name]
        self.server.pointer(path)
        return path

    def configure(self, *args: str) -> None:
        """nixos-autodeploy.service runs one cycle with these extra options."""
        argv = ["/usr/bin/python3", GUEST_AGENT_PATH, "run", "--once", "--url", POINTER_URL,
                "--prometheus-path", METRICS, "--health-check", HEALTH_CHECK, *args]
        exec_start = " ".join(shlex.quote(a).replace("%", "%%") for a in argv)
        self.m.put(f"/etc/systemd/system/{UNIT}", UNIT_TEXT.format(exec_start=exec_start))
        self.m.sh("systemctl daemon-reload")

    def run_agent(self, timeout: float = 600) -> int:
        """Start the unit and wait for its end; returns the agent's exit status."""
        self.runs += 1
        since = self.m.sh("date +%s.%N").out.strip()
        self.m.sh(f"systemctl start {UNIT} || true", timeout=timeout)
        status = int(self.m.sh(f"systemctl show -p ExecMainStatus --value {UNIT}").out.strip() or -1)
        journal = self.m.sh(f"journalctl --no-pager -o cat --since @{since} -u {UNIT} "
                            "-u nixos-autodeploy-activation.service", check=False).out
        with open(self.m.dir / "agent-runs.log", "a") as f:
            f.write(f"--- agent run {self.runs} (boot {self.m.boot_id}), exit {status}\n{journal}\n")
        self.last_journal = journal
        return status

    def start_agent(self) -> None:
        """Start the unit without waiting (it may end in a reboot)."""
        self.runs += 1
        self.m.sh(f"systemctl start --no-block {UNIT}")

    def agent_log_after_boot(self) -> None:
        """Record the journal of the previous boot's agent run (it rebooted)."""
        journal = self.m.sh(f"journalctl -b -1 --no-pager -o cat -u {UNIT} -u nixos-autodeploy-activation",
                            check=False).out
        with open(self.m.dir / "agent-runs.log", "a") as f:
            f.write(f"--- agent run {self.runs} (previous boot)\n{journal}\n")

    # -- the record ---------------------------------------------------------

    def state(self) -> dict:
        text = self.m.read_text(STATE)
        return json.loads(text) if text else {}

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in (self.m.read_text(METRICS) or "").splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def booted(self) -> str:
        return self.m.link("/run/booted-system")

    def current(self) -> str:
        return self.m.link("/run/current-system")

    def profile(self) -> str:
        return self.m.link("/nix/var/nix/profiles/system")

    def entry_id(self, name: str) -> str:
        """The boot entry ID the stand-in installer gives a system (no counter)."""
        return "nixos-" + self.systems[name].split("/")[-1][:32]

    def entry_of(self, name: str) -> str | None:
        """The boot entry file of a stand-in system (with its counter)."""
        path = self.systems[name]
        for e in self.m.entries():
            text = self.m.read_text(f"/boot/loader/entries/{e}") or ""
            if f"init={path}/init" in text.split():
                return e
        return None

    def reboot_and_wait(self) -> str:
        """The guest rebooted itself: follow it into the next boot."""
        boot = self.m.reboot_after_reset()
        self.m.wait_running()
        return boot

    def wait_unit_state(self, unit: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            st = self.m.sh(f"systemctl is-active {unit} || true").out.strip()
            if st in states:
                return st
            if time.monotonic() > deadline:
                raise harness.GuestError(f"{unit} still {st} after {timeout}s (waiting for {states})")
            time.sleep(0.5)


# ---------------------------------------------------------------------------
# The units module.nix renders (evaluated like tests/test_module.py does)
# ---------------------------------------------------------------------------

STORE_REF = r"/nix/store/[0-9a-z]{32}-[^/\s\"]+"


def module_units(settings: str, tmp: "harness.Path") -> dict:
    """Evaluate module.nix with `system.autoDeploy = { settings }` (systemd-boot
    with boot counting, as the guest has) under tests/nixos_harness/: units
    (name -> text), wantedBy, requiredBy, scripts, tmpfiles."""
    import os
    import subprocess
    lib, why = find_nixpkgs_lib()
    assert lib is not None, why
    host = tmp / "host.nix"
    host.write_text("{ pkgs, lib, ... }: {\n  boot.loader.systemd-boot.enable = true;\n"
                    "  boot.loader.systemd-boot.bootCounting.enable = true;\n"
                    f'  system.autoDeploy = {{ enable = true; url = "{POINTER_URL}"; {settings} }};\n}}\n')
    r = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode",
                        str(harness.HERE / "module-units.nix"), "--arg", "libPath", str(lib),
                        "--arg", "modulePath", str(harness.REPO / "module.nix"), "--arg", "config", str(host)],
                       capture_output=True, text=True, env={**os.environ, "NIX_CONFIG": ""}, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["failedAssertions"] == [], result["failedAssertions"]
    assert result["warnings"] == [], result["warnings"]
    return result


def install_module_units(guest: Guest, rendered: dict, enable_timer: bool = False) -> list[str]:
    """Install the rendered units as NixOS would (requiredBy/wantedBy as
    .requires/.wants links, tmpfiles rules).  The store paths they name are
    made in the guest's store: the package's bin/nixos-autodeploy runs the
    autodeploy.py under test, a unit-script-NAME holds the unit's `script`,
    and coreutils, systemd... link bin and sbin to the guest's own tools."""
    import re
    units: dict[str, str] = rendered["units"]
    refs = sorted({m for text in units.values() for m in re.findall(STORE_REF, text)})
    script = ["set -e"]
    for ref in refs:
        if "-unit-script-" in ref:
            # NixOS' makeJobScript: the unit's `script` under `#!${runtimeShell} -e`.
            name = ref.split("-unit-script-", 1)[1]
            body = "#!/bin/sh -e\n" + rendered["scripts"].get(name, "exit 1\n")
            script.append(f"mkdir -p {ref}/bin && printf '%s' {shlex.quote(body)} > {ref}/bin/{name} "
                          f"&& chmod 755 {ref}/bin/{name}")
        elif ref.split("-", 1)[1].startswith("nixos-autodeploy-"):
            # The package: its bin/nixos-autodeploy runs the autodeploy.py under test.
            wrapper = f"#!/bin/sh\nexec /usr/bin/python3 {GUEST_AGENT_PATH} \"$@\"\n"
            script.append(f"mkdir -p {ref}/bin && printf '%s' {shlex.quote(wrapper)} > {ref}/bin/nixos-autodeploy "
                          f"&& chmod 755 {ref}/bin/nixos-autodeploy")
        else:
            # coreutils, systemd, ...: the guest's own tools.
            script.append(f"[ -e {ref} ] || {{ mkdir -p {ref} && ln -s /usr/bin {ref}/bin "
                          f"&& ln -s /usr/sbin {ref}/sbin; }}")
    guest.sh("\n".join(script))
    for name, text in units.items():
        guest.put(f"/etc/systemd/system/{name}", text)
        for kind, targets in (("wants", rendered["unitsWantedBy"].get(name, [])),
                              ("requires", rendered["unitsRequiredBy"].get(name, []))):
            for target in targets:
                if name.endswith(".timer") and not enable_timer:
                    continue
                guest.sh(f"mkdir -p /etc/systemd/system/{target}.{kind} && "
                         f"ln -sfn ../{name} /etc/systemd/system/{target}.{kind}/{name}")
    guest.put("/etc/tmpfiles.d/nixos-autodeploy.conf", "\n".join(rendered["tmpfiles"]) + "\n")
    guest.sh("systemd-tmpfiles --create /etc/tmpfiles.d/nixos-autodeploy.conf && systemctl daemon-reload")
    return sorted(units)
