#!/usr/bin/env python3
"""nixos-autodeploy: a pull-based deployment agent for NixOS hosts.

CI builds each host's NixOS system, pushes its closure to a binary cache and
publishes a *pointer*: a small text document whose first line is the store
path of the system (optionally followed by ``key: value`` lines and an
OpenSSH signature at ``URL.sig``).  On every host this agent, one cycle at a
time:

 1. fetches the pointer (bounded size, timeout, conditional request),
 2. validates it (a plain store path, never a ``.drv``; signature, revision,
    host list and expiry when ``--trusted-keys`` is given),
 3. decides, from /run/current-system, /run/booted-system, the system profile,
    the upstream path and its own persisted record, what to do (table below),
 4. realises the closure from the binary cache (``nix-store --realise``; the
    device never builds) and checks that it is a NixOS system for this machine,
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

Decision table (``decide()`` reads like it).  The host is *ours* while the
profile points to what we deployed and the current system is either that or,
after a ``boot`` deploy not yet rebooted into, what was current when we staged
it:

    | situation                                            | action                         | dirty |
    |------------------------------------------------------|--------------------------------|-------|
    | no record, current == upstream == profile            | start tracking: record current | 0     |
    | ours, upstream == deployed                           | nothing (up to date, or reboot | 0     |
    |                                                      | pending; verify after reboot)  |       |
    | ours, upstream != deployed                           | deploy upstream                | 0     |
    | not ours, current == upstream == profile             | record it, resume tracking     | 0     |
    | not ours (manual deploy, nixos-rebuild test/boot/    | change nothing                 | 1     |
    |   switch, no record and current != upstream)         |                                |       |

``--force`` deploys upstream even when the host is not ours.  A quarantined
upstream (it failed and was rolled back) is not deployed again until upstream
changes or ``--force``.  An operator ``suspend`` stops all deploys.  Between
the decision and a deploy the pointer's rollout fields are obeyed (a host
waits for its wave; ``pause`` stops new deploys), and with ``--fleetlock-url``
every reboot first takes a FleetLock slot (see "Rollouts" and "FleetLock").

Exit codes:

    0  cycle completed (up to date, deployed, tracking, dirty, suspended, quarantined,
       waiting for its rollout wave or a reboot slot, rollout paused)
    1  unexpected internal error
    2  usage: bad option or value
    3  fetch failed (HTTP error, timeout, connection refused, TLS)
    4  pointer refused (not a plain store path, signature, downgrade, other host, expired,
       malformed rollout fields)
    5  deploy failed (realise, not a NixOS system, activation, health check); host rolled back
    6  another run holds the lock
    7  rollback failed: the host needs a human

Logs go to stderr, results (``status``, ``--dry-run``) to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
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
    from typing import Any, Final, NoReturn

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
# /run is a tmpfs on NixOS: files here vanish on reboot, which is how the agent
# tells "not rebooted yet" from "rebooted, but into the previous system".
RUNTIME_DIR: Final = "/run/nixos-autodeploy"
STAGED_MARKER: Final = RUNTIME_DIR + "/staged"
ACTIVATING_MARKER: Final = RUNTIME_DIR + "/activating"
DEFAULT_STATE_DIR: Final = "/var/lib/nixos-autodeploy"
STATE_FILE: Final = "state.json"
SUSPEND_FILE: Final = "suspend.json"
LOCK_FILE: Final = "lock"

ACTIVATION_UNIT: Final = "nixos-autodeploy-activation"
# Set (via systemd-run --setenv) for our own activation, so the module's
# activation script does not restart nixos-autodeploy.service under our feet.
ACTIVATION_ENV: Final = "NIXOS_AUTODEPLOY_ACTIVATION"
# Test-only clock injection for reboot windows (local time, ISO 8601).
NOW_ENV: Final = "NIXOS_AUTODEPLOY_NOW"

SIGNATURE_NAMESPACE: Final = "nixos-autodeploy"
MAX_POINTER_BYTES: Final = 64 * 1024
MAX_REDIRECTS: Final = 5
NIX_BASE32: Final = "0123456789abcdfghijklmnpqrsvwxyz"
KEY_TYPES: Final = ("ssh-", "ecdsa-", "sk-")
ACTIVATION_WAIT_SECONDS: Final = 600

# Pointer metadata keys the agent knows (parse_pointer refuses others).
POINTER_KEYS: Final = ("revision", "hosts", "not-after", "rollout", "rollout-start", "rollout-duration", "pause")
# Rollout waves: a host's bucket is sha256(hostname NUL store path) mod this.
ROLLOUT_BUCKETS: Final = 10000
# FleetLock reboot slots (coreos/zincati docs/development/fleetlock/protocol.md).
FLEETLOCK_DEFAULT_GROUP: Final = "default"
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


class ProcessError(AutodeployError):
    """A command exited non-zero (or timed out); callers wrap it in a domain error."""

    def __init__(self, argv: list[str], returncode: int, output: str = "") -> None:
        self.argv, self.returncode, self.output = argv, returncode, output
        detail = f": {output.strip()[-500:]}" if output.strip() else ""
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


class Action(enum.Enum):
    TRACK = "track"
    RESUME = "resume"
    NOTHING = "nothing"
    DEPLOY = "deploy"
    DIRTY = "dirty"


STATES: Final = (
    "up_to_date", "tracking", "deployed", "pending_reboot", "dirty", "failed",
    "rolled_back", "quarantined", "suspended", "refused", "booted_previous",
    "waiting_rollout", "rollout_paused", "waiting_reboot_slot",
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
    upstream_metadata: dict[str, str] = field(default_factory=dict)
    highest_revision: int | None = None
    revision_path: str | None = None
    verified_digest: str | None = None  # sha256 of the last verified body+signature
    signers_digest: str | None = None   # sha256 of the trusted keys that verified it
    etag: str | None = None
    last_modified: str | None = None
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
    rollout: dict[str, Any] | None = None          # this host's wave for upstream (see rollout_view)
    reboot_slot: dict[str, Any] | None = None      # a FleetLock slot we may hold (asked, not released)
    fleetlock_failures: dict[str, int] = field(default_factory=dict)  # "operation:kind" -> count
    fleetlock_error: dict[str, str] | None = None  # the last lock operation's error, while unresolved

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    dirty: bool = False


@dataclass
class Outcome:
    """Result of one cycle: what the metrics, hooks and exit code report."""

    state: str
    reason: str
    old_system: str | None = None
    new_system: str | None = None
    deployed: bool = False
    error: AutodeployError | None = None


# ---------------------------------------------------------------------------
# Logging (stderr) and small helpers
# ---------------------------------------------------------------------------

_verbose = False


def log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def debug(message: str) -> None:
    if _verbose:
        log(message)


def shorten(data: bytes | str, limit: int = 120) -> str:
    """An escaped, truncated rendering of untrusted input for error messages."""
    text = repr(data[:limit])
    return text + (f" ... ({len(data)} bytes)" if len(data) > limit else "")


def redact_url(url: str) -> str:
    """Mask credentials embedded in a URL (user:password@host)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}://{netloc}{slash}{tail}"


