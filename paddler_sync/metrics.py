"""What the balancer measures, and where it goes: Prometheus (/metrics) and StatsD.

The proxy records each finished request with one call (:meth:`Metrics.request_done`): a few
integer additions into the one set of counts (counters.py) and the dashboards' per-second figures
(traffic.py), no I/O on the hot path. ``/metrics`` renders the counts (the whole balancer's, summed
in Redis when its workers share a store: ``totals``); fleet gauges are read from the fleet status
when someone asks, so they are never stale and cost nothing between reads. StatsD gets absolute
gauges, this worker's counter increments (StatsD adds up the workers) and the interval's timings in
one pipeline per ``--statsd-reporting-interval``, from one greenlet.
"""

from __future__ import annotations

import argparse
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from paddler_sync.counters import LATENCY_BUCKETS, OUTCOMES, TOKEN_KINDS, Counters, outcome_of
from paddler_sync.endings import Ending
from paddler_sync.traffic import Traffic

if TYPE_CHECKING:
    from paddler_sync.fleet.status import FleetStatus

logger = logging.getLogger("paddler_sync.metrics")

STATSD_COUNTERS = {"served": "requests_served", "rejected": "requests_rejected", "timed_out": "requests_timed_out",
                   "upstream_error": "upstream_errors", "client_gone": "requests_abandoned"}
MAX_PENDING_TIMINGS = 20_000  # per StatsD interval; beyond it, samples are dropped (and counted)
HISTOGRAMS = {"queue_wait": ("paddler_queue_wait_seconds", "Time requests waited in the buffer for a slot."),
              "time_to_first_byte": ("paddler_time_to_first_byte_seconds", "From request to the first byte relayed."),
              "request_duration": ("paddler_request_duration_seconds", "From request to the end of the response.")}


class Metrics:
    """The one owner of what is counted: this worker's counts, the StatsD timings, the dashboards' traffic."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_open_fds, process_resident_memory_bytes, CPU
        self.counters = Counters()
        self.traffic = Traffic(time.time())
        self.shared_totals: Callable[[], Counters] | None = None  # the balancer's, when its workers share a store
        self.registry.register(CountersCollector(self))
        self.pending_timings: list[tuple[str, float]] = []
        self.dropped_timings = 0

    def request_done(self, status: int, ending: Ending, addr: str | None, wait: float, ttfb: float | None,
                     duration: float, first_token: float | None = None, tokens: int | None = None,
                     prompt: tuple[int, int] | None = None) -> None:
        """``prompt``: the answer's prompt tokens and those llama.cpp's cache held, when its timings said."""
        self.counters.request_done(outcome_of(status, ending), wait, ttfb, duration)
        if prompt is not None and addr is not None:
            self.counters.prompt_done(addr, *prompt)
        self.traffic.request_done(addr, status, ending, wait, first_token, tokens, time.time(), prompt)
        if len(self.pending_timings) < MAX_PENDING_TIMINGS:
            self.pending_timings.append(("queue_wait", wait))
            self.pending_timings.append(("request_duration", duration))
            if ttfb is not None:
                self.pending_timings.append(("time_to_first_byte", ttfb))
        else:
            self.dropped_timings += 1

    def tenant_done(self, tenant: str, status: int, ending: Ending, wait: float, slot_seconds: float,
                    tokens: dict[str, int]) -> None:
        self.counters.tenant_done(tenant, outcome_of(status, ending), ending, wait, slot_seconds, tokens)

    def quarantined(self) -> None:
        self.counters.quarantined()

    def retried(self) -> None:
        self.counters.retried()

    def model_load(self, model: str | None) -> None:
        """A request sent to a router whose model was unloaded: it loads first."""
        self.counters.model_load(model or "")

    def totals(self) -> Counters:
        """What /metrics shows: the whole balancer's counts (this worker's, when it is the only one)."""
        return self.shared_totals() if self.shared_totals is not None else self.counters

    def take_timings(self) -> list[tuple[str, float]]:
        taken, self.pending_timings = self.pending_timings, []
        return taken


class CountersCollector(Collector):
    """The counts in Prometheus's shape, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        totals = self.metrics.totals()
        requests = CounterMetricFamily("paddler_requests", "Requests the proxy finished, by outcome.",
                                       labels=["outcome"])
        for outcome, count in totals.outcomes.items():
            requests.add_metric([outcome], count)
        yield requests
        yield CounterMetricFamily("paddler_quarantines", "Servers quarantined after a refused connection.",
                                  value=totals.quarantines)
        yield CounterMetricFamily("paddler_requests_retried", "Requests llama.cpp never answered (its server failed "
                                  "before the first byte), sent again.", value=totals.retries)
        prompts = CounterMetricFamily("paddler_agent_prompt_tokens", "Prompt tokens of the answers each server "
                                      "relayed (llama.cpp's timings).", labels=["addr"])
        cached = CounterMetricFamily("paddler_agent_prompt_tokens_cached", "Of those, the tokens its prompt cache "
                                     "held: prefill saved.", labels=["addr"])
        for addr, (prompt, hit) in sorted(totals.prompts.items()):
            prompts.add_metric([addr], prompt)
            cached.add_metric([addr], hit)
        yield prompts
        yield cached
        loads = CounterMetricFamily("paddler_model_loads", "Requests sent to a router that had to load their model "
                                    "first.", labels=["model"])
        for model, count in sorted(totals.model_loads.items()):
            loads.add_metric([model], count)
        yield loads
        yield from tenant_counters(totals)
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for name, (metric, help_text) in HISTOGRAMS.items():
            dist = totals.distributions[name]
            yield HistogramMetricFamily(metric, help_text, buckets=list(zip(bounds, dist.cumulative(), strict=True)),
                                        sum_value=dist.sum)


