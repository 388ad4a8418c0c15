"""A stand-in for the NixOS test driver, to run tests/vm-test.nix's testScript
without VMs.

What is real: the *interface*. `Machine` has the methods of the driver's
BaseMachine/QemuMachine with their exact parameter names, kinds and defaults
(nixpkgs nixos/lib/test-driver/src/test_driver/machine/__init__.py), `retry`
takes `timeout_seconds`, and `test_symbols()` exposes what
Driver.test_symbols() does (driver.py). A call with a wrong name or keyword
raises AttributeError/TypeError, as it would in the real driver.
REAL_SIGNATURES lists those signatures as read from nixpkgs; a test checks the
stand-in against it.

What is modelled: the life cycle of a QEMU machine as the driver sees it
(`start(allow_reboot=False)` adds -no-reboot: a guest reboot makes QEMU exit,
the shell is gone, `wait_for_shutdown()` then `start()` boots it again; with
allow_reboot=True QEMU stays and the driver must reconnect), and, behind
`execute`, a small model of the test's two guests: the cache's pointers and
store, and the machine's systems, units, agent runs (the decision table of the
README and docs/design/lifecycle.md, boot staging, reboots, refused unsigned pointers, the manual-activation
trigger) and metrics file. Every command the script sends must be one the
model knows; anything else fails loudly, so a typo in the script fails here.
Shell pipelines ending in `grep` are evaluated by running the left side in
the model and grep in Python.

Unit contents come from the option harness (the units module.nix generates
for each system of the test), and every agent command line is parsed by the
agent's own argument parser (autodeploy.build_parser).
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import json
import hashlib
import re
import shlex
import types
from dataclasses import dataclass, field
from typing import Any, Callable


class RequestedAssertionFailed(AssertionError):
    """test_driver.errors.RequestedAssertionFailed"""


# Signatures of the real driver, as read from nixpkgs (BaseMachine,
# QemuMachine, the module-level retry, Driver's script symbols).
REAL_SIGNATURES = {
    "retry": "(fn, timeout_seconds=900)",
    "Machine.systemctl": "(self, q, user=None)",
    "Machine.wait_for_unit": "(self, unit, user=None, timeout=900)",
    "Machine.get_unit_info": "(self, unit, user=None)",
    "Machine.get_unit_property": "(self, unit, property, user=None)",
    "Machine.require_unit_state": "(self, unit, require_state='active')",
    "Machine.succeed": "(self, *commands, timeout=None)",
    "Machine.fail": "(self, *commands, timeout=None)",
    "Machine.wait_until_succeeds": "(self, command, timeout=900)",
    "Machine.wait_until_fails": "(self, command, timeout=900)",
    "Machine.sleep": "(self, secs)",
    "Machine.wait_for_file": "(self, filename, timeout=900)",
    "Machine.wait_for_open_port": "(self, port, addr='localhost', timeout=900)",
    "Machine.wait_for_open_unix_socket": "(self, addr, is_datagram=False, timeout=900)",
    "Machine.wait_for_closed_port": "(self, port, addr='localhost', timeout=900)",
    "Machine.start_job": "(self, jobname, user=None)",
    "Machine.stop_job": "(self, jobname, user=None)",
    "Machine.execute": "(self, command, check_return=True, check_output=True, timeout=900)",
    "Machine.copy_from_machine": "(self, source, target_dir='')",
    "Machine.copy_from_host": "(self, source, target)",
    "Machine.copy_from_host_via_shell": "(self, source, target)",
    "Machine.is_up": "(self)",
    "Machine.send_monitor_command": "(self, command)",
    "Machine.get_tty_text": "(self, tty)",
    "Machine.wait_until_tty_matches": "(self, tty, regexp, timeout=900)",
    "Machine.dump_tty_contents": "(self, tty)",
    "Machine.shell_interact": "(self, address=None)",
    "Machine.console_interact": "(self)",
    "Machine.wait_for_shutdown": "(self)",
    "Machine.wait_for_qmp_event": "(self, event_filter, timeout=600)",
    "Machine.send_chars": "(self, chars, delay=0.01)",
    "Machine.connect": "(self)",
    "Machine.screenshot": "(self, filename)",
    "Machine.get_screen_text_variants": "(self)",
    "Machine.get_screen_text": "(self)",
    "Machine.wait_for_text": "(self, regex, timeout=900)",
    "Machine.wait_for_console_text": "(self, regex, timeout=None)",
    "Machine.get_console_log": "(self)",
    "Machine.send_key": "(self, key, delay=0.01, log=True)",
    "Machine.send_console": "(self, chars)",
    "Machine.start": "(self, allow_reboot=False)",
    "Machine.shutdown": "(self)",
    "Machine.crash": "(self)",
    "Machine.reboot": "(self)",
    "Machine.wait_for_x": "(self, timeout=900)",
    "Machine.get_window_names": "(self)",
    "Machine.wait_for_window": "(self, regexp, timeout=900)",
    "Machine.forward_port": "(self, host_port=8080, guest_port=80)",
    "Machine.block": "(self)",
    "Machine.unblock": "(self)",
    "Machine.release": "(self)",
    "Machine.switch_root": "(self)",
    "Driver.create_machine": "(self, start_command, *, name=None, keep_machine_state=False)",
    "Driver.polling_condition": "(self, fun_=None, *, seconds_interval=2.0, description=None)",
}

SCRIPT_SYMBOLS = (
    "start_all test_script machines_qemu machines_nspawn vlans driver log os create_machine "
    "subtest run_tests join_all retry serial_stdout_off serial_stdout_on polling_condition "
    "BaseMachine t debug").split()


class Clock:
    """Guest and host time for the script: `time.sleep` advances it."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def sleep(self, secs: float) -> None:
        self.now += secs

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