def atomic_write(path: str, data: bytes | str, mode: int = 0o644) -> None:
    """Write a file so that readers see the old or the new content, never half."""
    if isinstance(data, str):
        data = data.encode()
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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
        stdin: bytes | None = None, new_session: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command.  Without capture its output goes to our stderr (the
    journal), never to stdout, which carries results only."""
    import subprocess
    debug("running: " + " ".join(argv))
    try:
        proc = subprocess.Popen(
            argv, text=True, env=env, start_new_session=new_session,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else sys.stderr.fileno(),
            stderr=subprocess.STDOUT if capture else sys.stderr.fileno(),
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
    result = subprocess.CompletedProcess(argv, proc.returncode, out or "", "")
    if check and proc.returncode != 0:
        raise ProcessError(argv, proc.returncode, out or "")
    return result


def nix_realise(path: str) -> None:
    # Output on stdout is the realised path; nix's progress goes to stderr.
    run(["nix-store", "--realise", path, "--add-root", UPSTREAM_GCROOT], capture=False)


def nix_set_profile(path: str) -> None:
    run(["nix-env", "--profile", SYSTEM_PROFILE, "--set", path])


def switch_to_configuration(system: str, action: str) -> None:
    """Activate through a transient unit so the activation survives our own
    service being stopped or restarted by that very activation."""
    os.makedirs(RUNTIME_DIR, exist_ok=True)
    atomic_write(ACTIVATING_MARKER, f"{os.getpid()}\n")
    try:
        run(["systemd-run", f"--unit={ACTIVATION_UNIT}", f"--setenv={ACTIVATION_ENV}=1",
             "--wait", "--pipe", "--collect", "--quiet", "--no-ask-password",
             "--service-type=exec", "--", f"{system}/bin/switch-to-configuration", action])
    finally:
        try:
            os.unlink(ACTIVATING_MARKER)
        except FileNotFoundError:
            pass


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
# Pointer: fetching
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    etag: str | None = None
    last_modified: str | None = None


class HttpClient:
    """A small HTTP/1.1 GET client on a plain socket: bounded headers and body,
    Content-Length, chunked or close-delimited bodies, redirects, and a
    kept-alive connection reused across polls in loop mode.

    Why not urllib or http.client: they import the email package and ssl at
    start-up (about 15 ms and 8 MB for every poll of a `--once` run).  Here
    ssl is imported only for https:// URLs."""

    def __init__(self, timeout: float, token: str | None = None) -> None:
        self.timeout = timeout
        self.token = token
        self._conns: dict[tuple[str, str, int], _Connection] = {}

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def get(self, url: str, headers: dict[str, str] | None = None) -> Response:
        from urllib.parse import urljoin, urlsplit
        shown = redact_url(url)
        origin = urlsplit(url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FetchError(f"unsupported URL {shown!r}: only http:// and https:// are fetched")
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise FetchError(f"invalid port in URL {shown!r}") from None
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            send = {"Host": host if parts.port is None else f"{host}:{port}", "User-Agent": USER_AGENT,
                    "Accept-Encoding": "identity"}
            send.update(headers or {})
            # Like curl: credentials go to the origin only, never to another
            # host (or scheme) a redirect points at.
            if self.token is not None and parts[:2] == origin:
                send["Authorization"] = f"Bearer {self.token}"
            if parts.username is not None:
                import base64
                from urllib.parse import unquote
                raw = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                send["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            status, body, rheaders = self._request(parts.scheme, parts.hostname, port, target, send, shown)
            if status in (301, 302, 303, 307, 308) and rheaders.get("location"):
                url = urljoin(url, rheaders["location"])
                shown = redact_url(url)
                debug(f"redirected to {shown}")
                continue
            if status == 304:
                return Response(304, b"", rheaders.get("etag"), rheaders.get("last-modified"))
            if not 200 <= status < 300:
                snippet = f": {shorten(body, 80)}" if body else ""
                raise FetchError(f"GET {shown} answered HTTP {status}{snippet}")
            return Response(status, body, rheaders.get("etag"), rheaders.get("last-modified"))
        raise FetchError(f"GET {shown}: more than {MAX_REDIRECTS} redirects")

    def _request(self, scheme: str, hostname: str, port: int, target: str, headers: dict[str, str],
                 shown: str) -> tuple[int, bytes, dict[str, str]]:
        key = (scheme, hostname, port)
        request = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        for attempt in (1, 2):
            conn = self._conns.pop(key, None)
            reused = conn is not None
            try:
                if conn is None:
                    conn = _Connection(scheme, hostname, port, self.timeout)
                conn.send(request.encode("latin-1"))
                status, rheaders, body, keep = conn.read_response(shown)
            except FetchError:
                if conn is not None:
                    conn.close()
                raise
            except (_Closed, ConnectionResetError, BrokenPipeError) as exc:
                if conn is not None:
                    conn.close()
                if reused and attempt == 1:
                    continue  # the server closed our kept-alive connection: retry once
                raise FetchError(f"GET {shown}: {describe_network_error(exc)}") from None
            except (OSError, ValueError, UnicodeError) as exc:
                if conn is not None:
                    conn.close()
                raise FetchError(f"GET {shown}: {describe_network_error(exc)}") from None
            if keep:
                self._conns[key] = conn
            else:
                conn.close()
            return status, body, rheaders
        raise FetchError(f"GET {shown}: connection closed")


class _Closed(Exception):
    def __str__(self) -> str:
        return "connection closed by the server"


class _Connection:
    MAX_HEADER_LINES: Final = 100

    def __init__(self, scheme: str, hostname: str, port: int, timeout: float) -> None:
        import socket
        sock = socket.create_connection((hostname, port), timeout=timeout)
        if scheme == "https":
            import ssl
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=hostname)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        line = self.rfile.readline(MAX_POINTER_BYTES + 1)
        if len(line) > MAX_POINTER_BYTES:
            raise ValueError("response line too long")
        return line

    def read_response(self, shown: str) -> tuple[int, dict[str, str], bytes, bool]:
        line = self._line()
        if not line:
            raise _Closed()
        version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise FetchError(f"GET {shown}: not an HTTP response: {shorten(line, 60)}")
        status = int(code)
        headers: dict[str, str] = {}
        for _ in range(self.MAX_HEADER_LINES):
            line = self._line()
            if line in (b"\r\n", b"\n", b""):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        else:
            raise FetchError(f"GET {shown}: too many response headers")
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        too_big = FetchError(f"GET {shown}: body exceeds the {MAX_POINTER_BYTES}-byte limit for a pointer")
        if status in (204, 304) or 100 <= status < 200:
            return status, headers, b"", keep
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size_line = self._line().split(b";")[0].strip()
                size = int(size_line, 16)
                if size == 0:
                    while self._line() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return status, headers, body, keep
                if len(body) + size > MAX_POINTER_BYTES:
                    raise too_big
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise _Closed()
                body += chunk
                self._line()
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise FetchError(f"GET {shown}: invalid Content-Length {shorten(length, 40)}")
            if int(length) > MAX_POINTER_BYTES:
                raise FetchError(f"GET {shown}: body of {length} bytes exceeds the "
                                 f"{MAX_POINTER_BYTES}-byte limit for a pointer")
            body = self.rfile.read(int(length))
            if len(body) < int(length):
                raise FetchError(f"GET {shown}: connection closed after {len(body)} of {length} bytes")
            return status, headers, body, keep
        body = self.rfile.read(MAX_POINTER_BYTES + 1)  # delimited by the end of the connection
        if len(body) > MAX_POINTER_BYTES:
            raise too_big
        return status, headers, body, False


def describe_network_error(exc: BaseException) -> str:
    import socket
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    name = type(exc).__name__
    if "SSL" in name or "Certificate" in name:
        return f"TLS error: {exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    return f"{name}: {exc}"


# ---------------------------------------------------------------------------
# Pointer: parsing and validation
# ---------------------------------------------------------------------------


def validate_store_path(path: str, received: bytes | str) -> str:
    """A plain top-level store path: /nix/store/<32 nix-base32>-<name>, never a .drv."""
    prefix = STORE_DIR + "/"
    if not path.startswith(prefix):
        raise PointerError(f"pointer is not a store path under {STORE_DIR}: got {shorten(received)}")
    base = path[len(prefix):]
    digest, dash, name = base[:32], base[32:33], base[33:]
    if len(digest) != 32 or any(c not in NIX_BASE32 for c in digest) or dash != "-":
        raise PointerError(f"pointer has no valid store hash: got {shorten(received)}")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")
    if not name or len(name) > 211 or name.startswith(".") or any(c not in allowed for c in name):
        raise PointerError(f"pointer has an invalid store path name: got {shorten(received)}")
    if name.endswith(".drv"):
        raise PointerError(f"pointer names a derivation (.drv); this agent never builds: got {shorten(received)}")
    return path


def parse_pointer(body: bytes, json_field: str | None = None) -> Pointer:
    """The first non-empty line is the store path; later lines are `key: value`."""
    if b"\0" in body:
        raise PointerError(f"pointer contains NUL bytes: got {shorten(body)}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PointerError(f"pointer is not UTF-8: got {shorten(body)}") from None
    if json_field:
        try:
            value: Any = json.loads(text)
        except ValueError:
            raise PointerError(f"pointer is not JSON: got {shorten(body)}") from None
        for key in json_field.split("."):
            if not isinstance(value, dict) or key not in value:
                raise PointerError(f"JSON pointer has no field {json_field!r}: got {shorten(body)}")
            value = value[key]
        if not isinstance(value, str):
            raise PointerError(f"JSON field {json_field!r} is not a string: got {shorten(repr(value))}")
        return Pointer(validate_store_path(value, value), {})
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise PointerError(f"pointer is empty: got {shorten(body)}")
    path = validate_store_path(lines[0], lines[0])
    metadata: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or not key or not all(c.isalnum() or c in "-_" for c in key):
            raise PointerError(f"pointer line is not `key: value`: got {shorten(line)}")
        metadata[key.lower()] = value.strip()
    revision = None
    if "revision" in metadata:
        try:
            revision = int(metadata["revision"])
        except ValueError:
            raise PointerError(f"pointer revision is not an integer: got {shorten(metadata['revision'])}",
                               "revision") from None
    return Pointer(path, metadata, revision)


# ---------------------------------------------------------------------------
# Pointer: trust (OpenSSH signatures, revisions, host lists, expiry)
# ---------------------------------------------------------------------------


def allowed_signers(trusted_keys_file: str) -> str:
    """An allowed-signers document: the file itself, or one made from a file of
    plain public keys (all given the principal `nixos-autodeploy`)."""
    try:
        with open(trusted_keys_file) as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read --trusted-keys {trusted_keys_file}: {exc.strerror}") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(KEY_TYPES):
            out.append(f'{SIGNATURE_NAMESPACE} namespaces="{SIGNATURE_NAMESPACE}" {line}')
        else:
            out.append(line)
    if not out:
        raise UsageError(f"--trusted-keys {trusted_keys_file} holds no key")
    return "\n".join(out) + "\n"


def verify_signature(body: bytes, signature: bytes, signers: str, workdir: str) -> str:
    """Verify with `ssh-keygen -Y verify`; return the signer's principal."""
    import tempfile
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".verify-") as tmp:
        signers_file = os.path.join(tmp, "allowed_signers")
        sig_file = os.path.join(tmp, "pointer.sig")
        with open(signers_file, "w") as f:
            f.write(signers)
        with open(sig_file, "wb") as f:
            f.write(signature)
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


def check_trust(pointer: Pointer, state: State, cfg: Config) -> None:
    """Rules for signed pointers: revision never goes down, one path per
    revision, this host is listed, not expired."""
    meta = pointer.metadata
    if pointer.revision is None:
        raise PointerError("signed pointer has no `revision:` line", "revision")
    if state.highest_revision is not None:
        if pointer.revision < state.highest_revision:
            raise PointerError(f"pointer revision {pointer.revision} is lower than revision "
                               f"{state.highest_revision} already accepted (downgrade refused)", "revision")
        if pointer.revision == state.highest_revision and state.revision_path not in (None, pointer.path):
            raise PointerError(f"pointer revision {pointer.revision} names {pointer.path}, but that "
                               f"revision was accepted as {state.revision_path}", "revision")
    if "hosts" in meta:
        hosts = meta["hosts"].replace(",", " ").split()
        me = cfg.hostname or local_hostname()
        if me not in hosts:
            raise PointerError(f"pointer is for hosts {' '.join(hosts)}, not for {me}", "host")
    check_expiry(pointer)


def parse_rfc3339(text: str) -> Any:
    """An aware datetime (UTC when no offset is given); ValueError otherwise."""
    from datetime import datetime, timezone
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
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
        raise PointerError(f"pointer not-after is not an RFC 3339 time: {shorten(text)}", "expired") from None
    if datetime.now(timezone.utc) > expiry:
        raise PointerError(f"pointer expired at {text}", "expired")


def local_hostname() -> str:
    import socket
    return socket.gethostname()


# ---------------------------------------------------------------------------
# State store
# ---------------------------------------------------------------------------


class StateStore:
    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)
        self.suspend_path = os.path.join(state_dir, SUSPEND_FILE)

    def ensure_dir(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def load(self) -> State:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return State()
        except (OSError, ValueError) as exc:
            raise AutodeployError(f"cannot read state file {self.path}: {exc}") from None
        return State.from_json(data)

    def save(self, state: State) -> None:
        self.ensure_dir()
        atomic_write(self.path, json.dumps(dataclasses.asdict(state), indent=1, sort_keys=True) + "\n", 0o600)

    def suspension(self) -> dict[str, Any] | None:
        try:
            with open(self.suspend_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"reason": "unreadable suspend file (treated as suspended)", "since": None}

    def suspend(self, reason: str) -> None:
        self.ensure_dir()
        atomic_write(self.suspend_path, json.dumps({"reason": reason, "since": time.time()}) + "\n", 0o600)

    def resume(self) -> bool:
        try:
            os.unlink(self.suspend_path)
            return True
        except FileNotFoundError:
            return False

    def lock(self) -> int:
        """An exclusive, non-blocking flock; the fd stays open for the run."""
        import fcntl
        self.ensure_dir()
        fd = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(f"another run holds the lock {os.path.join(self.dir, LOCK_FILE)}; "
                           "nothing done") from None
        return fd


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(state: State, host: HostView, suspended: bool) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        full = f"nixos_autodeploy_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            rendered = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            number = str(int(value)) if float(value).is_integer() else repr(round(float(value), 3))
            lines.append(f"{full}{{{rendered}}} {number}" if labels else f"{full} {number}")

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
    if state.last_error and not state.last_run_success:
        metric("last_error_info", "gauge", "The last run's error (present only when it failed).",
               [({"kind": state.last_error.get("kind", ""),
                  "message": state.last_error.get("message", "")[:300]}, 1)])
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
    metric("reboot_slot_held", "gauge", "1 while this host holds a FleetLock reboot slot.",
           [({}, int(bool(state.reboot_slot and state.reboot_slot.get("granted"))))])
    if state.fleetlock_failures:
        metric("fleetlock_failures_total", "counter", "Failed FleetLock requests by operation and error kind "
               "(kept across runs).",
               [({"operation": key.partition(":")[0], "kind": key.partition(":")[2]}, count)
                for key, count in sorted(state.fleetlock_failures.items())])
    if state.fleetlock_error:
        metric("fleetlock_last_error_info", "gauge", "The last FleetLock error (present until an operation succeeds).",
               [({"operation": state.fleetlock_error.get("operation", ""),
                  "kind": state.fleetlock_error.get("kind", ""),
                  "message": state.fleetlock_error.get("message", "")[:300]}, 1)])
    return "\n".join(lines) + "\n"


def write_metrics(path: str, state: State, host: HostView, suspended: bool) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, render_metrics(state, host, suspended))


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
    os.makedirs(RUNTIME_DIR, exist_ok=True)
    atomic_write(STAGED_MARKER, system + "\n")


