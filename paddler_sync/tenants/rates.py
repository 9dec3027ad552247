"""Requests and tokens per minute, per tenant: a sliding minute, estimated from two one-minute buckets.

The estimate at a moment ``e`` seconds into the current minute is ``previous * (60 - e) / 60 + current`` (the
method of Cloudflare's and Redis's rate limiters: smooth at the boundary, two numbers per tenant and kind). A
request is admitted while the tenant's requests, this one included, stay within ``requests_per_minute``, and while
its tokens (prompt + generated, counted when each answer ends) are below ``tokens_per_minute``: a request's tokens
are known only once llama.cpp has answered it, so the last one admitted may go past the limit by its own size.

:class:`LocalRates` keeps the buckets in this process; the Redis store's (paddler_sync/ledger/stores/redis/rates.py)
keeps them in Redis for every worker and balancer, checked and counted in one script.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

MINUTE = 60.0
REQUESTS, TOKENS = "requests", "tokens"


@dataclass(frozen=True)
class Window:
    """One tenant's use of one kind: the estimate now, its limit, and when a request would be admitted again."""

    kind: str
    limit: int
    used: float
    retry_after: float = 0.0  # seconds; 0: admitted now

    @property
    def remaining(self) -> int:
        return max(0, int(self.limit - self.used))

    @property
    def reset_seconds(self) -> float:
        """Until the estimate is back under the limit by one (OpenAI's x-ratelimit-reset-*)."""
        return self.retry_after


def estimate(previous: float, current: float, into_minute: float) -> float:
    return previous * (MINUTE - into_minute) / MINUTE + current


def wait_for(previous: float, current: float, into_minute: float, room: float) -> float:
    """Seconds until the estimate drops to ``room`` or below (buckets shift at the minute's end)."""
    if estimate(previous, current, into_minute) <= room:
        return 0.0
    if previous > 0 and current <= room:  # within this minute, as the previous bucket fades
        return max(0.0, MINUTE * (1 - (room - current) / previous) - into_minute)
    if current <= 0:
        return MINUTE - into_minute
    # next minute: the current bucket becomes the previous one and fades
    return (MINUTE - into_minute) + max(0.0, MINUTE * (1 - room / current))


def window(kind: str, limit: int, previous: float, current: float, into_minute: float) -> Window:
    """A request's view: requests need room for one more; tokens need to be under the limit."""
    room = limit - 1 if kind == REQUESTS else math.nextafter(limit, 0)
    used = estimate(previous, current, into_minute)
    return Window(kind, limit, used, wait_for(previous, current, into_minute, room))


class Rates(Protocol):
    def admit(self, tenant: str, requests_per_minute: int, tokens_per_minute: int) -> list[Window]:
        """The tenant's windows (the limited kinds only); when every one admits, the request is counted."""
        ...

    def add_tokens(self, tenant: str, tokens: int) -> None: ...


class LocalRates:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.buckets: dict[tuple[str, str], tuple[int, float, float]] = {}  # -> (minute, previous, current)

    def _read(self, tenant: str, kind: str, minute: int) -> tuple[float, float]:
        at, previous, current = self.buckets.get((tenant, kind), (minute, 0.0, 0.0))
        if at == minute:
            return previous, current
        return (current if at == minute - 1 else 0.0), 0.0

    def _add(self, tenant: str, kind: str, amount: float) -> None:
        minute = int(self.clock() // MINUTE)
        previous, current = self._read(tenant, kind, minute)
        self.buckets[(tenant, kind)] = (minute, previous, current + amount)

    def admit(self, tenant: str, requests_per_minute: int, tokens_per_minute: int) -> list[Window]:
        now = self.clock()
        minute, into = int(now // MINUTE), now % MINUTE
        windows = [window(kind, limit, *self._read(tenant, kind, minute), into)
                   for kind, limit in ((REQUESTS, requests_per_minute), (TOKENS, tokens_per_minute)) if limit]
        if all(w.retry_after == 0 for w in windows):
            self._add(tenant, REQUESTS, 1)
        return windows

    def add_tokens(self, tenant: str, tokens: int) -> None:
        if tokens > 0:
            self._add(tenant, TOKENS, tokens)
