"""Which server gets the next request: a small, swappable choice, among the servers of its model.

The default, ``first-token`` (:class:`FirstToken`), sends each request to the awake server with a free slot
where its first token is expected soonest: the prompt's uncached part over the server's prefill speed
(and, for long generations, its decode time), as ``score`` estimates it (paddler_sync/routing/first_token.py).
``slots`` (:class:`MostFreeSlots`) is the plain rule it refines: the awake server with the most free
slots (a sleeping server, whose model must be loaded again, only when no awake one has a free slot);
ties go to the one with fewer requests in flight from this balancer, then to the lowest address, so the
order is stable and equal servers fill in turn. Benchmarks swap in round robin and least-connections
through the same ``choose`` seam.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from paddler_sync.ledger.slots import Upstream


class Score(Protocol):
    """A request's estimate per server (paddler_sync/routing/first_token.py)."""

    def __call__(self, upstream: Upstream) -> float:
        """Expected seconds to its first token there (with its decode time, for a long generation)."""
        ...

    def prefill_seconds(self, upstream: Upstream) -> float:
        """The prefill of what that server's cache does not hold."""
        ...

    def crowding(self, upstream: Upstream) -> float:
        """Prompts that server's cache is believed to hold, per slot."""
        ...


SCORE_GRAIN = 0.005  # seconds: estimates closer than this are a tie (then the plain rule decides)


class Policy(Protocol):
    slot_blind: bool  # True: it may choose a full server (llama.cpp queues the request), as baselines do
    weighs_waits: bool  # True: it may send a request to a full server whose slot frees soon (see the ledger)

    def choose(self, upstreams: Sequence[Upstream], now: float, score: Score | None = None) -> Upstream | None: ...


def preference(upstream: Upstream, now: float) -> tuple[bool, int, int, str]:
    """Smaller is better: awake before sleeping (whose first request reloads the model), most free slots,
    then fewest in flight, then the address."""
    return (upstream.sleeping, -upstream.free(now), upstream.in_flight, upstream.addr)


class MostFreeSlots:
    """Only servers with a free slot qualify: a request never waits inside a busy llama.cpp."""

    slot_blind = False
    weighs_waits = False

    def choose(self, upstreams: Sequence[Upstream], now: float, score: Score | None = None) -> Upstream | None:
        return min((u for u in upstreams if u.free(now) > 0), key=lambda u: preference(u, now), default=None)


class FirstToken:
    """Among the servers with a free slot, the one where the request's first token is expected soonest (awake
    ones first). Estimates within a few milliseconds of the soonest tie: the server whose cache holds the fewest
    prompts per slot wins (a new conversation goes where it evicts least), then the plain rule. Without a score
    (a request the balancer cannot read), the plain rule."""

    slot_blind = False
    weighs_waits = True

    def choose(self, upstreams: Sequence[Upstream], now: float, score: Score | None = None) -> Upstream | None:
        free = [u for u in upstreams if u.free(now) > 0]
        if score is None or not free:
            return min(free, key=lambda u: preference(u, now), default=None)
        awake = [u for u in free if not u.sleeping] or free
        seconds = {u.key: score(u) for u in awake}
        soonest = min(seconds.values())
        return min((u for u in awake if seconds[u.key] <= soonest + SCORE_GRAIN),
                   key=lambda u: (score.crowding(u), preference(u, now)))  # spread new prompts, then the plain rule


class RoundRobin:
    """Slot-blind baseline: every usable server in turn, full or not (llama.cpp queues the excess)."""

    slot_blind = True
    weighs_waits = False

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, upstreams: Sequence[Upstream], now: float, score: Score | None = None) -> Upstream | None:
        usable = sorted((u for u in upstreams if u.is_usable(now)), key=lambda u: u.addr)
        return usable[next(self._turn) % len(usable)] if usable else None


class LeastConnections:
    """Slot-blind baseline: the usable server with the fewest requests in flight from this balancer."""

    slot_blind = True
    weighs_waits = False

    def choose(self, upstreams: Sequence[Upstream], now: float, score: Score | None = None) -> Upstream | None:
        usable = [u for u in upstreams if u.is_usable(now)]
        return min(usable, key=lambda u: (u.in_flight, u.addr), default=None)


POLICIES: dict[str, type[FirstToken | MostFreeSlots | RoundRobin | LeastConnections]] = {
    "first-token": FirstToken, "slots": MostFreeSlots, "round-robin": RoundRobin,
    "least-connections": LeastConnections}


def make_policy(name: str) -> Policy:
    """The policy --policy names (the settings check the name)."""
    return POLICIES[name]()
