"""Many users, one fleet: an interactive chat beside batch jobs, first-come-first-served against the tenant rule.

Two real llama-servers (b4748, the slow random-weight model, ``-np 2`` each: four slots), one run, three phases
side by side, each on a fresh balancer and agents:

- ``alone``: the chat client alone (a streamed 4-token answer every 0.7 s);
- ``fifo``: the chat client, a 12-client batch flood and a 2-client batch user, no tenants (today's one queue);
- ``tenants``: the same clients with ``--tenants``: chat priority 10 with one reserved slot; the two batch users
  priority 0, weight 1.

Measured per phase: the chat's time to first token (p50, p99, from its first event), each batch user's generated
tokens (llama.cpp's ``tokens_predicted``) and the 2-client user's share of them, all tokens per second, failed
requests, how often a request waited inside llama.cpp (its ``requests_deferred``, sampled every 250 ms) and how
many slots each decode step ran (``n_busy_slots_per_decode``).
The two loaded phases run ``reps`` times in turns (fifo, tenants, tenants, fifo...): the machine's speed drifts.
``python -m bench.tenants [SECONDS [REPS]]`` (default 45 s, 2) writes bench/out/tenants.json and prints the table;
``bench/run.py --only tenants`` puts it in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench import harness
from bench.real_llamacpp import ServerSampler, find_build, llama_server, make_models

CHAT_EVERY = 0.7
CHAT_TOKENS = 4
BATCH_TOKENS = 64
KEYS = {"chat": "sk-bench-chat", "flood": "sk-bench-flood", "modest": "sk-bench-modest"}
TENANTS = f"""
[tenants.chat]
keys = ["{KEYS['chat']}"]
priority = 10
reserved_slots = 1

[tenants.flood]
keys = ["{KEYS['flood']}"]

[tenants.modest]
keys = ["{KEYS['modest']}"]
"""
OPTIONS = ("--log-level", "warning", "--max-buffered-requests", "1024", "--buffered-request-timeout", "120")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


class Clients:
    """The chat client and the batch users' closed loops, until ``stop``; what each request came to."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.ttft: list[float] = []
        self.tokens = {"chat": 0, "flood": 0, "modest": 0}
        self.failed: dict[str, int] = {}
        self.lock = threading.Lock()

    def chat(self) -> None:
        session = requests.Session()
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += CHAT_EVERY
            started = time.monotonic()
            first = None
            try:
                with session.post(self.url + "/completion", stream=True, timeout=120,
                                  headers={"Authorization": f"Bearer {KEYS['chat']}"},
                                  json={"prompt": "Say hello.", "n_predict": CHAT_TOKENS, "stream": True}) as answer:
                    for line in answer.iter_lines():
                        if line.startswith(b"data: ") and first is None:
                            first = time.monotonic() - started
                    ok = answer.status_code == 200 and first is not None
            except requests.RequestException:
                ok = False
            with self.lock:
                if ok and first is not None:
                    self.ttft.append(first)
                    self.tokens["chat"] += CHAT_TOKENS
                else:
                    self.failed["chat"] = self.failed.get("chat", 0) + 1
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def batch(self, user: str) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            try:
                answer = session.post(self.url + "/completion", timeout=300,
                                      headers={"Authorization": f"Bearer {KEYS[user]}"},
                                      json={"prompt": "Write a long story about the sea.", "n_predict": BATCH_TOKENS,
                                            "ignore_eos": True})
                generated = answer.json().get("tokens_predicted", 0) if answer.status_code == 200 else None
            except (requests.RequestException, ValueError):
                generated = None
            with self.lock:
                if generated is None:
                    self.failed[user] = self.failed.get(user, 0) + 1
                else:
                    self.tokens[user] += generated


def phase(url: str, servers: list[harness.Service], seconds: float, batch: bool) -> dict[str, Any]:
    clients = Clients(url)
    threads = [threading.Thread(target=clients.chat)]
    if batch:
        threads += [threading.Thread(target=clients.batch, args=("flood",)) for _ in range(12)]
        threads += [threading.Thread(target=clients.batch, args=("modest",)) for _ in range(2)]
    for thread in threads[1:]:
        thread.start()
    time.sleep(3.0 if batch else 0.0)  # the batch users backlogged before the chat is measured
    with clients.lock:
        clients.tokens = dict.fromkeys(clients.tokens, 0)
        clients.failed = {}
    threads[0].start()
    with ServerSampler(servers) as sampler:
        time.sleep(seconds)
    with clients.lock:
        tokens = dict(clients.tokens)
        ttft = list(clients.ttft)
    clients.stop.set()
    for thread in threads:
        thread.join(300)
    batch_tokens = tokens["flood"] + tokens["modest"]
    return {"chat_ttft_p50_ms": pct(ttft, 0.5), "chat_ttft_p99_ms": pct(ttft, 0.99), "chat_requests": len(ttft),
            "tokens": tokens, "modest_share": tokens["modest"] / batch_tokens if batch_tokens else None,
            "tokens_per_s": sum(tokens.values()) / seconds, "failed": sum(clients.failed.values()),
            "failed_by_user": clients.failed, "deferred_share": sampler.deferred_share(),
            "occupancy": sampler.occupancy()}


