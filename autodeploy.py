#!/usr/bin/env python3
"""nixos-autodeploy: a pull-based deployment agent for NixOS hosts.

CI builds each host's NixOS system, pushes its closure to a binary cache and
publishes a *pointer*: a small text document whose first line is the store
path of the system (optionally followed by ``key: value`` lines and an
OpenSSH signature at ``URL.sig``).  On every host this agent, one cycle at a
time:

 1. fetches the pointer with urllib (proxies from the environment, one
    deadline for the whole fetch, bounded body, retries of transient
    failures, a conditional request only where the validators belong to a
    pointer checked against the current URL, keys and host name),
 2. validates it (a plain store path, never a ``.drv``; signature, revision,
    host list and expiry when ``--trusted-keys`` is given),
 3. decides, from /run/current-system, /run/booted-system, the system profile,
    the upstream path and its own persisted record, what to do (table below),
 4. realises the closure from the binary cache (``nix-store --realise``,
    then ``--verify-path`` on the closure and ``--realise --repair`` from the cache
    for what a power loss left registered but damaged; the device never
    builds; a build waiting for its rollout wave is realised at once, its
    *prefetch*, so that its turn costs only the activation) and
    checks that it is a NixOS system for this machine,
 5. sets the system profile and activates it through ``systemd-run``
    (``switch``, ``boot``, or ``smart`` = boot only when kernel, initrd or
    modules change),
 6. runs health checks (can it still fetch the pointer? ``--health-check``
    commands) and rolls back to the previous system when anything fails,
 7. records what it deployed (atomically, in the state directory),
 8. reboots or kexecs when asked to and inside the reboot window,
 9. writes Prometheus metrics (atomically, on every run, failures included).

Every step that changes the host is preceded by an *intent* written to the
state file, so a cycle that was killed (SIGKILL, power loss) is finished or
rolled back by the next one.

The cycle is a small state machine.  Every cycle first reads the facts in
one place (the links, the profile, the boot ID, the staged marker, the state
record, the boot check, whether this boot came from our kexec) and computes
the host's *phase* (``host_phase()``): interrupted (an intent on disk),
untracked (no record), settled, staged (not rebooted yet), booted_unverified,
fell_back (rebooted, but not into the staged release), rolled_back_awaiting_reboot,
rolled_back_by_hand (profile and current system switched back by hand to a
system this agent deployed earlier: ``nixos-rebuild switch --rollback``),
dirty (profile or current system changed by someone else).  Upstream is
``deployed`` (what the record says), ``running`` (current == profile ==
upstream, not the record) or ``new``.  ``plan()`` turns phase x upstream into
the ordered steps of the cycle; this is ``DECISION_TABLE`` (a test checks
that this text is the code's table).  Follow-through of the previous deploy
comes first:

    | phase                       | upstream | steps, in order                                        |
    |-----------------------------|----------|--------------------------------------------------------|
    | interrupted                 | deployed | recover                                                |
    | interrupted                 | running  | recover                                                |
    | interrupted                 | new      | recover                                                |
    | untracked                   | running  | track, release_slot                                    |
    | untracked                   | new      | nothing (dirty)                                        |
    | settled                     | deployed | release_slot                                           |
    | settled                     | new      | release_slot, prefetch, deploy, reboot_release         |
    | staged                      | deployed | reboot_release                                         |
    | staged                      | new      | prefetch, deploy, reboot_release                       |
    | booted_unverified           | deployed | verify, release_slot                                   |
    | booted_unverified           | new      | verify, release_slot, prefetch, deploy, reboot_release |
    | fell_back                   | deployed | report_fallback                                        |
    | fell_back                   | new      | report_fallback                                        |
    | rolled_back_awaiting_reboot | deployed | reboot_rollback                                        |
    | rolled_back_awaiting_reboot | new      | reboot_rollback, prefetch, deploy, reboot_release      |
    | rolled_back_by_hand         | deployed | accept_rollback                                        |
    | rolled_back_by_hand         | running  | accept_rollback                                        |
    | rolled_back_by_hand         | new      | accept_rollback                                        |
    | dirty                       | deployed | nothing (dirty)                                        |
    | dirty                       | running  | resume, release_slot                                   |
    | dirty                       | new      | nothing (dirty)                                        |

``--force`` turns "nothing (dirty)" into deploy, reboot_release.  A cycle
that recovered an interrupted deploy plans again from the new facts.  A
prefetch step stays only where the deploy after it waits (a deploy that
runs realises by itself).  Without ``--accept-manual-rollback``,
rolled_back_by_hand plans like dirty; with it, accept_rollback quarantines
the build that was rolled back, records what runs, and the cycle plans again.  A
reboot step runs only while something is staged; release_slot only once the
host runs its deployed system, verified (and not while the system that did
not boot is quarantined).

Holds: one table (``HOLD_TABLE``) says which hold blocks which step, and one
function (``apply_holds()``) applies it to every step.  A held step is
planned again on every cycle until it runs, so a deferred reboot is never
lost.  The FleetLock slot is asked at the reboot gate, after the other holds:

    | hold        | blocks                                                                                                                |
    |-------------|-----------------------------------------------------------------------------------------------------------------------|
    | stop        | every step                                                                                                            |
    | suspend     | recover, report_fallback, roll_back, accept_rollback, release_slot, prefetch, deploy, reboot_release, reboot_rollback |
    | quarantine  | prefetch, deploy                                                                                                      |
    | wave        | deploy                                                                                                                |
    | pause       | prefetch, deploy, reboot_release                                                                                      |
    | reboot_mode | reboot_release, reboot_rollback                                                                                       |
    | window      | reboot_release, reboot_rollback                                                                                       |
    | slot        | reboot_release, reboot_rollback                                                                                       |

``suspend`` still observes, verifies (a failing check is reported, exit 5,
while the rollback waits), reports and writes metrics.  A stop request
(SIGTERM/SIGINT) is checked between any two steps; a wait (HTTP, the lock
server, a unit, a download) ends at once and writes nothing; a child killed
by the stop is a stop, not a failure; there is never a reboot after one.
``--dry-run`` prints the plan the real run would execute, holds and their
reasons included, and executes nothing.

Exit codes:

    0  cycle completed (up to date, deployed, tracking, dirty, suspended, quarantined,
       waiting for its rollout wave or a reboot slot, rollout paused)
    1  unexpected internal error
    2  usage: bad option or value
    3  fetch failed (HTTP error, timeout, connection refused, TLS, Content-Encoding)
    4  pointer refused (not a plain store path, metadata, signature, downgrade, other host, expired,
       malformed rollout fields)
    5  deploy failed: a deploy was attempted (realise, not a NixOS system, no room in /boot,
       activation, health check, the staged system did not boot); host rolled back
    6  another run holds the host lock
    7  rollback failed: the host needs a human
    8  not a NixOS host (/run/current-system is missing)
    9  state: corrupt or unreadable (fail closed until `trust-reset`), unsafe directory, or not saved

`promote` (CI side) exits 0 advance, 10 hold, 11 halt, 12 complete, besides 2,
3 (Prometheus unreachable or a query error: nothing written) and 4.

A SIGTERM/SIGINT while the agent only waits (a fetch, the lock server, a
unit, a download) ends the run at once, writing nothing (exit 0); otherwise
the current step is finished first and the run ends before the next one.

Logs go to stderr, results (``status``, ``--dry-run``) to stdout.

The documentation is in docs/: docs/design/lifecycle.md (these tables),
docs/reference/ (command line, metrics, status, state files, exit codes).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field

# Heavy or rarely needed modules (subprocess, http.client, ssl, hashlib,
# datetime, socket, tempfile) are imported where they are used: a no-op cycle
# and `status` start faster without them.  typing is for annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any, Callable, Final, NoReturn

    # How a refused pointer is shown in its error (escaped, redacted, or withheld).
    Excerpt = Callable[[bytes | str], str] | None

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

VERSION: Final = "0.1.0"
PROG: Final = "nixos-autodeploy"
USER_AGENT: Final = f"{PROG}/{VERSION}"

STORE_DIR: Final = "/nix/store"
CURRENT_SYSTEM: Final = "/run/current-system"
BOOTED_SYSTEM: Final = "/run/booted-system"
SYSTEM_PROFILE: Final = "/nix/var/nix/profiles/system"
UPSTREAM_GCROOT: Final = "/run/upstream-system"
# The GC root of a closure realised ahead of its turn (one build at a time).
PREFETCH_GCROOT: Final = "/run/nixos-autodeploy-prefetch"
# /run is a tmpfs on NixOS: files here vanish on reboot, which is how the agent
# tells "not rebooted yet" from "rebooted, but into the previous system".
RUNTIME_DIR: Final = "/run/nixos-autodeploy"
STAGED_MARKER: Final = RUNTIME_DIR + "/staged"
ACTIVATING_MARKER: Final = RUNTIME_DIR + "/activating"
# One lock per host, whatever --state-dir says: two agents must never
# deploy at the same time.
HOST_LOCK: Final = RUNTIME_DIR + "/lock"
DEFAULT_STATE_DIR: Final = "/var/lib/nixos-autodeploy"
STATE_FILE: Final = "state.json"
FLOOR_FILE: Final = "revision-floor"
SUSPEND_FILE: Final = "suspend.json"
MAX_STATE_BYTES: Final = 4 * 1024 * 1024
# Loop mode: a state.json that differs from the one on disk only in these run
# timestamps (and the pointer's fetched_at) is written at most this often;
# every other change is written at once, and a stop writes what is held.
TIMESTAMP_FIELDS: Final = ("last_run", "last_run_duration", "last_success")
TIMESTAMPS_WRITTEN_EVERY_SECONDS: Final = 10.0
MAX_MESSAGE: Final = 1000  # an error message as stored, exported and passed to hooks
RECOVERY_HINT: Final = ("Nothing is deployed until an operator checks the host and runs "
                        "`autodeploy.py trust-reset --min-revision N` (N: the newest revision "
                        "that was published, 0 without signed pointers).")

ACTIVATION_UNIT: Final = "nixos-autodeploy-activation"
# Set (via systemd-run --setenv) for our own activation, so the module's
# activation script does not restart nixos-autodeploy.service under our feet.
ACTIVATION_ENV: Final = "NIXOS_AUTODEPLOY_ACTIVATION"
# Test-only clock injection for reboot windows (local time, ISO 8601).
NOW_ENV: Final = "NIXOS_AUTODEPLOY_NOW"

SIGNATURE_NAMESPACE: Final = "nixos-autodeploy"
SIGN_DEFAULT_VALIDITY_DAYS: Final = 30
# Pointer metadata keys; anything else must start with `x-` (so that a
# misspelled restriction such as `host:` is refused, not ignored).
POINTER_KEYS: Final = ("revision", "hosts", "not-after", "rollout", "rollout-start", "rollout-duration", "pause")
POINTER_KEY_CHARS: Final = "abcdefghijklmnopqrstuvwxyz0123456789-"
MAX_REVISION: Final = 2**63 - 1

# Fetching.
MAX_POINTER_BYTES: Final = 64 * 1024
MAX_SIGNATURE_BYTES: Final = 16 * 1024
# A pointer body is kept (for 304 replays) only up to this size; a larger
# one is always fetched whole.
MAX_PERSISTED_POINTER: Final = 8 * 1024
MAX_VALIDATOR: Final = 256
MAX_HEADER_LINE: Final = 65536
MAX_INTERIM_RESPONSES: Final = 8
MAX_REDIRECTS: Final = 5
BODY_READ_PIECE: Final = 16 * 1024
FETCH_TRIES: Final = 4
RETRY_BASE_SECONDS: Final = 1.0
# Validators can be weak (nginx's ETag has one-second resolution): fetch
# unconditionally at least this often.
UNCONDITIONAL_EVERY_SECONDS: Final = 3600
NIX_BASE32: Final = "0123456789abcdfghijklmnpqrsvwxyz"
KEY_TYPES: Final = ("ssh-", "ecdsa-", "sk-")
# authorized_keys options that take no value: at the start of a trusted-keys
# line they would be read as a principal's name (sshd(8), AUTHORIZED_KEYS).
AUTHORIZED_KEYS_FLAGS: Final = frozenset((
    "agent-forwarding", "cert-authority", "no-agent-forwarding", "no-port-forwarding", "no-pty", "no-user-rc",
    "no-x11-forwarding", "port-forwarding", "pty", "restrict", "user-rc", "x11-forwarding", "no-touch-required",
    "verify-required"))
ACTIVATION_WAIT_SECONDS: Final = 600

# Boot assessment, /boot space and history (see docs/how-to/boot-safety.md).
BOOT_DIR: Final = "/boot"
# Where the boot loader's entries and the kernels it copies live ($BOOT), when
# --boot-dir does not say: the first of these that looks like one.  NixOS puts
# them at boot.loader.systemd-boot.xbootldrMountPoint, else at
# boot.loader.efi.efiSysMountPoint (nixpkgs' systemd-boot.nix: bootMountPoint;
# systemd-boot-builder.py writes loader/entries and EFI/nixos there), whose
# default is /boot; /boot/efi and /efi are the other common ESP mount points.
# GRUB copies kernels into /boot/kernels whatever the ESP.
BOOT_DIR_CANDIDATES: Final = ("/boot", "/efi", "/boot/efi")
BOOT_DIR_MARKERS: Final = ("loader/entries", "EFI/nixos", "grub", "kernels")
# Free space that must remain in /boot after the new kernel and initrd: the
# loader entries, initrd secrets appended to the copied initrd, and the
# filesystem's own overhead (FAT clusters) need room too.
BOOT_SPACE_MARGIN_BYTES: Final = 4 * 1024 * 1024
BOOT_SPACE_MARGIN_FRACTION: Final = 0.1
BOOT_ID_FILE: Final = "/proc/sys/kernel/random/boot_id"
# systemd's Boot Loader Interface variables (vendor GUID of systemd-boot).
EFIVARS_DIR: Final = "/sys/firmware/efi/efivars"
# x86 boot parameters as the boot loader (or kexec) handed them to the kernel.
BOOT_PARAMS_FILE: Final = "/sys/kernel/boot_params/data"
# Test-only: a file standing in for BOOT_PARAMS_FILE (the test machine's own says how it booted).
BOOT_PARAMS_ENV: Final = "NIXOS_AUTODEPLOY_BOOT_PARAMS"
LOADER_GUID: Final = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
# Test-only: a directory standing in for EFIVARS_DIR (the test machines boot without EFI).
EFIVARS_ENV: Final = "NIXOS_AUTODEPLOY_EFIVARS"
BOOT_CHECK_FILE: Final = "boot-check.json"  # in the state directory, written by `check-boot`
BOOT_CHECK_RETRY_SECONDS: Final = 5.0
HISTORY_LENGTH: Final = 20
POINTER_REFUSAL_REASONS: Final = ("signature", "revision", "host", "expired", "malformed")
# Rollout waves: a host's bucket is sha256(hostname NUL store path) mod this.
ROLLOUT_BUCKETS: Final = 10000
# FleetLock reboot slots (coreos/zincati docs/development/fleetlock/protocol.md).
FLEETLOCK_DEFAULT_GROUP: Final = "default"
# What lock servers answer when every slot is taken: the protocol document's
# example, poseidon/fleetlock (423 "locked"), coreos/airlock ("failed_lock").
FLEETLOCK_BUSY_KINDS: Final = frozenset(("failed_lock_semaphore_full", "locked", "failed_lock"))
FLEETLOCK_SLOT_BUSY: Final = "slot_busy"
MAX_FLEETLOCK_REPLY_BYTES: Final = 4096
MACHINE_ID_FILE: Final = "/etc/machine-id"
# Test-only: read the machine id from this file instead of /etc/machine-id.
MACHINE_ID_ENV: Final = "NIXOS_AUTODEPLOY_MACHINE_ID_FILE"
# Our application id for the app-specific machine id sent as FleetLock `id`
# (as sd_id128_get_machine_app_specific(3) derives it; never the raw id).
FLEETLOCK_APP_ID: Final = "132df055f2ca4227bc22539b0cad97fe"
# In /run, so it is gone after a reboot: the FleetLock initialization step
# (release any slot held from before) has been done since this boot.
FLEETLOCK_STEADY_MARKER: Final = RUNTIME_DIR + "/fleetlock-steady"

# ---------------------------------------------------------------------------
# Errors: one base class carrying its exit code; main() turns them into exits
# ---------------------------------------------------------------------------


class AutodeployError(Exception):
    exit_code = 1
    kind = "internal"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind  # a finer kind for metrics and hooks


class UsageError(AutodeployError):
    exit_code = 2
    kind = "usage"


class FetchError(AutodeployError):
    exit_code = 3
    kind = "fetch"

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient  # the network failed, not the answer: worth another try


class PointerError(AutodeployError):
    exit_code = 4
    kind = "pointer"


class DeployError(AutodeployError):
    exit_code = 5
    kind = "deploy"


class LockHeld(AutodeployError):
    exit_code = 6
    kind = "lock"


class RollbackError(AutodeployError):
    exit_code = 7
    kind = "rollback"


class NotNixOS(AutodeployError):
    exit_code = 8
    kind = "not_nixos"


class StateError(AutodeployError):
    """The state cannot be trusted or saved (corrupt, unsafe directory,
    disk full): fail closed, deploy nothing."""

    exit_code = 9
    kind = "state"


class Interrupted(BaseException):
    """SIGTERM/SIGINT while waiting on the network or a unit: the run ends
    now, changing nothing (raised only inside Stopping.interruptible())."""


class ProcessError(AutodeployError):
    """A command exited non-zero (or timed out); callers wrap it in a domain error."""

    def __init__(self, argv: list[str], returncode: int, output: str = "") -> None:
        self.argv, self.returncode, self.output = argv, returncode, output
        detail = f": {outside_text(output.strip())[-500:]}" if output.strip() else ""
        super().__init__(f"{os.path.basename(argv[0])} exited with {returncode}{detail}")


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class SwitchMode(enum.Enum):
    SWITCH = "switch"
    BOOT = "boot"
    SMART = "smart"


class RebootMode(enum.Enum):
    REBOOT = "reboot"
    KEXEC = "kexec"


# hlsb-fulda/nixos-autodeploy's CLI (clap's ValueEnum, kebab-case: the variant
# KExec is spelled `k-exec`) takes `-r k-exec`; users carry it over in extraArgs.
REBOOT_MODE_ALIASES: Final = {"k-exec": RebootMode.KEXEC}


def reboot_mode_arg(text: str) -> RebootMode:
    """`--reboot-mode` as argparse's type: our spellings and the original's."""
    if text in REBOOT_MODE_ALIASES:
        return REBOOT_MODE_ALIASES[text]
    return RebootMode(text)


reboot_mode_arg.__name__ = "reboot mode"  # argparse's "invalid reboot mode value: ..."


def absolute_dir(text: str) -> str:
    """An absolute directory path as argparse's type (--boot-dir)."""
    if not text.startswith("/") or "\0" in text:
        raise ValueError(text)
    return os.path.normpath(text)


absolute_dir.__name__ = "absolute path"


STATES: Final = (
    "up_to_date", "tracking", "deployed", "pending_reboot", "dirty", "failed",
    "rolled_back", "quarantined", "suspended", "refused", "booted_previous",
    "boot_failed", "waiting_rollout", "rollout_paused", "waiting_reboot_slot",
)


@dataclass(frozen=True)
class Config:
    url: str
    once: bool = False
    switch_mode: SwitchMode = SwitchMode.SWITCH
    reboot_mode: RebootMode | None = None
    prometheus_path: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    force: bool = False
    dry_run: bool = False
    timeout: float = 30.0
    interval: float = 300.0
    verbose: bool = False
    health_checks: tuple[str, ...] = ()
    health_timeout: float = 120.0
    connectivity_check: bool = True
    # Where the boot loader's entries and kernels are (--boot-dir); None: found
    # among BOOT_DIR_CANDIDATES (boot_dir_of).
    boot_dir: str | None = None
    reboot_window: tuple[int, int] | None = None  # minutes after midnight
    trusted_keys: str | None = None
    signature_url: str | None = None
    hostname: str | None = None
    token_file: str | None = None
    json_field: str | None = None
    on_success: str | None = None
    on_failure: str | None = None
    hook_timeout: float = 60.0
    fleetlock_url: str | None = None
    fleetlock_group: str = FLEETLOCK_DEFAULT_GROUP
    # A hand switch back to a system this agent deployed earlier is a verdict
    # on the build it replaced (quarantined), not a manual deploy.
    accept_manual_rollback: bool = False


@dataclass(frozen=True)
class HostView:
    """What the host runs, read from symlinks (no process is spawned)."""

    current: str | None
    booted: str | None
    profile: str | None


@dataclass(frozen=True)
class Pointer:
    path: str
    metadata: dict[str, str]
    revision: int | None = None
    signed: bool = False
    foreign: bool = False  # served by a redirect target on another origin: its text is never shown

    def show(self, text: str) -> str:
        """Its text in an error: escaped and shortened, or withheld (see withheld())."""
        return withheld(text) if self.foreign else shorten(text)


@dataclass
class State:
    """Everything the agent persists between cycles (state.json)."""

    deployed: str | None = None         # what we deployed (or adopted)
    staged_from: str | None = None      # current system when `deployed` was staged
    activation: str | None = None       # "switch" or "boot"
    verified: bool = True               # health-checked after running it
    previous: str | None = None         # profile target before the deploy
    deployed_at: float | None = None
    upstream: str | None = None         # last upstream seen
    upstream_revision: int | None = None
    highest_revision: int | None = None  # the revision floor (also in revision-floor)
    revision_path: str | None = None
    pointer: dict[str, Any] | None = None  # a PointerRecord: what a 304 may replay
    quarantined: str | None = None
    quarantine_reason: str | None = None
    interrupted: dict[str, int] = field(default_factory=dict)
    intent: dict[str, Any] | None = None
    rollbacks_total: int = 0
    deploys_total: int = 0
    last_run: float | None = None
    last_success: float | None = None
    last_run_success: bool | None = None
    last_run_duration: float | None = None
    last_state: str | None = None
    last_reason: str | None = None
    last_error: dict[str, str] | None = None
    dirty: bool = False
    reboot_required: bool = False
    reboot_reason: str | None = None
    # Boot safety (docs/how-to/boot-safety.md).
    staged_boot_id: str | None = None    # boot ID when `deployed` was staged for boot
    boot_failures_total: int = 0
    boot_failure: dict[str, Any] | None = None  # the last staged system that did not boot
    boot_free_bytes: int | None = None   # free space in a separate /boot (None: not separate)
    boot_needed_bytes: int | None = None  # what the last deploy needed there (with the margin)
    behind_since: float | None = None    # since when the host does not run upstream
    reboot_window_wait: bool = False     # a due reboot waits for --reboot-window
    history: list[dict[str, Any]] = field(default_factory=list)  # last HISTORY_LENGTH attempts
    rollout: dict[str, Any] | None = None          # this host's wave for upstream (see rollout_view)
    reboot_slot: dict[str, Any] | None = None      # a FleetLock slot we may hold (asked, not released)
    fleetlock_failures: dict[str, int] = field(default_factory=dict)  # "operation:kind" -> count
    fleetlock_error: dict[str, str] | None = None  # the last lock operation's error, while unresolved
    rollback_of: str | None = None       # `deployed` is a rollback away from this failed release (reboot due)
    reboot_request: dict[str, Any] | None = None  # the last reboot/kexec asked for: {mode, boot_id, system, time}
    # The firmware boot systemd-boot's variables describe, as first seen: {boot_id, fingerprint}.
    loader_boot: dict[str, Any] | None = None
    # Ready before its turn: the closure realised while the deploy waits.
    prefetched: dict[str, Any] | None = None      # {path, time, boot_id}: rooted at PREFETCH_GCROOT
    prefetch_failures_total: int = 0
    prefetch_error: dict[str, Any] | None = None  # the last failed prefetch {path, message, time}, until one succeeds
    # A hand switch back to a system this agent deployed (--accept-manual-rollback).
    manual_rollback: dict[str, Any] | None = None  # the last one: {path (rolled back), to, time}
    manual_rollbacks_total: int = 0
    # Keys of state.json this version does not know (a newer or older agent's): kept on save.
    unknown: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, metadata={"stored": False})

    def to_json(self) -> str:
        # A shallow dict and no indent: json's C encoder, several times
        # faster than asdict()'s deep copy and the indenting Python encoder
        # (this runs more than once per poll in loop mode).
        known = {name: getattr(self, name) for name in field_types(State)}
        return json.dumps({**self.unknown, **known}, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: Any, where: str) -> State:
        """Every known field must pass its validator in STATE_SCHEMA (inner
        types and ranges; a field without one: its declared type); unknown
        fields, from another version, are kept as they are and written back;
        renamed fields are migrated.  Anything else is a corrupt file: the run
        fails closed (exit 9) and `status` names the field."""
        if not isinstance(data, dict):
            raise StateError(f"{where} is corrupt (not a JSON object). {RECOVERY_HINT}")
        data = migrate_state(data)
        values: dict[str, Any] = {}
        types_of = field_types(cls)
        unknown = {key: value for key, value in data.items() if key not in types_of}
        for name, types in types_of.items():
            if name not in data:
                continue
            value = data[name]
            check = STATE_SCHEMA.get(name)
            ok = check[0](value) if check is not None else json_matches(value, types)
            if not ok:
                what = check[1] if check is not None else "of its declared type"
                raise StateError(f"{where} is corrupt ({name} is not {what}). {RECOVERY_HINT}")
            values[name] = value
        return cls(**values, unknown=unknown)


def migrate_state(data: dict[str, Any]) -> dict[str, Any]:
    """state.json written by an older agent, in today's terms.  Before
    `rollback_of`, a rollback after a failed boot was recorded as a boot
    deploy of the previous system staged from (and quarantining) the failed
    one."""
    data = dict(data)
    if "rollback_of" not in data and data.get("activation") == "boot" and data.get("deployed") \
            and data.get("staged_from") and data.get("staged_from") == data.get("previous") == data.get("quarantined") \
            and data.get("deployed") != data.get("staged_from"):
        data["rollback_of"] = data["staged_from"]
    return data


# -- The state's schema: one validator per field (predicate, what it must be).
# Counters fit Prometheus' and every consumer's 64 bits; times are finite.

MAX_COUNT: Final = 2**64 - 1
MAX_SECONDS: Final = 2.0**40  # Unix times and durations (about the year 36800)


def valid_revision(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REVISION


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, low: float = -MAX_SECONDS, high: float = MAX_SECONDS) -> bool:
    """A finite JSON number in [low, high] (a huge integer is compared, never converted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return low <= value <= high  # False for NaN; inf is out of range


def _count(value: Any) -> bool:
    return _integer(value) and 0 <= value <= MAX_COUNT


def _moment(value: Any) -> bool:
    return _number(value, 0)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _map_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())


def _record(fields: dict[str, Callable[[Any], bool]], required: tuple[str, ...] = ()) -> Callable[[Any], bool]:
    """A JSON object whose known keys pass their checks (others, from another
    version, are kept) and that has every required key."""
    def check(value: Any) -> bool:
        return (isinstance(value, dict) and all(key in value for key in required)
                and all(fields[key](v) for key, v in value.items() if key in fields))
    return check


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


# What a deploy's intent may hold (state.json's `intent`).
INTENT_FIELDS: Final = {
    "phase": (str,), "upstream": (str,), "action": (str,), "previous_profile": (str, type(None)),
    "previous_current": (str, type(None)), "started": (float,), "activated": (bool,), "reason": (str,),
    "count": (bool,),
}
_opt_text, _opt_moment, _opt_count = _optional(_text), _optional(_moment), _optional(_count)
HISTORY_ENTRY: Final = _record({
    "time": _moment, "path": _opt_text, "revision": _optional(valid_revision), "action": _opt_text,
    "outcome": _opt_text, "duration": _optional(lambda v: _number(v, 0)), "error_kind": _opt_text})
ROLLOUT_VIEW: Final = _record({
    "target": _text, "hostname": _text, "bucket": lambda v: _integer(v) and 0 <= v < ROLLOUT_BUCKETS,
    "start_percent": lambda v: _number(v, 0, 100), "percent": lambda v: _number(v, 0, 100),
    "start": _optional(_number), "duration": _optional(lambda v: _number(v, 0) and v > 0), "paused": _flag,
    "admitted": _flag, "turn_at": _optional(_number),
}, required=("target", "bucket", "start_percent", "start", "duration", "percent", "paused"))
STATE_SCHEMA: Final[dict[str, tuple[Callable[[Any], bool], str]]] = {
    **{name: (_opt_text, "a string or null") for name in (
        "deployed", "staged_from", "activation", "previous", "upstream", "revision_path", "quarantined",
        "quarantine_reason", "last_state", "last_reason", "reboot_reason", "staged_boot_id")},
    **{name: (_flag, "true or false") for name in ("verified", "dirty", "reboot_required", "reboot_window_wait")},
    **{name: (_opt_moment, "a Unix time or null") for name in (
        "deployed_at", "last_run", "last_success", "behind_since")},
    **{name: (_count, f"a whole number from 0 to {MAX_COUNT}") for name in (
        "rollbacks_total", "deploys_total", "boot_failures_total", "prefetch_failures_total",
        "manual_rollbacks_total")},
    **{name: (_opt_count, f"a whole number from 0 to {MAX_COUNT} or null") for name in (
        "boot_free_bytes", "boot_needed_bytes")},
    **{name: (_optional(valid_revision), f"a revision from 0 to {MAX_REVISION} or null") for name in (
        "upstream_revision", "highest_revision")},
    "last_run_success": (_optional(_flag), "true, false or null"),
    "last_run_duration": (_optional(lambda v: _number(v, 0)), "a duration in seconds or null"),
    "pointer": (_optional(_map_of(lambda v: True)), "an object or null"),
    "interrupted": (_map_of(_count), "an object of counts"),
    "intent": (_optional(_record({key: (lambda types: lambda v: json_matches(v, types))(types)
                                  for key, types in INTENT_FIELDS.items()})),
               "an object of typed intent fields or null"),
    "last_error": (_optional(lambda v: _map_of(_text)(v) and "kind" in v and "message" in v),
                   "an object of strings with kind and message, or null"),
    "boot_failure": (_optional(_record({"path": _opt_text, "booted": _opt_text, "choice": _opt_text,
                                        "reason": _opt_text, "time": _opt_moment})),
                     "an object of typed boot-failure fields or null"),
    "history": (_list_of(HISTORY_ENTRY), "a list of deploy attempts (objects with typed fields)"),
    "rollout": (_optional(ROLLOUT_VIEW), "a rollout view (an object with typed fields) or null"),
    "reboot_slot": (_optional(_record({"group": _text, "id": _text, "granted": _flag, "since": _moment})),
                    "a reboot slot (an object with typed fields) or null"),
    "fleetlock_failures": (_map_of(_count), "an object of counts"),
    "fleetlock_error": (_optional(_map_of(_text)), "an object of strings or null"),
    "rollback_of": (_opt_text, "a string or null"),
    "reboot_request": (_optional(_record({"mode": _text, "boot_id": _opt_text, "system": _opt_text,
                                          "time": _opt_moment})),
                       "a reboot request (an object with typed fields) or null"),
    "loader_boot": (_optional(_record({"boot_id": _text, "fingerprint": _text}, required=("boot_id", "fingerprint"))),
                    "a boot loader fingerprint (an object of strings) or null"),
    "prefetched": (_optional(_record({"path": _text, "time": _moment, "boot_id": _opt_text}, required=("path",))),
                   "a prefetched closure (an object with typed fields) or null"),
    "prefetch_error": (_optional(_record({"path": _text, "message": _text, "time": _moment},
                                         required=("message",))),
                       "a prefetch error (an object with typed fields) or null"),
    "manual_rollback": (_optional(_record({"path": _opt_text, "to": _opt_text, "time": _moment})),
                        "a manual rollback (an object with typed fields) or null"),
}
_FIELD_TYPES: dict[type, dict[str, tuple[type, ...]]] = {}


def field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The JSON types each field of a dataclass may hold, from its annotation
    (`int | None` -> int, NoneType); computed once per class."""
    if cls not in _FIELD_TYPES:
        kinds = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list,
                 "None": type(None), "Any": object}
        _FIELD_TYPES[cls] = {
            f.name: tuple(kinds.get(alt.strip().split("[", 1)[0], object) for alt in str(f.type).split("|"))
            for f in dataclasses.fields(cls) if f.metadata.get("stored", True)}
    return _FIELD_TYPES[cls]


