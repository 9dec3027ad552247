"""What went through the proxy, second by second: the figures the dashboards show, per server and for the fleet.

Prometheus histograms answer "since start"; an operator watching a fleet asks "in the last five minutes":
requests/s, tokens/s, time to first token p50/p95, time in queue p95 and errors by kind, per server
and in all, plus slots in use and requests waiting over time. Each finished request adds to a few
counters in the current bucket of two rings (1 s buckets for 5 minutes, 12 s buckets for an hour),
so memory is bounded (a server silent for an hour is forgotten) and nothing is sorted per request.
Percentiles come from log-spaced bins (each 15 % wider than the last): within 15 % of the true value.

With several workers sharing a Redis store, each worker also keeps its counts as increments per bucket
(``take_increments``), pushes them to Redis every second, and reads the balancer's sums back when a
dashboard asks (``shared_reader``), so the figures are the whole balancer's; the gauges (slots in use,
requests waiting) are sampled by each worker, from the shared ledger.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paddler_sync.endings import Ending

SharedReader = Callable[[str, list[int]], dict[int, dict[str, float]]]  # (range, bucket indices) -> sums by index
RANGES = {"5m": (300, 1.0), "1h": (3600, 12.0)}  # name: (seconds shown, bucket width in seconds)
DEFAULT_RANGE = "5m"
BIN_BASE, BIN_GROWTH, BINS = 0.001, 1.15, 100  # 1 ms up to ~1 h
_LOG_GROWTH = math.log(BIN_GROWTH)


def bin_of(seconds: float) -> int:
    if seconds <= BIN_BASE:
        return 0
    return min(BINS - 1, math.ceil(math.log(seconds / BIN_BASE) / _LOG_GROWTH))


def bin_upper(index: int) -> float:
    return BIN_BASE * BIN_GROWTH ** index


def percentile(bins: Counter[int], fraction: float) -> float | None:
    """The bin bound below which ``fraction`` of the observations lie (None without observations)."""
    total = sum(bins.values())
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for index in sorted(bins):
        seen += bins[index]
        if seen >= rank:
            return bin_upper(index)
    return bin_upper(max(bins))


def error_kind(status: int, ending: Ending) -> str | None:
    """What went wrong, by name: the ending, or for an answer relayed whole, llama.cpp's error status."""
    if ending is not Ending.DONE:
        return ending.value
    return f"llamacpp_{status}" if status >= 400 else None


