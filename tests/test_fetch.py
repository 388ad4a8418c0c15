"""The fetcher against real and hostile servers (in-process: autodeploy.Fetcher).

Real servers: Debian's nginx (its own ETag, gzip, redirects, TLS with a test
CA) and tinyproxy.  Raw socket servers send what no real server sends on
purpose.  Agent-level consequences (exit codes, state, metrics) are in
test_hostile.py.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import autodeploy as ad  # noqa: E402
import servers  # noqa: E402
from util import promtool_ok, state_gauge  # noqa: E402

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
