"""The response body: each upstream chunk relayed to the client as it arrives, and the slot given back at its end.

A WSGI server calls ``Relay.close`` however a response ends (even before the first chunk, when a generator's own
``finally`` would never run), so the slot is given back there, exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import urllib3.exceptions

from paddler_sync.endings import Ending
from paddler_sync.errors import error_body, error_bytes, status_line
from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.slots import GiveBack, Reservation
from paddler_sync.proxy.answer import UpstreamAnswer
from paddler_sync.proxy.refusal import ProxyError
from paddler_sync.proxy.retry import may_send_again
from paddler_sync.proxy.upstream import response_headers
from paddler_sync.routing.first_token import CacheAwareness, PromptSeen
from paddler_sync.routing.speed import DecodeSpeeds, generated_tokens, read_timings
from paddler_sync.sockets import ClientWatch

logger = logging.getLogger("paddler_sync.proxy")
StartResponse = Callable[..., Any]
HEAD_AFTER = 0.5  # an event stream with no event yet this long after its head: the head goes to the client
Connect = Callable[[], tuple[Reservation, UpstreamAnswer, float]]


GIVEN_BACK_AFTER = {Ending.UPSTREAM_ERROR: GiveBack.BROKE_OFF, Ending.CLIENT_GONE: GiveBack.CLIENT_LEFT}


class RelayHost(Protocol):
    """What a relay uses of the proxy (paddler_sync/proxy/app.py's ProxyApp)."""

    ledger: Ledger
    speeds: DecodeSpeeds
    awareness: CacheAwareness | None
    record: Callable[..., None]

    def send_elsewhere(self, environ: dict[str, Any], reservation: Reservation, exc: BaseException) -> bool: ...


class Relay:
    """The response body: each upstream chunk is passed on as it arrives.

    A WSGI server calls ``close()`` however the response ends (even before the first chunk, when
    a generator's own ``finally`` would never run), so the slot is given back there, exactly once.
    """

    def __init__(self, proxy: RelayHost, environ: dict[str, Any], start_response: StartResponse,
                 response: UpstreamAnswer, reservation: Reservation, waited: float, started: float,
                 limit: int | None = None, again: Connect | None = None) -> None:
        self.proxy = proxy
        self.again = again  # the request connected anew (paddler_sync/proxy/retry.py)
        self.environ = environ
        self.start_response = start_response
        self.response = response
        self.reservation = reservation
        self.waited = waited
        self.started = started
        self.sent = 0
        self.first_byte: float | None = None
        self.head_out = False  # the head went ahead of the body (an event stream slow to start)
        self.ending = Ending.CLIENT_GONE
        self.closed = False
        self.response_status = response.status
        self.limit = limit  # the generation limit asked for, when --early-dispatch foresees ends
        self.last_chunk = self.chunk_before = b""  # the final event (with its token count) may precede [DONE]
        self.streamed = "event-stream" in (response.headers.get("Content-Type") or "")
        self.seen: PromptSeen | None = None  # the prompt's prefix as the balancer knew it (first-token routing)

    def __iter__(self) -> Iterator[bytes]:
        try:
            while True:
                try:
                    yield from self._chunks()
                    self.ending = Ending.DONE
                    return
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    if self.sent == 0 and self._send_again(exc):
                        continue
                    yield from self._broken_off(exc)
                    return
        finally:
            self.close()

    def _chunks(self) -> Iterator[bytes]:
        for chunk in self.response.pieces(head_after=HEAD_AFTER if self.streamed else None):
            if not chunk:  # the head now, the body when it comes
                self.head_out = True
                yield chunk
                continue
            if self.first_byte is None:
                self.first_byte = time.monotonic()
            self.sent += len(chunk)
            self.chunk_before, self.last_chunk = self.last_chunk, chunk
            yield chunk

    def _broken_off(self, exc: BaseException) -> Iterator[bytes]:
        self.ending = Ending.UPSTREAM_ERROR
        logger.warning("llama.cpp at %s broke off the response after %d bytes: %s", self.reservation.addr,
                       self.sent, type(exc).__name__)
        if self.sent == 0 and not self.head_out:  # nothing reached the client yet (the head goes with the body)
            yield self._replace_with_error()
        else:
            if self.streamed:
                yield self._stream_error()
            abort_client_connection(self.environ)

    def _send_again(self, exc: BaseException) -> bool:
        """No byte of the answer reached the client: the request goes again, once (paddler_sync/proxy/retry.py).
        Its new answer replaces this one; an event stream whose head went out already takes only another 200."""
        if self.again is None or not may_send_again(self.environ, self.reservation.uses_slot, exc) \
                or not self.proxy.send_elsewhere(self.environ, self.reservation, exc):
            return False
        self.response.close()
        self.proxy.ledger.give_back(self.reservation, GiveBack.NOT_ANSWERED)
        try:
            reservation, response, waited = self.again()
        except ProxyError:
            return False  # no slot, no server: the first failure is what the client is told
        self.reservation, self.response, self.waited = reservation, response, self.waited + waited
        if self.head_out and response.status != 200:
            return False
        self.response_status = response.status
        self.streamed = "event-stream" in (response.headers.get("Content-Type") or "")
        if not self.head_out:
            self.start_response(f"{response.status} {response.reason}", response_headers(response), sys.exc_info())
        return True

    def _learn_speed(self, generated: int | None) -> None:
        """Its time in llama.cpp over the tokens it generated: how fast this server goes at present."""
        tokens = generated or self.limit or 0
        started = self.started + self.waited
        self.proxy.speeds.learn(self.reservation.addr, time.monotonic() - started, tokens)

    def generated(self) -> int | None:
        """The tokens llama.cpp says it generated (its final event's usage / timings), once the answer ended."""
        if self.ending is not Ending.DONE or self.response_status != 200:
            return None
        return generated_tokens(self.chunk_before[-4096:] + self.last_chunk[-4096:])

    def prompt(self) -> tuple[int, int] | None:
        """The prompt's tokens and those llama.cpp's cache held, from its timings; what they teach is learned."""
        if self.ending is not Ending.DONE or self.response_status != 200 or not self.reservation.uses_slot:
            return None
        timings = read_timings(self.chunk_before[-8192:] + self.last_chunk[-8192:])
        if timings is None:
            return None
        if self.proxy.awareness is not None:
            self.proxy.awareness.answered(self.reservation.upstream.key, self.seen, timings)
        return timings.prompt_processed + timings.prompt_cached, timings.prompt_cached

    def _stream_error(self) -> bytes:
        """The reason, as llama.cpp's own mid-stream error line, before the connection is cut: a server out of
        service (drained for a swap or because its agent stops, or reported down) stopped before this answer
        ended. The balancer does not know why it stopped, so it does not guess (a timeout, a kill)."""
        if not self.reservation.upstream.routable:
            message = (f"the llama.cpp server at {self.reservation.addr} stopped while draining or out of service "
                       "(a model swap, its agent stopping, or a failure) before this answer ended; send the request "
                       "again")
        else:
            message = f"the llama.cpp server at {self.reservation.addr} broke off its answer"
        payload = error_body(502, message, "upstream_stopped")
        payload["error"]["status"] = 502
        return b"error: " + json.dumps(payload).encode() + b"\n\n"

    def _replace_with_error(self) -> bytes:
        """PEP 3333 lets an app change its status until the headers are sent: answer 502 instead."""
        body = error_bytes(502, "the llama.cpp server broke off its answer before sending any of it")
        self.response_status = 502
        self.start_response(status_line(502), [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))], sys.exc_info())
        return body

    def close(self) -> None:
        """Close the upstream connection at once (llama.cpp frees its slot too), then give the slot back."""
        if self.closed:
            return
        self.closed = True
        self.response.close()  # a fully read answer's connection went back to the pool already; this cuts a live one
        self.proxy.ledger.give_back(self.reservation, GIVEN_BACK_AFTER.get(self.ending, GiveBack.ANSWERED))
        generated = self.generated()
        if self.limit is not None and self.ending is Ending.DONE and self.response_status == 200:
            self._learn_speed(generated)
        self.proxy.record(self.environ, self.response_status, self.reservation, self.waited, self.started,
                          self.first_byte, self.sent, self.ending, self.first_byte if self.streamed else None,
                          generated, self.prompt())


def client_socket(environ: dict[str, Any]) -> socket.socket | None:
    return environ.get("gunicorn.socket")


def client_watch(environ: dict[str, Any]) -> ClientWatch | None:
    """Notices a client that closes its connection while its request waits (nothing is written then)."""
    sock = client_socket(environ)
    return ClientWatch(sock) if sock is not None else None


def abort_client_connection(environ: dict[str, Any]) -> None:
    """End a response visibly broken (no final chunk) when the upstream broke off mid-stream."""
    sock = client_socket(environ)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
