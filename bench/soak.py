"""Soak: stream at high concurrency for a while, injecting faults at random; memory must stay flat and nothing leak.

Faults, one every few seconds: a simulator killed -9 and restarted, a simulator paused (SIGSTOP) and resumed,
an agent killed -9 and restarted, clients that hang up mid-stream. At the end the balancer must be back to zero
in flight with its greenlets and descriptors at their baseline, and every request must have been answered
(a status line, or a stream cut visibly by a fault). Prints the figures as JSON.

usage: python bench/soak.py [--seconds 600] [--clients 60] [--redis [--workers 2]]   (or: make soak, SOAK_SECONDS=...)

With --redis the ledger lives in a redis-server started here; with --workers 2 the figures of greenlets,
descriptors and RSS are those of whichever worker answers /metrics, while in-flight is the shared count.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.shared import redis_server


def internals(balancer: harness.Service) -> dict[str, float]:
    text = requests.get(balancer.management + "/metrics", timeout=5).text
    found = {k: float(v) for k, v in re.findall(r"^(paddler_greenlets|process_open_fds|paddler_requests_in_flight|"
                                                r"paddler_requests_buffered|paddler_shared_ledger_connections) (\S+)$",
                                                text, re.M)}
    # the Redis pool grows with concurrency up to its bound: counted apart, not as a leak
    found["redis_connections"] = found.pop("paddler_shared_ledger_connections", 0.0)
    found["process_open_fds"] = found.get("process_open_fds", 0.0) - found["redis_connections"]
    found["worker_rss_mb"] = balancer.largest_rss() / 1e6
    return found


def client_loop(port: int, stop: threading.Event, tally: dict[str, int], rng: random.Random) -> None:
    while not stop.is_set():
        body = json.dumps({"prompt": "soak", "n_predict": rng.randint(20, 120), "stream": True}).encode()
        hang_up = rng.random() < 0.05
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            first = sock.recv(65536)
            if hang_up:
                sock.close()
                tally["hung_up"] += 1
                continue
            data = first
            while chunk := sock.recv(65536):
                data += chunk
            sock.close()
        except OSError:
            tally["no_answer"] += 1
            continue
        status = data[9:12]
        if not status:
            tally["no_answer"] += 1  # the connection closed without a status line
        elif status == b"200" and data.endswith(b"0\r\n\r\n"):
            tally["complete"] += 1
        elif status == b"200":
            tally["cut_visibly"] += 1  # a fault broke the stream; the client saw it end without the last chunk
        else:
            key = f"status_{status.decode(errors='replace')}"
            tally[key] = tally.get(key, 0) + 1
            if status in (b"429", b"503"):
                time.sleep(0.5)  # as a client honouring Retry-After would, roughly


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=60)
    parser.add_argument("--redis", action="store_true", help="share the ledger in a redis-server started here")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers (more than 1 needs --redis)")
    args = parser.parse_args()
    shared: list[str] = []
    redis_proc = None
    if args.redis:
        redis_proc, url = redis_server()
        shared = ["--state-backend", url, "--lease-ttl", "5"]
    shared += ["--workers", str(args.workers)]
    rng = random.Random(7)
    sims = [harness.simulator("--parallel", "8", "--decode-tokens-per-second", "60", name=f"soak-sim{i}")
            for i in range(3)]
    balancer = harness.paddler(sims, "--log-level", "warning", "--buffered-request-timeout", "30",
                               "--max-buffered-requests", "200",
                               "--quarantine-duration", "1", *shared, name="soak-paddler", interval=0.5)
    agents = list(balancer.extra_procs)  # type: ignore[attr-defined]
    time.sleep(1)
    baseline = internals(balancer)
    tally = {"complete": 0, "cut_visibly": 0, "hung_up": 0, "no_answer": 0}
    stop = threading.Event()
    clients = [threading.Thread(target=client_loop, args=(balancer.port, stop, tally, random.Random(i)), daemon=True)
               for i in range(args.clients)]
    for client in clients:
        client.start()
    samples, faults = [], []
    started = time.monotonic()
    next_fault = started + 3
    while time.monotonic() - started < args.seconds:
        time.sleep(1)
        samples.append(internals(balancer))
        if time.monotonic() < next_fault:
            continue
        next_fault = time.monotonic() + rng.uniform(3, 8)
        victim = rng.randrange(len(sims))
        fault = rng.choice(["kill_simulator", "pause_simulator", "kill_agent"])
        faults.append(fault)
        if fault == "kill_simulator":
            port = sims[victim].port
            sims[victim].procs[0].kill()
            time.sleep(1)
            sims[victim] = harness.simulator("--parallel", "8", "--decode-tokens-per-second", "60",
                                             name=f"soak-sim{victim}", port=port)
        elif fault == "pause_simulator":
            sims[victim].procs[0].send_signal(signal.SIGSTOP)
            time.sleep(2)
            sims[victim].procs[0].send_signal(signal.SIGCONT)
        else:
            agents[victim].kill()
            agents[victim] = harness.spawn("soak-agent", [harness.PYTHON, "-m", "paddler_sync", "agent",
                                                          "--local-llamacpp-addr", f"127.0.0.1:{sims[victim].port}",
                                                          "--management-addr", balancer.management[len("http://"):],
                                                          "--monitoring-interval", "0.5"])
    stop.set()
    for client in clients:
        client.join(90)
    time.sleep(3)
    end = internals(balancer)
    rss = [s["worker_rss_mb"] for s in samples]
    quarter = max(1, len(rss) // 4)
    result = {
        "seconds": args.seconds, "clients": args.clients, "faults": {f: faults.count(f) for f in set(faults)},
        "requests": tally, "unanswered": tally["no_answer"],
        "in_flight_at_end": end.get("paddler_requests_in_flight"),
        "buffered_at_end": end.get("paddler_requests_buffered"),
        "greenlets_baseline_end": [baseline.get("paddler_greenlets"), end.get("paddler_greenlets")],
        "fds_baseline_end": [baseline.get("process_open_fds"), end.get("process_open_fds")],
        "redis_connections_baseline_end": [baseline.get("redis_connections"), end.get("redis_connections")],
        "worker_rss_mb_first_quarter_last_quarter_max": [round(sum(rss[:quarter]) / quarter, 1),
                                                         round(sum(rss[-quarter:]) / quarter, 1), round(max(rss), 1)],
    }
    print(json.dumps(result, indent=1))
    harness.stop_paddler(balancer)
    for agent in agents:
        agent.kill()
    for sim in sims:
        sim.stop()
    if redis_proc is not None:
        redis_proc.terminate()


if __name__ == "__main__":
    main()
