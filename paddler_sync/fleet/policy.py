"""Which server gets the next request: a small, swappable choice.

The default sends each request to the awake server with the most free slots (a sleeping server, whose
model must be loaded again, only when no awake one has a free slot); ties go to the one with
fewer requests in flight from this balancer, then to the lowest address, so the order is stable
and equal servers fill in turn. Benchmarks swap in round robin and least-connections through the
same ``choose`` seam; routing by model, prompt-cache affinity and context fit will plug in here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from paddler_sync.fleet.upstream import Upstream


class Policy(Protocol):
    slot_blind: bool  # True: it may choose a full server (llama.cpp queues the request), as baselines do

    def choose(self, upstreams: Sequence[Upstream], now: float) -> Upstream | None: ...


def preference(upstream: Upstream, now: float) -> tuple[bool, int, int, str]:
    """Smaller is better: awake before sleeping (whose first request reloads the model), most free slots,
    then fewest in flight, then the address."""
    return (upstream.sleeping, -upstream.free(now), upstream.in_flight, upstream.addr)


class MostFreeSlots:
    """Only servers with a free slot qualify: a request never waits inside a busy llama.cpp."""

    slot_blind = False

    def choose(self, upstreams: Sequence[Upstream], now: float) -> Upstream | None:
        return min((u for u in upstreams if u.free(now) > 0), key=lambda u: preference(u, now), default=None)


class RoundRobin:
    """Slot-blind baseline: every usable server in turn, full or not (llama.cpp queues the excess)."""

    slot_blind = True

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, upstreams: Sequence[Upstream], now: float) -> Upstream | None:
        usable = sorted((u for u in upstreams if u.is_usable(now)), key=lambda u: u.addr)
        return usable[next(self._turn) % len(usable)] if usable else None


class LeastConnections:
    """Slot-blind baseline: the usable server with the fewest requests in flight from this balancer."""

    slot_blind = True

    def choose(self, upstreams: Sequence[Upstream], now: float) -> Upstream | None:
        usable = [u for u in upstreams if u.is_usable(now)]
        return min(usable, key=lambda u: (u.in_flight, u.addr), default=None)


POLICIES: dict[str, type[MostFreeSlots | RoundRobin | LeastConnections]] = {
    "slots": MostFreeSlots, "round-robin": RoundRobin, "least-connections": LeastConnections}


def make_policy(name: str) -> Policy:
    """The policy --policy names (the settings check the name)."""
    return POLICIES[name]()
