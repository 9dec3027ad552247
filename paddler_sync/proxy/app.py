"""The reverse proxy: where a request goes, where its slot is taken, and where it is given back.

    __call__      read the (bounded) body; decide whether the path takes a slot, and for which model
                  (paddler_sync/proxy/model_routing.py)
    _connect      take a slot (or wait in the buffer), open the upstream request; on a refused
                  connection quarantine that server and try another, while nothing was sent;
                  a client that leaves meanwhile cuts the upstream call (llama.cpp stops too)
    Relay         stream each upstream chunk to the client as it arrives (paddler_sync/proxy/relay.py)
    Relay.close   the slot given back once the answer began: normal end, client gone, upstream error

A slot goes back only through ``Ledger.give_back``, each path naming why (``GiveBack`` lists the six, with where
each is given back). The WSGI server calls ``Relay.close`` however a response ends, so a slot cannot leak.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import urllib3.exceptions
from gevent.pool import Group

from paddler_sync.endings import Ending
from paddler_sync.errors import OWN_ANSWER, error_bytes, status_line
from paddler_sync.ledger.buffer import RequestBuffer
from paddler_sync.ledger.refusals import BufferRefusal, BufferTimeout, HandedOver, StateUnavailable
from paddler_sync.ledger.slots import Claim, GiveBack, Reservation, Upstream
from paddler_sync.proxy import queue_updates, response_writer
from paddler_sync.proxy.answer import UpstreamAnswer
from paddler_sync.proxy.ask import prompt_tokens
from paddler_sync.proxy.context_fit import ContextCheck
from paddler_sync.proxy.model_routing import ModelRouting, Route
from paddler_sync.proxy.records import Recorder
from paddler_sync.proxy.refusal import ProxyError
from paddler_sync.proxy.relay import Relay, client_socket, client_watch
from paddler_sync.proxy.retry import RETRIED, may_send_again
from paddler_sync.proxy.tenancy import Tenancy, restore_client_key
from paddler_sync.proxy.upstream import (
    ClientLeft,
    Transport,
    is_connect_failure,
    request_headers,
    response_headers,
    uses_slot,
)
from paddler_sync.routing.first_token import CacheAwareness, FirstTokenEstimate
from paddler_sync.routing.speed import DecodeSpeeds

if TYPE_CHECKING:
    from paddler_sync.ledger.ledger import Ledger
    from paddler_sync.metrics import Metrics

logger = logging.getLogger("paddler_sync.proxy")
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Any]
MAX_CONNECT_ATTEMPTS = 16
HANDED_OVER_HEADER = "X-Paddler-Handed-Over"  # on a request a replaced worker sent to the next workers
HANDED_OVER_ENVIRON = "HTTP_X_PADDLER_HANDED_OVER"


class ProxyApp:
    """The WSGI app on the proxy address; the hub hands it the parts it uses (``management``: the management
    app, mounted under ``--management-path-prefix`` when one is set)."""

    def __init__(self, options: argparse.Namespace, ledger: Ledger, buffer: RequestBuffer, metrics: Metrics,
                 management: WSGIApp, tenancy: Tenancy) -> None:
        self.ledger = ledger
        self.tenancy = tenancy  # --tenants: who sends each request (the hub reloads it)
        self.record = Recorder(metrics, tenancy.rates).record
        self.buffer = buffer
        self.management = management
        self.transport = Transport(options.upstream_pool_size, options.upstream_connect_timeout,
                                      options.upstream_read_timeout, options.upstream_idle_timeout)
        self.read_timeout = options.upstream_read_timeout
        self.rewrite_host = options.rewrite_host_header
        self.slots_endpoint = options.slots_endpoint_enable
        self.max_body = options.max_request_body
        self.quarantine_seconds = options.quarantine_duration
        self.management_prefix = options.management_path_prefix
        self.management_has_token = bool(options.management_token or options.management_read_token)
        self.metrics = metrics
        self.speeds = DecodeSpeeds()
        self.foresee_ends = self.ledger.records_ends  # learn speeds, foresee each end (--early-dispatch, first-token)
        # --policy first-token: where each prompt prefix went, and each server's speeds
        self.awareness = CacheAwareness(options.prefix_cache_entries) if ledger.policy.weighs_waits else None
        self.queue_updates = options.queue_updates  # SSE comments for streaming requests that wait (opt-in)
        self.greenlets = Group()  # the waits of those requests (paddler_sync/proxy/queue_updates.py)
        self.routing = ModelRouting(options, ledger, ContextCheck(ledger, self.transport, options.context_check))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) \
            -> Relay | queue_updates.QueuedStream | list[bytes]:
        started = time.monotonic()
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"
        if self.management_prefix and (path == self.management_prefix
                                       or path.startswith(self.management_prefix + "/")):
            return self._management(environ, start_response)
        response_writer.adopt(start_response)
        try:
            tenant = self.tenancy.identify(environ, method, path)
            self._refuse_slots_endpoint(path)
            if self.routing.lists_models(method, path, environ.get("QUERY_STRING", "")):
                return self._own_answer(environ, start_response, started, self.routing.models_answer())
            body = self._read_body(environ)
            takes_slot = uses_slot(method, path)
            route = self.routing.route(method, environ, body, takes_slot)
            if tenant is not None:
                self.tenancy.allow(tenant, route.model, route.ask.named, takes_slot,
                                   functools.partial(self._served, route))
            claim = self.tenancy.claim(tenant, route.model) if takes_slot else None
            limit = route.ask.limit if takes_slot and self.foresee_ends else None  # to foresee its end
            estimate, hashes = self._estimate(route) if takes_slot else (None, ())
            connect = functools.partial(self._connect, environ, body, takes_slot, limit, route, estimate, claim)
            if takes_slot and self.queue_updates and queue_updates.wanted(environ, route.ask.body):
                job = self.greenlets.spawn(connect)
                job.join(timeout=queue_updates.QUIET_WAIT)
                if not job.ready():
                    return queue_updates.QueuedStream(self, environ, start_response, job,
                                                      route.model if self.buffer.per_model else None, started,
                                                      self._relay_after_wait(environ, started, limit, hashes,
                                                                             estimate))
                connected = job.get()
            else:
                connected = connect()
        except ProxyError as exc:
            body = exc.body()
            self.record(environ, exc.status, exc.reservation, exc.waited, started, sent=len(body), ending=exc.ending)
            start_response(status_line(exc.status), [("Content-Type", "application/json"),
                                                      ("Content-Length", str(len(body))), *exc.headers,
                                                      OWN_ANSWER])
            return [body]
        return self._open_relay(environ, start_response, started, limit, hashes, estimate, connected, connect)

    def _open_relay(self, environ: dict[str, Any], start_response: StartResponse, started: float,
                    limit: int | None, hashes: tuple[str, ...], estimate: FirstTokenEstimate | None,
                    connected: tuple[Reservation, UpstreamAnswer, float],
                    again: Callable[[], tuple[Reservation, UpstreamAnswer, float]] | None = None) -> Relay:
        """``again``: connects the request anew, when llama.cpp breaks off before the first byte relayed."""
        reservation, response, waited = connected
        start_response(f"{response.status} {response.reason}", response_headers(response))
        relay = Relay(self, environ, start_response, response, reservation, waited, started, limit, again)
        if self.awareness is not None and reservation.uses_slot:
            relay.seen = self.awareness.sent(reservation.upstream, hashes, estimate)
        return relay

    def _relay_after_wait(self, environ: dict[str, Any], started: float, limit: int | None, hashes: tuple[str, ...],
                          estimate: FirstTokenEstimate | None) -> Callable[[queue_updates.Connected], Relay]:
        """The relay of a stream that waited with queue updates: its head (200, an event stream) went out while
        it waited, so llama.cpp's head is not sent, and a failure before the first event shows as an error event
        (the relay's start_response is a no-op: ``_head_sent_already``)."""
        def open_relay(connected: queue_updates.Connected) -> Relay:
            return self._open_relay(environ, _head_sent_already, started, limit, hashes, estimate, connected)
        return open_relay

    def _served(self, route: Route) -> list[str]:
        """The models of the servers a request naming none may reach (a tenant may have to be allowed them)."""
        if route.model is not None:
            return []
        return sorted({u.serving.model.lower() for u in self.ledger.candidates(None) if u.serving.model})

    def _estimate(self, route: Route) -> tuple[FirstTokenEstimate | None, tuple[str, ...]]:
        """The request's first-token estimate on each server (--policy first-token), and its prompt's block hashes."""
        if self.awareness is None or route.ask.body is None:
            return None, ()
        return self.awareness.estimate(route.ask.body, prompt_tokens(route.ask), route.ask.limit)

    def _own_answer(self, environ: dict[str, Any], start_response: StartResponse, started: float,
                    body: bytes) -> list[bytes]:
        """A 200 the balancer answers from what it knows (the fleet's models), bothering no llama.cpp."""
        self.record(environ, 200, None, 0.0, started, sent=len(body), ending=Ending.DONE)
        start_response("200 OK", [("Content-Type", "application/json; charset=utf-8"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    def _management(self, environ: dict[str, Any], start_response: StartResponse) -> Any:
        """The management API mounted under a prefix of the public port (one-port platforms).

        Anyone who reaches the public port reaches it, so without a token only /health answers there."""
        environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + self.management_prefix
        environ["PATH_INFO"] = environ["PATH_INFO"][len(self.management_prefix):] or "/"
        if not self.management_has_token and environ["PATH_INFO"] != "/health":
            body = error_bytes(403, f"the management API under {self.management_prefix} on the public port needs "
                                    f"--management-token (PADDLER_MANAGEMENT_TOKEN); agents and dashboards send "
                                    f"the same token")
            start_response(status_line(403), [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(body)))])
            return [body]
        return self.management(environ, start_response)

    # --- before the response ------------------------------------------------------------------------

    def _refuse_slots_endpoint(self, path: str) -> None:
        if not self.slots_endpoint and (path == "/slots" or path.startswith("/slots/")):
            raise ProxyError(403, "/slots is not served through the balancer: it shows other users' prompts. "
                                  "Start the balancer with --slots-endpoint-enable to allow it.",
                             ending=Ending.FORBIDDEN)

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        length = environ.get("CONTENT_LENGTH")
        if length and length.isdigit() and int(length) > self.max_body:
            raise ProxyError(413, f"the request body has {length} bytes; this balancer forwards at most "
                                  f"{self.max_body} (--max-request-body)", ending=Ending.BODY_TOO_LARGE)
        body = environ["wsgi.input"].read(self.max_body + 1)
        if len(body) > self.max_body:
            raise ProxyError(413, f"the request body is larger than {self.max_body} bytes (--max-request-body)",
                             ending=Ending.BODY_TOO_LARGE)
        return body

    def _connect(self, environ: dict[str, Any], body: bytes, takes_slot: bool, limit: int | None,
                 route: Route, estimate: FirstTokenEstimate | None = None,
                 claim: Claim | None = None) -> tuple[Reservation, UpstreamAnswer, float]:
        """Reserve and connect; a server that refuses is quarantined (so not chosen again) and the request,
        to which nothing was sent yet, goes to another one, or waits for one. A quarantined server that its
        agent reports healthy again may serve the retry."""
        waited = 0.0
        for _ in range(MAX_CONNECT_ATTEMPTS):
            try:
                reservation, wait = self._reserve(environ, takes_slot, route, estimate, claim)
            except ProxyError as exc:
                exc.waited += waited  # a retry after a refused connection waited twice
                raise
            except HandedOver as exc:
                return self._hand_over(environ, body, waited + exc.waited)
            waited += wait
            if limit is not None:
                self._foresee_end(reservation, limit)
            if reservation.loads_model:
                self.metrics.model_load(reservation.upstream.serving.model)
            try:
                return reservation, self._send(environ, body, reservation, route), waited
            except ClientLeft as exc:  # llama.cpp may run on for a moment: counted busy until reported free
                self.ledger.give_back(reservation, GiveBack.CLIENT_LEFT)
                raise ProxyError(499, str(exc), ending=Ending.CLIENT_GONE, reservation=reservation,
                                 waited=waited) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                refused = is_connect_failure(exc)
                self.ledger.give_back(reservation, GiveBack.REFUSED if refused else GiveBack.NOT_ANSWERED)
                if refused:
                    self._quarantine(reservation, exc)
                elif not (may_send_again(environ, takes_slot, exc) and self.send_elsewhere(environ, reservation, exc)):
                    raise self._upstream_error(reservation, exc, waited) from None
        raise ProxyError(502, f"no llama.cpp server accepted a connection after {MAX_CONNECT_ATTEMPTS} attempts",
                         ending=Ending.UPSTREAM_REFUSED, waited=waited)

    def _reserve(self, environ: dict[str, Any], takes_slot: bool, route: Route,
                 estimate: FirstTokenEstimate | None, claim: Claim | None) -> tuple[Reservation, float]:
        if not takes_slot:
            reservation = self.ledger.pick_without_slot(route.model, router=route.router)
            if reservation is None:
                if not self.routing.knows(route.model):
                    raise self.routing.unknown(route.ask.named or str(route.model))
                raise ProxyError(503, "no llama.cpp server is ready to answer; agents register them "
                                      "(see /api/v1/agents on the management server)", [("Retry-After", "1")],
                                 ending=Ending.NO_SERVER)
            return reservation, 0.0
        try:
            return self._acquire(environ, route, estimate, claim)
        except HandedOver:
            raise
        except BufferRefusal as exc:
            raise ProxyError(exc.status, str(exc), self._retry_after(exc), ending=exc.ending,
                             waited=exc.waited) from None

    def _acquire(self, environ: dict[str, Any], route: Route, estimate: FirstTokenEstimate | None,
                 claim: Claim | None) -> tuple[Reservation, float]:
        """A slot from the buffer; a model not seen yet while agents are still reporting waits for it only until
        then, and gets 404 if it is still unknown."""
        if route.wait_for_discovery is None:
            return self.buffer.acquire(client_watch(environ), route.model, route.need, score=estimate, claim=claim)
        try:
            return self.buffer.acquire(client_watch(environ), route.model, timeout=route.wait_for_discovery,
                                       claim=claim)
        except BufferTimeout as exc:
            if not self.routing.knows(route.model):
                error = self.routing.unknown(route.ask.named or str(route.model))
                error.waited = exc.waited
                raise error from None
            reservation, waited = self.buffer.acquire(client_watch(environ), route.model, claim=claim)
            return reservation, waited + exc.waited

    def _retry_after(self, refusal: BufferRefusal) -> list[tuple[str, str]]:
        """When to come back: a second for Redis (it is checked again within one); for a full queue, when the
        requests ahead should have been served at the rate the queue drains now (the wait limit while no request
        has waited lately)."""
        if isinstance(refusal, StateUnavailable):
            return [("Retry-After", "1")]
        if refusal.status in (429, 503):
            drained = self.buffer.expected_wait(max(1, self.buffer.waiting))
            seconds = self.buffer.timeout if drained is None else min(drained, self.buffer.timeout)
            return [("Retry-After", str(max(1, math.ceil(seconds))))]
        return []

    def _send(self, environ: dict[str, Any], body: bytes, reservation: Reservation, route: Route) -> UpstreamAnswer:
        raw_uri = environ.get("RAW_URI", "")
        target = raw_uri if raw_uri.startswith("/") else _path_and_query(environ)
        target = self.routing.named_target(route, reservation, target, environ["REQUEST_METHOD"])
        body = self.routing.named_body(route, reservation, body)
        headers = request_headers(environ, reservation.addr, self.rewrite_host, len(body))
        return self.transport.send(environ["REQUEST_METHOD"], reservation.addr, target, headers, body or None,
                                   client_watch(environ))

    def _foresee_end(self, reservation: Reservation, limit: int) -> None:
        expected = self.speeds.expected_seconds(reservation.addr, limit)
        if expected is not None:
            self.ledger.expect_end(reservation, self.ledger.clock() + expected)

    def _hand_over(self, environ: dict[str, Any], body: bytes, waited: float) \
            -> tuple[Reservation, UpstreamAnswer, float]:
        """This worker is being replaced (paddler_sync/handover.py): the request goes to the new workers through
        the address the client reached (the listening socket they now accept on), with the client's own key."""
        sock = client_socket(environ)
        if sock is None or environ.get(HANDED_OVER_ENVIRON):  # never twice: it would come back to a closing worker
            raise ProxyError(503, "the balancer is reloading; retry in a moment", [("Retry-After", "1")],
                             ending=Ending.SHUTTING_DOWN, waited=waited)
        host, port = sock.getsockname()[:2]
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        restore_client_key(environ)
        target = environ.get("RAW_URI") or _path_and_query(environ)
        headers = {**request_headers(environ, addr, False, len(body)), HANDED_OVER_HEADER: "1"}
        try:
            answer = self.transport.send(environ["REQUEST_METHOD"], addr, target, headers, body or None,
                                         client_watch(environ))
        except ClientLeft as exc:
            raise ProxyError(499, str(exc), ending=Ending.CLIENT_GONE, waited=waited) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ProxyError(503, f"the balancer is reloading and its new workers did not take the request "
                                  f"({type(exc).__name__}); retry in a moment", [("Retry-After", "1")],
                             ending=Ending.SHUTTING_DOWN, waited=waited) from None
        return Reservation(Upstream(key="next-workers", addr=addr), uses_slot=False), answer, waited

    def send_elsewhere(self, environ: dict[str, Any], reservation: Reservation, exc: BaseException) -> bool:
        """A request llama.cpp never answered goes again (paddler_sync/proxy/retry.py) if another server could take
        it: its server is quarantined (a healthy report from its agent lifts that), the retry counted and logged.
        False, and nothing done, when no other usable server serves its model: the failure is the answer."""
        failed, now = reservation.upstream, self.ledger.clock()
        if not any(u is not failed and u.is_usable(now) and _alike(u, failed) for u in self.ledger.upstreams()):
            return False
        environ[RETRIED] = 1
        self.metrics.retried()
        if self.ledger.quarantine(failed.key, self.quarantine_seconds) is not None:
            self.metrics.quarantined()
        logger.warning("llama.cpp at %s failed before answering (%s): quarantined for %gs, sending the request "
                       "again", reservation.addr, type(exc).__name__, self.quarantine_seconds)
        return True

    def _quarantine(self, reservation: Reservation, exc: Exception) -> None:
        until = self.ledger.quarantine(reservation.upstream.key, self.quarantine_seconds)
        if until is not None:
            self.metrics.quarantined()
            logger.warning("quarantined llama.cpp at %s for %gs: connection failed (%s); trying another server",
                           reservation.addr, self.quarantine_seconds, type(exc).__name__)

    def _upstream_error(self, reservation: Reservation, exc: Exception, waited: float) -> ProxyError:
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
            logger.warning("llama.cpp at %s sent no response within %gs", reservation.addr, self.read_timeout)
            return ProxyError(504, f"the llama.cpp server did not answer within {self.read_timeout:g}s "
                                   f"(--upstream-read-timeout)", ending=Ending.UPSTREAM_TIMEOUT,
                              reservation=reservation, waited=waited)
        logger.warning("llama.cpp at %s failed before answering: %s", reservation.addr, exc)
        return ProxyError(502, f"the llama.cpp server failed before answering ({type(exc).__name__})",
                          ending=Ending.UPSTREAM_ERROR, reservation=reservation, waited=waited)

    # --- the response ---------------------------------------------------------------------------------


def _alike(upstream: Upstream, failed: Upstream) -> bool:
    """It serves a model the failed server served (or either serves any model)."""
    names, other = upstream.serving.names, failed.serving.names
    return not names or not other or bool(names & other)


def _head_sent_already(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    """A queued stream's head went out before llama.cpp answered: llama.cpp's own is not sent."""


def _path_and_query(environ: dict[str, Any]) -> str:
    query = environ.get("QUERY_STRING")
    path = environ.get("PATH_INFO") or "/"
    return f"{path}?{query}" if query else path
