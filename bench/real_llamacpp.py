"""Throughput on real llama-servers: paddler_sync against slot-blind least-connections and round robin.

Two real llama-servers (b4748 by default: ``LLAMA_SERVER_BINARIES`` or LLAMACPP_DIR/bin), ``-np 4
-t 1 --threads-http 80``, the random-weight models from LLAMACPP_DIR's make_models.py; closed-loop
clients (bench/closed_loop_client.py) send non-streaming ``/completion`` with ``ignore_eos``. Contenders
alternate within each repetition; the tables show medians. While each run lasts, every server's
``/metrics`` is sampled every 250 ms: ``requests_deferred`` (requests waiting inside llama.cpp, which
paddler_sync exists to keep at 0) and, from ``n_decode_total`` and ``n_busy_slots_per_decode``, how many of
the four slots each decode step really used (the occupancy: what a balancer's hand-offs cost).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import threading
import time
from typing import Any

import requests

from bench import harness

SCENARIOS = (  # (model, clients, n_predict)
    ("tiny", 16, 64),
    ("tiny", 64, 64),
    ("slow", 16, 64),
)


def find_build() -> harness.Path | None:
    import os

    listed = os.environ.get("LLAMA_SERVER_BINARIES")
    candidates = [harness.Path(p) for p in listed.split(":")] if listed else \
        sorted((harness.LLAMACPP_DIR / "bin").glob("llama-server-b4748"))
    return next((p for p in candidates if p.exists()), None)


def make_models() -> dict[str, harness.Path]:
    shared = harness.LLAMACPP_DIR
    out = harness.OUT / "models"
    if not (out / "slow.gguf").exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([harness.PYTHON, str(shared / "make_models.py"), str(shared / "ggml-vocab-llama-spm.gguf"),
                        str(out)], check=True, timeout=300)
    return {"tiny": out / "tiny.gguf", "slow": out / "slow.gguf"}


def llama_server(binary: harness.Path, model: harness.Path, name: str, parallel: int = 4) -> harness.Service:
    port = harness.free_port()
    slots = ["--slots"] if binary.name.endswith("b4748") else []
    proc = harness.spawn(name, [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np",
                                str(parallel), "-c", str(1024 * parallel), "-t", "1", "--threads-http", "80",
                                "--metrics", *slots])
    harness.wait_port(port)
    deadline = time.monotonic() + 30
    while requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not load its model")
        time.sleep(0.1)
    return harness.Service(name, [proc], f"http://127.0.0.1:{port}", port)


def read_metrics(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=5).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^llamacpp:(\w+) (\S+)$", text, re.M)}


class ServerSampler:
    """Samples every server's /metrics every 250 ms while a run lasts."""

    def __init__(self, servers: list[harness.Service]) -> None:
        self.servers = servers
        self.deferred: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._first: list[dict[str, float]] = []
        self._last: list[dict[str, float]] = []

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.deferred.append([read_metrics(s.url)["requests_deferred"] for s in self.servers])

    def __enter__(self) -> ServerSampler:
        self._first = [read_metrics(s.url) for s in self.servers]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._last = [read_metrics(s.url) for s in self.servers]

    def occupancy(self) -> float:
        """Mean busy slots per decode step over the run, across the servers."""
        steps = busy = 0.0
        for first, last in zip(self._first, self._last, strict=True):
            steps += last["n_decode_total"] - first["n_decode_total"]
            busy += (last["n_busy_slots_per_decode"] * last["n_decode_total"]
                     - first["n_busy_slots_per_decode"] * first["n_decode_total"])
        return busy / steps if steps else 0.0

    def deferred_share(self) -> float:
        """Share of (server, sample) pairs with a request waiting inside llama.cpp."""
        pairs = [value for sample in self.deferred for value in sample]
        return sum(1 for v in pairs if v > 0) / len(pairs) if pairs else 0.0

    def deferred_max(self) -> float:
        return max((max(sample) for sample in self.deferred), default=0.0)


def closed_loop(service: harness.Service, servers: list[harness.Service], clients: int, seconds: float,
                n_predict: int) -> dict[str, Any]:
    cpu_before = service.cpu_seconds()
    with ServerSampler(servers) as sampler:
        out = subprocess.run([harness.PYTHON, str(harness.ROOT / "bench" / "closed_loop_client.py"),
                              f"127.0.0.1:{service.port}", str(clients), str(seconds), str(n_predict)],
                             capture_output=True, text=True, timeout=seconds + 300)
    result = json.loads(out.stdout)
    latencies = sorted(result["latencies"]) or [float("nan")]
    errors = sum(n for status, n in result["statuses"].items() if status != "200")
    return {"tokens_per_s": result["tokens"] / seconds, "requests": result["requests"], "errors": errors,
            "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "deferred_share": sampler.deferred_share(), "deferred_max": sampler.deferred_max(),
            "occupancy": sampler.occupancy(), "cpu_s_per_s": (service.cpu_seconds() - cpu_before) / seconds}


def real_llamacpp(reps: int, seconds: float) -> dict[str, Any]:
    binary = find_build()
    if binary is None:
        return {"skipped": "no llama-server-b4748 (set LLAMA_SERVER_BINARIES or set LLAMACPP_DIR)"}
    models = make_models()
    results: dict[str, Any] = {"build": binary.name, "seconds": seconds, "reps": reps, "scenarios": {}}
    for model, clients, n_predict in SCENARIOS:
        servers = [llama_server(binary, models[model], f"llama-{model}{i}") for i in range(2)]
        # the buffer sized for the clients, as an operator would (the default 30 would answer 429 to some)
        options = ("--log-level", "warning", "--max-buffered-requests", "1024", "--buffered-request-timeout", "120")
        contenders = {
            "paddler_sync": harness.paddler(servers, *options),
            "paddler_sync_early_5ms": harness.paddler(servers, *options, "--early-dispatch", "5ms",
                                                      name="paddler_sync_early"),
            "least_connections": harness.naive(servers),
            "round_robin": harness.paddler(servers, *options, "--policy", "round-robin", name="round_robin"),
        }
        rows: dict[str, dict[str, list[float]]] = {}
        try:
            for rep in range(reps):
                names = list(contenders)
                names = names[rep % len(names):] + names[:rep % len(names)]
                for name in names:
                    run = closed_loop(contenders[name], servers, clients, seconds, n_predict)
                    for key, value in run.items():
                        rows.setdefault(name, {}).setdefault(key, []).append(value)
                    print(f"  real {model} c={clients} rep={rep} {name}: {run['tokens_per_s']:.0f} tok/s "
                          f"occupancy {run['occupancy']:.2f} deferred>0 {run['deferred_share']:.0%}", flush=True)
        finally:
            for name, service in contenders.items():
                harness.stop_paddler(service) if name != "least_connections" else service.stop()
            for server in servers:
                server.stop()
        key = f"{model} c={clients}"
        results["scenarios"][key] = {name: {k: statistics.median(v) for k, v in cell.items()}
                                     for name, cell in rows.items()}
        results["scenarios"][key]["runs"] = {name: cell["tokens_per_s"] for name, cell in rows.items()}
    return results