CLOCK = Clock()


def retry(fn: Callable, timeout_seconds: int = 900) -> None:
    start = CLOCK.monotonic()
    while CLOCK.monotonic() - start < timeout_seconds:
        if fn(False):
            return
        CLOCK.sleep(1)
        for guest in WORLD.guests.values():
            guest.tick()
    if not fn(True):
        raise RequestedAssertionFailed(f"action timed out after {timeout_seconds} seconds")


# --------------------------------------------------------------------------
# the guests


class ShellGone(RuntimeError):
    pass


@dataclass
class System:
    """One NixOS system of the test: its marker file, its units (text), the
    units' requiredBy lists, and the agent's command line."""
    path: str
    marker: str
    units: dict[str, str]
    agent_argv: list[str]
    required_by: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Cache:
    store: set[str] = field(default_factory=set)
    pointers: dict[str, str] = field(default_factory=dict)   # file -> content
    signatures: dict[str, tuple[str, int, list[str]]] = field(default_factory=dict)


POINTER_FILES = {
    "http://cache/pointer": "/srv/cache/pointer",
    "http://cache/pointer-counted": "/srv/cache/pointer-counted",
    "http://cache/private/pointer": "/srv/private/pointer",
    "http://cache/signed/pointer": "/srv/signed/pointer",
}


@dataclass
class AgentState:
    deployed: str | None = None
    staged_from: str | None = None
    verified: bool = True
    deploys: int = 0
    upstream_revision: int | None = None
    quarantined: str | None = None
    boot_failures: int = 0


