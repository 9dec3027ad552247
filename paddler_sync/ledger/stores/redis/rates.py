"""Tenants' requests and tokens per minute in Redis (``--state-backend redis://`` with ``--tenants``): the same
sliding minute as paddler_sync/tenants/rates.py, for every worker and balancer of the prefix, checked and counted
in one script (``lua/rate.lua``). Minutes are the balancers' wall-clock minutes (keep them in NTP sync). While Redis
cannot be reached, requests are not held to their rates (the slot take fails closed anyway)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from paddler_sync.ledger.refusals import StateUnavailable
from paddler_sync.ledger.stores.redis.store import RedisStore
from paddler_sync.tenants.rates import MINUTE, REQUESTS, TOKENS, Window, window

logger = logging.getLogger("paddler_sync.tenants")
BUCKET_TTL = 180  # seconds: a minute's bucket is read for two minutes


class RedisRates:
    def __init__(self, store: RedisStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def _key(self, tenant: str, kind: str, minute: int) -> str:
        return f"{self.store.prefix}:rate:{tenant}:{kind}:{minute}"

    def admit(self, tenant: str, requests_per_minute: int, tokens_per_minute: int) -> list[Window]:
        now = self.clock()
        minute, into = int(now // MINUTE), now % MINUTE
        keys = [self._key(tenant, kind, m) for kind in (REQUESTS, TOKENS) for m in (minute, minute - 1)]
        try:
            rb, rn, tb, tn, _ = self.store.call("rate", keys, [requests_per_minute, tokens_per_minute, into])
        except StateUnavailable:
            return []
        figures = {REQUESTS: (requests_per_minute, float(rb), float(rn)),
                   TOKENS: (tokens_per_minute, float(tb), float(tn))}
        return [window(kind, limit, before, current, into) for kind, (limit, before, current) in figures.items()
                if limit]

    def add_tokens(self, tenant: str, tokens: int) -> None:
        if tokens <= 0:
            return
        key = self._key(tenant, TOKENS, int(self.clock() // MINUTE))

        def add() -> None:
            with self.store.client.pipeline(transaction=False) as pipe:
                pipe.incrby(key, tokens)
                pipe.expire(key, BUCKET_TTL)
                pipe.execute()

        try:
            self.store._guarded(add)
        except StateUnavailable:
            logger.warning("could not count %d tokens of tenant %s: Redis is unreachable", tokens, tenant)
