"""The test world: real nix, a signed binary cache on 127.0.0.1, isolated hosts.

One harness for the tests, the demo and the benchmark:

- ``build_world(dir)`` builds stand-in NixOS toplevels (tests/standin/) with
  the real ``nix-build`` in a private mount namespace whose /nix is a
  directory of ours, and copies them into a signed ``file://`` binary cache.
- ``PointerServer`` serves that cache and the pointers over HTTP on 127.0.0.1.
- ``Host`` is an isolated "NixOS host": every command runs in ``unshare -m``
  with per-host directories bind-mounted over /nix, /run and /var/lib, so the
  agent runs with its real default paths and an initially empty store that it
  fills by substitution from the cache.  Stand-ins for systemctl,
  systemd-run, kexec (and a nix-env wrapper) are first on PATH.

Nothing outside the given directories changes; the machine needs root and
``unshare``.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# AUTODEPLOY_AGENT runs the tests against another agent (e.g. an older version, to show a test fails there).
AGENT = Path(os.environ.get("AUTODEPLOY_AGENT") or REPO / "autodeploy.py")
STANDIN = HERE / "standin"
STANDIN_BIN = STANDIN / "bin"
METRICS = "/var/lib/prometheus-node-exporter-text/nixos-autodeploy.prom"
# Absolute, so a test may give the agent any PATH.
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
MOUNT = shutil.which("mount") or "/usr/bin/mount"

# What the world builds: name -> arguments of tests/standin/systems.nix.
SYSTEMS: dict[str, dict[str, object]] = {
    "a": {},
    "b": {},
    "c": {},
    "d": {},
    "k": {"kernelVersion": "6.6"},          # another kernel than a/b/c/d
    "notsystem": {"isSystem": False},       # a valid store path, not a system
    "foreign": {"platform": "aarch64-linux"},
    "missing": {},                          # built, never copied to the cache
}


def missing_prerequisites() -> str | None:
    """Why the real-nix tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces and bind mounts over /nix, /run, /var/lib)"
    for tool in ("unshare", "nix-build", "nix-store", "nix-env", "nix"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH (Debian: apt-get install nix-bin util-linux)"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"needs `unshare -m` to work: {probe.stderr.decode().strip()}"
    return None


def base_nix_config(extra: str = "") -> str:
    return "\n".join([
        "sandbox = false",
        "build-users-group =",
        "experimental-features = nix-command",
        "substituters =",
        "fsync-metadata = false",
        extra,
    ])


def bind_script(binds: dict[str, Path]) -> str:
    # --rbind: a file system a test mounted below a host directory (a small
    # tmpfs for a full disk) comes along.
    return " && ".join(f'{MOUNT} --rbind "{src}" {dst}' for dst, src in binds.items())


def in_namespace(binds: dict[str, Path], argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    script = bind_script(binds)
    cmd = [UNSHARE, "-m", "--propagation", "private", "/bin/sh", "-c", script + ' && exec "$@"', "sh", *argv]
    return subprocess.run(cmd, **kwargs)


# ---------------------------------------------------------------------------
# Building the world
# ---------------------------------------------------------------------------


@dataclass
class World:
    root: Path
    cache: Path
    public_key: str
    secret_key: Path
    paths: dict[str, str]
    drv: str

    def path(self, name: str) -> str:
        return self.paths[name]


def build_world(root: Path, systems: dict[str, dict[str, object]] | None = None) -> World:
    """Build the stand-in systems and a signed binary cache under ``root``."""
    systems = SYSTEMS if systems is None else systems
    root.mkdir(parents=True, exist_ok=True)
    store = root / "build-nix"
    cache = root / "cache"
    store.mkdir(exist_ok=True)
    cache.mkdir(exist_ok=True)
    sk, pk = root / "cache.sk", root / "cache.pk"
    if not sk.exists():
        subprocess.run(["nix-store", "--generate-binary-cache-key", "autodeploy-test-cache-1", sk, pk],
                       check=True, capture_output=True)
    env = dict(os.environ, NIX_CONFIG=base_nix_config())
    script = ["set -e"]
    for name, args in systems.items():
        argstr = " ".join(
            f"--arg {k} {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
            if not isinstance(v, str) else f"--argstr {k} {v}" for k, v in args.items())
        script.append(f"p=$(nix-build --no-out-link {STANDIN}/systems.nix --argstr name {name} {argstr})")
        script.append(f'echo "{name} $p" >> {root}/paths.txt')
        if name != "missing":
            script.append(f"nix copy --to 'file://{cache}?secret-key={sk}&compression=none' $p")
    script.append(f"nix-instantiate --no-gc-warning {STANDIN}/systems.nix --argstr name drvonly > {root}/drv.txt")
    (root / "paths.txt").unlink(missing_ok=True)
    result = in_namespace({"/nix": store}, ["/bin/sh", "-c", "\n".join(script)],
                          env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the test world failed:\n{result.stdout}\n{result.stderr}")
    paths = dict(line.split(" ", 1) for line in (root / "paths.txt").read_text().splitlines())
    drv = (root / "drv.txt").read_text().strip()
    return World(root, cache, pk.read_text().strip(), sk, paths, drv)


# ---------------------------------------------------------------------------
# HTTP: the binary cache and the pointers on 127.0.0.1
# ---------------------------------------------------------------------------


def serve_in_thread(handler: type) -> tuple[http.server.ThreadingHTTPServer, int]:
    """An HTTP server on 127.0.0.1 (a free port), serving in a daemon thread."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    etag: bool = False
    content_type: str = "text/plain"
    hook: Callable[[dict[str, str]], None] | None = None


class PointerServer:
    """Serves ``/cache/...`` from the binary cache directory and pointers set
    by the test at any other path.  Records every request."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.routes: dict[str, Route] = {}
        self.requests: list[dict[str, object]] = []
        self.unreachable = False
        self.cache_delay = 0.0
        self.bytes_sent = 0  # pointer body bytes (not the cache)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without TCP_NODELAY each
            # response would wait for the client's delayed ACK (about 40 ms).
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append({"path": self.path, "headers": dict(self.headers.items()),
                                        "time": time.time(), "client": self.client_address})
                if server.unreachable and not self.path.startswith("/cache/"):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.startswith("/cache/"):
                    return self.serve_file(server.cache / self.path[len("/cache/"):])
                route = server.routes.get(self.path)
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"not found")
                    return
                if route.hook:
                    route.hook(dict(self.headers.items()))
                if route.delay:
                    time.sleep(route.delay)
                etag = f'"{hash(route.body) & 0xffffffff:x}"'
                if route.etag and self.headers.get("If-None-Match") == etag:
                    server.requests[-1]["status"] = 304
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                server.requests[-1]["status"] = route.status
                server.bytes_sent += len(route.body)
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(route.body)))
                if route.etag:
                    self.send_header("ETag", etag)
                for k, v in route.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(route.body)

            def serve_file(self, path: Path) -> None:
                if server.cache_delay:
                    time.sleep(server.cache_delay)
                try:
                    data = path.resolve().read_bytes()
                    if not str(path.resolve()).startswith(str(server.cache.resolve())):
                        raise FileNotFoundError
                except (FileNotFoundError, IsADirectoryError):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd, self.port = serve_in_thread(Handler)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cache_url(self) -> str:
        return f"{self.base}/cache"

    def set(self, path: str, body: bytes | str, **kwargs: object) -> str:
        data = body.encode() if isinstance(body, str) else body
        self.routes[path] = Route(data, **kwargs)  # type: ignore[arg-type]
        return self.base + path

    def pointer(self, store_path: str, path: str = "/pointer", **kwargs: object) -> str:
        return self.set(path, store_path + "\n", **kwargs)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------
