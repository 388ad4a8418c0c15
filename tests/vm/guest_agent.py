#!/usr/bin/python3
"""The VM tier's control agent inside the guest (vmtest-agent.service).

JSON lines on the virtio-serial port /dev/virtio-ports/vmtest; every request
is answered on its own thread, tagged with the request's ``id``:

    {"id": 1, "op": "ping"}                    -> {"id": 1, "boot_id": "...", "uptime": 12.3}
    {"id": 2, "op": "sh", "cmd": "...", "timeout": 60}
                                               -> {"id": 2, "rc": 0, "out": "...", "err": "..."}
    {"id": 3, "op": "put", "path": "/x", "data": "<base64>", "mode": 420}
                                               -> {"id": 3, "ok": true}
    {"id": 4, "op": "get", "path": "/x"}       -> {"id": 4, "data": "<base64>"} or {"id": 4, "error": "..."}

On start it announces {"event": "ready", "boot_id": "..."}.  While the host
side is not connected (qemu between reboots, a resumed snapshot) reads return
nothing; the agent waits and reads again.
"""

import base64
import json
import os
import subprocess
import sys
import threading
import time

PORT = "/dev/virtio-ports/vmtest"
write_lock = threading.Lock()


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def send(fd: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    with write_lock:
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as exc:
            print(f"vmtest-agent: write failed: {exc}", file=sys.stderr)


def handle(fd: int, request: dict) -> None:
    reply: dict = {"id": request.get("id")}
    op = request.get("op")
    try:
        if op == "ping":
            with open("/proc/uptime") as f:
                reply.update(boot_id=boot_id(), uptime=float(f.read().split()[0]))
        elif op == "sh":
            try:
                p = subprocess.run(["/bin/sh", "-c", request["cmd"]], capture_output=True,
                                   timeout=request.get("timeout", 120), stdin=subprocess.DEVNULL)
                reply.update(rc=p.returncode, out=p.stdout.decode(errors="replace"),
                             err=p.stderr.decode(errors="replace"))
            except subprocess.TimeoutExpired as exc:
                reply.update(rc=-9, out=(exc.stdout or b"").decode(errors="replace"),
                             err=f"timed out after {request.get('timeout')}s")
        elif op == "put":
            path = request["path"]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".vmtest-tmp"
            with open(tmp, "wb") as f:
                f.write(base64.b64decode(request["data"]))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, request.get("mode", 0o644))
            os.rename(tmp, path)
            reply["ok"] = True
        elif op == "get":
            with open(request["path"], "rb") as f:
                reply["data"] = base64.b64encode(f.read()).decode()
        else:
            reply["error"] = f"unknown op {op!r}"
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the host
        reply["error"] = f"{type(exc).__name__}: {exc}"
    send(fd, reply)


def main() -> None:
    fd = os.open(PORT, os.O_RDWR)
    send(fd, {"event": "ready", "boot_id": boot_id()})
    buf = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            time.sleep(0.2)  # the host is not connected
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                request = json.loads(line)
            except ValueError:
                continue
            threading.Thread(target=handle, args=(fd, request), daemon=True).start()


if __name__ == "__main__":
    main()