def json_matches(value: Any, types: tuple[type, ...]) -> bool:
    """Whether a JSON value has one of these types (a float field takes an
    integer; JSON true is never a number)."""
    if isinstance(value, bool):
        return bool in types or object in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


@dataclass(frozen=True)
class RevisionFloor:
    """No signed pointer below this revision (nor another path at it)."""

    revision: int | None
    path: str | None


@dataclass(frozen=True)
class PointerRecord:
    """The last pointer fetched whole, with what it was checked against.
    A 304 replays it only when URL, signature URL, trusted keys and host
    name are still the same: one record, so validators can never vouch
    for a pointer that was not verified under the current keys."""

    url: str                         # sha256 of the pointer URL (no credentials on disk)
    signature_url: str | None        # sha256 of the signature URL, None without keys
    keys: str | None                 # sha256 of the allowed signers, None without keys
    hostname: str | None
    body: str                        # the pointer as served (at most MAX_PERSISTED_POINTER)
    etag: str | None
    last_modified: str | None
    verified: str | None             # sha256 of body + signature that verified
    verified_at: float | None        # when ssh-keygen last verified them
    fetched_at: float                # last unconditional (200) fetch
    # Served by a redirect target on another origin: replayed with its text
    # withheld, as it was first read (a CDN behind a redirect keeps its 304s).
    foreign: bool = False

    @classmethod
    def from_json(cls, data: Any) -> PointerRecord | None:
        """None (fetch unconditionally) for anything that does not fit."""
        try:
            record = cls(**data)
        except TypeError:
            return None
        ok = all(json_matches(getattr(record, name), types) for name, types in field_types(cls).items())
        return record if ok and len(record.body) <= MAX_PERSISTED_POINTER else None


@dataclass
class Outcome:
    """Result of one cycle: what the metrics, hooks and exit code report."""

    state: str
    reason: str
    old_system: str | None = None
    new_system: str | None = None
    deployed: bool = False
    error: AutodeployError | None = None
    stopped: bool = False  # a signal ended the run; nothing was recorded
    rebooting: bool = False  # a reboot or kexec was requested: nothing more this cycle


# ---------------------------------------------------------------------------
# Logging (stderr) and small helpers
# ---------------------------------------------------------------------------

_verbose = False


def log(message: str) -> None:
    # printable() is the last safety net: whatever a message carries, it
    # cannot move the cursor, forge a line or ring a bell.  Credentials are
    # masked where outside text enters a message (outside_text(), shorten(),
    # redact_url()), never here: a password such as `deploy` must not turn
    # the agent's own words ("deployed") into "***ed".
    print(f"{PROG}: {printable(message)}", file=sys.stderr, flush=True)


def debug(message: str) -> None:
    if _verbose:
        log(message)


def printable(text: str) -> str:
    """Text from outside made safe for terminals, logs, metrics labels, JSON
    and hook variables: every non-printable character (control characters,
    escape sequences, NUL, newlines, bidi overrides) as \\xNN or \\uNNNN."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else
                   f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text)


_secrets: list[str] = []
_secrets_pattern: Any = None


def register_secrets(*values: str | None) -> None:
    """Credentials we hold (bearer token, URL and proxy passwords, their
    Basic encodings): redact() masks them wherever they show up."""
    global _secrets_pattern
    import re
    for value in values:
        if value and len(value) >= 4 and value not in _secrets:
            _secrets.append(value)
            _secrets_pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)),
                                          re.IGNORECASE)


def redact(text: str) -> str:
    return _secrets_pattern.sub("***", text) if _secrets_pattern is not None else text


def outside_text(text: str) -> str:
    """Text that came from outside (a server, an exception, a process) or
    may carry a credential (a URL), made safe to show or store: printable
    and with every credential masked (also when a server echoes one back,
    in any letter case).  Applied to that text where it enters a message,
    never to a whole message: the agent's own words are not masked."""
    if _secrets_pattern is None and text.isprintable():
        return text
    return redact(printable(redact(text)))


def shorten(data: bytes | str, limit: int = 120) -> str:
    """An escaped, redacted, truncated rendering of untrusted input for error
    messages (redacted before it is cut, so no prefix of a secret shows)."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "backslashreplace")
    size = len(data)
    data = redact(data)
    return outside_text(repr(data[:limit])) + (f" ... ({size} characters)" if size > limit else "")


def withheld(_data: bytes | str) -> str:
    """Text a redirect target on another origin served, as we show it: not
    at all (the agent must not become a way to read internal endpoints)."""
    return "(not shown: served by a redirect target on another host)"


def redact_url(url: str) -> str:
    """Mask credentials embedded in a URL (user:password@host)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return printable(url)
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return printable(f"{scheme}://{netloc}{slash}{tail}")


# ---------------------------------------------------------------------------
# Files root writes: nothing else opens a file for writing
# ---------------------------------------------------------------------------


def atomic_write(path: str, data: bytes | str, mode: int = 0o644, *, durable: bool = True) -> None:
    """Write a file so that readers see the old or the new content, never
    half.  The temporary file gets an unpredictable name and is created
    with O_EXCL|O_NOFOLLOW, so a symlink planted in a directory others can
    write (a shared textfile-collector directory) is never followed.  Short
    writes are continued; any failure (ENOSPC) removes the temporary file,
    keeps the old one and raises OSError.  `durable=False` skips the fsyncs
    (file and directory): for what the next run writes anew anyway (the
    metrics), where a power loss may cost the last version, never half of
    one."""
    if isinstance(data, str):
        data = data.encode()
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(8).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if not durable:
        return
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_private_dir(path: str, *, create: bool = False, mode: int = 0o700) -> None:
    """Like sshd's StrictModes: the directory and every directory above it
    are owned by root (or by us) and not writable by group or others
    (unless sticky, like /tmp), and none of them is a symlink planted by
    someone else.  Created with `mode` when missing and `create`."""
    import stat
    if create and not os.path.lexists(path):
        os.makedirs(path, mode=mode, exist_ok=True)
    me = os.geteuid()
    current = os.path.abspath(path)
    first = True
    while True:
        try:
            st = os.lstat(current)
        except OSError as exc:
            raise StateError(f"cannot use {path}: {current}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, me):
                raise StateError(f"refusing {path}: {current} is a symlink owned by uid {st.st_uid}")
            check_private_dir(os.path.realpath(current))
        elif not stat.S_ISDIR(st.st_mode):
            raise StateError(f"refusing {path}: {current} is not a directory")
        elif st.st_uid not in (0, me):
            raise StateError(f"refusing {path}: {current} is owned by uid {st.st_uid}, not root "
                             f"(fix: chown root: {current})")
        elif st.st_mode & 0o022 and (first or not st.st_mode & stat.S_ISVTX):
            raise StateError(f"refusing {path}: {current} is writable by group or others "
                             f"(mode {stat.S_IMODE(st.st_mode):o}; fix: chmod go-w {current})")
        parent = os.path.dirname(current)
        if parent == current:
            return
        current, first = parent, False


def store_path_of(link: str) -> str | None:
    """Follow a symlink chain (profile -> system-N-link -> /nix/store/...)
    until it names a top-level store path; None when missing."""
    path = link
    for _ in range(40):
        if os.path.dirname(path) == STORE_DIR:
            return path
        try:
            target = os.readlink(path)
        except OSError:
            return None
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return None


def basename_or_empty(path: str | None) -> str:
    return os.path.basename(path) if path else ""


def now_local() -> time.struct_time:
    injected = os.environ.get(NOW_ENV)
    if injected:
        from datetime import datetime
        return datetime.fromisoformat(injected).timetuple()
    return time.localtime()


# ---------------------------------------------------------------------------
# Processes: run() is the only place that starts one
# ---------------------------------------------------------------------------


def run(argv: list[str], *, capture: bool = False, check: bool = True,
        timeout: float | None = None, env: dict[str, str] | None = None,
        stdin: bytes | None = None, new_session: bool = False,
        stderr: Any = None) -> subprocess.CompletedProcess[str]:
    """Run a command.  Without capture its output goes to our stderr (the
    journal), never to stdout, which carries results only; `stderr` (a
    file) takes its standard error instead.  When the wait is interrupted
    (a stop request while waiting) the command is ended too."""
    import subprocess
    debug("running: " + " ".join(argv))
    try:
        proc = subprocess.Popen(
            argv, text=True, env=env, start_new_session=new_session,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else sys.stderr.fileno(),
            stderr=subprocess.STDOUT if capture else (stderr if stderr is not None else sys.stderr.fileno()),
        )
    except OSError as exc:
        raise ProcessError(argv, 127, str(exc)) from None
    try:
        out, _ = proc.communicate(stdin.decode() if stdin is not None else None, timeout=timeout)
    except subprocess.TimeoutExpired:
        if new_session:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        proc.kill()
        proc.wait()
        raise ProcessError(argv, -9, f"timed out after {timeout:.0f}s") from None
    except BaseException:
        proc.terminate()  # the wait ended (Interrupted): so does the command
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    result = subprocess.CompletedProcess(argv, proc.returncode, out or "", "")
    if check and proc.returncode != 0:
        raise ProcessError(argv, proc.returncode, out or "")
    return result


def nix_realise(path: str, root: str = UPSTREAM_GCROOT) -> None:
    # Output on stdout is the realised path; nix's progress goes to stderr.
    run(["nix-store", "--realise", path, "--add-root", root], capture=False)


def nix_closure(path: str) -> list[str]:
    out = run(["nix-store", "--query", "--requisites", path], capture=True).stdout
    return [line for line in out.split() if line.startswith(STORE_DIR + "/")]


def nix_broken_paths(paths: list[str]) -> list[str]:
    """The paths whose files differ from what nix registered (missing,
    truncated, modified).  `nix-store --verify-path` reports every modified
    path but stops at the first one it cannot read at all (a lost file):
    such a path is broken too, and verifying goes on after it."""
    import re
    mentioned = re.compile(re.escape(STORE_DIR) + r"/[^/'\"\s]+")
    broken: list[str] = []
    remaining = list(paths)
    while remaining:
        result = run(["nix-store", "--verify-path", *remaining], capture=True, check=False)
        if result.returncode == 0:
            break
        named = [p for p in dict.fromkeys(mentioned.findall(result.stdout)) if p in remaining]
        if not named:
            raise ProcessError(["nix-store", "--verify-path", "..."], result.returncode, result.stdout)
        broken += [p for p in named if p not in broken]
        if not re.search(r"^error:", result.stdout, re.MULTILINE):
            break  # only modified paths: all were checked
        remaining = remaining[max(remaining.index(p) for p in named) + 1:]
    return broken


def nix_repair_paths(paths: list[str]) -> None:
    # From the binary cache only, and never by deleting first: `--realise
    # --repair` of a store path substitutes it into a temporary path and
    # swaps it in; it never turns to the path's deriver (max-jobs 0 would
    # refuse that build anyway).  `--repair-path` does turn to a deriver
    # that is valid on the host (hosts that once built their own system)
    # when the cache cannot give the path, and nix 2.8 deletes the damaged
    # path before it finds that it may not build.
    run(["nix-store", "--option", "max-jobs", "0", "--realise", "--repair", *paths])


def realise_closure(path: str, root: str, verify: bool = True) -> None:
    """Realise `path` from the binary cache and make sure its closure is on
    disk as registered.  nix marks a path valid before its files reach the
    disk: after a power loss the closure can be registered and yet lack
    files, and a realise then does nothing.  Broken paths are repaired from
    the cache.  (`verify=False`: verified since the last boot already.)"""
    nix_realise(path, root)
    if not verify:
        return
    broken = nix_broken_paths(nix_closure(path))
    if not broken:
        return
    log(f"{len(broken)} path(s) of {path}'s closure are registered but damaged on disk (a power loss?): "
        f"repairing them from the binary cache: {' '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}")
    nix_repair_paths(broken)
    still = nix_broken_paths(broken)
    if still:
        raise ProcessError(["nix-store", "--realise", "--repair", *still], 1, "still damaged after the repair")


def nix_set_profile(path: str) -> None:
    run(["nix-env", "--profile", SYSTEM_PROFILE, "--set", path])


def switch_to_configuration(system: str, action: str) -> None:
    """Activate through a transient unit so the activation survives our own
    service being stopped or restarted by that very activation."""
    try:
        write_runtime_marker(ACTIVATING_MARKER, f"{os.getpid()}\n")
    except StateError as exc:
        # A full /run must not stop an activation (or the rollback after
        # one) half-way; without the mark the module's hook may start the
        # agent once more, and that run finds the host lock taken.
        log(f"warning: {exc}; activating anyway")
    import tempfile
    argv = ["systemd-run", f"--unit={ACTIVATION_UNIT}", f"--setenv={ACTIVATION_ENV}=1",
            "--wait", "--pipe", "--collect", "--no-ask-password",
            "--service-type=exec", "--", f"{system}/bin/switch-to-configuration", action]
    try:
        # The unit's and systemd-run's stderr go to a file (no pipe that
        # breaks when we die), relayed to ours afterwards and read for
        # systemd-run's report.
        with tempfile.TemporaryFile() as report:
            result = run(argv, check=False, stderr=report)
            # systemd-run's report comes last: keep the tail of a long output.
            size = report.seek(0, os.SEEK_END)
            report.seek(max(0, size - 1024 * 1024))
            text = report.read().decode("utf-8", "replace")
        sys.stderr.write(text)
        sys.stderr.flush()
    finally:
        try:
            os.unlink(ACTIVATING_MARKER)
        except FileNotFoundError:
            pass
    check_activation(argv, result.returncode, text)


def check_activation(argv: list[str], returncode: int, report: str) -> None:
    """Judge an activation by systemd-run's own report, not only its exit
    status: `systemd-run --wait` exits 0 when the unit's main process was
    killed by SIGTERM, SIGHUP, SIGINT or SIGPIPE (systemd counts them as a
    clean exit), but such an activation stopped half-way."""
    import re
    finished = re.findall(r"^Finished with result: (\S+)", report, re.MULTILINE)
    ended = re.findall(r"^Main processes terminated with: code=(\w+)/status=(\S+)", report, re.MULTILINE)
    if Stopping.requested and returncode < 0:
        # systemd-run itself got the stop (systemctl stop signals the whole
        # unit); the activation unit runs on and the next run converges.
        Stopping.check(ProcessError(argv, returncode, report))
    if ended and ended[-1][0] in ("killed", "dumped"):
        raise ProcessError(argv, returncode or 1, f"the activation was killed by signal {ended[-1][1]} "
                                                  f"(systemd-run: Finished with result: "
                                                  f"{finished[-1] if finished else 'unknown'})")
    if returncode != 0:
        raise ProcessError(argv, returncode, report)


def activation_unit_active() -> bool:
    result = run(["systemctl", "is-active", "--quiet", f"{ACTIVATION_UNIT}.service"], check=False, capture=True)
    return result.returncode == 0


def systemctl(verb: str) -> None:
    run(["systemctl", verb])


def kexec_load(system: str) -> None:
    with open(os.path.join(system, "kernel-params")) as f:
        params = f.read().strip()
    run(["kexec", "--load", os.path.join(system, "kernel"),
         f"--initrd={os.path.join(system, 'initrd')}",
         f"--append={params} init={os.path.join(system, 'init')}"])


def ssh_keygen(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return run(["ssh-keygen", *args], capture=True, check=False, stdin=stdin, timeout=60)


def shell(command: str, *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(["/bin/sh", "-c", command], check=False, timeout=timeout, env=env, new_session=True)


# ---------------------------------------------------------------------------
# Pointer: fetching (urllib, one opener, one deadline per fetch)
# ---------------------------------------------------------------------------


class Deadline:
    """One time budget for a whole fetch: connection, redirects, headers,
    body and retries.  Inside ``guard()`` a SIGALRM timer interrupts even a
    server that trickles a byte a second (a socket timeout alone bounds each
    read, not the request)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def guard(self) -> Any:
        import contextlib

        @contextlib.contextmanager
        def armed() -> Any:
            remaining = self.remaining()
            if remaining <= 0:
                raise _TimeUp()
            try:
                previous = signal.signal(signal.SIGALRM, _on_alarm)
            except ValueError:  # not the main thread: per-read socket timeouts only
                yield
                return
            signal.setitimer(signal.ITIMER_REAL, remaining)
            try:
                yield
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        return armed()


class _TimeUp(BaseException):
    """Raised by the alarm; a BaseException so that no library code that
    catches Exception (or OSError) can swallow it."""


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise _TimeUp()


@dataclass(frozen=True)
class Response:
    status: int                      # 200..299, or 304
    body: bytes
    etag: str | None = None
    last_modified: str | None = None
    foreign: bool = False            # served by a redirect target on another origin
    body_error: str | None = None    # request(answers=True) only: why the body could not be read


def origin_of(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


class Fetcher:
    """GETs with urllib: proxies from the environment (http_proxy,
    https_proxy, no_proxy), at most MAX_REDIRECTS redirects, never https ->
    http, only http and https, credentials (bearer token, URL user:password)
    only to the first URL's scheme, host and port.  Bodies are read in
    bounded pieces; interim 1xx answers are skipped; a chunk size that is
    not plain hex is an error.  Transient failures are retried within the
    deadline.  Every string that came from a server passes clean(): escaped
    and with the credentials redacted.  urllib keeps no connection alive,
    so nothing is left open between polls."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self._opener: Any = None
        register_secrets(token)

    def _error(self, message: str, transient: bool = False) -> FetchError:
        # Every outside piece of the message was masked where it was put in.
        return FetchError(printable(message)[:MAX_MESSAGE], transient)

    # -- the opener ----------------------------------------------------------

    def _build_opener(self) -> Any:
        import http.client
        import urllib.request
        fetcher = self

        class StrictResponse(http.client.HTTPResponse):
            """Skips interim 1xx answers (103 Early Hints, 102) the way
            http.client already skips 100, and reads a chunk size only when
            it is plain hex (no sign, no 0x)."""

            def _read_status(self) -> Any:  # type: ignore[override]
                for _ in range(MAX_INTERIM_RESPONSES):
                    version, status, reason = super()._read_status()  # type: ignore[misc]
                    if 100 < status < 200 and status != 101:
                        http.client.parse_headers(self.fp)
                        continue
                    return version, status, reason
                raise http.client.HTTPException("too many interim (1xx) responses")

            def _read_next_chunk_size(self) -> int:
                line = self.fp.readline(MAX_HEADER_LINE + 1)
                if len(line) > MAX_HEADER_LINE:
                    raise http.client.LineTooLong("chunk size")
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                    self._close_conn()  # type: ignore[attr-defined]
                    raise http.client.HTTPException("invalid chunk size (not plain hex)")
                return int(size, 16)

        class HTTPConnection(http.client.HTTPConnection):
            response_class = StrictResponse

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._create_connection = connect_interruptibly

        class HTTPHandler(urllib.request.HTTPHandler):
            def http_open(self, req: Any) -> Any:
                return self.do_open(HTTPConnection, req)

        class HTTPSHandler(urllib.request.HTTPSHandler):
            def https_open(self, req: Any) -> Any:
                import ssl

                class HTTPSConnection(http.client.HTTPSConnection):
                    response_class = StrictResponse

                    def __init__(self, *args: Any, **kwargs: Any) -> None:
                        super().__init__(*args, **kwargs)
                        self._create_connection = connect_interruptibly
                return self.do_open(HTTPSConnection, req, context=ssl.create_default_context())

        class Redirects(urllib.request.HTTPRedirectHandler):
            max_redirections = MAX_REDIRECTS

            def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                                 newurl: str) -> Any:
                if not getattr(req, "follow", True):
                    return None  # the redirect is the answer (an HTTPError)
                # urllib would read the redirect's body whole, unbounded: we never need it.
                fp.close()
                from urllib.parse import urljoin, urlsplit
                target = urljoin(req.full_url, newurl)
                scheme = urlsplit(target).scheme
                if scheme not in ("http", "https"):
                    raise fetcher._error(f"redirected to an unsupported scheme {shorten(scheme, 40)}: only http:// and "
                                         "https:// are fetched")
                if urlsplit(req.full_url).scheme == "https" and scheme == "http":
                    raise fetcher._error("refused a redirect from https:// to plain http://")
                new = super().redirect_request(req, fp, code, msg, headers, newurl)
                if new is not None:
                    # ProxyHandler adds the proxy's credentials as a plain
                    # header, which urllib would copy to the next hop, even one
                    # that bypasses the proxy (no_proxy); it adds them again
                    # where the next hop goes through the proxy.
                    new.headers.pop("Proxy-authorization", None)
                    new.first_origin = req.first_origin
                    new.credentials = req.credentials
                    if req.credentials and origin_of(new.full_url) == req.first_origin:
                        new.add_unredirected_header("Authorization", req.credentials)
                    debug(f"redirected ({code}) to {outside_text(target)}")
                return new

        from urllib.parse import urlsplit
        proxies = urllib.request.getproxies()
        for proxy in proxies.values():
            parts = urlsplit(proxy if "://" in proxy else "http://" + proxy)
            if parts.password is not None:
                register_secrets(*credential_forms(parts.username or "", parts.password))
        handlers = [urllib.request.ProxyHandler(proxies), HTTPHandler(), HTTPSHandler(), Redirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.UnknownHandler()]
        opener = urllib.request.OpenerDirector()
        for handler in handlers:
            opener.add_handler(handler)
        return opener

    # -- one GET -------------------------------------------------------------

    def get(self, url: str, headers: dict[str, str] | None = None, *, timeout: float,
            limit: int = MAX_POINTER_BYTES, interruptible: bool = True) -> Response:
        """GET `url` within `timeout` seconds in all (tries included).  A
        SIGTERM ends an interruptible fetch at once (Interrupted)."""
        return self.request(url, headers, timeout=timeout, limit=limit, interruptible=interruptible)

    def request(self, url: str, headers: dict[str, str] | None = None, *, timeout: float,
                limit: int = MAX_POINTER_BYTES, interruptible: bool = True, method: str = "GET",
                data: bytes | None = None, follow: bool = True, answers: bool = False,
                body_of: Callable[[int], bool] | None = None) -> Response:
        """One request within one deadline.  `follow=False` treats a redirect
        as an answer; `answers=True` returns every final status instead of
        raising FetchError: the status decides, so its body is read only
        where `body_of(status)` says it matters (default: always), at most
        `limit` bytes, and a body that cannot be read (too large, malformed,
        stalled, reset) leaves the answer with `body_error` set."""
        import contextlib
        deadline = Deadline(timeout)
        shown = f"{method} {outside_text(redact_url(url))}"
        tries = FETCH_TRIES
        for attempt in range(1, tries + 1):
            try:
                with deadline.guard(), Stopping.interruptible() if interruptible else contextlib.nullcontext():
                    return self._once(url, headers or {}, deadline, limit, shown, method, data, follow, answers,
                                      body_of)
            except _TimeUp:
                raise self._error(f"{shown}: timed out after {timeout:g}s", transient=True) from None
            except FetchError as exc:
                pause = min(RETRY_BASE_SECONDS * 2 ** (attempt - 1), deadline.remaining() - 0.5)
                if not exc.transient or attempt == tries or pause <= 0:
                    raise
                log(f"{exc} (try {attempt} of {tries}; retrying in {pause:.1f}s)")
                with Stopping.interruptible() if interruptible else contextlib.nullcontext():
                    time.sleep(pause)
        raise AssertionError("unreachable")

    def _once(self, url: str, headers: dict[str, str], deadline: Deadline, limit: int, shown: str,
              method: str, data: bytes | None, follow: bool, answers: bool,
              body_of: Callable[[int], bool] | None) -> Response:
        import urllib.error
        import urllib.request
        from urllib.parse import urlsplit, urlunsplit
        if self._opener is None:
            self._opener = self._build_opener()
        parts = urlsplit(url)
        send = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        credentials = None
        if parts.username is not None:
            forms = credential_forms(parts.username, parts.password or "")
            register_secrets(*forms)
            credentials = "Basic " + forms[-1]
            netloc = parts.netloc.rpartition("@")[2]
            url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        elif self.token:
            credentials = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, headers=send, method=method)
        request.follow = follow
        request.first_origin = origin_of(url)
        request.credentials = credentials
        if credentials:
            request.add_unredirected_header("Authorization", credentials)
        # Each socket operation may take half of what is left, so that one
        # silently dropped connection still leaves time for a retry; the
        # alarm bounds the whole.
        per_read = max(0.5, deadline.remaining() / 2)
        # The network edge: every exception below (OSError, http.client's,
        # a host name the IDNA codec refuses, anything a library raises)
        # leaves as a FetchError; nothing from here reaches the cycle unmapped.
        try:
            response = self._opener.open(request, timeout=per_read)
        except FetchError:
            raise  # ours, from the redirect handler
        except urllib.error.HTTPError as exc:
            status = exc.code
            if answers and status != 304:
                with exc:
                    return self._answer(status, exc, limit, body_of)
            exc.close()  # its body is never read: it may echo secrets or hold anything
            if status == 304:
                return Response(304, b"", *self._validators(exc.headers))
            if "redirect error that would lead to an infinite loop" in str(exc.msg):
                raise self._error(f"{shown}: more than {MAX_REDIRECTS} redirects (or a loop)") from None
            if status in (301, 302, 303, 307, 308):
                raise self._error(f"{shown} answered HTTP {status} with no usable Location (only http:// "
                                  "and https:// redirects are followed)") from None
            raise self._error(f"{shown} answered HTTP {status}", transient=status in (502, 503, 504)) from None
        except urllib.error.URLError as exc:
            raise self._error(f"{shown}: {describe_network_error(exc.reason)}",
                              transient=_transient(exc.reason)) from None
        except Exception as exc:  # noqa: BLE001 - see above
            raise self._error(f"{shown}: {describe_network_error(exc)}", transient=_transient(exc)) from None
        with response:
            if answers:
                return self._answer(response.status, response, limit, body_of)
            try:
                foreign = origin_of(response.geturl()) != request.first_origin
                encoding = (response.headers.get("Content-Encoding") or "identity").strip()
                if encoding.lower() != "identity":
                    raise self._error(f"{shown}: the server sent the body with Content-Encoding "
                                      f"{shorten(encoding, 40)}; only identity is accepted (configure the "
                                      "server not to compress the pointer)")
                body = self._read_body(response, limit, shown)
            except FetchError:
                raise
            except Exception as exc:  # noqa: BLE001 - the network edge, as above
                raise self._error(f"{shown}: {describe_network_error(exc)}", transient=_transient(exc)) from None
            return Response(response.status, body, *self._validators(response.headers), foreign=foreign)

    def _answer(self, status: int, response: Any, limit: int, body_of: Callable[[int], bool] | None) -> Response:
        """A final answer whose status decides (answers=True): the body only
        where it matters, and one that cannot be read is a note, not a failure."""
        validators = self._validators(response.headers)
        if body_of is not None and not body_of(status):
            return Response(status, b"", *validators)
        try:
            return Response(status, self._read_body(response, limit, "the body"), *validators)
        except FetchError as exc:
            why = str(exc)
        except _TimeUp:
            why = "the body: timed out"
        except Exception as exc:  # noqa: BLE001 - the network edge
            why = f"the body: {describe_network_error(exc)}"
        return Response(status, b"", *validators, body_error=why)

    def _read_body(self, response: Any, limit: int, shown: str) -> bytes:
        """At most `limit` bytes, in bounded pieces, whatever the framing claims."""
        body = bytearray()
        while len(body) <= limit:
            piece = response.read(min(BODY_READ_PIECE, limit + 1 - len(body)))
            if not piece:
                break
            body += piece
        if len(body) > limit:
            raise self._error(f"{shown}: body exceeds the {limit}-byte limit")
        missing = getattr(response, "length", None)  # what Content-Length promised and never came
        if missing:
            raise self._error(f"{shown}: connection closed {missing} bytes before the end of the body "
                              "(IncompleteRead)", transient=True)
        return bytes(body)

    def _validators(self, headers: Any) -> tuple[str | None, str | None]:
        """ETag and Last-Modified, only when they are safe to send back."""
        def safe(value: str | None) -> str | None:
            if value is None or len(value) > MAX_VALIDATOR or not value.isascii() or not value.isprintable():
                return None
            return value
        return safe(headers.get("ETag")), safe(headers.get("Last-Modified"))


def connect_interruptibly(address: tuple[str, int], timeout: Any = None, source_address: Any = None,
                          *_args: Any) -> Any:
    """socket.create_connection, but the name is resolved in a helper thread
    that the main thread waits for in short steps: getaddrinfo() blocks in C,
    where neither the deadline's alarm nor a SIGTERM could end it."""
    import socket
    host, port = address
    found: dict[str, Any] = {}

    def resolve() -> None:
        try:
            found["infos"] = socket.getaddrinfo(resolver_name(host), port, 0, socket.SOCK_STREAM)
        except Exception as exc:  # noqa: BLE001 - UnicodeError for `a..b`: raised in the caller, mapped there
            found["error"] = exc
    literal = False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.split("%", 1)[0])
            literal = True
        except OSError:
            pass
    if literal:
        resolve()  # an address: nothing to look up, nothing that can hang
    else:
        import threading
        resolver = threading.Thread(target=resolve, name="resolve", daemon=True)
        resolver.start()
        while resolver.is_alive():
            resolver.join(0.05)  # signal handlers run between the waits
    if "error" in found:
        raise found["error"]
    last: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _name, sockaddr in found["infos"]:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not None and timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            last = exc
            sock.close()
    raise last


