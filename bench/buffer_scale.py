"""The buffer at scale: N clients wait on a fleet with no free slot; then slots appear and they drain."""

from __future__ import annotations

import json
import resource
import subprocess
import time
from typing import Any

import requests

from bench import harness

DRAIN_SLOTS = 16


def buffer_at_scale(n: int) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # children inherit it: each needs n + a few
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    balancer = harness.paddler([], "--max-buffered-requests", str(n + 100), "--buffered-request-timeout", "900",
                               "--max-client-connections", str(n + 1000), "--log-level", "warning",
                               name="paddler_buffer")
    rss_before = balancer.rss()
    client = subprocess.Popen([harness.PYTHON, str(harness.ROOT / "bench" / "buffer_client.py"),
                               f"127.0.0.1:{balancer.port}", str(n)], stdout=subprocess.PIPE, text=True)
    sim = None
    try:
        assert client.stdout.readline().strip() == "sent"
        deadline = time.monotonic() + 120
        while requests.get(balancer.management + "/health", timeout=10).json()["requests_buffered"] < n:
            if time.monotonic() > deadline:
                raise RuntimeError("not every request reached the buffer")
            time.sleep(0.2)
        time.sleep(1)
        cpu_before = balancer.cpu_seconds()
        time.sleep(5)
        idle_cpu = (balancer.cpu_seconds() - cpu_before) / 5
        waiting_rss = balancer.rss()
        sim = harness.simulator("--parallel", str(DRAIN_SLOTS), "--decode-tokens-per-second", "0",
                                "--prefill-ms-per-token", "0", name="buffer-sim")
        drain_started = time.monotonic()
        agent = harness.spawn("buffer-agent", [harness.PYTHON, "-m", "paddler_sync", "agent", "--local-llamacpp-addr",
                                               f"127.0.0.1:{sim.port}", "--management-addr",
                                               balancer.management.removeprefix("http://"),
                                               "--monitoring-interval", "0.5"])
        with harness.PeakRss(balancer) as peak:
            result = json.loads(client.stdout.readline())
        drain = time.monotonic() - drain_started
        agent.terminate()
        agent.wait(10)
        deferred = requests.get(sim.url + "/simulator/stats", timeout=5).json()["requests_deferred_total"]
    finally:
        client.kill()
        harness.stop_paddler(balancer)
        if sim is not None:
            sim.stop()
    return {"n": n, "ok": result["ok"], "lost": result["other"], "rss_idle_mb": rss_before / 1e6,
            "rss_waiting_mb": waiting_rss / 1e6, "rss_peak_mb": max(peak.peak, waiting_rss) / 1e6,
            "worker_rss_peak_mb": peak.peak_largest / 1e6,
            "kb_per_waiting_request": (waiting_rss - rss_before) / n / 1024,
            "cpu_while_waiting_percent": 100 * idle_cpu, "drain_s": drain, "drain_slots": DRAIN_SLOTS,
            "max_displacement": result["max_displacement"], "simulator_deferred": deferred}
