"""Model swaps under streaming load: what a rolling swap costs the requests that keep coming.

Two servers, each run by its agent (``paddler-sync agent --supervise -- ...``), behind one balancer; a
closed loop of streaming clients keeps them busy (never more at once than one server's slots, so one
server can carry the load while the other swaps). After a baseline period the fleet's desired state
switches the model (tiny -> slow, then back), ``--max-unavailable 1``. Measured in the same run, side by
side: time to first token before the swaps (the baseline) and during them, the longest extra wait any
request saw, failed requests, requests deferred inside llama.cpp (its ``requests_deferred``, sampled every
0.1 s on both servers), how long each swap took, and, after the load, how long a server killed with
SIGKILL takes to be serving again. On the simulator (models are empty files; ``--startup-time 2`` stands
for loading) and on each real llama-server build found in LLAMACPP_DIR (the random-weight models).
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench import harness
from bench.real_llamacpp import make_models, read_metrics

CLIENTS = 2
SLOTS = 2
BASELINE_SECONDS = 10.0
SETTLE_SECONDS = 5.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


class Load:
    """Closed-loop streaming clients; each request's start, first event and outcome."""

    def __init__(self, url: str, clients: int, n_predict: int) -> None:
        self.url, self.n_predict = url, n_predict
        self.results: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)

    def _client(self) -> None:
        while not self.stop.is_set():
            started, first, ok = time.time(), None, False
            try:
                with requests.post(self.url + "/completion", stream=True, timeout=120,
                                   json={"prompt": "tell me about rivers", "n_predict": self.n_predict,
                                         "stream": True}) as response:
                    for chunk in response.iter_content(None):
                        first = first or time.time()
                        ok = ok or b'"stop":true' in chunk.replace(b" ", b"")
                    ok = ok and response.status_code == 200
            except requests.RequestException:
                ok = False
            self.results.append({"start": started, "ttft": (first or time.time()) - started, "ok": ok})


class DeferredWatch:
    """llama.cpp's own count of requests waiting inside it, on every server, every 0.1 s."""

    def __init__(self, urls: list[str]) -> None:
        self.urls, self.samples, self.stop = urls, [], threading.Event()
        self.thread = threading.Thread(target=self._watch)

    def __enter__(self) -> DeferredWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _watch(self) -> None:
        while not self.stop.is_set():
            for url in self.urls:
                try:
                    found = read_metrics(url).get("requests_deferred")
                except requests.RequestException:
                    continue  # restarting
                if found is not None:
                    self.samples.append(found)
            self.stop.wait(0.1)


def supervised_fleet(commands: list[list[str]], tag: str) -> tuple[harness.Service, list[Any]]:
    balancer = harness.paddler([], "--log-level", "info", "--buffered-request-timeout", "120",
                               "--max-unavailable", "1", name="swap-paddler")
    agents = [harness.spawn(f"swap-{tag}-agent{i}", [harness.PYTHON, "-m", "paddler_sync", "agent", "--management-addr",
                                               balancer.management.removeprefix("http://"), "--monitoring-interval",
                                               "0.2", "--name", f"s{i}", "--supervise", "--", *command])
              for i, command in enumerate(commands)]
    balancer.extra_procs = agents  # type: ignore[attr-defined]
    wait(lambda: len([a for a in fleet_agents(balancer) if a["state"] == "ready"]) == len(commands), 120)
    return balancer, agents


def fleet_agents(balancer: harness.Service) -> list[dict[str, Any]]:
    return requests.get(balancer.management + "/api/v1/agents", timeout=5).json()["agents"]


def wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s")


def swap_to(balancer: harness.Service, model: str) -> float:
    """PUT the fleet's desired state; seconds until both servers applied it."""
    started = time.time()
    requests.put(balancer.management + "/api/v1/desired_state", json={"model": model}, timeout=5).raise_for_status()
    wait(lambda: requests.get(balancer.management + "/api/v1/desired_state", timeout=5).json()["counts"]
         .get("applied") == 2, 300)
    return time.time() - started


def recovery_after_kill(balancer: harness.Service) -> float:
    """SIGKILL one server; seconds until its agent reports it serving again (the supervisor's own figure)."""
    victim = fleet_agents(balancer)[0]
    os.kill(victim["supervisor"]["pid"], signal.SIGKILL)

    def back() -> bool:
        now = next(a for a in fleet_agents(balancer) if a["agent_id"] == victim["agent_id"])
        return now["state"] == "ready" and now["supervisor"]["pid"] != victim["supervisor"]["pid"]

    wait(back, 120)
    now = next(a for a in fleet_agents(balancer) if a["agent_id"] == victim["agent_id"])
    return float(now["supervisor"]["recovered_in"])