@dataclass
class Bucket:
    index: int
    requests: int = 0
    tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens of the answers that said (llama.cpp's timings)
    cached_tokens: int = 0  # of which its prompt cache held these: prefill saved
    errors: Counter[str] = field(default_factory=Counter)
    ttft: Counter[int] = field(default_factory=Counter)
    wait: Counter[int] = field(default_factory=Counter)
    slots_busy: int = 0  # peaks over the bucket: a one-second burst is not averaged away
    slots_total: int = 0
    waiting: int = 0
    sampled: bool = False


class Ring:
    """Buckets of ``width`` seconds, the newest last; at most ``points`` of them."""

    def __init__(self, width: float, points: int) -> None:
        self.width = width
        self.buckets: deque[Bucket] = deque(maxlen=points)

    def at(self, now: float) -> Bucket:
        index = int(now // self.width)
        if not self.buckets or self.buckets[-1].index != index:
            self.buckets.append(Bucket(index))
        return self.buckets[-1]

    def since(self, now: float, seconds: float) -> list[Bucket]:
        first = int((now - seconds) // self.width) + 1
        return [b for b in self.buckets if b.index >= first]

    def last_index(self) -> int | None:
        return self.buckets[-1].index if self.buckets else None


def new_rings() -> dict[str, Ring]:
    return {name: Ring(width, round(seconds / width)) for name, (seconds, width) in RANGES.items()}


class Traffic:
    """The one owner of per-request dashboard figures; fed by the proxy and the balancer's sampler."""

    def __init__(self, now: float) -> None:
        self.started = now
        self.fleet = new_rings()
        self.servers: dict[str, dict[str, Ring]] = {}
        self.sharing = False  # True: keep increments for a shared store (take_increments)
        self.pending: dict[tuple[str, int], Counter[str]] = {}
        self.shared_reader: SharedReader | None = None  # the balancer's sums, per bucket index, from the store
        self._last_read: tuple[tuple[str, float], tuple[list[Bucket], dict[str, list[Bucket]]]] | None = None

    def request_done(self, addr: str | None, status: int, ending: Ending, waited: float, ttft: float | None,
                     tokens: int | None, now: float, prompt: tuple[int, int] | None = None) -> None:
        """Into this worker's rings; or, when a shared store sums the workers' counts, only into the increments
        it will push (the dashboards read the sums, so the rings would count for nothing). ``prompt``: the
        answer's prompt tokens and how many of them llama.cpp's cache held, when it said."""
        kind = error_kind(status, ending)
        if self.sharing:
            self._keep_increments(addr, kind, waited, ttft, tokens, now, prompt)
            return
        rings = [self.fleet]
        if addr is not None:
            rings.append(self.servers.get(addr) or self.servers.setdefault(addr, new_rings()))
        for by_range in rings:
            for ring in by_range.values():
                bucket = ring.at(now)
                bucket.requests += 1
                bucket.wait[bin_of(waited)] += 1
                if tokens:
                    bucket.tokens += tokens
                if prompt is not None:
                    bucket.prompt_tokens += prompt[0]
                    bucket.cached_tokens += prompt[1]
                if ttft is not None:
                    bucket.ttft[bin_of(ttft)] += 1
                if kind is not None:
                    bucket.errors[kind] += 1

    def _keep_increments(self, addr: str | None, kind: str | None, waited: float, ttft: float | None,
                         tokens: int | None, now: float, prompt: tuple[int, int] | None) -> None:
        """The same counts as flat fields ``SCOPE|what`` (SCOPE: ``fleet`` or ``srv|ADDR``) per bucket."""
        scopes = ["fleet"] if addr is None else ["fleet", f"srv|{addr}"]
        for name, (_, width) in RANGES.items():
            fields = self.pending.setdefault((name, int(now // width)), Counter())
            for scope in scopes:
                fields[f"{scope}|requests"] += 1
                fields[f"{scope}|wait|{bin_of(waited)}"] += 1
                if tokens:
                    fields[f"{scope}|tokens"] += tokens
                if prompt is not None:
                    fields[f"{scope}|prompt"] += prompt[0]
                    fields[f"{scope}|cached"] += prompt[1]
                if ttft is not None:
                    fields[f"{scope}|ttft|{bin_of(ttft)}"] += 1
                if kind is not None:
                    fields[f"{scope}|err|{kind}"] += 1

    def take_increments(self) -> dict[tuple[str, int], Counter[str]]:
        taken, self.pending = self.pending, {}
        return taken

    def sample(self, slots_busy: int, slots_total: int, waiting: int, now: float) -> None:
        """The fleet's gauges, once a second; also forgets servers that relayed nothing for the longest range."""
        for ring in self.fleet.values():
            bucket = ring.at(now)
            bucket.slots_busy = max(bucket.slots_busy, slots_busy) if bucket.sampled else slots_busy
            bucket.slots_total = max(bucket.slots_total, slots_total) if bucket.sampled else slots_total
            bucket.waiting = max(bucket.waiting, waiting) if bucket.sampled else waiting
            bucket.sampled = True
        self._forget_silent_servers(now)

    def _forget_silent_servers(self, now: float) -> None:
        longest, width = max(RANGES.values())
        oldest = int((now - longest) // width)
        for addr in [a for a, rings in self.servers.items() if (rings["1h"].last_index() or 0) < oldest]:
            del self.servers[addr]

    def summary(self, range_name: str, now: float) -> dict[str, Any]:
        """Rates are over the range, or over the time since start when that is shorter."""
        seconds, _ = RANGES[range_name]
        span = max(1.0, min(seconds, now - self.started))
        if self.shared_reader is not None:
            fleet, servers = self._shared_buckets(range_name, now)
            return {"fleet": summarize(fleet, span),
                    "servers": {addr: summarize(buckets, span) for addr, buckets in servers.items()}}
        return {"fleet": summarize(self.fleet[range_name].since(now, seconds), span),
                "servers": {addr: summarize(rings[range_name].since(now, seconds), span)
                            for addr, rings in self.servers.items()}}

    def _shared_buckets(self, range_name: str, now: float) -> tuple[list[Bucket], dict[str, list[Bucket]]]:
        """The balancer's buckets over the range, rebuilt from the sums the shared store holds; read once for a
        summary and a series of the same moment (a dashboard refresh asks for both)."""
        assert self.shared_reader is not None
        if self._last_read is not None and self._last_read[0] == (range_name, now):
            return self._last_read[1]
        seconds, width = RANGES[range_name]
        last = int(now // width)
        indices = list(range(last - round(seconds / width) + 1, last + 1))
        fleet: list[Bucket] = []
        servers: dict[str, list[Bucket]] = {}
        for index, fields in sorted(self.shared_reader(range_name, indices).items()):
            for scope, bucket in buckets_from_fields(index, fields).items():
                if scope == "fleet":
                    fleet.append(bucket)
                else:
                    servers.setdefault(scope, []).append(bucket)
        self._last_read = ((range_name, now), (fleet, servers))
        return fleet, servers

    def series(self, range_name: str, now: float) -> list[dict[str, Any]]:
        """One point per bucket over the whole range: a quiet minute shows as 0, and the time before the
        balancer started as nothing (None)."""
        seconds, width = RANGES[range_name]
        ring = self.fleet[range_name]
        by_index = {b.index: b for b in ring.since(now, seconds)}
        counted = by_index
        if self.shared_reader is not None:  # the balancer's counts; the gauges are this worker's samples
            counted = {b.index: b for b in self._shared_buckets(range_name, now)[0]}
        last, first_known = int(now // width), int(self.started // width)
        points = []
        for index in range(last - round(seconds / width) + 1, last + 1):
            bucket, counts = by_index.get(index), counted.get(index)
            known = index >= first_known
            points.append({"at": index * width, "width": width,
                           "requests_per_second": (counts.requests / width if counts else 0.0) if known else None,
                           "tokens_per_second": (counts.tokens / width if counts else 0.0) if known else None,
                           "slots_busy": bucket.slots_busy if bucket and bucket.sampled else None,
                           "slots_total": bucket.slots_total if bucket and bucket.sampled else None,
                           "waiting": bucket.waiting if bucket and bucket.sampled else None})
        return points


def rate_text(value: float) -> str:
    """A rate as both dashboards show it: two decimals below 10, whole numbers above."""
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def cache_text(figures: dict[str, Any]) -> str:
    """llama.cpp's prompt cache over the range as both dashboards show it: the share of prompt tokens it held, and
    those tokens (prefill saved), e.g. ``82% (41.2k)``."""
    ratio = figures.get("cache_hit_ratio")
    if ratio is None:
        return "-"
    saved = figures["cached_tokens"]
    return f"{ratio:.0%} ({saved / 1000:.1f}k)" if saved >= 1000 else f"{ratio:.0%} ({saved})"


def errors_text(errors: dict[str, int]) -> str:
    """Errors by kind as both dashboards show them (``none`` when there were none)."""
    return ", ".join(f"{kind} {count}" for kind, count in errors.items()) or "none"


def buckets_from_fields(index: int, fields: dict[str, float]) -> dict[str, Bucket]:
    """One bucket per scope (``fleet``, or a server's address) from a shared store's ``SCOPE|what`` sums."""
    buckets: dict[str, Bucket] = {}
    for name, value in fields.items():
        head, *rest = name.split("|")
        scope = "fleet" if head == "fleet" else rest.pop(0)
        what, *detail = rest
        bucket = buckets.setdefault(scope, Bucket(index))
        count = int(value)
        if what == "requests":
            bucket.requests += count
        elif what == "tokens":
            bucket.tokens += count
        elif what == "prompt":
            bucket.prompt_tokens += count
        elif what == "cached":
            bucket.cached_tokens += count
        elif what == "wait":
            bucket.wait[int(detail[0])] += count
        elif what == "ttft":
            bucket.ttft[int(detail[0])] += count
        elif what == "err":
            bucket.errors[detail[0]] += count
    return buckets


def summarize(buckets: list[Bucket], span: float) -> dict[str, Any]:
    ttft: Counter[int] = Counter()
    wait: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for bucket in buckets:
        ttft.update(bucket.ttft)
        wait.update(bucket.wait)
        errors.update(bucket.errors)
    requests = sum(b.requests for b in buckets)
    prompt, cached = sum(b.prompt_tokens for b in buckets), sum(b.cached_tokens for b in buckets)
    return {
        "requests": requests,
        "requests_per_second": requests / span,
        "tokens": sum(b.tokens for b in buckets),
        "tokens_per_second": sum(b.tokens for b in buckets) / span,
        "ttft_p50_seconds": percentile(ttft, 0.50),
        "ttft_p95_seconds": percentile(ttft, 0.95),
        "queue_wait_p95_seconds": percentile(wait, 0.95),
        "prompt_tokens": prompt,
        "cached_tokens": cached,  # prefill saved by llama.cpp's prompt cache
        "cache_hit_ratio": cached / prompt if prompt else None,
        "errors": dict(errors.most_common()),
    }
