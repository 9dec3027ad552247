"""Multi-turn conversations: how much prompt each routing rule makes llama.cpp recompute, and the first token.

Each conversation has its own long system prompt and re-sends its whole history every turn (llama.cpp's own
answers in it), streamed; conversations run side by side. A turn after the first can skip the prefill of
everything its server's prompt cache still holds, if it lands there. Figures over the later turns: the share
of prompt tokens llama.cpp really computed (its ``timings.prompt_n`` over ``usage.prompt_tokens``), TTFT
p50/p99, and tokens/s over the whole run. Contenders: paddler_sync's default ``first-token`` rule, its
``slots`` rule (most free slots), and the slot-blind ``least-connections`` and ``round-robin``, all through
the same balancer, in turns, on the same servers, restarted for each (empty caches).

On the simulator: 3 servers of 2 slots, 2 ms of prefill per uncached prompt token, 60 tokens/s of decode,
prompt cache on. On real llama-servers (when LLAMACPP_DIR has them): 2 b4748 servers of 4 slots
(-c 4096), the slow random-weight model (prefill ~135-240 tokens/s on these cores).
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Callable
from typing import Any

from bench import harness

POLICIES = ("first-token", "slots", "least-connections", "round-robin")
SIMULATED = {"servers": 3, "slots": 2, "conversations": 6, "turns": 6, "system_words": 400, "max_tokens": 24}
REAL = {"servers": 2, "slots": 4, "conversations": 8, "turns": 4, "system_words": 300, "max_tokens": 16}


def simulated_fleet() -> list[harness.Service]:
    return [harness.simulator("--parallel", str(SIMULATED["slots"]), "--prefill-ms-per-token", "2",
                              "--decode-tokens-per-second", "60", "--seed", str(i), name=f"mt{i}")
            for i in range(SIMULATED["servers"])]


def real_fleet() -> list[harness.Service]:
    from bench.real_llamacpp import find_build, llama_server, make_models

    binary = find_build()
    assert binary is not None
    return [llama_server(binary, make_models()["slow"], name=f"mtreal{i}") for i in range(REAL["servers"])]


def run_one(policy: str, start_fleet: Callable[[], list[harness.Service]], shape: dict[str, Any],
            seed: int) -> dict[str, Any]:
    fleet = start_fleet()
    balancer = harness.paddler(fleet, "--log-level", "warning", "--policy", policy, "--buffered-request-timeout",
                               "600", "--max-buffered-requests", "1000", "--models-discovery-time", "0",
                               interval=0.5, name=f"mt-{policy}")
    try:
        out = subprocess.run([harness.PYTHON, str(harness.ROOT / "bench" / "conversation_client.py"),
                              f"127.0.0.1:{balancer.port}", str(shape["conversations"]), str(shape["turns"]),
                              str(shape["system_words"]), str(shape["max_tokens"]), str(seed)],
                             capture_output=True, text=True, timeout=1800)
        turns = json.loads(out.stdout)
    finally:
        harness.stop_paddler(balancer)
        for server in fleet:
            server.stop()
    return figures(turns)


def figures(turns: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [t for t in turns if t["status"] == 200 and t["prompt_tokens"]]
    later = [t for t in ok if t["turn"] > 0]
    ttft = sorted(t["ttft"] for t in later if t["ttft"] is not None)
    span = sum(t["e2e"] for t in ok) / max(1, len({t["conversation"] for t in ok}))

    def pct(q: float) -> float:
        return ttft[min(len(ttft) - 1, int(q * len(ttft)))] * 1000 if ttft else float("nan")

    return {"turns": len(turns), "failed": len(turns) - len(ok),
            "recomputed": sum(t["prompt_n"] for t in later) / max(1, sum(t["prompt_tokens"] for t in later)),
            "ttft_p50_ms": pct(0.5), "ttft_p99_ms": pct(0.99),
            "tokens_per_s": sum(t["tokens"] for t in ok) / span if span else 0.0}


def multi_turn(reps: int, real: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"simulated": table(simulated_fleet, SIMULATED, reps), "shape": SIMULATED,
                               "real_shape": REAL}
    if real:
        from bench.real_llamacpp import find_build

        if find_build() is not None:
            results["real"] = table(real_fleet, REAL, reps)
        else:
            results["real_skipped"] = "no llama-server-b4748 in LLAMACPP_DIR (or LLAMA_SERVER_BINARIES)"
    return results


def table(start_fleet: Callable[[], list[harness.Service]], shape: dict[str, Any], reps: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(reps):
        order = POLICIES[rep % len(POLICIES):] + POLICIES[:rep % len(POLICIES)]
        for policy in order:
            result = run_one(policy, start_fleet, shape, seed=rep + 1)
            runs.setdefault(policy, []).append(result)
            print(f"  multi-turn rep={rep} {policy}: recomputed {result['recomputed']:.0%}, TTFT p50 "
                  f"{result['ttft_p50_ms']:.0f} ms p99 {result['ttft_p99_ms']:.0f} ms, "
                  f"{result['tokens_per_s']:.1f} tok/s, failed {result['failed']}", flush=True)
    return {policy: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for policy, rs in runs.items()}