def resolver_name(host: str) -> str | bytes:
    """The host name as getaddrinfo() is given it.  An ASCII name is checked
    as Python's IDNA codec checks one (UnicodeError for an empty label but
    a last one, or a label over 63 characters) and passed as bytes, which
    is what the codec would make of it, without loading the codec and the
    Unicode tables behind it; any other name goes through the codec."""
    if not host.isascii():
        return host
    labels = host.split(".")
    if any(not 0 < len(label) < 64 for label in labels[:-1]) or len(labels[-1]) >= 64:
        raise UnicodeError("label empty or too long")
    return host.encode("ascii")


def credential_forms(user: str, password: str) -> tuple[str, ...]:
    """A password as it may be echoed: raw, percent-decoded, and the Basic
    encoding of user:password (last)."""
    import base64
    from urllib.parse import unquote
    basic = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return password, unquote(password), basic


def _transient(exc: BaseException) -> bool:
    """Worth another try: the network, not the answer, failed."""
    import http.client
    import socket
    return isinstance(exc, (ConnectionError, socket.timeout, TimeoutError, http.client.RemoteDisconnected,
                            http.client.IncompleteRead)) and not _is_tls_error(exc)


def _is_tls_error(exc: BaseException) -> bool:
    name = type(exc).__name__
    return "SSL" in name or "Certificate" in name


