"""Two models, one balancer: a saturated model must not delay a light one (head-of-line isolation).

The fleet: model ``heavy`` on two simulated servers of 2 slots at 20 tokens/s each (80 tokens/s in all),
model ``light`` on one server of 2 slots at 400 tokens/s. The trace (seeded, the same for every
contender): Poisson arrivals over ``seconds``; ``heavy`` offered 150 % of its capacity (40-token answers),
``light`` about 10 % of its own (20-token answers). Contenders: paddler_sync with one queue per model,
and the same balancer with ``--no-per-model-queues`` (one queue for all: the light model's requests wait
behind the heavy model's backlog). Misrouted requests are measured, not inferred: the number each
simulator served against the number sent for its model.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
from typing import Any

import requests

from bench import harness

SEED = 20261129
HEAVY = {"servers": 2, "slots": 2, "speed": 20.0, "tokens": 40, "load": 1.5}
LIGHT = {"servers": 1, "slots": 2, "speed": 400.0, "tokens": 20, "load": 0.1}
CONTENDERS = {"per_model_queues": (), "one_shared_queue": ("--no-per-model-queues",)}


def rate(model: dict[str, Any]) -> float:
    """Requests per second that offer ``load`` of the model's token capacity."""
    return model["load"] * model["servers"] * model["slots"] * model["speed"] / model["tokens"]


def make_trace(seconds: float, seed: int = SEED) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    trace = []
    for name, model in (("heavy", HEAVY), ("light", LIGHT)):
        at = 0.0
        while (at := at + rng.expovariate(rate(model))) < seconds:
            trace.append({"at": round(at, 4), "model": name, "prompt": "tell me about rivers",
                          "n_predict": model["tokens"]})
    return sorted(trace, key=lambda item: item["at"])


def start_fleet() -> dict[str, list[harness.Service]]:
    return {name: [harness.simulator("--parallel", str(model["slots"]), "--decode-tokens-per-second",
                                     str(model["speed"]), "--alias", name, "--seed", str(i), name=f"{name}{i}")
                   for i in range(model["servers"])]
            for name, model in (("heavy", HEAVY), ("light", LIGHT))}


def served(servers: list[harness.Service]) -> int:
    return sum(requests.get(s.url + "/simulator/stats", timeout=5).json()["requests_total"] for s in servers)


def run_one(flags: tuple[str, ...], trace: list[dict[str, Any]], trace_path: str) -> dict[str, Any]:
    fleet = start_fleet()
    balancer = harness.paddler([*fleet["heavy"], *fleet["light"]], "--log-level", "warning",
                               "--buffered-request-timeout", "300", "--max-buffered-requests", "10000",
                               "--models-discovery-time", "0", *flags, interval=0.5, name="models-paddler")
    try:
        out = subprocess.run([harness.PYTHON, str(harness.ROOT / "bench" / "fleet_client.py"),
                              f"127.0.0.1:{balancer.port}", trace_path], capture_output=True, text=True,
                             timeout=900)
        results = json.loads(out.stdout)
        counts = {name: served(servers) for name, servers in fleet.items()}
    finally:
        harness.stop_paddler(balancer)
        for servers in fleet.values():
            for server in servers:
                server.stop()
    sent = {name: sum(1 for item in trace if item["model"] == name) for name in fleet}
    return {**{f"{name}_{key}": value for name in fleet for key, value in figures(results, trace, name).items()},
            "misrouted": sum(abs(counts[name] - sent[name]) for name in fleet)}


def figures(results: list[dict[str, Any]], trace: list[dict[str, Any]], model: str) -> dict[str, float]:
    mine = [r for r, item in zip(results, trace, strict=True) if item["model"] == model]
    ok = [r for r in mine if r["status"] == 200 and r["tokens"]]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(q: float) -> float:
        return ttft[min(len(ttft) - 1, int(q * len(ttft)))] * 1000 if ttft else float("nan")

    return {"requests": len(mine), "failed": len(mine) - len(ok), "ttft_p50_ms": pct(0.5), "ttft_p99_ms": pct(0.99)}


def model_isolation(seconds: float, reps: int) -> dict[str, Any]:
    trace = make_trace(seconds)
    harness.OUT.mkdir(parents=True, exist_ok=True)
    path = harness.OUT / "trace-models.json"
    path.write_text(json.dumps(trace))
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(reps):
        for name, flags in (list(CONTENDERS.items()) if rep % 2 == 0 else list(CONTENDERS.items())[::-1]):
            result = run_one(flags, trace, str(path))
            runs.setdefault(name, []).append(result)
            print(f"  models rep={rep} {name}: light TTFT p99 {result['light_ttft_p99_ms']:.0f} ms, heavy TTFT p99 "
                  f"{result['heavy_ttft_p99_ms']:.0f} ms, misrouted {result['misrouted']}", flush=True)
    table = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    return {"table": table, "seconds": seconds, "reps": reps, "heavy": HEAVY, "light": LIGHT, "seed": SEED}