def run(commands: list[list[str]], models: tuple[str, str], n_predict: int, tag: str) -> dict[str, Any]:
    for old in harness.OUT.glob(f"swap-{tag}-agent*.log"):
        old.unlink()  # the logs are appended to: each server's swap times come from this run's
    balancer, _ = supervised_fleet(commands, tag)
    urls = ["http://" + a["external_llamacpp_addr"] for a in fleet_agents(balancer)]
    try:
        with DeferredWatch(urls) as deferred, Load(balancer.url, CLIENTS, n_predict) as load:
            time.sleep(BASELINE_SECONDS)
            swaps_started = time.time()
            swaps = [swap_to(balancer, model) for model in models]
            swaps_ended = time.time()
            time.sleep(SETTLE_SECONDS)
        recovered = recovery_after_kill(balancer)
        applied = [float(x) for x in re.findall(r"applied in ([0-9.]+)s",
                                                "".join((harness.OUT / f"swap-{tag}-agent{i}.log").read_text()
                                                        for i in range(len(commands))))]
    finally:
        harness.stop_paddler(balancer)
    base = [r["ttft"] for r in load.results if r["start"] < swaps_started and r["ok"]]
    during = [r["ttft"] for r in load.results if swaps_started <= r["start"] < swaps_ended and r["ok"]]
    return {"requests": len(load.results), "failed": sum(not r["ok"] for r in load.results),
            "during_swaps": len(during), "base_p50_ms": pct(base, 0.5), "base_p99_ms": pct(base, 0.99),
            "swap_p50_ms": pct(during, 0.5), "swap_p99_ms": pct(during, 0.99),
            "longest_extra_wait_ms": (max(during, default=0.0) * 1000) - pct(base, 0.5),
            "swap_seconds": swaps, "server_apply_seconds": applied, "deferred_max": max(deferred.samples, default=0),
            "deferred_samples": len(deferred.samples), "recovery_after_kill_s": recovered}


def simulated() -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="swap-models-"))
    for name in ("tiny.gguf", "slow.gguf"):
        (folder / name).touch()
    command = [str(harness.BIN / "paddler-sync"), "simulate", "-m", str(folder / "tiny.gguf"), "-np", str(SLOTS),
               "--decode-tokens-per-second", "100", "--startup-time", "2"]
    return run([command, command], (str(folder / "slow.gguf"), str(folder / "tiny.gguf")), 50, "simulated")


def builds() -> list[Path]:
    listed = os.environ.get("LLAMA_SERVER_BINARIES")
    candidates = [Path(p) for p in listed.split(":")] if listed else \
        sorted((harness.LLAMACPP_DIR / "bin").glob("llama-server-*"))
    return [p for p in candidates if os.access(p, os.X_OK)]


def real() -> dict[str, Any]:
    found = builds()
    if not found:
        return {"skipped": "no llama-server in LLAMACPP_DIR/bin"}
    models = make_models()
    out: dict[str, Any] = {}
    for build in found:
        command = [str(build), "-m", str(models["tiny"]), "-np", str(SLOTS), "-c", "2048", "-t", "1",
                   "--threads-http", "8"]
        name = build.name.removeprefix("llama-server-")
        out[name] = run([command, command], (str(models["slow"]), str(models["tiny"])), 50, name)
    return out


def model_swaps() -> dict[str, Any]:
    results = {"clients": CLIENTS, "slots": SLOTS, "baseline_s": BASELINE_SECONDS, "simulated": simulated()}
    print(f"  swaps, simulated: {summary(results['simulated'])}", flush=True)
    results["real"] = real()
    for name, figures in results["real"].items():
        if isinstance(figures, dict):
            print(f"  swaps, real {name}: {summary(figures)}", flush=True)
    return results


def summary(figures: dict[str, Any]) -> str:
    swaps = ", ".join(f"{s:.1f}" for s in figures["swap_seconds"])
    return (f"{figures['failed']} failed of {figures['requests']}, deferred max {figures['deferred_max']:.0f}, "
            f"TTFT p99 {figures['base_p99_ms']:.0f} -> {figures['swap_p99_ms']:.0f} ms, swaps {swaps} s, "
            f"recovery {figures['recovery_after_kill_s']:.1f} s")