class Guest:
    """A NixOS guest: its systems, what runs and boots, its boot entries
    (systemd-boot with boot counting when `counting`), the agent's state and
    metrics file."""

    def __init__(self, world: "World", name: str, systems: dict[str, System], base: str,
                 counting: bool = False) -> None:
        self.world, self.name, self.systems, self.counting = world, name, systems, counting
        self.current = self.booted = self.profile = base
        self.generations = [base]          # boot entries, oldest first
        # tries left per entry; None: no counter (blessed, or no boot counting)
        self.tries: dict[str, int | None] = {base: 1 if counting else None}
        self.store = {base}
        self.state = AgentState()
        self.metrics: str | None = None
        self.trigger_runs = 0
        self.trigger_journal: list[str] = []  # the trigger unit's messages, this boot
        self.token_present = False
        self.pending: list[Callable[[], Any]] = []
        self.reboot_requested = False
        self.boot_check: str | None = None
        self.booted_previous = False

    def tick(self) -> None:
        while self.pending:
            self.pending.pop(0)()

    def unit(self, name: str) -> str:
        units = self.systems[self.current].units
        if name not in units:
            raise AssertionError(f"{self.name}: {name} does not exist in {self.current}")
        return units[name]

    # --- boot -------------------------------------------------------------

    def boot(self) -> None:
        """systemd-boot: the newest entry that still has tries (or no counter)."""
        usable = [g for g in self.generations if self.tries.get(g) != 0]
        chosen = usable[-1]
        self.booted_previous = self.state.staged_from is not None and chosen != self.generations[-1]
        self.current = self.booted = chosen
        self.trigger_runs = 0
        self.trigger_journal = []
        self.token_present = False  # /run is a tmpfs
        self.reboot_requested = False
        self.boot_check = None
        if self.tries.get(chosen) is not None:
            self.tries[chosen] -= 1
            units = self.systems[chosen].units
            if "nixos-autodeploy-boot-check.service" in units:
                # the health check of the boot check: the marker decides
                good = self.systems[chosen].marker != "broken"
                self.boot_check = "active" if good else "failed"
                if good:
                    self.tries[chosen] = None  # systemd-bless-boot: counter removed

    @staticmethod
    def entry_id(system: str) -> str:
        """nixpkgs 26.11's systemd-boot-builder names entries after their
        content (nixos-<hash>.conf), no longer nixos-generation-<n>.conf."""
        return "nixos-" + hashlib.sha256(system.encode()).hexdigest()[:32]

    def entries(self) -> str:
        """loader/entries: `<id>+<tries left>-<tries used>.conf` while counted
        (`+1` when new, `+0-1` once its try is used up), `<id>.conf` once blessed."""
        out = []
        for g in self.generations:
            t = self.tries.get(g)
            out.append(self.entry_id(g) + ("" if t is None else f"+{t}" + ("-1" if t == 0 else "")) + ".conf")
        return "\n".join(sorted(out)) + "\n"

    def loader_conf(self) -> str:
        """loader.conf as the 26.11 builder writes it with boot counting: the
        default a pattern, the newest generation `preferred`."""
        return f"timeout 5\ndefault nixos-*\npreferred {self.entry_id(self.generations[-1])}\nconsole-mode keep\n"

    # --- the agent --------------------------------------------------------

    def agent_run(self) -> int:
        sysd = self.systems[self.current]
        args = self.world.agent_parser(sysd.agent_argv)
        unit = self.unit("nixos-autodeploy.service")
        if "LoadCredential=" in unit and not self.token_present:
            return 243  # LoadCredential: the file is missing, the unit does not start
        url, cache = args.url, self.world.cache
        if url not in POINTER_FILES or POINTER_FILES[url] not in cache.pointers:
            return self.finish("failed", 3)
        if "private" in url and args.token_file != "%d/token":
            return self.finish("failed", 3)
        upstream = cache.pointers[POINTER_FILES[url]]
        if args.trusted_keys:
            sig = cache.signatures.get(POINTER_FILES[url])
            if sig is None or sig[0] != upstream or self.name not in sig[2]:
                return self.finish("refused", 4)
            self.state.upstream_revision = sig[1]
        if upstream not in cache.store:
            return self.finish("failed", 5)
        return self.decide(upstream, args)

    def decide(self, upstream: str, args: Any) -> int:
        st, current = self.state, self.current
        if self.booted_previous:
            # booted the previous system after a staged deploy: the boot failed
            self.booted_previous = False
            st.quarantined, st.boot_failures = st.deployed, st.boot_failures + 1
            st.deployed, st.staged_from, st.verified = current, None, True
            self.profile = current
            return self.finish("boot_failed", 5)
        if upstream == st.quarantined:
            return self.finish("quarantined", 0)
        ours = st.deployed is not None and current in (st.deployed, st.staged_from)
        if st.deployed is None or not ours:
            if current == upstream:
                st.deployed, st.staged_from, st.verified = current, None, True
                return self.finish("tracking", 0)
            return self.finish("dirty", 0, dirty=1)
        if upstream == st.deployed:
            if current == st.deployed and not st.verified:
                st.verified = True
                return self.finish("deployed", 0)
            if current != st.deployed:
                return self.finish("pending_reboot", 0)
            return self.finish("up_to_date", 0)
        self.store.add(upstream)
        self.profile = upstream
        st.deploys += 1
        if upstream not in self.generations:
            self.generations.append(upstream)
            self.tries[upstream] = 1 if self.counting else None
        if str(getattr(args.switch_mode, "value", args.switch_mode)) == "boot":
            st.staged_from, st.deployed, st.verified = current, upstream, False
            code = self.finish("pending_reboot", 0)
            if args.reboot_mode is not None:
                self.reboot_requested = True
            return code
        self.current = upstream
        # switch-to-configuration switch restarts sysinit-reactivation.target:
        # the trigger runs and sees the agent's live PID in the marker
        self.run_trigger(own=True)
        st.deployed, st.staged_from, st.verified = upstream, None, True
        return self.finish("deployed", 0)

    def manual_switch(self, path: str) -> None:
        self.current = path
        # switch-to-configuration restarts sysinit-reactivation.target, which
        # wants the trigger (if the new system's module says so); no marker
        if self.run_trigger(own=False):
            self.pending.append(self.trigger)

    def run_trigger(self, own: bool) -> bool:
        """nixos-autodeploy-trigger.service, started by the restart of
        sysinit-reactivation.target on a switch; True when it started the agent."""
        unit = self.systems[self.current].units.get("nixos-autodeploy-trigger.service", "")
        if "WantedBy=sysinit-reactivation.target" not in unit:
            return False
        if own:
            self.trigger_journal.append("activated by nixos-autodeploy (PID 4242) itself: no run")
        else:
            self.trigger_journal.append("a manual switch: starting nixos-autodeploy.service")
        self.trigger_journal.append("Finished Run nixos-autodeploy after a manual activation.")
        return not own

    def trigger(self) -> None:
        self.trigger_runs += 1
        self.agent_run()

    def finish(self, state: str, code: int, dirty: int = 0) -> int:
        CLOCK.sleep(0.5)
        st = self.state
        reboot_required = int(st.deployed is not None and self.current != st.deployed)
        gen = lambda p: p.rsplit("/", 1)[-1] if p else ""  # noqa: E731
        lines = [
            f"nixos_autodeploy_dirty {dirty}",
            f"nixos_autodeploy_reboot_required {reboot_required}",
            f"nixos_autodeploy_last_run_success {1 if code == 0 else 0}",
            f"nixos_autodeploy_last_run_timestamp_seconds {CLOCK.now}",
            f"nixos_autodeploy_last_success_timestamp_seconds {CLOCK.now}",
            f"nixos_autodeploy_deploys_total {st.deploys}",
            f"nixos_autodeploy_boot_failures_total {st.boot_failures}",
            f'nixos_autodeploy_quarantined{{path="{st.quarantined or ""}"}} {1 if st.quarantined else 0}',
            f'nixos_autodeploy_info{{current_generation="{gen(self.current)}",'
            f'booted_generation="{gen(self.booted)}",deployed_generation="{gen(st.deployed)}"}} 1',
        ]
        if st.upstream_revision is not None:
            lines.append(f"nixos_autodeploy_upstream_revision {st.upstream_revision}")
        for s in ("up_to_date", "tracking", "deployed", "pending_reboot", "dirty", "failed",
                  "rolled_back", "quarantined", "suspended", "refused", "booted_previous",
                  "boot_failed"):
            lines.append(f'nixos_autodeploy_state{{state="{s}"}} {1 if s == state else 0}')
        self.metrics = "\n".join(lines) + "\n"
        return code

    def status(self) -> str:
        out = f"current: {self.current}\ndeployed: {self.state.deployed}\n"
        if self.state.boot_failures:
            out += (f"history: boot failure of {self.state.quarantined} "
                    "(no tries left; booted the previous generation)\n")
        return out


