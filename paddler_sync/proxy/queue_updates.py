"""Queue feedback for a streaming request that must wait: it is answered at once (200, event-stream headers), and
while it waits it gets an SSE comment line each second with its place in the queue and its expected start:

    : queue position=3 estimated_start=2.4s

SSE clients ignore comment lines, so a UI may show "you are 3rd in line" and any other client sees nothing.
Opt-in twice: ``--queue-updates`` on the balancer, and ``X-Paddler-Queue-Updates: 1`` on the request (with
``"stream": true``). Once it has a slot, llama.cpp's events follow as usual. What would have been an error
status (a timeout, a refused connection, llama.cpp's own 4xx) comes as llama.cpp's mid-stream error line,
``error: {json}``, since the status went out already.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gevent import Greenlet

from paddler_sync.errors import error_body
from paddler_sync.ledger.buffer import RequestBuffer
from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.slots import GiveBack, Reservation
from paddler_sync.proxy.answer import UpstreamAnswer
from paddler_sync.proxy.refusal import ProxyError
from paddler_sync.proxy.relay import Relay

HEADER = "HTTP_X_PADDLER_QUEUE_UPDATES"
QUIET_WAIT = 0.05  # seconds: a request served this soon gets llama.cpp's own headers, and no comment
UPDATE_SECONDS = 1.0
Connected = tuple[Reservation, UpstreamAnswer, float]


class QueueHost(Protocol):
    """What a queued stream uses of the proxy (paddler_sync/proxy/app.py's ProxyApp)."""

    buffer: RequestBuffer
    ledger: Ledger
    record: Callable[..., None]


def wanted(environ: dict[str, Any], body: dict[str, Any] | None) -> bool:
    return (environ.get(HEADER, "").strip().lower() in ("1", "true", "yes") and body is not None
            and body.get("stream") is True)


@dataclass(eq=False)
class QueuedStream:
    """The WSGI body of a streaming request still waiting for a slot; ``job`` is its connect, running.
    ``proxy``: the ProxyApp (its buffer, ledger and access log); ``open_relay``: makes the Relay (the body of
    llama.cpp's answer) once connected, without sending llama.cpp's head (this stream's went out already);
    ``arrived``: ``time.monotonic()`` when the request came."""

    proxy: QueueHost
    environ: dict[str, Any]
    start_response: Callable[..., Any]
    job: Greenlet
    queue: str | None
    arrived: float
    open_relay: Callable[[Connected], Relay]
    relay: Relay | None = field(default=None, init=False)  # once connected

    def __iter__(self) -> Iterator[bytes]:
        self.start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                       ("X-Accel-Buffering", "no")])
        try:
            while not self.job.ready():
                yield self.update()
                self.job.join(timeout=UPDATE_SECONDS)
            try:
                connected = self.job.get()
            except ProxyError as exc:
                line = self._error(exc.status, exc.body())
                self.proxy.record(self.environ, exc.status, exc.reservation, exc.waited, self.arrived,
                                  sent=len(line), ending=exc.ending)
                yield line
                return
            self.relay = self.open_relay(connected)
            yield from self._events(self.relay)
        finally:
            self.close()

    def update(self) -> bytes:
        position = self.proxy.buffer.position(self.queue, self.arrived)
        eta = self.proxy.buffer.expected_wait(position)
        start = f"{eta:.1f}s" if eta is not None else "unknown"
        return f": queue position={position} estimated_start={start}\n\n".encode()

    @staticmethod
    def _events(relay: Any) -> Iterator[bytes]:
        if relay.response_status == 200:
            yield from relay
            return
        answer = b"".join(relay)  # llama.cpp refused it (a 4xx): its error, as a mid-stream error line
        yield b"error: " + answer.strip() + b"\n\n"

    def _error(self, status: int, body: bytes) -> bytes:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = error_body(status, body.decode("utf-8", "replace"))
        payload["error"]["status"] = status
        return b"error: " + json.dumps(payload).encode() + b"\n\n"

    def close(self) -> None:
        """However it ends: a client that left stops the wait (its place goes); a slot won meanwhile goes back."""
        if not self.job.ready():
            self.job.kill(block=True)
        if self.relay is not None:
            self.relay.close()
        elif self.job.successful():
            reservation, response, _ = self.job.value
            response.close()
            self.proxy.ledger.give_back(reservation, GiveBack.WAITER_LEFT)
