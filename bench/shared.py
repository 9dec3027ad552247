"""Section 4: the ledger shared in Redis. Throughput and latency of -w 2 against -w 1, and what Redis costs.

Contenders, alternating within each repetition: ``local -w1`` (the in-process ledger, the default),
``redis -w1`` (one worker, ledger in Redis: the round trips' cost) and ``redis -w2`` (two workers on
this 2-core machine). Each serves wrk's small non-streaming requests to two zero-delay simulators.
The Redis round trip of one request (take + release, two Lua scripts) is also timed alone.
"""

from __future__ import annotations

import statistics
import subprocess
import time
import uuid
from typing import Any

import psutil

from bench import harness


def redis_server() -> tuple[subprocess.Popen, str]:
    port = harness.free_port()
    proc = harness.spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"])
    harness.wait_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def round_trip_us(url: str, n: int = 2000) -> dict[str, float]:
    """One request's Redis work, alone: take a slot and give it back (two scripts, two round trips)."""
    from paddler_sync.ledger.ledger import Ledger
    from paddler_sync.ledger.stores.redis.store import RedisStore

    ledger = Ledger(store=RedisStore(url, f"rt{uuid.uuid4().hex[:8]}", lease_ttl=15))
    ledger.report("a", "127.0.0.1:1", 4, 0, True)
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        reservation = ledger.reserve()
        ledger.give_back(reservation)
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return {"p50_us": statistics.median(samples), "p99_us": samples[int(0.99 * len(samples))]}


def shared_ledger(wrk: Any, reps: int, seconds: float) -> dict[str, Any]:
    proc, url = redis_server()
    upstreams = [harness.simulator("--parallel", "128", "--decode-tokens-per-second", "0",
                                   "--prefill-ms-per-token", "0", name=f"sim{i}") for i in range(2)]
    pool = ("--upstream-pool-size", "64")
    services = {
        "local -w1": harness.paddler(upstreams, *pool, name="local-w1"),
        "redis -w1": harness.paddler(upstreams, *pool, "--state-backend", url, "--state-prefix", "w1",
                                     name="redis-w1"),
        "redis -w2": harness.paddler(upstreams, *pool, "--state-backend", url, "--state-prefix", "w2",
                                     "--workers", "2", name="redis-w2"),
    }
    redis_process = psutil.Process(proc.pid)
    rows: dict[str, dict[int, dict[str, list[float]]]] = {}
    try:
        for conc in (16, 64):
            for rep in range(reps):
                names = list(services)
                names = names[rep % len(names):] + names[:rep % len(names)]
                for name in names:
                    service = services[name]
                    cpu_before, redis_before = service.cpu_seconds(), sum(redis_process.cpu_times()[:2])
                    result = wrk(service.url, conc, seconds)
                    requests_done = max(1, result["requests"])
                    cell = rows.setdefault(name, {}).setdefault(conc, {})
                    for key, value in result.items():
                        cell.setdefault(key, []).append(value)
                    cell.setdefault("cpu_us_per_req", []).append(1e6 * (service.cpu_seconds() - cpu_before)
                                                                 / requests_done)
                    cell.setdefault("redis_cpu_us_per_req", []).append(
                        1e6 * (sum(redis_process.cpu_times()[:2]) - redis_before) / requests_done)
                    print(f"  shared c={conc} rep={rep} {name}: {result['rps']:.0f} req/s "
                          f"p50 {result['p50_ms']:.3f} ms", flush=True)
        alone = round_trip_us(url)
    finally:
        for service in services.values():
            harness.stop_paddler(service)
        for upstream in upstreams:
            upstream.stop()
        proc.terminate()
        proc.wait(10)
    table = {name: {str(conc): {k: statistics.median(v) for k, v in cell.items()} for conc, cell in by_conc.items()}
             for name, by_conc in rows.items()}
    return {"table": table, "round_trip": alone}