def reboot_status(state: State, host: HostView) -> tuple[bool, str | None]:
    staged = state.deployed and host.profile == state.deployed and host.current != state.deployed
    # Without the marker the host has rebooted since: it booted the previous
    # system (boot loader fallback), and another reboot would not help.
    if staged and os.path.exists(STAGED_MARKER):
        return True, f"{basename_or_empty(state.deployed)} is staged for the next boot"
    differ = boot_differs(host.booted, host.current)
    if differ:
        return True, "booted " + ", ".join(differ) + " differ from the current system's"
    return False, None


# ---------------------------------------------------------------------------
# Decision (reads like the table in the module docstring)
# ---------------------------------------------------------------------------


def is_ours(host: HostView, state: State) -> bool:
    if not state.deployed or host.profile != state.deployed:
        return False
    if host.current == state.deployed:
        return True
    return state.activation == "boot" and host.current == state.staged_from


def decide(host: HostView, upstream: str, state: State, force: bool) -> Decision:
    current, profile = host.current, host.profile
    if not is_ours(host, state):
        if current == upstream == profile:
            if state.deployed is None:
                return Decision(Action.TRACK, "no record; the host runs upstream: start tracking")
            return Decision(Action.RESUME, "the host runs upstream again: resume tracking")
        if force:
            return Decision(Action.DEPLOY, "not ours, but --force: deploy upstream")
        if state.deployed is None:
            why = "no record and the host does not run upstream"
        elif profile != state.deployed:
            why = "the system profile was changed by someone else (manual deploy)"
        else:
            why = "the current system was changed by someone else (nixos-rebuild test?)"
        return Decision(Action.DIRTY, why + ": change nothing", dirty=True)
    if upstream == state.deployed:
        return Decision(Action.NOTHING, "up to date")
    return Decision(Action.DEPLOY, "upstream changed: deploy it")


