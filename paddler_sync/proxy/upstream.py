"""Talking to llama.cpp: which requests take a slot, header rules, and the pooled connections.

The session trusts no environment (no proxy, netrc or CA-bundle lookups on every request: a free
+29 % in requests per second, measured on loopback), sends only the client's headers, forwards bodies byte
for byte (no decoding), so Content-Length and Content-Encoding stay true, and retries a request only
when no server can have seen it: a refused connection (elsewhere, by the proxy) or a kept-alive
connection that llama.cpp had already closed (here, on a fresh connection to the same server).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import logging
import queue
import socket
import time
from typing import TYPE_CHECKING, Any, cast

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPConnectionPool
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ClosedPoolError, ConnectTimeoutError, NewConnectionError, ProtocolError
from urllib3.util.url import _encode_target

from paddler_sync.ledger.buffer import Watch
from paddler_sync.proxy.answer import UpstreamAnswer
from paddler_sync.sockets import send_all

if TYPE_CHECKING:
    from urllib3._base_connection import BaseHTTPConnection

# Which POSTs become a llama.cpp task (generation, embedding, reranking, transcription) and so take a
# slot: read off both real builds the tests run, b4748 and a 2026 one (with every slot busy, these wait inside
# llama.cpp; everything else answers at once) and checked by tests/real/test_real_llamacpp.py. Both the
# native names and the OpenAI/Anthropic-compatible ones, with and without /v1, as llama-server routes them.
SLOT_PATHS = frozenset({
    "/completion", "/completions", "/v1/completions",           # text completion
    "/chat/completions", "/v1/chat/completions",                 # OpenAI chat
    "/responses", "/v1/responses",                               # OpenAI Responses (2026 builds)
    "/v1/messages",                                              # Anthropic Messages (2026 builds)
    "/infill",                                                   # fill-in-the-middle
    "/embedding", "/embeddings", "/v1/embeddings",               # embeddings
    "/rerank", "/reranking", "/v1/rerank", "/v1/reranking",      # reranking
    "/audio/transcriptions", "/v1/audio/transcriptions",         # speech to text (2026 builds)
})
# Answered by llama.cpp's HTTP thread without a slot (documented, and tested as slot-free on the real builds):
# /tokenize, /detokenize, /apply-template, /v1/messages/count_tokens, /v1/chat/completions/input_tokens,
# /chat/completions/input_tokens, /v1/responses/input_tokens, /responses/input_tokens, every GET.

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
                        "expect"})  # gunicorn answered Expect: 100-continue itself; the body goes in one piece


def uses_slot(method: str, path: str) -> bool:
    return method == "POST" and path.rstrip("/") in SLOT_PATHS


class ClientLeft(Exception):
    """The client closed its connection while its request ran upstream; the upstream call was cut."""


class UpstreamConnection(HTTPConnection):
    """A connection that remembers when it went idle, so the pool can retire it before llama.cpp does."""

    idle_since: float = 0.0

    def _new_conn(self) -> socket.socket:
        """To an IP address (as agents report them), connect without asking a resolver: gevent resolves every
        name, numeric ones too, in its thread pool, a hand-off to a thread per new connection (a burst of new
        streams queued behind the pool's threads). Names still go through urllib3 and the resolver."""
        family = ip_family(self._dns_host)
        if family is None:
            return super()._new_conn()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            for option in self.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(self.timeout)  # the pool sets its connect timeout before connecting
            sock.connect((self._dns_host, self.port))
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                            f"(connect timeout={self.timeout})") from exc
        except OSError as exc:
            sock.close()
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        return sock


