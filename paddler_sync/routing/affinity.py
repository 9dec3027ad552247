"""Where each prompt prefix was sent: the balancer's memory of llama.cpp's prompt caches.

Learned from what it routed (:meth:`PrefixIndex.learn`: this prompt's block hashes now live on that
server), and corrected by what the servers report (:meth:`PrefixIndex.observe`: ``timings.cache_n`` /
``tokens_cached`` say how much of the prompt a server really had). A server holds about one prompt per
slot in its KV cache (more with the 2026 builds' host-memory cache): each server keeps its last
``slots * factor`` prompts here, the factor starting at 1 and following what the reports show (a hit
the index did not expect raises it, a miss it promised lowers it). All entries together are bounded
(``--prefix-cache-entries`` block hashes, least recently used first out).

One owner per worker. With the Redis store, every worker and balancer shares what it learns through a
Redis stream (paddler_sync/fleet/shared.py, ``SharedAffinity``), applied here like its own. Pure:
no I/O.
"""

from __future__ import annotations

from collections import OrderedDict, deque

FACTOR_MIN, FACTOR_MAX = 1.0, 64.0


class PrefixIndex:
    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._where: OrderedDict[str, dict[str, int]] = OrderedDict()  # block hash -> {server key: prompts holding it}
        self._prompts: dict[str, deque[tuple[str, ...]]] = {}  # server key -> its recent prompts, oldest first
        self._factor: dict[str, float] = {}  # prompts per slot a server is believed to keep

    def __len__(self) -> int:
        return len(self._where)

    def held(self, key: str) -> int:
        """Prompts this server is believed to keep now."""
        return len(self._prompts.get(key, ()))

    def matches(self, hashes: tuple[str, ...]) -> dict[str, int]:
        """For every server holding some of this prompt's prefix: how many leading blocks (the longest)."""
        found: dict[str, int] = {}
        for index in range(len(hashes) - 1, -1, -1):
            holders = self._where.get(hashes[index])
            if holders:
                for key in holders:
                    found.setdefault(key, index + 1)
        return found

    def learn(self, key: str, hashes: tuple[str, ...], slots: int) -> None:
        """This prompt went to this server: its prefix lives there now (and the server's oldest beyond what
        it can keep are forgotten)."""
        if not hashes:
            return
        prompts = self._prompts.setdefault(key, deque())
        prompts.append(hashes)
        for block in hashes:
            holders = self._where.get(block)
            if holders is None:
                holders = self._where[block] = {}
            else:
                self._where.move_to_end(block)
            holders[key] = holders.get(key, 0) + 1
        keep = max(1, round(max(1, slots) * self._factor.get(key, FACTOR_MIN)))
        while len(prompts) > keep:
            self._drop(key, prompts.popleft())
        while len(self._where) > self.max_entries:
            self._where.popitem(last=False)

    def observe(self, key: str, expected_blocks: int, cached_blocks: int) -> None:
        """What the server reported having cached, against what the index expected: more than expected means it
        keeps more prompts than its slots (a host-memory cache); less, that it evicted sooner."""
        factor = self._factor.get(key, FACTOR_MIN)
        if cached_blocks > expected_blocks + 1:
            self._factor[key] = min(FACTOR_MAX, factor * 2)
        elif expected_blocks > 1 and cached_blocks < expected_blocks // 2:
            self._factor[key] = max(FACTOR_MIN, factor * 0.75)

    def forget(self, key: str) -> None:
        """A server that left: its prompts go."""
        for hashes in self._prompts.pop(key, ()):
            self._drop(key, hashes)
        self._factor.pop(key, None)

    def _drop(self, key: str, hashes: tuple[str, ...]) -> None:
        for block in hashes:
            holders = self._where.get(block)
            if holders is None or key not in holders:
                continue  # evicted already
            holders[key] -= 1
            if holders[key] <= 0:
                del holders[key]
                if not holders:
                    del self._where[block]