def describe_network_error(exc: BaseException | str) -> str:
    import http.client
    import socket
    if isinstance(exc, str):
        return outside_text(exc)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, (http.client.BadStatusLine, http.client.UnknownProtocol)):
        # Not HTTP: whatever it said (an SMTP banner behind a redirect?) is not repeated.
        return f"not an HTTP response ({type(exc).__name__})"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if _is_tls_error(exc):
        return f"TLS error: {outside_text(str(exc))}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {outside_text(str(exc.strerror))}"
    if isinstance(exc, UnicodeError):
        # The IDNA codec refused the host name (getaddrinfo, http.client).
        return "bad host name (an empty or over-63-character label, or not encodable)"
    return outside_text(f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------
# Pointer: parsing and validation
# ---------------------------------------------------------------------------


def _no_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def validate_store_path(path: str, received: bytes | str, show: Excerpt = None) -> str:
    """A plain top-level store path: /nix/store/<32 nix-base32>-<name>, never a .drv."""
    show = show or shorten
    prefix = STORE_DIR + "/"
    if not path.startswith(prefix):
        raise PointerError(f"pointer is not a store path under {STORE_DIR}: got {show(received)}")
    base = path[len(prefix):]
    digest, dash, name = base[:32], base[32:33], base[33:]
    if len(digest) != 32 or any(c not in NIX_BASE32 for c in digest) or dash != "-":
        raise PointerError(f"pointer has no valid store hash: got {show(received)}")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")
    if not name or len(name) > 211 or name.startswith(".") or any(c not in allowed for c in name):
        raise PointerError(f"pointer has an invalid store path name: got {show(received)}")
    if name.endswith(".drv"):
        raise PointerError(f"pointer names a derivation (.drv); this agent never builds: got {show(received)}")
    return path


def parse_pointer(body: bytes, json_field: str | None = None, show: Excerpt = None, foreign: bool = False) -> Pointer:
    """The first non-empty line is the store path; later lines are `key: value`
    with keys from POINTER_KEYS (or `x-` annotations), each at most once.
    `show` renders the refused input for the error (escaped, redacted);
    `foreign` (another origin served it) withholds it here and in every
    later check of the pointer's text (Pointer.show: rollout fields, expiry)."""
    show = show or (withheld if foreign else shorten)
    if b"\0" in body:
        raise PointerError(f"pointer contains NUL bytes: got {show(body)}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PointerError(f"pointer is not UTF-8: got {show(body)}") from None
    if json_field:
        try:
            value: Any = json.loads(text, parse_constant=_no_json_constant)
        except (ValueError, RecursionError):
            raise PointerError(f"pointer is not JSON: got {show(body)}") from None
        for key in json_field.split("."):
            if not isinstance(value, dict) or key not in value:
                raise PointerError(f"JSON pointer has no field {json_field!r}: got {show(body)}")
            value = value[key]
        if not isinstance(value, str):
            raise PointerError(f"JSON field {json_field!r} is not a string: got {show(repr(value))}")
        return Pointer(validate_store_path(value, value, show), {}, foreign=foreign)
    # Lines end at \n only (not at U+2028 or \x1c, which str.splitlines()
    # would split at and a checker in CI might not), and only ASCII blanks
    # are trimmed: what the agent reads is what a plain text tool shows.
    lines = [line.strip(" \t\r") for line in text.split("\n")]
    lines = [line for line in lines if line]
    if not lines:
        raise PointerError(f"pointer is empty: got {show(body)}")
    path = validate_store_path(lines[0], lines[0], show)
    metadata: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        key, value = key.strip(" \t"), value.strip(" \t")
        if not sep or not key or key.strip(POINTER_KEY_CHARS) or not key[0].isalpha():
            raise PointerError(f"pointer line is not `key: value` (keys are lower-case ASCII): got {show(line)}")
        if key not in POINTER_KEYS and not key.startswith("x-"):
            raise PointerError(f"pointer has an unknown key {show(key)} (known: {', '.join(POINTER_KEYS)}; "
                               "free-form annotations start with `x-`)")
        if key in metadata:
            raise PointerError(f"pointer has the key {show(key)} twice")
        if not value.isprintable():
            raise PointerError(f"pointer value of {show(key)} has control characters: got {show(value)}")
        metadata[key] = value
    revision = None
    if "revision" in metadata:
        text = metadata["revision"]
        if not text.isascii() or not text.isdigit() or text != str(int(text)) or int(text) > MAX_REVISION:
            raise PointerError(f"pointer revision is not a whole number from 0 to {MAX_REVISION}: "
                               f"got {show(text)}", "revision")
        revision = int(text)
    return Pointer(path, metadata, revision, foreign=foreign)


# ---------------------------------------------------------------------------
# Pointer: trust (OpenSSH signatures, revisions, host lists, expiry)
# ---------------------------------------------------------------------------


def allowed_signers(trusted_keys_file: str) -> str:
    """An allowed-signers document from a file that holds, one per line,
    plain public keys (`ssh-ed25519 AAAA... comment`: given the principal and
    namespace `nixos-autodeploy`) or allowed-signers lines (`principals
    [options] keytype key`: ssh-keygen honours their namespaces=,
    valid-after=, valid-before= and cert-authority options).  A line that
    starts with options (authorized_keys style) is refused: ssh-keygen would
    read the options as a principal name and drop the restriction."""
    try:
        with open(trusted_keys_file) as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read --trusted-keys {trusted_keys_file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--trusted-keys {trusted_keys_file} is not UTF-8 text") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--trusted-keys {trusted_keys_file} line {number}"
        first = line.split(None, 1)[0]
        if first.startswith(KEY_TYPES):
            out.append(f'{SIGNATURE_NAMESPACE} namespaces="{SIGNATURE_NAMESPACE}" {line}')
        elif "=" in first or '"' in first or first.lower() in AUTHORIZED_KEYS_FLAGS:
            raise UsageError(f"{where} starts with options ({shorten(first, 40)}); write an allowed-signers "
                             "line `PRINCIPALS [OPTIONS] KEYTYPE KEY` or a plain public key")
        elif not any(word.startswith(KEY_TYPES) for word in line.split()[1:]):
            raise UsageError(f"{where} holds no public key")
        else:
            out.append(line)
    if not out:
        raise UsageError(f"--trusted-keys {trusted_keys_file} holds no key")
    return "\n".join(out) + "\n"


def verify_signature(body: bytes, signature: bytes, signers: str, workdir: str) -> str:
    """Verify with `ssh-keygen -Y verify`; return the signer's principal.
    ssh-keygen reads the signers and the signature from files, written into
    a private temporary directory (0700, unpredictable name) in `workdir`
    (the state directory, root's), or, when that does not exist yet (a dry
    run before the first run), in the system's temporary directory.  When
    they cannot be written (a full disk) the state is what failed: StateError."""
    import shutil
    import tempfile
    where = workdir if os.path.isdir(workdir) else tempfile.gettempdir()
    tmp = None
    try:
        try:
            tmp = tempfile.mkdtemp(dir=where, prefix=".verify-")
            signers_file = os.path.join(tmp, "allowed_signers")
            sig_file = os.path.join(tmp, "pointer.sig")
            atomic_write(signers_file, signers, 0o600)
            atomic_write(sig_file, signature, 0o600)
        except OSError as exc:
            raise StateError(f"cannot write the files to verify the pointer signature in {where}: "
                             f"{exc.strerror}") from None
        return _verify_files(body, signers_file, sig_file)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _verify_files(body: bytes, signers_file: str, sig_file: str) -> str:
    """ssh-keygen: who signed it (find-principals), then verify as that principal."""
    found = ssh_keygen(["-Y", "find-principals", "-s", sig_file, "-f", signers_file])
    principals = found.stdout.split() if found.returncode == 0 else []
    if not principals:
        raise PointerError("pointer signature is not made by a trusted key", "signature")
    principal = principals[0]
    checked = ssh_keygen(["-Y", "verify", "-f", signers_file, "-I", principal,
                          "-n", SIGNATURE_NAMESPACE, "-s", sig_file], stdin=body)
    if checked.returncode != 0:
        why = checked.stdout.strip().splitlines()[-1:] or ["verification failed"]
        raise PointerError(f"pointer signature does not verify: {why[0]}", "signature")
    return principal


def check_trust(pointer: Pointer, floor: RevisionFloor, cfg: Config) -> None:
    """Rules for signed pointers, checked on every fetch and on every 304
    replay: a revision, never below the floor, one path per revision; a
    `hosts:` line that names this host (or is `*`); not expired."""
    meta = pointer.metadata
    if pointer.revision is None:
        raise PointerError("signed pointer has no `revision:` line", "revision")
    if floor.revision is not None:
        if pointer.revision < floor.revision:
            raise PointerError(f"pointer revision {pointer.revision} is lower than revision "
                               f"{floor.revision} already accepted (downgrade refused)", "revision")
        if pointer.revision == floor.revision and floor.path not in (None, pointer.path):
            raise PointerError(f"pointer revision {pointer.revision} names {pointer.path}, but that "
                               f"revision was accepted as {floor.path}", "revision")
    if "hosts" not in meta:
        raise PointerError("signed pointer has no `hosts:` line; a pointer for every host says `hosts: *` "
                           "(without it, one host's signed pointer could be served to another)", "host")
    hosts = meta["hosts"].replace(",", " ").split()
    me = cfg.hostname or local_hostname()
    if hosts != ["*"] and me not in hosts:
        listed = " ".join(hosts)
        shown = (pointer.show(listed) if pointer.foreign
                 else f"{outside_text(listed)[:200]}{'...' if len(listed) > 200 else ''}")
        raise PointerError(f"pointer is for hosts {shown}, not for {me}", "host")
    check_expiry(pointer)


# RFC 3339 date-time: `T`, `t` or one space between date and time (never any
# other character, as datetime.fromisoformat() would take); the offset may be
# left out (UTC), and so may the time (midnight).
RFC3339_PATTERN: Final = (r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?"
                          r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?)?")


def parse_rfc3339(text: str) -> Any:
    """An aware datetime (UTC when no offset is given); ValueError otherwise.
    The one parser of times for hosts (`not-after:`, `rollout-start:`) and `sign`."""
    import re
    from datetime import datetime, timezone
    if not re.fullmatch(RFC3339_PATTERN, text):
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def check_expiry(pointer: Pointer) -> None:
    """Refuse a pointer past its `not-after:` (also one replayed by a 304)."""
    if "not-after" not in pointer.metadata:
        return
    from datetime import datetime, timezone
    text = pointer.metadata["not-after"]
    try:
        expiry = parse_rfc3339(text)
    except ValueError:
        raise PointerError(f"pointer not-after is not an RFC 3339 time: {pointer.show(text)}", "expired") from None
    if datetime.now(timezone.utc) > expiry:
        raise PointerError(f"pointer expired at {pointer.show(text) if pointer.foreign else text}", "expired")


def local_hostname() -> str:
    import socket
    return socket.gethostname()


# ---------------------------------------------------------------------------
# State store
# ---------------------------------------------------------------------------


class StateStore:
    """state.json (0600), the revision floor (kept in state.json and mirrored
    in `revision-floor`, so that deleting or editing one does not lower it)
    and the suspend file, in a root-owned directory nobody else can write."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)
        self.floor_path = os.path.join(state_dir, FLOOR_FILE)
        self.suspend_path = os.path.join(state_dir, SUSPEND_FILE)
        self._dir_checked = False
        self._floor_on_disk: Any = None  # what revision-floor holds, as last read or written
        self._written: bytes | None = None  # state.json as this process last wrote it (loop mode)
        # Loop mode (hold_timestamps): a newer state.json that differs from
        # _written only in TIMESTAMP_FIELDS, not yet on disk; when _written was.
        self.hold_timestamps = False
        self._held: bytes | None = None
        self._written_at = 0.0
        self._written_view: dict[str, Any] | None = None  # without_timestamps(_written), once needed

    def ensure_dir(self) -> None:
        """Checked once per run (loop mode: once per process); only root can
        change a directory that passed."""
        if not self._dir_checked:
            check_private_dir(self.dir, create=True)
            self._dir_checked = True

    def _read_raw(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except PermissionError:
            # Not corrupt, only root's (state.json is 0600 in a 0700 directory):
            # nothing to reset, the reader lacks the right.
            raise StateError(f"cannot read {path}: permission denied (the state is readable by root only); "
                             f"run it as root, e.g. `sudo autodeploy.py status`") from None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror}. {RECOVERY_HINT}") from None

    def _parse(self, raw: bytes, path: str) -> dict[str, Any]:
        """The JSON object; StateError for anything else (JSON null too)."""
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
            data = json.loads(raw, parse_constant=_no_json_constant)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        except (ValueError, RecursionError) as exc:
            raise StateError(f"{path} is corrupt ({printable(str(exc))[:120]}). {RECOVERY_HINT}") from None

    def _read_json(self, path: str) -> dict[str, Any] | None:
        raw = self._read_raw(path)
        return None if raw is None else self._parse(raw, path)

    def load(self) -> State:
        """The state, or a fresh one when there is none.  A corrupt or
        unreadable file fails closed: it may have held the revision floor."""
        raw = self._read_raw(self.path)
        if raw is None or raw != self._written:
            self._held = None  # the file is not ours (any more): what it says wins
        if raw is None:
            state = State()
        elif raw == self._written:
            # What this process wrote (loop mode), or its newer timestamps
            # held in memory: checked when it was made.
            data = json.loads(self._held or raw)
            types_of = field_types(State)
            state = State(**{k: v for k, v in data.items() if k in types_of},
                          unknown={k: v for k, v in data.items() if k not in types_of})
        else:
            state = State.from_json(self._parse(raw, self.path), self.path)
        floor = self._floor_on_disk = self._read_json(self.floor_path)
        if floor is not None:
            revision, path = floor.get("revision"), floor.get("path")
            if not valid_revision(revision) or not (path is None or isinstance(path, str)):
                raise StateError(f"{self.floor_path} is corrupt. {RECOVERY_HINT}")
            if state.highest_revision is None or revision > state.highest_revision:
                state.highest_revision, state.revision_path = revision, path
        return state

    def save(self, state: State) -> None:
        self.ensure_dir()
        text = state.to_json().encode()
        if self.hold_timestamps and self._written is not None \
                and time.monotonic() - self._written_at < TIMESTAMPS_WRITTEN_EVERY_SECONDS \
                and without_timestamps(text) == self._written_without_timestamps():
            self._held = text if text != self._written else None
        else:
            self._write_state(text)
        floor = {"revision": state.highest_revision, "path": state.revision_path}
        if state.highest_revision is not None and self._floor_on_disk != floor:
            atomic_write(self.floor_path, json.dumps(floor) + "\n", 0o600)
            self._floor_on_disk = floor

    def _write_state(self, text: bytes) -> None:
        self._written = self._held = self._written_view = None
        atomic_write(self.path, text, 0o600)
        self._written, self._written_at = text, time.monotonic()

    def _written_without_timestamps(self) -> dict[str, Any]:
        if self._written_view is None:
            assert self._written is not None
            self._written_view = without_timestamps(self._written)
        return self._written_view

    def flush(self) -> None:
        """Write the timestamps held back (loop mode), if any."""
        if self._held is not None:
            self._write_state(self._held)

    def flush_due(self) -> None:
        """Write what is held once the bound has passed (the loop calls this
        while it sleeps: held timestamps never wait for the next poll)."""
        if self._held is not None and time.monotonic() - self._written_at >= TIMESTAMPS_WRITTEN_EVERY_SECONDS:
            self._write_state(self._held)

    def reset_trust(self, min_revision: int) -> State:
        """The operator's recovery: a floor set by hand; a corrupt state file
        is kept aside for inspection and replaced by a fresh one."""
        self.ensure_dir()
        try:
            state = self.load()
        except StateError as exc:
            aside = f"{self.path}.corrupt-{int(time.time())}"
            if os.path.lexists(self.path):
                os.rename(self.path, aside)
                log(f"{exc}: moved aside to {aside}; starting from a fresh record")
            try:
                os.unlink(self.floor_path)
            except FileNotFoundError:
                pass
            state = State()
        state.highest_revision, state.revision_path = min_revision, None
        state.pointer = None  # nothing verified under the old floor may be replayed
        atomic_write(self.path, state.to_json(), 0o600)
        self._floor_on_disk = {"revision": min_revision, "path": None}
        atomic_write(self.floor_path, json.dumps(self._floor_on_disk) + "\n", 0o600)
        return state

    def suspension(self) -> dict[str, Any] | None:
        """{"reason": str, "since": Unix time or None} while suspended; a
        suspend file that cannot be read or has other values still suspends."""
        try:
            with open(self.suspend_path, "rb") as f:
                data = json.loads(f.read(MAX_STATE_BYTES), parse_constant=_no_json_constant)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            return {"reason": "unreadable suspend file (treated as suspended)", "since": None}
        if not isinstance(data, dict) or not _text(data.get("reason", "")) or not _opt_moment(data.get("since")):
            return {"reason": "malformed suspend file (treated as suspended)", "since": None}
        return {"reason": data.get("reason", ""), "since": data.get("since")}

    def suspend(self, reason: str) -> None:
        self.ensure_dir()
        atomic_write(self.suspend_path, json.dumps({"reason": reason, "since": time.time()}) + "\n", 0o600)

    def resume(self) -> bool:
        try:
            os.unlink(self.suspend_path)
            return True
        except FileNotFoundError:
            return False


def without_timestamps(text: bytes) -> dict[str, Any]:
    """A state.json as parsed, less what only says when the last run was."""
    data = json.loads(text)
    for name in TIMESTAMP_FIELDS:
        data.pop(name, None)
    if isinstance(data.get("pointer"), dict):
        data["pointer"].pop("fetched_at", None)
    return data


def host_lock() -> int:
    """The host-wide lock (whatever the state directory): an exclusive,
    non-blocking flock on a file in the root-only runtime directory, never
    through a symlink.  The fd stays open for the run."""
    import fcntl
    check_private_dir(RUNTIME_DIR, create=True, mode=0o755)
    try:
        fd = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateError(f"cannot open the lock {HOST_LOCK}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(f"another run holds the host lock {HOST_LOCK}; nothing done") from None
    return fd


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def escape_label(value: str) -> str:
    if "\\" not in value and '"' not in value and "\n" not in value:
        return value
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(state: State, host: HostView, suspended: bool) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        full = f"nixos_autodeploy_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            number = str(int(value)) if float(value).is_integer() else repr(round(float(value), 3))
            if not labels:
                lines.append(f"{full} {number}")
                continue
            # Label values are printable; what came from outside was masked where it entered.
            rendered = ",".join(f'{k}="{escape_label(printable(v))}"' for k, v in labels.items())
            lines.append(f"{full}{{{rendered}}} {number}")

    metric("dirty", "gauge", "1 when the host runs something this agent did not deploy (manual deploy).",
           [({}, int(state.dirty))])
    metric("reboot_required", "gauge",
           "1 when the host does not yet run what is deployed (staged boot, or booted kernel/initrd/modules differ).",
           [({}, int(state.reboot_required))])
    metric("info", "gauge", "Store path basenames of the current, booted, deployed and upstream systems.",
           [({"current_generation": basename_or_empty(host.current),
              "booted_generation": basename_or_empty(host.booted),
              "deployed_generation": basename_or_empty(state.deployed),
              "upstream_generation": basename_or_empty(state.upstream)}, 1)])
    metric("last_run_timestamp_seconds", "gauge", "Unix time of the last run.", [({}, state.last_run or 0)])
    metric("last_success_timestamp_seconds", "gauge", "Unix time of the last successful run (kept across runs).",
           [({}, state.last_success or 0)])
    metric("last_run_success", "gauge", "1 when the last run succeeded.", [({}, int(bool(state.last_run_success)))])
    metric("last_run_duration_seconds", "gauge", "Duration of the last run.",
           [({}, round(state.last_run_duration or 0, 3))])
    metric("state", "gauge", "The agent's state after the last run (exactly one series is 1).",
           [({"state": s}, int(s == state.last_state)) for s in STATES])
    metric("rollbacks_total", "counter", "Rollbacks performed (kept across runs).", [({}, state.rollbacks_total)])
    metric("deploys_total", "counter", "Successful deploys (kept across runs).", [({}, state.deploys_total)])
    metric("quarantined", "gauge", "1 while an upstream path is quarantined after a failed deploy.",
           [({"path": state.quarantined or ""}, int(state.quarantined is not None))])
    metric("suspended", "gauge", "1 while an operator suspended deploys on this host.", [({}, int(suspended))])
    if state.upstream_revision is not None:
        metric("upstream_revision", "gauge", "Revision of the last accepted signed pointer.",
               [({}, state.upstream_revision)])
    if state.highest_revision is not None:
        metric("revision_floor", "gauge", "No signed pointer below this revision is accepted (kept across runs).",
               [({}, state.highest_revision)])
    if state.last_error and not state.last_run_success:
        metric("last_error_info", "gauge", "The last run's error (present only when it failed).",
               [({"kind": state.last_error.get("kind", ""),
                  "message": state.last_error.get("message", "")[:300]}, 1)])
    # Boot safety, refused pointers by reason, lag behind upstream (docs/how-to/boot-safety.md).
    metric("boot_failures_total", "counter",
           "Staged systems the host did not boot into (boot loader fallback, e.g. after failed boot assessments); "
           "kept across runs.", [({}, state.boot_failures_total)])
    if state.boot_free_bytes is not None:
        metric("boot_free_bytes", "gauge",
               "Free bytes in $BOOT (/boot, or the ESP at /boot/efi or /efi; only when it is a separate filesystem).",
               [({}, state.boot_free_bytes)])
    if state.boot_needed_bytes is not None:
        metric("boot_needed_bytes", "gauge",
               "Bytes the last deploy needed in $BOOT for its kernel and initrd, margin included (0: already there).",
               [({}, state.boot_needed_bytes)])
    refused = pointer_refusal_reason(state)
    metric("pointer_refused", "gauge",
           "1 for the reason the last run refused the pointer (signature, revision, host, expired: may be an "
           "attack; malformed: publishing is broken); all 0 otherwise.",
           [({"reason": r}, int(r == refused)) for r in POINTER_REFUSAL_REASONS])
    metric("behind_upstream_since_timestamp_seconds", "gauge",
           "Unix time since which the host does not run the upstream system; 0 while it does.",
           [({}, state.behind_since or 0)])
    metric("reboot_window_wait", "gauge", "1 while a due reboot waits for the reboot window.",
           [({}, int(bool(state.reboot_window_wait)))])
    # Rollouts and FleetLock (fleet view).
    if state.rollout is not None:
        view = state.rollout
        metric("rollout_bucket_number", "gauge", "This host's rollout bucket (0..9999) for the upstream path; it deploys "
               "when the bucket is below rollout_percent * 100.", [({}, view["bucket"])])
        metric("rollout_percent", "gauge", "The upstream pointer's rollout percentage at the last run (ramped).",
               [({}, view["percent"])])
        metric("rollout_paused", "gauge", "1 while the upstream pointer pauses its rollout.",
               [({}, int(bool(view["paused"])))])
        if view.get("turn_at") is not None:
            metric("rollout_turn_timestamp_seconds", "gauge", "Unix time from which the ramp admits this host.",
                   [({}, view["turn_at"])])
    # Ready before its turn; manual rollbacks (docs/how-to/rollout.md, docs/how-to/recover.md).
    prefetched = state.prefetched.get("path") if isinstance(state.prefetched, dict) else None
    metric("prefetched", "gauge", "1 while the closure of a build waiting for its turn is realised and GC-rooted "
           "(the path label names it).", [({"path": prefetched or ""}, int(prefetched is not None))])
    metric("prefetch_failures_total", "counter", "Failed prefetches (realising a waiting build's closure ahead of "
           "its turn; not deploy failures); kept across runs.", [({}, state.prefetch_failures_total)])
    failed_at = state.prefetch_error.get("time") if isinstance(state.prefetch_error, dict) else None
    metric("prefetch_last_failure_timestamp_seconds", "gauge",
           "Unix time of the last failed prefetch while it is unresolved; 0 otherwise.", [({}, failed_at or 0)])
    metric("manual_rollbacks_total", "counter", "Hand switches back to a system this agent deployed earlier, "
           "accepted as a verdict on the build they replaced (--accept-manual-rollback); kept across runs.",
           [({}, state.manual_rollbacks_total)])
    metric("reboot_slot_held", "gauge", "1 while this host holds a FleetLock reboot slot.",
           [({}, int(bool(state.reboot_slot and state.reboot_slot.get("granted"))))])
    if state.fleetlock_failures:
        metric("fleetlock_failures_total", "counter", "Failed FleetLock requests by operation and error kind "
               "(kept across runs).",
               [({"operation": key.partition(":")[0], "kind": key.partition(":")[2]}, count)
                for key, count in sorted(state.fleetlock_failures.items())])
    if state.fleetlock_error:
        # No message label: the server's text (poseidon names the slot's
        # holder) would make a new series for every holder; logs and
        # `status` have it.
        metric("fleetlock_last_error_info", "gauge", "The last FleetLock error (present until an operation succeeds).",
               [({"operation": state.fleetlock_error.get("operation", ""),
                  "kind": state.fleetlock_error.get("kind", "")}, 1)])
    return "\n".join(lines) + "\n"


def pointer_refusal_reason(state: State) -> str | None:
    """Why the last run refused the pointer, as a pointer_refused reason."""
    if state.last_state != "refused":
        return None
    kind = (state.last_error or {}).get("kind", "")
    return kind if kind in POINTER_REFUSAL_REASONS else "malformed"


def write_metrics(path: str, state: State, host: HostView, suspended: bool) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Rewritten by every run: not worth an fsync (state.json is the record).
    atomic_write(path, render_metrics(state, host, suspended), durable=False)


# ---------------------------------------------------------------------------
# Host inspection
# ---------------------------------------------------------------------------


def read_host() -> HostView:
    return HostView(store_path_of(CURRENT_SYSTEM), store_path_of(BOOTED_SYSTEM), store_path_of(SYSTEM_PROFILE))


def _target(system: str | None, name: str) -> str | None:
    if not system:
        return None
    path = os.path.join(system, name)
    try:
        return os.path.realpath(path) if os.path.lexists(path) else None
    except OSError:
        return None


def boot_differs(a: str | None, b: str | None) -> list[str]:
    """Which of kernel, initrd, kernel-modules (and switch-inhibitors) differ."""
    if not a or not b or a == b:
        return []
    differ = [n for n in ("kernel", "initrd", "kernel-modules") if _target(a, n) != _target(b, n)]
    inhibitors = [_read(os.path.join(s, "switch-inhibitors")) for s in (a, b)]
    if any(i is not None for i in inhibitors) and inhibitors[0] != inhibitors[1]:
        differ.append("switch-inhibitors")
    return differ


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def check_nixos_system(path: str, current: str | None) -> None:
    """Refuse anything that is not a NixOS system for this machine."""
    for needed in ("bin/switch-to-configuration", "nixos-version"):
        if not os.path.exists(os.path.join(path, needed)):
            raise DeployError(f"{path} is not a NixOS system: {needed} is missing", "not_a_system")
    ours = (_read(os.path.join(current, "system")) or "").strip() if current else ""
    theirs = (_read(os.path.join(path, "system")) or "").strip()
    if not theirs or (ours and ours != theirs):
        raise DeployError(f"{path} is a system for {theirs or 'an unknown platform'!r}, "
                          f"this machine runs {ours!r}", "not_a_system")


def mark_staged(system: str | None) -> None:
    """Remember, until the next reboot wipes /run, that `system` waits for it;
    None forgets a boot staged earlier (superseded by a switch)."""
    if system is None:
        try:
            os.unlink(STAGED_MARKER)
        except FileNotFoundError:
            pass
        return
    write_runtime_marker(STAGED_MARKER, system + "\n")


def write_runtime_marker(path: str, text: str) -> None:
    """A file in /run/nixos-autodeploy (gone at the next reboot); StateError
    when it cannot be written (a full /run)."""
    try:
        os.makedirs(RUNTIME_DIR, mode=0o755, exist_ok=True)
        atomic_write(path, text)
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror}") from None


def reboot_status(state: State, host: HostView) -> tuple[bool, str | None]:
    staged = state.deployed and host.profile == state.deployed and host.current != state.deployed
    # Rebooted since (boot ID changed, or the marker is gone): it booted the
    # previous system (boot loader fallback), and another reboot would not help.
    if staged and not rebooted_since_staging(state):
        return True, f"{basename_or_empty(state.deployed)} is staged for the next boot"
    differ = boot_differs(host.booted, host.current)
    if differ:
        return True, "booted " + ", ".join(differ) + " differ from the current system's"
    return False, None


# ---------------------------------------------------------------------------
# Boot safety: reboots, the boot loader's choice, room in /boot
# ---------------------------------------------------------------------------


def current_boot_id() -> str | None:
    """The kernel's random ID of this boot.  It tells a reboot apart even where
    /run/nixos-autodeploy does not survive a run (the module's unit removes
    its RuntimeDirectory when a run ends)."""
    text = (_read(BOOT_ID_FILE) or "").strip()
    return text or None


def rebooted_since_staging(state: State) -> bool:
    """Has the host booted since `state.deployed` was staged for the next boot?"""
    boot_id = current_boot_id()
    if state.staged_boot_id and boot_id:
        return boot_id != state.staged_boot_id
    return not os.path.exists(STAGED_MARKER)  # records written before boot IDs were kept


def read_loader_variable(name: str) -> str | None:
    """A Boot Loader Interface EFI variable of systemd-boot: 4 attribute bytes,
    then a NUL-terminated UTF-16LE string; None when absent or garbled."""
    directory = os.environ.get(EFIVARS_ENV) or EFIVARS_DIR
    try:
        with open(os.path.join(directory, f"{name}-{LOADER_GUID}"), "rb") as f:
            data = f.read(4 + 2 * 1024)
    except OSError:
        return None
    try:
        text = data[4:].decode("utf-16-le").split("\0", 1)[0]
    except UnicodeDecodeError:
        return None
    return text if text and text.isprintable() else None


def loader_boot_fingerprint() -> str | None:
    """What tells one firmware boot's Boot Loader Interface variables from
    the next's: systemd-boot's timestamps (microseconds since the firmware
    started, new on every boot) with the entry it chose.  After a kexec the
    variables still describe the firmware boot before it.  None where no
    timestamp is set (GRUB; systemd-boot where it finds no usable TSC, as
    in a VM): the variables alone then cannot tell two boots apart."""
    times = [read_loader_variable(n) or "" for n in ("LoaderTimeInitUSec", "LoaderTimeExecUSec")]
    if not any(times):
        return None
    return " ".join([*times, read_loader_variable("LoaderEntrySelected") or ""])


def started_by_kexec() -> bool:
    """The kernel's own word (x86): the boot protocol's type_of_loader
    (offset 0x210 of the boot parameters) is 0xD? when kexec started this
    kernel, whoever ran it; boot loaders write their own type there."""
    try:
        with open(os.environ.get(BOOT_PARAMS_ENV) or BOOT_PARAMS_FILE, "rb") as f:
            data = f.read(0x211)
    except OSError:
        return False
    return len(data) > 0x210 and data[0x210] >> 4 == 0xD


@functools.lru_cache(maxsize=1)
def boot_loader_facts(boot_id: str | None) -> tuple[str | None, bool]:
    """The fingerprint of the firmware boot the Loader* variables describe,
    and whether kexec started this kernel: both fixed for a boot, so read
    once per boot (loop mode would otherwise read EFI variables, which
    efivarfs fetches from the firmware, on every poll)."""
    return loader_boot_fingerprint(), started_by_kexec()


def loader_variables_stale(recorded: dict[str, Any] | None, fingerprint: str | None, boot_id: str | None) -> bool:
    """Do the Loader* variables describe an earlier boot than this one: the
    fingerprint seen in another boot is seen again (no boot loader ran in
    between: a kexec)?"""
    if not fingerprint or not boot_id or not isinstance(recorded, dict):
        return False
    return recorded.get("fingerprint") == fingerprint and recorded.get("boot_id") != boot_id


def boot_dir_of(boot_dir: str | None = None) -> str:
    """$BOOT: `boot_dir` when given (--boot-dir, from the module's boot loader
    configuration), else the first candidate holding a boot loader's files,
    else /boot."""
    if boot_dir:
        return boot_dir
    # systemd-boot booted this host (it sets LoaderInfo, GRUB sets no Loader*
    # variable): the place of its entries decides, whatever GRUB left in /boot
    # (grub/, kernels/ on the root file system after a switch to systemd-boot
    # with the ESP at /boot/efi), or a fallback would read as a manual choice.
    if (read_loader_variable("LoaderInfo") or "").startswith("systemd-boot"):
        for candidate in BOOT_DIR_CANDIDATES:
            if os.path.isdir(os.path.join(candidate, "loader", "entries")):
                return candidate
    for candidate in BOOT_DIR_CANDIDATES:
        if any(os.path.isdir(os.path.join(candidate, marker)) for marker in BOOT_DIR_MARKERS):
            return candidate
    return BOOT_DIR


# A Boot Loader Specification entry ID with its boot counter, as a file name
# (`nixos-<hash>+2-1.conf`, `+0-3`, `+1`) or as an EFI variable shows it.  The
# variables carry the counter as it was at boot (LoaderEntrySelected=foo+1-0.conf
# while the file is already foo+0-1.conf), so IDs are compared without it.
_BOOT_COUNTER_RE: Final = r"\+[0-9]+(-[0-9]+)?(?=(\.conf)?$)"


def entry_id_without_counter(entry_id: str) -> str:
    import re
    return re.sub(_BOOT_COUNTER_RE, "", entry_id)


def is_entry_pattern(entry_id: str) -> bool:
    """systemd-boot takes a glob as the default (loader.conf `default nixos-*`,
    as nixpkgs writes it with boot counting, which never reaches the
    LoaderEntryDefault variable; `bootctl set-default 'foo*'`, which does)."""
    return any(c in entry_id for c in "*?[")


def exhausted_boot_entry(system: str, boot_dir: str | None = None) -> str | None:
    """The systemd-boot entry of `system` that has no tries left (boot
    counting: `<id>+0-<failed>.conf`), or None.  NixOS entries name their
    system in the `options` line (`init=<toplevel>/init`), whatever the file
    is called (`nixos-generation-<n>.conf` up to 26.05, `nixos-<hash>.conf`
    from 26.11)."""
    import re
    directory = os.path.join(boot_dir_of(boot_dir), "loader", "entries")
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    wanted = f"init={system}/init"
    for name in names:
        if not re.search(r"\+0(-[0-9]+)?\.conf$", name):
            continue
        try:
            with open(os.path.join(directory, name), errors="replace") as f:
                text = f.read(64 * 1024)
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["options"] and wanted in words[1:]:
                return name
    return None


def boot_entry_choice(staged: str | None = None, boot_dir: str | None = None,
                      variables_stale: bool = False) -> tuple[str, str]:
    """Who chose this boot's entry instead of the staged system's:
    ("loader", why) when the staged entry ran out of tries or systemd-boot
    booted its default, ("manual", why) when systemd-boot says the booted
    entry is not its default (LoaderEntryDefault: a default picked in the menu
    or set with `bootctl set-default`), ("unknown", why) when it does not say
    (GRUB, BIOS, or no LoaderEntryDefault: NixOS writes its default into
    loader.conf).  A default that is a pattern records no manual choice: a
    fallback must never look like one.  `variables_stale`: someone else's
    kexec started this boot (systemd-boot's variables describe the firmware
    boot before it): they chose what runs, unless the entry files say the
    boot loader gave up on the staged system earlier."""
    import fnmatch
    exhausted = exhausted_boot_entry(staged, boot_dir) if staged else None
    if exhausted is not None:
        return "loader", f"boot entry {shorten(exhausted, 80)} has no tries left (boot counting)"
    selected = read_loader_variable("LoaderEntrySelected")
    if variables_stale and selected is not None:
        return "manual", ("the host was kexec'ed by someone else into what it runs (the boot loader's "
                          "variables describe an earlier boot)")
    default = read_loader_variable("LoaderEntryDefault")
    if selected is None or default is None:
        return "unknown", "the boot loader does not tell whether the entry was picked by hand"
    if is_entry_pattern(default):
        if fnmatch.fnmatchcase(selected, default) or fnmatch.fnmatchcase(entry_id_without_counter(selected), default):
            return "loader", (f"the boot loader booted {shorten(selected, 80)}, the first entry it would boot for "
                              f"its default {shorten(default, 80)}")
        return "unknown", (f"the boot loader's default is the pattern {shorten(default, 80)}, which records no "
                           "choice by hand")
    if entry_id_without_counter(selected) != entry_id_without_counter(default):
        return "manual", f"boot entry {shorten(selected, 80)} was picked by hand; the default is {shorten(default, 80)}"
    return "loader", f"the boot loader booted its default entry {shorten(selected, 80)}"


def boot_is_separate(boot_dir: str | None = None) -> bool:
    """Only a separate boot filesystem (/boot, or the ESP at /boot/efi or
    /efi) can fill up on its own."""
    try:
        return os.stat(boot_dir_of(boot_dir)).st_dev != os.stat("/").st_dev
    except OSError:
        return False


def boot_free_bytes(boot_dir: str | None = None) -> int | None:
    if not boot_is_separate(boot_dir):
        return None
    try:
        st = os.statvfs(boot_dir_of(boot_dir))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def boot_copies(system: str, boot_dir: str | None = None) -> list[tuple[str, str]]:
    """(store file, destination in /boot) for the kernel and initrd that the
    boot loader installer copies into /boot, named as it names them:
    systemd-boot-builder.py's copy_from_file() (EFI/nixos/<store dir>-<file>.efi)
    or install-grub.pl's copyToKernelsDir() (kernels/<store path, / -> ->).
    GRUB without /boot/kernels reads kernels from the store: nothing is copied."""
    files = [os.path.realpath(os.path.join(system, name)) for name in ("kernel", "initrd")]
    files = [f for f in files if f.startswith(STORE_DIR + "/") and os.path.isfile(f)]
    boot = boot_dir_of(boot_dir)
    grub = os.path.isdir(os.path.join(boot, "grub"))
    systemd_boot = any(os.path.isdir(os.path.join(boot, d)) for d in ("loader", "EFI/nixos"))
    if grub and not systemd_boot:
        kernels = os.path.join(boot, "kernels")
        if not os.path.isdir(kernels):
            return []
        return [(f, os.path.join(kernels, f[len(STORE_DIR) + 1:].replace("/", "-"))) for f in files]
    # systemd-boot, or a layout we do not know: assume it copies like systemd-boot.
    out = []
    for f in files:
        relative = f[len(STORE_DIR) + 1:]
        store_dir, _, rest = relative.partition("/")
        name = f"{store_dir}.efi" if not rest else f"{store_dir}-{os.path.basename(f)}.efi"
        out.append((f, os.path.join(boot, "EFI", "nixos", name)))
    return out


def boot_space_needed(system: str, boot_dir: str | None = None) -> int:
    """Bytes the system's kernel and initrd add to $BOOT (0 when already there)."""
    return sum(os.path.getsize(src) for src, dest in boot_copies(system, boot_dir) if not os.path.exists(dest))


def with_margin(needed: int) -> int:
    return needed + max(BOOT_SPACE_MARGIN_BYTES, int(needed * BOOT_SPACE_MARGIN_FRACTION)) if needed else 0


def write_boot_check(state_dir: str, system: str | None, error: AutodeployError | None) -> None:
    StateStore(state_dir).ensure_dir()
    record = {"boot_id": current_boot_id(), "system": system, "ok": error is None,
              # The agent's message: what came from outside was masked where it entered.
              "error": printable(str(error))[:500] if error else None, "time": time.time()}
    atomic_write(os.path.join(state_dir, BOOT_CHECK_FILE), json.dumps(record, sort_keys=True) + "\n", 0o600)


def boot_check_failure(state_dir: str, system: str) -> str | None:
    """Why `check-boot` failed for `system` during this boot, or None."""
    try:
        with open(os.path.join(state_dir, BOOT_CHECK_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    boot_id = current_boot_id()
    if not isinstance(record, dict) or boot_id is None or record.get("boot_id") != boot_id:
        return None
    if record.get("system") != system or record.get("ok") is not False:
        return None
    return str(record.get("error") or "no reason recorded")[:500]


# ---------------------------------------------------------------------------
# The host's phase: computed first in every cycle, from facts read in one place
# ---------------------------------------------------------------------------


class Phase(enum.Enum):
    """Where the host stands in the deploy lifecycle (the spellings are the
    ones `status`, `--dry-run` and the logs show)."""

    INTERRUPTED = "interrupted"      # an intent on disk: a cycle was killed half-way
    UNTRACKED = "untracked"          # no record yet
    SETTLED = "settled"              # runs what we deployed, verified
    STAGED = "staged"                # a release staged for the next boot, not rebooted yet
    BOOTED_UNVERIFIED = "booted_unverified"  # rebooted into the staged release, not yet checked
    FELL_BACK = "fell_back"          # rebooted, but the staged release is not what runs
    ROLLED_BACK_AWAITING_REBOOT = "rolled_back_awaiting_reboot"  # the booted release failed; back on reboot
    # Profile and current system switched back by hand to a system this agent
    # deployed earlier (`nixos-rebuild switch --rollback`).
    ROLLED_BACK_BY_HAND = "rolled_back_by_hand"
    DIRTY = "dirty"                  # profile or current system changed by someone else


class Upstream(enum.Enum):
    """Upstream relative to the record and the host."""

    DEPLOYED = "deployed"            # what the record says we deployed
    RUNNING = "running"              # not the record, but current == profile == upstream
    NEW = "new"                      # anything else: a release to deploy


@dataclass(frozen=True)
class Facts:
    """Everything the phase and the plan are computed from, read at once."""

    host: HostView
    boot_id: str | None
    rebooted: bool                   # booted since the record was staged for boot
    suspension: dict[str, Any] | None
    kexec_boot: bool                 # this boot is the one our kexec started (Loader* variables are stale)
    steady_marker: bool              # the FleetLock initialization ran since this boot
    # The Loader* variables describe an earlier boot (anyone's kexec): no evidence about this one.
    loader_stale: bool = False
    loader_fingerprint: str | None = None


def gather_facts(state: State, store: StateStore) -> Facts:
    boot_id = current_boot_id()
    request = state.reboot_request if isinstance(state.reboot_request, dict) else {}
    kexec_boot = request.get("mode") == "kexec" and bool(boot_id) and request.get("boot_id") != boot_id
    fingerprint, kexeced = boot_loader_facts(boot_id)
    loader_stale = kexec_boot or kexeced or loader_variables_stale(state.loader_boot, fingerprint, boot_id)
    return Facts(read_host(), boot_id, rebooted_since_staging(state), store.suspension(), kexec_boot,
                 os.path.exists(FLEETLOCK_STEADY_MARKER), loader_stale, fingerprint)


def note_loader_boot(state: State, facts: Facts) -> None:
    """Remember which firmware boot the Loader* variables describe (the
    first boot that showed them), so that a later kexec'ed boot, ours or
    not, does not take them for its own."""
    if facts.loader_fingerprint and facts.boot_id and not facts.loader_stale:
        recorded = state.loader_boot if isinstance(state.loader_boot, dict) else {}
        if recorded.get("fingerprint") != facts.loader_fingerprint:
            state.loader_boot = {"boot_id": facts.boot_id, "fingerprint": facts.loader_fingerprint}


def host_phase(state: State, facts: Facts) -> Phase:
    """The phase, from the record and what the host runs (pure)."""
    host = facts.host
    if state.intent:
        return Phase.INTERRUPTED
    if state.deployed is None:
        return Phase.UNTRACKED
    if host.profile != state.deployed:
        return Phase.ROLLED_BACK_BY_HAND if switched_back_by_hand(state, host) else Phase.DIRTY
    if host.current == state.deployed:
        return Phase.SETTLED if state.verified else Phase.BOOTED_UNVERIFIED
    if state.activation != "boot" or host.current != state.staged_from:
        return Phase.DIRTY
    if facts.rebooted:
        return Phase.FELL_BACK
    return Phase.ROLLED_BACK_AWAITING_REBOOT if state.rollback_of else Phase.STAGED


def deployed_before(state: State) -> set[str]:
    """The systems this agent deployed and ran (its history: a switch, or a
    boot deploy verified after the reboot)."""
    history = state.history if isinstance(state.history, list) else []
    return {entry["path"] for entry in history
            if entry.get("outcome") == "deployed" and isinstance(entry.get("path"), str)}


def switched_back_by_hand(state: State, host: HostView) -> bool:
    """What `nixos-rebuild switch --rollback` leaves: profile and current
    system on an earlier system this agent deployed, not the record's."""
    return (host.current is not None and host.current == host.profile != state.deployed
            and host.current in deployed_before(state))


def upstream_relation(state: State, host: HostView, upstream: str) -> Upstream:
    if state.deployed is not None and upstream == state.deployed:
        return Upstream.DEPLOYED
    if host.current == upstream == host.profile:
        return Upstream.RUNNING
    return Upstream.NEW


# ---------------------------------------------------------------------------
# The decision: phase x upstream -> plan (pure), holds applied in one place
# ---------------------------------------------------------------------------


class StepKind(enum.Enum):
    RECOVER = "recover"                  # finish or roll back an interrupted deploy
    VERIFY = "verify"                    # health-check the release the host booted into
    REPORT_FALLBACK = "report_fallback"  # the staged release did not boot: report, roll the profile back
    ROLL_BACK = "roll_back"              # a booted release failed its checks: profile back, reboot due
    TRACK = "track"                      # record what runs (no record yet)
    RESUME = "resume"                    # record what runs (the host runs upstream again)
    ACCEPT_ROLLBACK = "accept_rollback"  # a hand rollback: quarantine the build it replaced, record what runs
    RELEASE_SLOT = "release_slot"        # give back the FleetLock slot once settled
    PREFETCH = "prefetch"                # realise upstream's closure while its deploy waits (GC-rooted)
    DEPLOY = "deploy"                    # realise, activate (switch or boot), check, record upstream
    REBOOT_RELEASE = "reboot_release"    # reboot or kexec into a staged release
    REBOOT_ROLLBACK = "reboot_rollback"  # reboot or kexec into the system a failed release was rolled back to


# The decision table (the module docstring, README and docs/design/lifecycle.md show it; a test checks
# they match).  Follow-through of the previous deploy comes before the next
# release's steps.  Pairs that cannot happen are absent.
DECISION_TABLE: Final[dict[tuple[Phase, Upstream], tuple[StepKind, ...]]] = {
    (Phase.INTERRUPTED, Upstream.DEPLOYED): (StepKind.RECOVER,),
    (Phase.INTERRUPTED, Upstream.RUNNING): (StepKind.RECOVER,),
    (Phase.INTERRUPTED, Upstream.NEW): (StepKind.RECOVER,),
    (Phase.UNTRACKED, Upstream.RUNNING): (StepKind.TRACK, StepKind.RELEASE_SLOT),
    (Phase.UNTRACKED, Upstream.NEW): (),
    (Phase.SETTLED, Upstream.DEPLOYED): (StepKind.RELEASE_SLOT,),
    (Phase.SETTLED, Upstream.NEW): (StepKind.RELEASE_SLOT, StepKind.PREFETCH, StepKind.DEPLOY,
                                    StepKind.REBOOT_RELEASE),
    (Phase.STAGED, Upstream.DEPLOYED): (StepKind.REBOOT_RELEASE,),
    (Phase.STAGED, Upstream.NEW): (StepKind.PREFETCH, StepKind.DEPLOY, StepKind.REBOOT_RELEASE),
    (Phase.BOOTED_UNVERIFIED, Upstream.DEPLOYED): (StepKind.VERIFY, StepKind.RELEASE_SLOT),
    (Phase.BOOTED_UNVERIFIED, Upstream.NEW): (StepKind.VERIFY, StepKind.RELEASE_SLOT, StepKind.PREFETCH,
                                              StepKind.DEPLOY, StepKind.REBOOT_RELEASE),
    (Phase.FELL_BACK, Upstream.DEPLOYED): (StepKind.REPORT_FALLBACK,),
    (Phase.FELL_BACK, Upstream.NEW): (StepKind.REPORT_FALLBACK,),
    (Phase.ROLLED_BACK_AWAITING_REBOOT, Upstream.DEPLOYED): (StepKind.REBOOT_ROLLBACK,),
    (Phase.ROLLED_BACK_AWAITING_REBOOT, Upstream.NEW): (StepKind.REBOOT_ROLLBACK, StepKind.PREFETCH,
                                                        StepKind.DEPLOY, StepKind.REBOOT_RELEASE),
    (Phase.ROLLED_BACK_BY_HAND, Upstream.DEPLOYED): (StepKind.ACCEPT_ROLLBACK,),
    (Phase.ROLLED_BACK_BY_HAND, Upstream.RUNNING): (StepKind.ACCEPT_ROLLBACK,),
    (Phase.ROLLED_BACK_BY_HAND, Upstream.NEW): (StepKind.ACCEPT_ROLLBACK,),
    (Phase.DIRTY, Upstream.DEPLOYED): (),
    (Phase.DIRTY, Upstream.RUNNING): (StepKind.RESUME, StepKind.RELEASE_SLOT),
    (Phase.DIRTY, Upstream.NEW): (),
}
# With --force, a host that is not ours deploys upstream anyway.
FORCED_STEPS: Final = (StepKind.DEPLOY, StepKind.REBOOT_RELEASE)


class Hold(enum.Enum):
    STOP = "stop"                  # SIGTERM/SIGINT: checked between any two steps
    SUSPEND = "suspend"            # `autodeploy.py suspend`: the agent changes nothing on the host
    QUARANTINE = "quarantine"      # upstream failed here before (until it changes, or --force)
    WAVE = "wave"                  # not this host's turn in the pointer's rollout (or --force)
    PAUSE = "pause"                # `pause:` in the pointer
    REBOOT_MODE = "reboot_mode"    # no --reboot-mode: reboots are an operator's
    WINDOW = "window"              # outside --reboot-window
    SLOT = "slot"                  # no FleetLock slot granted (asked at the reboot gate)


_REBOOTS: Final = frozenset((StepKind.REBOOT_RELEASE, StepKind.REBOOT_ROLLBACK))
# Which hold blocks which step.  apply_holds() is the only place that reads it.
HOLD_TABLE: Final[dict[Hold, frozenset[StepKind]]] = {
    Hold.STOP: frozenset(StepKind),
    Hold.SUSPEND: frozenset((StepKind.RECOVER, StepKind.REPORT_FALLBACK, StepKind.ROLL_BACK,
                             StepKind.ACCEPT_ROLLBACK, StepKind.RELEASE_SLOT, StepKind.PREFETCH,
                             StepKind.DEPLOY)) | _REBOOTS,
    Hold.QUARANTINE: frozenset((StepKind.PREFETCH, StepKind.DEPLOY)),
    # Not the prefetch: a host waiting for its wave is ready when its turn comes.
    Hold.WAVE: frozenset((StepKind.DEPLOY,)),
    Hold.PAUSE: frozenset((StepKind.PREFETCH, StepKind.DEPLOY, StepKind.REBOOT_RELEASE)),
    Hold.REBOOT_MODE: _REBOOTS,
    Hold.WINDOW: _REBOOTS,
    Hold.SLOT: _REBOOTS,
}
# The state a cycle reports when its plan waits on a hold (first held step).
HOLD_STATES: Final = {
    Hold.STOP: "stopped", Hold.SUSPEND: "suspended", Hold.QUARANTINE: "quarantined", Hold.WAVE: "waiting_rollout",
    Hold.PAUSE: "rollout_paused", Hold.REBOOT_MODE: "pending_reboot", Hold.WINDOW: "pending_reboot",
    Hold.SLOT: "waiting_reboot_slot",
}


@dataclass(frozen=True)
class Step:
    kind: StepKind
    target: str | None = None
    detail: str = ""                         # the switch mode of a deploy
    held: tuple[tuple[Hold, str], ...] = ()  # (hold, why) for every hold that blocks this step

    def describe(self) -> str:
        name = basename_or_empty(self.target) or "-"
        return {
            StepKind.RECOVER: f"recover the interrupted deploy of {name}",
            StepKind.VERIFY: f"verify {name} (booted, not yet checked)",
            StepKind.REPORT_FALLBACK: f"report that {name} did not boot; profile and boot default back on what runs",
            StepKind.ROLL_BACK: f"roll back from {name}: profile and boot default to the previous system",
            StepKind.TRACK: f"record {name} as deployed (start tracking)",
            StepKind.RESUME: f"record {name} as deployed (resume tracking)",
            StepKind.ACCEPT_ROLLBACK: f"accept the manual rollback to {name}: quarantine {self.detail or '-'}, "
                                      f"record {name} as deployed (then plan again)",
            StepKind.RELEASE_SLOT: "release the FleetLock slot (once settled)",
            StepKind.PREFETCH: f"prefetch {self.target}: realise its closure before its turn (GC root "
                               f"{PREFETCH_GCROOT})",
            StepKind.DEPLOY: f"deploy {self.target} ({self.detail or 'switch'})",
            StepKind.REBOOT_RELEASE: "reboot into the staged release (when one is staged)",
            StepKind.REBOOT_ROLLBACK: f"reboot into {name} (rollback)",
        }[self.kind]


@dataclass(frozen=True)
class Plan:
    phase: Phase
    upstream: Upstream
    steps: tuple[Step, ...]
    reason: str
    dirty: bool = False

    def render(self) -> list[str]:
        lines = [f"phase: {self.phase.value}; upstream: {self.upstream.value}: {self.reason}"]
        if not self.steps:
            lines.append("nothing to do")
        for number, step in enumerate(self.steps, 1):
            waits = "".join(f"; waits: {hold.value}: {why}" for hold, why in step.held)
            lines.append(f"{number}. {step.describe()}{waits}")
        return lines


def active_holds(cfg: Config, state: State, facts: Facts, upstream: str,
                 rollout: dict[str, Any] | None) -> dict[Hold, str]:
    """The holds in force this cycle, each with its reason (the FleetLock
    slot is asked at the reboot gate, and added there)."""
    holds: dict[Hold, str] = {}
    if Stopping.requested:
        holds[Hold.STOP] = "a stop was requested (SIGTERM/SIGINT)"
    if facts.suspension is not None:
        holds[Hold.SUSPEND] = f"suspended by an operator ({facts.suspension.get('reason') or 'no reason'})"
    if state.quarantined == upstream and not cfg.force:
        holds[Hold.QUARANTINE] = (f"{upstream} is quarantined ({state.quarantine_reason}); waiting for a new "
                                  "upstream or --force")
    if rollout is not None and rollout.get("target") == upstream:
        where = describe_rollout(rollout, now_epoch())
        if rollout.get("paused"):
            holds[Hold.PAUSE] = f"not deploying {basename_or_empty(upstream)}: {where}"
        elif not rollout.get("admitted") and not cfg.force:
            holds[Hold.WAVE] = f"not deploying {basename_or_empty(upstream)} yet: {where}"
    if cfg.reboot_mode is None:
        holds[Hold.REBOOT_MODE] = "no --reboot-mode: the reboot is left to an operator"
    elif cfg.reboot_window is not None and not in_window(cfg.reboot_window, now_local()):
        holds[Hold.WINDOW] = f"outside the reboot window {format_window(cfg.reboot_window)}"
    return holds


def apply_holds(step: Step, holds: dict[Hold, str]) -> Step:
    """The one place where holds meet steps."""
    held = tuple((hold, why) for hold, why in holds.items() if step.kind in HOLD_TABLE[hold])
    return dataclasses.replace(step, held=held)


def plan(phase: Phase, relation: Upstream, state: State, host: HostView, upstream: str, *, force: bool,
         fleetlock: bool, mode: str, holds: dict[Hold, str], accept_manual_rollback: bool = False) -> Plan:
    """Phase x upstream -> the ordered steps of this cycle, holds applied (pure)."""
    by_hand = phase == Phase.ROLLED_BACK_BY_HAND
    # Without --accept-manual-rollback a hand rollback is a manual deploy like any other.
    kinds = DECISION_TABLE[(Phase.DIRTY if by_hand and not accept_manual_rollback else phase, relation)]
    dirty = phase in (Phase.DIRTY, Phase.UNTRACKED, Phase.ROLLED_BACK_BY_HAND) and not kinds
    if dirty and force:
        kinds, dirty = FORCED_STEPS, False
    if not fleetlock:
        kinds = tuple(kind for kind in kinds if kind != StepKind.RELEASE_SLOT)
    targets = {StepKind.RECOVER: (state.intent or {}).get("upstream"), StepKind.VERIFY: state.deployed,
               StepKind.REPORT_FALLBACK: state.deployed, StepKind.TRACK: host.current,
               StepKind.RESUME: host.current, StepKind.ACCEPT_ROLLBACK: host.current, StepKind.PREFETCH: upstream,
               StepKind.DEPLOY: upstream, StepKind.REBOOT_ROLLBACK: state.deployed}
    details = {StepKind.DEPLOY: mode, StepKind.ACCEPT_ROLLBACK: basename_or_empty(state.deployed)}
    steps = [apply_holds(Step(kind, targets.get(kind), details.get(kind, "")), holds) for kind in kinds]
    deploy = next((step for step in steps if step.kind == StepKind.DEPLOY), None)
    if deploy is None or not deploy.held:
        # A deploy that runs realises the closure itself: prefetching is for one that waits.
        steps = [step for step in steps if step.kind != StepKind.PREFETCH]
    elif phase == Phase.STAGED and relation == Upstream.NEW:
        # The new release waits: the reboot into the staged one is still due.
        steps = ([step for step in steps if step.kind in _REBOOTS]
                 + [step for step in steps if step.kind not in _REBOOTS])
    return Plan(phase, relation, tuple(steps), plan_reason(phase, relation, state, force and bool(kinds),
                                                           accept_manual_rollback), dirty)


def plan_reason(phase: Phase, relation: Upstream, state: State, forced: bool,
                accept_manual_rollback: bool = False) -> str:
    if phase == Phase.ROLLED_BACK_BY_HAND and (accept_manual_rollback or relation != Upstream.RUNNING) and not forced:
        back = (f"switched back by hand from {basename_or_empty(state.deployed)} to a system this agent deployed "
                "earlier (nixos-rebuild switch --rollback?)")
        if accept_manual_rollback:
            return f"{back}: a verdict on {basename_or_empty(state.deployed)}; plan again once it is recorded"
        return f"{back}; without --accept-manual-rollback: change nothing"
    if phase in (Phase.DIRTY, Phase.UNTRACKED, Phase.ROLLED_BACK_BY_HAND) and relation != Upstream.RUNNING:
        if forced:
            return "not ours, but --force: deploy upstream"
        if phase == Phase.UNTRACKED:
            return "no record and the host does not run upstream: change nothing"
        return "the system profile or the current system was changed by someone else (manual deploy, " \
               "nixos-rebuild test?): change nothing"
    if relation == Upstream.RUNNING:
        return "the host runs upstream: start tracking" if phase == Phase.UNTRACKED else \
            "the host runs upstream again: resume tracking"
    if phase == Phase.INTERRUPTED:
        return "a cycle was interrupted: converge first, then plan again"
    return {Upstream.DEPLOYED: "up to date", Upstream.NEW: "upstream changed"}[relation]


# ---------------------------------------------------------------------------
# Stop requests
# ---------------------------------------------------------------------------


class Stopping:
    """SIGTERM/SIGINT end the agent between steps, never inside an
    activation; while it only waits (on the network, the lock server, a
    unit, a download) inside interruptible(), they end the run at once,
    changing nothing."""

    requested = False
    _waiting = 0

    @classmethod
    def install(cls) -> None:
        def handler(signum: int, _frame: Any) -> None:
            cls.requested = True
            if cls._waiting:
                raise Interrupted(signum)
            log(f"received signal {signum}: stopping after the current step")
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    @classmethod
    def interruptible(cls) -> Any:
        import contextlib

        @contextlib.contextmanager
        def waiting() -> Any:
            if cls.requested:
                raise Interrupted(0)
            cls._waiting += 1
            try:
                yield
            finally:
                cls._waiting -= 1
        return waiting()

    @classmethod
    def check(cls, failed: ProcessError | None = None) -> None:
        """Between two steps, or after a child failed: a stop request ends
        the run here (a child killed by the stop is a stop, not a failure)."""
        if cls.requested:
            if failed is not None:
                log(f"{failed} (stopped by the stop request: not a failure)")
            raise Interrupted(0)


# ---------------------------------------------------------------------------
# The record: state.json, intents, the deploy history
# ---------------------------------------------------------------------------


class Ledger:
    """The state record of this cycle and its store.  Every part writes its
    own fields through it; a dry run writes nothing."""

    def __init__(self, cfg: Config, store: StateStore) -> None:
        self.cfg, self.store = cfg, store
        self.state = State()
        self.attempt: dict[str, Any] | None = None  # {path, revision, action, started}

    def save(self) -> None:
        if not self.cfg.dry_run:
            try:
                self.store.save(self.state)
            except OSError as exc:
                raise StateError(f"cannot save the state to {self.store.path}: {exc.strerror}") from None

    def set_intent(self, phase: str, **fields: Any) -> None:
        """Record the next step before taking it.  When that cannot be
        recorded, the intent in memory stays what is on disk, so a rollback
        acts on what really happened."""
        before = self.state.intent
        self.state.intent = {**(before or {}), **fields, "phase": phase}
        try:
            self.save()
        except StateError:
            self.state.intent = before
            raise

    def save_best_effort(self, what: str) -> None:
        """A rollback goes on when the state cannot be written (disk full):
        restoring the host matters more, and the intent last written makes
        the next run converge to the same end."""
        try:
            self.save()
        except StateError as exc:
            log(f"warning: {what} not recorded: {exc}")

    def begin_attempt(self, path: str, action: str | None) -> None:
        state = self.state
        revision = state.upstream_revision if path == state.upstream else None
        self.attempt = {"path": path, "revision": revision, "action": action, "started": time.time()}

    def end_attempt(self, outcome: Outcome) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is None:
            return
        ended = time.time()
        entry = {"time": round(attempt["started"], 3), "path": attempt["path"], "revision": attempt["revision"],
                 "action": attempt["action"] or "deploy", "outcome": outcome.state,
                 "duration": round(ended - attempt["started"], 3),
                 "error_kind": outcome.error.kind if outcome.error else None}
        history = self.state.history if isinstance(self.state.history, list) else []
        self.state.history = (history + [entry])[-HISTORY_LENGTH:]


def run_health_checks(cfg: Config, fetcher: Fetcher) -> None:
    """Connectivity (the pointer URL) and the --health-check commands."""
    deadline = time.monotonic() + cfg.health_timeout
    if cfg.connectivity_check:
        try:
            # Not interruptible: a deploy under way is finished and recorded.
            fetcher.get(cfg.url, timeout=min(cfg.timeout, cfg.health_timeout), interruptible=False)
        except FetchError as exc:
            raise DeployError(f"connectivity check failed: {exc}", "health") from None
        debug("connectivity check passed")
    for command in cfg.health_checks:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeployError(f"health checks took longer than {cfg.health_timeout:g}s", "health")
        log(f"health check: {command}")
        try:
            result = shell(command, timeout=remaining)
        except ProcessError as exc:
            raise DeployError(f"health check {command!r} {exc}", "health") from None
        if result.returncode < 0:
            # `systemctl stop` signals the whole cgroup, the check too: a
            # check killed by the stop is a stop, not a failed check.
            Stopping.check(ProcessError(["/bin/sh", "-c", command], result.returncode))
        if result.returncode != 0:
            raise DeployError(f"health check {command!r} exited with {result.returncode}", "health")


# ---------------------------------------------------------------------------
# Deploying: deploy, verify, the one rollback, crash recovery
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollback:
    """Where a rollback puts the host."""

    why: str
    profile: str | None          # the system profile goes back to this
    current: str | None          # with activation "switch": the host runs this afterwards
    activation: str | None       # "switch" (activate `current`), "boot" (boot default = `profile`), None (nothing ran)
    bad: str | None = None       # quarantined (None: nothing to quarantine)
    count: bool = True           # a rollback of a running system (rollbacks_total)


class VerifyFailed(Exception):
    """The release the host booted into failed its checks."""

    def __init__(self, error: DeployError) -> None:
        super().__init__(str(error))
        self.error = error


class Deployer:
    def __init__(self, cfg: Config, ledger: Ledger, fetcher: Fetcher) -> None:
        self.cfg, self.ledger, self.fetcher = cfg, ledger, fetcher

    @property
    def state(self) -> State:
        return self.ledger.state

    # -- deploying ---------------------------------------------------------

    def choose_action(self, system: str | None, host: HostView) -> str:
        mode = self.cfg.switch_mode
        if mode == SwitchMode.SMART:
            if system is None:
                return "smart"
            differ = boot_differs(host.current, system)
            if differ:
                log(f"smart mode: {', '.join(differ)} differ: staging for the next boot")
                return "boot"
            return "switch"
        return mode.value

    def deploy(self, upstream: str, host: HostView) -> Outcome:
        ledger = self.ledger
        ledger.begin_attempt(upstream, None)
        log(f"realising {upstream} from the binary cache")
        try:
            with Stopping.interruptible():  # a download is a wait: a stop ends it (nix too)
                realise_closure(upstream, UPSTREAM_GCROOT, verify=not self.verified_by_prefetch(upstream))
        except ProcessError as exc:
            Stopping.check(exc)
            raise DeployError(f"cannot realise {upstream}: {exc}", "realise") from None
        self.drop_prefetch()  # the deploy's own root holds the closure now
        try:
            check_nixos_system(upstream, host.current)
        except DeployError as exc:
            self.quarantine(upstream, str(exc))
            raise
        action = self.choose_action(upstream, host)
        if ledger.attempt is not None:
            ledger.attempt["action"] = action
        # Before the profile changes: a full /boot would fail the activation half-way.
        self.check_boot_space(upstream)
        Stopping.check()
        previous_profile, previous_current = host.profile, host.current
        ledger.set_intent("profile", upstream=upstream, action=action, previous_profile=previous_profile,
                          previous_current=previous_current, started=time.time(), activated=False)
        log(f"setting the system profile to {upstream}")
        try:
            nix_set_profile(upstream)
        except ProcessError as exc:
            self.roll_back(Rollback(f"setting the profile failed: {exc}", previous_profile, previous_current, None))
            raise DeployError(f"cannot set the system profile: {exc}", "activation") from None
        try:
            ledger.set_intent("activate", activated=True)
        except StateError:
            # Nothing is activated yet: put the profile back.  Should even that
            # not be recorded, the intent on disk (phase "profile") makes the
            # next run do the same.
            self.roll_back(Rollback("the activation could not be recorded", previous_profile, previous_current,
                                    None, count=False))
            raise
        log(f"activating {upstream}: switch-to-configuration {action}")
        try:
            switch_to_configuration(upstream, action)
        except ProcessError as exc:
            self.fail_and_roll_back(upstream, f"activation failed: {exc}", "activation")
        if action == "switch":
            ledger.set_intent("check")
            try:
                run_health_checks(self.cfg, self.fetcher)
            except DeployError as exc:
                self.fail_and_roll_back(upstream, str(exc), "health")
        return self.finish_deploy(upstream, action, previous_current, previous_profile)

    def finish_deploy(self, upstream: str, action: str, previous_current: str | None,
                      previous_profile: str | None) -> Outcome:
        state = self.state
        state.interrupted.pop(upstream, None)
        state.staged_boot_id = current_boot_id() if action == "boot" else None
        state.deploys_total += 1
        # Record and clear the intent in one atomic write, then the marker.
        self.record(upstream, staged_from=previous_current, activation=action, previous=previous_profile,
                    verified=(action == "switch"))
        self.mark_staged(upstream if action == "boot" else None)
        log(f"deployed {upstream} ({action})")
        if action == "boot":
            return Outcome("pending_reboot", f"{basename_or_empty(upstream)} is staged for the next boot",
                           previous_current, upstream, deployed=True)
        return Outcome("deployed", f"switched to {basename_or_empty(upstream)}", previous_current, upstream,
                       deployed=True)

    def track(self, host: HostView) -> None:
        self.record(host.current, staged_from=host.current, activation="switch", previous=host.profile)

    # -- ready before its turn ---------------------------------------------

    def prefetch(self, upstream: str) -> None:
        """Realise upstream's closure while its deploy waits (substitution
        only; GC-rooted at PREFETCH_GCROOT, which holds one build: the newest
        replaces the one before), so that its turn costs only the activation.
        A failure is no failed deploy: counted, reported, tried again."""
        state = self.state
        done = state.prefetched if isinstance(state.prefetched, dict) else {}
        if done.get("path") == upstream and store_path_of(PREFETCH_GCROOT) == upstream and os.path.isdir(upstream):
            return  # realised and rooted by an earlier cycle: no process, no request
        log(f"prefetching {upstream} from the binary cache: its deploy waits, its closure need not")
        try:
            with Stopping.interruptible():  # a download is a wait: a stop ends it (nix too)
                realise_closure(upstream, PREFETCH_GCROOT)
        except ProcessError as exc:
            Stopping.check(exc)
            state.prefetch_failures_total += 1
            state.prefetch_error = {"path": upstream, "message": printable(str(exc))[:MAX_MESSAGE],
                                    "time": time.time()}
            self.ledger.save()
            log(f"prefetch of {upstream} failed (tried again next cycle; not a failed deploy): {exc}")
            return
        state.prefetched = {"path": upstream, "time": time.time(), "boot_id": current_boot_id()}
        state.prefetch_error = None
        self.ledger.save()
        log(f"prefetched {upstream}: when its turn comes only the activation remains")

    def verified_by_prefetch(self, upstream: str) -> bool:
        """A prefetch verified upstream's closure during this boot: a power
        loss since would have meant a new boot, so it needs no second pass
        (hashing a whole system closure costs seconds)."""
        done = self.state.prefetched if isinstance(self.state.prefetched, dict) else {}
        boot_id = current_boot_id()
        return bool(boot_id) and done.get("path") == upstream and done.get("boot_id") == boot_id

    def drop_prefetch(self) -> None:
        """The prefetch root is given up once a deploy realised its own."""
        if self.state.prefetched is None and not os.path.islink(PREFETCH_GCROOT):
            return
        try:
            os.unlink(PREFETCH_GCROOT)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log(f"warning: cannot remove {PREFETCH_GCROOT}: {exc.strerror}")
        self.state.prefetched = None

    # -- a manual rollback ---------------------------------------------------

    def accept_manual_rollback(self, host: HostView) -> Outcome:
        """Someone switched the host back by hand to a system this agent
        deployed earlier (`nixos-rebuild switch --rollback`): a verdict on the
        build it replaced.  Quarantine that build, record what runs (the host
        stays tracked) and let the next build CI publishes deploy."""
        state = self.state
        bad, running = state.deployed, host.current
        assert bad is not None and running is not None
        self.ledger.begin_attempt(bad, "manual_rollback")
        why = f"switched back by hand from {basename_or_empty(bad)} to {basename_or_empty(running)}"
        log(f"MANUAL ROLLBACK: {why}: {bad} is quarantined; tracking {running}")
        state.quarantined, state.quarantine_reason = bad, f"rolled back by hand to {running}"
        state.manual_rollbacks_total += 1
        state.manual_rollback = {"path": bad, "to": running, "time": time.time()}
        state.staged_boot_id = None
        self.record(running, staged_from=running, activation="switch", previous=running)
        self.mark_staged(None)  # a release staged for the next boot was rolled back too
        return Outcome("rolled_back", f"{why} (a manual rollback): {basename_or_empty(bad)} is quarantined until "
                                      "upstream changes", old_system=bad, new_system=running)

    def record(self, system: str | None, *, staged_from: str | None, activation: str,
               previous: str | None, verified: bool = True, rollback_of: str | None = None) -> None:
        state = self.state
        state.deployed, state.staged_from, state.activation = system, staged_from, activation
        state.previous, state.verified, state.deployed_at = previous, verified, time.time()
        state.rollback_of = rollback_of
        state.intent = None
        self.ledger.save()

    def mark_staged(self, system: str | None) -> None:
        """The /run marker; where the boot ID already tells a reboot apart,
        a full /run is only a warning (the record is written)."""
        try:
            mark_staged(system)
        except StateError as exc:
            if system is not None and not self.state.staged_boot_id:
                raise
            log(f"warning: {exc} (the boot ID tells the reboot apart)")

    def quarantine(self, path: str, reason: str) -> None:
        self.state.quarantined, self.state.quarantine_reason = path, reason
        self.ledger.save()
        log(f"quarantined {path}: it will not be tried again until upstream changes or --force")

    def lift_quarantine(self, upstream: str) -> None:
        if self.state.quarantined and self.state.quarantined != upstream:
            log(f"upstream moved on from the quarantined {self.state.quarantined}: quarantine lifted")
            self.state.quarantined = self.state.quarantine_reason = None

    def check_boot_space(self, system: str) -> None:
        """Refuse (nothing changed yet) when the new kernel and initrd would not
        fit into a separate /boot with a margin."""
        state = self.state
        boot = boot_dir_of(self.cfg.boot_dir)
        free = boot_free_bytes(boot)
        state.boot_free_bytes = free
        if free is None:
            state.boot_needed_bytes = None
            debug(f"{boot} is not a separate filesystem: no space check")
            return
        needed = with_margin(boot_space_needed(system, boot))
        state.boot_needed_bytes = needed
        if needed > free:
            raise DeployError(f"{boot} has {free} bytes free, but the kernel and initrd of {system} need "
                              f"{needed} bytes there (with the margin): not deploying; free space in {boot} "
                              "(delete old generations, then `nix-collect-garbage -d` and "
                              "`/run/current-system/bin/switch-to-configuration boot`)", "boot_space")
        debug(f"{boot}: {free} bytes free, {needed} needed")

    # -- the one rollback --------------------------------------------------

    def roll_back(self, to: Rollback, record: Callable[[], None] | None = None) -> None:
        """Put profile (and boot default, or the running system) where `to`
        says.  `record` first writes what the record will say afterwards, in
        the same atomic write as the intent, so an interrupted rollback is
        finished by the next run with the right record."""
        state = self.state
        if record is not None:
            record()
        if to.bad is not None:
            state.quarantined, state.quarantine_reason = to.bad, to.why
        upstream = to.bad or (state.intent or {}).get("upstream") or ""
        state.intent = {"phase": "rollback", "upstream": upstream, "action": to.activation or "switch",
                        "previous_profile": to.profile, "previous_current": to.current,
                        "activated": to.activation is not None, "reason": to.why, "count": to.count}
        self.ledger.save_best_effort("rollback intent")
        log(f"ROLLING BACK to {to.current or to.profile} (profile {to.profile}): {to.why}")
        try:
            if to.profile and read_host().profile != to.profile:
                nix_set_profile(to.profile)
            if to.activation == "switch" and to.current:
                switch_to_configuration(to.current, "switch")
                if to.profile and to.profile != to.current:
                    # A reboot was due (a staged release, a rollback): the
                    # switch made what runs the boot default; give it back.
                    switch_to_configuration(to.profile, "boot")
            elif to.activation == "boot" and to.profile:
                switch_to_configuration(to.profile, "boot")
        except ProcessError as exc:
            Stopping.check(exc)
            raise RollbackError(f"ROLLBACK FAILED ({exc}); the host needs a human: profile, boot default and "
                                "current system may disagree") from None
        host = read_host()
        if host.profile != to.profile or (to.activation == "switch" and host.current != to.current):
            raise RollbackError(f"ROLLBACK INCOMPLETE: profile={host.profile} current={host.current}, "
                                f"expected profile={to.profile} current={to.current}")
        state.intent = None
        if to.activation == "boot" and state.activation == "boot" and state.deployed == to.profile != host.current:
            # The boot default changed in this boot: the next reboot is the one
            # the record waits for (an interrupted rollback may be finished
            # in a later boot than it started in).
            state.staged_boot_id = current_boot_id()
        state.rollbacks_total += int(to.count)
        self.ledger.save_best_effort("rollback")
        log(f"rolled back: current={host.current} profile={host.profile}")
        if to.bad is not None:
            log(f"quarantined {to.bad}: it will not be tried again until upstream changes or --force")

    def intent_rollback(self, why: str, bad: str | None, count: bool = True) -> Rollback:
        """Back to where the intent says the deploy started."""
        intent = self.state.intent or {}
        activated = intent.get("activated", True)  # unknown: assume it had started
        return Rollback(why, intent.get("previous_profile"), intent.get("previous_current"),
                        intent.get("action", "switch") if activated else None, bad, count)

    def fail_and_roll_back(self, upstream: str, why: str, kind: str) -> NoReturn:
        log(f"DEPLOY FAILED: {why}")
        self.roll_back(self.intent_rollback(why, upstream))
        raise DeployError(f"deploy of {upstream} failed and was rolled back: {why}", kind)

    # -- after a reboot: verification, fallback ------------------------------

    def verify_booted(self) -> Outcome:
        state = self.state
        deployed = state.deployed
        assert deployed is not None
        log(f"running {deployed} for the first time after a reboot: checking its health")
        self.ledger.begin_attempt(deployed, "verify")
        # A failed boot assessment (check-boot) left this boot unblessed:
        # the boot loader would fall back later; roll back now instead.
        failed = boot_check_failure(self.cfg.state_dir, deployed)
        try:
            if failed is not None:
                raise DeployError(f"the boot assessment failed during this boot: {failed}", "health")
            run_health_checks(self.cfg, self.fetcher)
        except DeployError as exc:
            raise VerifyFailed(DeployError(f"{deployed} failed its health checks after the reboot: {exc}",
                                           "health")) from None
        state.verified = True
        self.ledger.save()
        log(f"{deployed} is healthy after the reboot")
        return Outcome("deployed", f"{basename_or_empty(deployed)} is healthy after the reboot",
                       old_system=state.staged_from, new_system=deployed, deployed=True)

    def roll_back_booted(self, error: DeployError) -> Outcome:
        """The booted release failed its checks: profile and boot default back
        on the previous system, which becomes the record, staged for the
        next boot (the reboot is the next step, through the reboot gate)."""
        state = self.state
        bad, previous = state.deployed, state.previous
        assert bad is not None
        if previous is None:
            raise RollbackError(f"{error}; there is no previous system to roll back to: the host needs a human")
        log(f"DEPLOY FAILED after reboot: {error}")

        def record() -> None:
            state.deployed, state.staged_from, state.activation, state.previous = previous, bad, "boot", bad
            state.verified, state.deployed_at, state.rollback_of = True, time.time(), bad
            state.staged_boot_id = current_boot_id()
        self.roll_back(Rollback(str(error), previous, None, "boot", bad), record)
        self.mark_staged(previous)
        message = f"{error}; profile rolled back to {previous}"
        return Outcome("rolled_back", message, old_system=bad, new_system=previous,
                       error=DeployError(message, "health"))

    def report_fallback(self, host: HostView, facts: Facts) -> Outcome:
        """The host rebooted into what ran before the staged system: the boot
        loader fell back (a failed boot assessment, a kernel that did not come
        up) or someone picked the old entry.  A fallback is a failed deploy,
        reported once: quarantine the staged path, put profile and boot default
        back on what runs, record why."""
        state = self.state
        bad, running = state.deployed, host.current
        assert bad is not None and running is not None
        if state.rollback_of:
            raise RollbackError(f"the host rebooted into {running} again, not into {bad} it was rolled back to: "
                                "the host needs a human")
        if facts.kexec_boot:
            # After a kexec every Loader* variable describes the firmware boot before it.
            choice, detail = "kexec", "the host was kexec'ed; the boot loader's variables describe an earlier boot"
        else:
            choice, detail = boot_entry_choice(bad, self.cfg.boot_dir, variables_stale=facts.loader_stale)
        if choice == "manual":
            return Outcome("booted_previous", f"the host rebooted into {basename_or_empty(running)}, not the staged "
                                              f"{basename_or_empty(bad)}: {detail}; the staged system stays the "
                                              "boot default")
        self.ledger.begin_attempt(bad, "boot")
        why = (f"the host rebooted into {basename_or_empty(running)}, not the staged {basename_or_empty(bad)} "
               f"(boot loader fallback: {detail})")
        log(f"BOOT FAILED: {why}")

        def record() -> None:
            state.boot_failures_total += 1
            state.boot_failure = {"path": bad, "booted": running, "choice": choice, "reason": why,
                                  "time": time.time()}
            state.deployed, state.staged_from, state.activation, state.previous = running, bad, "switch", bad
            state.verified, state.deployed_at, state.staged_boot_id, state.rollback_of = True, time.time(), None, None
        self.roll_back(Rollback(why, running, running, "boot", bad, count=False), record)
        mark_staged(None)
        log(f"profile and boot default are back on {running}; {bad} is quarantined")
        return Outcome("boot_failed", why, old_system=running, new_system=bad,
                       error=DeployError(f"{bad} did not boot: {why}; profile and boot default are back on "
                                         f"{running} and {basename_or_empty(bad)} is quarantined", "boot_failed"))

    # -- crash recovery ----------------------------------------------------

    def recover(self) -> None:
        """A previous cycle was interrupted: converge from what runs, what the
        profile says and what the intent was."""
        state = self.state
        intent = state.intent or {}
        phase, upstream = intent.get("phase"), intent.get("upstream")
        log(f"found an interrupted deploy of {upstream} (phase {phase}): converging")
        if phase in ("activate", "check", "rollback"):
            self.wait_for_activation_unit()
        host = read_host()
        action = intent.get("action", "switch")
        if phase == "rollback":
            self.roll_back(self.intent_rollback(str(intent.get("reason") or "an interrupted rollback"), None,
                                                bool(intent.get("count", True))))
            return
        if phase == "profile":
            # Nothing was activated: restoring the profile is not a rollback of a running system.
            self.roll_back(Rollback("interrupted before activation", intent.get("previous_profile"),
                                    intent.get("previous_current"), None, count=False))
            return
        previous_current, previous_profile = intent.get("previous_current"), intent.get("previous_profile")
        if upstream and action == "switch" and host.current == upstream:
            try:
                run_health_checks(self.cfg, self.fetcher)
            except DeployError as exc:
                self.fail_and_roll_back(upstream, str(exc), "health")
            log(f"the interrupted deploy of {upstream} is active and healthy: recording it")
            self.finish_deploy(upstream, action, previous_current, previous_profile)
            return
        if (upstream and action == "boot" and host.current == upstream == host.profile
                and upstream != previous_current):
            # Power loss during `switch-to-configuration boot`, and the host
            # then booted what it staged: that system runs, so it is verified
            # (and rolled back if it fails), not rolled back under itself.
            log(f"the host booted {upstream}, which the interrupted boot deploy staged: verifying it")
            state.interrupted.pop(upstream, None)
            state.deploys_total += 1
            self.record(upstream, staged_from=previous_current, activation="boot", previous=previous_profile,
                        verified=False)
            return
        count = state.interrupted.get(upstream or "", 0) + 1
        state.interrupted[upstream or ""] = count
        self.roll_back(self.intent_rollback(f"interrupted during phase {phase}", None))
        if count >= 2 and upstream:
            self.quarantine(upstream, f"interrupted {count} times during activation")

    def wait_for_activation_unit(self) -> None:
        waited = 0.0
        with Stopping.interruptible():  # SIGTERM ends the wait at once; the intent stays
            while activation_unit_active() and waited < ACTIVATION_WAIT_SECONDS:
                if waited == 0:
                    log(f"{ACTIVATION_UNIT}.service is still running: waiting for it")
                time.sleep(1)
                waited += 1
        if waited >= ACTIVATION_WAIT_SECONDS:
            # Nothing was rolled back: the intent stays and the next run recovers once the unit ends.
            raise DeployError(f"{ACTIVATION_UNIT}.service still running after {waited:.0f}s: the interrupted "
                              "deploy is recovered when it has ended", "deploy")


# ---------------------------------------------------------------------------
# Rebooting: one gate (holds, then a FleetLock slot), reboot or kexec
# ---------------------------------------------------------------------------


class Rebooter:
    def __init__(self, cfg: Config, ledger: Ledger) -> None:
        self.cfg, self.ledger = cfg, ledger
        self.lock_fetcher = Fetcher(None)  # the lock server gets no pointer credentials

    @property
    def state(self) -> State:
        return self.ledger.state

    def staged(self, host: HostView) -> str | None:
        """The system waiting for the next boot, if any."""
        state = self.state
        if (state.deployed and host.profile == state.deployed and host.current != state.deployed
                and not rebooted_since_staging(state)):
            return state.deployed
        return None

    def take_slot(self) -> str | None:
        """Before a reboot or kexec: a FleetLock slot.  None when granted (or
        no FleetLock), otherwise why the reboot waits."""
        cfg = self.cfg
        if cfg.fleetlock_url is None:
            return None
        group = cfg.fleetlock_group
        operation = "pre-reboot"
        try:
            client_id = fleetlock_id(machine_id_path())
            slot = dict(self.state.reboot_slot or {})
            if slot and slot.get("group") != group:
                # Moved to another group: give back what we may hold in the old one first.
                old, operation = str(slot.get("group")), "steady-state"
                fleetlock_request(self.lock_fetcher, cfg.fleetlock_url, operation, client_id, old,
                                  cfg.timeout, interruptible=True)
                log(f"--fleetlock-group changed from {old!r} to {group!r}: released any slot held in {old!r}")
                slot = {}
            operation = "pre-reboot"
            # "May hold" from the moment we ask: the server can grant a slot
            # whose answer never reaches us; only steady-state clears this.
            slot.update({"group": group, "id": client_id, "granted": slot.get("granted", False),
                         "since": slot.get("since", time.time())})
            self.state.reboot_slot = slot
            self.ledger.save()
            fleetlock_request(self.lock_fetcher, cfg.fleetlock_url, "pre-reboot", client_id, group, cfg.timeout,
                              interruptible=True)
        except FleetLockError as exc:
            self.fleetlock_failed(operation, exc)
            return str(exc)
        self.state.reboot_slot = dict(slot, granted=True)
        self.state.fleetlock_error = None
        self.ledger.save()
        log(f"took a reboot slot in FleetLock group {group!r}")
        return None

    def reboot(self, system: str) -> None:
        """Reboot (or kexec) into `system`; only after the gate said yes."""
        Stopping.check()  # never a reboot after a stop request
        mode = self.cfg.reboot_mode
        self.state.reboot_request = {"mode": (mode or RebootMode.REBOOT).value, "boot_id": current_boot_id(),
                                     "system": system, "time": time.time()}
        if mode == RebootMode.KEXEC:
            try:
                kexec_load(system)
                Stopping.check()  # the stop came while kexec loaded
                self.ledger.save()
                log(f"kexec into {system}")
                systemctl("kexec")
                return
            except (ProcessError, OSError) as exc:
                # A kexec killed by the stop (the whole cgroup) is a stop.
                Stopping.check(exc if isinstance(exc, ProcessError) else None)
                log(f"kexec load failed ({exc}): falling back to a normal reboot")
                self.state.reboot_request["mode"] = RebootMode.REBOOT.value
        self.ledger.save()
        Stopping.check()
        log(f"rebooting into {system}")
        try:
            systemctl("reboot")
        except ProcessError as exc:
            log(f"reboot request failed: {exc}")

    def forget_request(self, boot_id: str | None) -> None:
        """The boot a reboot request started has been judged."""
        request = self.state.reboot_request
        if isinstance(request, dict) and boot_id and request.get("boot_id") != boot_id:
            self.state.reboot_request = None

    def release_slot(self, facts: Facts) -> None:
        """The host runs its deployed system, verified healthy: give back the
        slot we may hold (steady-state).  Once per boot also without a record,
        as the protocol's initialization step (the state may be older than a
        slot taken before a crash).  Not after a boot failure: while the
        system that did not boot is quarantined, the host keeps its slot, so
        the group stops rebooting into it until upstream moves on."""
        cfg, state = self.cfg, self.state
        if cfg.fleetlock_url is None or (state.reboot_slot is None and facts.steady_marker):
            return
        host = read_host()
        failed = state.boot_failure.get("path") if isinstance(state.boot_failure, dict) else None
        if not (host.current == state.deployed and state.verified and state.intent is None
                and not os.path.exists(STAGED_MARKER) and (failed is None or failed != state.quarantined)):
            return
        group = (state.reboot_slot or {}).get("group") or cfg.fleetlock_group
        try:
            client_id = fleetlock_id(machine_id_path())
            fleetlock_request(self.lock_fetcher, cfg.fleetlock_url, "steady-state", client_id, group, cfg.timeout,
                              interruptible=True)
        except FleetLockError as exc:
            self.fleetlock_failed("steady-state", exc)
            return  # tried again next cycle
        held = state.reboot_slot is not None
        state.reboot_slot = state.fleetlock_error = None
        self.ledger.save()
        try:
            write_runtime_marker(FLEETLOCK_STEADY_MARKER, f"{group}\n")
        except StateError as exc:
            # Only saves repeating the initialization step: the next run
            # sends one more (harmless) steady-state.
            log(f"warning: {exc}")
        log(f"released the reboot slot in FleetLock group {group!r}" if held else
            f"FleetLock initialization: released any slot held in group {group!r}")

    def fleetlock_failed(self, operation: str, exc: FleetLockError) -> None:
        log(f"FleetLock {operation} failed: {exc}")
        failures = self.state.fleetlock_failures
        key = f"{operation}:{exc.kind}"
        if key not in failures and len(failures) >= 32:
            key = f"{operation}:other"  # bounded, whatever the server answers
        failures[key] = failures.get(key, 0) + 1
        self.state.fleetlock_error = {"operation": operation, "kind": exc.kind, "message": str(exc)[:300],
                                      "time": str(time.time())}
        self.ledger.save()


# ---------------------------------------------------------------------------
# The pointer source: fetch, verify, rollout fields
# ---------------------------------------------------------------------------


class PointerSource:
    def __init__(self, cfg: Config, ledger: Ledger, fetcher: Fetcher) -> None:
        self.cfg, self.ledger, self.fetcher = cfg, ledger, fetcher
        self.signers = allowed_signers(cfg.trusted_keys) if cfg.trusted_keys else None
        self._digests: dict[str, str | None] | None = None  # of what does not change while we run

    def pointer_identity(self) -> dict[str, str | None]:
        """What a recorded pointer was checked against; a 304 replays it only
        while all of it is unchanged."""
        cfg, keyed = self.cfg, self.signers is not None
        if self._digests is None:
            import hashlib

            def digest(text: str) -> str:
                return hashlib.sha256(text.encode()).hexdigest()
            self._digests = {"url": digest(cfg.url),
                             "signature_url": digest(self.signature_url()) if keyed else None,
                             "keys": digest(self.signers) if self.signers is not None else None}
        return {**self._digests, "hostname": (cfg.hostname or local_hostname()) if keyed else None}

    def signature_url(self) -> str:
        return self.cfg.signature_url or self.cfg.url + ".sig"

    def floor(self) -> RevisionFloor:
        state = self.ledger.state
        return RevisionFloor(state.highest_revision, state.revision_path)

    def fetch(self) -> Pointer:
        """The pointer, checked, with this host's place in its rollout recorded."""
        pointer = self.fetch_pointer()
        rollout = parse_rollout(pointer.metadata, pointer.show)
        if any(key in pointer.metadata for key in ("rollout", "rollout-start", "rollout-duration", "pause")):
            hostname = self.cfg.hostname or local_hostname()
            self.ledger.state.rollout = rollout_view(rollout, hostname, pointer.path, now_epoch())
        else:
            self.ledger.state.rollout = None
        return pointer

    def fetch_pointer(self) -> Pointer:
        cfg, state = self.cfg, self.ledger.state
        identity = self.pointer_identity()
        record = PointerRecord.from_json(state.pointer) if state.pointer else None
        if record is not None and any(getattr(record, key) != value for key, value in identity.items()):
            record = None  # another URL, other keys, another host name: it vouches for nothing
        headers = {"Accept": "application/json"} if cfg.json_field else {}
        age = time.time() - record.fetched_at if record else -1.0
        conditional = (record is not None and bool(record.etag or record.last_modified)
                       and 0 <= age < UNCONDITIONAL_EVERY_SECONDS
                       and not (cfg.once and state.last_run_success is False))
        if conditional:
            assert record is not None
            if record.etag:
                headers["If-None-Match"] = record.etag
            if record.last_modified:
                headers["If-Modified-Since"] = record.last_modified
        resp = self.fetcher.get(cfg.url, headers, timeout=cfg.timeout)
        if resp.status == 304:
            if not conditional or record is None:
                raise FetchError(f"GET {redact_url(cfg.url)} answered 304 Not Modified to an unconditional request")
            debug("pointer not modified (304): checking the recorded pointer again")
            pointer = parse_pointer(record.body.encode(), cfg.json_field, foreign=record.foreign)
            if self.signers is not None:
                # Expiry, the host list against today's --hostname and the
                # floor can change without the body changing.
                check_trust(pointer, self.floor(), cfg)
                pointer = dataclasses.replace(pointer, signed=True)
            state.upstream, state.upstream_revision = pointer.path, pointer.revision
            return pointer
        pointer = parse_pointer(resp.body, cfg.json_field, foreign=resp.foreign)
        verified: tuple[str | None, float | None] = (None, None)
        if self.signers is not None:
            pointer, verified = self.verify(pointer, resp.body, record)
        state.upstream, state.upstream_revision = pointer.path, pointer.revision
        # Only a pointer accepted whole is kept (its rollout fields too): a
        # refused one, from another origin, must reach state.json nowhere.
        parse_rollout(pointer.metadata, pointer.show)
        keep = len(resp.body) <= MAX_PERSISTED_POINTER
        state.pointer = dataclasses.asdict(PointerRecord(
            **identity, body=resp.body.decode(), etag=resp.etag, last_modified=resp.last_modified,
            verified=verified[0], verified_at=verified[1], fetched_at=time.time(), foreign=resp.foreign)) if keep else None
        return pointer

    def verify(self, pointer: Pointer, body: bytes,
               record: PointerRecord | None) -> tuple[Pointer, tuple[str, float]]:
        """Signature (skipped when this very body and signature verified under
        these keys within the hour: a key's valid-before= is honoured at
        least that often), then the trust rules; raises the floor.  Returns
        the pointer and (digest, when ssh-keygen verified it)."""
        import hashlib
        cfg, state = self.cfg, self.ledger.state
        try:
            signature = self.fetcher.get(self.signature_url(), timeout=cfg.timeout,
                                         limit=MAX_SIGNATURE_BYTES).body
        except FetchError as exc:
            # The network failing is a fetch error; a server that answers
            # without a signature is refused like an unsigned pointer.
            if exc.transient:
                raise FetchError(f"pointer signature unavailable: {exc}") from None
            raise PointerError(f"pointer signature unavailable: {exc}", "signature") from None
        digest = hashlib.sha256(body + b"\0" + signature).hexdigest()
        verified_at = record.verified_at if record is not None and record.verified == digest else None
        if verified_at is None or not 0 <= time.time() - verified_at < UNCONDITIONAL_EVERY_SECONDS:
            assert self.signers is not None
            principal = verify_signature(body, signature, self.signers, cfg.state_dir)
            debug(f"pointer signed by {printable(principal)}")
            verified_at = time.time()
        check_trust(pointer, self.floor(), cfg)
        assert pointer.revision is not None
        if state.highest_revision is None or pointer.revision > state.highest_revision:
            state.highest_revision, state.revision_path = pointer.revision, pointer.path
        elif state.revision_path is None:
            state.revision_path = pointer.path
        return dataclasses.replace(pointer, signed=True), (digest, verified_at)


# ---------------------------------------------------------------------------
# The cycle: facts -> phase -> plan (holds applied) -> steps; reporting
# ---------------------------------------------------------------------------


def held_outcome(step: Step, rebooter: Rebooter) -> Outcome:
    """What a held step reports (the hold's state, and why it waits)."""
    hold, why = step.held[0]
    if step.kind in (StepKind.REBOOT_RELEASE, StepKind.REBOOT_ROLLBACK):
        system = basename_or_empty(rebooter.staged(read_host()))
        if hold == Hold.WINDOW:
            log(f"reboot into {system} is due but {why}: deferred")
        if hold == Hold.REBOOT_MODE:
            return Outcome("pending_reboot", f"{system} is staged for the next boot")
        return Outcome(HOLD_STATES[hold], f"{system} is staged for the next boot; the reboot waits: {why}")
    if step.kind == StepKind.REPORT_FALLBACK:
        # Reported (a failed deploy), though putting the profile back waits.
        error = DeployError(f"the host rebooted into {basename_or_empty(read_host().current)}, not the staged "
                            f"{basename_or_empty(step.target)}: it did not boot; putting the profile and boot "
                            f"default back waits: {why}", "boot_failed")
        return Outcome(HOLD_STATES[hold], str(error), error=error)
    return Outcome(HOLD_STATES[hold], why if step.kind == StepKind.DEPLOY else f"{step.describe()}: waits: {why}")


def observe_host(cfg: Config, state: State, host: HostView, now: float) -> None:
    """The fields derived from the host at the end of every run (reported,
    never decided on): reboot required, /boot space, behind upstream since,
    waiting for the reboot window."""
    state.reboot_required, state.reboot_reason = reboot_status(state, host)
    state.boot_free_bytes = boot_free_bytes(cfg.boot_dir)
    if state.upstream and host.current != state.upstream:
        state.behind_since = state.behind_since or now
    else:
        state.behind_since = None
    state.reboot_window_wait = bool(state.reboot_required and cfg.reboot_mode is not None
                                    and cfg.reboot_window is not None
                                    and not in_window(cfg.reboot_window, now_local()))


class Agent:
    def __init__(self, cfg: Config, fetcher: Fetcher | None = None) -> None:
        self.cfg = cfg
        self.store = StateStore(cfg.state_dir)
        self.ledger = Ledger(cfg, self.store)
        self.source = PointerSource(cfg, self.ledger, fetcher or Fetcher(read_token(cfg.token_file)))
        self.deployer = Deployer(cfg, self.ledger, self.source.fetcher)
        self.rebooter = Rebooter(cfg, self.ledger)
        self.loaded = False  # a state that was not read must never be written over

    @property
    def state(self) -> State:
        return self.ledger.state

    def cycle(self) -> Outcome:
        started = time.time()
        outcome: Outcome
        try:
            self.loaded = False
            self.ledger.state = self.store.load()
            self.loaded = True
            outcome = self._cycle()
        except Interrupted:
            # A stop request: between steps, or while only waiting (network,
            # lock server, a unit, a download).  End now, write nothing more;
            # an intent on disk is finished or rolled back by the next run.
            log("stopped by a signal: nothing more is done")
            return Outcome("stopped", "stopped by a signal", stopped=True)
        except AutodeployError as exc:
            outcome = Outcome(failure_state(exc), str(exc), error=exc)
        except Exception as exc:  # noqa: BLE001 - reported, never a silent crash
            if _verbose:
                import traceback
                traceback.print_exc()
            err = AutodeployError(f"internal error: {type(exc).__name__}: {outside_text(str(exc))}")
            outcome = Outcome("failed", str(err), error=err)
        self._finish(outcome, started)
        return outcome

    def _cycle(self) -> Outcome:
        cfg, state = self.cfg, self.state
        if not os.path.lexists(CURRENT_SYSTEM):
            raise NotNixOS(f"{CURRENT_SYSTEM} is missing: this is not a running NixOS system; nothing done")
        facts = gather_facts(state, self.store)
        note_loader_boot(state, facts)
        if state.intent:
            # Converge first (before the network, which recovery may not need),
            # then decide again from the new facts.
            upstream = str(state.intent.get("upstream") or "")
            first = self.plan(facts, upstream)
            if cfg.dry_run or first.steps[0].held:
                return self.execute(first, facts)
            self.execute(first, facts)
            facts = gather_facts(state, self.store)
        pointer = self.source.fetch()
        if not cfg.dry_run:
            self.deployer.lift_quarantine(pointer.path)
        host = facts.host
        log(f"current={host.current} booted={host.booted} profile={host.profile} "
            f"deployed={state.deployed} upstream={pointer.path}")
        if not host.current:
            raise NotNixOS(f"{CURRENT_SYSTEM} does not point into {STORE_DIR}: not a NixOS system; nothing done")
        decided = self.plan(facts, pointer.path)
        if cfg.dry_run or not decided.steps or decided.steps[0].kind != StepKind.ACCEPT_ROLLBACK \
                or decided.steps[0].held:
            return self.execute(decided, facts)
        # The hand rollback is recorded (the build it replaced quarantined):
        # plan again from the new record.
        accepted = self.execute(decided, facts)
        if accepted.error is not None or Stopping.requested:
            return accepted
        facts = gather_facts(state, self.store)
        return merge_outcomes(accepted, self.execute(self.plan(facts, pointer.path), facts))

    def plan(self, facts: Facts, upstream: str) -> Plan:
        cfg, state = self.cfg, self.state
        phase = host_phase(state, facts)
        holds = active_holds(cfg, state, facts, upstream, state.rollout)
        relation = upstream_relation(state, facts.host, upstream)
        decided = plan(phase, relation, state, facts.host, upstream, force=cfg.force,
                       fleetlock=cfg.fleetlock_url is not None, mode=cfg.switch_mode.value, holds=holds,
                       accept_manual_rollback=cfg.accept_manual_rollback)
        for line in decided.render():
            log(f"plan: {line}")
        return decided

    def execute(self, decided: Plan, facts: Facts) -> Outcome:
        """Run the plan's steps in order (a dispatcher: one line per step)."""
        state = self.state
        if self.cfg.dry_run:
            print("\n".join(decided.render()))
            if state.rollout is not None:
                print(f"rollout: {describe_rollout(state.rollout, now_epoch())}")
            return Outcome("up_to_date", "dry run")
        state.dirty = decided.dirty
        outcome: Outcome | None = None
        steps = list(decided.steps)
        while steps:
            step = steps.pop(0)
            if Stopping.requested and outcome is not None:
                # What the earlier steps did is reported (state, history,
                # metrics); the rest waits for the next run.
                log("stop requested: the remaining steps wait for the next run")
                break
            Stopping.check()
            if not self.applies(step):
                continue
            if step.held:
                outcome = merge_outcomes(outcome, held_outcome(step, self.rebooter))
                continue
            try:
                result = self.run_step(step, facts, decided)
            except Interrupted:
                if outcome is None:
                    raise
                # Stopped inside this step (nothing of it recorded as done):
                # what the earlier steps did is reported.
                self.ledger.attempt = None
                log("stop requested: the remaining steps wait for the next run")
                break
            except VerifyFailed as failed:
                rollback = apply_holds(Step(StepKind.ROLL_BACK, state.deployed), self.holds(facts, state.deployed))
                if rollback.held:
                    log(f"error: {failed.error}; the rollback waits: {rollback.held[0][1]}")
                    return Outcome(HOLD_STATES[rollback.held[0][0]], f"{failed.error}; the rollback waits: "
                                   f"{rollback.held[0][1]}", error=failed.error)
                step = rollback
                result = self.run_step(rollback, facts, decided, failed.error)
                steps = [apply_holds(Step(StepKind.REBOOT_ROLLBACK, state.deployed), self.holds(facts, ""))]
            if result is None:
                continue
            self.ledger.end_attempt(result)
            outcome = merge_outcomes(outcome, result)
            if result.rebooting or result.error is not None and step.kind != StepKind.ROLL_BACK:
                break
        if host_phase(state, facts) == Phase.SETTLED:
            self.rebooter.forget_request(facts.boot_id)
        if outcome is not None:
            return outcome
        if decided.dirty:
            return Outcome("dirty", decided.reason)
        return Outcome("up_to_date", decided.reason)

    def holds(self, facts: Facts, upstream: str) -> dict[Hold, str]:
        return active_holds(self.cfg, self.state, facts, upstream, self.state.rollout)

    def applies(self, step: Step) -> bool:
        """Steps that depend on what the earlier steps left behind."""
        if step.kind in (StepKind.REBOOT_RELEASE, StepKind.REBOOT_ROLLBACK):
            return self.rebooter.staged(read_host()) is not None
        if step.kind == StepKind.RELEASE_SLOT:
            return self.state.reboot_slot is not None or not os.path.exists(FLEETLOCK_STEADY_MARKER)
        return True

    def run_step(self, step: Step, facts: Facts, decided: Plan, error: DeployError | None = None) -> Outcome | None:
        deployer, host = self.deployer, read_host()
        match step.kind:
            case StepKind.RECOVER:
                deployer.recover()
                return None
            case StepKind.VERIFY:
                outcome = deployer.verify_booted()
                self.rebooter.forget_request(facts.boot_id)
                return outcome
            case StepKind.REPORT_FALLBACK:
                outcome = deployer.report_fallback(host, facts)
                self.rebooter.forget_request(facts.boot_id)
                return outcome
            case StepKind.ROLL_BACK:
                assert error is not None
                return deployer.roll_back_booted(error)
            case StepKind.TRACK | StepKind.RESUME:
                deployer.track(host)
                return Outcome("tracking", decided.reason)
            case StepKind.ACCEPT_ROLLBACK:
                return deployer.accept_manual_rollback(host)
            case StepKind.PREFETCH:
                assert step.target is not None
                deployer.prefetch(step.target)
                return None
            case StepKind.RELEASE_SLOT:
                self.rebooter.release_slot(facts)
                return None
            case StepKind.DEPLOY:
                assert step.target is not None
                view = self.state.rollout
                if self.cfg.force and isinstance(view, dict) and view.get("admitted") is False:
                    log(f"--force: deploying outside this host's wave ({describe_rollout(view, now_epoch())})")
                return deployer.deploy(step.target, host)
            case StepKind.REBOOT_RELEASE | StepKind.REBOOT_ROLLBACK:
                return self.reboot(step, host)
        raise AssertionError(step.kind)

    def reboot(self, step: Step, host: HostView) -> Outcome:
        """The reboot gate: holds were applied; the FleetLock slot is the last one."""
        system = self.rebooter.staged(host)
        assert system is not None
        waits = self.rebooter.take_slot()
        if waits is not None:
            log(f"reboot into {system} is due but no FleetLock slot was granted: retried next cycle")
            return held_outcome(dataclasses.replace(step, held=((Hold.SLOT, waits),)), self.rebooter)
        self.rebooter.reboot(system)
        return Outcome("pending_reboot", f"{basename_or_empty(system)} is staged for the next boot; rebooting "
                                         f"into it", rebooting=True)

    # -- reporting ---------------------------------------------------------

    def _finish(self, outcome: Outcome, started: float) -> None:
        cfg, state = self.cfg, self.state
        if cfg.dry_run:
            if outcome.error is not None:
                log(f"error: {outcome.error}")
            return
        host = read_host()
        ended = time.time()
        state.last_run, state.last_run_duration = ended, ended - started
        self._record_outcome(outcome, ended)
        self.ledger.end_attempt(outcome)
        observe_host(cfg, state, host, ended)
        if not self.loaded:
            log("the state file is left as it is (it could not be read)")
        else:
            try:
                self.store.save(state)
            except (OSError, StateError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                err = StateError(f"the state was NOT saved ({why}); the next run repeats or finishes this one")
                if outcome.error is None:
                    outcome.error, outcome.state = err, "failed"
                    self._record_outcome(outcome, ended)
                else:
                    log(f"error: {err}")
        if outcome.error is not None:
            log(f"error: {outcome.error}")
        else:
            log(f"state: {outcome.state}: {outcome.reason}")
        if cfg.prometheus_path:
            try:
                write_metrics(cfg.prometheus_path, state, host, self.store.suspension() is not None)
            except OSError as exc:
                log(f"cannot write metrics to {cfg.prometheus_path}: {exc}")
        run_hook(cfg, outcome, state.upstream)

    def _record_outcome(self, outcome: Outcome, ended: float) -> None:
        state = self.state
        state.last_run_success = outcome.error is None
        state.last_state, state.last_reason = outcome.state, printable(outcome.reason)[:MAX_MESSAGE]
        if outcome.error is not None:
            state.last_error = {"kind": outcome.error.kind, "message": printable(str(outcome.error))[:MAX_MESSAGE]}
        else:
            state.last_success, state.last_error = ended, None


def run_hook(cfg: Config, outcome: Outcome, upstream: str | None) -> None:
    """--on-success after a deploy, --on-failure after a failed run."""
    command = cfg.on_failure if outcome.error else (cfg.on_success if outcome.deployed else None)
    if not command:
        return
    env = dict(os.environ)
    hook_vars = {
        "NIXOS_AUTODEPLOY_OUTCOME": outcome.state,
        "NIXOS_AUTODEPLOY_SUCCESS": "0" if outcome.error else "1",
        "NIXOS_AUTODEPLOY_OLD_SYSTEM": outcome.old_system or "",
        "NIXOS_AUTODEPLOY_NEW_SYSTEM": outcome.new_system or upstream or "",
        "NIXOS_AUTODEPLOY_ERROR": str(outcome.error) if outcome.error else "",
        "NIXOS_AUTODEPLOY_ERROR_KIND": outcome.error.kind if outcome.error else "",
        "NIXOS_AUTODEPLOY_EXIT_CODE": str(outcome.error.exit_code if outcome.error else 0),
        "NIXOS_AUTODEPLOY_URL": redact_url(cfg.url),
    }
    env.update({name: printable(value)[:MAX_MESSAGE] for name, value in hook_vars.items()})
    which = "on-failure" if outcome.error else "on-success"
    try:
        result = shell(command, timeout=cfg.hook_timeout, env=env)
        if result.returncode != 0:
            log(f"{which} hook exited with {result.returncode} (ignored)")
    except ProcessError as exc:
        log(f"{which} hook failed: {exc} (ignored)")


def failure_state(exc: AutodeployError) -> str:
    if isinstance(exc, PointerError):
        return "refused"
    if isinstance(exc, DeployError) and exc.kind in ("activation", "health"):
        return "rolled_back"
    return "failed"


def merge_outcomes(before: Outcome | None, after: Outcome) -> Outcome:
    """The cycle's outcome: the last step's, but a failure stays, and a
    deploy done earlier in the cycle stays reported."""
    if before is None:
        return after
    if before.error is not None:
        return before
    if before.deployed and not after.deployed:
        return dataclasses.replace(after, deployed=True, old_system=after.old_system or before.old_system,
                                   new_system=after.new_system or before.new_system)
    return after


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            token = f.read(64 * 1024).decode("ascii").strip()
    except OSError as exc:
        raise UsageError(f"cannot read --token-file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--token-file {path} is not ASCII") from None
    if st.st_mode & 0o077:
        log(f"warning: token file {path} is readable by group or others (mode {st.st_mode & 0o777:o})")
    if not token or not token.isprintable() or any(c.isspace() for c in token):
        raise UsageError(f"--token-file {path} holds no single-line token (printable ASCII, no spaces)")
    return token


# ---------------------------------------------------------------------------
# Reboot windows
# ---------------------------------------------------------------------------


def parse_window(text: str) -> tuple[int, int]:
    try:
        start, end = text.split("-")
        bounds = []
        for part in (start, end):
            hours, minutes = part.strip().split(":")
            h, m = int(hours), int(minutes)
            if not (0 <= h <= 23 and 0 <= m <= 59):
                raise ValueError
            bounds.append(h * 60 + m)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid reboot window {text!r}: expected HH:MM-HH:MM") from None
    if bounds[0] == bounds[1]:
        raise argparse.ArgumentTypeError(f"invalid reboot window {text!r}: start equals end")
    return bounds[0], bounds[1]


def in_window(window: tuple[int, int], now: time.struct_time) -> bool:
    start, end = window
    minute = now.tm_hour * 60 + now.tm_min
    return start <= minute < end if start < end else (minute >= start or minute < end)


def format_window(window: tuple[int, int]) -> str:
    return "-".join(f"{m // 60:02d}:{m % 60:02d}" for m in window)


# ---------------------------------------------------------------------------
# Rollouts: waves and the pause switch, from the pointer's metadata alone
# ---------------------------------------------------------------------------
#
# `rollout: 10%` admits the hosts whose bucket (a stable hash of host name
# and target store path, 0..9999) is below 1000; `rollout-start` plus
# `rollout-duration` ramp that share linearly to 100%; `pause: true` (or
# `hold`) stops every new deploy of the pointer.  A new store path reshuffles
# the buckets, so the same machines are not always the canaries.


@dataclass(frozen=True)
class Rollout:
    percent: float = 100.0        # the `rollout:` value: the share admitted at (and before) the start
    start: float | None = None    # Unix time the ramp starts (`rollout-start:`)
    duration: float | None = None  # seconds to ramp from `percent` to 100 (`rollout-duration:`)
    paused: bool = False

    def percent_at(self, now: float) -> float:
        if self.start is None or self.duration is None or now <= self.start:
            return self.percent
        return min(100.0, self.percent + (100.0 - self.percent) * (now - self.start) / self.duration)

    def admits(self, bucket: int, now: float) -> bool:
        return bucket < self.percent_at(now) * ROLLOUT_BUCKETS / 100

    def turn_at(self, bucket: int) -> float | None:
        """From when the ramp admits `bucket`; None without a ramp."""
        if self.start is None or self.duration is None:
            return None
        needed = bucket * 100 / ROLLOUT_BUCKETS
        if needed < self.percent:
            return self.start
        return self.start + (needed - self.percent) / (100.0 - self.percent) * self.duration


DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`90m`, `24h`, `1d12h`, `3600s` (or plain seconds); ValueError otherwise."""
    import re
    text = text.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    if not text or not re.fullmatch(r"(?:[0-9]{1,9}[smhdw])+", text):
        raise ValueError(f"not a duration: {text!r}")
    return float(sum(int(n) * DURATION_UNITS[u] for n, u in re.findall(r"([0-9]+)([smhdw])", text)))


def parse_rollout(metadata: dict[str, str], show: Excerpt = None) -> Rollout:
    """The rollout fields of a pointer, validated; PointerError (exit 4)
    otherwise, showing the refused value through `show` (the pointer's own
    rule: withheld when another origin served it)."""
    import re
    show = show or shorten
    # Without `rollout:` a pointer goes to every host at once, but a ramp
    # (rollout-start + rollout-duration) without one starts at 0%.
    percent = 0.0 if "rollout-start" in metadata else 100.0
    start, duration, paused = None, None, False
    if "rollout" in metadata:
        text = metadata["rollout"]
        if not re.fullmatch(r"[0-9]{1,3}(?:\.[0-9]{1,2})?%", text) or float(text.rstrip("%")) > 100:
            raise PointerError(f"pointer rollout is not a percentage between 0% and 100% "
                               f"(e.g. `rollout: 10%`): got {show(text)}")
        percent = float(text.rstrip("%"))
    if ("rollout-start" in metadata) != ("rollout-duration" in metadata):
        raise PointerError("pointer has only one of rollout-start and rollout-duration: a ramp needs both")
    if "rollout-start" in metadata:
        text = metadata["rollout-start"]
        try:
            start = parse_rfc3339(text).timestamp()
        except ValueError:
            raise PointerError(f"pointer rollout-start is not an RFC 3339 time: got {show(text)}") from None
        text = metadata["rollout-duration"]
        try:
            duration = parse_duration(text)
        except ValueError:
            raise PointerError(f"pointer rollout-duration is not a duration such as 24h or 90m: "
                               f"got {show(text)}") from None
        if not 0 < duration <= 366 * 86400:
            raise PointerError(f"pointer rollout-duration must be above 0 and at most 366d: got {show(text)}")
    if "pause" in metadata:
        text = metadata["pause"].lower()
        if text not in ("true", "hold", "false"):
            raise PointerError(f"pointer pause is not true, hold or false: got {show(metadata['pause'])}")
        paused = text != "false"
    return Rollout(percent, start, duration, paused)


def rollout_bucket(hostname: str, store_path: str) -> int:
    """A stable bucket in 0..9999 for this host and this release."""
    import hashlib
    digest = hashlib.sha256(hostname.encode() + b"\0" + store_path.encode()).digest()
    return int.from_bytes(digest, "big") % ROLLOUT_BUCKETS


def now_epoch() -> float:
    """Unix time; the test-only NIXOS_AUTODEPLOY_NOW (ISO 8601, local time
    unless it carries an offset) moves it as it moves the reboot window."""
    injected = os.environ.get(NOW_ENV)
    if injected:
        from datetime import datetime
        return datetime.fromisoformat(injected).timestamp()
    return time.time()


def rollout_view(rollout: Rollout, hostname: str, target: str, now: float) -> dict[str, Any]:
    """What state.json, metrics and `status` know about this host's wave."""
    bucket = rollout_bucket(hostname, target)
    return {"target": target, "hostname": hostname, "bucket": bucket,
            "start_percent": rollout.percent, "start": rollout.start, "duration": rollout.duration,
            "percent": round(rollout.percent_at(now), 4), "paused": rollout.paused,
            "admitted": rollout.admits(bucket, now), "turn_at": rollout.turn_at(bucket)}


def describe_rollout(view: dict[str, Any], now: float) -> str:
    """One line for logs and `status`: where the host is in the wave."""
    rollout = Rollout(view["start_percent"], view["start"], view["duration"], view["paused"])
    percent, bucket = rollout.percent_at(now), view["bucket"]
    head = f"bucket {bucket} of {ROLLOUT_BUCKETS}, rollout at {percent:.2f}%"
    if view["paused"]:
        return head + ": paused by the pointer (no new deploys until it is republished without `pause`)"
    if rollout.admits(bucket, now):
        return head + ": this host's turn has come"
    turn = rollout.turn_at(bucket)
    if turn is None:
        return head + f": waits until the pointer's rollout exceeds {bucket * 100 / ROLLOUT_BUCKETS:.2f}%"
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(turn))
    return head + f": this host's turn comes at {when}"


# ---------------------------------------------------------------------------
# FleetLock: fleet-wide reboot slots (Zincati's protocol, own client)
# ---------------------------------------------------------------------------
#
# POST {base}/v1/pre-reboot takes a slot of the group's counting semaphore,
# POST {base}/v1/steady-state gives it back; both with the header
# `fleet-lock-protocol: true` and {"client_params": {"id": ..., "group": ...}}.
# 200 is success, anything else a failure with an optional JSON
# {"kind": ..., "value": ...}.  Locks are owned by `id` and recursive, so
# asking again for a slot we hold, or releasing one we do not hold, is fine.


class FleetLockError(AutodeployError):
    """A lock operation failed.  Caught by the agent: it means "no reboot this
    cycle" (or "release again next cycle"), never an exit."""

    exit_code = 3
    kind = "fleetlock"


def validate_fleetlock_group(text: str) -> str:
    import re
    if not re.fullmatch(r"[a-zA-Z0-9.-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"invalid FleetLock group {text!r}: letters, digits, `.` and `-` only")
    return text


def validate_fleetlock_url(text: str) -> str:
    from urllib.parse import urlsplit
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"invalid FleetLock URL {redact_url(text)!r}: "
                                         "an http:// or https:// base URL without query")
    return text


def fleetlock_id(machine_id_file: str) -> str:
    """The app-specific machine id, as sd_id128_get_machine_app_specific(3)
    computes it (HMAC-SHA256 keyed by the machine id over our app id, first
    128 bits, UUID v4 bits): stable per machine, and the raw machine id never
    leaves the host."""
    import hashlib
    import hmac
    try:
        with open(machine_id_file) as f:
            text = f.read(64).strip()
    except OSError as exc:
        raise FleetLockError(f"cannot read the machine id {machine_id_file}: {exc.strerror}", "machine_id") from None
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        raise FleetLockError(f"{machine_id_file} does not hold a machine id (32 lower-case hex digits)",
                             "machine_id")
    mac = bytearray(hmac.new(bytes.fromhex(text), bytes.fromhex(FLEETLOCK_APP_ID), hashlib.sha256).digest()[:16])
    mac[6] = (mac[6] & 0x0F) | 0x40
    mac[8] = (mac[8] & 0x3F) | 0x80
    return mac.hex()


def machine_id_path() -> str:
    return os.environ.get(MACHINE_ID_ENV) or MACHINE_ID_FILE


def fleetlock_request(fetcher: Fetcher, base_url: str, operation: str, client_id: str, group: str,
                      timeout: float, interruptible: bool = False) -> None:
    """One FleetLock operation (`pre-reboot` or `steady-state`) through the
    agent's fetcher (proxies, one deadline; no credentials, no redirects
    followed); returns on HTTP 200, raises FleetLockError with the server's
    error kind otherwise.  The status decides: a 200's body is never read;
    an error's body (at most MAX_FLEETLOCK_REPLY_BYTES) only names the kind,
    and one that cannot be read leaves the kind to the status."""
    url = base_url.rstrip("/") + "/v1/" + operation
    body = json.dumps({"client_params": {"id": client_id, "group": group}}).encode()
    try:
        response = fetcher.request(url, {"fleet-lock-protocol": "true", "Content-Type": "application/json"},
                                   method="POST", data=body, timeout=timeout, limit=MAX_FLEETLOCK_REPLY_BYTES,
                                   interruptible=interruptible, follow=False, answers=True,
                                   body_of=lambda status: status != 200)
    except FetchError as exc:
        raise FleetLockError(f"FleetLock {operation}: {exc}", "unreachable") from None
    if response.status == 200:
        return
    kind, value = f"http_{response.status}", ""
    if response.body_error is not None:
        value = f"(reply not read: {response.body_error})"
    try:
        error = json.loads(response.body.decode("utf-8"))
        if isinstance(error, dict) and isinstance(error.get("kind"), str) and isinstance(error.get("value"), str):
            import re
            # The spec asks servers for few kinds; a label must stay bounded anyway.
            if re.fullmatch(r"[a-z0-9_]{1,40}", error["kind"]):
                kind = error["kind"]
            value = outside_text(error["value"])[:200]
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    said = kind  # the server's own word, for the log and `status`
    if kind in FLEETLOCK_BUSY_KINDS or response.status in (409, 423):
        # All slots taken, whatever the server calls it: waiting, not failing.
        kind = FLEETLOCK_SLOT_BUSY
    raise FleetLockError(f"FleetLock {operation} at {redact_url(url)} answered HTTP {response.status}"
                         + (f" ({said}): {value}" if value else f" ({said})"), kind)


# ---------------------------------------------------------------------------
# Commands: run, status, suspend/resume, sign
# ---------------------------------------------------------------------------


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what} must run as root (it reads and writes {DEFAULT_STATE_DIR}, the system profile "
                         "and /run); nothing was done")


def command_run(cfg: Config) -> int:
    from urllib.parse import urlsplit
    require_root("autodeploy.py run")
    if cfg.token_file and urlsplit(cfg.url).username is not None:
        raise UsageError("give credentials either in the URL or with --token-file, not both")
    if cfg.json_field and cfg.trusted_keys:
        raise UsageError("--json-field cannot be combined with --trusted-keys: signed pointers are plain text "
                         "with a `revision:` line")
    agent = Agent(cfg)
    if cfg.url.startswith("http://") and cfg.trusted_keys is None:
        log("warning: the pointer is fetched over plain http:// without --trusted-keys: anyone on the "
            "network path can point this host at another (validly signed) system")
    credentialed = [cfg.url] + ([agent.source.signature_url()] if cfg.trusted_keys else [])
    if (cfg.token_file or urlsplit(cfg.url).password is not None) and \
            any(url.startswith("http://") for url in credentialed):
        log("warning: credentials are sent over plain http://: anyone on the network path can read them; "
            "use https://")
    if cfg.dry_run:
        if os.path.lexists(cfg.state_dir):
            check_private_dir(cfg.state_dir)
        lock_fd = None
    else:
        agent.store.ensure_dir()
        lock_fd = host_lock()
    Stopping.install()
    try:
        if cfg.once or cfg.dry_run:
            outcome = agent.cycle()
            return outcome.error.exit_code if outcome.error else 0
        import random
        agent.store.hold_timestamps = True
        try:
            while not Stopping.requested:
                agent.cycle()
                delay = cfg.interval * random.uniform(0.9, 1.1)
                end = time.monotonic() + delay
                while not Stopping.requested and time.monotonic() < end:
                    time.sleep(min(1.0, end - time.monotonic()))
                    try:
                        agent.store.flush_due()
                    except OSError as exc:
                        log(f"cannot write the last run's timestamps to {agent.store.path}: {exc.strerror}")
        finally:
            try:
                agent.store.flush()
            except OSError as exc:
                log(f"cannot write the last run's timestamps to {agent.store.path}: {exc.strerror}")
        log("stopped")
        return 0
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def status_fields(state_dir: str) -> dict[str, Any]:
    store = StateStore(state_dir)
    state = store.load()
    host = read_host()
    suspension = store.suspension()
    reboot_required, reboot_reason = reboot_status(state, host)
    return {
        "version": VERSION,
        "phase": host_phase(state, gather_facts(state, store)).value,
        "current": host.current, "booted": host.booted, "profile": host.profile,
        "deployed": state.deployed, "upstream": state.upstream, "upstream_revision": state.upstream_revision,
        "revision_floor": state.highest_revision,
        "state": state.last_state, "reason": state.last_reason,
        "dirty": state.dirty,
        "suspended": suspension is not None,
        "suspend_reason": suspension.get("reason") if suspension else None,
        "suspended_since": suspension.get("since") if suspension else None,
        "quarantined": state.quarantined, "quarantine_reason": state.quarantine_reason,
        "last_run": state.last_run, "last_run_success": state.last_run_success,
        "last_success": state.last_success, "last_error": state.last_error,
        "reboot_required": reboot_required, "reboot_reason": reboot_reason,
        "rollbacks_total": state.rollbacks_total, "deploys_total": state.deploys_total,
        "interrupted_deploy": state.intent,
        "boot_failure": state.boot_failure, "boot_free_bytes": boot_free_bytes(),
        "history": list(state.history) if isinstance(state.history, list) else [],
        "rollout": state.rollout,
        "reboot_slot": state.reboot_slot, "fleetlock_error": state.fleetlock_error,
        "prefetched": state.prefetched, "prefetch_failures_total": state.prefetch_failures_total,
        "prefetch_error": state.prefetch_error,
        "manual_rollback": state.manual_rollback, "manual_rollbacks_total": state.manual_rollbacks_total,
    }


def command_status(state_dir: str, as_json: bool) -> int:
    fields = status_fields(state_dir)
    if as_json:
        print(json.dumps(fields, indent=2, sort_keys=True))
        return 0

    def when(ts: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts)) if ts else "never"

    rev = f" (revision {fields['upstream_revision']})" if fields["upstream_revision"] is not None else ""
    rows = [
        ("current", fields["current"]), ("booted", fields["booted"]), ("profile", fields["profile"]),
        ("deployed", fields["deployed"]), ("upstream", f"{fields['upstream']}{rev}" if fields["upstream"] else None),
        ("phase", fields["phase"]),
        ("revision floor", str(fields["revision_floor"]) if fields["revision_floor"] is not None else "none"),
        ("state", f"{fields['state'] or 'never run'}" + (f": {fields['reason']}" if fields["reason"] else "")),
        ("dirty", "yes" if fields["dirty"] else "no"),
        ("suspended", f"yes: {fields['suspend_reason'] or 'no reason given'} (since {when(fields['suspended_since'])})"
         if fields["suspended"] else "no"),
        ("quarantined", f"{fields['quarantined']}: {fields['quarantine_reason']}" if fields["quarantined"] else "no"),
        ("reboot required", f"yes: {fields['reboot_reason']}" if fields["reboot_required"] else "no"),
        ("last run", when(fields["last_run"]) + ("" if fields["last_run"] is None else
                                                 " (ok)" if fields["last_run_success"] else " (failed)")),
        ("last success", when(fields["last_success"])),
        ("last error", fields["last_error"]["message"] if fields["last_error"] else "none"),
        ("deploys", str(fields["deploys_total"])), ("rollbacks", str(fields["rollbacks_total"])),
    ]
    if fields["interrupted_deploy"]:
        rows.append(("interrupted", json.dumps(fields["interrupted_deploy"], sort_keys=True)))
    if fields["boot_failure"]:
        rows.append(("boot failure", f"{when(fields['boot_failure'].get('time'))}: "
                                     f"{fields['boot_failure'].get('reason')}"))
    if fields["boot_free_bytes"] is not None:
        rows.append(("/boot free", f"{fields['boot_free_bytes'] / 1048576:.1f} MiB"))
    view = fields["rollout"]
    if view is not None:
        running = view["target"] == fields["deployed"]
        rows.append(("rollout", f"{basename_or_empty(view['target'])}: " + (
            "deployed on this host" if running else describe_rollout(view, now_epoch()))))
    slot = fields["reboot_slot"]
    if slot is not None:
        rows.append(("reboot slot", ("held" if slot.get("granted") else "asked for")
                     + f" in FleetLock group {slot.get('group')} since {when(slot.get('since'))}"))
    if fields["fleetlock_error"]:
        rows.append(("fleetlock error", fields["fleetlock_error"].get("message")))
    prefetched = fields["prefetched"]
    if prefetched:
        rows.append(("prefetched", f"{prefetched.get('path')} (realised and rooted {when(prefetched.get('time'))}; "
                                   "its turn costs only the activation)"))
    if fields["prefetch_error"]:
        error = fields["prefetch_error"]
        rows.append(("prefetch error", f"{when(error.get('time'))}: {error.get('message')} "
                                       f"({fields['prefetch_failures_total']} failed prefetches in all)"))
    if fields["manual_rollback"]:
        back = fields["manual_rollback"]
        rows.append(("manual rollback", f"{when(back.get('time'))}: switched back by hand from {back.get('path')} "
                                        f"to {back.get('to')} ({fields['manual_rollbacks_total']} in all)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {printable(value) if value is not None else '-'}")
    print_history(fields["history"], width)
    return 0


def print_history(history: list[dict[str, Any]], width: int) -> None:
    """The deploy attempts as a short table, newest first (`width`: the
    other rows' key column, so an empty history lines up with them)."""
    if not history:
        print(f"{'history':<{width}}  none")
        return
    print(f"history (last {len(history)} deploy attempts, newest first):")
    header = ("time", "action", "outcome", "duration", "revision", "path", "error")
    table = [header]
    for entry in reversed(history):
        started = entry.get("time")
        table.append((
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?",
            str(entry.get("action") or "-"), str(entry.get("outcome") or "-"),
            f"{entry['duration']:.1f}s" if isinstance(entry.get("duration"), (int, float)) else "-",
            str(entry["revision"]) if entry.get("revision") is not None else "-",
            basename_or_empty(entry.get("path")) or "-", str(entry.get("error_kind") or "-"),
        ))
    table = [tuple(printable(cell) for cell in row) for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def command_check_boot(args: argparse.Namespace) -> int:
    """The boot assessment (module: system.autoDeploy.bootAssessment): the health
    checks for the booted system, retried until they pass or --wait ends (the
    network may still be coming up).  A failure keeps boot-complete.target from
    being reached, so systemd-bless-boot does not mark the entry good."""
    require_root("autodeploy.py check-boot")
    cfg = Config(url=args.url, state_dir=args.state_dir, timeout=args.timeout, verbose=args.verbose,
                 health_checks=tuple(args.health_check), health_timeout=args.health_timeout,
                 connectivity_check=not args.no_connectivity_check, token_file=args.token_file)
    fetcher = Fetcher(read_token(cfg.token_file))
    booted = store_path_of(BOOTED_SYSTEM)
    deadline = time.monotonic() + args.wait
    error: DeployError | None = None
    for attempt in range(1, 100000):
        try:
            run_health_checks(cfg, fetcher)
            error = None
            break
        except DeployError as exc:
            error = exc
        pause = min(BOOT_CHECK_RETRY_SECONDS, deadline - time.monotonic())
        if pause <= 0:
            break
        log(f"boot check attempt {attempt} failed: {error}; retrying for up to "
            f"{max(0.0, deadline - time.monotonic()):.0f}s more")
        time.sleep(pause)
    try:
        write_boot_check(cfg.state_dir, booted, error)
    except (OSError, StateError) as exc:
        log(f"cannot record the boot check: {exc}")
    shown = booted or "the booted system"
    if error is not None:
        raise DeployError(f"BOOT CHECK FAILED for {shown}: {error}", "health")
    log(f"boot check passed for {shown}")
    return 0


def command_sign(key: str, revision: int, hosts: list[str], all_hosts: bool, not_after: str | None,
                 no_expiry: bool, path: str, output: str, rollout: dict[str, str] | None = None) -> int:
    validate_store_path(path, path)
    if not valid_revision(revision):
        raise UsageError(f"--revision must be a whole number from 0 to {MAX_REVISION}")
    if bool(hosts) == all_hosts:
        raise UsageError("name the hosts that may deploy this pointer with --hosts H [H ...], or sign it for "
                         "every host with --all-hosts (a pointer without a host list could be replayed on any host)")
    bad = [h for h in hosts if not h or not h.isprintable() or h == "*" or any(c.isspace() or c == "," for c in h)]
    if bad:
        raise UsageError(f"--hosts: not a host name: {shorten(bad[0], 60)}")
    if not_after is not None and no_expiry:
        raise UsageError("--not-after and --no-expiry exclude each other")
    lines = [path, f"revision: {revision}", "hosts: " + (" ".join(hosts) if hosts else "*")]
    if not_after is not None:
        try:
            parse_rfc3339(not_after)
        except ValueError:
            raise UsageError(f"--not-after {not_after!r} is not an RFC 3339 time") from None
    elif not no_expiry:
        not_after = default_not_after()
    if not_after is not None:
        lines.append(f"not-after: {not_after}")
    lines += sign_rollout_lines(rollout or {})
    if rollout:
        # The first step's bake time for `promote`, signed with the rest.
        lines.append(f"{STEP_STARTED_KEY}: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    refuse_what_hosts_refuse("\n".join(lines) + "\n", hosts or ["*"])
    write_signed_pointer(key, output, lines)
    log(f"wrote {output} and {output}.sig (revision {revision}"
        + (f", valid until {not_after})" if not_after else ", never expires)"))
    return 0


def default_not_after() -> str:
    """TUF's freshness rule: a replayed old pointer stops working even where
    a host lost its revision floor."""
    from datetime import datetime, timedelta, timezone
    expiry = datetime.now(timezone.utc) + timedelta(days=SIGN_DEFAULT_VALIDITY_DAYS)
    return expiry.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_signed_pointer(key: str, output: str, lines: list[str]) -> None:
    """The pointer file and its OpenSSH signature at FILE.sig."""
    atomic_write(output, "\n".join(lines) + "\n")
    try:
        os.unlink(output + ".sig")
    except FileNotFoundError:
        pass
    result = ssh_keygen(["-Y", "sign", "-f", key, "-n", SIGNATURE_NAMESPACE, output])
    if result.returncode != 0:
        raise AutodeployError(f"ssh-keygen -Y sign failed: {result.stdout.strip()}")


def refuse_what_hosts_refuse(text: str, hosts: list[str]) -> None:
    """`sign` reads the pointer it is about to sign with the hosts' own
    parsers (lines, keys, revision, rollout fields, times, host list), so CI
    cannot publish a pointer every host refuses."""
    try:
        if len(text.encode()) > MAX_POINTER_BYTES:  # what a host reads of a pointer at most
            raise PointerError(f"pointer size {len(text.encode())} bytes is above the {MAX_POINTER_BYTES} bytes "
                               "a host reads (a shorter --hosts list, or --all-hosts)")
        pointer = parse_pointer(text.encode())
        parse_rollout(pointer.metadata)
        check_expiry(pointer)  # a not-after hosts cannot read, or already past
    except PointerError as exc:
        raise UsageError(f"sign: hosts would refuse this pointer: {str(exc).replace('pointer ', '', 1)}") from None
    if pointer.metadata.get("hosts", "").replace(",", " ").split() != hosts:
        raise UsageError(f"sign: hosts would read another host list than --hosts: {shorten(' '.join(hosts), 80)}")


def command_trust_reset(state_dir: str, min_revision: int) -> int:
    require_root("autodeploy.py trust-reset")
    if not valid_revision(min_revision):
        raise UsageError(f"--min-revision must be a whole number from 0 to {MAX_REVISION}")
    store = StateStore(state_dir)
    with_lock = host_lock()
    try:
        try:
            before = store.load().highest_revision
        except StateError:
            before = None
        store.reset_trust(min_revision)
    finally:
        os.close(with_lock)
    log(f"TRUST RESET by an operator (uid {os.getuid()}): revision floor set to {min_revision} "
        f"(was {before if before is not None else 'unknown'}); the next run fetches the pointer unconditionally")
    return 0


def sign_rollout_lines(rollout: dict[str, str]) -> list[str]:
    """`sign --rollout/--rollout-start/--rollout-duration/--pause` as pointer
    lines, checked by the agent's own parser so CI cannot publish what hosts refuse."""
    try:
        parse_rollout(rollout)
    except PointerError as exc:
        raise UsageError(f"sign: {exc}".replace("pointer ", "")) from None
    return [f"{k}: {rollout[k]}" for k in ("rollout", "rollout-start", "rollout-duration", "pause") if k in rollout]


def sign_rollout_metadata(args: argparse.Namespace) -> dict[str, str]:
    meta = {"rollout": args.rollout, "rollout-start": args.rollout_start,
            "rollout-duration": args.rollout_duration, "pause": "true" if args.pause else None}
    if meta["rollout"] is not None and not meta["rollout"].endswith("%"):
        meta["rollout"] += "%"
    return {k: v for k, v in meta.items() if v is not None}


# ---------------------------------------------------------------------------
# Command: promote (CI side: a rollout's next step, decided by Prometheus)
# ---------------------------------------------------------------------------
#
# CI runs `promote` on a schedule next to `sign`.  It reads the current
# signed pointer, asks Prometheus (GET /api/v1/query) for the agent's metrics
# of every host, counts the hosts that were admitted to the pointer's build,
# and applies a small policy, in this order:
#
#   | what the fleet and the pointer say                          | verdict  | exit |
#   |-------------------------------------------------------------|----------|------|
#   | Prometheus unreachable, a query error, an answer not understood | none  | 3    |
#   |   (not HTTP 200, or with warnings: a partial answer)         |          |      |
#   | the pointer says `pause`                                    | hold     | 10   |
#   | failures among admitted hosts above --max-failures (or       | halt     | 11   |
#   |   --max-failure-percent): rolled back, did not boot          |          |      |
#   | the rollout is at 100% (also a ramp that reached it)        | complete | 12   |
#   | a ramp (rollout-start) moves the rollout by itself          | hold     | 10   |
#   | more than --max-silent hosts that deployed the build within  | hold     | 10   |
#   |   --max-report-age have no series at all now (silent: a host |          |      |
#   |   that does not come back may not have booted it)            |          |      |
#   | no host reports the build (an empty answer)                 | hold     | 10   |
#   | fewer than --min-healthy admitted hosts run it healthy      | hold     | 10   |
#   |   (healthy: also ran within --max-report-age)                |          |      |
#   | the step is younger than --bake                             | hold     | 10   |
#   | otherwise                                                   | advance  | 0    |
#
# advance and halt write the next pointer (-o FILE and FILE.sig, the revision
# one higher); hold, complete and every error write nothing.  The step's
# start is the pointer's `x-step-started:` (promote writes it), else the
# file's modification time or the URL's Last-Modified.

PROMOTE_EXIT: Final = {"advance": 0, "hold": 10, "halt": 11, "complete": 12}
PROMOTE_METRICS: Final = ("info", "state", "quarantined", "rollout_bucket_number", "last_run_success",
                           "last_run_timestamp_seconds")
# Labels that describe a series, not the host that wrote it.  Where a scrape
# target has a label of the same name, Prometheus keeps the agent's as
# exported_<name> (honor_labels: false); count_fleet reads that one first.
AGENT_SERIES_LABELS: Final = ("state", "path", "current_generation", "booted_generation", "deployed_generation",
                              "upstream_generation")
PROMOTE_SERIES_LABELS: Final = frozenset(("__name__", *AGENT_SERIES_LABELS,
                                          *(f"exported_{name}" for name in AGENT_SERIES_LABELS)))
MAX_PROMETHEUS_ANSWER: Final = 64 * 1024 * 1024
STEP_STARTED_KEY: Final = "x-step-started"
# Host states (STATES) that mean the host cannot make progress by itself.
STUCK_STATES: Final = frozenset(("failed", "dirty", "suspended", "refused"))


@dataclass(frozen=True)
class PromotePolicy:
    steps: tuple[float, ...] = (5.0, 25.0, 100.0)
    bake: float = 3600.0
    min_healthy: int = 1
    max_failures: int = 0
    max_failure_percent: float | None = None
    on_halt: str = "pause"               # or "revert" (to revert_to)
    revert_to: str | None = None
    max_silent: int = 0


@dataclass
class FleetCount:
    """The hosts that report the pointer's build as their upstream."""

    reporting: int = 0
    admitted: int = 0
    healthy: int = 0
    rolled_back: int = 0
    boot_failed: int = 0
    stuck: int = 0
    on_the_way: int = 0
    silent: int = 0
    rolled_back_hosts: list[str] = field(default_factory=list)
    boot_failed_hosts: list[str] = field(default_factory=list)
    silent_hosts: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.rolled_back + self.boot_failed

    @property
    def failed_hosts(self) -> list[str]:
        return sorted(self.rolled_back_hosts + self.boot_failed_hosts)


def prometheus_vector(fetcher: Fetcher, base: str, expr: str, timeout: float) -> list[dict[str, Any]]:
    """An instant query's vector; FetchError for anything else (Prometheus
    down, a query error, an answer that is not a vector)."""
    import math
    from urllib.parse import urlencode
    url = base.rstrip("/") + "/api/v1/query?" + urlencode({"query": expr})
    resp = fetcher.request(url, {"Accept": "application/json"}, timeout=timeout, limit=MAX_PROMETHEUS_ANSWER,
                           interruptible=False, answers=True)
    try:
        answer = json.loads(resp.body, parse_constant=_no_json_constant)
    except (ValueError, RecursionError):
        raise FetchError(f"Prometheus answered HTTP {resp.status} with something that is not JSON") from None
    if not isinstance(answer, dict) or answer.get("status") != "success" or resp.status != 200:
        said = answer.get("error") if isinstance(answer, dict) else None
        raise FetchError(f"Prometheus answered HTTP {resp.status}: "
                         + ("query error" if resp.status == 200 or said else "not its answer")
                         + (f": {outside_text(said)[:300]}" if isinstance(said, str) else ""))
    warnings = answer.get("warnings")
    if warnings:
        # Errors that did not stop the query: the data is what was collected
        # (a partial answer), and a host missing from it cannot halt anything.
        said = warnings[0] if isinstance(warnings, list) and isinstance(warnings[0], str) else "?"
        raise FetchError(f"Prometheus answered with warnings (a partial answer): {outside_text(said)[:300]}")
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise FetchError("Prometheus answered with something other than an instant vector")
    out = []
    for sample in data["result"]:
        metric, value = (sample.get("metric"), sample.get("value")) if isinstance(sample, dict) else (None, None)
        if (not isinstance(metric, dict) or not all(isinstance(v, str) for v in metric.values())
                or not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], str)):
            raise FetchError("Prometheus answered with a malformed sample")
        try:
            number = float(value[1])
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            # The agent writes only finite numbers: NaN or infinity is not its answer.
            raise FetchError("Prometheus answered with a sample value that is not a finite number")
        out.append({"metric": metric, "value": number})
    return out


def series_labels(metric: dict[str, str]) -> dict[str, str]:
    """A sample's labels, the agent's own read first (exported_<name>)."""
    return {**metric, **{name: metric[f"exported_{name}"] for name in AGENT_SERIES_LABELS
                         if f"exported_{name}" in metric}}


def host_key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The labels that name the host (its target's), not the series."""
    return tuple(sorted((k, v) for k, v in labels.items() if k not in PROMOTE_SERIES_LABELS))


def host_name(key: tuple[tuple[str, str], ...]) -> str:
    return outside_text(dict(key).get("instance") or ",".join(f"{k}={v}" for k, v in key) or "?")[:80]


def silent_query(build: str, selector: str, max_age: float) -> str:
    """The hosts whose info series said they deployed `build` at some
    point within `max_age` (the last such sample of each); the agent's
    label may be kept as exported_deployed_generation (AGENT_SERIES_LABELS)."""
    window = f"[{max(1, int(max_age))}s]"
    return " or ".join(
        f'last_over_time(nixos_autodeploy_info{{{label}="{os.path.basename(build)}"'
        + (f",{selector}" if selector else "") + f"}}{window})"
        for label in ("deployed_generation", "exported_deployed_generation"))


def count_silent(count: FleetCount, build: str, recent: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None:
    """Hosts in `recent` (silent_query's answer) with no series at all in
    `samples` now: their exporter, or the host, went away after it deployed
    the build.  A host that did not come back from the reboot into it looks
    exactly like this, so promote never counts it as fine."""
    name = os.path.basename(build)
    present = {host_key(series_labels(sample["metric"])) for sample in samples}
    deployed = {host_key(labels) for labels in (series_labels(sample["metric"]) for sample in recent)
                if labels.get("deployed_generation") == name}
    gone = deployed - present
    count.silent = len(gone)
    count.silent_hosts = sorted(host_name(key) for key in gone)


def count_fleet(samples: list[dict[str, Any]], build: str, percent: float, now: float | None = None,
                max_age: float | None = None) -> FleetCount:
    """Where each host stands with `build`, from the agent's own metrics
    (docs/reference/metrics.md): admitted (its bucket is below the rollout), healthy
    (runs it, deployed it, last run succeeded, up to date, and that run is
    at most `max_age` old at `now`: a textfile left behind by an agent that
    stopped running proves nothing), rolled back
    (quarantined it, or rolled back), did not boot it (boot_failed), stuck
    (a state it cannot leave by itself), or on its way (realising, waiting
    for a reboot, a window or a slot)."""
    hosts: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    name = os.path.basename(build)
    for sample in samples:
        labels = series_labels(sample["metric"])
        key = host_key(labels)
        host = hosts.setdefault(key, {})
        metric = labels.get("__name__", "")[len("nixos_autodeploy_"):]
        if metric == "info":
            # Two info series for one host: one from before a Prometheus
            # restart (no staleness markers then).  The one naming the build
            # decides; state series have fixed labels and are never doubled.
            if "info" not in host or labels.get("upstream_generation") == name:
                host["info"] = labels
        elif metric == "state" and sample["value"] == 1:
            host["state"] = labels.get("state")
        elif metric == "quarantined" and sample["value"] == 1:
            host["quarantined"] = labels.get("path")
        elif metric in ("rollout_bucket_number", "last_run_success", "last_run_timestamp_seconds"):
            host[metric] = sample["value"]
    count = FleetCount()
    for key, host in sorted(hosts.items()):
        info = host.get("info") or {}
        if info.get("upstream_generation") != name:
            continue  # has not seen this build (yet)
        count.reporting += 1
        bucket = host.get("rollout_bucket_number")
        if host.get("state") == "waiting_rollout" or (bucket is not None and bucket >= percent * ROLLOUT_BUCKETS / 100):
            continue
        count.admitted += 1
        shown = host_name(key)
        state = host.get("state")
        if state == "boot_failed":
            count.boot_failed += 1
            count.boot_failed_hosts.append(shown)
        elif state in ("rolled_back", "quarantined") or host.get("quarantined") == build:
            # `quarantined` is the state of a host whose upstream (the build)
            # is quarantined; it does not depend on the path label surviving.
            count.rolled_back += 1
            count.rolled_back_hosts.append(shown)
        elif (info.get("current_generation") == info.get("deployed_generation") == name
              and host.get("last_run_success") == 1 and state in ("up_to_date", "deployed")
              and (max_age is None or now is None or now - host.get("last_run_timestamp_seconds", 0) <= max_age)):
            count.healthy += 1
        elif (state in STUCK_STATES or host.get("last_run_success") == 0
              or (max_age is not None and now is not None
                  and now - host.get("last_run_timestamp_seconds", 0) > max_age)):
            count.stuck += 1
        else:
            count.on_the_way += 1
    return count


def promote_verdict(count: FleetCount, policy: PromotePolicy, rollout: Rollout, step_age: float | None,
                    now: float | None = None) -> tuple[str, float | None, str]:
    """(verdict, the next step's percent, why): the table above, as code."""
    if rollout.paused:
        return "hold", None, "the pointer says pause: a human decides (republish without pause to resume)"
    ratio = 100.0 * count.failures / count.admitted if count.admitted else 0.0
    if count.failures > policy.max_failures or (
            policy.max_failure_percent is not None and count.failures and ratio > policy.max_failure_percent):
        limit = f"more than {policy.max_failures}" if count.failures > policy.max_failures else \
            f"{ratio:.1f}% of the admitted hosts, more than {policy.max_failure_percent:g}%"
        return "halt", None, f"{count.failures} admitted host(s) failed it ({limit})"
    if (rollout.percent_at(now) if now is not None else rollout.percent) >= 100:
        return "complete", None, "the rollout is at 100%"
    if rollout.start is not None:
        return "hold", None, "the pointer ramps by itself (rollout-start/rollout-duration); promote only halts it"
    if count.silent > policy.max_silent:
        return "hold", None, (f"{count.silent} host(s) that deployed it within --max-report-age report nothing now"
                              f"{named_hosts(count.silent_hosts)}: one that did not come back from the reboot "
                              "into it looks the same (more than --max-silent "
                              f"{policy.max_silent}; a human decides)")
    if count.reporting == 0:
        # An empty answer (a selector that matches nothing, a Prometheus that
        # lost its data) is no evidence, whatever --min-healthy allows.
        return "hold", None, "no host reports the build (an empty answer is no evidence)"
    if count.healthy < policy.min_healthy:
        return "hold", None, (f"{count.healthy} admitted host(s) run it healthy, {policy.min_healthy} needed"
                              + (" (no host is admitted yet: a larger first step or a lower --min-healthy?)"
                                 if count.admitted == 0 else ""))
    if step_age is None or step_age < policy.bake:
        baked = "unknown" if step_age is None else format_duration(step_age)
        return "hold", None, f"the step has baked {baked} of {format_duration(policy.bake)}"
    upcoming = [step for step in policy.steps if step > rollout.percent]
    following = upcoming[0] if upcoming else 100.0
    return "advance", following, (f"{count.healthy} healthy, no more failures than allowed, baked "
                                  f"{format_duration(step_age)}")


def named_hosts(hosts: list[str]) -> str:
    """` (a, b, ...)` after a count in promote's paragraph; at most ten names."""
    return f" ({', '.join(hosts[:10])}{', ...' if len(hosts) > 10 else ''})" if hosts else ""


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def public_key_signers(key: str) -> str:
    """The allowed-signers document of --key's own public half: promote
    re-signs what it reads, so it reads only what CI signed.  --key may be
    the public key itself, its private half in ssh-agent."""
    try:
        with open(key, "rb") as f:
            head = f.read(MAX_SIGNATURE_BYTES).decode("utf-8", "replace").strip()
    except OSError:
        head = ""
    if not (head.startswith(KEY_TYPES) and "\n" not in head):
        result = ssh_keygen(["-y", "-f", key])
        lines = [line for line in result.stdout.splitlines() if line.startswith(KEY_TYPES)]
        if result.returncode != 0 or not lines:
            raise UsageError(f"cannot read the public key of --key {key}: {result.stdout.strip()[:200]}")
        head = lines[0]
    return f'{SIGNATURE_NAMESPACE} namespaces="{SIGNATURE_NAMESPACE}" {head}\n'


def read_current_pointer(where: str, fetcher: Fetcher, signers: str | None, timeout: float
                         ) -> tuple[Pointer, float | None]:
    """The pointer promote starts from (a file or a URL), verified when keys
    are given, and when its step started (x-step-started:, else the file's
    modification time or the URL's Last-Modified)."""
    import email.utils
    import tempfile
    started: float | None = None
    if where.startswith(("http://", "https://")):
        resp = fetcher.get(where, timeout=timeout, interruptible=False)
        body = resp.body
        signature = fetcher.get(where + ".sig", timeout=timeout, limit=MAX_SIGNATURE_BYTES,
                                interruptible=False).body if signers else b""
        if resp.last_modified:
            try:
                started = email.utils.parsedate_to_datetime(resp.last_modified).timestamp()
            except (TypeError, ValueError):
                started = None
    else:
        try:
            with open(where, "rb") as f:
                body = f.read(MAX_POINTER_BYTES + 1)
                started = os.fstat(f.fileno()).st_mtime
            signature = b""
            if signers:
                with open(where + ".sig", "rb") as f:
                    signature = f.read(MAX_SIGNATURE_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"cannot read the pointer {exc.filename}: {exc.strerror}") from None
        if len(body) > MAX_POINTER_BYTES:
            raise PointerError(f"the pointer {where} is larger than {MAX_POINTER_BYTES} bytes")
    pointer = parse_pointer(body)
    if signers:
        with tempfile.TemporaryDirectory(prefix="autodeploy-promote-") as tmp:
            verify_signature(body, signature, signers, tmp)
    if pointer.revision is None:
        raise PointerError("the current pointer has no `revision:` line: promote writes revision + 1", "revision")
    if STEP_STARTED_KEY in pointer.metadata:
        try:
            started = parse_rfc3339(pointer.metadata[STEP_STARTED_KEY]).timestamp()
        except ValueError:
            raise PointerError(f"pointer {STEP_STARTED_KEY} is not an RFC 3339 time") from None
    return pointer, started


def next_pointer_lines(pointer: Pointer, verdict: str, percent: float | None, policy: PromotePolicy,
                       not_after: str | None, now: float) -> list[str]:
    """The pointer promote publishes: revision + 1, the same hosts, the same
    annotations; the next step (advance), `pause: true` or the previous build
    everywhere at once (halt)."""
    assert pointer.revision is not None
    meta = pointer.metadata
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    path, rollout = pointer.path, {}
    if verdict == "advance":
        assert percent is not None
        rollout = {"rollout": f"{percent:g}%", STEP_STARTED_KEY: stamp}
    elif policy.on_halt == "revert":
        assert policy.revert_to is not None
        path, rollout = policy.revert_to, {"x-reverted-from": pointer.path}
    else:
        rollout = {k: meta[k] for k in ("rollout", "rollout-start", "rollout-duration", STEP_STARTED_KEY)
                   if k in meta}
        rollout["pause"] = "true"
    lines = [path, f"revision: {pointer.revision + 1}", f"hosts: {meta.get('hosts', '*')}"]
    if not_after is not None:
        lines.append(f"not-after: {not_after}")
    kept = {k: v for k, v in meta.items() if k.startswith("x-") and k not in (STEP_STARTED_KEY, "x-reverted-from")}
    lines += [f"{k}: {v}" for k, v in {**rollout, **kept}.items()]
    parse_rollout(parse_pointer(("\n".join(lines) + "\n").encode()).metadata)  # what hosts will accept
    return lines


def command_promote(args: argparse.Namespace) -> int:
    policy = PromotePolicy(steps=args.steps, bake=args.bake, min_healthy=args.min_healthy,
                           max_failures=args.max_failures, max_failure_percent=args.max_failure_percent,
                           on_halt=args.on_halt, revert_to=args.revert_to, max_silent=args.max_silent)
    if policy.on_halt == "revert" and policy.revert_to is None:
        raise UsageError("--on-halt revert needs --revert-to STOREPATH (the build to publish instead)")
    if policy.on_halt != "revert" and policy.revert_to is not None:
        raise UsageError("--revert-to is used only with --on-halt revert (a halt pauses otherwise)")
    if args.not_after is not None and args.no_expiry:
        raise UsageError("--not-after and --no-expiry exclude each other")
    if args.not_after is not None:
        try:
            expiry = parse_rfc3339(args.not_after).timestamp()
        except ValueError:
            raise UsageError(f"--not-after {args.not_after!r} is not an RFC 3339 time") from None
        if expiry <= time.time():
            raise UsageError(f"--not-after {args.not_after} is past: every host would refuse the next pointer")
    fetcher = Fetcher(None)
    signers = allowed_signers(args.trusted_keys) if args.trusted_keys else public_key_signers(args.key)
    pointer, started = read_current_pointer(args.pointer, fetcher, signers, args.timeout)
    if policy.on_halt == "revert" and policy.revert_to == pointer.path:
        # "Reverting" to the failing build would publish it to every host.
        log(f"--revert-to is the pointer's own build {pointer.path}: a halt pauses instead")
        policy = dataclasses.replace(policy, on_halt="pause", revert_to=None)
    rollout = parse_rollout(pointer.metadata)
    names = "|".join(PROMOTE_METRICS)
    matchers = f'__name__=~"nixos_autodeploy_({names})"' + (f",{args.selector}" if args.selector else "")
    samples = prometheus_vector(fetcher, args.prometheus, "{" + matchers + "}", args.timeout)
    now = time.time()
    count = count_fleet(samples, pointer.path, rollout.percent_at(now), now, args.max_report_age)
    count_silent(count, pointer.path, prometheus_vector(fetcher, args.prometheus,
                                          silent_query(pointer.path, args.selector, args.max_report_age),
                                          args.timeout), samples)
    step_age = now - started if started is not None else None
    verdict, percent, why = promote_verdict(count, policy, rollout, step_age, now)
    written = ""
    if verdict in ("advance", "halt"):
        not_after = None if args.no_expiry else (args.not_after or default_not_after())
        write_signed_pointer(args.key, args.output, next_pointer_lines(pointer, verdict, percent, policy,
                                                                        not_after, now))
        written = (f" Wrote {args.output} (revision {pointer.revision + 1}): "
                   + (f"rollout {percent:g}%." if verdict == "advance" else
                      f"{policy.revert_to} for every host." if policy.on_halt == "revert" else "pause: true."))
    print(f"{verdict.upper()}: {why}. {pointer.path} (revision {pointer.revision}) is at "
          f"{rollout.percent_at(now):g}%: {count.reporting} host(s) report it, {count.admitted} admitted: "
          f"{count.healthy} healthy, {count.rolled_back} rolled back{named_hosts(count.rolled_back_hosts)}, "
          f"{count.boot_failed} did not boot{named_hosts(count.boot_failed_hosts)}, "
          f"{count.stuck} stuck, {count.on_the_way} on their way; {count.silent} silent"
          f"{named_hosts(count.silent_hosts)}. Policy: steps "
          f"{'/'.join(f'{s:g}%' for s in policy.steps)}, bake {format_duration(policy.bake)}, at least "
          f"{policy.min_healthy} healthy, at most {policy.max_failures} failure(s)"
          + (f" and {policy.max_failure_percent:g}%" if policy.max_failure_percent is not None else "")
          + f", at most {policy.max_silent} silent, on halt {policy.on_halt}.{written}")
    return PROMOTE_EXIT[verdict]


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


# Every SECONDS option: a finite number up to this (366 days); larger ones
# overflow timers and sleeps, nan and inf are not a time at all.
MAX_OPTION_SECONDS: Final = 366 * 86400


def seconds_option(*, zero: bool) -> Callable[[str], float]:
    """The type of a SECONDS option: a finite number above 0 (or from 0 with
    `zero`) and at most MAX_OPTION_SECONDS; anything else is a usage error."""
    allowed = (f"from 0 to {MAX_OPTION_SECONDS}" if zero else f"above 0 and at most {MAX_OPTION_SECONDS}") \
        + " (366 days)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {shorten(text, 40)}") from None
        # NaN fails every comparison, so it is refused here too.
        if not ((value >= 0 if zero else value > 0) and value <= MAX_OPTION_SECONDS):
            raise argparse.ArgumentTypeError(f"must be a number of seconds {allowed}: {shorten(text, 40)}")
        return value
    parse.__name__ = "seconds"
    return parse


positive: Final = seconds_option(zero=False)


def http_url(text: str) -> str:
    """An http(s) URL, checked before anything runs; non-ASCII is
    percent-encoded and an international host name becomes punycode."""
    from urllib.parse import quote, urlsplit, urlunsplit
    if not text.isprintable() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"invalid URL {shorten(text, 80)}: spaces or control characters")
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid URL {redact_url(text)!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"invalid URL {redact_url(text)!r}: only http:// and https:// are fetched")
    if not host:
        raise argparse.ArgumentTypeError(f"invalid URL {redact_url(text)!r}: no host")
    if port == 0:
        raise argparse.ArgumentTypeError(f"invalid URL {redact_url(text)!r}: port 0")
    netloc = parts.netloc
    if ":" in host:
        import ipaddress
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid URL {redact_url(text)!r}: malformed IPv6 address") from None
    else:
        # The name as the resolver will get it: no escapes hiding control
        # characters, no empty or over-long labels, punycode for IDN.
        if "%" in host:
            raise argparse.ArgumentTypeError(f"invalid URL {redact_url(text)!r}: percent-escapes in the host")
        try:
            name = resolver_name(host)
            ascii_host = (name if isinstance(name, bytes) else name.encode("idna")).decode("ascii")
        except UnicodeError:
            raise argparse.ArgumentTypeError(f"invalid URL {redact_url(text)!r}: bad host name "
                                             "(an empty or over-long label?)") from None
        if ascii_host != host:
            userinfo = parts.netloc.rpartition("@")[0]
            netloc = (quote(userinfo, safe=":%") + "@" if userinfo else "") + ascii_host + (f":{port}" if port else "")
    safe = "/%:@!$&'()*+,;=-._~?"
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe=safe), quote(parts.query, safe=safe), ""))


def parse_steps(text: str) -> tuple[float, ...]:
    """`5,25,100`: increasing percentages, the last 100."""
    import re
    parts = text.split(",")
    if not all(re.fullmatch(r"[0-9]{1,3}(?:\.[0-9]{1,2})?", p.strip()) for p in parts):
        raise argparse.ArgumentTypeError(f"not a list of percentages such as 5,25,100: {text!r}")
    steps = tuple(float(p) for p in parts)
    if any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)) or steps[-1] != 100:
        raise argparse.ArgumentTypeError(f"steps must increase, lie above 0 and end at 100: {text!r}")
    return steps


