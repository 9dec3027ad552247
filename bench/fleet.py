"""Fleet efficiency: a heterogeneous simulated fleet under an open-loop Poisson workload.

The fleet: six simulated llama.cpp servers with 1 to 8 slots and 25 to 60 tokens/s per slot, 4,096 tokens
of context per slot (prompt cache on, 0.5 ms per uncached prompt token): 24 slots, about 800 tokens/s in
all. The trace (seeded, so every contender gets the same one): Poisson arrivals; prompts of log-normal
length (median ~100 words), half of them opening with one of four shared 80-word system prompts; outputs of log-normal
length (median ~50 tokens, 8 to 200). A load of 100 % offers the fleet's token capacity.

Misroutes are requests that waited inside a busy llama.cpp: the simulators count them
(``requests_deferred_total``), so the figure is measured, not inferred.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
from typing import Any

import requests

from bench import harness

FLEET = [(1, 60.0), (2, 50.0), (3, 40.0), (4, 35.0), (6, 30.0), (8, 25.0)]
CAPACITY_TOKENS = sum(slots * speed for slots, speed in FLEET)
WORDS = ["river", "light", "model", "token", "slot", "server", "quick", "brown", "fox", "jumps", "over", "lazy",
         "dog", "cloud", "stone", "paper", "glass", "north", "south", "east", "west", "garden", "window", "market",
         "silver", "planet", "signal"]
LOADS = (0.5, 0.8, 0.95, 1.1)
SEED = 20261128


def make_trace(load: float, seconds: float, seed: int = SEED) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(80)) for _ in range(4)]
    mean_tokens = math.exp(math.log(50) + 0.6 ** 2 / 2)
    rate = load * CAPACITY_TOKENS / mean_tokens
    trace, at = [], 0.0
    while True:
        at += rng.expovariate(rate)
        if at > seconds:
            return trace
        words = max(5, min(600, int(rng.lognormvariate(math.log(100), 0.6))))
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + " " + prompt
        n_predict = max(8, min(200, int(rng.lognormvariate(math.log(50), 0.6))))
        trace.append({"at": round(at, 4), "prompt": prompt, "n_predict": n_predict})


def start_fleet() -> list[harness.Service]:
    return [harness.simulator("--parallel", str(slots), "--ctx-size", str(4096 * slots),
                              "--decode-tokens-per-second", str(speed), "--prefill-ms-per-token", "0.5",
                              "--seed", str(i), name=f"fleet{i}")
            for i, (slots, speed) in enumerate(FLEET)]


def start_contender(name: str, fleet: list[harness.Service]) -> harness.Service:
    common = ("--log-level", "warning", "--buffered-request-timeout", "300", "--max-buffered-requests", "10000")
    if name == "paddler_sync":
        return harness.paddler(fleet, *common, interval=1.0, name="fleet-paddler")
    if name == "round_robin":
        return harness.paddler(fleet, *common, "--policy", "round-robin", interval=1.0, name="fleet-rr")
    if name == "least_connections":
        return harness.paddler(fleet, *common, "--policy", "least-connections", interval=1.0, name="fleet-lc")
    if name == "paddler_1x":
        # Paddler 1.x's rule: agents report every 10 s, the balancer counts what it sends in between,
        # and with no idle slot a request fails at once (v1.x has no buffer: 502)
        return harness.paddler(fleet, "--log-level", "warning", "--max-buffered-requests", "0", interval=10.0,
                               name="fleet-paddler1")
    if name == "haproxy":
        return harness.haproxy(fleet, maxconn=[slots for slots, _ in FLEET], name="fleet-haproxy")
    raise ValueError(name)


CONTENDERS = ("paddler_sync", "round_robin", "least_connections", "haproxy", "paddler_1x")


def deferred(fleet: list[harness.Service]) -> int:
    return sum(requests.get(s.url + "/simulator/stats", timeout=5).json()["requests_deferred_total"] for s in fleet)


def run_one(name: str, trace_path: str) -> dict[str, Any]:
    fleet = start_fleet()
    contender = start_contender(name, fleet)
    try:
        before = deferred(fleet)
        out = subprocess.run([harness.PYTHON, str(harness.ROOT / "bench" / "fleet_client.py"),
                              f"127.0.0.1:{contender.port}", trace_path], capture_output=True, text=True, timeout=900)
        results = json.loads(out.stdout)
        misroutes = deferred(fleet) - before
    finally:
        if name == "haproxy":
            contender.stop()
        else:
            harness.stop_paddler(contender)
        for server in fleet:
            server.stop()
    ok = [r for r in results if r["status"] == 200 and r["tokens"]]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    e2e = sorted(r["e2e"] for r in ok)
    span = max((r["done"] for r in ok), default=1) - min((r["sent"] for r in ok), default=0)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")

    return {"requests": len(results), "failed": len(results) - len(ok), "misroutes": misroutes,
            "tokens_per_s": sum(r["tokens"] for r in ok) / span if span > 0 else 0.0,
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99), "e2e_p99_ms": pct(e2e, 0.99)}


def fleet_efficiency(seconds: float, reps: int, loads: tuple[float, ...] = LOADS) -> dict[str, Any]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for load in loads:
        trace = make_trace(load, seconds)
        path = harness.OUT / f"trace-{int(load * 100)}.json"
        harness.OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(trace))
        runs: dict[str, list[dict[str, Any]]] = {}
        for rep in range(reps):
            order = CONTENDERS[rep % len(CONTENDERS):] + CONTENDERS[:rep % len(CONTENDERS)]
            for name in order:
                result = run_one(name, str(path))
                runs.setdefault(name, []).append(result)
                print(f"  fleet load {load:.0%} rep={rep} {name}: {result['tokens_per_s']:.0f} tok/s, TTFT p99 "
                      f"{result['ttft_p99_ms']:.0f} ms, misroutes {result['misroutes']}, failed {result['failed']}",
                      flush=True)
        table[f"{int(load * 100)}"] = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
                                       for name, rs in runs.items()}
    return {"table": table, "capacity_tokens_per_s": CAPACITY_TOKENS, "seconds": seconds, "seed": SEED,
            "fleet": FLEET}