@functools.lru_cache(maxsize=1024)
def ip_family(host: str) -> socket.AddressFamily | None:
    """AF_INET or AF_INET6 for an IP address literal; None for a name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


class UpstreamPool(HTTPConnectionPool):
    """One llama.cpp server's connections.

    llama.cpp (cpp-httplib) closes a kept-alive connection after 5 s idle, and b4748 closes idle ones
    early whenever a new connection waits for one of its HTTP threads (each open connection pins one).
    A request written on such a connection gets no answer (``RemoteDisconnected``) although the server
    never saw it. So idle connections are retired after ``idle_timeout``, well before the server's, and a
    request that got nothing back on a reused connection is sent again on the next one: at most
    ``maxsize + 1`` tries, the last on a connection opened for it. (urllib3 polls each pooled connection
    before reuse to see whether it was dropped; that try-again-on-nothing makes the poll, a syscall per
    request, unnecessary.)

    The pool opens and keeps the connections; the request is written in one ``send`` and the answer read by
    :class:`~paddler_sync.proxy.answer.UpstreamAnswer` (which keeps the read timeout with a timer of its own).
    """

    ConnectionCls = UpstreamConnection
    idle_timeout: float = 2.0
    connect_timeout: float = 5.0
    read_timeout: float = 600.0

    def _get_conn(self, timeout: float | None = None) -> BaseHTTPConnection:
        if self.pool is None:
            raise ClosedPoolError(self, "the pool was closed")
        try:
            conn = self.pool.get(block=False)
        except queue.Empty:
            conn = None
        if conn is None:
            return self._new_conn()
        if conn.sock is not None and time.monotonic() - conn.idle_since > self.idle_timeout:
            conn.close()  # reconnects when used
        return conn

    def _put_conn(self, conn: BaseHTTPConnection | None) -> None:
        if conn is not None:
            conn.idle_since = time.monotonic()  # type: ignore[attr-defined]
        super()._put_conn(conn)

    def send(self, method: str, target: str, headers: dict[str, str], body: bytes | None,
             client: Watch | None = None) -> UpstreamAnswer:
        """The answer, its head read and its body not; ``client`` (when given) cuts the call if it leaves."""
        message = request_message(method, target, headers, body)
        for _ in range(self.pool.maxsize + 1 if self.pool else 1):
            conn = cast(HTTPConnection, self._get_conn())  # ConnectionCls: always an UpstreamConnection
            reused = conn.sock is not None
            cut = _Cut(conn, client)
            answer = None
            try:
                if not reused:
                    conn.timeout = self.connect_timeout
                    conn.connect()
                conn.sock.settimeout(self.read_timeout)  # bounds a send that waits for llama.cpp's window
                send_all(conn.sock, message)
                answer = UpstreamAnswer(self, conn, method, self.read_timeout)
                answer.read_head()
            except BaseException as exc:
                if answer is not None:
                    answer.stop_reading()
                conn.close()
                self._put_conn(None)
                if cut.fired:
                    raise ClientLeft("the client left while llama.cpp ran its request") from exc
                if reused and _nothing_came_back(exc):
                    continue
                raise
            finally:
                cut.stop()
            return answer
        raise ProtocolError("every pooled connection was closed by the server", None)


def request_message(method: str, target: str, headers: dict[str, str], body: bytes | None) -> bytes:
    """The request line, headers and body as one buffer: one write, one TCP segment for a small request."""
    lines = [f"{method} {_encode_target(target)} HTTP/1.1\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    return head + body if body else head


def _nothing_came_back(exc: BaseException) -> bool:
    """The server closed or reset the connection before any byte of an answer (or refused our write)."""
    return isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError
                      | ConnectionAbortedError)


class _Cut:
    """While a request runs upstream, a client that hangs up closes the upstream connection too, so
    llama.cpp stops generating for nobody (it polls its socket), as it would with the client itself."""

    def __init__(self, conn: HTTPConnection, client: Watch | None) -> None:
        self.conn = conn
        self.client = client
        self.fired = False
        if client is not None:
            client.start(self._client_gone)

    def _client_gone(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()


class Transport:
    """Sends requests to llama.cpp servers through a requests session's connection pools.

    The session (and its mounted HTTPAdapter) owns the pools: one :class:`UpstreamPool` per server,
    at most ``pool_size`` idle connections each. The hot path then calls the server's pool directly:
    requests' per-request layers (preparing, merging settings, hooks, cookies, the Response wrapper)
    cost more CPU than the rest of the proxy together, and a proxy needs none of them
    (bench/RESULTS.md has the profile).
    """

    def __init__(self, pool_size: int, connect_timeout: float, read_timeout: float,
                 idle_timeout: float = UpstreamPool.idle_timeout) -> None:
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers = CaseInsensitiveDict()
        self.adapter = HTTPAdapter(pool_connections=1024, pool_maxsize=pool_size, pool_block=False, max_retries=0)
        self.adapter.poolmanager.pool_classes_by_scheme = {"http": UpstreamPool}
        self.idle_timeout = idle_timeout
        self.session.mount("http://", self.adapter)
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._pools: dict[str, UpstreamPool] = {}
        # A full pool discards the extra connection: expected under bursts, not worth a warning per request.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

    def pool(self, addr: str) -> UpstreamPool:
        pool = self._pools.get(addr)
        if pool is None or pool.pool is None:  # built once by the adapter's pool manager (None: it closed it)
            host, _, port = addr.rpartition(":")
            pool = self.adapter.poolmanager.connection_from_host(host.strip("[]"), int(port), scheme="http")
            pool.idle_timeout, pool.connect_timeout = self.idle_timeout, self.connect_timeout
            pool.read_timeout = self.read_timeout
            self._pools[addr] = pool
        return pool

    def send(self, method: str, addr: str, target: str, headers: dict[str, str], body: bytes | None,
             client: Watch | None = None) -> UpstreamAnswer:
        return self.pool(addr).send(method, target, headers, body, client)


def request_headers(environ: dict[str, Any], upstream_addr: str, rewrite_host: bool,
                    body_length: int) -> dict[str, str]:
    """The client's headers minus hop-by-hop ones, plus X-Forwarded-*; Host kept unless rewritten."""
    connection_tokens = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        name = key[5:].replace("_", "-").title()
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in connection_tokens or lowered == "content-length":
            continue
        headers[name] = value
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    if body_length or environ["REQUEST_METHOD"] in ("POST", "PUT", "PATCH"):
        headers["Content-Length"] = str(body_length)
    if rewrite_host or "Host" not in headers:
        headers["Host"] = upstream_addr
    client = environ.get("REMOTE_ADDR", "")
    previous = headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{previous}, {client}" if previous else client
    headers["X-Forwarded-Proto"] = environ.get("wsgi.url_scheme", "http")
    return headers


def response_headers(upstream: UpstreamAnswer) -> list[tuple[str, str]]:
    connection_tokens = {t.strip().lower() for t in upstream.headers.get("Connection", "").split(",")}
    headers = [(k, v) for k, v in upstream.headers.items()
               if k.lower() not in HOP_BY_HOP and k.lower() not in connection_tokens]
    if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        headers.append(("X-Accel-Buffering", "no"))
        if "Cache-Control" not in upstream.headers:
            headers.append(("Cache-Control", "no-cache"))
    return headers


def is_connect_failure(exc: Exception) -> bool:
    """True when nothing reached the server (refused, unreachable, connect timeout): safe to retry elsewhere."""
    return isinstance(exc, NewConnectionError | ConnectTimeoutError)