def duration_option(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration such as 30m, 2h or 1d: {text!r}") from None
    if value > MAX_OPTION_SECONDS:  # a plain number of 400 digits is inf
        raise argparse.ArgumentTypeError(f"at most 366d: {shorten(text, 40)}")
    return value


def count_option(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise argparse.ArgumentTypeError(f"not a whole number from 0: {text!r}")
    return int(text)


def percent_option(text: str) -> float:
    import re
    if not re.fullmatch(r"[0-9]{1,3}(?:\.[0-9]{1,2})?", text) or float(text) > 100:
        raise argparse.ArgumentTypeError(f"not a percentage from 0 to 100: {text!r}")
    return float(text)


def label_matchers(text: str) -> str:
    """PromQL label matchers (`job="node",env=~"prod|stage"`), checked so
    that nothing but matchers reaches the query."""
    import re
    matcher = r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(?:=|!=|=~|!~)\s*"(?:[^"\\\n]|\\.)*"\s*'
    inner = text.strip()
    if inner.startswith("{") and inner.endswith("}"):
        inner = inner[1:-1]
    if inner and not re.fullmatch(f"{matcher}(?:,{matcher})*", inner):
        raise argparse.ArgumentTypeError(f'not PromQL label matchers such as job="node": {text!r}')
    return inner.strip()


