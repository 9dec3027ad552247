"""The worker's loops around the Redis store (paddler_sync/ledger/stores/redis/store.py): what keeps its mirror current,
its leases alive, its counts summed and its first-token routing shared with every other worker and balancer."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

import gevent
from gevent.event import Event

from paddler_sync.counters import Counters, increments
from paddler_sync.fleet.registry import Registry
from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.refusals import StateUnavailable
from paddler_sync.ledger.stores.redis.store import (
    AFFINITY_KEPT,
    AFFINITY_READ,
    COUNTS_FLUSH_SECONDS,
    COUNTS_TTL,
    REDIS_ERRORS,
    RETRY_PAUSE,
    SOCKET_TIMEOUT,
    RedisStore,
)
from paddler_sync.routing.first_token import CacheAwareness
from paddler_sync.traffic import RANGES as TRAFFIC_RANGES
from paddler_sync.traffic import Traffic


class SharedAffinity:
    """What each worker's first-token routing learns (which prompt prefix went to which server), shared with every
    worker and balancer of the prefix through one Redis stream, ``PREFIX:affinity`` (trimmed to about
    AFFINITY_KEPT entries): each worker adds what it learned and applies what the others did, every refresh (a
    fifth of a second), in one round trip each way."""

    def __init__(self, store: RedisStore, awareness: CacheAwareness) -> None:
        self.store = store
        self.awareness = awareness
        awareness.outbox = []
        self.key = f"{store.prefix}:affinity"
        self.last_id = "0-0"

    def sync(self) -> None:
        outbox, self.awareness.outbox = self.awareness.outbox or [], []
        if outbox:
            def push() -> None:
                with self.store.client.pipeline(transaction=False) as pipe:
                    for key, hashes, slots in outbox:
                        pipe.xadd(self.key, {"w": self.store.worker_id, "k": key, "s": slots, "h": ",".join(hashes)},
                                  maxlen=AFFINITY_KEPT, approximate=True)
                    pipe.execute()
            self.store._guarded(push)
        answer = self.store._guarded(self.store.client.xread, {self.key: self.last_id}, count=AFFINITY_READ)
        for _, entries in answer or ():
            for entry_id, fields in entries:
                self.last_id = entry_id
                if fields.get("w") != self.store.worker_id:
                    self.awareness.index.learn(fields["k"], tuple(fields["h"].split(",")), int(fields["s"]))


class SharedFleetSync:
    """The worker's greenlets for the Redis store: wake-ups, mirror refreshes and lease renewals."""

    def __init__(self, store: RedisStore, ledger: Ledger, registry: Registry, counts: SharedCounts,
                 refresh_interval: float) -> None:
        self.store = store
        self.ledger = ledger
        self.registry = registry
        self.counts = counts
        self.refresh_interval = refresh_interval
        self.wake = Event()
        self.affinity: SharedAffinity | None = None  # set when the balancer routes by first token
        self.tenants: Callable[[], list[str]] = list  # the tenants' names (--tenants), whose slots held are read

    def refresh_forever(self) -> None:
        """Refresh on every capacity message (coalesced) and at least every refresh interval."""
        while True:
            self.wake.wait(timeout=self.refresh_interval)
            self.wake.clear()
            try:
                self.store.keep_waiting_mark()
                self.store.catch_up()
                records = self.ledger.refresh()
                self.registry.adopt(records or {})
                self.store.refresh_held(self.tenants())
                if self.affinity is not None:
                    self.affinity.sync()
            except StateUnavailable:
                gevent.sleep(RETRY_PAUSE)

    def listen_forever(self) -> None:
        """Subscribe to capacity messages; reconnect whenever Redis goes away."""
        while True:
            try:
                pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            except StateUnavailable:  # not connected yet (a cluster that was down at start)
                gevent.sleep(RETRY_PAUSE)
                continue
            try:
                pubsub.subscribe(self.store.channel)
                self.wake.set()  # refresh after (re)subscribing: messages may have been missed
                while True:
                    if pubsub.get_message(timeout=SOCKET_TIMEOUT / 2) is not None:
                        self.wake.set()
            except REDIS_ERRORS:
                gevent.sleep(RETRY_PAUSE)
            finally:
                pubsub.close()

    def flush_counts_forever(self) -> None:
        while True:
            gevent.sleep(COUNTS_FLUSH_SECONDS)
            with contextlib.suppress(StateUnavailable):
                self.counts.flush()

    def renew_forever(self) -> None:
        while True:
            gevent.sleep(self.store.lease_ttl_ms / 3000)
            with contextlib.suppress(StateUnavailable):
                self.store.renew_leases()


class SharedCounts:
    """This worker's counts and traffic figures, pushed to Redis as increments, so any worker of the balancer
    answers /metrics and the dashboards with the whole balancer's (hashes per balancer: its host and gunicorn
    master; other workers' increments of the last second may be missing from an answer)."""

    def __init__(self, store: RedisStore, counters: Counters, traffic: Traffic) -> None:
        self.store = store
        self.counters = counters
        self.traffic = traffic
        self.key = f"{store.prefix}:counts:{socket.gethostname()}:{os.getppid()}"
        self.flushed: dict[str, float] = {}
        traffic.sharing = True
        traffic.shared_reader = self.traffic_sums

    def flush(self) -> None:
        """Everything counted since the last flush, in one round trip."""
        now = self.counters.fields()
        moved = increments(now, self.flushed)
        batches = [(self.key, moved, COUNTS_TTL)] if moved else []
        for (range_name, index), fields in self.traffic.take_increments().items():
            seconds, _ = TRAFFIC_RANGES[range_name]
            batches.append((self._traffic_key(range_name, index), dict(fields), int(seconds) + 60))
        self.store.add_counts(batches)
        self.flushed = now

    def _traffic_key(self, range_name: str, index: int) -> str:
        return f"{self.key}:traffic:{range_name}:{index}"

    def traffic_sums(self, range_name: str, indices: list[int]) -> dict[int, dict[str, float]]:
        """The balancer's sums per bucket (this worker's increments pushed first); this worker's own increments
        are lost for the dashboards while Redis cannot be reached (its counts are kept)."""
        try:
            self.flush()
            return self.store.many_counts([self._traffic_key(range_name, i) for i in indices], indices)
        except StateUnavailable:
            return {}

    def totals(self) -> Counters:
        """This worker's increments pushed first; this worker's own counts alone while Redis cannot be reached."""
        try:
            self.flush()
            return Counters.from_fields(self.store.counts(self.key))
        except StateUnavailable:
            return self.counters
