"""Faults on real llama-servers: what each one costs the requests that keep coming.

For each llama-server build found: two llama-servers (the tiny random-weight model, ``-np 2``), their agents, one
balancer whose ledger is in Redis behind Sentinel (a master, a replica, three Sentinels: ``redis-server`` and its
``--sentinel`` mode), and 10 clients sending streamed and non-streamed ``/completion`` requests (20 to 80 tokens)
in closed loops. Every 12 s one fault, in turn: a llama-server killed with SIGKILL (started again 1 s later, as a
process manager would), a llama-server paused 3 s (SIGSTOP, SIGCONT), an agent killed with SIGKILL (started again
1 s later), ``kill -HUP`` of the balancer (a reload), the Redis master killed with SIGKILL (Sentinel fails over;
the old master comes back and is made a replica).

Measured per fault kind (each request counted for the last fault before it ended): requests by outcome (``ok``,
``cut``: a stream that had started, on a server that was killed, ended visibly; ``failed``: any other error
answer; ``hung``: no answer in 120 s), retries (``paddler_requests_retried_total``), the time until the fleet
was whole again (both agents ready and Redis reachable), and the most requests waiting inside llama.cpp at once
(``requests_deferred``, sampled every 250 ms). At the end: requests in flight and waiting (must be 0).

``python -m bench.faults [SECONDS]`` (default 600 per build) writes bench/out/faults.json and prints the table;
``bench/run.py --only faults`` puts it in bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench import harness
from bench.real_llamacpp import make_models, read_metrics

FAULT_EVERY = 12.0
KINDS = ("kill_llama_server", "pause_llama_server", "kill_agent", "reload_balancer", "kill_redis_master")
MASTER = "bench-ledger"


def builds() -> list[Path]:
    folder = harness.LLAMACPP_DIR / "bin"
    return sorted(p for p in folder.glob("llama-server-*") if p.is_file())


class Redis:
    """A master, a replica and three Sentinels; ``kill_master`` fails it over and brings the old one back."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = [harness.free_port(), harness.free_port()]
        self.procs: dict[int, subprocess.Popen] = {}
        self._server(self.ports[0])
        self._server(self.ports[1], "--replicaof", "127.0.0.1", str(self.ports[0]))
        self.sentinels = [harness.free_port() for _ in range(3)]
        for port in self.sentinels:
            conf = folder / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\nsentinel monitor {MASTER} 127.0.0.1 "
                            f"{self.ports[0]} 2\nsentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 5000\n")
            self.procs[port] = harness.spawn(f"sentinel-{port}", ["redis-server", str(conf), "--sentinel"])
            harness.wait_port(port)
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + f"/{MASTER}"
        time.sleep(2)  # the replica's first sync

    def _server(self, port: int, *args: str) -> None:
        self.procs[port] = harness.spawn(f"redis-{port}", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                                           "--save", "", "--appendonly", "no", "--dir",
                                                           str(self.folder), *args])
        harness.wait_port(port)

    def master_port(self) -> int:
        import redis

        return int(redis.Redis(port=self.sentinels[0]).sentinel_get_master_addr_by_name(MASTER)[1])

    def kill_master(self) -> None:
        port = self.master_port()
        self.procs[port].kill()
        self.procs[port].wait(5)
        deadline = time.monotonic() + 30
        while self.master_port() == port and time.monotonic() < deadline:
            time.sleep(0.1)
        self._server(port, "--replicaof", "127.0.0.1", str(self.master_port()))

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()


class Fleet:
    def __init__(self, binary: Path, model: Path, redis: Redis) -> None:
        self.binary, self.model = binary, model
        self.slots = ["--slots"] if binary.name.endswith("b4748") else []
        self.servers = [harness.free_port() for _ in range(2)]
        self.server_procs: dict[int, subprocess.Popen] = {}
        for port in self.servers:
            self.start_server(port)
        self.proxy, management = harness.free_port(), harness.free_port()
        self.management = f"http://127.0.0.1:{management}"
        self.balancer = harness.spawn("faults-balancer", [
            harness.PYTHON, "-m", "paddler_sync", "balancer", "--reverseproxy-addr", f"127.0.0.1:{self.proxy}",
            "--management-addr", f"127.0.0.1:{management}", "--state-backend", redis.url, "--log-level", "warning",
            "--buffered-request-timeout", "60", "--max-buffered-requests", "100"])
        harness.wait_port(self.proxy)
        self.agents = {port: self.start_agent(port, management) for port in self.servers}
        self.management_port = management
        self.wait_whole(60)

    def start_server(self, port: int) -> None:
        self.server_procs[port] = harness.spawn(f"faults-llama-{port}", [
            str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(port), "-np", "2", "-c",
            "2048", "-t", "1", "--metrics", *self.slots])

    def start_agent(self, port: int, management: int) -> subprocess.Popen:
        return harness.spawn(f"faults-agent-{port}", [
            harness.PYTHON, "-m", "paddler_sync", "agent", "--local-llamacpp-addr", f"127.0.0.1:{port}",
            "--management-addr", f"127.0.0.1:{management}", "--monitoring-interval", "0.2", "--name", f"l{port}"])

    def whole(self) -> bool:
        try:
            health = requests.get(self.management + "/health", timeout=2).json()
        except (requests.RequestException, ValueError):
            return False
        return health["agents_ready"] == 2 and bool(health.get("state_backend_reachable", True))

    def wait_whole(self, limit: float) -> float:
        started = time.monotonic()
        while not self.whole() and time.monotonic() - started < limit:
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        self.balancer.send_signal(signal.SIGTERM)
        for proc in [*self.agents.values(), *self.server_procs.values()]:
            proc.kill()
        self.balancer.wait(40)


