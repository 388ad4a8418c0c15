"""The VM tier's harness: a Debian guest with OVMF, systemd-boot and systemd
as PID 1 under QEMU, driven through a control channel.

- ``ensure_image()`` builds the guest disk from Debian's packages
  (tests/vm/build-image.sh, mmdebstrap), cached by the hash of its inputs.
- ``build_systems()`` builds bootable stand-in NixOS toplevels
  (tests/vm/standin/) with the real nix, the guest's kernel and initrd, and
  copies them into a signed binary cache that a ``PointerServer``
  (tests/world.py) serves on the host's loopback.
- ``Qemu`` is one qemu process: the serial console stamped into a log, QMP,
  the guest agent (tests/vm/guest_agent.py) on a virtio-serial port, qemu's
  user network restricted to guestfwd entries that reach the test's own
  servers on 127.0.0.1.  Stopped by its PID.
- ``Machine`` is a guest across reboots: qemu runs with ``-no-reboot``; when
  the guest resets (``systemctl reboot``, a kernel panic), a new qemu starts on
  the same disk and EFI variables, so firmware and systemd-boot run as on any
  boot.  ``kexec`` stays inside one qemu.
- ``ensure_base()`` installs the stand-in system ``a`` on a fresh guest,
  reboots into it, waits until its boot entry is blessed and saves the running
  VM (QMP migrate to a file); ``Machine.resume()`` starts every scenario from
  there in about a second.

Every wait has a timeout; every qemu is stopped by its PID.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path.insert(0, str(TESTS))

from world import PointerServer, base_nix_config, in_namespace  # noqa: E402

REPO = TESTS.parent
AGENT = REPO / "autodeploy.py"
STANDIN = HERE / "standin"
WORKDIR = Path(os.environ.get("VM_WORKDIR", "/var/tmp/autodeploy-vmtier"))
SOCKET_DIR = Path("/run/autodeploy-vmtier")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# The guest reaches the test's servers at these addresses (guestfwd).
CACHE_HOST = "10.0.2.100"
FLEETLOCK_HOST = "10.0.2.101"
GUEST_AGENT_PATH = "/root/autodeploy.py"
MEMORY_MB = int(os.environ.get("VM_MEMORY_MB", "1024"))

# The stand-in systems the scenarios deploy: name -> system.nix arguments.
SYSTEMS: dict[str, dict[str, bool]] = {
    "a": {}, "b": {}, "c": {},
    "broken": {"broken": True},        # its init exits: the boot never comes up
    "unhealthy": {"unhealthy": True},  # boots, fails the scenarios' health check
}


def log(message: str) -> None:
    print(f"vm: {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "socat", "mkfs.vfat", "mcopy",
                 "sfdisk", "mkfs.ext4", "nix-build", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install qemu-system-x86 qemu-utils ovmf socat mmdebstrap " \
                   "dosfstools mtools fdisk e2fsprogs systemd-boot-efi nix-bin)"
    if not OVMF_CODE.exists() or not Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").exists():
        return "needs ovmf and systemd-boot-efi"
    return None


def accel_args() -> list[str]:
    """KVM where it is a normal KVM; TCG where /dev/kvm is PVM (it only runs
    PVM-enlightened kernels) or absent."""
    if os.path.exists("/dev/kvm") and not os.path.exists("/sys/module/kvm_pvm") \
            and os.environ.get("VM_ACCEL") != "tcg":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", "-cpu", "max"]


def digest(*paths: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# The image and the systems
# ---------------------------------------------------------------------------


def ensure_image() -> Path:
    """The guest disk (base.img), kernel and initrd; built once per input hash."""
    key = digest(HERE / "build-image.sh", HERE / "customize-image.sh", HERE / "guest_agent.py")
    out = WORKDIR / f"image-{key}"
    if (out / "base.img").exists():
        return out
    WORKDIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"building the guest image in {out} (mmdebstrap; a minute or two)")
    tmp = WORKDIR / f"image-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with open(WORKDIR / f"image-{key}.log", "w") as logf:
        r = subprocess.run(["sh", str(HERE / "build-image.sh"), str(tmp)], stdout=logf, stderr=subprocess.STDOUT,
                           timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"building the image failed; see {WORKDIR}/image-{key}.log:\n"
                           + (WORKDIR / f"image-{key}.log").read_text()[-4000:])
    tmp.rename(out)
    (out / "build-seconds").write_text(f"{time.monotonic() - started:.0f}\n")
    log(f"image built in {time.monotonic() - started:.0f}s")
    return out


@dataclass
class Systems:
    root: Path
    cache: Path
    public_key: str
    paths: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.paths[name]


def build_systems(root: Path, image: Path) -> Systems:
    """Build the bootable stand-ins with the real nix (in a private mount
    namespace whose /nix is ours) and copy them into a signed file:// cache."""
    if (root / "paths.json").exists():
        return Systems(root, root / "cache", (root / "cache.pk").read_text().strip(),
                       json.loads((root / "paths.json").read_text()))
    store, cache = root / "build-nix", root / "cache"
    store.mkdir(parents=True, exist_ok=True)
    cache.mkdir(exist_ok=True)
    sk, pk = root / "cache.sk", root / "cache.pk"
    subprocess.run(["nix-store", "--generate-binary-cache-key", "autodeploy-vmtier-1", sk, pk],
                   check=True, capture_output=True)
    script = ["set -e"]
    for name, flags in SYSTEMS.items():
        args = " ".join(f"--arg {k} {str(v).lower()}" for k, v in flags.items())
        script.append(f"p=$(nix-build --no-out-link {STANDIN}/system.nix --argstr name {name} "
                      f"--argstr kernel {image}/vmlinuz --argstr initrd {image}/initrd.img {args})")
        script.append(f'echo "{name} $p" >> {root}/paths.txt')
        script.append(f"nix copy --to 'file://{cache}?secret-key={sk}&compression=none' $p")
    (root / "paths.txt").unlink(missing_ok=True)
    r = in_namespace({"/nix": store}, ["/bin/sh", "-c", "\n".join(script)],
                     env=dict(os.environ, NIX_CONFIG=base_nix_config()), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the stand-in systems failed:\n{r.stdout}\n{r.stderr}")
    paths = dict(line.split(" ", 1) for line in (root / "paths.txt").read_text().splitlines())
    (root / "paths.json").write_text(json.dumps(paths))
    return Systems(root, cache, pk.read_text().strip(), paths)


# ---------------------------------------------------------------------------
# One qemu process
# ---------------------------------------------------------------------------


class GuestError(RuntimeError):
    pass


LIVE: set[Qemu] = set()


def stop_all() -> None:
    """Stop every qemu this process started (at exit, also after SIGTERM)."""
    for q in list(LIVE):
        try:
            q.stop()
        except Exception:  # noqa: BLE001 - stop the others too
            pass


atexit.register(stop_all)


class Qemu:
    """One qemu process of a machine; ``Machine`` starts a new one per boot
    through the firmware."""

    def __init__(self, machine: Machine, incoming: Path | None = None) -> None:
        self.machine = machine
        self.dir = machine.dir
        self.events: list[dict] = []
        self.replies: dict[int, dict] = {}
        self.announcements: list[dict] = []
        self.cond = threading.Condition()
        self.next_id = 1
        self.qmp_replies: list[dict] = []
        # Sockets in a short directory of their own: a unix socket's path
        # has at most 107 bytes, and a scenario's directory under WORKDIR
        # can be longer (qemu and connect() then both fail on it).
        self.socks = SOCKET_DIR / hashlib.sha256(str(self.dir).encode()).hexdigest()[:16]
        self.socks.mkdir(parents=True, exist_ok=True, mode=0o700)
        for s in ("serial.sock", "ctl.sock", "qmp.sock"):
            (self.socks / s).unlink(missing_ok=True)
        argv = [
            "qemu-system-x86_64", "-machine", "q35", *accel_args(), "-m", str(MEMORY_MB), "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot", "-name", machine.name,
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={machine.vars}",
            "-drive", f"if=none,id=disk0,format=qcow2,file={machine.disk}",
            "-device", "virtio-blk-pci,drive=disk0,bootindex=1",
            "-chardev", f"socket,id=ser0,path={self.socks / 'serial.sock'},server=on,wait=on",
            "-serial", "chardev:ser0",
            "-chardev", f"socket,id=qmp,path={self.socks / 'qmp.sock'},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=ctl,path={self.socks / 'ctl.sock'},server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=ctl,name=vmtest",
            "-device", "virtio-rng-pci",
            "-netdev", "user,id=net0,restrict=on," + ",".join(
                f"guestfwd=tcp:{addr}:80-cmd:socat - TCP:127.0.0.1:{port}"
                for addr, port in machine.forwards.items()),
            "-device", "virtio-net-pci,netdev=net0,romfile=",
        ]
        if incoming is not None:
            argv += ["-incoming", f"exec:cat {incoming}"]
        self.log = open(self.dir / "qemu.log", "a")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        LIVE.add(self)
        machine.note(f"qemu started (pid {self.pid}{', resuming ' + incoming.name if incoming else ''})")
        self.serial = self._connect("serial.sock")
        threading.Thread(target=self._read_serial, daemon=True).start()
        self.qmp = self._connect("qmp.sock")
        self.qmp_file = self.qmp.makefile("rb")
        threading.Thread(target=self._read_qmp, daemon=True).start()
        self.qmp_command("qmp_capabilities")
        self.ctl = self._connect("ctl.sock")
        threading.Thread(target=self._read_ctl, daemon=True).start()

    def _connect(self, name: str, timeout: float = 30) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise GuestError(f"qemu exited ({self.proc.returncode}) before {name} was up; "
                                 f"see {self.dir / 'qemu.log'}:\n{(self.dir / 'qemu.log').read_text()[-2000:]}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.socks / name))
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"qemu's {name} did not come up in {timeout}s") from None
                time.sleep(0.05)

    def _read_serial(self) -> None:
        buf = b""
        with open(self.dir / "console.log", "ab") as out:
            while True:
                try:
                    chunk = self.serial.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    if buf:
                        out.write(self.machine.stamp() + buf + b"\n")
                    return
                buf += chunk.replace(b"\r", b"")
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    out.write(self.machine.stamp() + line + b"\n")
                out.flush()

    def _read_qmp(self) -> None:
        try:
            self._read_qmp_lines()
        except OSError:
            pass
        with self.cond:
            self.cond.notify_all()

    def _read_qmp_lines(self) -> None:
        for line in self.qmp_file:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                if "event" in msg:
                    self.events.append(msg)
                    self.machine.note(f"qmp event {msg['event']} {json.dumps(msg.get('data', {}))}")
                elif "return" in msg or "error" in msg:
                    self.qmp_replies.append(msg)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def qmp_command(self, command: str, timeout: float = 30, **arguments: object) -> dict:
        with self.cond:
            self.qmp_replies.clear()
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.qmp.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.qmp_replies:
                if not self.cond.wait(timeout=max(0.0, deadline - time.monotonic())) and \
                        time.monotonic() > deadline:
                    raise GuestError(f"QMP {command}: no answer in {timeout}s")
                if self.proc.poll() is not None and not self.qmp_replies:
                    raise GuestError(f"QMP {command}: qemu exited")
            reply = self.qmp_replies.pop(0)
        if "error" in reply:
            raise GuestError(f"QMP {command}: {reply['error']}")
        return reply["return"]

    def _read_ctl(self) -> None:
        try:
            self._read_ctl_lines()
        except OSError:
            pass
        with self.cond:
            self.cond.notify_all()

    def _read_ctl_lines(self) -> None:
        f = self.ctl.makefile("rb")
        for line in f:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                if "event" in msg:
                    self.announcements.append(msg)
                    self.machine.note(f"guest agent: {msg}")
                elif msg.get("id") is not None:
                    self.replies[msg["id"]] = msg
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def request(self, op: str, wait: float, **fields: object) -> dict:
        with self.cond:
            rid = self.next_id
            self.next_id += 1
        data = json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n"
        try:
            self.ctl.sendall(data)
        except OSError as exc:
            raise GuestError(f"control channel: {exc}") from None
        deadline = time.monotonic() + wait
        with self.cond:
            while rid not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"guest agent: no answer to {op} in {wait:.0f}s")
                if self.proc.poll() is not None:
                    raise GuestError(f"guest agent: qemu exited during {op}")
                self.cond.wait(timeout=min(left, 1.0))
            reply = self.replies.pop(rid)
        if "error" in reply:
            raise GuestError(f"guest agent: {op}: {reply['error']}")
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"qemu (pid {self.pid}) still running after {timeout:.0f}s") from None

    def shutdown_reason(self) -> str | None:
        for e in reversed(self.events):
            if e.get("event") == "SHUTDOWN":
                return e.get("data", {}).get("reason")
        return None

    def stop(self) -> None:
        """Stop this qemu by its PID: SIGTERM, then SIGKILL."""
        LIVE.discard(self)
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for s in (self.serial, self.qmp, self.ctl):
            try:
                s.close()
            except OSError:
                pass
        self.log.close()

    def kill(self) -> None:
        """Power loss: SIGKILL to this qemu's PID."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.stop()


# ---------------------------------------------------------------------------
# A machine across reboots
# ---------------------------------------------------------------------------


@dataclass
class Result:
    rc: int
    out: str
    err: str


class Machine:
    """A guest: its disk (a qcow2 overlay) and EFI variables outlive each qemu."""

    def __init__(self, directory: Path, name: str, forwards: dict[str, int]) -> None:
        self.dir, self.name, self.forwards = directory, name, forwards
        self.dir.mkdir(parents=True, exist_ok=True)
        self.disk = self.dir / "disk.qcow2"
        self.vars = self.dir / "OVMF_VARS.fd"
        self.qemu: Qemu | None = None
        self.boot_id: str | None = None
        self.boots = 0          # boots through the firmware (a qemu each)
        self.kexecs = 0
        self.started = time.monotonic()
        self.events_log = open(self.dir / "harness.log", "a")

    # -- bookkeeping -----------------------------------------------------

    def stamp(self) -> bytes:
        return f"[{time.monotonic() - self.started:8.2f}] ".encode()

    def note(self, message: str) -> None:
        self.events_log.write(f"[{time.monotonic() - self.started:8.2f}] {message}\n")
        self.events_log.flush()

    # -- creating ----------------------------------------------------------

    def create(self, backing: Path, backing_format: str, vars_from: Path) -> None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing),
                        str(self.disk)], check=True)
        shutil.copyfile(vars_from, self.vars)

    # -- booting -----------------------------------------------------------

    def start(self, timeout: float = 240) -> str:
        """Power on (firmware, systemd-boot, kernel, systemd) and wait for the
        guest agent; returns the boot ID."""
        assert self.qemu is None or not self.qemu.alive()
        self.qemu = Qemu(self)
        self.boots += 1
        return self.wait_ready(timeout)

    def resume(self, state: Path, timeout: float = 60) -> str:
        """Start from a saved, running VM (QMP migrate file)."""
        self.qemu = Qemu(self, incoming=state)
        deadline = time.monotonic() + timeout
        while True:
            status = self.qemu.qmp_command("query-status")["status"]
            if status not in ("inmigrate",):
                break
            if time.monotonic() > deadline:
                raise GuestError(f"resuming {state}: still {status} after {timeout}s")
            time.sleep(0.1)
        if status != "running":
            self.qemu.qmp_command("cont")
        boot_id = self.wait_ready(timeout, accept_same=True)
        # The guest's clock stopped when the state was saved.
        self.sh(f"date -u -s @{time.time():.0f} >/dev/null")
        return boot_id

    def wait_ready(self, timeout: float, accept_same: bool = False) -> str:
        """Until the guest agent answers with a new boot ID (or the same one
        after a resume)."""
        assert self.qemu is not None
        deadline = time.monotonic() + timeout
        while True:
            if not self.qemu.alive():
                raise GuestError(f"qemu exited while waiting for the guest ({self.qemu.shutdown_reason()})")
            try:
                reply = self.qemu.request("ping", wait=3)
                if accept_same or reply["boot_id"] != self.boot_id:
                    self.boot_id = reply["boot_id"]
                    self.note(f"guest ready, boot {self.boot_id}, uptime {reply['uptime']:.1f}s")
                    return self.boot_id
            except GuestError:
                pass
            if time.monotonic() > deadline:
                raise GuestError(f"the guest did not answer in {timeout:.0f}s")
            time.sleep(1)

    def wait_reset(self, timeout: float = 300) -> str:
        """The guest resets (a reboot it started, a panic): qemu exits
        (-no-reboot); returns the reason from QMP's SHUTDOWN event."""
        assert self.qemu is not None
        self.qemu.wait_exit(timeout)
        reason = self.qemu.shutdown_reason() or "unknown"
        self.note(f"qemu exited: {reason}")
        self.qemu.stop()
        return reason

    def reboot_after_reset(self, timeout: float = 300) -> str:
        """Wait for the guest's reset, then power on again on the same disk
        and variables; returns the new boot ID."""
        reason = self.wait_reset(timeout)
        if reason not in ("guest-reset", "guest-panic", "unknown"):
            raise GuestError(f"the guest did not reset: {reason}")
        return self.start()

    def wait_kexec(self, old_boot_id: str, timeout: float = 300) -> str:
        """A kexec stays in one qemu: wait for a new boot ID."""
        new = self.wait_ready(timeout)
        assert new != old_boot_id
        self.kexecs += 1
        return new

    def follow_resets(self, count: int, timeout_each: float = 300) -> None:
        """Follow `count` resets in a row (a reboot, then boots that never
        come up): after each, power on again without waiting for the guest."""
        for _ in range(count):
            reason = self.wait_reset(timeout_each)
            if reason not in ("guest-reset", "guest-panic", "unknown"):
                raise GuestError(f"the guest did not reset: {reason}")
            self.qemu = Qemu(self)
            self.boots += 1

    def save(self, state: Path) -> None:
        """Pause and save the running VM into `state` (QMP migrate), then stop."""
        assert self.qemu is not None
        self.qemu.qmp_command("stop")
        self.qemu.qmp_command("migrate", uri=f"exec:cat > {state}")
        deadline = time.monotonic() + 120
        while True:
            status = self.qemu.qmp_command("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise GuestError(f"saving the VM: migration {status}")
            time.sleep(0.2)
        self.qemu.stop()

    def power_off(self) -> None:
        if self.qemu is not None:
            self.qemu.stop()

    def power_loss(self) -> None:
        assert self.qemu is not None
        self.note("power loss (SIGKILL to qemu)")
        self.qemu.kill()

    def close(self) -> None:
        if self.qemu is not None:
            self.qemu.stop()
        self.events_log.close()

    # -- commands ----------------------------------------------------------

    def sh(self, cmd: str, timeout: float = 120, check: bool = True) -> Result:
        assert self.qemu is not None
        reply = self.qemu.request("sh", wait=timeout + 10, cmd=cmd, timeout=timeout)
        r = Result(reply["rc"], reply["out"], reply["err"])
        self.note(f"$ {cmd[:200]} -> {r.rc}")
        if check and r.rc != 0:
            raise GuestError(f"guest command failed ({r.rc}): {cmd}\n{r.out}\n{r.err}")
        return r

    def sh_nowait(self, cmd: str) -> None:
        """Start a command and do not wait for it (it may end in a reboot)."""
        assert self.qemu is not None
        data = json.dumps({"id": -1, "op": "sh", "cmd": cmd, "timeout": 3600}).encode() + b"\n"
        self.qemu.ctl.sendall(data)
        self.note(f"$ {cmd[:200]} (not waited for)")

    def put(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        assert self.qemu is not None
        raw = data.encode() if isinstance(data, str) else data
        self.qemu.request("put", wait=60, path=path, data=base64.b64encode(raw).decode(), mode=mode)

    def get(self, path: str) -> bytes:
        assert self.qemu is not None
        return base64.b64decode(self.qemu.request("get", wait=60, path=path)["data"])

    def read_text(self, path: str) -> str | None:
        try:
            return self.get(path).decode()
        except GuestError:
            return None

    def link(self, path: str) -> str:
        return self.sh(f"readlink -f {path} || true").out.strip()

    def loader_variable(self, name: str) -> str | None:
        raw = self.sh(f"cat /sys/firmware/efi/efivars/{name}-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f "
                      "2>/dev/null | base64 -w0", check=False).out.strip()
        if not raw:
            return None
        return base64.b64decode(raw)[4:].decode("utf-16-le").split("\0", 1)[0]

    def entries(self) -> list[str]:
        return sorted(self.sh("ls /boot/loader/entries").out.split())

    def wait_running(self, timeout: float = 180) -> str:
        """systemctl is-system-running --wait (running or degraded)."""
        return self.sh("systemctl is-system-running --wait || true", timeout=timeout).out.strip()


# ---------------------------------------------------------------------------
# The base state: a guest running the stand-in system `a`, saved once
# ---------------------------------------------------------------------------

# Bump when what ensure_base() does changes (the saved state is reused).
BASE_VERSION = "1"
NIX_CONF = """sandbox = false
build-users-group =
experimental-features = nix-command
substituters = http://{host}/cache
trusted-public-keys = {key}
connect-timeout = 5
stalled-download-timeout = 20
"""


@dataclass
class Base:
    root: Path
    image: Path
    systems: Systems
    state: Path
    disk: Path
    vars: Path
    seconds: dict[str, float]


def ensure_base(server_for: Callable[[Path], PointerServer]) -> Base:
    """Image, systems, and a saved VM running `a` (its entry blessed).
    `server_for(cache)` gives the PointerServer serving the cache."""
    seconds: dict[str, float] = {}
    t = time.monotonic()
    image = ensure_image()
    seconds["image"] = float((image / "build-seconds").read_text()) if (image / "build-seconds").exists() else 0.0
    key = digest(*sorted(STANDIN.iterdir()), extra=f"{image.name} {BASE_VERSION} {sorted(SYSTEMS.items())}")
    root = WORKDIR / f"base-{key}"
    root.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    systems = build_systems(root / "systems", image)
    seconds["systems"] = time.monotonic() - t
    base = Base(root, image, systems, root / "state.bin", root / "vm" / "disk.qcow2", root / "vm" / "OVMF_VARS.fd",
                seconds)
    if (root / "ready").exists():
        return base
    server = server_for(systems.cache)
    shutil.rmtree(root / "vm", ignore_errors=True)
    t = time.monotonic()
    m = Machine(root / "vm", "base", {CACHE_HOST: server.port})
    try:
        m.create(image / "base.img", "raw", OVMF_VARS)
        log("base: first boot (Debian entry)")
        # The first boot checks the new file system (fsck): slower than the
        # others, and much slower on a loaded machine.
        m.start(timeout=600)
        m.put("/etc/nix/nix.conf", NIX_CONF.format(host=CACHE_HOST, key=systems.public_key))
        a = systems["a"]
        log("base: installing the stand-in system a")
        m.sh(f"set -e; nix-store --realise {a} >/dev/null; "
             f"nix-env -p /nix/var/nix/profiles/system --set {a}; "
             f"{a}/bin/switch-to-configuration boot", timeout=300)
        m.sh_nowait("systemctl reboot")
        m.reboot_after_reset()
        state = m.wait_running()
        booted = m.link("/run/booted-system")
        if booted != a:
            raise GuestError(f"base: booted {booted!r}, not {a}")
        entries = m.entries()
        if not any(e.startswith("nixos-") and "+" not in e for e in entries):
            raise GuestError(f"base: the entry of a is not blessed: {entries} (system {state})")
        log(f"base: running a ({state}), entries {entries}; saving the VM")
        m.save(base.state)
        seconds["base"] = time.monotonic() - t
        (root / "base-seconds").write_text(f"{seconds['base']:.0f}\n")
        (root / "ready").write_text("")
    finally:
        m.close()
    return base


def new_machine(base: Base, directory: Path, name: str, forwards: dict[str, int]) -> Machine:
    """A machine whose disk and variables start as the base's, resumed from
    the saved state (about a second)."""
    shutil.rmtree(directory, ignore_errors=True)
    m = Machine(directory, name, forwards)
    m.create(base.disk, "qcow2", base.vars)
    m.resume(base.state)
    return m


def main(argv: list[str]) -> int:
    """`python3 tests/vm/harness.py prepare`: build the image, the systems and
    the base state (before two scenario runners start side by side)."""
    if argv[1:] != ["prepare"]:
        print("usage: harness.py prepare", file=sys.stderr)
        return 2
    reason = missing_prerequisites()
    if reason:
        print(f"vm: cannot run: {reason}", file=sys.stderr)
        return 1
    servers: list[PointerServer] = []

    def server_for(cache: Path) -> PointerServer:
        servers.append(PointerServer(cache))
        return servers[-1]

    started = time.monotonic()
    base = ensure_base(server_for)
    for s in servers:
        s.close()
    log(f"prepared in {time.monotonic() - started:.0f}s: image {base.image.name} "
        f"(built in {base.seconds.get('image', 0):.0f}s), base {base.root.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