def tenants_bench(seconds: float = 45.0, reps: int = 2) -> dict[str, Any]:
    """The chat alone once, then FIFO and tenants ``reps`` times each, in turns (the machine's speed drifts: each
    pair ran back to back); the table shows medians, ``runs`` every run."""
    binary = find_build()
    if binary is None:
        return {"skipped": "no llama-server-b4748 (set LLAMA_SERVER_BINARIES or set LLAMACPP_DIR)"}
    model = make_models()["slow"]
    servers = [llama_server(binary, model, f"llama-slow{i}", parallel=2) for i in range(2)]
    results: dict[str, Any] = {"build": binary.name, "seconds": seconds, "reps": reps, "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        tenants = Path(folder) / "tenants.toml"
        tenants.write_text(TENANTS)
        plans = {"alone": ((), False), "fifo": ((), True), "tenants": (("--tenants", str(tenants)), True)}
        order = ["alone"] + [name for rep in range(reps) for name in (("fifo", "tenants") if rep % 2 == 0
                                                                      else ("tenants", "fifo"))]
        try:
            for name in order:
                extra, batch = plans[name]
                balancer = harness.paddler(servers, *OPTIONS, *extra, interval=0.2, name=f"paddler_{name}")
                try:
                    run = phase(balancer.url, servers, seconds, batch)
                finally:
                    harness.stop_paddler(balancer)
                results["runs"].setdefault(name, []).append(run)
                print(f"  {name}: chat TTFT p50 {run['chat_ttft_p50_ms']:.0f} ms p99 {run['chat_ttft_p99_ms']:.0f} ms, "
                      f"{run['tokens_per_s']:.0f} tok/s, modest share {run['modest_share']}, failed {run['failed']}",
                      flush=True)
        finally:
            for server in servers:
                server.stop()
    results["phases"] = {name: medians(runs) for name, runs in results["runs"].items()}
    return results


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs (failures: their sum)."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if key in ("failed", "chat_requests"):
            out[key] = sum(run[key] for run in runs)
        elif isinstance(value, int | float):
            out[key] = statistics.median(run[key] for run in runs)
        elif key == "modest_share":
            shares = [run[key] for run in runs if run[key] is not None]
            out[key] = statistics.median(shares) if shares else None
    return out


def table(results: dict[str, Any]) -> str:
    phases = results["phases"]
    rows = ["| | chat alone | + batch, FIFO (no tenants) | + batch, tenants | tenants / FIFO |",
            "|---|---|---|---|---|"]

    def row(label: str, cell: Any) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(phases[p]) if p in phases else "-"
                                                 for p in ("alone", "fifo", "tenants")) + " |" + ratio(label) + " |")

    def ratio(label: str) -> str:
        fifo, tenants = phases.get("fifo"), phases.get("tenants")
        if fifo is None or tenants is None:
            return " -"
        if label.startswith("chat TTFT"):
            return f" {tenants['chat_ttft_p99_ms'] / fifo['chat_ttft_p99_ms']:.3f} (p99)"
        if label.startswith("generated"):
            return f" {tenants['tokens_per_s'] / fifo['tokens_per_s']:.3f}"
        return " -"

    row("chat TTFT p50 / p99", lambda r: f"{r['chat_ttft_p50_ms']:.0f} / {r['chat_ttft_p99_ms']:.0f} ms")
    row("chat requests answered", lambda r: str(r["chat_requests"]))
    row("2-client user's share of batch tokens",
        lambda r: "-" if r["modest_share"] is None else f"{100 * r['modest_share']:.0f} %")
    row("generated tokens/s (all)", lambda r: f"{r['tokens_per_s']:.1f}")
    row("failed requests", lambda r: str(r["failed"]))
    row("samples with a request waiting inside llama.cpp", lambda r: f"{100 * r['deferred_share']:.1f} %")
    row("slots busy per decode step (of 2 per server)", lambda r: f"{r['occupancy']:.2f}")
    return "\n".join(rows)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 45.0
    results = tenants_bench(seconds, reps=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    harness.OUT.mkdir(parents=True, exist_ok=True)
    (harness.OUT / "tenants.json").write_text(json.dumps(results, indent=2))
    if "phases" in results:
        print(table(results))


if __name__ == "__main__":
    main()
