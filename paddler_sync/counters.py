"""The balancer's cumulative counts: the one set that Prometheus and StatsD read (the dashboards' time-windowed
figures are traffic.py, fed by the same call).

Requests by outcome, quarantines, three latency distributions (time in queue, to the first byte,
in all), and each tenant's usage (--tenants). Each worker counts what it finished; as flat
``{field: number}`` maps, counts add up, so the workers of a balancer that share a Redis store push
their increments there (``RedisStore``) and any worker answers ``/metrics`` with the whole balancer's
totals. Pure: no I/O, no clock.
"""

from __future__ import annotations

import bisect

from paddler_sync.endings import Ending

OUTCOMES = ("served", "rejected", "timed_out", "upstream_error", "client_gone", "refused")
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DISTRIBUTIONS = ("queue_wait", "time_to_first_byte", "request_duration")
TOKEN_KINDS = ("prompt", "generated", "cached")  # cached: of the prompt's tokens, those llama.cpp's cache held
ENDING_OUTCOMES = {  # how each ending of the access log is counted
    Ending.CLIENT_GONE: "client_gone", Ending.QUEUE_FULL: "rejected", Ending.RATE_LIMITED: "rejected",
    Ending.TIMED_OUT: "timed_out",
    Ending.UPSTREAM_TIMEOUT: "timed_out", Ending.UPSTREAM_ERROR: "upstream_error",
    Ending.UPSTREAM_REFUSED: "upstream_error",
}


def outcome_of(status: int, ending: Ending) -> str:
    if ending in ENDING_OUTCOMES:
        return ENDING_OUTCOMES[ending]
    if ending is Ending.DONE:
        return "upstream_error" if status == 502 else "served"
    return "refused"


class Distribution:
    """Observations per latency bucket (not cumulative: they add across workers), their count and sum."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above the largest bound
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[int]:
        """Prometheus's view: observations at or below each bound, then all of them."""
        total, out = 0, []
        for count in self.buckets:
            total += count
            out.append(total)
        return out


class Counters:
    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.quarantines = 0
        self.retries = 0  # requests llama.cpp never answered, sent again (paddler_sync/proxy/retry.py)
        self.model_loads: dict[str, int] = {}  # requests that made a router load their model, by model id
        self.prompts: dict[str, tuple[int, int]] = {}  # by server address: prompt tokens, of which cached
        self.distributions = {name: Distribution() for name in DISTRIBUTIONS}
        self.tenants: dict[str, dict[str, float]] = {}  # tenant -> usage field (see tenant_done) -> amount

    def request_done(self, outcome: str, wait: float, ttfb: float | None, duration: float) -> None:
        self.outcomes[outcome] += 1
        self.distributions["queue_wait"].observe(wait)
        self.distributions["request_duration"].observe(duration)
        if ttfb is not None:
            self.distributions["time_to_first_byte"].observe(ttfb)

    def tenant_done(self, tenant: str, outcome: str, ending: Ending, wait: float, slot_seconds: float,
                    tokens: dict[str, int]) -> None:
        """A tenant's finished request: ``requests:OUTCOME``, ``rejected:ENDING`` for the balancer's refusals,
        ``tokens:KIND`` (llama.cpp's own figures), ``slot_seconds`` and ``wait_seconds``."""
        usage = self.tenants.setdefault(tenant, {})
        moves = {f"requests:{outcome}": 1, "wait_seconds": wait, "slot_seconds": slot_seconds}
        if outcome in ("rejected", "refused", "timed_out"):
            moves[f"rejected:{ending}"] = 1
        moves.update({f"tokens:{kind}": count for kind, count in tokens.items() if count})
        for field, amount in moves.items():
            if amount:
                usage[field] = usage.get(field, 0) + amount

    def quarantined(self) -> None:
        self.quarantines += 1

    def retried(self) -> None:
        self.retries += 1

    def model_load(self, model: str) -> None:
        self.model_loads[model] = self.model_loads.get(model, 0) + 1

    def prompt_done(self, addr: str, prompt: int, cached: int) -> None:
        before, hit = self.prompts.get(addr, (0, 0))
        self.prompts[addr] = (before + prompt, hit + cached)

    def fields(self) -> dict[str, float]:
        """Every count as one flat map (what a shared store adds up)."""
        out: dict[str, float] = {f"outcome:{name}": count for name, count in self.outcomes.items()}
        out["quarantines"] = self.quarantines
        out["retries"] = self.retries
        out.update({f"model_load:{model}": count for model, count in self.model_loads.items()})
        for addr, (prompt, cached) in self.prompts.items():
            out[f"prompt:{addr}"], out[f"cached:{addr}"] = prompt, cached
        for name, dist in self.distributions.items():
            out.update({f"{name}:bucket:{i}": count for i, count in enumerate(dist.buckets)})
            out[f"{name}:count"] = dist.count
            out[f"{name}:sum"] = dist.sum
        for tenant, usage in self.tenants.items():
            out.update({f"tenant:{tenant}:{field}": amount for field, amount in usage.items()})
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, float]) -> Counters:
        counters = cls()
        for name in OUTCOMES:
            counters.outcomes[name] = int(fields.get(f"outcome:{name}", 0))
        counters.quarantines = int(fields.get("quarantines", 0))
        counters.retries = int(fields.get("retries", 0))
        counters.model_loads = {key[len("model_load:"):]: int(value) for key, value in fields.items()
                                if key.startswith("model_load:")}
        counters.prompts = {key[len("prompt:"):]: (int(value), int(fields.get("cached:" + key[len("prompt:"):], 0)))
                            for key, value in fields.items() if key.startswith("prompt:")}
        for name, dist in counters.distributions.items():
            dist.buckets = [int(fields.get(f"{name}:bucket:{i}", 0)) for i in range(len(dist.buckets))]
            dist.count = int(fields.get(f"{name}:count", 0))
            dist.sum = float(fields.get(f"{name}:sum", 0.0))
        for key, value in fields.items():
            if key.startswith("tenant:"):
                _, tenant, field = key.split(":", 2)
                counters.tenants.setdefault(tenant, {})[field] = value
        return counters


def increments(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """What was counted since ``before`` (fields that did not move are left out)."""
    return {key: value - before.get(key, 0) for key, value in now.items() if value != before.get(key, 0)}