def tenant_counters(totals: Counters) -> Iterator[CounterMetricFamily]:
    """Each tenant's usage (--tenants): requests by outcome, tokens by kind, slot-seconds."""
    requests = CounterMetricFamily("paddler_tenant_requests", "Requests of each tenant, by outcome.",
                                   labels=["tenant", "outcome"])
    tokens = CounterMetricFamily("paddler_tenant_tokens", "Tokens of each tenant's answers, by kind (prompt, "
                                 "generated, and cached: prompt tokens llama.cpp's cache held).",
                                 labels=["tenant", "kind"])
    slot_seconds = CounterMetricFamily("paddler_tenant_slot_seconds", "Seconds each tenant held llama.cpp slots.",
                                       labels=["tenant"])
    for tenant, usage in sorted(totals.tenants.items()):
        for outcome in OUTCOMES:
            requests.add_metric([tenant, outcome], usage.get(f"requests:{outcome}", 0))
        for kind in TOKEN_KINDS:
            tokens.add_metric([tenant, kind], usage.get(f"tokens:{kind}", 0))
        slot_seconds.add_metric([tenant], usage.get("slot_seconds", 0.0))
    yield requests
    yield tokens
    yield slot_seconds


class FleetCollector(Collector):
    """Fleet and per-agent gauges, read from the ledger at scrape time."""

    def __init__(self, status: FleetStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        health = self.status.health()
        for key, help_text in (("slots_idle", "Free slots in the fleet."),
                               ("slots_processing", "Busy slots in the fleet."),
                               ("requests_buffered", "Requests waiting for a slot now."),
                               ("requests_in_flight", "Requests this balancer is relaying now."),
                               ("agents", "Registered agents."),
                               ("agents_draining", "Servers draining: no new requests go there (a model swap, "
                                                   "or drained by hand).")):
            yield GaugeMetricFamily(f"paddler_{key}", help_text, value=health[key])
        yield GaugeMetricFamily("paddler_greenlets", "Live greenlets in the worker (a leak shows here).",
                                value=live_greenlets())
        if self.status.shared is not None:
            state = self.status.shared
            yield GaugeMetricFamily("paddler_shared_ledger_connections", "Open connections to Redis (the pool "
                                    "grows with concurrent requests, up to its bound).", value=state.connections())
            yield GaugeMetricFamily("paddler_shared_ledger_reachable", "1 while Redis answers.",
                                    value=float(state.reachable))
        yield from agent_families(self.status.agents())
        yield from model_families(self.status.models())
        yield from tenant_gauges(self.status)


def tenant_gauges(status: FleetStatus) -> Iterator[GaugeMetricFamily]:
    """Each tenant's slots held and requests waiting now (--tenants)."""
    if status.tenants is None or status.tenants.book is None:
        return
    held, waiting = status.ledger.held(), status.buffer.waiting_by_tenant()
    in_flight = GaugeMetricFamily("paddler_tenant_in_flight", "Slots each tenant holds now.", labels=["tenant"])
    queued = GaugeMetricFamily("paddler_tenant_waiting", "Requests of each tenant waiting for a slot now.",
                               labels=["tenant"])
    for tenant in status.tenants.names():
        in_flight.add_metric([tenant], held.get(tenant, 0))
        queued.add_metric([tenant], waiting.get(tenant, 0))
    yield in_flight
    yield queued


def agent_families(agents: list[dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    """Per server: its slots, whether it takes traffic or drains, its models, and the llama-server its agent runs."""
    labels = ["agent_id", "agent_name", "addr"]
    families = {
        "slots_idle": GaugeMetricFamily("paddler_agent_slots_idle", "Free slots per server.", labels=labels),
        "slots_processing": GaugeMetricFamily("paddler_agent_slots_processing", "Busy slots per server.",
                                              labels=labels),
        "slots_in_flight": GaugeMetricFamily("paddler_agent_slots_in_flight",
                                             "Requests this balancer has in flight per server.", labels=labels),
        "ready": GaugeMetricFamily("paddler_agent_ready", "1 when the server takes traffic.", labels=labels),
        "draining": GaugeMetricFamily("paddler_agent_draining", "1 while the server drains.", labels=labels),
    }
    supervised = GaugeMetricFamily("paddler_agent_supervisor_state", "1 for the state of the llama-server its "
                                   "agent runs (--supervise): starting, loading, ready, crashed, restarting, "
                                   "backing_off, stopping.", labels=[*labels, "state"])
    restarts = GaugeMetricFamily("paddler_agent_supervisor_restarts", "Times its agent started llama-server "
                                 "again (crashes, failed starts, rollbacks).", labels=labels)
    per_model = GaugeMetricFamily("paddler_agent_model_slots_idle", "Free slots per server and model (a "
                                  "router has one set of slots per loaded model).", labels=[*labels, "model", "state"])
    for agent in agents:
        values = [agent["agent_id"], agent["agent_name"] or "", agent["external_llamacpp_addr"]]
        for key, family in families.items():
            value = agent["state"] == "ready" if key == "ready" else agent[key]
            family.add_metric(values, float(value))
        for model in agent["models"]:
            per_model.add_metric([*values, model["id"], model["state"]], float(model["slots_idle"]))
        if agent["supervisor"] is not None:
            supervised.add_metric([*values, agent["supervisor"]["state"]], 1.0)
            restarts.add_metric(values, float(agent["supervisor"]["restarts"]))
    yield from families.values()
    yield per_model
    yield supervised
    yield restarts


MODEL_GAUGES = {"slots_idle": "Free slots of the model across the fleet.",
                "slots_total": "Slots of the model across the fleet (loaded models only).",
                "servers": "Servers that serve the model (loaded or not).",
                "servers_loaded": "Servers with the model loaded.",
                "requests_buffered": "Requests for the model waiting for a slot."}


def model_families(models: list[dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    for key, help_text in MODEL_GAUGES.items():
        family = GaugeMetricFamily(f"paddler_model_{key}", help_text, labels=["model"])
        for model in models:
            family.add_metric([model["id"]], float(model[key]))
        yield family


def statsd_name(model: str) -> str:
    """A model id as one StatsD path segment (no dots, colons, pipes or slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", model) or "_"


def live_greenlets() -> int:
    import gc

    from greenlet import greenlet

    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and not obj.dead)


class StatsdReporter:
    """Sends Paddler's gauges (and our counters and timings) every interval; never breaks serving."""

    def __init__(self, options: argparse.Namespace, status: FleetStatus, metrics: Metrics) -> None:
        self.status = status
        self.metrics = metrics
        self.addr = options.statsd_addr
        self.prefix = options.statsd_prefix
        self.client: Any = None
        self._sent_counts = dict.fromkeys(STATSD_COUNTERS, 0)
        self._sent_quarantines = 0
        self._sent_tenants: dict[str, float] = {}
        self._problem: str | None = None

    def report(self) -> bool:
        client = self._client()
        if client is None:
            return False
        health = self.status.health()
        metrics = self.metrics
        with client.pipeline() as pipe:
            for gauge in ("slots_idle", "slots_processing", "requests_buffered", "agents_draining"):
                pipe.gauge(gauge, health[gauge])
            for model in self.status.models():
                for key in ("slots_idle", "slots_total", "requests_buffered"):
                    pipe.gauge(f"models.{statsd_name(model['id'])}.{key}", model[key])
            counts = metrics.counters
            for outcome, name in STATSD_COUNTERS.items():
                delta = counts.outcomes[outcome] - self._sent_counts[outcome]
                if delta:
                    pipe.incr(name, delta)
                self._sent_counts[outcome] = counts.outcomes[outcome]
            if counts.quarantines != self._sent_quarantines:
                pipe.incr("quarantines", counts.quarantines - self._sent_quarantines)
                self._sent_quarantines = counts.quarantines
            self._tenants(pipe, counts)
            for name, seconds in metrics.take_timings():
                pipe.timing(name, seconds * 1000.0)
        return True

    def _tenants(self, pipe: Any, counts: Counters) -> None:
        """Per tenant: slots held and requests waiting (gauges), and what it used since the last report."""
        for row in self.status.tenant_rows(counts):
            name = statsd_name(row["name"])
            pipe.gauge(f"tenants.{name}.in_flight", row["in_flight"])
            pipe.gauge(f"tenants.{name}.waiting", row["waiting"])
        for tenant, usage in counts.tenants.items():
            for field, amount in usage.items():
                key = f"{tenant}:{field}"
                delta = amount - self._sent_tenants.get(key, 0)
                if delta:
                    pipe.incr(f"tenants.{statsd_name(tenant)}.{field.replace(':', '.')}", round(delta, 3))
                self._sent_tenants[key] = amount

    def _client(self) -> Any:
        """Built lazily: the statsd package resolves its host in the constructor, and may fail there."""
        if self.client is not None:
            return self.client
        import statsd

        try:
            self.client = statsd.StatsClient(self.addr.host, self.addr.port, prefix=self.prefix,
                                             ipv6=self.addr.is_ipv6)
        except (OSError, socket.gaierror) as exc:
            problem = f"StatsD address {self.addr} cannot be used ({exc}); metrics are not sent until it can"
            if problem != self._problem:
                logger.warning("%s", problem)
                self._problem = problem
            return None
        if self._problem:
            logger.info("StatsD address %s works again", self.addr)
            self._problem = None
        logger.info("sending StatsD metrics to %s with prefix '%s'", self.addr, self.prefix)
        return self.client