# ---------------------------------------------------------------------------
# The deploy cycle
# ---------------------------------------------------------------------------


class Stopping:
    """SIGTERM/SIGINT end the agent between steps, never inside an activation."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum: int, _frame: Any) -> None:
            log(f"received signal {signum}: stopping after the current step")
            cls.requested = True
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


class Agent:
    def __init__(self, cfg: Config, client: HttpClient | None = None) -> None:
        self.cfg = cfg
        self.store = StateStore(cfg.state_dir)
        self.client = client or HttpClient(cfg.timeout, read_token(cfg.token_file))
        self.signers = allowed_signers(cfg.trusted_keys) if cfg.trusted_keys else None
        self.state = State()
        self.slot_wait: str | None = None  # why this cycle's reboot waits for a FleetLock slot

    # -- state helpers -----------------------------------------------------

    def save(self) -> None:
        if not self.cfg.dry_run:
            self.store.save(self.state)

    def set_intent(self, phase: str, **fields: Any) -> None:
        intent = dict(self.state.intent or {})
        intent.update(fields, phase=phase)
        self.state.intent = intent
        self.save()

    # -- one cycle ---------------------------------------------------------

    def cycle(self) -> Outcome:
        started = time.time()
        self.state = self.store.load()
        if self.signers is not None:
            import hashlib
            keys = hashlib.sha256(self.signers.encode()).hexdigest()
            if self.state.signers_digest != keys:
                # The trusted keys changed (rotation, revocation): nothing verified
                # before counts, and a 304 must not replay an unverified pointer.
                self.state.verified_digest = self.state.etag = self.state.last_modified = None
                self.state.signers_digest = keys
        outcome: Outcome
        self.slot_wait = None
        try:
            outcome = self.reboot_slot_outcome(self._cycle())
        except AutodeployError as exc:
            outcome = Outcome(self._failure_state(exc), str(exc), error=exc)
        except Exception as exc:  # noqa: BLE001 - reported, never a silent crash
            if _verbose:
                import traceback
                traceback.print_exc()
            err = AutodeployError(f"internal error: {type(exc).__name__}: {exc}")
            outcome = Outcome("failed", str(err), error=err)
        self._finish(outcome, started)
        return outcome

    def _failure_state(self, exc: AutodeployError) -> str:
        if isinstance(exc, PointerError):
            return "refused"
        if isinstance(exc, DeployError) and exc.kind in ("activation", "health"):
            return "rolled_back"
        return "failed"

    def _cycle(self) -> Outcome:
        cfg, state = self.cfg, self.state
        if state.intent and not cfg.dry_run:
            self.recover()
        pointer = self.fetch_pointer()
        rollout = self.rollout_step(pointer)
        if state.quarantined and state.quarantined != pointer.path and not cfg.dry_run:
            log(f"upstream moved on from the quarantined {state.quarantined}: quarantine lifted")
            state.quarantined = state.quarantine_reason = None
        host = read_host()
        log(f"current={host.current} booted={host.booted} profile={host.profile} "
            f"deployed={state.deployed} upstream={pointer.path}")
        if not host.current:
            raise DeployError(f"{CURRENT_SYSTEM} is missing: this does not look like a NixOS host")
        decision = decide(host, pointer.path, state, cfg.force)
        suspension = self.store.suspension()
        log(f"decision: {decision.action.value}: {decision.reason}")
        if cfg.dry_run:
            would = {Action.DEPLOY: f"would deploy {pointer.path} ({self.choose_action(None, host)})",
                     Action.TRACK: f"would record {host.current} as deployed",
                     Action.RESUME: f"would record {host.current} as deployed",
                     Action.NOTHING: "would do nothing", Action.DIRTY: "would do nothing (dirty)"}
            print(f"decision: {decision.action.value}: {decision.reason}\n{would[decision.action]}")
            if state.rollout is not None:
                held = self.rollout_hold(pointer.path, rollout) if decision.action == Action.DEPLOY else None
                print(f"rollout: {describe_rollout(state.rollout, now_epoch())}"
                      + (f"\nwould wait: {held.state}" if held is not None else ""))
            return Outcome("up_to_date", "dry run")
        state.dirty = decision.dirty
        if decision.action in (Action.TRACK, Action.RESUME):
            self.record(host.current, staged_from=host.current, activation="switch", previous=host.profile)
            return Outcome("tracking", decision.reason)
        if decision.action == Action.DIRTY:
            return Outcome("dirty", decision.reason)
        if decision.action == Action.NOTHING:
            return self.settle(host)
        # Action.DEPLOY
        if suspension is not None:
            return Outcome("suspended", f"suspended by an operator ({suspension.get('reason') or 'no reason'}): "
                                        f"not deploying {pointer.path}")
        if state.quarantined == pointer.path and not cfg.force:
            return Outcome("quarantined", f"{pointer.path} is quarantined ({state.quarantine_reason}); "
                                          "waiting for a new upstream or --force")
        held = self.rollout_hold(pointer.path, rollout)
        if held is not None:
            return held
        if Stopping.requested:
            return Outcome(state.last_state or "up_to_date", f"stop requested: deploy of {pointer.path} postponed")
        return self.deploy(pointer.path, host)

    # -- rollout waves and the pause switch --------------------------------

    def rollout_step(self, pointer: Pointer) -> Rollout:
        """Validate the pointer's rollout fields (exit 4 when malformed) and
        record where this host stands in the wave."""
        rollout = parse_rollout(pointer.metadata)
        if any(key in pointer.metadata for key in ("rollout", "rollout-start", "rollout-duration", "pause")):
            hostname = self.cfg.hostname or local_hostname()
            self.state.rollout = rollout_view(rollout, hostname, pointer.path, now_epoch())
        else:
            self.state.rollout = None
        return rollout

    def rollout_hold(self, upstream: str, rollout: Rollout) -> Outcome | None:
        """Between the decision and the deploy: is it this host's turn?
        `--force` skips the wave (a human picked this host) but never a pause
        (the fleet-wide stop button; --force may sit in a host's extraArgs)."""
        view = self.state.rollout
        if view is None:
            return None
        where = describe_rollout(view, now_epoch())
        if rollout.paused:
            return Outcome("rollout_paused", f"not deploying {basename_or_empty(upstream)}: {where}")
        if view["admitted"]:
            return None
        if self.cfg.force:
            log(f"--force: deploying outside this host's wave ({where})")
            return None
        return Outcome("waiting_rollout", f"not deploying {basename_or_empty(upstream)} yet: {where}")

    # -- FleetLock reboot slots --------------------------------------------

    def take_reboot_slot(self) -> bool:
        """Before a reboot or kexec: a FleetLock slot, or no reboot this cycle."""
        cfg = self.cfg
        if cfg.fleetlock_url is None:
            return True
        group = cfg.fleetlock_group
        try:
            client_id = fleetlock_id(machine_id_path())
            # "May hold" from the moment we ask: the server can grant a slot
            # whose answer never reaches us; only steady-state clears this.
            slot = dict(self.state.reboot_slot or {})
            slot.update({"group": slot.get("group", group), "id": client_id, "granted": slot.get("granted", False),
                         "since": slot.get("since", time.time())})
            self.state.reboot_slot = slot
            self.save()
            fleetlock_request(cfg.fleetlock_url, "pre-reboot", client_id, slot["group"], cfg.timeout)
        except FleetLockError as exc:
            self.fleetlock_failed("pre-reboot", exc)
            self.slot_wait = str(exc)
            return False
        self.state.reboot_slot = dict(slot, granted=True)
        self.state.fleetlock_error = None
        self.save()
        log(f"took a reboot slot in FleetLock group {slot['group']!r}")
        return True

    def release_reboot_slot(self) -> None:
        """The host runs its deployed system, verified healthy: give back the
        slot we may hold (steady-state).  Once per boot also without a record,
        as the protocol's initialization step (the state may be older than a
        slot taken before a crash)."""
        cfg = self.cfg
        if cfg.fleetlock_url is None or cfg.dry_run:
            return
        if self.state.reboot_slot is None and os.path.exists(FLEETLOCK_STEADY_MARKER):
            return
        group = (self.state.reboot_slot or {}).get("group") or cfg.fleetlock_group
        try:
            client_id = fleetlock_id(machine_id_path())
            fleetlock_request(cfg.fleetlock_url, "steady-state", client_id, group, cfg.timeout)
        except FleetLockError as exc:
            self.fleetlock_failed("steady-state", exc)
            return  # tried again next cycle
        held = self.state.reboot_slot is not None
        self.state.reboot_slot = self.state.fleetlock_error = None
        self.save()
        os.makedirs(RUNTIME_DIR, exist_ok=True)
        atomic_write(FLEETLOCK_STEADY_MARKER, f"{group}\n")
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
        self.save()

    def reboot_slot_outcome(self, outcome: Outcome) -> Outcome:
        """After the cycle: a reboot that waits for a slot is its own state;
        a host that runs what it deployed, verified healthy, with nothing
        staged, releases the slot it may hold (whatever else the cycle
        decided: up to date, quarantined after a rollback, waiting for a wave)."""
        if self.slot_wait is not None and outcome.state == "pending_reboot":
            outcome.state = "waiting_reboot_slot"
            outcome.reason += f"; the reboot waits for a FleetLock slot ({self.slot_wait})"
        elif self.cfg.fleetlock_url is not None and outcome.error is None:
            state, host = self.state, read_host()
            if (host.current == state.deployed and state.verified and state.intent is None
                    and not os.path.exists(STAGED_MARKER)):
                self.release_reboot_slot()
        return outcome

    # -- fetching ----------------------------------------------------------

    def fetch_pointer(self) -> Pointer:
        cfg, state = self.cfg, self.state
        headers: dict[str, str] = {}
        if cfg.json_field:
            headers["Accept"] = "application/json"
        conditional = state.upstream is not None and (state.etag or state.last_modified)
        if conditional:
            if state.etag:
                headers["If-None-Match"] = state.etag
            if state.last_modified:
                headers["If-Modified-Since"] = state.last_modified
        resp = self.client.get(cfg.url, headers)
        if resp.status == 304 and conditional and state.upstream:
            debug("pointer not modified (304)")
            pointer = Pointer(state.upstream, dict(state.upstream_metadata), state.upstream_revision,
                              signed=self.signers is not None)
            if self.signers is not None:
                check_expiry(pointer)  # verified earlier; only its expiry can change
            return pointer
        if resp.status == 304:
            # We did not ask conditionally (or forgot the pointer): ask again plainly.
            resp = self.client.get(cfg.url, {k: v for k, v in headers.items() if not k.startswith("If-")})
        pointer = parse_pointer(resp.body, cfg.json_field)
        if self.signers is not None:
            pointer = self.verify(pointer, resp.body)
        state.upstream = pointer.path
        state.upstream_revision = pointer.revision
        state.upstream_metadata = pointer.metadata
        state.etag, state.last_modified = resp.etag, resp.last_modified
        return pointer

    def verify(self, pointer: Pointer, body: bytes) -> Pointer:
        import hashlib
        cfg, state = self.cfg, self.state
        sig_url = cfg.signature_url or cfg.url + ".sig"
        try:
            signature = self.client.get(sig_url).body
        except FetchError as exc:
            raise PointerError(f"pointer signature unavailable: {exc}", "signature") from None
        digest = hashlib.sha256(body + b"\0" + signature).hexdigest()
        if digest != state.verified_digest:
            assert self.signers is not None
            principal = verify_signature(body, signature, self.signers, cfg.state_dir)
            debug(f"pointer signed by {principal}")
        check_trust(pointer, state, cfg)
        state.verified_digest = digest
        if state.highest_revision is None or (pointer.revision or 0) > state.highest_revision:
            state.highest_revision, state.revision_path = pointer.revision, pointer.path
        elif state.revision_path is None:
            state.revision_path = pointer.path
        return dataclasses.replace(pointer, signed=True)

    # -- nothing to deploy: reboot pending, verification after reboot -----

    def settle(self, host: HostView) -> Outcome:
        state, cfg = self.state, self.cfg
        deployed = state.deployed
        assert deployed is not None
        if host.current == deployed:
            if not state.verified:
                log(f"running {deployed} for the first time after a reboot: checking its health")
                try:
                    self.health_checks()
                except DeployError as exc:
                    return self.rollback_after_boot(host, exc)
                state.verified = True
                self.save()
                return Outcome("deployed", f"{basename_or_empty(deployed)} is healthy after the reboot",
                               old_system=state.staged_from, new_system=deployed, deployed=True)
            return Outcome("up_to_date", "up to date")
        # Staged for boot, not running yet.
        if not os.path.exists(STAGED_MARKER):
            return Outcome("booted_previous",
                           f"the host rebooted but runs {basename_or_empty(host.current)}, not the staged "
                           f"{basename_or_empty(deployed)} (boot loader fallback or manual choice)")
        if cfg.reboot_mode is not None:
            self.reboot(deployed)
        return Outcome("pending_reboot", f"{basename_or_empty(deployed)} is staged for the next boot")

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
        state = self.state
        log(f"realising {upstream} from the binary cache")
        try:
            nix_realise(upstream)
        except ProcessError as exc:
            raise DeployError(f"cannot realise {upstream}: {exc}", "realise") from None
        try:
            check_nixos_system(upstream, host.current)
        except DeployError as exc:
            self.quarantine(upstream, str(exc))
            raise
        action = self.choose_action(upstream, host)
        previous_profile, previous_current = host.profile, host.current
        self.set_intent("profile", upstream=upstream, action=action, previous_profile=previous_profile,
                        previous_current=previous_current, started=time.time(), activated=False)
        log(f"setting the system profile to {upstream}")
        try:
            nix_set_profile(upstream)
        except ProcessError as exc:
            self.rollback(f"setting the profile failed: {exc}")
            raise DeployError(f"cannot set the system profile: {exc}", "activation") from None
        self.set_intent("activate", activated=True)
        log(f"activating {upstream}: switch-to-configuration {action}")
        try:
            switch_to_configuration(upstream, action)
        except ProcessError as exc:
            return self.fail_and_roll_back(upstream, f"activation failed: {exc}", "activation")
        if action == "switch":
            self.set_intent("check")
            try:
                self.health_checks()
            except DeployError as exc:
                return self.fail_and_roll_back(upstream, str(exc), "health")
        return self.finish_deploy(upstream, action, previous_current, previous_profile)

    def finish_deploy(self, upstream: str, action: str, previous_current: str | None,
                      previous_profile: str | None) -> Outcome:
        state = self.state
        self.state.interrupted.pop(upstream, None)
        mark_staged(upstream if action == "boot" else None)
        state.deploys_total += 1
        # Record and clear the intent in one atomic write.
        self.record(upstream, staged_from=previous_current, activation=action, previous=previous_profile,
                    verified=(action == "switch"))
        log(f"deployed {upstream} ({action})")
        if action == "boot":
            if self.cfg.reboot_mode is not None:
                self.reboot(upstream)
            return Outcome("pending_reboot", f"{basename_or_empty(upstream)} is staged for the next boot",
                           previous_current, upstream, deployed=True)
        return Outcome("deployed", f"switched to {basename_or_empty(upstream)}", previous_current, upstream,
                       deployed=True)

    def record(self, system: str | None, *, staged_from: str | None, activation: str,
               previous: str | None, verified: bool = True) -> None:
        state = self.state
        state.deployed, state.staged_from, state.activation = system, staged_from, activation
        state.previous, state.verified, state.deployed_at = previous, verified, time.time()
        state.intent = None
        self.save()

    def quarantine(self, path: str, reason: str) -> None:
        self.state.quarantined, self.state.quarantine_reason = path, reason
        self.save()
        log(f"quarantined {path}: it will not be tried again until upstream changes or --force")

    def fail_and_roll_back(self, upstream: str, why: str, kind: str) -> NoReturn:
        log(f"DEPLOY FAILED: {why}")
        self.rollback(why)
        self.quarantine(upstream, why)
        raise DeployError(f"deploy of {upstream} failed and was rolled back: {why}", kind)

    def rollback(self, why: str, count: bool = True) -> None:
        """Put profile and current system back to where the intent says we started.
        Activation is re-run only when ours had started (it may have changed
        the running system or the boot loader)."""
        intent = self.state.intent or {}
        prev_profile, prev_current = intent.get("previous_profile"), intent.get("previous_current")
        action = intent.get("action", "switch")
        self.set_intent("rollback", reason=why)
        log(f"ROLLING BACK to {prev_current} (profile {prev_profile}): {why}")
        try:
            host = read_host()
            if prev_profile and host.profile != prev_profile:
                nix_set_profile(prev_profile)
            if intent.get("activated", True):  # unknown: assume it had started
                if action == "switch" and prev_current:
                    switch_to_configuration(prev_current, "switch")
                elif prev_profile:
                    switch_to_configuration(prev_profile, "boot")
        except ProcessError as exc:
            raise RollbackError(f"ROLLBACK FAILED ({exc}); the host needs a human: profile and current "
                                f"system may disagree") from None
        host = read_host()
        if host.profile != prev_profile or (action == "switch" and host.current != prev_current):
            raise RollbackError(f"ROLLBACK INCOMPLETE: profile={host.profile} current={host.current}, "
                                f"expected profile={prev_profile} current={prev_current}")
        self.state.intent = None
        self.state.rollbacks_total += int(count)
        self.save()
        log(f"rolled back: current={host.current} profile={host.profile}")

    def rollback_after_boot(self, host: HostView, exc: DeployError) -> Outcome:
        """The staged system booted and is unhealthy: profile back to the
        previous system, quarantine, and reboot into it when allowed."""
        state = self.state
        bad = state.deployed
        assert bad is not None
        previous = state.previous
        log(f"DEPLOY FAILED after reboot: {exc}")
        self.state.intent = {"phase": "rollback", "upstream": bad, "action": "boot",
                             "previous_profile": previous, "previous_current": previous}
        self.save()
        try:
            if previous and host.profile != previous:
                nix_set_profile(previous)
            if previous:
                switch_to_configuration(previous, "boot")
        except ProcessError as err:
            raise RollbackError(f"ROLLBACK FAILED ({err}); the host needs a human") from None
        state.rollbacks_total += 1
        self.quarantine(bad, str(exc))
        # The previous system is now what we deployed, staged for the next boot.
        mark_staged(previous or "")
        self.record(previous, staged_from=bad, activation="boot", previous=bad, verified=True)
        if self.cfg.reboot_mode is not None and previous:
            self.reboot(previous)
        raise DeployError(f"{bad} failed its health checks after the reboot; profile rolled back to "
                          f"{previous}: {exc}", "health")

    # -- health checks -----------------------------------------------------

    def health_checks(self) -> None:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.health_timeout
        if cfg.connectivity_check:
            probe = HttpClient(min(cfg.timeout, cfg.health_timeout), self.client.token)
            try:
                probe.get(cfg.url)
            except FetchError as exc:
                raise DeployError(f"connectivity check failed: {exc}", "health") from None
            finally:
                probe.close()
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
            if result.returncode != 0:
                raise DeployError(f"health check {command!r} exited with {result.returncode}", "health")

    # -- crash recovery ----------------------------------------------------

    def recover(self) -> None:
        """A previous cycle was interrupted: finish it or roll it back."""
        intent = self.state.intent or {}
        phase, upstream = intent.get("phase"), intent.get("upstream")
        log(f"found an interrupted deploy of {upstream} (phase {phase}): converging")
        if phase in ("activate", "check", "rollback"):
            waited = 0.0
            while activation_unit_active() and waited < ACTIVATION_WAIT_SECONDS:
                if waited == 0:
                    log(f"{ACTIVATION_UNIT}.service is still running: waiting for it")
                time.sleep(1)
                waited += 1
            if waited >= ACTIVATION_WAIT_SECONDS:
                raise DeployError(f"{ACTIVATION_UNIT}.service still running after {waited:.0f}s", "activation")
        host = read_host()
        action = intent.get("action", "switch")
        if phase == "profile":
            intent["activated"] = False
            self.state.intent = intent
            # Nothing was activated: restoring the profile is not a rollback of a running system.
            self.rollback("interrupted before activation", count=False)
            return
        if phase in ("activate", "check") and action == "switch" and host.current == upstream:
            try:
                self.health_checks()
            except DeployError as exc:
                self.fail_and_roll_back(upstream, str(exc), "health")
            log(f"the interrupted deploy of {upstream} is active and healthy: recording it")
            self.finish_deploy(upstream, action, intent.get("previous_current"), intent.get("previous_profile"))
            return
        count = self.state.interrupted.get(upstream or "", 0) + 1
        self.state.interrupted[upstream or ""] = count
        self.rollback(f"interrupted during phase {phase}")
        if count >= 2 and upstream:
            self.quarantine(upstream, f"interrupted {count} times during activation")

    # -- rebooting ---------------------------------------------------------

    def reboot(self, system: str) -> None:
        cfg = self.cfg
        window = cfg.reboot_window
        if window is not None and not in_window(window, now_local()):
            log(f"reboot into {system} is due but outside the reboot window "
                f"{format_window(window)}: deferred")
            return
        if Stopping.requested:
            log("stop requested: not rebooting now")
            return
        if not self.take_reboot_slot():
            log(f"reboot into {system} is due but no FleetLock slot was granted: retried next cycle")
            return
        if cfg.reboot_mode == RebootMode.KEXEC:
            try:
                kexec_load(system)
                log(f"kexec into {system}")
                systemctl("kexec")
                return
            except (ProcessError, OSError) as exc:
                log(f"kexec load failed ({exc}): falling back to a normal reboot")
        log(f"rebooting into {system}")
        try:
            systemctl("reboot")
        except ProcessError as exc:
            log(f"reboot request failed: {exc}")

    # -- reporting ---------------------------------------------------------

    def _finish(self, outcome: Outcome, started: float) -> None:
        cfg, state = self.cfg, self.state
        if cfg.dry_run:
            return
        host = read_host()
        ended = time.time()
        failed = outcome.error is not None
        state.last_run, state.last_run_duration = ended, ended - started
        state.last_run_success = not failed
        state.last_state, state.last_reason = outcome.state, outcome.reason
        if failed:
            assert outcome.error is not None
            state.last_error = {"kind": outcome.error.kind, "message": str(outcome.error)}
            log(f"error: {outcome.error}")
        else:
            state.last_success, state.last_error = ended, None
            log(f"state: {outcome.state}: {outcome.reason}")
        state.reboot_required, state.reboot_reason = reboot_status(state, host)
        suspended = self.store.suspension() is not None
        try:
            self.store.save(state)
        except OSError as exc:
            log(f"cannot write state: {exc}")
        if cfg.prometheus_path:
            try:
                write_metrics(cfg.prometheus_path, state, host, suspended)
            except OSError as exc:
                log(f"cannot write metrics to {cfg.prometheus_path}: {exc}")
        self.run_hook(outcome)

    def run_hook(self, outcome: Outcome) -> None:
        cfg = self.cfg
        command = cfg.on_failure if outcome.error else (cfg.on_success if outcome.deployed else None)
        if not command:
            return
        env = dict(os.environ)
        env.update({
            "NIXOS_AUTODEPLOY_OUTCOME": outcome.state,
            "NIXOS_AUTODEPLOY_SUCCESS": "0" if outcome.error else "1",
            "NIXOS_AUTODEPLOY_OLD_SYSTEM": outcome.old_system or "",
            "NIXOS_AUTODEPLOY_NEW_SYSTEM": outcome.new_system or self.state.upstream or "",
            "NIXOS_AUTODEPLOY_ERROR": str(outcome.error) if outcome.error else "",
            "NIXOS_AUTODEPLOY_ERROR_KIND": outcome.error.kind if outcome.error else "",
            "NIXOS_AUTODEPLOY_EXIT_CODE": str(outcome.error.exit_code if outcome.error else 0),
            "NIXOS_AUTODEPLOY_URL": redact_url(cfg.url),
        })
        which = "on-failure" if outcome.error else "on-success"
        try:
            result = shell(command, timeout=cfg.hook_timeout, env=env)
            if result.returncode != 0:
                log(f"{which} hook exited with {result.returncode} (ignored)")
        except ProcessError as exc:
            log(f"{which} hook failed: {exc} (ignored)")


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise UsageError(f"cannot read --token-file {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        log(f"warning: token file {path} is readable by group or others (mode {st.st_mode & 0o777:o})")
    if not token or any(c in token for c in "\r\n"):
        raise UsageError(f"--token-file {path} holds no single-line token")
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
    if text.isdigit():
        return float(text)
    if not text or not re.fullmatch(r"(?:\d{1,9}[smhdw])+", text):
        raise ValueError(f"not a duration: {text!r}")
    return float(sum(int(n) * DURATION_UNITS[u] for n, u in re.findall(r"(\d+)([smhdw])", text)))


def parse_rollout(metadata: dict[str, str]) -> Rollout:
    """The rollout fields of a pointer, validated; PointerError (exit 4) otherwise."""
    import re
    percent, start, duration, paused = 100.0, None, None, False
    if "rollout" in metadata:
        text = metadata["rollout"]
        if not re.fullmatch(r"\d{1,3}(?:\.\d{1,2})?%?", text) or float(text.rstrip("%")) > 100:
            raise PointerError(f"pointer rollout is not a percentage between 0% and 100% "
                               f"(e.g. `rollout: 10%`): got {shorten(text)}")
        percent = float(text.rstrip("%"))
    if ("rollout-start" in metadata) != ("rollout-duration" in metadata):
        raise PointerError("pointer has only one of rollout-start and rollout-duration: a ramp needs both")
    if "rollout-start" in metadata:
        text = metadata["rollout-start"]
        try:
            start = parse_rfc3339(text).timestamp()
        except ValueError:
            raise PointerError(f"pointer rollout-start is not an RFC 3339 time: got {shorten(text)}") from None
        text = metadata["rollout-duration"]
        try:
            duration = parse_duration(text)
        except ValueError:
            raise PointerError(f"pointer rollout-duration is not a duration such as 24h or 90m: "
                               f"got {shorten(text)}") from None
        if not 0 < duration <= 366 * 86400:
            raise PointerError(f"pointer rollout-duration must be above 0 and at most 366d: got {shorten(text)}")
    if "pause" in metadata:
        text = metadata["pause"].lower()
        if text not in ("true", "hold", "false"):
            raise PointerError(f"pointer pause is not true, hold or false: got {shorten(metadata['pause'])}")
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


def printable(text: str, limit: int = 200) -> str:
    """Server text made safe for logs and metric labels."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def fleetlock_request(base_url: str, operation: str, client_id: str, group: str, timeout: float) -> None:
    """One FleetLock operation (`pre-reboot` or `steady-state`); returns on
    HTTP 200, raises FleetLockError with the server's error kind otherwise."""
    import http.client
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        # A redirected lock request is a failure: the protocol header exists
        # so that no lock is taken by accident through a redirect.
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    url = base_url.rstrip("/") + "/v1/" + operation
    shown = redact_url(url)
    body = json.dumps({"client_params": {"id": client_id, "group": group}}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "fleet-lock-protocol": "true", "Content-Type": "application/json", "User-Agent": USER_AGENT})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())
    try:
        try:
            with opener.open(request, timeout=timeout) as response:
                status, reply = response.status, response.read(MAX_FLEETLOCK_REPLY_BYTES)
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                reply = exc.read(MAX_FLEETLOCK_REPLY_BYTES)
            finally:
                exc.close()
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise FleetLockError(f"FleetLock {operation} at {shown}: "
                             f"{describe_network_error(reason) if isinstance(reason, BaseException) else reason}",
                             "unreachable") from None
    if status == 200:
        return
    kind, value = f"http_{status}", ""
    try:
        error = json.loads(reply.decode("utf-8"))
        if isinstance(error, dict) and isinstance(error.get("kind"), str) and isinstance(error.get("value"), str):
            import re
            # The spec asks servers for few kinds; a label must stay bounded anyway.
            if re.fullmatch(r"[a-z0-9_]{1,40}", error["kind"]):
                kind = error["kind"]
            value = printable(error["value"])
    except (UnicodeDecodeError, ValueError):
        pass
    raise FleetLockError(f"FleetLock {operation} at {shown} answered HTTP {status}"
                         + (f" ({kind}): {value}" if value else ""), kind)