def inject(kind: str, fleet: Fleet, redis: Redis, rng: random.Random) -> None:
    port = rng.choice(fleet.servers)
    if kind == "kill_llama_server":
        fleet.server_procs[port].kill()
        fleet.server_procs[port].wait(5)
        time.sleep(1)
        fleet.start_server(port)
    elif kind == "pause_llama_server":
        fleet.server_procs[port].send_signal(signal.SIGSTOP)
        time.sleep(3)
        fleet.server_procs[port].send_signal(signal.SIGCONT)
    elif kind == "kill_agent":
        fleet.agents[port].kill()
        fleet.agents[port].wait(5)
        time.sleep(1)
        fleet.agents[port] = fleet.start_agent(port, fleet.management_port)
    elif kind == "reload_balancer":
        fleet.balancer.send_signal(signal.SIGHUP)
    else:
        redis.kill_master()


class Load:
    def __init__(self, port: int, clients: int) -> None:
        self.url = f"http://127.0.0.1:{port}/completion"
        self.stop = threading.Event()
        self.fault = "none"
        self.outcomes: dict[str, dict[str, int]] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(random.Random(i),)) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def client(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            stream = rng.random() < 0.5
            outcome = self.one(stream, rng.randint(20, 80))
            with self.lock:
                counts = self.outcomes.setdefault(self.fault, {})
                counts[outcome] = counts.get(outcome, 0) + 1

    def one(self, stream: bool, n_predict: int) -> str:
        body = {"prompt": "Tell me about the sea.", "n_predict": n_predict, "stream": stream, "ignore_eos": True}
        received = b""
        try:
            with requests.post(self.url, json=body, stream=stream, timeout=120) as answer:
                for chunk in answer.iter_content(None):
                    received += chunk
                if answer.status_code != 200:
                    return "failed"
        except requests.Timeout:
            return "hung"
        except requests.RequestException:
            return "cut" if stream and received.startswith(b"data: ") else "failed"
        if stream and b'"stop":true' not in received.replace(b" ", b""):
            return "cut"
        return "ok"


def run_build(binary: Path, seconds: float) -> dict[str, Any]:
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as folder:
        redis = Redis(Path(folder))
        fleet = Fleet(binary, make_models()["tiny"], redis)
        deferred = [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                for port in fleet.servers:
                    with contextlib.suppress(requests.RequestException, KeyError):  # killed or paused now
                        now = read_metrics(f"http://127.0.0.1:{port}")["requests_deferred"]
                        deferred[0] = max(deferred[0], now)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = Load(fleet.proxy, 10)
        recover: dict[str, list[float]] = {}
        started = time.monotonic()
        turn = 0
        try:
            while time.monotonic() - started < seconds:
                time.sleep(FAULT_EVERY)
                kind = KINDS[turn % len(KINDS)]
                turn += 1
                load.fault = kind
                at = time.monotonic()
                inject(kind, fleet, redis, rng)
                time.sleep(0.5)  # the fault is seen (an agent reports its server unreachable)
                fleet.wait_whole(60)
                recover.setdefault(kind, []).append(time.monotonic() - at)  # from the fault's start
                print(f"  {binary.name}: {kind} at {at - started:.0f}s, whole again after "
                      f"{recover[kind][-1]:.1f}s", flush=True)
        finally:
            load.stop.set()
            for thread in load.threads:
                thread.join(150)
            stop.set()
            metrics = requests.get(fleet.management + "/metrics", timeout=5).text
            fleet.stop()
            redis.stop()
    figure = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(paddler_\w+) (\S+)$", metrics, re.M)}
    return {"build": binary.name, "seconds": seconds, "outcomes": load.outcomes, "recovery_s": recover,
            "retried": figure.get("paddler_requests_retried_total", 0.0), "deferred_max": deferred[0],
            "in_flight_at_end": figure.get("paddler_requests_in_flight"),
            "waiting_at_end": figure.get("paddler_requests_buffered")}


def faults_bench(seconds: float = 600.0) -> dict[str, Any]:
    found = builds()
    if not found:
        return {"skipped": "no llama-server build in LLAMACPP_DIR/bin"}
    return {"seconds": seconds, "builds": [run_build(binary, seconds) for binary in found]}


def table(results: dict[str, Any]) -> str:
    rows = ["| build | fault | requests | ok | cut (stream started on a killed server) | failed | hung | whole again "
            "after, s (max) |", "|---|---|---|---|---|---|---|---|"]
    for run in results["builds"]:
        for kind in ("none", *KINDS):
            counts = run["outcomes"].get(kind, {})
            recovery = run["recovery_s"].get(kind)
            whole = f"{max(recovery):.1f}" if recovery else "-"
            rows.append(f"| {run['build'].removeprefix('llama-server-')} | {kind} | {sum(counts.values())} | "
                        f"{counts.get('ok', 0)} | {counts.get('cut', 0)} | {counts.get('failed', 0)} | "
                        f"{counts.get('hung', 0)} | {whole} |")
    rows.append("")
    rows.append("| build | retried | most deferred inside llama.cpp | in flight at the end | waiting at the end |")
    rows.append("|---|---|---|---|---|")
    for run in results["builds"]:
        rows.append(f"| {run['build'].removeprefix('llama-server-')} | {run['retried']:.0f} | "
                    f"{run['deferred_max']:.0f} | {run['in_flight_at_end']:.0f} | {run['waiting_at_end']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 600.0
    results = faults_bench(seconds)
    harness.OUT.mkdir(parents=True, exist_ok=True)
    (harness.OUT / "faults.json").write_text(json.dumps(results, indent=2))
    if "builds" in results:
        print(table(results))


if __name__ == "__main__":
    main()
