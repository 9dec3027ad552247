"""``make bench`` (or ``make bench-quick``): every benchmark, side by side, into bench/RESULTS.md.

Sections: (1) proxy overhead, non-streaming and streaming, against direct, a naive requests proxy,
HAProxy and nginx; (2) the buffer at scale; (3) fleet efficiency against round robin,
least-connections, HAProxy leastconn+maxconn and Paddler 1.x's rule; (3b) two models, per-model queues
against one shared queue; (3c) multi-turn conversations, prompt-cache affinity against the plain rules; (4) the
Redis ledger; (5) closed-loop throughput on real llama-servers against
least-connections and round robin; (6) rolling model swaps under streaming load (the supervisor); (7) many users,
one fleet: a chat beside batch jobs, first-come-first-served against the tenant rule (real llama-servers); (8)
faults on real llama-servers, Redis behind Sentinel: what each costs the requests that keep coming.
Contenders alternate within each repetition and the tables show medians, because this 2-core machine is
shared and noisy.
Benchmarks report; tests never assert these timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.buffer_scale import buffer_at_scale
from bench.faults import faults_bench
from bench.fleet import fleet_efficiency
from bench.models import model_isolation
from bench.multiturn import multi_turn
from bench.real_llamacpp import real_llamacpp
from bench.report import write_report
from bench.shared import shared_ledger
from bench.swap import model_swaps
from bench.tenants import tenants_bench

WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{"prompt":"hi","n_predict":1}'
wrk.headers["Content-Type"] = "application/json"
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(url: str, connections: int, seconds: float) -> dict[str, float]:
    script = harness.OUT / "post.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
                          url + "/completion"], capture_output=True, text=True, timeout=seconds + 60).stdout
    latency = {m.group(1): float(m.group(2)) * UNITS[m.group(3)]
               for m in re.finditer(r"^\s+(50|99)\.000%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    if not latency:  # older wrk prints "50%" instead of "50.000%"
        latency = {m.group(1): float(m.group(2)) * UNITS[m.group(3)]
                   for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    requests_total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": latency.get("50", 0.0),
            "p99_ms": latency.get("99", 0.0), "requests": requests_total}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def contenders(upstreams: list[harness.Service], paddler_args: tuple[str, ...] = ()) -> dict[str, harness.Service]:
    return {
        "direct": upstreams[0],
        # as an operator would run it in front of servers with many slots: access log on, and as many
        # idle upstream connections kept as a server has slots to spare
        "paddler_sync": harness.paddler(upstreams, "--log-level", "info", "--max-client-connections", "20000",
                                        "--upstream-pool-size", "64", *paddler_args),
        "naive": harness.naive(upstreams),
        "haproxy": harness.haproxy(upstreams),
        "nginx": harness.nginx(upstreams),
    }


def stop_all(services: dict[str, harness.Service], upstreams: list[harness.Service]) -> None:
    for name, service in services.items():
        if name == "direct":
            continue
        if name.startswith("paddler"):
            harness.stop_paddler(service)
        else:
            service.stop()
    for upstream in upstreams:
        upstream.stop()


def overhead_nonstream(reps: int, seconds: float) -> dict[str, Any]:
    upstreams = [harness.simulator("--parallel", "128", "--decode-tokens-per-second", "0",
                                   "--prefill-ms-per-token", "0", name=f"sim{i}") for i in range(2)]
    services = contenders(upstreams)
    rows: dict[str, dict[int, dict[str, list[float]]]] = {}
    try:
        for conc in (1, 16, 64):
            for rep in range(reps):
                names = list(services)
                names = names[rep % len(names):] + names[:rep % len(names)]
                for name in names:
                    service = services[name]
                    cpu_before = service.cpu_seconds()
                    result = wrk(service.url, conc, seconds)
                    cpu = service.cpu_seconds() - cpu_before
                    cell = rows.setdefault(name, {}).setdefault(conc, {})
                    for key, value in result.items():
                        cell.setdefault(key, []).append(value)
                    cell.setdefault("cpu_us_per_req", []).append(1e6 * cpu / max(1, result["requests"]))
                    cell.setdefault("rss_mb", []).append(service.rss() / 1e6)
                    print(f"  non-stream c={conc} rep={rep} {name}: {result['rps']:.0f} req/s "
                          f"p50 {result['p50_ms']:.3f} ms", flush=True)
    finally:
        stop_all(services, upstreams)
    return {name: {str(conc): {k: median(v) for k, v in cell.items()} for conc, cell in by_conc.items()}
            for name, by_conc in rows.items()}


def stream_run(service: harness.Service, streams: int, events: int) -> dict[str, Any]:
    cpu_before = service.cpu_seconds()
    with harness.PeakRss(service) as peak:
        out = subprocess.run([harness.PYTHON, str(harness.ROOT / "bench" / "stream_client.py"),
                              f"127.0.0.1:{service.port}", str(streams), str(events)],
                             capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout)
    cpu = service.cpu_seconds() - cpu_before
    result["cpu_us_per_event"] = 1e6 * cpu / max(1, result["events"])
    result["cpu_s"] = cpu
    result["peak_rss_mb"] = peak.peak / 1e6
    result["peak_worker_rss_mb"] = peak.peak_largest / 1e6
    return result


def overhead_stream(reps: int, sweep: tuple[int, ...]) -> dict[str, Any]:
    upstreams = [harness.simulator("--parallel", "1024", "--ctx-size", "1048576", "--decode-tokens-per-second", "200",
                                   "--stamp-events",
                                   "--prefill-ms-per-token", "0", name=f"ssim{i}") for i in range(2)]
    services = contenders(upstreams)
    rows: dict[str, dict[str, list[float]]] = {}
    swept: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for rep in range(reps):
            names = list(services)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                result = stream_run(services[name], 100, 200)
                for key, value in result.items():
                    if isinstance(value, int | float):
                        rows.setdefault(name, {}).setdefault(key, []).append(value)
                print(f"  stream 100x200 rep={rep} {name}: p99 {result['delay_p99_ms']:.2f} ms, "
                      f"{result['cpu_us_per_event']:.1f} us/event", flush=True)
        for streams in sweep:
            for name in ("paddler_sync", "naive", "nginx"):
                result = stream_run(services[name], streams, 200)
                swept.setdefault(name, {})[str(streams)] = result
                print(f"  sweep {streams} streams {name}: {result['events_per_s']:.0f} ev/s "
                      f"p99 {result['delay_p99_ms']:.1f} ms complete {result['complete']}", flush=True)
    finally:
        stop_all(services, upstreams)
    return {"table": {name: {k: median(v) for k, v in cell.items()} for name, cell in rows.items()},
            "sweep": swept}


def machine() -> dict[str, str]:
    import psutil

    return {"python": platform.python_version(), "cpus": str(psutil.cpu_count()),
            "memory_gb": f"{psutil.virtual_memory().total / 2**30:.0f}", "kernel": platform.release(),
            "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                               if line.startswith("model name")), "unknown")}


SECTIONS = ("overhead", "stream", "buffer", "fleet", "models", "multiturn", "shared", "real", "swaps", "tenants",
            "faults")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, shorter runs (a few minutes)")
    parser.add_argument("--only", choices=SECTIONS, action="append")
    args = parser.parse_args()
    sections = set(args.only or SECTIONS)
    started = time.time()
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick,
                               "command": "make bench-quick" if args.quick else "make bench",
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    previous = harness.ROOT / "bench" / "results.json"
    if args.only and previous.exists():  # the other sections keep their figures and the date they were measured
        results = {**results, **json.loads(previous.read_text())}
    def save() -> None:  # after every section, so a failure later loses nothing
        results["elapsed_s"] = time.time() - started
        previous.write_text(json.dumps(results, indent=1, default=str))
        write_report(results, harness.ROOT / "bench")

    if "overhead" in sections:
        print("proxy overhead, non-streaming", flush=True)
        results["nonstream"] = overhead_nonstream(reps=2 if args.quick else 3, seconds=3 if args.quick else 6)
        save()
    if "stream" in sections:
        print("proxy overhead, streaming", flush=True)
        results["stream"] = overhead_stream(reps=2 if args.quick else 3,
                                            sweep=(100, 300, 600) if args.quick else (100, 200, 400, 600, 800))
        save()
    if "buffer" in sections:
        print("buffer at scale", flush=True)
        results["buffer"] = buffer_at_scale(2000 if args.quick else 10_000)
        save()
    if "fleet" in sections:
        print("fleet efficiency", flush=True)
        results["fleet"] = fleet_efficiency(seconds=12 if args.quick else 30, reps=1,
                                            loads=(0.8, 1.1) if args.quick else (0.5, 0.8, 0.95, 1.1))
        save()
    if "models" in sections:
        print("two models: head-of-line isolation", flush=True)
        results["models"] = model_isolation(seconds=10 if args.quick else 20, reps=1 if args.quick else 2)
        save()
    if "multiturn" in sections:
        print("multi-turn conversations: prompt-cache affinity", flush=True)
        results["multiturn"] = multi_turn(reps=1 if args.quick else 2, real=True)
        save()
    if "shared" in sections:
        print("shared ledger in Redis", flush=True)
        results["shared"] = shared_ledger(wrk, reps=2 if args.quick else 3, seconds=3 if args.quick else 6)
        save()
    if "real" in sections:
        print("real llama-servers: throughput against least-connections and round robin", flush=True)
        results["real"] = real_llamacpp(reps=2 if args.quick else 3, seconds=8 if args.quick else 15)
        save()
    if "swaps" in sections:
        print("model swaps under streaming load", flush=True)
        results["swaps"] = model_swaps()
        save()
    if "tenants" in sections:
        print("many users, one fleet: FIFO against the tenant rule on real llama-servers", flush=True)
        results["tenants"] = tenants_bench(seconds=20 if args.quick else 45, reps=1 if args.quick else 2)
        results["tenants"]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        save()
    if "faults" in sections:
        print("faults on real llama-servers", flush=True)
        results["faults"] = faults_bench(seconds=120 if args.quick else 600)
        results["faults"]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        save()
    print(f"wrote bench/RESULTS.md in {results['elapsed_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
