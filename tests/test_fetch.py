"""Fetching against real and hostile servers: first the fetcher in-process
(autodeploy.Fetcher), then the real agent with real nix (exit codes, state,
metrics, hooks): server bytes escaped, secrets masked, slow and flooding
servers, validators and ETags, proxies, a failed fetch that changes nothing.

Real servers: Debian's nginx (its own ETag, gzip, redirects, TLS with a test
CA) and tinyproxy.  Raw socket servers send what no real server sends on
purpose.  A 304 that would replay a pointer under other keys is a trust
question: test_trust.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import autodeploy as ad  # noqa: E402
import servers  # noqa: E402
from util import everything_persisted, pointer_requests, promtool_ok, state_gauge, wait_for  # noqa: E402
from world import METRICS  # noqa: E402

A = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-a"
B = "/nix/store/1123456789abcdfghijklmnpqrsvwxyz-nixos-system-b"
IN_CI = os.environ.get("CI") == "true"


def need(*tools: str):
    reason = servers.missing(*tools)
    if reason and IN_CI:
        raise RuntimeError(f"CI must run this test: {reason}")
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def raw(handler) -> servers.RawServer:
    return servers.RawServer(handler)


@pytest.fixture
def raw_server():
    made: list[servers.RawServer] = []

    def make(handler):
        srv = servers.RawServer(handler)
        made.append(srv)
        return srv
    yield make
    for srv in made:
        srv.close()


def fetch(url: str, timeout: float = 5, **kwargs) -> ad.Response:
    return ad.Fetcher(kwargs.pop("token", None)).get(url, kwargs.pop("headers", None), timeout=timeout, **kwargs)


def refused(url: str, timeout: float = 5, **kwargs) -> str:
    with pytest.raises(ad.FetchError) as exc:
        fetch(url, timeout, **kwargs)
    assert exc.value.exit_code == 3
    return str(exc.value)


# ---------------------------------------------------------------------------
# Framing: what no real server sends on purpose


def canned(*responses: bytes):
    def handler(conn: socket.socket, n: int) -> None:
        conn.sendall(responses[min(n, len(responses) - 1)])
    return handler


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nhello",
    b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
], ids=["length", "chunked", "close-delimited", "103-first", "100-102-first"])
def test_body_framing(raw_server, response):
    srv = raw_server(canned(response))
    resp = fetch(srv.url)
    assert resp.status == 200 and resp.body == b"hello"
    request = srv.requests[0]
    assert request.startswith(b"GET /pointer HTTP/1.1\r\n") and b"User-Agent: nixos-autodeploy/" in request
    assert b"Accept-Encoding: identity" in request


def stream_after(head: bytes, piece: bytes = b"x" * 65536, seconds: float = 10):
    """Send `head`, then `piece` again and again for a while (a flood)."""
    def handler(conn: socket.socket, n: int) -> None:
        conn.sendall(head)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(piece)
    return handler


@pytest.mark.parametrize("head,needle", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "invalid chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\n", "invalid chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+10\r\n", "invalid chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffff\r\n", "limit"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 419430400\r\n\r\n", "limit"),
    (b"HTTP/1.0 200 OK\r\n\r\n", "limit"),
], ids=["negative-chunk", "hex-prefixed-chunk", "signed-chunk", "huge-chunk", "huge-length", "endless-close"])
def test_floods_end_fast_and_small(raw_server, head, needle):
    srv = raw_server(stream_after(head))
    started = time.monotonic()
    message = refused(srv.url, timeout=8)
    assert needle in message
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("response,needle", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "IncompleteRead"),
    (b"SSH-2.0-OpenSSH_9\r\n", "BadStatusLine"),
    (b"", "closed the connection without answering"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", "more than 100 headers"),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", "Content-Encoding 'gzip'"),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nabc", "Content-Encoding 'br'"),
    (b"HTTP/1.1 302 Found\r\nLocation: /pointer\r\nContent-Length: 0\r\n\r\n", "redirects"),
    (b"HTTP/1.1 302 Found\r\nLocation: file:///etc/shadow\r\n\r\n", "no usable Location"),
    (b"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1/x\r\n\r\n", "unsupported scheme"),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope", "HTTP 404"),
], ids=["short-body", "not-http", "closed", "endless-headers", "gzip", "br", "redirect-loop", "file-scheme",
        "ftp-scheme", "404"])
def test_refusals(raw_server, response, needle):
    srv = raw_server(canned(response))
    assert needle in refused(srv.url, timeout=10)


def test_error_text_never_carries_response_bodies(raw_server):
    srv = raw_server(canned(b"HTTP/1.1 500 Internal\r\nContent-Length: 20\r\n\r\nSECRET-INTERNAL-DATA"))
    message = refused(srv.url, timeout=2)
    assert "HTTP 500" in message and "SECRET" not in message


# ---------------------------------------------------------------------------
# One deadline


def trickle(head: bytes, every: float = 1.0):
    def handler(conn: socket.socket, n: int) -> None:
        conn.sendall(head)
        srv_closed = handler.server.closed  # type: ignore[attr-defined]
        while not srv_closed.wait(every):
            conn.sendall(b"x")
    return handler


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",                  # the body, a byte a second
    b"HTTP/1.1 200 OK\r\nX-Slow: ",                                         # a header that never ends
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-Trailer: ",  # endless trailer
], ids=["body", "header", "trailer"])
def test_trickling_server_ends_within_the_timeout(raw_server, head):
    handler = trickle(head, every=0.3)
    srv = raw_server(handler)
    handler.server = srv  # type: ignore[attr-defined]
    started = time.monotonic()
    message = refused(srv.url, timeout=2)
    took = time.monotonic() - started
    assert "timed out after 2s" in message
    assert 1.9 < took < 3.0


def test_silent_connection_is_retried_within_the_deadline(raw_server):
    """A connection a NAT box dropped: the first goes silent, the retry answers."""
    def handler(conn: socket.socket, n: int) -> None:
        if n == 0:
            srv.sleep(30)
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    srv = raw_server(handler)
    started = time.monotonic()
    assert fetch(srv.url, timeout=4).body == b"ok"
    assert time.monotonic() - started < 4
    assert len(srv.requests) == 2


def test_silent_server_ends_within_the_timeout(raw_server):
    srv = raw_server(lambda conn, n: srv.sleep(30))
    started = time.monotonic()
    assert "timed out" in refused(srv.url, timeout=2)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("first", [
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
    b"",  # closed without an answer (reset)
])
def test_transient_failures_are_retried(raw_server, first, capsys):
    srv = raw_server(canned(first, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert fetch(srv.url, timeout=10).body == b"ok"
    assert len(srv.requests) == 2
    assert "try 1 of 4" in capsys.readouterr().err


def test_refused_connection_is_retried_until_the_server_comes_up():
    """network-online.target lied: the server appears a second later."""
    port = servers.free_port()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    import threading

    def later():
        time.sleep(1.2)
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        conn, _ = sock.accept()
        servers.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.close()
    t = threading.Thread(target=later, daemon=True)
    t.start()
    try:
        assert fetch(f"http://127.0.0.1:{port}/p", timeout=10).body == b"ok"
    finally:
        t.join(5)
        sock.close()


def test_not_found_is_not_retried(raw_server):
    srv = raw_server(canned(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
    refused(srv.url)
    assert len(srv.requests) == 1


# ---------------------------------------------------------------------------
# Credentials and text from the server


TOKEN = "tok-3f9a1c-SECRET"


def test_echoed_token_is_redacted_everywhere_in_the_error(raw_server):
    srv = raw_server(canned(
        f"HTTP/1.1 401 {TOKEN}\r\nWWW-Authenticate: Bearer realm=\"{TOKEN}\"\r\nContent-Length: {len(TOKEN)}\r\n\r\n"
        f"{TOKEN}".encode()))
    message = refused(srv.url, token=TOKEN)
    assert TOKEN not in message and "401" in message
    assert f"Authorization: Bearer {TOKEN}".encode() in srv.requests[0]


def test_token_goes_to_the_first_origin_only(raw_server):
    other = raw_server(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    same = raw_server(canned(b"HTTP/1.1 302 Found\r\nLocation: /again\r\n\r\n",
                             f"HTTP/1.1 302 Found\r\nLocation: {other.url}\r\n\r\n".encode()))
    assert fetch(same.url, token=TOKEN).body == b"ok"
    assert all(f"Bearer {TOKEN}".encode() in r for r in same.requests)
    assert len(same.requests) == 2
    assert b"Authorization" not in other.requests[0]


def test_url_credentials_become_basic_auth_for_the_origin_only(raw_server):
    srv = raw_server(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    url = srv.url.replace("http://", "http://ci:pa%40ss@")
    assert fetch(url).body == b"ok"
    assert b"Authorization: Basic Y2k6cGFAc3M=" in srv.requests[0]  # ci:pa@ss
    assert b"ci:pa" not in srv.requests[0].split(b"\r\n")[0]


def test_control_characters_from_the_server_are_escaped(raw_server):
    srv = raw_server(canned(b"HTTP/1.1 302 \x1b[2K\rstate: up_to_date\x07\r\nLocation: \x1b]0;pwned\x07/x\x00y\r\n\r\n",
                            b"HTTP/1.1 404 \x1b[31mgone\r\nContent-Length: 0\r\n\r\n"))
    message = refused(srv.url)
    assert message.isprintable() and "\x1b" not in message and "\x00" not in message


def test_unsafe_validators_are_not_kept(raw_server):
    srv = raw_server(canned(b'HTTP/1.1 200 OK\r\nETag: "a\x1bb"\r\nLast-Modified: ' + b"x" * 300 +
                            b"\r\nContent-Length: 2\r\n\r\nok"))
    resp = fetch(srv.url)
    assert resp.etag is None and resp.last_modified is None


def test_printable_escapes_everything_a_terminal_acts_on():
    assert ad.printable("a\x1b[2Kb\r\n\x00\u202e\x7f") == "a\\x1b[2Kb\\x0d\\x0a\\x00\\u202e\\x7f"
    assert ad.printable("plain text: ünïcode") == "plain text: ünïcode"


# ---------------------------------------------------------------------------
# Signals


def test_sigterm_during_a_fetch_ends_it_at_once(raw_server):
    srv = raw_server(lambda conn, n: srv.sleep(30))
    import signal
    old_term = signal.getsignal(signal.SIGTERM)
    old_int = signal.getsignal(signal.SIGINT)
    ad.Stopping.install()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0)
        timer = __import__("threading").Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        started = time.monotonic()
        with pytest.raises(ad.Interrupted):
            fetch(srv.url, timeout=20)
        assert time.monotonic() - started < 1.5
    finally:
        ad.Stopping.requested = False
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


# ---------------------------------------------------------------------------
# Real servers: nginx, tinyproxy, TLS


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    if servers.missing(servers.OPENSSL):
        pytest.skip(servers.missing(servers.OPENSSL))
    return servers.TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def nginx(tmp_path, ca):
    if servers.missing(servers.NGINX):
        if IN_CI:
            raise RuntimeError(servers.missing(servers.NGINX))
        pytest.skip(servers.missing(servers.NGINX))
    srv = servers.Nginx(tmp_path / "nginx", ca)
    yield srv
    srv.close()


def test_nginx_validators_and_gzip_on(nginx):
    url = nginx.publish(A + "\n")
    first = fetch(url)
    assert first.body == (A + "\n").encode()
    assert first.etag and first.last_modified  # nginx's own
    again = fetch(url, headers={"If-None-Match": first.etag})
    assert again.status == 304 and again.body == b""


def test_nginx_forced_content_encoding_is_a_fetch_error(nginx):
    nginx.publish(A + "\n")
    assert "Content-Encoding 'gzip'" in refused(f"{nginx.base}/forced-gzip")


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_nginx_redirects(nginx, code):
    nginx.publish(A + "\n")
    assert fetch(f"{nginx.base}/r{code}").body == (A + "\n").encode()


def test_nginx_redirect_limits(nginx):
    nginx.publish(A + "\n")
    assert fetch(f"{nginx.base}/chain").body.startswith(A.encode())
    assert "redirects" in refused(f"{nginx.base}/loop")


def test_tls_with_a_test_ca(nginx, ca, monkeypatch):
    nginx.publish(A + "\n")
    assert "TLS error" in refused(f"{nginx.tls_base}/pointer")  # the CA is not trusted yet: not retried
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))
    assert fetch(f"{nginx.tls_base}/pointer").body.startswith(A.encode())
    assert "https:// to plain http://" in refused(f"{nginx.tls_base}/to-plain")


@pytest.fixture
def proxy(tmp_path):
    if servers.missing(servers.TINYPROXY):
        if IN_CI:
            raise RuntimeError(servers.missing(servers.TINYPROXY))
        pytest.skip(servers.missing(servers.TINYPROXY))
    p = servers.Tinyproxy(tmp_path / "proxy")
    yield p
    p.close()


@pytest.fixture
def proxied_nginx(tmp_path, ca, proxy):
    """nginx that answers only connections from the proxy."""
    srv = servers.Nginx(tmp_path / "nginx", ca, only_from=proxy.bind)
    yield srv
    srv.close()


def test_proxy_from_the_environment(proxied_nginx, proxy, monkeypatch):
    url = proxied_nginx.publish(A + "\n")
    assert "HTTP 403" in refused(url)  # direct: refused
    monkeypatch.setenv("http_proxy", proxy.url)
    assert fetch(url).body.startswith(A.encode())
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert "HTTP 403" in refused(url)  # no_proxy honoured: direct again


def test_https_through_the_proxy(proxied_nginx, proxy, ca, monkeypatch):
    proxied_nginx.publish(A + "\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))
    monkeypatch.setenv("https_proxy", proxy.url)
    assert fetch(f"{proxied_nginx.tls_base}/pointer").body.startswith(A.encode())
    assert any("CONNECT" in line for line in proxy.log.read_text().splitlines())


# ---------------------------------------------------------------------------
# The URL a newcomer types


@pytest.mark.parametrize("url,needle", [
    ("ftp://example.org/p", "only http"), ("http:///p", "no host"), ("http://a b/p", "spaces"),
    ("http://host/p\x1b[2J", "control"), ("http://[::1/p", "IPv6"), ("http://[zz::1]/p", "IPv6"),
    ("http://host:99999/p", "out of range"), ("example.org/pointer", "only http"),
    ("http://h%00x/p", "percent-escapes"), ("http://a..b/p", "bad host name"), (f"http://{'a' * 70}.com/p", "bad host"),
    ("http://h:0/p", "port 0"),
])
def test_bad_urls_are_usage_errors(url, needle):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        ad.http_url(url)
    assert needle in str(exc.value) and "\x1b" not in str(exc.value)


def test_urls_are_encoded():
    assert ad.http_url("https://bücher.example/päth?q=ü") == "https://xn--bcher-kva.example/p%C3%A4th?q=%C3%BC"
    assert ad.http_url("http://[::1]:8080/p") == "http://[::1]:8080/p"
    assert ad.http_url("http://u:p@host/a%20b") == "http://u:p@host/a%20b"


# ---------------------------------------------------------------------------
# Found by the adversarial review of this fetcher (each reproduced first)


def test_proxy_credentials_never_reach_a_hop_that_bypasses_the_proxy(tmp_path, ca, proxy, raw_server,
                                                                     monkeypatch):
    capture = raw_server(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    nginx = servers.Nginx(tmp_path / "nginx", ca, other_origin=f"http://localhost:{capture.port}")
    try:
        monkeypatch.setenv("http_proxy", proxy.url.replace("http://", "http://ops:Pr0xyPass@"))
        monkeypatch.setenv("no_proxy", "localhost")
        assert fetch(f"{nginx.base}/elsewhere").body == b"ok"   # via the proxy, then direct
    finally:
        nginx.close()
    assert b"proxy-authorization" not in capture.requests[0].lower()
    assert b"Pr0xyPass" not in capture.requests[0]


def test_proxy_password_echoed_by_the_proxy_is_masked(raw_server, monkeypatch):
    fake_proxy = raw_server(canned(b"HTTP/1.1 407 Proxy Authentication Required for ops:Pr0xyPass\r\n"
                                   b"Content-Length: 0\r\n\r\n"))
    monkeypatch.setenv("https_proxy", f"http://ops:Pr0xyPass@127.0.0.1:{fake_proxy.port}")
    message = refused("https://127.0.0.1:9/pointer")
    assert "407" in message and "Pr0xyPass" not in message


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Encoding: TOK-8C1F2E-secret-TOKEN-WITH-A-LONG-TAIL-xyz\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\ntok-8c1f2e-SECRET-TOKEN-WITH-A-LONG-TAIL-xyz\r\n",
], ids=["content-encoding", "chunk-size"])
def test_token_echoed_in_framing_is_masked(raw_server, response):
    srv = raw_server(canned(response))
    message = refused(srv.url, token="tok-8c1f2e-SECRET-TOKEN-WITH-A-LONG-TAIL-xyz")
    assert "8c1f2e" not in message.lower()


def test_a_non_http_service_behind_a_redirect_is_not_read_back(raw_server):
    banner = raw_server(canned(b"220 mail.internal.corp ESMTP Postfix secret-build-42 " + b"x" * 60000 + b"\r\n"))
    start = raw_server(canned(f"HTTP/1.1 302 Found\r\nLocation: http://localhost:{banner.port}/\r\n\r\n".encode()))
    message = refused(start.url)
    assert "not an HTTP response" in message
    assert "mail.internal" not in message and len(message) < 300


def test_dns_that_never_answers_is_cut_off_by_the_deadline(monkeypatch):
    import socket as socket_mod

    def hanging(*args, **kwargs):
        time.sleep(8)
        raise socket_mod.gaierror(-3, "Temporary failure in name resolution")
    monkeypatch.setattr(socket_mod, "getaddrinfo", hanging)
    started = time.monotonic()
    assert "timed out after 1.5s" in refused("http://pointer.example/p", timeout=1.5)
    assert time.monotonic() - started < 2.5


def test_url_credentials_are_masked_in_every_form(raw_server):
    echo = b"pointer for deploy, ZGVwbG95OnBAc3Mh and p@ss! and p%40ss%21"
    srv = raw_server(canned(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(echo), echo)))
    resp = fetch(srv.url.replace("http://", "http://deploy:p%40ss%21@"))
    with pytest.raises(ad.PointerError) as exc:
        ad.parse_pointer(resp.body)
    message = str(exc.value)
    assert "ZGVwbG95OnBAc3Mh" not in message and "p@ss!" not in message and "p%40ss%21" not in message
    assert "***" in message


# ---------------------------------------------------------------------------
# Bad host names from a server (issue #18, item 3): the real agent
# ---------------------------------------------------------------------------

BAD_HOSTS = ["a..b", "x" * 64 + ".example"]


def redirect_to(target: str) -> bytes:
    return (f"HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n").encode()


@pytest.mark.parametrize("bad", BAD_HOSTS)
def test_redirect_to_a_bad_host_name_is_a_fetch_error(host, raw_server, bad):
    srv = raw_server(lambda conn, n: conn.sendall(redirect_to(f"http://{bad}/pointer")))
    r = host.once(srv.url)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and "bad host name" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "KeyError" not in r.stderr and "internal" not in r.stderr
    assert host.state()["last_error"]["kind"] == "fetch"


@pytest.mark.parametrize("bad", BAD_HOSTS)
def test_bad_host_name_in_the_connectivity_check_rolls_back(host, world, raw_server, bad):
    a, b = world.path("a"), world.path("b")
    pointer = f"{b}\n".encode()

    def answer(conn, n):
        if n == 0:  # the pointer; every later request (the connectivity check) is redirected
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(pointer), pointer))
        else:
            conn.sendall(redirect_to(f"http://{bad}/pointer"))
    srv = raw_server(answer)
    assert host.once(host.url).returncode == 0  # tracking a
    r = host.once(srv.url)
    assert r.returncode == 5, r.stderr
    assert "connectivity check failed" in r.stderr and "bad host name" in r.stderr
    assert "Traceback" not in r.stderr and "internal" not in r.stderr
    state = host.state()
    assert host.current == a and host.profile == a
    assert state["intent"] is None and state["quarantined"] == b and state["last_state"] == "rolled_back"


# ---------------------------------------------------------------------------
# The agent's fetches (real nix): a failed fetch changes nothing
# ---------------------------------------------------------------------------


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
# The real agent against hostile and real servers (real nix): server bytes
# escaped, secrets masked, slow and flooding servers, validators and ETags,
# proxies
# ---------------------------------------------------------------------------


def hook_dump(host, tmp_path) -> tuple[str, Path]:
    dump = host.var_lib / "hook.env"
    return "env | grep NIXOS_AUTODEPLOY_ > /var/lib/hook.env", dump


def test_escape_sequences_and_nul_from_the_server_reach_no_one(host, world, server, tmp_path):
    hook, dump = hook_dump(host, tmp_path)
    server.set("/start", "", status=302,
               headers={"Location": "/x\x1b[2K\rnixos-autodeploy: state: up_to_date\x1b]0;pwned\x07\x00end"})
    server.set("/bad", "\x1b[2J\x1b[Hnixos-autodeploy: state: up_to_date\x00\n")
    for path in ("/start", "/bad"):
        r = host.once(server.base + path, "-v", "--on-failure", hook)
        assert r.returncode in (3, 4), r.stderr
        assert "\x1b" not in r.stderr and "\x00" not in r.stderr and "\x07" not in r.stderr
        assert not any(line.startswith("nixos-autodeploy: state:") for line in r.stderr.splitlines())
        env = dump.read_text()
        assert "NIXOS_AUTODEPLOY_ERROR=" in env and "\x1b" not in env
        dump.unlink()
        persisted = everything_persisted(host)
        assert "\x1b" not in persisted and "\\u001b" not in persisted
        status = host.agent("status")
        assert status.returncode == 0 and "\x1b" not in status.stdout


def test_nul_in_a_redirect_does_not_kill_loop_mode(host, world, server):
    server.set("/start", "", status=302, headers={"Location": "/\x00"})
    proc = host.agent_background("--url", server.base + "/start", "--interval", "0.05",
                                 "--on-failure", "true", "--prometheus-path", METRICS)
    try:
        wait_for(lambda: sum(q["path"] == "/start" for q in server.requests) >= 4, what="4 polls")
        assert proc.poll() is None, proc.log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0 and "ValueError" not in proc.log_path.read_text()


def test_echoed_token_leaks_nowhere(host, world, server, tmp_path):
    token_file = host.var_lib / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    server.set("/pointer", f"unauthorized, token was {TOKEN}", status=401,
               headers={"WWW-Authenticate": f'Bearer realm="{TOKEN}"', "X-Echo": TOKEN})
    hook, dump = hook_dump(host, tmp_path)
    r = host.once(host.url, "-v", "--token-file", "/var/lib/token", "--on-failure", hook)
    assert r.returncode == 3 and "HTTP 401" in r.stderr, r.stderr
    assert pointer_requests(server)[-1]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    seen = [r.stderr, everything_persisted(host), dump.read_text(), host.agent("status").stdout,
            host.agent("status", "--json").stdout]
    assert not [s for s in seen if TOKEN in s]
    # The pointer itself echoing the token: refused, with the excerpt redacted.
    server.set("/pointer", f"<html>{TOKEN}</html>")
    r = host.once(host.url, "--token-file", "/var/lib/token")
    assert r.returncode == 4 and "***" in r.stderr and TOKEN not in r.stderr + everything_persisted(host)


def test_token_echoed_as_a_pointer_key_leaks_nowhere(host, world, server, tmp_path):
    token = "deadbeefcafe0123456789abcdef0123"
    token_file = host.var_lib / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    hook, dump = hook_dump(host, tmp_path)
    for body in (f"{world.path('a')}\n{token}: echoed\n", f"{world.path('a')}\nx-{token}: 1\nx-{token}: 2\n"):
        server.set("/pointer", body)
        r = host.once(host.url, "--token-file", "/var/lib/token", "--on-failure", hook)
        assert r.returncode == 4, r.stderr
        assert token not in r.stderr + everything_persisted(host) + dump.read_text()


def test_redirect_to_an_internal_endpoint_reads_nothing_back(host, world, server):
    internal = type(server)(world.cache)
    try:
        internal.set("/admin", "INTERNAL-SECRET: db password hunter2\n")
        server.set("/pointer", "", status=302, headers={"Location": internal.base + "/admin"})
        r = host.once(host.url)
        assert r.returncode == 4, r.stderr
        assert "redirect target on another host" in r.stderr
        assert "INTERNAL-SECRET" not in r.stderr + everything_persisted(host)
    finally:
        internal.close()


@pytest.mark.parametrize("line", ["rollout: INTERNAL-SECRET", "rollout-start: INTERNAL-SECRET\nrollout-duration: 1h",
                                  "rollout-start: 2026-01-01T00:00:00Z\nrollout-duration: INTERNAL-SECRET",
                                  "pause: INTERNAL-SECRET"])
def test_rollout_text_from_another_origin_is_shown_nowhere(host, world, server, tmp_path, line):
    """Issue #18, item 7: the rule for pointer excerpts also holds for rollout fields."""
    internal = type(server)(world.cache)
    try:
        internal.set("/admin", f"{world.path('b')}\n{line}\n")
        server.set("/pointer", "", status=302, headers={"Location": internal.base + "/admin"})
        hook, dump = hook_dump(host, tmp_path)
        r = host.once(host.url, "--on-failure", hook, "--prometheus-path", METRICS)
        assert r.returncode == 4, r.stderr
        assert "redirect target on another host" in r.stderr
        seen = [r.stderr, everything_persisted(host), dump.read_text(), host.agent("status").stdout,
                host.agent("status", "--json").stdout]
        assert not [s for s in seen if "INTERNAL-SECRET" in s]
        # The same pointer from the pointer's own origin is shown (escaped): the rule is about origins.
        server.set("/pointer", f"{world.path('b')}\n{line}\n")
        r = host.once(host.url)
        assert r.returncode == 4 and "INTERNAL-SECRET" in r.stderr, r.stderr
    finally:
        internal.close()