# An isolated host
# ---------------------------------------------------------------------------


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str


class Host:
    """A NixOS host stand-in: its own /nix (store + profiles), /run and /var/lib."""

    def __init__(self, root: Path, world: World, server: PointerServer,
                 python: str = sys.executable) -> None:
        self.root, self.world, self.server, self.python = root, world, server, python
        self.nix, self.run_dir, self.var_lib = root / "nix", root / "run", root / "var-lib"
        for d in (self.nix, self.run_dir, self.var_lib):
            d.mkdir(parents=True, exist_ok=True)
        # The kernel's boot ID as this host sees it (bound over
        # /proc/sys/kernel/random/boot_id): reboot() gives it a new one.
        self.boot_id_file = root / "boot_id"
        self.boot_id_file.write_text(str(uuid.uuid4()) + "\n")
        self.boot_mount: Path | None = None  # a tmpfs at /boot, see mount_boot()
        self.boot_binds: dict[str, Path] = {}  # where mount_boot() put it: /boot, and /efi for an ESP there
        self.created_efi = False  # mount_boot(at="/efi") created the machine's (empty) /efi mount point
        self.env = {
            "PATH": f"{STANDIN_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "NIX_CONFIG": base_nix_config(
                f"substituters = {server.cache_url}\n"
                f"trusted-public-keys = {world.public_key}\n"
                "connect-timeout = 5\nstalled-download-timeout = 10\n"),
            "HOME": str(root),
            "LANG": "C.UTF-8",
            "TZ": "UTC",
            # How this host's kernel was started (x86 boot parameters): not
            # the test machine's own; a test writes one to model a kexec.
            "NIXOS_AUTODEPLOY_BOOT_PARAMS": str(root / "boot_params"),
        }

    # -- running things inside the host -----------------------------------

    @property
    def binds(self) -> dict[str, Path]:
        binds = {"/nix": self.nix, "/run": self.run_dir, "/var/lib": self.var_lib,
                 "/proc/sys/kernel/random/boot_id": self.boot_id_file}
        binds.update(self.boot_binds)
        return binds

    def mount_boot(self, size: int, layout: str = "systemd-boot", at: str = "/boot") -> Path:
        """A separate boot file system for this host: a tmpfs of `size` bytes,
        laid out like systemd-boot's (EFI/nixos, loader/entries) or GRUB's
        (grub, kernels), mounted where NixOS users put the ESP
        (boot.loader.efi.efiSysMountPoint): at /boot, at /boot/efi (with
        /boot a plain directory of the root file system around it) or at /efi
        (with an empty /boot).  unmount_boot() removes it."""
        assert at in ("/boot", "/boot/efi", "/efi"), at
        mnt = self.root / ("boot" if at == "/boot" else "esp")
        mnt.mkdir(exist_ok=True)
        plain_boot = self.root / "boot-dir"
        if at == "/boot/efi":
            (plain_boot / "efi").mkdir(parents=True, exist_ok=True)
            mnt = plain_boot / "efi"
        elif at == "/efi":
            plain_boot.mkdir(exist_ok=True)
            if not os.path.isdir("/efi"):
                # An empty mount point on the machine; only this host's
                # namespace ever mounts anything on it. Removed again.
                os.mkdir("/efi", 0o755)
                self.created_efi = True
        subprocess.run([MOUNT, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)], check=True)
        self.boot_mount = mnt
        self.boot_binds = ({"/boot": mnt} if at == "/boot" else {"/boot": plain_boot} if at == "/boot/efi"
                           else {"/boot": plain_boot, "/efi": mnt})
        dirs = ["EFI/nixos", "loader/entries"] if layout == "systemd-boot" else ["grub", "kernels"]
        for d in dirs:
            (mnt / d).mkdir(parents=True, exist_ok=True)
        self.ctl("boot-copies").write_text("")  # the stand-in installer copies kernels now
        self.ctl("boot-dir").write_text(at + "\n")  # ... into this $BOOT
        return mnt

    def unmount_boot(self) -> None:
        if self.boot_mount is not None:
            subprocess.run(["umount", "-l", str(self.boot_mount)], check=False)
            self.boot_mount = None
        self.boot_binds = {}
        if self.created_efi:
            try:
                os.rmdir("/efi")
            except OSError:
                pass
            self.created_efi = False

    def sh(self, script: str, check: bool = True) -> RunResult:
        r = in_namespace(self.binds, ["/bin/sh", "-c", script], env=self.env, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"host command failed ({r.returncode}): {script}\n{r.stdout}\n{r.stderr}")
        return RunResult(r.returncode, r.stdout, r.stderr)

    def agent_argv(self, *args: str) -> list[str]:
        return [self.python, str(AGENT), *args]

    def agent(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> RunResult:
        r = in_namespace(self.binds, self.agent_argv(*args), env={**self.env, **(env or {})},
                         capture_output=True, text=True, timeout=timeout)
        return RunResult(r.returncode, r.stdout, r.stderr)

    def agent_background(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        script = bind_script(self.binds)
        cmd = [UNSHARE, "-m", "--propagation", "private", "/bin/sh", "-c", script + ' && exec "$@"', "sh",
               *self.agent_argv(*args)]
        # Output goes to a file, as the journal would take it: a unit started
        # with `systemd-run --pipe` keeps writing there after the agent died.
        self._bg = getattr(self, "_bg", 0) + 1
        log = self.root / f"agent-background-{self._bg}.log"
        with open(log, "w") as out:
            # Its own process group, like a service's cgroup: stop_unit() signals all of it.
            proc = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        proc.log_path = log  # type: ignore[attr-defined]
        return proc

    def stop_unit(self, proc: subprocess.Popen) -> None:
        """`systemctl stop` of the agent's service: SIGTERM to every process of
        the unit (KillMode=control-group), nix-store included; a transient
        activation unit (its own session here) is another unit and runs on."""
        os.killpg(proc.pid, signal.SIGTERM)

    def once(self, url: str, *args: str, env: dict[str, str] | None = None) -> RunResult:
        return self.agent("--once", "--url", url, "--prometheus-path", METRICS, *args, env=env)

    # -- installing and inspecting ------------------------------------------

    def install(self, system: str) -> None:
        """The host as installed: `system` in store, profile, current and booted."""
        self.sh(f"set -e; nix-store --realise {system} >/dev/null; "
                f"/usr/bin/nix-env -p /nix/var/nix/profiles/system --set {system}; "
                f"ln -sfn {system} /run/current-system; ln -sfn {system} /run/booted-system; "
                f"mkdir -p /var/lib/standin; echo {system} > /var/lib/standin/boot-default")

    def link(self, path: str) -> str | None:
        """The store path a host symlink resolves to (seen from outside)."""
        mapping = {"/nix": self.nix, "/run": self.run_dir, "/var/lib": self.var_lib}
        current = path
        for _ in range(10):
            if current.startswith("/nix/store/") and current.count("/") == 3:
                return current
            outside = next((str(v) + current[len(k):] for k, v in mapping.items() if current.startswith(k + "/")),
                           None)
            if outside is None or not os.path.islink(outside):
                return None
            target = os.readlink(outside)
            current = os.path.normpath(os.path.join(os.path.dirname(current), target))
        return None

    @property
    def current(self) -> str | None:
        return self.link("/run/current-system")

    @property
    def booted(self) -> str | None:
        return self.link("/run/booted-system")

    @property
    def profile(self) -> str | None:
        return self.link("/nix/var/nix/profiles/system")

    def ctl(self, name: str) -> Path:
        d = self.var_lib / "standin"
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def calls(self) -> list[str]:
        p = self.ctl("calls.log")
        return p.read_text().splitlines() if p.exists() else []

    def activations(self) -> list[str]:
        p = self.ctl("activations.log")
        return p.read_text().splitlines() if p.exists() else []

    def state(self) -> dict:
        p = self.var_lib / "nixos-autodeploy" / "state.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def metrics_text(self) -> str:
        return (self.var_lib / METRICS[len("/var/lib/"):]).read_text()

    def metrics(self) -> dict[str, float]:
        """Samples of the metrics file, keyed by `name{labels}` as written."""
        out = {}
        for line in self.metrics_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def store_has(self, path: str) -> bool:
        return (self.nix / "store" / os.path.basename(path)).exists()

    def reboot(self) -> None:
        """Simulate a reboot: /run is wiped; the boot loader's default boots."""
        default = self.ctl("boot-default").read_text().strip()
        for entry in self.run_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        os.symlink(default, self.run_dir / "current-system")
        os.symlink(default, self.run_dir / "booted-system")
        self.boot_id_file.write_text(str(uuid.uuid4()) + "\n")

    def small_disk(self, where: str, size: str) -> Path:
        """Mount a tmpfs of `size` at the host's `where` (under /var/lib or
        /run); unmounted by cleanup()."""
        outside = self.outside(where)
        outside.mkdir(parents=True, exist_ok=True)
        subprocess.run([MOUNT, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(outside)], check=True)
        self._mounts = [*getattr(self, "_mounts", []), outside]
        return outside

    def outside(self, path: str) -> Path:
        """Where a path of the host lives outside its namespace."""
        for inside, outside in self.binds.items():
            if path == inside or path.startswith(inside + "/"):
                return outside / path[len(inside):].lstrip("/")
        raise ValueError(f"{path} is not inside the host")

    def cleanup(self) -> None:
        self.kill_orphans()
        for mounted in reversed(getattr(self, "_mounts", [])):
            subprocess.run(["umount", "-l", str(mounted)], check=False)
        self._mounts = []

    def kill_orphans(self) -> None:
        """Kill stand-in "units" left running (e.g. a hanging activation)."""
        units = self.run_dir / "standin-units"
        if units.exists():
            for f in units.iterdir():
                try:
                    os.killpg(int(f.read_text()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass


# FleetLockServer lives in servers.py with the other servers; named here too
# for the code that takes it from the world (test_model.py).
from servers import FleetLockServer  # noqa: E402,F401


def app_specific_id(machine_id: str, app_id: str) -> str:
    """sd_id128_get_machine_app_specific(3), written from systemd's
    documentation: HMAC-SHA256 keyed by the machine id over the app id, the
    first 128 bits, marked as a v4 UUID."""
    import hashlib
    import hmac
    mac = bytearray(hmac.new(bytes.fromhex(machine_id), bytes.fromhex(app_id), hashlib.sha256).digest()[:16])
    mac[6] = (mac[6] & 0x0F) | 0x40
    mac[8] = (mac[8] & 0x3F) | 0x80
    return mac.hex()
