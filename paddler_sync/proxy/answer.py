"""One llama.cpp answer read straight off the pooled connection's socket, parsed by httptools (llhttp, in C).

The hot path of the relay. http.client and urllib3 parse a response's headers with the stdlib email
parser and its chunked body line by line in Python, a large share of the balancer's CPU per relayed SSE
event (the profile: bench/RESULTS.md, "What limits paddler_sync here"). Here each read is one ``recv`` of
whatever has arrived, fed to llhttp, which calls back with the status, the headers and the decoded body
pieces; the relay passes on at once everything one read brought. Nothing is held back to batch writes: an
event is sent as soon as its read returns.

The connection goes back to its pool only when the answer ended cleanly and both sides keep it alive;
any other ending closes it, so llama.cpp sees the disconnect and frees its slot.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import gevent
import httptools
from urllib3.exceptions import ProtocolError

if TYPE_CHECKING:
    from urllib3.connection import HTTPConnection

READ_SIZE = 65536
# One read buffer for the whole worker: what a read brings is parsed (and copied out by llhttp's callbacks)
# before the greenlet can switch, so no two readers ever hold it at once, and no read allocates 64 KiB.
_BUFFER = memoryview(bytearray(READ_SIZE))
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux


class ConnectionPool(Protocol):
    def _put_conn(self, conn: HTTPConnection | None) -> None: ...


def ack_at_once(sock: socket.socket | None) -> None:
    """Acknowledge what arrives next without the kernel's delayed ACK (up to 40 ms).

    llama.cpp b4748 writes an answer's headers and body separately with Nagle's algorithm on, so its body
    waits for our ACK of the headers: 44 ms per request on a kept-alive connection (2 ms on a fresh one,
    where the kernel acknowledges at once), during which its slot is free and the balancer cannot know.
    Quick-ack mode is not sticky, so it is asked for again before each read."""
    if sock is not None and TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)


class Headers:
    """The answer's headers as sent (name case and order kept), also found without regard to case."""

    __slots__ = ("lowered", "pairs")

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []
        self.lowered: dict[str, str] = {}

    def add(self, name: str, value: str) -> None:
        self.pairs.append((name, value))
        self.lowered[name.lower()] = value

    def items(self) -> list[tuple[str, str]]:
        return self.pairs

    def get(self, name: str, default: str = "") -> str:
        return self.lowered.get(name.lower(), default)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.lowered


class SocketReader:
    """Reads a gevent socket the way a relay needs: wait until readable, then one ``recv`` of what is there.

    gevent's own ``recv`` first tries the read (on a stream between two events it fails), then waits with a
    new Timeout (a timer started and stopped) for each wait: per event a wasted syscall, an exception and a
    timer. Here the wait comes first, and one timer per answer guards the read timeout: when it fires it
    looks at how long the current wait has lasted, and throws ``TimeoutError`` into the reader only if that
    is the whole read timeout (a relay busy writing to a slow client is not waiting for llama.cpp).

    It uses two attributes of gevent's socket (``_sock``, the OS socket, and ``_read_event``, its read
    watcher, which gevent cancels when another greenlet closes the socket); tests/live/test_relay_wire.py checks
    that they are there."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.raw: socket.socket = getattr(sock, "_sock", sock)
        self.watcher: Any = getattr(sock, "_read_event", None)
        self.timeout = timeout
        self.hub = gevent.get_hub()
        self.waiting_since: float | None = None
        self.reader: Any = None  # the greenlet that reads
        self.timer: Any = None

    def read(self) -> bytes | memoryview:
        """The next bytes (empty when the server closed); ``TimeoutError`` after ``timeout`` s of silence.

        A view of the worker's read buffer: use it before anything can switch greenlets."""
        raw = self.raw
        ack_at_once(raw)  # or llama.cpp b4748 holds its next write up to 40 ms
        if self.watcher is None:  # not a gevent socket (never in the balancer): a plain blocking read
            return self.sock.recv(READ_SIZE)
        while True:
            self._wait_readable()
            try:
                return _BUFFER[:raw.recv_into(_BUFFER)]
            except BlockingIOError:
                continue  # woken without data (spurious): wait again

    def ready_within(self, seconds: float) -> bool:
        """Whether bytes (or the server's close) arrive within ``seconds``; a plain socket says yes."""
        if self.watcher is None:
            return True
        with gevent.Timeout(seconds, False):
            self._wait_readable()
            return True
        return False

    def _wait_readable(self) -> None:
        if self.timer is None:
            self._arm(self.timeout)
        self.reader = gevent.getcurrent()  # the head may be read in one greenlet, the body in another (queue updates)
        self.waiting_since = time.monotonic()
        try:
            self.hub.wait(self.watcher)
        finally:
            self.waiting_since = None

    def _arm(self, seconds: float) -> None:
        self.timer = self.hub.loop.timer(seconds)
        self.timer.start(self._check)

    def _check(self) -> None:
        self.timer.close()
        since = self.waiting_since
        waited = 0.0 if since is None else time.monotonic() - since
        if waited < self.timeout:
            self._arm(self.timeout - waited)
            return
        self.timer = None
        if not self.reader.dead:
            self.reader.throw(TimeoutError(f"llama.cpp sent nothing for {self.timeout:g}s"))

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.stop()
            self.timer.close()
            self.timer = None