# ---------------------------------------------------------------------------
# Commands: run, status, suspend/resume, sign
# ---------------------------------------------------------------------------


def command_run(cfg: Config) -> int:
    from urllib.parse import urlsplit
    if cfg.token_file and urlsplit(cfg.url).username is not None:
        raise UsageError("give credentials either in the URL or with --token-file, not both")
    if cfg.json_field and cfg.trusted_keys:
        raise UsageError("--json-field cannot be combined with --trusted-keys: signed pointers are plain text "
                         "with a `revision:` line")
    agent = Agent(cfg)
    if cfg.url.startswith("http://") and cfg.trusted_keys is None:
        log("warning: the pointer is fetched over plain http:// without --trusted-keys: anyone on the "
            "network path can point this host at another (validly signed) system")
    store = agent.store
    lock_fd = store.lock() if not cfg.dry_run else None
    Stopping.install()
    try:
        if cfg.once or cfg.dry_run:
            outcome = agent.cycle()
            return outcome.error.exit_code if outcome.error else 0
        import random
        while not Stopping.requested:
            agent.cycle()
            delay = cfg.interval * random.uniform(0.9, 1.1)
            end = time.monotonic() + delay
            while not Stopping.requested and time.monotonic() < end:
                time.sleep(min(1.0, end - time.monotonic()))
        log("stopped")
        return 0
    finally:
        agent.client.close()
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
        "current": host.current, "booted": host.booted, "profile": host.profile,
        "deployed": state.deployed, "upstream": state.upstream, "upstream_revision": state.upstream_revision,
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
        "rollout": state.rollout,
        "reboot_slot": state.reboot_slot, "fleetlock_error": state.fleetlock_error,
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
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