def test_a_password_never_masks_the_agents_own_words(host, world, server, tmp_path):
    b = world.path("b")
    url = host.url.replace("http://", "http://ops:deploy@")
    assert host.once(url).returncode == 0  # tracking a
    server.pointer(b)
    hook, dump = hook_dump(host, tmp_path)
    r = host.once(url, "--on-success", hook, "--prometheus-path", METRICS)
    assert r.returncode == 0, r.stderr
    assert host.current == b
    text = host.metrics_text()
    assert 'nixos_autodeploy_state{state="deployed"} 1' in text and "***ed" not in text
    assert "deployed" in r.stderr and "***ed" not in r.stderr
    assert "NIXOS_AUTODEPLOY_OUTCOME=deployed" in dump.read_text().splitlines()
    status = host.agent("status")
    assert "deployed" in status.stdout and "***" not in status.stdout
    assert host.state()["last_state"] == "deployed" and "***" not in host.state()["last_reason"]
    # What came from outside is still masked: the pointer echoing the password, in any case.
    server.set("/pointer", "<html>DePloy</html>\n")
    r = host.once(url)
    assert r.returncode == 4, r.stderr
    assert "***" in r.stderr and "DePloy" not in r.stderr + everything_persisted(host)
    assert "ops:deploy" not in r.stderr + everything_persisted(host)