class UpstreamAnswer:
    """A response from llama.cpp whose head has been read and whose body is read as the relay asks for it.

    Its callbacks (``on_*``) are llhttp's: the parser calls them while ``_feed`` runs."""

    def __init__(self, pool: ConnectionPool, conn: HTTPConnection, method: str, read_timeout: float) -> None:
        self.pool: ConnectionPool | None = pool
        self.connection: HTTPConnection | None = conn
        self.sock: socket.socket = conn.sock  # connected by the pool's send
        self.status = 0
        self.reason = ""
        self.headers = Headers()
        self.complete = False  # the whole body arrived
        self._head_done = False
        self._no_body = method == "HEAD"
        self._until_close = False  # neither length nor chunked framing: the body ends when the server closes
        self._pieces: list[bytes] = []
        self._received = 0  # bytes of this answer read so far (0: the server may never have seen the request)
        self._parser = httptools.HttpResponseParser(self)
        self._reader = SocketReader(self.sock, read_timeout)

    # --- llhttp's callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # bytes past the end of this answer: the connection's state is unknown, not reused
            self._reusable = False

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            return
        self._head_done = True
        self._keep_alive = self._parser.should_keep_alive()  # llhttp knows only while it parses this answer
        framed = "content-length" in self.headers.lowered or "chunked" in self.headers.get("Transfer-Encoding").lower()
        self._until_close = not framed and not self._no_body and self.status not in (204, 304)
        if self._no_body:
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:
            self.reason, self.headers = "", Headers()
            return
        self.complete = True

    # --- reading ----------------------------------------------------------------------------------------

    def read_head(self) -> None:
        """Read until the status and headers are in (body bytes that came with them wait for ``pieces``)."""
        while not self._head_done:
            data = self._reader.read()
            if not data:
                if self._received == 0:
                    raise http.client.RemoteDisconnected("llama.cpp closed the connection without an answer")
                raise ProtocolError("llama.cpp closed the connection in the middle of its answer's headers")
            self._feed(data)

    def pieces(self, head_after: float | None = None) -> Iterator[bytes]:
        """The body as it arrives: each read's pieces, joined, at once. ``head_after``: when no body byte has
        come that many seconds after the head, an empty piece first, so the client gets the head now, as
        llama.cpp sent it (an event stream whose first event is far off: a long prefill, a router's model
        events). Before then a failure is still the balancer's to answer (502) with nothing relayed."""
        if self._pieces:
            yield self._take()
        elif head_after is not None and not self.complete and not self._reader.ready_within(head_after):
            yield b""
        read = self._reader.read
        while not self.complete:
            if self._absorb(read()) and self._pieces:
                yield self._take()
        self.release_conn()

    def _absorb(self, data: bytes | memoryview) -> bool:
        """Feed what was read; an empty read ends an answer read until close, or is llama.cpp's failure."""
        if data:
            self._feed(data)
            return True
        if not self._until_close:
            raise ProtocolError("llama.cpp closed the connection before its answer ended")
        self.complete = True
        return False

    def read(self) -> bytes:
        """The whole body (small answers: /tokenize for the context check)."""
        return b"".join(self.pieces())

    def _take(self) -> bytes:
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        return data

    def _feed(self, data: bytes | memoryview) -> None:
        self._received += len(data)
        if self.complete:  # bytes after the end (or after a HEAD answer's head): do not reuse this connection
            self._reusable = False
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.complete = True
        except httptools.HttpParserError as exc:
            if not self.complete:
                raise ProtocolError(f"llama.cpp sent a malformed answer ({exc})", exc) from None
            self._reusable = False

    # --- ending -------------------------------------------------------------------------------------------

    _reusable = True
    _keep_alive = False

    def release_conn(self) -> None:
        """Give the connection back to its pool when the answer ended cleanly and may be followed by another."""
        conn, self.connection = self.connection, None
        if conn is None or self.pool is None:
            return
        self._reader.stop()
        if not (self.complete and self._reusable and self._keep_alive and not self._until_close):
            conn.close()
            conn = None
        self.pool._put_conn(conn)

    def stop_reading(self) -> None:
        """Nothing more will be read (its connection is closed by whoever calls this)."""
        self._reader.stop()

    def close(self) -> None:
        """End the answer: an unfinished one's connection is closed at once (llama.cpp stops generating)."""
        self._reader.stop()
        if self.connection is not None and not self.complete:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self.release_conn()