def pointer_source(text: str) -> str:
    """promote --pointer: a URL (checked as --url is) or a file."""
    return http_url(text) if text.startswith(("http://", "https://")) else text


def store_path_option(text: str) -> str:
    try:
        return validate_store_path(text, text)
    except PointerError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("pointer ", "")) from None


RUN_DESCRIPTION: Final = """\
Pull-based deployment agent for NixOS hosts: fetch the pointer at --url,
realise the system it names from the binary cache, activate it, roll back
what fails, write metrics.  `run` is the default command.

other commands (see `autodeploy.py COMMAND --help`):
  status        what the host runs and what the agent knows (no network)
  suspend       stop deploying on this host until `resume`
  resume        deploy again after `suspend`
  trust-reset   set the revision floor by hand (recovery; logged)
  sign          write a signed pointer (for CI)
  check-boot    boot assessment: health checks for the booted system
  promote       the rollout's next step from the fleet's metrics (for CI)"""


def add_check_options(parser: argparse.ArgumentParser, what: str) -> None:
    """The health checks, shared by `run` and `check-boot`."""
    parser.add_argument("--health-check", action="append", default=[], metavar="CMD", help=what)
    parser.add_argument("--health-timeout", type=positive, default=120.0, metavar="SECONDS",
                        help="time allowed for all health checks together (default: 120)")
    parser.add_argument("--no-connectivity-check", action="store_true",
                        help="do not require that the pointer URL is reachable (after activation, at boot)")


