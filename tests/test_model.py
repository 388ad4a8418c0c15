"""A model-based test (hypothesis' stateful testing): the REAL agent, real
nix, the test world, driven through random sequences of what happens to a
fleet host: CI publishes a good build, one that fails its health check, one
whose boot fails (the boot loader falls back), rollout waves and `pause`; the
host reboots, loses power in the middle of a deploy, gets SIGTERM at a random
moment; an operator suspends and resumes; the reboot window is open or closed
and the FleetLock slot free or busy.  After every step it checks invariants:

- the host never stays on a system that failed its checks once the window and
  a slot allow a reboot (and it is not suspended);
- nothing on the host changes while it is suspended;
- after a completed run: no intent left, never `dirty` (nobody deploys by
  hand here), profile = the record, the boot loader's default = the profile,
  metrics = state file;
- no reboot after a stop request;
- the history says what happened (every boot failure has its entry).

Bounded: MODEL_BUDGET_SECONDS (default 300) of wall time; MODEL_SEED replays
a run (the seed is printed).  Every failure it found became a plain
regression test (tests/test_cycle.py, tests/test_crash.py, tests/test_rollout.py,
tests/test_state.py: the lifecycle's joints, issue #17).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, Verbosity, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, get_state_machine_test, initialize, invariant, rule  # noqa: E402,E501

import world as world_mod  # noqa: E402

pytestmark = pytest.mark.tier("model-based")

BUDGET = float(os.environ.get("MODEL_BUDGET_SECONDS", "300"))
BUILDS = ("b", "c", "d")
KINDS = ("good", "unhealthy", "noboot")
NOW = {True: "2026-11-24T03:00:00", False: "2026-11-24T12:00:00"}  # inside / outside 02:00-04:00
CHECK = 'test -z "$(grep -xF "$(readlink /run/current-system)" /var/lib/standin/unhealthy 2>/dev/null)"'


class Fleet:
    """What the whole run shares: the world, the servers, the clock."""

    world: world_mod.World
    server: world_mod.PointerServer
    fleetlock: world_mod.FleetLockServer
    root: object
    deadline = 0.0
    seed = 0
    trace: list[str] = []
    machines = 0
    steps = 0


class BudgetSpent(BaseException):
    """The time budget is over (not an Exception: hypothesis lets it through)."""


def spend() -> None:
    if time.monotonic() > Fleet.deadline:
        raise BudgetSpent()


def check(condition: object, message: object) -> None:
    """An invariant; a failure keeps the budget from cutting the replay short."""
    if not condition:
        Fleet.deadline = float("inf")
        # Printed at once: a replay that goes another way (timing) must not hide it.
        print(f"\nMODEL INVARIANT BROKEN (MODEL_SEED={Fleet.seed}) after: {' -> '.join(Fleet.trace)}\n{message}",
              flush=True)
        raise AssertionError(message)


def committed_before_stop(log: str) -> bool:
    """The agent said it reboots (its last step before `systemctl reboot` or
    `kexec`) before it saw the stop: the reboot was already under way, as a
    reboot job systemd has queued is not taken back by stopping the agent."""
    stop = log.find("received signal")
    commit = max(log.rfind("nixos-autodeploy: rebooting into "), log.rfind("nixos-autodeploy: kexec into "))
    return commit != -1 and (stop == -1 or commit < stop)


def reported(function):
    """Any failure inside a step is printed with the steps before it and the seed."""
    import functools
    import traceback

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception:
            if Fleet.deadline != float("inf"):
                Fleet.deadline = float("inf")
                print(f"\nMODEL STEP FAILED (MODEL_SEED={Fleet.seed}) after: {' -> '.join(Fleet.trace)}\n"
                      f"{traceback.format_exc()[-6000:]}", flush=True)
            raise
    return wrapper


class HostModel(RuleBasedStateMachine):
    """One fleet host over a random life."""

    def __init__(self) -> None:
        super().__init__()
        self.host: world_mod.Host | None = None

    # -- setup -------------------------------------------------------------

    @initialize()
    @reported
    def install(self) -> None:
        spend()
        Fleet.trace = ["install"]
        Fleet.machines += 1
        name = f"m{Fleet.machines}-{uuid.uuid4().hex[:6]}"
        self.path = f"/{name}"
        self.group = name.replace("-", ".")
        self.host = world_mod.Host(Fleet.root / name, Fleet.world, Fleet.server)
        self.host.install(Fleet.world.path("a"))
        self.host.url = Fleet.server.pointer(Fleet.world.path("a"), self.path)
        (self.host.root / "machine-id").write_text(uuid.uuid4().hex + "\n")
        self.kinds: dict[str, str] = {Fleet.world.path("a"): "good"}
        self.suspended = False
        self.window, self.slot_free = True, True
        self.completed = False   # the last run ended normally (not stopped, not killed)
        self.running_bad_since_allowed = False
        self.run(window=True, slot=True)

    def teardown(self) -> None:
        if self.host is not None:
            self.host.cleanup()

    # -- the agent ---------------------------------------------------------

    def argv(self) -> list[str]:
        return ["--once", "--url", self.host.url, "--prometheus-path", world_mod.METRICS, "--switch-mode", "boot",
                "--reboot-mode", "reboot", "--reboot-window", "02:00-04:00", "--fleetlock-url",
                Fleet.fleetlock.url, "--fleetlock-group", self.group, "--health-check", CHECK, "--timeout", "10"]

    def env(self) -> dict[str, str]:
        return {"NIXOS_AUTODEPLOY_NOW": NOW[self.window],
                "NIXOS_AUTODEPLOY_MACHINE_ID_FILE": str(self.host.root / "machine-id")}

    def set_slot(self, free: bool) -> None:
        self.slot_free = free
        Fleet.fleetlock.operate("steady-state" if free else "pre-reboot", "someone-else", self.group)

    def snapshot(self) -> tuple:
        h = self.host
        return (h.current, h.profile, h.ctl("boot-default").read_text(), len(h.activations()), self.reboots())

    def reboots(self) -> int:
        return sum(1 for c in self.host.calls() if c in ("systemctl reboot", "systemctl kexec"))

    def run(self, window: bool, slot: bool) -> world_mod.RunResult:
        self.window = window
        self.set_slot(slot)
        before, reboots = self.snapshot(), self.reboots()
        r = self.host.agent(*self.argv(), env=self.env(), timeout=300)
        Fleet.steps += 1
        check(r.returncode in (0, 5), f"exit {r.returncode}:\n{r.stderr[-4000:]}")
        check("Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-4000:])
        self.completed = True
        if self.suspended:
            check(self.snapshot() == before, "the host changed while suspended:\n" + r.stderr[-4000:])
        bad = self.kinds.get(self.host.current) == "unhealthy"
        if bad and window and slot and not self.suspended:
            check(self.reboots() > reboots, "stays on a system that failed its checks although window and slot "
                                            "allow a reboot:\n" + r.stderr[-4000:])
        return r

    # -- rules -------------------------------------------------------------

    @rule(build=st.sampled_from(BUILDS), kind=st.sampled_from(KINDS), wave=st.sampled_from(["all", "none"]),
          pause=st.booleans())
    @reported
    def publish(self, build: str, kind: str, wave: str, pause: bool) -> None:
        spend()
        Fleet.trace.append(f"publish(build={build!r}, kind={kind!r}, wave={wave!r}, pause={pause!r})")
        path = Fleet.world.path(build)
        kind = self.kinds.setdefault(path, kind)  # a build's nature does not change
        unhealthy = [p for p, k in self.kinds.items() if k == "unhealthy"]
        self.host.ctl("unhealthy").write_text("".join(p + "\n" for p in unhealthy))
        lines = [path] + (["rollout: 0%"] if wave == "none" else []) + (["pause: true"] if pause else [])
        Fleet.server.set(self.path, "\n".join(lines) + "\n")

    @rule(window=st.booleans(), slot=st.booleans())
    @reported
    def agent_runs(self, window: bool, slot: bool) -> None:
        spend()
        Fleet.trace.append(f"agent_runs(window={window!r}, slot={slot!r})")
        self.run(window, slot)

    @rule()
    @reported
    def reboot(self) -> None:
        """The host reboots (the agent asked for it, or anything else did); a
        build whose boot fails makes the boot loader fall back."""
        Fleet.trace.append("reboot()")
        h = self.host
        default = h.ctl("boot-default").read_text().strip()
        if self.kinds.get(default) == "noboot":
            h.ctl("boot-default").write_text(h.current + "\n")
        h.reboot()

    @rule(delay=st.floats(0.0, 1.5))
    @reported
    def power_loss(self, delay: float) -> None:
        """SIGKILL at a random moment of a run (its activation too), then the host boots."""
        spend()
        Fleet.trace.append(f"power_loss(delay={delay!r})")
        h = self.host
        proc = h.agent_background(*self.argv(), env=self.env())
        Fleet.steps += 1
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        h.kill_orphans()
        self.completed = False
        self.reboot()

    @rule(delay=st.floats(0.0, 1.5), whole_unit=st.booleans())
    @reported
    def stop_request(self, delay: float, whole_unit: bool) -> None:
        """SIGTERM to the agent (or `systemctl stop`: to all of its unit) at a random moment."""
        spend()
        Fleet.trace.append(f"stop_request(delay={delay!r}, whole_unit={whole_unit!r})")
        h = self.host
        proc = h.agent_background(*self.argv(), env=self.env())
        Fleet.steps += 1
        time.sleep(delay)
        reboots = self.reboots()
        if proc.poll() is None:
            if whole_unit:
                h.stop_unit(proc)
            else:
                proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            log = proc.log_path.read_text()
            check(self.reboots() == reboots or committed_before_stop(log), "a reboot after a stop request:\n" + log[-4000:])
            self.completed = False
        # -SIGTERM: the signal came while the interpreter was already exiting.
        check(proc.returncode in (0, 5, -signal.SIGTERM), proc.log_path.read_text()[-4000:])
        h.kill_orphans()  # the stand-in activation "unit", if one runs on: finished by the next run's wait

    @rule()
    @reported
    def toggle_suspend(self) -> None:
        spend()
        Fleet.trace.append("toggle_suspend()")
        r = self.host.agent("resume" if self.suspended else "suspend")
        check(r.returncode == 0, r.stderr)
        self.suspended = not self.suspended

    # -- invariants ----------------------------------------------------------

    @invariant()
    @reported
    def consistent_after_a_completed_run(self) -> None:
        if self.host is None or not self.completed:
            return
        h = self.host
        state = h.state()
        shown = h.agent("status", "--json")
        check(shown.returncode == 0, f"status failed ({shown.returncode}): {shown.stderr[-3000:]}")
        status = json.loads(shown.stdout)
        check(status["phase"] != "dirty", f"dirty without a manual deploy: {json.dumps(state)[:3000]}")
        if self.suspended:
            return
        check(state.get("intent") is None, state.get("intent"))
        check(h.profile == state["deployed"], (h.profile, state["deployed"], status["phase"]))
        check(h.ctl("boot-default").read_text().strip() == h.profile or status["phase"] == "fell_back", 'invariant')
        m = h.metrics()
        info = [k for k in m if k.startswith("nixos_autodeploy_info{")][0]
        check(f'deployed_generation="{os.path.basename(state["deployed"])}"' in info, 'invariant')
        check(m[f'nixos_autodeploy_state{{state="{state["last_state"]}"}}'] == 1, 'invariant')
        check(m["nixos_autodeploy_rollbacks_total"] == state["rollbacks_total"], 'invariant')
        failure = state.get("boot_failure")
        if failure:
            check(any(e["path"] == failure["path"] and e["outcome"] == "boot_failed" for e in state["history"]), "a boot failure without its history entry")


def test_model(world, tmp_path):
    seed = int(os.environ.get("MODEL_SEED") or random.randrange(2**32))
    print(f"\nmodel test: MODEL_SEED={seed} MODEL_BUDGET_SECONDS={BUDGET:g}")
    Fleet.world, Fleet.root = world, tmp_path
    Fleet.server = world_mod.PointerServer(world.cache)
    Fleet.fleetlock = world_mod.FleetLockServer(slots=1)
    Fleet.deadline = time.monotonic() + BUDGET
    Fleet.seed = seed
    started = time.monotonic()
    try:
        test = get_state_machine_test(HostModel, _min_steps=10, settings=settings(
            max_examples=1000, stateful_step_count=20, deadline=None, database=None, derandomize=False,
            suppress_health_check=list(HealthCheck), verbosity=Verbosity.normal,
            phases=(Phase.explicit, Phase.generate)))
        try:
            hypothesis.seed(seed)(test)()
        except BudgetSpent:
            pass
        except hypothesis.errors.FlakyStrategyDefinition:
            # The budget ended an example in the middle, which hypothesis sees
            # as a shorter run of a known prefix; only a failure counts.
            if Fleet.deadline == float("inf") or time.monotonic() < Fleet.deadline:
                raise
    finally:
        Fleet.server.close()
        Fleet.fleetlock.close()
        print(f"model test: {Fleet.machines} hosts, {Fleet.steps} agent runs in {time.monotonic() - started:.0f}s "
              f"(MODEL_SEED={seed})")
