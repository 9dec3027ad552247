"""The balancer process's hub: it owns the fleet state and every greenlet that works on it.

Like Locust's Environment, the hub is handed to the proxy and the management app, which never
import each other. It is built inside the gunicorn worker (after gevent patched it), by
``wsgi.py`` or by ``paddler-sync balancer``'s embedded gunicorn, and it is the WSGI app gunicorn
serves on the proxy address; the management server runs beside it, in the same worker.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import gevent
from gevent.pool import Group
from gevent.pool import Pool as GreenletPool
from gevent.pywsgi import WSGIServer

from paddler_sync.fleet.registry import Registry
from paddler_sync.fleet.rollout import Controls, LocalControls, Rollout
from paddler_sync.fleet.shared import SharedAffinity, SharedCounts, SharedFleetSync
from paddler_sync.fleet.status import FleetStatus
from paddler_sync.handover import RELOAD_BIND_WAIT, RELOAD_MARK
from paddler_sync.ledger.buffer import RequestBuffer
from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.policy import Policy, make_policy
from paddler_sync.ledger.refusals import HandedOver
from paddler_sync.ledger.stores.redis.connect import redacted
from paddler_sync.ledger.stores.redis.rates import RedisRates
from paddler_sync.ledger.stores.redis.store import RedisStore
from paddler_sync.logs import log_greenlet_exception
from paddler_sync.management.app import create_management_app
from paddler_sync.metrics import FleetCollector, Metrics, StatsdReporter
from paddler_sync.proxy.app import ProxyApp
from paddler_sync.proxy.tenancy import Tenancy
from paddler_sync.tenants.book import TenantBook
from paddler_sync.tenants.current import CurrentTenants
from paddler_sync.tenants.rates import LocalRates, Rates
from paddler_sync.words import counted

logger = logging.getLogger("paddler_sync.balancer")
SWEEP_SECONDS = 0.2
MANAGEMENT_HANDOVER_SECONDS = 0.5  # a replaced worker's management requests in progress may end within this
LAST_ANSWER_SECONDS = 1.0  # before the graceful timeout ends, requests still waiting are answered 503
LISTENER_CLOSE_WAIT = 2.0  # gunicorn's gevent worker closes its listener within a second of SIGTERM
TRAFFIC_SAMPLE_SECONDS = 1.0
SHUTDOWN_POLL_SECONDS = 0.05
MANAGEMENT_CONNECTIONS = 1000
MANAGEMENT_BACKLOG = 256
WORKER_BOOT_ERROR = 3  # gunicorn halts, instead of respawning, when a worker exits with this
SECOND_WORKER = (". Or gunicorn runs more than one worker (unchecked without paddler_sync's gunicorn settings): with "
                 "--state-backend local run one (-w 1), or share the ledger: --state-backend redis://HOST:6379/0")


class Balancer:
    def __init__(self, options: argparse.Namespace, policy: Policy | None = None) -> None:
        self.options = options
        self.metrics = Metrics()
        self.shared: SharedFleetSync | None = None
        self.ledger, self.registry = self._fleet_state(policy or make_policy(options.policy))
        self.buffer = RequestBuffer(self.ledger, options.max_buffered_requests, options.buffered_request_timeout,
                                    options.per_model_queues)
        self.greenlets = Group()
        self.shutting_down = False
        self.told_to_stop = False  # /health says 503 from the signal on, before the listener closes
        self.replaced = False  # a reload replaces this worker (paddler_sync/server.py)
        self.status = FleetStatus(self.ledger, self.registry, self.buffer, self.shared.store if self.shared else None,
                                  lambda: self.shutting_down or self.told_to_stop)
        self.tenants = CurrentTenants(options.tenants)
        self.status.tenants = self.tenants
        if self.shared is not None:
            self.shared.tenants = self.tenants.names
        self.metrics.registry.register(FleetCollector(self.status))
        self.traffic = self.metrics.traffic
        self.rollout = Rollout(self._controls(), self.registry, self.ledger, options.max_unavailable,
                               options.drain_timeout)
        self.management = create_management_app(options, self.status, self.traffic, self.metrics.registry,
                                                self.rollout, self.metrics.totals, self.replace_tenants)
        tenancy = Tenancy(self.tenants, self._rates(), options.upstream_api_key)
        self.proxy = ProxyApp(options, self.ledger, self.buffer, self.metrics, self.management, tenancy)
        if self.shared is not None and self.proxy.awareness is not None:
            self.shared.affinity = SharedAffinity(self.shared.store, self.proxy.awareness)
        self.management_server: WSGIServer | None = None

    def _fleet_state(self, policy: Policy) -> tuple[Ledger, Registry]:
        """The ledger and registry over the in-process store, or over Redis; nothing else cares which."""
        options = self.options
        if options.state_backend == "local":
            ledger = Ledger(policy, early_lead=options.early_dispatch)
        else:
            store = RedisStore(options.state_backend, options.state_prefix, options.lease_ttl)
            ledger = Ledger(policy, store=store)  # no early hand-over: Redis never takes beyond the free slots
        registry = Registry(ledger, options.agent_missed_reports, options.max_agents,
                            models_autoload=options.models_autoload)
        if options.state_backend != "local":
            counts = SharedCounts(store, self.metrics.counters, self.metrics.traffic)
            self.metrics.shared_totals = counts.totals
            self.shared = SharedFleetSync(store, ledger, registry, counts, SWEEP_SECONDS)
        return ledger, registry

    def _rates(self) -> Rates:
        """Tenants' requests and tokens per minute: in this process, or in Redis for every worker and balancer."""
        return LocalRates() if self.shared is None else RedisRates(self.shared.store)

    def replace_tenants(self, text: str) -> TenantBook:
        """``PUT /api/v1/tenants``: in force here at once; the balancer's other workers read the file again
        (SIGHUP to gunicorn's master, which paddler_sync's hooks pass on to them as a tenants reload)."""
        book = self.tenants.replace(text)
        if self.options.workers > 1:
            os.kill(os.getppid(), signal.SIGHUP)
        return book

    def _controls(self) -> Controls:
        """The operator's drains and desired states: beside the ledger (this process, or Redis)."""
        if self.shared is None:
            return LocalControls()
        from paddler_sync.fleet.redis_controls import RedisControls

        return RedisControls(self.shared.store)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return self.proxy(environ, start_response)

    def start(self, workers_unchecked: bool = False) -> None:
        """``workers_unchecked``: gunicorn runs without our hooks, so a second worker may be what holds the port."""
        addr = self.options.management_addr
        try:
            listener = self._management_listener()
            server = WSGIServer(listener, self.management, log=None, error_log=logger,
                                spawn=GreenletPool(MANAGEMENT_CONNECTIONS))
            server.start()
        except OSError as exc:
            logger.error("cannot listen for the management server on %s: %s. Another program holds it (`ss -ltnp` "
                         "shows which): stop it, or choose another address with --management-addr "
                         "(PADDLER_MANAGEMENT_ADDR)%s", addr, exc.strerror, SECOND_WORKER if workers_unchecked else "")
            sys.exit(WORKER_BOOT_ERROR)
        self.management_server = server
        self._spawn(self._sweep_forever, "registry-sweeper")
        gevent.signal_handler(signal.SIGUSR2, self._being_replaced)
        if self.tenants.enabled:
            gevent.signal_handler(signal.SIGHUP, lambda: self._spawn(self.tenants.reload, "tenants-reload"))
            logger.info("tenants from %s: %s (SIGHUP reloads them)", self.options.tenants,
                        ", ".join(self.tenants.names()))
        if self.shared is not None:
            self._spawn(self.shared.refresh_forever, "shared-ledger-refresh")
            self._spawn(self.shared.listen_forever, "shared-ledger-wakeups")
            self._spawn(self.shared.renew_forever, "shared-ledger-leases")
            self._spawn(self.shared.flush_counts_forever, "shared-counts")
            logger.info("slot ledger shared in %s (keys %s:*, lease TTL %gs)", redacted(self.options.state_backend),
                        self.shared.store.prefix, self.options.lease_ttl)
        self._spawn(self._sample_traffic_forever, "traffic-sampler")
        if self.options.statsd_addr is not None:
            self._spawn(self._report_statsd_forever, "statsd-reporter")
        logger.info("management server on http://%s (agents report here; /api/v1/agents, /health)", addr)
        if not addr.is_loopback and not self.options.management_token:
            logger.warning("the management server on %s is reachable from other hosts and has no "
                           "--management-token: anyone who reaches it can register a llama.cpp address and "
                           "receive traffic", addr)
        prefix = self.options.management_path_prefix
        if prefix and not (self.options.management_token or self.options.management_read_token):
            logger.warning("the management API under %s on the proxy port stays closed (403) until you set "
                           "--management-token (PADDLER_MANAGEMENT_TOKEN): anyone who reaches the proxy would reach "
                           "it. /health there is open.", prefix)
        elif prefix:
            logger.info("management API also under %s on the proxy port (token required)", prefix)

    def watch_worker(self, worker: Any) -> None:
        """Under gunicorn: when the worker is told to stop, and has closed its listener (gunicorn does within a
        second), begin a graceful shutdown: a request handed over to the next workers must not come back here."""
        def watch() -> None:
            while worker.alive:
                gevent.sleep(SHUTDOWN_POLL_SECONDS)
            self.told_to_stop = True  # a load balancer checking /health stops sending while gunicorn still accepts
            deadline = time.monotonic() + LISTENER_CLOSE_WAIT
            while time.monotonic() < deadline and any(listening(s) for s in getattr(worker, "sockets", ())):
                gevent.sleep(SHUTDOWN_POLL_SECONDS / 4)
            self.begin_shutdown(worker.cfg.graceful_timeout)

        self._spawn(watch, "shutdown-watcher")

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking work (gunicorn closed the listener; /health says 503, so load balancers look elsewhere).
        What was accepted is served: requests waiting for a slot keep their places and get slots as they free (a
        request on a kept-alive connection too, its connection closed after), while the responses in flight finish;
        those still waiting a second before ``grace`` ends get 503 + Retry-After, so every one is answered before
        the worker is stopped. A worker being replaced (a reload: SIGUSR2 came first)
        hands its waiting requests to the new workers instead, and frees the management port at once, so they take
        the agents' reports."""
        if self.shutting_down:
            return
        self.shutting_down = True
        waiting, in_flight = self.buffer.waiting, self.ledger.in_flight()
        if self.replaced:
            self.buffer.close("handed over to the new workers", HandedOver)
            if self.management_server is not None:  # agents' kept-alive connections too: they report anew, there
                self.management_server.stop(timeout=MANAGEMENT_HANDOVER_SECONDS)
            logger.info("replaced by new workers: %s handed over to them, %s in flight may finish within %gs",
                        counted(waiting, "waiting request"), counted(in_flight, "request"), grace)
            return
        reason = "the balancer is shutting down; retry in a moment (or on another balancer)"
        def answer_the_rest() -> None:
            gevent.sleep(max(0.0, grace - LAST_ANSWER_SECONDS))
            self.buffer.close(reason)

        self._spawn(answer_the_rest, "shutdown-deadline")
        logger.info("shutting down: %s may get a slot and %s in flight may finish within %gs",
                    counted(waiting, "waiting request"), counted(in_flight, "request"), grace)

    def _management_listener(self) -> socket.socket:
        """The management port; a worker started by a reload waits for the worker it replaces to free it."""
        addr = self.options.management_addr
        deadline = time.monotonic() + (RELOAD_BIND_WAIT if os.environ.get(RELOAD_MARK) else 0.0)
        while True:
            try:
                return management_listener(addr.host, addr.port, shared=self.shared is not None)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise
                gevent.sleep(0.05)

    def _being_replaced(self) -> None:
        """SIGUSR2 from gunicorn's master (paddler_sync's reload): the SIGTERM that follows hands work over."""
        self.replaced = True

    def stop(self) -> None:
        self.shutting_down = True
        if self.management_server is not None:
            self.management_server.stop(timeout=1)
        self.greenlets.kill(block=True, timeout=2)

    def _spawn(self, function: Any, name: str) -> None:
        greenlet = self.greenlets.spawn(function)
        greenlet.name = name
        greenlet.link_exception(log_greenlet_exception(logger))

    def _sample_traffic_forever(self) -> None:
        """Slots in use and requests waiting, once a second, for the dashboards' charts."""
        while True:
            health = self.status.health()
            self.traffic.sample(health["slots_processing"], health["slots_total"], health["requests_buffered"],
                                time.time())
            gevent.sleep(TRAFFIC_SAMPLE_SECONDS)

    def _report_statsd_forever(self) -> None:
        reporter = StatsdReporter(self.options, self.status, self.metrics)
        while True:
            reporter.report()
            gevent.sleep(self.options.statsd_reporting_interval)

    def _sweep_forever(self) -> None:
        """Drop silent agents and lift expired quarantines (a lifted one may serve waiting requests)."""
        while True:
            self.registry.expire()
            self.ledger.lift_expired_quarantines()
            gevent.sleep(SWEEP_SECONDS)


def listening(sock: Any) -> bool:
    """A worker's listener still open (gunicorn's gevent worker holds gevent sockets; closed ones say -1)."""
    try:
        return bool(sock.fileno() >= 0)
    except OSError:
        return False


def management_listener(host: str, port: int, shared: bool) -> socket.socket:
    """With a shared ledger every gunicorn worker serves the management port (SO_REUSEPORT): a report
    may land on any of them, as it may on any balancer. Alone, a second process must fail to bind."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(MANAGEMENT_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