def add_run_parser(sub: Any) -> None:
    run_p = sub.add_parser("run", help="deploy what the pointer URL names (the default command)",
                           prog="autodeploy.py [run]", description=RUN_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    run_p.add_argument("--url", required=True, type=http_url,
                       help="URL of the pointer (one store path, optional key: value lines)")
    run_p.add_argument("--once", action="store_true", help="run one cycle and exit (as the systemd timer does)")
    run_p.add_argument("-s", "--switch-mode", type=SwitchMode, choices=list(SwitchMode), default=SwitchMode.SWITCH,
                       metavar="{switch,boot,smart}",
                       help="switch now, stage for the next boot, or smart: boot only when kernel, initrd or "
                            "modules change (default: switch)")
    run_p.add_argument("-r", "--reboot-mode", type=reboot_mode_arg, choices=list(RebootMode), default=None,
                       metavar="{reboot,kexec}", help="reboot (or kexec) after a boot-mode deploy (default: never; "
                                                      "`k-exec`, the original's spelling, means kexec)")
    run_p.add_argument("--prometheus-path", metavar="FILE", help="write Prometheus metrics to FILE (textfile collector)")
    run_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                       help=f"where the agent keeps its record (default: {DEFAULT_STATE_DIR})")
    run_p.add_argument("-f", "--force", action="store_true",
                       help="deploy upstream even when the host was deployed by hand or upstream is quarantined")
    run_p.add_argument("--accept-manual-rollback", action="store_true",
                       help="a hand switch back to a system this agent deployed earlier (nixos-rebuild switch "
                            "--rollback) quarantines the build it replaced and keeps the host tracked "
                            "(default: the host is dirty until someone intervenes)")
    run_p.add_argument("--dry-run", action="store_true", help="print the plan the real run would execute (holds included); change nothing")
    run_p.add_argument("--timeout", type=positive, default=30.0, metavar="SECONDS",
                       help="time allowed for the whole fetch of the pointer, retries included (and again for "
                            "its signature) (default: 30)")
    run_p.add_argument("--interval", type=positive, default=300.0, metavar="SECONDS",
                       help="loop mode: seconds between cycles, with +-10%% jitter (default: 300)")
    run_p.add_argument("-v", "--verbose", action="store_true", help="log every command and show tracebacks")
    add_check_options(run_p, "after activation run CMD via /bin/sh -c; non-zero rolls back (repeatable)")
    run_p.add_argument("--reboot-window", type=parse_window, metavar="HH:MM-HH:MM",
                       help="reboot only inside this local-time window (may wrap midnight; default: any time)")
    run_p.add_argument("--trusted-keys", metavar="FILE",
                       help="require pointers signed by one of these keys (allowed-signers file or public keys)")
    run_p.add_argument("--signature-url", metavar="URL", type=http_url,
                       help="where the signature is (default: URL.sig)")
    run_p.add_argument("--hostname", metavar="NAME", help="this host's name for `hosts:` (default: the machine's)")
    run_p.add_argument("--token-file", metavar="FILE", help="send `Authorization: Bearer <token>` read from FILE")
    run_p.add_argument("--json-field", metavar="PATH",
                       help="the pointer is JSON; take the store path from this dotted field "
                            "(Hydra: buildoutputs.out.path)")
    run_p.add_argument("--on-success", metavar="CMD", help="run CMD via /bin/sh -c after a deploy")
    run_p.add_argument("--on-failure", metavar="CMD", help="run CMD via /bin/sh -c after a failed run")
    run_p.add_argument("--hook-timeout", type=positive, default=60.0, metavar="SECONDS",
                       help="time allowed for a hook (default: 60)")
    run_p.add_argument("--boot-dir", type=absolute_dir, metavar="DIR",
                       help="where the boot loader's entries and the kernels it copies are ($BOOT: the ESP, or "
                            "the XBOOTLDR partition): for the boot-loader checks and the space check (default: the "
                            f"first of {', '.join(BOOT_DIR_CANDIDATES)} holding boot loader files (systemd-boot's "
                            f"entries when systemd-boot booted), else {BOOT_DIR})")
    # Fleet rollouts: coordinated reboots.
    run_p.add_argument("--fleetlock-url", type=validate_fleetlock_url, metavar="URL",
                       help="take a FleetLock reboot slot (Zincati's protocol, e.g. airlock) at this base URL "
                            "before every reboot or kexec, release it once healthy (default: no coordination)")
    run_p.add_argument("--fleetlock-group", type=validate_fleetlock_group, default=FLEETLOCK_DEFAULT_GROUP,
                       metavar="NAME", help=f"FleetLock reboot group (default: {FLEETLOCK_DEFAULT_GROUP})")