def command_sign(key: str, revision: int, hosts: list[str], not_after: str | None, path: str, output: str,
                 rollout: dict[str, str] | None = None) -> int:
    validate_store_path(path, path)
    lines = [path, f"revision: {revision}"]
    if hosts:
        lines.append("hosts: " + " ".join(hosts))
    if not_after:
        try:
            parse_rfc3339(not_after)
        except ValueError:
            raise UsageError(f"--not-after {not_after!r} is not an RFC 3339 time") from None
        lines.append(f"not-after: {not_after}")
    lines += sign_rollout_lines(rollout or {})
    with open(output, "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        os.unlink(output + ".sig")
    except FileNotFoundError:
        pass
    result = ssh_keygen(["-Y", "sign", "-f", key, "-n", SIGNATURE_NAMESPACE, output])
    if result.returncode != 0:
        raise AutodeployError(f"ssh-keygen -Y sign failed: {result.stdout.strip()}")
    log(f"wrote {output} and {output}.sig (revision {revision})")
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
# CLI
# ---------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="autodeploy.py", description="Pull-based deployment agent for NixOS hosts.",
                    epilog="Commands: run (default), status, suspend, resume, sign. "
                           "See `autodeploy.py COMMAND --help`.")
    parser.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)

    run_p = sub.add_parser("run", help="deploy what the pointer URL names (the default command)")
    run_p.add_argument("--url", required=True, help="URL of the pointer (one store path, optional key: value lines)")
    run_p.add_argument("--once", action="store_true", help="run one cycle and exit (as the systemd timer does)")
    run_p.add_argument("--switch-mode", type=SwitchMode, choices=list(SwitchMode), default=SwitchMode.SWITCH,
                       metavar="{switch,boot,smart}",
                       help="switch now, stage for the next boot, or smart: boot only when kernel, initrd or "
                            "modules change (default: switch)")
    run_p.add_argument("--reboot-mode", type=RebootMode, choices=list(RebootMode), default=None,
                       metavar="{reboot,kexec}", help="reboot (or kexec) after a boot-mode deploy (default: never)")
    run_p.add_argument("--prometheus-path", metavar="FILE", help="write Prometheus metrics to FILE (textfile collector)")
    run_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                       help=f"where the agent keeps its record (default: {DEFAULT_STATE_DIR})")
    run_p.add_argument("--force", action="store_true",
                       help="deploy upstream even when the host was deployed by hand or upstream is quarantined")
    run_p.add_argument("--dry-run", action="store_true", help="print the decision and what would be done; change nothing")
    run_p.add_argument("--timeout", type=positive, default=30.0, metavar="SECONDS", help="HTTP timeout (default: 30)")
    run_p.add_argument("--interval", type=positive, default=300.0, metavar="SECONDS",
                       help="loop mode: seconds between cycles, with +-10%% jitter (default: 300)")
    run_p.add_argument("-v", "--verbose", action="store_true", help="log every command and show tracebacks")
    run_p.add_argument("--health-check", action="append", default=[], metavar="CMD",
                       help="after activation run CMD via /bin/sh -c; non-zero rolls back (repeatable)")
    run_p.add_argument("--health-timeout", type=positive, default=120.0, metavar="SECONDS",
                       help="time allowed for all health checks together (default: 120)")
    run_p.add_argument("--no-connectivity-check", action="store_true",
                       help="do not require that the pointer URL is still reachable after activation")
    run_p.add_argument("--reboot-window", type=parse_window, metavar="HH:MM-HH:MM",
                       help="reboot only inside this local-time window (may wrap midnight; default: any time)")
    run_p.add_argument("--trusted-keys", metavar="FILE",
                       help="require pointers signed by one of these keys (allowed-signers file or public keys)")
    run_p.add_argument("--signature-url", metavar="URL", help="where the signature is (default: URL.sig)")
    run_p.add_argument("--hostname", metavar="NAME", help="this host's name for `hosts:` (default: the machine's)")
    run_p.add_argument("--token-file", metavar="FILE", help="send `Authorization: Bearer <token>` read from FILE")
    run_p.add_argument("--json-field", metavar="PATH",
                       help="the pointer is JSON; take the store path from this dotted field "
                            "(Hydra: buildoutputs.out.path)")
    run_p.add_argument("--on-success", metavar="CMD", help="run CMD via /bin/sh -c after a deploy")
    run_p.add_argument("--on-failure", metavar="CMD", help="run CMD via /bin/sh -c after a failed run")
    run_p.add_argument("--hook-timeout", type=positive, default=60.0, metavar="SECONDS",
                       help="time allowed for a hook (default: 60)")
    # Fleet rollouts: coordinated reboots.
    run_p.add_argument("--fleetlock-url", type=validate_fleetlock_url, metavar="URL",
                       help="take a FleetLock reboot slot (Zincati's protocol, e.g. airlock) at this base URL "
                            "before every reboot or kexec, release it once healthy (default: no coordination)")
    run_p.add_argument("--fleetlock-group", type=validate_fleetlock_group, default=FLEETLOCK_DEFAULT_GROUP,
                       metavar="NAME", help=f"FleetLock reboot group (default: {FLEETLOCK_DEFAULT_GROUP})")

    status_p = sub.add_parser("status", help="what the host runs and what the agent knows (no network)")
    status_p.add_argument("--json", action="store_true", help="machine-readable output")
    status_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR)

    suspend_p = sub.add_parser("suspend", help="stop deploying on this host until `resume`")
    suspend_p.add_argument("--reason", default="", help="shown by status and in the logs")
    suspend_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR)

    resume_p = sub.add_parser("resume", help="deploy again after `suspend`")
    resume_p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR)

    sign_p = sub.add_parser("sign", help="write a signed pointer (for CI)")
    sign_p.add_argument("--key", required=True, help="OpenSSH private key")
    sign_p.add_argument("--revision", required=True, type=int, help="monotonic revision number")
    sign_p.add_argument("--hosts", nargs="+", default=[], metavar="HOST", help="hosts allowed to deploy it")
    sign_p.add_argument("--not-after", metavar="TIME", help="RFC 3339 expiry time")
    sign_p.add_argument("-o", "--output", required=True, metavar="FILE", help="pointer file (FILE.sig is written too)")
    # Fleet rollouts: waves and the pause switch.
    sign_p.add_argument("--rollout", metavar="PERCENT", help="only hosts in the first PERCENT of buckets deploy "
                        "(the start of the ramp with --rollout-start)")
    sign_p.add_argument("--rollout-start", metavar="TIME", help="RFC 3339 time the ramp to 100%% starts")
    sign_p.add_argument("--rollout-duration", metavar="DURATION", help="ramp length, e.g. 24h, 90m, 1d12h")
    sign_p.add_argument("--pause", action="store_true", help="write `pause: true`: no host starts this deploy")
    sign_p.add_argument("store_path", metavar="STOREPATH", nargs="?")
    return parser


