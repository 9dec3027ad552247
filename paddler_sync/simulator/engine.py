"""The simulated server's slots: at most N tasks run at once, the rest wait in llama.cpp's own queue.

Each slot keeps what llama.cpp keeps after a task (its last prompt, params and counters) and the
tokens in its KV cache, so a prompt that extends what a slot last processed skips that prefix.
Slot choice follows llama.cpp: the free slot whose cache shares the longest prefix (at least half
the prompt), else the least recently used one. The engine counts every request that had to wait,
which is how tests and benchmarks prove that a balancer sent a request to a full server.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.event import Event

logger = logging.getLogger("paddler_sync.simulator")

SLOT_PROMPT_SIMILARITY = 0.5


@dataclass
class Slot:
    id: int
    n_ctx: int
    id_task: int = -1
    is_processing: bool = False
    prompt: str = ""
    cache: list[int] = field(default_factory=list)
    params: dict[str, Any] | None = None
    n_decoded: int = 0
    n_remain: int = -1
    has_next_token: bool = True
    has_new_line: bool = False
    stopping_word: str = ""
    last_used: float = 0.0


@dataclass
class Timing:
    prefill_ms_per_token: float = 0.2
    decode_tokens_per_second: float = 100.0
    decode_jitter: float = 0.0

    def token_delay(self, rng: random.Random) -> float:
        if self.decode_tokens_per_second <= 0:
            return 0.0
        base = 1.0 / self.decode_tokens_per_second
        if self.decode_jitter:
            base *= 1.0 + self.decode_jitter * rng.uniform(-1.0, 1.0)
        return base

    def prefill_seconds(self, n_tokens: int) -> float:
        return n_tokens * self.prefill_ms_per_token / 1000.0


@dataclass
class Counters:
    """What /metrics and /simulator/stats report."""

    prompt_tokens_total: int = 0
    prompt_seconds_total: float = 0.0
    tokens_predicted_total: int = 0
    tokens_predicted_seconds_total: float = 0.0
    n_decode_total: int = 0
    n_busy_slots_total: int = 0
    requests_total: int = 0
    requests_deferred_total: int = 0
    requests_cancelled_total: int = 0
    prompt_tokens_cached_total: int = 0


class Engine:
    def __init__(self, n_slots: int, n_ctx: int, timing: Timing, prompt_cache: bool = True,
                 seed: int = 42) -> None:
        self.slots = [Slot(id=i, n_ctx=max(1, n_ctx // n_slots)) for i in range(n_slots)]
        self.timing = timing
        self.prompt_cache = prompt_cache
        self.rng = random.Random(seed)
        self.counters = Counters()
        self._task_ids = itertools.count()
        self._waiting: deque[Event] = deque()

    # --- state ------------------------------------------------------------------------------------

    @property
    def processing(self) -> int:
        return sum(1 for s in self.slots if s.is_processing)

    @property
    def deferred(self) -> int:
        return len(self._waiting)

    def next_task_id(self) -> int:
        return next(self._task_ids)

    # --- taking and giving back slots ---------------------------------------------------------------

    def acquire(self, prompt_tokens: list[int]) -> Slot:
        """Take a slot for a new task, waiting in FIFO order when all are busy (llama.cpp defers it)."""
        self.counters.requests_total += 1
        slot = self._choose_free_slot(prompt_tokens) if not self._waiting else None
        if slot is None:
            self.counters.requests_deferred_total += 1
            logger.info("a task waits: all %d slots are busy (requests_deferred %d)", len(self.slots),
                        self.counters.requests_deferred_total)
            slot = self._wait_for_slot(prompt_tokens)
        slot.is_processing = True
        slot.last_used = time.monotonic()
        return slot

    def _wait_for_slot(self, prompt_tokens: list[int]) -> Slot:
        ticket = Event()
        self._waiting.append(ticket)
        try:
            while True:
                ticket.wait()
                slot = self._choose_free_slot(prompt_tokens)
                if slot is not None:
                    return slot
                ticket.clear()
        finally:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            self._wake_next()

    def release(self, slot: Slot) -> None:
        slot.is_processing = False
        slot.last_used = time.monotonic()
        self._wake_next()

    def _wake_next(self) -> None:
        if self._waiting and any(not s.is_processing for s in self.slots):
            self._waiting[0].set()

    def _choose_free_slot(self, prompt_tokens: list[int]) -> Slot | None:
        free = [s for s in self.slots if not s.is_processing]
        if not free:
            return None
        if self.prompt_cache and prompt_tokens:
            best = max(free, key=lambda s: common_prefix(s.cache, prompt_tokens))
            if common_prefix(best.cache, prompt_tokens) >= SLOT_PROMPT_SIMILARITY * len(prompt_tokens):
                return best
        return min(free, key=lambda s: (s.last_used, s.id))

    # --- work -----------------------------------------------------------------------------------------

    def cached_prefix(self, slot: Slot, prompt_tokens: list[int]) -> int:
        """Tokens of the prompt already in the slot's cache; at least the last token is always evaluated."""
        if not self.prompt_cache:
            return 0
        return min(common_prefix(slot.cache, prompt_tokens), max(0, len(prompt_tokens) - 1))

    def prefill(self, n_new_tokens: int, n_cached: int) -> float:
        seconds = self.timing.prefill_seconds(n_new_tokens)
        if seconds:
            gevent.sleep(seconds)
        self.counters.prompt_tokens_total += n_new_tokens
        self.counters.prompt_seconds_total += seconds
        self.counters.prompt_tokens_cached_total += n_cached
        return seconds

    def token_delay(self) -> float:
        return self.timing.token_delay(self.rng)

    def count_decoded(self, n_tokens: int, seconds: float) -> None:
        self.counters.tokens_predicted_total += n_tokens
        self.counters.tokens_predicted_seconds_total += seconds
        self.counters.n_decode_total += n_tokens
        self.counters.n_busy_slots_total += n_tokens * max(1, self.processing)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
