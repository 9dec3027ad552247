"""paddler_sync at two revisions, side by side in one run: does a refactor cost anything?

    python bench/revisions.py BEFORE_REV [--seconds 6] [--reps 3]

Checks BEFORE_REV out into a scratch folder and measures it and this checkout in turns (A B B A ...),
on the same simulators: the proxy overhead (non-streaming, wrk at 1, 16 and 64 connections) on the
in-process store, and on the Redis store with one worker (``--no-redis``: not), plus, with ``--stream``, the
streaming relay (100 streams x 200 events, as bench/run.py's section 1b). Prints markdown tables of medians and
the after/before ratios, and writes them to bench/REVISIONS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench import real_llamacpp as real
from bench.run import stream_run, wrk
from bench.shared import redis_server

CONNECTIONS = (1, 16, 64)


def checkout(rev: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="paddler-rev-"))
    archive = subprocess.run(["git", "-C", str(harness.ROOT), "archive", rev, "paddler_sync"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def start(source: Path, upstreams: list[harness.Service], *args: str, name: str) -> harness.Service:
    harness.SOURCE["path"] = source
    try:
        return harness.paddler(upstreams, "--log-level", "info", "--max-client-connections", "20000",
                               "--upstream-pool-size", "64", *args, name=name)
    finally:
        harness.SOURCE["path"] = harness.ROOT


def measure(services: dict[str, harness.Service], reps: int, seconds: int) -> dict[str, dict[str, list[float]]]:
    rows: dict[str, dict[str, list[float]]] = {}
    for conc in CONNECTIONS:
        for rep in range(reps):
            order = list(services) if rep % 2 == 0 else list(reversed(services))
            for name in order:
                service = services[name]
                cpu_before = service.cpu_seconds()
                result = wrk(service.url, conc, seconds)
                cpu = service.cpu_seconds() - cpu_before
                cell = rows.setdefault(f"{name} c={conc}", {})
                for key in ("rps", "p50_ms", "p99_ms"):
                    cell.setdefault(key, []).append(result[key])
                cell.setdefault("cpu_us_per_req", []).append(1e6 * cpu / max(1, result["requests"]))
                print(f"  {name} c={conc} rep={rep}: {result['rps']:.0f} req/s p50 {result['p50_ms']:.3f} ms",
                      flush=True)
    return rows


STREAM_KEYS = ("events_per_s", "delay_p50_ms", "delay_p99_ms", "cpu_us_per_event", "complete", "peak_worker_rss_mb",
               "ttfb_p50_ms")
REAL_KEYS = ("tokens_per_s", "p50_ms", "p99_ms", "errors", "cpu_s_per_s")
Rows = dict[str, dict[str, list[float]]]


def in_turns(before: Path, upstreams: list[harness.Service], args: tuple[str, ...], reps: int, suffix: str,
             run: Callable[[harness.Service], dict[str, Any]], keys: tuple[str, ...], rows: Rows) -> None:
    """Both revisions on the same servers, measured in turns (A B B A ...); their processes stopped after."""
    services = {label: start(source, upstreams, *args, name=f"{label}-{(suffix or 'stream').split()[0]}")
                for label, source in (("before", before), ("after", harness.ROOT))}
    try:
        for rep in range(reps):
            for label in (services if rep % 2 == 0 else list(reversed(services))):
                result = run(services[label])
                cell = rows.setdefault(f"{label} {suffix}".strip(), {})
                for key in keys:
                    cell.setdefault(key, []).append(float(result[key]))
                print(f"  {label} {suffix} rep={rep}: " + ", ".join(f"{k} {result[k]:.1f}" for k in keys[:4]),
                      flush=True)
    finally:
        for service in services.values():
            harness.stop_paddler(service)
        for upstream in upstreams:
            upstream.stop()


def measure_streams(before: Path, reps: int) -> Rows:
    upstreams = [harness.simulator("--parallel", "1024", "--ctx-size", "1048576", "--decode-tokens-per-second", "200",
                                   "--stamp-events", "--prefill-ms-per-token", "0", name=f"ssim{i}") for i in range(2)]
    rows: Rows = {}
    in_turns(before, upstreams, (), reps, "", lambda service: stream_run(service, 100, 200), STREAM_KEYS, rows)
    return rows


def measure_real(before: Path, reps: int, seconds: int) -> Rows:
    """Closed-loop throughput on two real llama-servers (bench/real_llamacpp.py's scenarios), before and after."""
    binary = real.find_build()
    if binary is None:
        print("  real llama-servers: skipped (no llama-server-b4748)", flush=True)
        return {}
    models = real.make_models()
    rows: Rows = {}
    options = ("--log-level", "warning", "--max-buffered-requests", "1024", "--buffered-request-timeout", "120")
    for model, clients, n_predict in real.SCENARIOS:
        servers = [real.llama_server(binary, models[model], f"llama-{model}{i}") for i in range(2)]
        in_turns(before, servers, options, reps, f"{model} c={clients}",
                 lambda service, s=servers, c=clients, n=n_predict: real.closed_loop(service, s, c, seconds, n),
                 REAL_KEYS, rows)
    return rows


def real_table(rows: dict[str, dict[str, list[float]]], reps: int, seconds: int) -> str:
    if not rows:
        return ""
    medians = {name: {k: statistics.median(v) for k, v in cell.items()} for name, cell in rows.items()}
    lines = [f"Closed loop on two real llama-servers (b4748; bench/real_llamacpp.py's scenarios), {seconds} s runs, "
             f"medians of {reps}:", "",
             "| revision, scenario | tokens/s | p50 ms | p99 ms | errors | balancer CPU s/s | tokens/s after/before |",
             "|---|---|---|---|---|---|---|"]
    for name, c in medians.items():
        before = medians.get(name.replace("after", "before", 1)) if name.startswith("after") else None
        ratio = f"{c['tokens_per_s'] / before['tokens_per_s']:.3f}" if before else ""
        lines.append(f"| {name} | {c['tokens_per_s']:.0f} | {c['p50_ms']:.0f} | {c['p99_ms']:.0f} | "
                     f"{c['errors']:.0f} | {c['cpu_s_per_s']:.3f} | {ratio} |")
    return "\n".join(lines)


def stream_table(rows: dict[str, dict[str, list[float]]], reps: int) -> str:
    medians = {name: {k: statistics.median(v) for k, v in cell.items()} for name, cell in rows.items()}
    lines = [f"Streaming, 100 streams x 200 events at 5 ms, medians of {reps}:", "",
             "| revision | events/s | delay p50 ms | delay p99 ms | CPU µs/event | complete | worker peak RSS MB | "
             "TTFB p50 ms |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {c['events_per_s']:.0f} | {c['delay_p50_ms']:.2f} | {c['delay_p99_ms']:.2f} | "
              f"{c['cpu_us_per_event']:.1f} | {c['complete']:.0f} | {c['peak_worker_rss_mb']:.1f} | "
              f"{c['ttfb_p50_ms']:.1f} |"
              for name, c in medians.items()]
    return "\n".join(lines)


def table(rows: dict[str, dict[str, list[float]]]) -> str:
    medians = {name: {k: statistics.median(v) for k, v in cell.items()} for name, cell in rows.items()}
    lines = ["| contender | req/s | p50 ms | p99 ms | CPU µs/req | req/s after/before |", "|---|---|---|---|---|---|"]
    for name, cell in medians.items():
        ratio = ""
        if name.startswith("after"):
            before = medians.get(name.replace("after", "before", 1))
            ratio = f"{cell['rps'] / before['rps']:.3f}" if before else ""
        lines.append(f"| {name} | {cell['rps']:.0f} | {cell['p50_ms']:.3f} | {cell['p99_ms']:.3f} | "
                     f"{cell['cpu_us_per_req']:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("--seconds", type=int, default=6)  # wrk takes whole seconds
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-redis", action="store_true", help="the in-process store only")
    parser.add_argument("--stream", action="store_true", help="the streaming relay too")
    parser.add_argument("--real", action="store_true", help="closed-loop throughput on real llama-servers too")
    args = parser.parse_args()
    before = checkout(args.before)
    upstreams = [harness.simulator("--parallel", "128", "--decode-tokens-per-second", "0",
                                   "--prefill-ms-per-token", "0", name=f"sim{i}") for i in range(2)]
    redis_proc, url = redis_server()
    results: dict[str, Any] = {}
    try:
        stores = (("local", ()), ("redis -w1", ("--state-backend", url)))
        for store, extra in stores[:1] if args.no_redis else stores:
            services = {}
            for label, source in (("before", before), ("after", harness.ROOT)):
                prefix = ("--state-prefix", f"r{uuid.uuid4().hex[:8]}") if extra else ()
                services[f"{label} {store}"] = start(source, upstreams, *extra, *prefix, name=f"{label}-{store[:5]}")
            try:
                results.update(measure(services, args.reps, args.seconds))
            finally:
                for service in services.values():
                    harness.stop_paddler(service)
    finally:
        for upstream in upstreams:
            upstream.stop()
        redis_proc.terminate()
    streams = stream_table(measure_streams(before, args.reps), args.reps) if args.stream else ""
    real_seconds = args.seconds * 2
    reals = real_table(measure_real(before, args.reps, real_seconds), args.reps, real_seconds) if args.real else ""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = (f"# paddler_sync at two revisions\n\n`python bench/revisions.py {' '.join(sys.argv[1:])}`, {when}: "
              f"revision {args.before} "
              f"(before) and this checkout (after, {head()}), in turns on the same simulators; medians of "
              f"{args.reps} runs of {args.seconds} s (wrk, non-streaming, 1 token). CPU is the balancer's "
              f"processes'.\n\n{table(results)}\n\n{streams}\n\n{reals}\n")
    (harness.ROOT / "bench" / "REVISIONS.md").write_text(report)
    print(report)


def head() -> str:
    return subprocess.run(["git", "-C", str(harness.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


if __name__ == "__main__":
    main()
