"""Real servers for the network tests, all on 127.0.0.1, bounded, stopped by the tests.

- ``Nginx``: Debian's nginx serving pointer files from a directory, with its
  real ETag/Last-Modified, ``gzip on``, a location that forces
  ``Content-Encoding: gzip``, redirects of every kind (301/302/303/307/308,
  to another origin, https -> http) and TLS with a test CA.  Optionally it
  answers only connections coming from the forward proxy (``only_from``),
  so a test host that ignores its proxy fails.
- ``Tinyproxy``: Debian's tinyproxy as the forward proxy, its outgoing
  connections bound to its own loopback address.
- ``RawServer``: a socket server whose every connection is handled by a test
  function, for what no real server sends on purpose (negative chunk sizes,
  endless headers, trickled bodies, 103 before 200, silence).
- ``TestCA``: a CA and a server certificate for 127.0.0.1 made with openssl.
- ``FleetMonitor``: Debian's prometheus-node-exporter per host and prometheus.
- ``FleetLockServer``: a FleetLock reboot-slot server (Zincati's protocol).
- ``HostileLockServer``: a lock server whose replies break on purpose.
- ``TLSServer``: an HTTPS server with a self-signed certificate.
- ``FakePrometheus``: a query API that gives one fixed answer.

The pointer server and binary cache of the real-nix tests are world.py's
``PointerServer``.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from tiers import declare

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def missing(*tools: str) -> str | None:
    for tool in tools:
        if not os.path.exists(tool):
            return f"{tool} is not installed (tests/run.sh installs it on Debian)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------------------
# A test CA (openssl)
# ---------------------------------------------------------------------------


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.cert, key = root / "ca.pem", root / "ca.key"
        self.server_cert, self.server_key = root / "server.pem", root / "server.key"
        conf = root / "ext.cnf"
        conf.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")

        def ssl(*args: str) -> None:
            subprocess.run([OPENSSL, *args], check=True, capture_output=True)
        ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(self.cert), "-days", "2", "-subj", "/CN=autodeploy test CA")
        csr = root / "server.csr"
        ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(self.server_key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
        ssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(key), "-CAcreateserial",
            "-out", str(self.server_cert), "-days", "2", "-extfile", str(conf))


# ---------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------


@declare("real servers")
class Nginx:
    """nginx in the foreground (no master process, so it needs no other user)
    serving ``root`` on an http and an https port."""

    def __init__(self, root: Path, ca: TestCA | None = None, only_from: str | None = None,
                 other_origin: str | None = None) -> None:
        self.dir = root
        self.docroot = root / "www"
        self.docroot.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if ca else None
        access = f"allow {only_from}; deny all;" if only_from else ""
        other = other_origin or f"http://127.0.0.1:{self.port}"
        redirects = "\n".join(
            f"location = /r{code} {{ return {code} /pointer; }}" for code in (301, 302, 303, 307, 308))
        tls = ""
        if ca is not None:
            tls = f"""
    server {{
        listen 127.0.0.1:{self.tls_port} ssl;
        ssl_certificate {ca.server_cert};
        ssl_certificate_key {ca.server_key};
        root {self.docroot};
        {access}
        location = /to-plain {{ return 302 http://127.0.0.1:{self.port}/pointer; }}
        location / {{ try_files $uri =404; }}
    }}"""
        conf = root / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp-body;
    proxy_temp_path {root}/tmp-proxy;
    fastcgi_temp_path {root}/tmp-fastcgi;
    uwsgi_temp_path {root}/tmp-uwsgi;
    scgi_temp_path {root}/tmp-scgi;
    default_type text/plain;
    types {{ }}
    gzip on;
    gzip_min_length 1;
    gzip_types text/plain;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.docroot};
        {access}
        {redirects}
        location = /chain {{ return 302 /r301; }}
        location = /loop {{ return 302 /loop2; }}
        location = /loop2 {{ return 302 /loop; }}
        location = /elsewhere {{ return 302 {other}/pointer; }}
        location = /forced-gzip {{ add_header Content-Encoding gzip; try_files /pointer =404; }}
        location / {{ try_files $uri =404; }}
    }}{tls}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(root)], stdout=subprocess.DEVNULL,
                                     stderr=open(root / "stderr.log", "w"))
        try:
            wait_listening("127.0.0.1", self.port, self.proc)
            if self.tls_port:
                wait_listening("127.0.0.1", self.tls_port, self.proc)
        except RuntimeError:
            self.close()
            raise RuntimeError((root / "stderr.log").read_text() + (root / "error.log").read_text())

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_base(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def publish(self, body: str | bytes, name: str = "pointer", mtime: float | None = None) -> str:
        """Write a file the way CI would (atomically); returns its URL."""
        data = body.encode() if isinstance(body, str) else body
        path = self.docroot / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_bytes(data)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        tmp.rename(path)
        return f"{self.base}/{name}"

    def access_log(self) -> list[str]:
        path = self.dir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def close(self) -> None:
        stop(self.proc)


# ---------------------------------------------------------------------------
# tinyproxy
# ---------------------------------------------------------------------------


@declare("real servers")
class Tinyproxy:
    """The forward proxy; it connects out from ``bind`` (a loopback address
    of its own), so a server can tell proxied from direct connections."""

    def __init__(self, root: Path, bind: str = "127.0.0.3") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.bind = bind
        self.log = root / "tinyproxy.log"
        conf = root / "tinyproxy.conf"
        conf.write_text(f"""
User root
Group root
Port {self.port}
Listen 127.0.0.1
Bind {bind}
Timeout 30
LogFile "{self.log}"
LogLevel Connect
PidFile "{root}/tinyproxy.pid"
MaxClients 20
Allow 127.0.0.1
DisableViaHeader Yes
""")
        self.proc = subprocess.Popen([TINYPROXY, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(root / "stderr.log", "w"))
        try:
            wait_listening("127.0.0.1", self.port, self.proc)
        except RuntimeError:
            self.close()
            raise RuntimeError((root / "stderr.log").read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines()
                if "Request (file descriptor" in line or "CONNECT" in line] if self.log.exists() else []

    def close(self) -> None:
        stop(self.proc)


# ---------------------------------------------------------------------------
# A raw socket server for what real servers do not send on purpose
# ---------------------------------------------------------------------------


class RawServer:
    """Every connection goes to ``handler(conn, n)`` (n counts connections
    from 0) in a thread of its own; ``close()`` stops accepting and closes
    what is open, so a handler that waits for ever ends with the test."""

    def __init__(self, handler: Callable[[socket.socket, int], None]) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.requests: list[bytes] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/pointer"

    def _accept(self) -> None:
        n = 0
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()
            n += 1

    def _serve(self, conn: socket.socket, n: int) -> None:
        try:
            conn.settimeout(60)
            self.requests.append(read_request(conn))
            self.handler(conn, n)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def sleep(self, seconds: float) -> bool:
        """Sleep unless the server is closing; False when it is."""
        return not self.closed.wait(seconds)

    def close(self) -> None:
        self.closed.set()
        # shutdown() wakes the thread blocked in accept(); close() alone would
        # leave the socket listening until then, and a later server of another
        # test could be given the same port and lose connections to it.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        piece = conn.recv(4096)
        if not piece:
            break
        data += piece
    return data


# ---------------------------------------------------------------------------
# Prometheus and node exporters: the fleet view
# ---------------------------------------------------------------------------

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or "/usr/bin/prometheus-node-exporter"


@declare("real servers")
class FleetMonitor:
    """One Debian `prometheus-node-exporter` per host (the textfile collector
    on the directory the host's agent writes its metrics into) and a Debian
    `prometheus` scraping them every second, labelled instance=<name> (and
    `labels`, target labels for every host); rule files loaded as given.  Every process is stopped by close()."""

    def __init__(self, root: Path, textfile_dirs: dict[str, Path], rule_files: tuple[Path, ...] = (),
                 labels: dict[str, str] | None = None) -> None:
        import json
        self.procs: list[subprocess.Popen] = []
        self.exporters: dict[str, subprocess.Popen] = {}  # by host name: stop one to make its host go silent
        self.logs = root
        targets = []
        try:
            for name, directory in textfile_dirs.items():
                port = free_port()
                self._start(f"node-exporter-{name}", [
                    NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
                    "--collector.textfile", f"--collector.textfile.directory={directory}"])
                self.exporters[name] = self.procs[-1]
                targets.append({"targets": [f"127.0.0.1:{port}"], "labels": {**(labels or {}), "instance": name}})
            port = free_port()
            self.base = f"http://127.0.0.1:{port}"
            config = root / "prometheus.yml"
            config.write_text(json.dumps({  # JSON is YAML
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                "rule_files": [str(f) for f in rule_files],
                "scrape_configs": [{"job_name": "node", "static_configs": targets}],
            }))
            self._start("prometheus", [
                PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"])
            self.deadline = time.monotonic() + 120
            self.wait_for("prometheus ready", lambda: self.get("/-/ready", raw=True))
            self.wait_for("every target up", lambda: len(self.query("up == 1")) == len(targets))
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def get(self, path: str, raw: bool = False):
        import json
        import urllib.request
        with urllib.request.urlopen(self.base + path, timeout=5) as resp:
            body = resp.read(10_000_000)
        return body if raw else json.loads(body)

    def query(self, expr: str) -> list[dict]:
        import urllib.parse
        data = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert data["status"] == "success", data
        return data["data"]["result"]

    def wait_for(self, what: str, check: Callable[[], object], timeout: float | None = None):
        """Poll `check` every half second until it returns something true;
        bounded by `timeout` (default: the monitor's own two minutes)."""
        end = self.deadline if timeout is None else time.monotonic() + timeout
        while time.monotonic() < end:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}")
            try:
                result = check()
            except (OSError, ValueError, KeyError):
                result = None
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            stop(proc)


# ---------------------------------------------------------------------------
# FleetLock: a reboot-slot server following Zincati's protocol
# (coreos/zincati docs/development/fleetlock/protocol.md)
# ---------------------------------------------------------------------------


class FleetLockServer:
    """A FleetLock server on 127.0.0.1: per group a counting semaphore of
    ``slots`` owned locks.  POST /v1/pre-reboot locks (recursive: the holder
    locking again succeeds), POST /v1/steady-state unlocks if held (a client
    that holds nothing gets 200 too).  Requests need ``fleet-lock-protocol:
    true`` and {"client_params": {"id": non-empty, "group": [a-zA-Z0-9.-]+}};
    failures are 4xx/5xx with a JSON {"kind", "value"} body, as the spec says.

    ``fail`` makes every request fail in a chosen way until reset: "500"
    (JSON error), "garbage" (non-JSON 503), "redirect" (307 to a server that
    would grant), "close" (connection closed without an answer), "hang"
    (answer after ``hang_seconds``).  ``events`` records (time, operation, id,
    group, status)."""

    GROUP_RE = r"[a-zA-Z0-9.-]+"

    def __init__(self, slots: int = 1, group_slots: dict[str, int] | None = None) -> None:
        import re
        self.slots = slots
        self.group_slots = dict(group_slots or {})
        self.holders: dict[str, list[str]] = {}
        self.events: list[tuple[float, str, str, str, int]] = []
        self.max_held: dict[str, int] = {}
        self.fail: str | None = None
        self.hang_seconds = 5.0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def reply(self, status: int, body: bytes, content_type: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def error(self, status: int, kind: str, value: str) -> None:
                self.reply(status, json.dumps({"kind": kind, "value": value}).encode())

            def do_GET(self) -> None:  # noqa: N802
                self.error(405, "method_not_allowed", "only POST is supported")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(min(length, 65536))
                operation = {"/v1/pre-reboot": "pre-reboot", "/v1/steady-state": "steady-state"}.get(self.path)
                if operation is None:
                    return self.error(404, "not_found", f"no endpoint {self.path}")
                if self.headers.get("fleet-lock-protocol") != "true":
                    return self.error(400, "missing_fleetlock_header", "fleet-lock-protocol header must be true")
                try:
                    params = json.loads(raw)["client_params"]
                    client_id, group = params["id"], params["group"]
                    if not (isinstance(client_id, str) and client_id and isinstance(group, str)
                            and re.fullmatch(server.GROUP_RE, group)):
                        raise ValueError
                except (ValueError, KeyError, TypeError):
                    return self.error(400, "failed_decode_body", "body is not valid client_params")
                fail = server.fail
                if fail == "500":
                    status = 500
                    self.error(500, "failed_etcd_unavailable", "backend unavailable")
                elif fail == "garbage":
                    status = 503
                    self.reply(503, b"<html>Service Unavailable\x00\xff</html>", "text/html")
                elif fail == "redirect":
                    status = 307
                    self.reply(307, b"", headers={"Location": f"http://127.0.0.1:{server.port}{self.path}"})
                elif fail == "close":
                    status = 0
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif fail == "hang":
                    time.sleep(server.hang_seconds)
                    status = 0
                    self.close_connection = True
                else:
                    status = server.operate(operation, client_id, group)
                    if status == 200:
                        self.reply(200, b"")
                    else:
                        self.error(status, "failed_lock_semaphore_full",
                                   "semaphore currently full, all slots are locked already")
                with server.lock:
                    server.events.append((time.time(), operation, client_id, group, status))

        from world import serve_in_thread  # the pointer server's helper, one home
        self.httpd, self.port = serve_in_thread(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def operate(self, operation: str, client_id: str, group: str) -> int:
        with self.lock:
            held = self.holders.setdefault(group, [])
            if operation == "steady-state":
                if client_id in held:
                    held.remove(client_id)
                return 200
            if client_id in held:
                return 200  # recursive
            if len(held) >= self.group_slots.get(group, self.slots):
                return 409
            held.append(client_id)
            self.max_held[group] = max(self.max_held.get(group, 0), len(held))
            return 200

    def held(self, group: str = "default") -> list[str]:
        with self.lock:
            return list(self.holders.get(group, []))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------
# Hostile lock replies (issue #18, items 1 and 2): the status decides
# ---------------------------------------------------------------------------

LARGE = b'{"kind": "x", "value": "' + b"y" * 10000 + b'"}'
HOSTILE_REPLIES = {
    # A non-200 whose body cannot be read: malformed chunk size, stalled, reset.
    "chunk": b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "stall": b'HTTP/1.1 500 X\r\nContent-Length: 100\r\n\r\n{"kind"',
    "reset": b'HTTP/1.1 503 X\r\nContent-Length: 100\r\n\r\n{"ki',
    # Larger than the reply limit: the status still decides.
    "big200": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(LARGE), LARGE),
    "big409": b"HTTP/1.1 409 X\r\nContent-Length: %d\r\n\r\n%s" % (len(LARGE), LARGE),
    "ok": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
}


class HostileLockServer:
    """A raw socket lock server answering every request as `mode` says."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.srv = RawServer(self.answer)

    def answer(self, conn, n) -> None:
        mode = self.mode
        conn.sendall(HOSTILE_REPLIES[mode])
        if mode == "stall":
            self.srv.sleep(30)
        elif mode == "reset":
            # The reset comes once the client has the status line: an RST
            # that arrives first discards the unread reply (then the server
            # never answered at all, which is another test's case).
            self.srv.sleep(1.0)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.srv.port}"

    def operations(self) -> list[str]:
        return [r.split(b" ", 2)[1].decode() for r in self.srv.requests]


# ---------------------------------------------------------------------------
# HTTPS with a certificate nobody trusts
# ---------------------------------------------------------------------------


class TLSServer:
    """An HTTPS server on 127.0.0.1 with a fresh self-signed certificate in
    ``directory``, answering every GET with "x"; ``url`` is its /pointer.
    Raises RuntimeError when openssl cannot make the certificate."""

    def __init__(self, directory: Path) -> None:
        cert, key = directory / "cert.pem", directory / "key.pem"
        r = subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                            "-days", "1", "-subj", "/CN=127.0.0.1"], capture_output=True)
        if r.returncode != 0:
            raise RuntimeError("openssl cannot make a certificate here")

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"x\n")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/pointer"

    def close(self) -> None:
        self.httpd.shutdown()


# ---------------------------------------------------------------------------
# A Prometheus query API with one fixed answer
# ---------------------------------------------------------------------------


class FakePrometheus(RawServer):
    """Answers every request with ``body`` (JSON-encoded unless bytes) and
    ``status``; ``url`` is the base `promote --prometheus` takes."""

    def __init__(self, body: object, status: int = 200) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()

        def handler(conn, n):
            conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + raw)
        super().__init__(handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
