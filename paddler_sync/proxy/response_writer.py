"""gunicorn's HTTP/1.1 response, writing each relayed answer with as few syscalls as it can.

gunicorn sends a response's head in one ``sendall`` and each body piece in another, and gevent's
``sendall`` asks the kernel for the socket's send-buffer size (a ``getsockopt``) and reads the clock on
every call: a small answer cost three syscalls more than it needs, and each relayed SSE event one (the
profile: bench/RESULTS.md, "What limits paddler_sync here"). Here the head waits for the first body bytes
and goes out with them in one ``send``; each chunk is framed and sent in one ``send`` (gevent waits only
when the client's window is full, and the rest follows); the last chunk marker goes out on its own.

gunicorn (27) frames body bytes in ``Response._emit_body``, "so a subclass can frame it differently", but its
gevent worker always builds its own ``Response``: the proxy adopts each one it answers (``adopt``), turning it
into this subclass, which keeps every field and rule of gunicorn's (status, headers, keep-alive, HEAD and
204/304 without a body, Content-Length truncation). Responses of other servers (tests in-process, werkzeug)
are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gunicorn.http.wsgi import Response

from paddler_sync.sockets import send_all


class ProxyResponse(Response):
    """gunicorn's Response, but the head leaves with the first body bytes, and a chunk in one ``send``."""

    _pending_head = b""
    headers_sent: bool

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        lines.append("\r\n")
        self._pending_head = "".join(lines).encode("latin-1")
        self.headers_sent = True

    def write(self, arg: bytes) -> None:
        """An empty write sends the head now (an event stream whose first event is not there yet)."""
        if arg:
            super().write(arg)
            return
        self.send_headers()
        self._flush_head()

    def _emit_body(self, data: bytes) -> None:
        if self.chunked:
            data = b"%X\r\n%s\r\n" % (len(data), data)
        if self._pending_head:
            data, self._pending_head = self._pending_head + data, b""
        send_all(self.sock, data)

    def close(self) -> None:
        if not self.headers_sent:
            self.send_headers()
        tail = b"0\r\n\r\n" if self.chunked else b""
        if self._pending_head or tail:
            data, self._pending_head = self._pending_head + tail, b""
            send_all(self.sock, data)

    def sendfile(self, respiter: Any) -> bool:  # never used by the proxy; kept correct all the same
        self._flush_head()
        return bool(super().sendfile(respiter))

    def _flush_head(self) -> None:
        if self._pending_head:
            data, self._pending_head = self._pending_head, b""
            send_all(self.sock, data)


FRAMES_IN_EMIT_BODY = hasattr(Response, "_emit_body")  # gunicorn 27 and later


def adopt(start_response: Callable[..., Any]) -> bool:
    """Make gunicorn's response behind ``start_response`` a :class:`ProxyResponse` (before it sends anything)."""
    response: Any = getattr(start_response, "__self__", None)
    if type(response) is not Response or response.headers_sent or not FRAMES_IN_EMIT_BODY:
        return False
    response.__class__ = ProxyResponse
    return True