def add_status_parser(sub: Any) -> None:
    status_p = sub.add_parser("status", help="what the host runs and what the agent knows (no network)")
    status_p.add_argument("--json", action="store_true", help="machine-readable output")
    status_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR)


def add_suspend_parser(sub: Any) -> None:
    suspend_p = sub.add_parser("suspend", help="stop deploying on this host until `resume`")
    suspend_p.add_argument("--reason", default="", help="shown by status and in the logs")
    suspend_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR)


def add_resume_parser(sub: Any) -> None:
    resume_p = sub.add_parser("resume", help="deploy again after `suspend`")
    resume_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR)


def add_sign_parser(sub: Any) -> None:
    sign_p = sub.add_parser("sign", help="write a signed pointer (for CI)")
    sign_p.add_argument("--key", required=True, help="OpenSSH private key")
    sign_p.add_argument("--revision", required=True, type=int, help="monotonic revision number")
    sign_p.add_argument("--hosts", nargs="+", default=[], metavar="HOST",
                        help="hosts allowed to deploy it (this or --all-hosts is required)")
    sign_p.add_argument("--all-hosts", action="store_true", help="any host may deploy it (writes `hosts: *`)")
    sign_p.add_argument("--not-after", metavar="TIME",
                        help=f"RFC 3339 expiry time (default: {SIGN_DEFAULT_VALIDITY_DAYS} days from now)")
    sign_p.add_argument("--no-expiry", action="store_true", help="write no `not-after:` line")
    sign_p.add_argument("-o", "--output", required=True, metavar="FILE", help="pointer file (FILE.sig is written too)")
    # Fleet rollouts: waves and the pause switch.
    sign_p.add_argument("--rollout", metavar="PERCENT", help="only hosts in the first PERCENT of buckets deploy "
                        "(the start of the ramp with --rollout-start)")
    sign_p.add_argument("--rollout-start", metavar="TIME", help="RFC 3339 time the ramp to 100%% starts")
    sign_p.add_argument("--rollout-duration", metavar="DURATION", help="ramp length, e.g. 24h, 90m, 1d12h")
    sign_p.add_argument("--pause", action="store_true", help="write `pause: true`: no host starts this deploy")
    sign_p.add_argument("store_path", metavar="STOREPATH", nargs="?")


def add_promote_parser(sub: Any) -> None:
    promote_p = sub.add_parser("promote", help="CI: the rollout's next step (advance, hold, halt), decided by "
                                               "the fleet's metrics in Prometheus")
    promote_p.add_argument("--pointer", required=True, metavar="FILE|URL", type=pointer_source,
                           help="the current signed pointer (FILE.sig or URL.sig next to it)")
    promote_p.add_argument("--prometheus", required=True, type=http_url, metavar="URL",
                           help="Prometheus base URL (its /api/v1/query is asked)")
    promote_p.add_argument("--key", required=True, help="OpenSSH private key that signs the next pointer")
    promote_p.add_argument("-o", "--output", required=True, metavar="FILE",
                           help="where the next pointer goes (FILE.sig too); written only on advance and halt")
    promote_p.add_argument("--trusted-keys", metavar="FILE",
                           help="keys the current pointer must be signed by (default: the public half of --key)")
    promote_p.add_argument("--steps", type=parse_steps, default=(5.0, 25.0, 100.0), metavar="P,P,...",
                           help="the rollout's steps in percent (default: 5,25,100)")
    promote_p.add_argument("--bake", type=duration_option, default=3600.0, metavar="DURATION",
                           help="how long a step runs before it may advance, e.g. 30m, 2h (default: 1h)")
    promote_p.add_argument("--max-report-age", type=duration_option, default=26 * 3600.0, metavar="DURATION",
                           help="a host counts as healthy only when its last run is at most this old; an older one "
                                "counts as stuck (default: 26h, for hosts that poll daily)")
    promote_p.add_argument("--min-healthy", type=count_option, default=1, metavar="N",
                           help="admitted hosts that must run the build healthy before a step advances (default: 1)")
    promote_p.add_argument("--max-failures", type=count_option, default=0, metavar="N",
                           help="halt when more admitted hosts than this rolled the build back or did not boot it "
                                "(default: 0)")
    promote_p.add_argument("--max-failure-percent", type=percent_option, default=None, metavar="P",
                           help="halt also when failures exceed P%% of the admitted hosts (default: no such limit)")
    promote_p.add_argument("--max-silent", type=count_option, default=0, metavar="N",
                           help="hold while more hosts than this deployed the build within --max-report-age and "
                                "report nothing now (default: 0)")
    promote_p.add_argument("--selector", type=label_matchers, default="", metavar="MATCHERS",
                           help='PromQL label matchers that select the fleet, e.g. job="node",env="prod"')
    promote_p.add_argument("--on-halt", choices=("pause", "revert"), default="pause",
                           help="halt by `pause: true` (default) or by publishing --revert-to to every host")
    promote_p.add_argument("--revert-to", metavar="STOREPATH", type=store_path_option,
                           help="the build published by --on-halt revert (usually the previous one)")
    promote_p.add_argument("--not-after", metavar="TIME",
                           help=f"RFC 3339 expiry of the next pointer (default: {SIGN_DEFAULT_VALIDITY_DAYS} days "
                                "from now)")
    promote_p.add_argument("--no-expiry", action="store_true", help="write no `not-after:` line")
    promote_p.add_argument("--timeout", type=positive, default=30.0, metavar="SECONDS",
                           help="time allowed for each request (default: 30)")


def add_trust_reset_parser(sub: Any) -> None:
    reset_p = sub.add_parser("trust-reset", help="set the revision floor by hand (recovery from a corrupt or "
                                                 "lost state; logged)")
    reset_p.add_argument("--min-revision", required=True, type=int, metavar="N",
                         help="refuse signed pointers below revision N from now on (0 without signed pointers)")
    reset_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR)


def add_check_boot_parser(sub: Any) -> None:
    check_p = sub.add_parser("check-boot", help="boot assessment: health checks for the booted system "
                                                "(run before boot-complete.target)")
    check_p.add_argument("--url", required=True, type=http_url,
                         help="pointer URL, fetched as the connectivity check")
    add_check_options(check_p, "run CMD via /bin/sh -c; non-zero fails the boot check (repeatable)")
    check_p.add_argument("--wait", type=seconds_option(zero=True), default=300.0, metavar="SECONDS",
                         help="retry failing checks for up to SECONDS (network coming up; default: 300)")
    check_p.add_argument("--timeout", type=positive, default=30.0, metavar="SECONDS", help="HTTP timeout")
    check_p.add_argument("--token-file", metavar="FILE", help="send `Authorization: Bearer <token>` read from FILE")
    check_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                         help="where the result is recorded for the agent's next cycle")
    check_p.add_argument("-v", "--verbose", action="store_true", help="log every command")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `command`, only that sub-command's parser
    (main() knows it from argv: building them all costs a no-op run a few
    milliseconds of start-up)."""
    parser = Parser(prog="autodeploy.py", description=RUN_DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)

    for name, add in SUB_PARSERS.items():
        if command in (None, name):
            add(sub)
    return parser


# The sub-commands, each with the function that adds its parser; "run" is the default.
SUB_PARSERS: Final = {"run": add_run_parser, "status": add_status_parser, "suspend": add_suspend_parser,
                      "resume": add_resume_parser, "sign": add_sign_parser, "promote": add_promote_parser,
                      "trust-reset": add_trust_reset_parser, "check-boot": add_check_boot_parser}
COMMANDS: Final = tuple(SUB_PARSERS)


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        url=args.url, once=args.once, switch_mode=args.switch_mode, reboot_mode=args.reboot_mode,
        prometheus_path=args.prometheus_path, state_dir=args.state_dir, force=args.force,
        dry_run=args.dry_run, timeout=args.timeout, interval=args.interval, verbose=args.verbose,
        health_checks=tuple(args.health_check), health_timeout=args.health_timeout,
        connectivity_check=not args.no_connectivity_check, reboot_window=args.reboot_window,
        trusted_keys=args.trusted_keys, signature_url=args.signature_url, hostname=args.hostname,
        token_file=args.token_file, json_field=args.json_field, on_success=args.on_success,
        on_failure=args.on_failure, hook_timeout=args.hook_timeout,
        fleetlock_url=args.fleetlock_url, fleetlock_group=args.fleetlock_group,
        boot_dir=args.boot_dir, accept_manual_rollback=args.accept_manual_rollback,
    )


def main(argv: list[str] | None = None) -> int:
    global _verbose
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        argv = ["run", "--help"]  # the default command's options, and the other commands
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "run")
    _verbose = "-v" in argv or "--verbose" in argv
    try:
        only = argv[0] if argv and argv[0] in COMMANDS and "-h" not in argv and "--help" not in argv else None
        args = build_parser(only).parse_args(argv)
        if args.command in (None, "run") and not hasattr(args, "url"):
            raise UsageError("autodeploy.py: the following arguments are required: --url")
        if args.command == "status":
            return command_status(args.state_dir, args.json)
        if args.command == "trust-reset":
            return command_trust_reset(args.state_dir, args.min_revision)
        if args.command == "check-boot":
            return command_check_boot(args)
        if args.command == "suspend":
            require_root("autodeploy.py suspend")
            StateStore(args.state_dir).suspend(args.reason)
            log(f"suspended: {args.reason or 'no reason given'}")
            return 0
        if args.command == "resume":
            require_root("autodeploy.py resume")
            was = StateStore(args.state_dir).resume()
            log("resumed" if was else "was not suspended")
            return 0
        if args.command == "sign":
            # `--hosts H [H ...] STOREPATH`: the greedy --hosts took the store path.
            if args.store_path is None and args.hosts and args.hosts[-1].startswith(STORE_DIR + "/"):
                args.store_path = args.hosts.pop()
            if args.store_path is None:
                raise UsageError("autodeploy.py sign: the following arguments are required: STOREPATH")
            return command_sign(args.key, args.revision, args.hosts, args.all_hosts, args.not_after, args.no_expiry,
                                args.store_path, args.output, rollout=sign_rollout_metadata(args))
        if args.command == "promote":
            return command_promote(args)
        return command_run(config_from_args(args))
    except AutodeployError as exc:
        log(f"error: {exc}")
        return exc.exit_code
    except (KeyboardInterrupt, Interrupted):
        log("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001
        if _verbose:
            raise
        log(f"internal error: {type(exc).__name__}: {outside_text(str(exc))} (run with --verbose for a traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