class World:
    """The model behind the machines' shells: the cache and the guests."""

    def __init__(self, agent_parser: Callable[[list[str]], Any], token: str, token_file: str,
                 prom: str, exporter_port: int) -> None:
        self.cache = Cache()
        self.guests: dict[str, Guest] = {}
        self.agent_parser = agent_parser
        self.token, self.token_file, self.prom = token, token_file, prom
        self.exporter_port = exporter_port

    def add_guest(self, name: str, systems: dict[str, System], base: str,
                  counting: bool = False) -> Guest:
        self.guests[name] = Guest(self, name, systems, base, counting)
        return self.guests[name]


WORLD: World


# --------------------------------------------------------------------------
# the machines


class Machine:
    """BaseMachine + QemuMachine as a test script sees them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.booted = False
        self.connected = False
        self.allow_reboot = False
        self.qemu_running = False
        self.shell_alive = False
        self.calls: list[tuple[str, tuple, dict]] = []

    def __repr__(self) -> str:
        return f"<Machine '{self.name}'>"

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))

    # --- life cycle -------------------------------------------------------

    def is_up(self) -> bool:
        return self.booted and self.connected

    def start(self, allow_reboot: bool = False) -> None:
        if self.booted:
            return
        self._record("start", allow_reboot=allow_reboot)
        self.allow_reboot = allow_reboot
        self.booted = self.qemu_running = self.shell_alive = True
        if self.guest is not None:
            self.guest.boot()

    def connect(self) -> None:
        if self.connected:
            if not self.shell_alive:
                raise ShellGone(f"{self.name}: command sent to a shell that is gone "
                                "(the guest rebooted; reconnect first)")
            return
        self.start()
        if not self.qemu_running:
            # The real driver's start() returns at once when `booted` is still
            # set; the backdoor socket of the exited QEMU reads as EOF.
            raise RuntimeError("Shell disconnected")
        self.shell_alive = True
        self.connected = True

    @property
    def guest(self) -> Guest | None:
        return WORLD.guests.get(self.name)

    def _settle(self) -> None:
        """Let what runs in the guest in the background (a --no-block start,
        the manual-activation trigger, a timer) happen; it may reboot it."""
        if self.guest is None or not self.qemu_running or not self.shell_alive:
            return
        self.guest.tick()
        if self.guest.reboot_requested:
            self.guest.reboot_requested = False
            self._guest_reboot()

    def wait_for_shutdown(self) -> None:
        self._record("wait_for_shutdown")
        self._settle()
        if not self.booted:
            return
        if self.qemu_running:
            raise AssertionError(f"{self.name}: wait_for_shutdown() would wait forever: "
                                 "the VM is running and nothing powers it off")
        self.booted = self.connected = False

    def shutdown(self) -> None:
        self._record("shutdown")
        if not self.booted:
            return
        self.qemu_running = self.shell_alive = False
        self.wait_for_shutdown()

    def crash(self) -> None:
        self._record("crash")
        if not self.booted:
            return
        self.qemu_running = self.shell_alive = False
        self.wait_for_shutdown()

    def reboot(self) -> None:
        self.send_key("ctrl-alt-delete")
        self._guest_reboot()
        self.connected = False

    def _guest_reboot(self) -> None:
        self.shell_alive = False
        if self.allow_reboot:
            self.guest.boot()  # QEMU stays; the guest boots again, the driver must reconnect
        else:
            self.qemu_running = False  # -no-reboot: QEMU exits

    def release(self) -> None:
        self._record("release")

    def switch_root(self) -> None:
        raise AssertionError("switch_root: the test has no initrd backdoor")

    # --- commands ---------------------------------------------------------

    def execute(self, command: str, check_return: bool = True, check_output: bool = True,
                timeout: int | None = 900) -> tuple[int, str]:
        assert isinstance(command, str), f"execute() takes a string, not {command!r}"
        assert timeout is None or isinstance(timeout, (int, float)), timeout
        self._record("execute", command, check_return=check_return, timeout=timeout)
        self._settle()
        self.connect()
        status, out = run_command(self.name, command)
        if self.guest is not None and self.guest.reboot_requested:
            # the guest went down under the running command: no answer comes
            self.guest.reboot_requested = False
            self._guest_reboot()
            raise ShellGone(f"{self.name}: the guest rebooted while running {command!r}")
        if not check_output:
            return (-2, "")
        if not check_return:
            return (-1, out)
        return status, out

    def systemctl(self, q: str, user: str | None = None) -> tuple[int, str]:
        if user is not None:
            raise AssertionError("the test has no user sessions")
        return self.execute(f"systemctl {q}")

    def succeed(self, *commands: str, timeout: int | None = None) -> str:
        output = ""
        for command in commands:
            status, out = self.execute(command, timeout=timeout)
            if status != 0:
                raise RequestedAssertionFailed(f"command `{command}` failed (exit code {status})")
            output += out
        return output

    def fail(self, *commands: str, timeout: int | None = None) -> str:
        output = ""
        for command in commands:
            status, out = self.execute(command, timeout=timeout)
            if status == 0:
                raise RequestedAssertionFailed(f"command `{command}` unexpectedly succeeded")
            output += out
        return output

    def wait_until_succeeds(self, command: str, timeout: int = 900) -> str:
        output = ""

        def check(_last: bool) -> bool:
            nonlocal output
            status, output = self.execute(command, timeout=timeout)
            return status == 0

        retry(check, timeout)
        return output

    def wait_until_fails(self, command: str, timeout: int = 900) -> str:
        output = ""

        def check(_last: bool) -> bool:
            nonlocal output
            status, output = self.execute(command, timeout=timeout)
            return status != 0

        retry(check, timeout)
        return output

    def get_unit_info(self, unit: str, user: str | None = None) -> dict[str, str]:
        status, lines = self.systemctl(f'--no-pager show "{unit}"', user)
        if status != 0:
            raise RequestedAssertionFailed(f"retrieving systemctl info for unit {unit} failed")
        return dict(line.split("=", 1) for line in lines.splitlines() if "=" in line)

    def get_unit_property(self, unit: str, property: str, user: str | None = None) -> str:
        status, lines = self.systemctl(f'--no-pager show "{unit}" --property="{property}"', user)
        if status != 0:
            raise RequestedAssertionFailed(f"retrieving {property} of {unit} failed")
        key, _, val = lines.strip().partition("=")
        assert key == property, lines
        return val

    def wait_for_unit(self, unit: str, user: str | None = None, timeout: int = 900) -> None:
        def check(_last: bool) -> bool:
            state = self.get_unit_property(unit, "ActiveState", user)
            if state == "failed":
                raise RequestedAssertionFailed(f'unit "{unit}" reached state "{state}"')
            return state == "active"

        retry(check, timeout)

    def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        state = self.get_unit_info(unit)["ActiveState"]
        if state != require_state:
            raise RequestedAssertionFailed(f"{unit} is {state}, not {require_state}")

    def sleep(self, secs: int) -> None:
        self.succeed(f"sleep {secs}")

    def wait_for_file(self, filename: str, timeout: int = 900) -> None:
        retry(lambda _l: self.execute(f"test -e {filename}")[0] == 0, timeout)

    def wait_for_open_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        retry(lambda _l: self.execute(f"nc -z {addr} {port}")[0] == 0, timeout)

    def wait_for_open_unix_socket(self, addr: str, is_datagram: bool = False,
                                  timeout: int = 900) -> None:
        retry(lambda _l: self.execute(f"nc -z -U {addr}")[0] == 0, timeout)

    def wait_for_closed_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        retry(lambda _l: self.execute(f"nc -z {addr} {port}")[0] != 0, timeout)

    def start_job(self, jobname: str, user: str | None = None) -> tuple[int, str]:
        return self.systemctl(f"start {jobname}", user)

    def stop_job(self, jobname: str, user: str | None = None) -> tuple[int, str]:
        return self.systemctl(f"stop {jobname}", user)

    # --- what the test does not use: present with the real signatures -----

    def _unused(self, what: str) -> Any:
        raise AssertionError(f"{what}: not modelled by the stand-in (no display, no files)")

    def copy_from_machine(self, source: str, target_dir: str = "") -> None:
        self._unused("copy_from_machine")

    def copy_from_host(self, source: str, target: str) -> None:
        self._unused("copy_from_host")

    def copy_from_host_via_shell(self, source: str, target: str) -> None:
        self._unused("copy_from_host_via_shell")

    def send_monitor_command(self, command: str) -> str:
        self._record("send_monitor_command", command)
        return "(qemu) "

    def get_tty_text(self, tty: str) -> str:
        return self._unused("get_tty_text")

    def wait_until_tty_matches(self, tty: str, regexp: str, timeout: int = 900) -> None:
        self._unused("wait_until_tty_matches")

    def dump_tty_contents(self, tty: str) -> None:
        self._unused("dump_tty_contents")

    def shell_interact(self, address: str | None = None) -> None:
        self._unused("shell_interact")

    def console_interact(self) -> None:
        self._unused("console_interact")

    def wait_for_qmp_event(self, event_filter: Callable, timeout: int = 60 * 10) -> dict:
        return self._unused("wait_for_qmp_event")

    def send_chars(self, chars: str, delay: float | None = 0.01) -> None:
        for char in chars:
            self.send_key(char, delay, log=False)

    def screenshot(self, filename: str) -> None:
        self._unused("screenshot")

    def get_screen_text_variants(self) -> list[str]:
        return self._unused("get_screen_text_variants")

    def get_screen_text(self) -> str:
        return self._unused("get_screen_text")

    def wait_for_text(self, regex: str, timeout: int = 900) -> None:
        self._unused("wait_for_text")

    def wait_for_console_text(self, regex: str, timeout: int | None = None) -> None:
        self._unused("wait_for_console_text")

    def get_console_log(self) -> str:
        return ""

    def send_key(self, key: str, delay: float | None = 0.01, log: bool | None = True) -> None:
        self.send_monitor_command(f"sendkey {key}")

    def send_console(self, chars: str) -> None:
        self._unused("send_console")

    def wait_for_x(self, timeout: int = 900) -> None:
        self._unused("wait_for_x")

    def get_window_names(self) -> list[str]:
        return self._unused("get_window_names")

    def wait_for_window(self, regexp: str, timeout: int = 900) -> None:
        self._unused("wait_for_window")

    def forward_port(self, host_port: int = 8080, guest_port: int = 80) -> None:
        self.send_monitor_command(f"hostfwd_add tcp::{host_port}-:{guest_port}")

    def block(self) -> None:
        self.send_monitor_command("set_link virtio-net-pci.1 off")

    def unblock(self) -> None:
        self.send_monitor_command("set_link virtio-net-pci.1 on")


# --------------------------------------------------------------------------
# commands


def grep(args: list[str], text: str) -> tuple[int, str]:
    quiet = count = exact = fixed = False
    rest: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--":
            rest.extend(it)
            break
        if a.startswith("-") and len(a) > 1 and not rest:
            quiet |= "q" in a
            count |= "c" in a
            exact |= "x" in a
            fixed |= "F" in a
            continue
        rest.append(a)
    assert len(rest) == 1, f"grep with {rest!r}"
    pattern = rest[0]

    # grep's basic regular expressions: + ? { } | ( ) are literal, \+ etc. are not
    regex = re.sub(r"\\([+?{}|()])|([+?{}|()])",
                   lambda m: m.group(1) or "\\" + m.group(2), pattern)

    def match(line: str) -> bool:
        if fixed:
            return line == pattern if exact else pattern in line
        return bool(re.fullmatch(regex, line) if exact else re.search(regex, line))

    hits = [line for line in text.splitlines() if match(line)]
    status = 0 if hits else 1
    if count:
        return status, f"{len(hits)}\n"
    return status, "" if quiet else "".join(h + "\n" for h in hits)


def systemctl_show_exec(line: str) -> str:
    words = []
    for w in re.findall(r'"(?:[^"\\]|\\.)*"|\S+', line):
        words.append(json.loads(w).replace("%%", "%").replace("$$", "$") if w.startswith('"') else w)
    return f"{{ path={words[0]} ; argv[]={' '.join(words)} ; ignore_errors=no ; }}\n"


def unit_value(text: str, key: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    return [m.group(1) for m in re.finditer(rf"^{re.escape(key)}=(.*)$", joined, re.M)]


def run_command(host: str, command: str) -> tuple[int, str]:
    if command.startswith("! "):
        status, out = run_command(host, command[2:])
        return (1 if status == 0 else 0), out
    if " | " in command and " || " not in command.split(" | ")[-1]:
        left, _, right = command.rpartition(" | ")
        words = shlex.split(right)
        if words and words[0] == "grep":
            status, out = run_command(host, left)
            if status != 0:
                return status, ""
            return grep(words[1:], out)
    if command.endswith(" || true"):
        status, out = run_command(host, command[: -len(" || true")])
        return 0, out
    if " && " in command:
        out = ""
        for part in command.split(" && "):
            status, o = run_command(host, part)
            out += o
            if status != 0:
                return status, out
        return 0, out
    if host == "cache":
        result = cache_command(command)
    else:
        result = guest_command(WORLD.guests[host], command)
    if result is None:
        raise AssertionError(f"{host}: the stand-in does not know the command {command!r}")
    return result


def known_paths() -> set[str]:
    return {p for g in WORLD.guests.values() for p in g.systems}


def cache_command(command: str) -> tuple[int, str] | None:
    w, c = WORLD, WORLD.cache
    if m := re.fullmatch(r"nix copy --to 'file:///srv/cache\?compression=none' (\S+)", command):
        assert m.group(1) in known_paths(), f"nix copy of an unknown path {m.group(1)}"
        c.store.add(m.group(1))
        return 0, ""
    if m := re.fullmatch(r"echo (\S+) > (/srv/\w+/pointer[\w-]*(?:\.new)?)", command):
        c.pointers[m.group(2)] = m.group(1)
        c.signatures.pop(m.group(2), None)
        return 0, ""
    if m := re.fullmatch(r"mv (\S+)\.new \1", command):
        c.pointers[m.group(1)] = c.pointers.pop(m.group(1) + ".new")
        c.signatures.pop(m.group(1), None)
        return 0, ""
    if m := re.fullmatch(r"rm -f (/srv/\w+/pointer)\.sig", command):
        c.signatures.pop(m.group(1), None)
        return 0, ""
    words = shlex.split(command)
    if words[:2] == ["nixos-autodeploy", "sign"]:
        args = w.agent_parser(words[1:])
        assert args.command == "sign", args
        path = args.store_path or args.hosts.pop()
        assert path in c.store, "signing a pointer to a path that is not in the cache"
        c.pointers[args.output] = path
        c.signatures[args.output] = (path, args.revision, list(args.hosts))
        return 0, ""
    if command == "systemctl --no-pager show \"nginx.service\" --property=\"ActiveState\"":
        return 0, "ActiveState=active\n"
    if command == "nc -z localhost 80":
        return 0, ""
    return None


def guest_command(g: Guest, command: str) -> tuple[int, str] | None:
    w = WORLD
    if command == "readlink -f /run/current-system":
        return 0, g.current + "\n"
    if command == "readlink -f /nix/var/nix/profiles/system":
        return 0, g.profile + "\n"
    if m := re.fullmatch(r'systemctl --no-pager show "([\w.-]+)" --property="ActiveState"', command):
        unit = m.group(1)
        if unit != "multi-user.target":
            g.unit(unit)
        return 0, "ActiveState=active\n"
    if m := re.fullmatch(r"nc -z localhost (\d+)", command):
        return (0 if int(m.group(1)) == w.exporter_port else 1), ""
    if command == "systemctl start nixos-autodeploy.service":
        return (0 if g.agent_run() == 0 else 1), ""
    if command in ("systemctl start --no-block nixos-autodeploy.service",
                   "systemctl start nixos-autodeploy.timer"):
        g.unit(command.split()[-1])
        g.pending.append(g.agent_run)
        return 0, ""
    if command == "systemctl start --no-block reboot.target":
        g.pending.append(lambda: setattr(g, "reboot_requested", True))
        return 0, ""
    if command == "systemctl is-active --quiet nixos-autodeploy.service":
        g.tick()
        return 3, ""
    if command == "systemctl is-active nixos-autodeploy-boot-check.service":
        g.unit("nixos-autodeploy-boot-check.service")
        return (0, "active\n") if g.boot_check == "active" else (3, f"{g.boot_check or 'inactive'}\n")
    if command == "systemctl is-failed nixos-autodeploy-boot-check.service":
        g.unit("nixos-autodeploy-boot-check.service")
        return (0, "failed\n") if g.boot_check == "failed" else (1, f"{g.boot_check or 'inactive'}\n")
    if command == "systemctl is-active boot-complete.target":
        return (0, "active\n") if g.boot_check == "active" else (3, "inactive\n")
    if command == "ls /boot/loader/entries":
        assert g.counting, f"{g.name} has no systemd-boot entries in the model"
        return 0, g.entries()
    if command == "grep -q '^default nixos-' /boot/loader/loader.conf":
        assert g.counting, f"{g.name} has no systemd-boot loader.conf in the model"
        return (0 if re.search(r"^default nixos-", g.loader_conf(), re.M) else 1), ""
    if command == "find /var/lib/nixos-autodeploy -mindepth 1 -delete":
        g.state = AgentState()
        return 0, ""
    if command == f"cat {w.prom}":
        return (0, g.metrics) if g.metrics is not None else (1, "")
    if command == "journalctl -b -q -o cat -u nixos-autodeploy-trigger.service":
        return 0, "".join(line + "\n" for line in g.trigger_journal)
    if m := re.fullmatch(r"systemctl show -P (\w+) ([\w.-]+)", command):
        key, unit = m.groups()
        if key == "RequiredBy":
            g.unit(unit)
            return 0, " ".join(g.systems[g.current].required_by.get(unit, [])) + "\n"
        vals = unit_value(g.unit(unit), key)
        if key == "ExecStart":
            return 0, "".join(systemctl_show_exec(v) for v in vals)
        return 0, " ".join(vals) + "\n"
    if m := re.fullmatch(r"systemctl cat ([\w.-]+)", command):
        return 0, f"# /etc/systemd/system/{m.group(1)}\n" + g.unit(m.group(1))
    if m := re.fullmatch(r"nix-store --check-validity (\S+)", command):
        return (0 if m.group(1) in g.store else 1), ""
    if m := re.fullmatch(r"grep -qx (\S+) /etc/autodeploy-test", command):
        return (0 if g.systems[g.current].marker == m.group(1) else 1), ""
    if m := re.fullmatch(r"timeout 300 (\S+)/bin/switch-to-configuration switch", command):
        assert m.group(1) in g.store, "switching to a system the machine does not have"
        g.manual_switch(m.group(1))
        return 0, ""
    if m := re.fullmatch(r"(/nix/store/\S+)/bin/nixos-autodeploy status", command):
        w.agent_parser(["status"])
        return 0, g.status()
    if command == "install -d -m 0700 /run/keys":
        return 0, ""
    if command == f"printf %s {w.token} > {w.token_file}":
        g.token_present = True
        return 0, ""
    if command == f"chmod 0400 {w.token_file}":
        return (0 if g.token_present else 1), ""
    if m := re.fullmatch(r"curl -sf (?:-H 'Authorization: Bearer (\S+)' )?(http://cache/\S+)", command):
        token, url = m.groups()
        file = POINTER_FILES[url]
        if "private" in url and token != w.token:
            return 22, ""  # curl -f: HTTP 401
        if file not in w.cache.pointers:
            return 22, ""
        return 0, w.cache.pointers[file] + "\n"
    if m := re.fullmatch(r"curl -sf http://localhost:(\d+)/metrics", command):
        assert int(m.group(1)) == w.exporter_port
        return 0, (g.metrics or "") + "node_textfile_scrape_error 0\n"
    return None


# --------------------------------------------------------------------------
# the script's globals


class Driver:
    def __init__(self, machines: list[Machine]) -> None:
        self.machines = machines
        self.subtests: list[str] = []

    def start_all(self) -> None:
        for m in self.machines:
            m.start()

    def join_all(self) -> None:
        for m in self.machines:
            m.wait_for_shutdown()

    def create_machine(self, start_command: str, *, name: str | None = None,
                       keep_machine_state: bool = False) -> Machine:
        raise AssertionError("create_machine: not used by this test")

    def polling_condition(self, fun_: Callable | None = None, *, seconds_interval: float = 2.0,
                          description: str | None = None) -> Any:
        raise AssertionError("polling_condition: not used by this test")

    def serial_stdout_on(self) -> None:
        pass

    def serial_stdout_off(self) -> None:
        pass

    def test_symbols(self) -> dict[str, Any]:
        @contextlib.contextmanager
        def subtest(name: str):
            self.subtests.append(name)
            yield

        symbols = dict(
            start_all=self.start_all, test_script=None, machines_qemu=self.machines,
            machines_nspawn=[], vlans=[], driver=self, log=None, os=__import__("os"),
            create_machine=self.create_machine, subtest=subtest, run_tests=None,
            join_all=self.join_all, retry=retry, serial_stdout_off=self.serial_stdout_off,
            serial_stdout_on=self.serial_stdout_on, polling_condition=self.polling_condition,
            BaseMachine=Machine, t=None, debug=None,
        )
        assert sorted(symbols) == sorted(SCRIPT_SYMBOLS)
        symbols.update({m.name: m for m in self.machines})
        return symbols


def script_globals(driver: Driver) -> dict[str, Any]:
    """The driver's symbols, with `import time` answered by the stand-in clock."""
    fake_time = types.SimpleNamespace(sleep=CLOCK.sleep, time=CLOCK.time,
                                      monotonic=CLOCK.monotonic)
    real_import = builtins.__import__

    def _import(name, *args, **kwargs):
        if name == "time":
            return fake_time
        return real_import(name, *args, **kwargs)

    env = dict(vars(builtins))
    env["__import__"] = _import
    return {"__builtins__": env, **driver.test_symbols()}


def run_script(script: str, world: World, names: list[str]) -> Driver:
    global WORLD
    WORLD = world
    # the driver sorts its machines by name
    driver = Driver([Machine(n) for n in sorted(names)])
    exec(compile(script, "<testScript>", "exec"), script_globals(driver), None)
    return driver


def plain_signature(obj: Callable) -> str:
    """`(self, a, b=1, *, c=None)`: names, kinds and defaults, no annotations."""
    parts, star = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append("*" + p.name)
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append("**" + p.name)
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return "(" + ", ".join(parts) + ")"


def signature_mismatches() -> list[str]:
    """Where the stand-in's signatures differ from REAL_SIGNATURES."""
    out = []
    for qual, want in REAL_SIGNATURES.items():
        owner, _, name = qual.rpartition(".")
        obj = {"": globals(), "Machine": vars(Machine), "Driver": vars(Driver)}[owner][name]
        got = plain_signature(obj)
        if got != want:
            out.append(f"{qual}: stand-in {got}, driver {want}")
    return out