def test_trickling_server_ends_the_run_within_the_timeout(host, world):
    def handler(conn, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        while srv.sleep(0.5):
            conn.sendall(b"x")
    srv = servers.RawServer(handler)
    try:
        started = time.monotonic()
        r = host.once(srv.url, "--timeout", "3")
        took = time.monotonic() - started
    finally:
        srv.close()
    assert r.returncode == 3, r.stderr
    assert [line for line in r.stderr.splitlines() if "error:" in line] == [
        f"nixos-autodeploy: error: GET {srv.url}: timed out after 3s"]
    assert took < 5.5


def test_flood_with_a_negative_chunk_size_stays_small(host, world):
    def handler(conn, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n")
        end = time.monotonic() + 10
        while time.monotonic() < end and not srv.closed.is_set():
            conn.sendall(b"x" * 65536)
    srv = servers.RawServer(handler)
    try:
        proc = subprocess.Popen([servers_unshare(host), *host.agent_argv("--once", "--url", srv.url)],
                                env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = proc.stderr.read().decode()   # until the agent exits
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        srv.close()
    assert proc.returncode == 3, err
    assert "invalid chunk size" in err
    # The agent itself takes 15-25 MiB; the flood is sent for 10 s on loopback
    # (gigabytes): buffering any of it would show at once.
    assert usage.ru_maxrss < 100 * 1024, f"peak RSS {usage.ru_maxrss} KiB: {err}"


def servers_unshare(host) -> str:
    """A wrapper script that enters the host's namespace (for wait4 on the agent itself)."""
    script = host.root / "enter.sh"
    from world import bind_script
    script.write_text(f"#!/bin/sh\nexec unshare -m --propagation private /bin/sh -c '{bind_script(host.binds)} "
                      f"&& exec \"$@\"' sh \"$@\"\n")
    script.chmod(0o755)
    return str(script)


def test_sigterm_during_a_fetch_changes_nothing(host, world):
    srv = servers.RawServer(lambda conn, n: srv.sleep(60))
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    try:
        assert host.once(host.url).returncode == 0
        before = state_file.read_bytes(), os.stat(state_file).st_mtime_ns
        proc = host.agent_background("--once", "--url", srv.url, "--timeout", "60")
        wait_for(lambda: srv.requests, what="the request")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert time.monotonic() - started < 1.5
    finally:
        srv.close()
    assert (state_file.read_bytes(), os.stat(state_file).st_mtime_ns) == before


def test_gzip_from_nginx_is_a_fetch_error_not_a_refusal(host, world, tmp_path):
    nginx = servers.Nginx(tmp_path / "nginx")
    try:
        nginx.publish(world.path("b") + "\n")
        r = host.once(f"{nginx.base}/forced-gzip")
    finally:
        nginx.close()
    assert r.returncode == 3 and "Content-Encoding 'gzip'" in r.stderr, r.stderr
    assert host.current == world.path("a")


def test_validators_belong_to_one_url(host, world, tmp_path):
    """Two pointers with nginx's identical ETags (same size, same second)."""
    a, b = world.path("a"), world.path("b")
    nginx = servers.Nginx(tmp_path / "nginx")
    try:
        now = int(time.time())
        url_a = nginx.publish(a + "\n", "pa", mtime=now)
        url_b = nginx.publish(b + "\n", "pb", mtime=now)
        assert host.once(url_a).returncode == 0
        r = host.once(url_b)
        assert r.returncode == 0 and host.current == b, r.stderr
        assert '"GET /pb HTTP/1.1" 200' in "\n".join(nginx.access_log())
    finally:
        nginx.close()


def test_a_weak_etag_cannot_hide_a_change_for_more_than_an_hour(host, world, tmp_path):
    a, b = world.path("a"), world.path("b")
    nginx = servers.Nginx(tmp_path / "nginx")
    state_file = host.var_lib / "nixos-autodeploy" / "state.json"
    try:
        now = int(time.time())
        url = nginx.publish(a + "\n", mtime=now)
        assert host.once(url).returncode == 0
        nginx.publish(b + "\n", mtime=now)   # same size, same second: the same ETag
        assert host.once(url).returncode == 0 and host.current == a  # 304: not seen yet
        assert nginx.access_log()[-1].split('"')[2].split()[0] == "304"
        data = json.loads(state_file.read_text())
        data["pointer"]["fetched_at"] -= 3601   # an hour later
        state_file.write_text(json.dumps(data))
        r = host.once(url)
        assert r.returncode == 0 and host.current == b, r.stderr
        assert nginx.access_log()[-2].split('"')[2].split()[0] == "200"
    finally:
        nginx.close()


def test_once_after_a_failure_fetches_unconditionally(host, world, server):
    server.pointer(world.path("a"), etag=True)
    assert host.once(host.url).returncode == 0
    server.unreachable = True
    assert host.once(host.url).returncode == 3
    server.unreachable = False
    assert host.once(host.url).returncode == 0
    assert "If-None-Match" not in pointer_requests(server)[-1]["headers"]
    assert host.once(host.url).returncode == 0
    assert "If-None-Match" in pointer_requests(server)[-1]["headers"]


def test_transient_failure_is_retried_within_the_run(host, world, server):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    server.pointer(b)
    calls = []

    def flaky(headers):
        calls.append(1)
        server.routes["/pointer"].status = 200 if len(calls) > 1 else 503
    server.routes["/pointer"].hook = flaky
    server.routes["/pointer"].status = 503
    r = host.once(host.url)
    assert r.returncode == 0 and host.current == b, r.stderr
    assert "HTTP 503 (try 1 of 4" in r.stderr


def test_proxy_only_host_deploys_through_the_proxy(host, world, tmp_path):
    b = world.path("b")
    assert host.once(host.url).returncode == 0
    proxy = servers.Tinyproxy(tmp_path / "proxy")
    nginx = servers.Nginx(tmp_path / "nginx", only_from=proxy.bind)
    try:
        url = nginx.publish(b + "\n")
        r = host.once(url)
        assert r.returncode == 3 and "HTTP 403" in r.stderr, r.stderr   # direct: refused
        r = host.once(url, env={"http_proxy": proxy.url})
        assert r.returncode == 0 and host.current == b, r.stderr
        assert any("/pointer" in line and "200" in line for line in nginx.access_log())
    finally:
        nginx.close()
        proxy.close()
