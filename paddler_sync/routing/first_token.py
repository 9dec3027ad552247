"""Which server gives a request its first token soonest: the estimate behind ``--policy first-token``.

On a server with a free slot, the first token comes after the prefill of the prompt's *uncached* part:

    seconds = (prompt tokens - tokens that server's prompt cache likely holds) / its prefill speed
              + 1 / its decode speed                      (the first token itself)
              (+ max_tokens / its decode speed, for a generation of 64 tokens or more: a slot that frees
                 sooner serves the next request sooner)

The cached part comes from where the balancer sent this prompt's prefix before (paddler_sync/fleet/
affinity.py); the speeds from llama.cpp's timings of the answers that passed through
(paddler_sync/routing/speed.py). The ledger weighs a full server too, on prefill alone: twice its expected
wait (until the soonest of its running requests ends; foreseen ends are often early) plus its prefill must
beat the best free server's prefill by 0.1 s (paddler_sync/ledger/ledger.py).

:class:`CacheAwareness` is the one owner of what this learns, per worker: the prefix index and the
speeds. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paddler_sync.ledger.slots import Upstream
from paddler_sync.routing.affinity import PrefixIndex
from paddler_sync.routing.prefixes import request_hashes, tokens_in
from paddler_sync.routing.speed import ServerSpeeds, Timings

LONG_GENERATION = 64


@dataclass
class FirstTokenEstimate:
    """A request's expected seconds to its first token on each server (the ledger's ``score``)."""

    prompt_tokens: int
    cached_blocks: dict[str, int]  # server key -> leading blocks of this prompt it likely holds
    limit: int | None
    speeds: ServerSpeeds
    index: PrefixIndex | None = None

    def crowding(self, upstream: Upstream) -> float:
        """Prompts the server's cache is believed to hold, per slot (the first-token rule's tie-break)."""
        return self.index.held(upstream.key) / max(1, upstream.total) if self.index is not None else 0.0

    def cached_tokens(self, key: str) -> int:
        return min(self.prompt_tokens, tokens_in(self.cached_blocks.get(key, 0)))

    def prefill_seconds(self, upstream: Upstream) -> float:
        uncached = self.prompt_tokens - self.cached_tokens(upstream.key)
        return uncached / self.speeds.prefill_rate(upstream.key)

    def __call__(self, upstream: Upstream) -> float:
        decode = self.speeds.decode_rate(upstream.key)
        seconds = self.prefill_seconds(upstream) + 1 / decode
        if self.limit and self.limit >= LONG_GENERATION:
            seconds += self.limit / decode
        return seconds


@dataclass(frozen=True)
class PromptSeen:
    """What the balancer knew of a request's prompt when it sent it: checked against llama.cpp's answer."""

    hashes: tuple[str, ...]
    expected_blocks: int


class CacheAwareness:
    def __init__(self, max_entries: int) -> None:
        self.index = PrefixIndex(max_entries)
        self.speeds = ServerSpeeds()
        self.outbox: list[tuple[str, tuple[str, ...], int]] | None = None  # learned, for other workers (Redis)

    def estimate(self, body: dict[str, Any] | None, prompt_tokens: int, limit: int | None) \
            -> tuple[FirstTokenEstimate, tuple[str, ...]]:
        hashes = request_hashes(body)
        return FirstTokenEstimate(prompt_tokens, self.index.matches(hashes), limit, self.speeds, self.index), hashes

    def sent(self, upstream: Upstream, hashes: tuple[str, ...], estimate: FirstTokenEstimate | None) -> PromptSeen:
        """The prompt went there: its prefix lives there from now on."""
        expected = estimate.cached_blocks.get(upstream.key, 0) if estimate is not None else 0
        self.index.learn(upstream.key, hashes, upstream.total)
        if self.outbox is not None and hashes:
            self.outbox.append((upstream.key, hashes, upstream.total))
        return PromptSeen(hashes, expected)

    def answered(self, key: str, seen: PromptSeen | None, timings: Timings) -> None:
        """llama.cpp's timings of the answer: the server's speeds, and how much of the prompt it really had."""
        self.speeds.learn(key, timings)
        if seen is not None and seen.hashes:
            total = timings.prompt_processed + timings.prompt_cached
            cached_blocks = len(seen.hashes) * timings.prompt_cached // total if total else 0
            self.index.observe(key, seen.expected_blocks, cached_blocks)