COMMANDS: Final = ("run", "status", "suspend", "resume", "sign")


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
    )


def main(argv: list[str] | None = None) -> int:
    global _verbose
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "run")
    _verbose = "-v" in argv or "--verbose" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command in (None, "run") and not hasattr(args, "url"):
            raise UsageError("autodeploy.py: the following arguments are required: --url")
        if args.command == "status":
            return command_status(args.state_dir, args.json)
        if args.command == "suspend":
            StateStore(args.state_dir).suspend(args.reason)
            log(f"suspended: {args.reason or 'no reason given'}")
            return 0
        if args.command == "resume":
            was = StateStore(args.state_dir).resume()
            log("resumed" if was else "was not suspended")
            return 0
        if args.command == "sign":
            # `--hosts H [H ...] STOREPATH`: the greedy --hosts took the store path.
            if args.store_path is None and args.hosts and args.hosts[-1].startswith(STORE_DIR + "/"):
                args.store_path = args.hosts.pop()
            if args.store_path is None:
                raise UsageError("autodeploy.py sign: the following arguments are required: STOREPATH")
            return command_sign(args.key, args.revision, args.hosts, args.not_after, args.store_path, args.output,
                                rollout=sign_rollout_metadata(args))
        return command_run(config_from_args(args))
    except AutodeployError as exc:
        log(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001
        if _verbose:
            raise
        log(f"internal error: {type(exc).__name__}: {exc} (run with --verbose for a traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
