"""Processes for the benchmarks: simulators, paddler_sync, the naive proxy, HAProxy and nginx, side by side.

Every contender is started the way a user would run it, on loopback ports, one worker or thread
each so they compare core for core; CPU and peak RSS are read from /proc (psutil) for the whole
process tree of the contender.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_DIR = Path(os.environ.get("LLAMACPP_DIR") or ROOT.parent / "shared" / "llamacpp")  # real builds, model maker
SOURCE = {"path": ROOT}  # where paddler_sync is imported from (bench/revisions.py points it at another revision)
OUT = ROOT / "bench" / "out"
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


@dataclass
class Service:
    name: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    url: str = ""
    port: int = 0
    management: str = ""

    def pids(self) -> list[int]:
        pids = []
        for proc in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids.append(proc.pid)
                pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        return pids

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        return total

    def rss(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += psutil.Process(pid).memory_info().rss
        return total

    def largest_rss(self) -> int:
        """The biggest single process (for a gunicorn balancer: the worker, without the master)."""
        sizes = [0]
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                sizes.append(psutil.Process(pid).memory_info().rss)
        return max(sizes)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


class PeakRss:
    """Samples a service's RSS every 50 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.peak = 0
        self.peak_largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.service.rss())
            self.peak_largest = max(self.peak_largest, self.service.largest_rss())
            time.sleep(0.05)


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    OUT.mkdir(parents=True, exist_ok=True)
    log = open(OUT / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
    full_env = {**os.environ, "PYTHONPATH": str(SOURCE["path"]), **(env or {})}
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=tempfile.gettempdir(),
                            start_new_session=True)


def simulator(*args: str, name: str = "simulator", port: int | None = None) -> Service:
    port = port or free_port()
    proc = spawn(name, [PYTHON, "-m", "paddler_sync", "simulate", "--addr", f"127.0.0.1:{port}", *args])
    wait_port(port)
    return Service(name, [proc], f"http://127.0.0.1:{port}", port)


def paddler(upstreams: list[Service], *args: str, interval: float = 0.5, name: str = "paddler_sync") -> Service:
    port, management = free_port(), free_port()
    procs = [spawn(name, [PYTHON, "-m", "paddler_sync", "balancer", "--reverseproxy-addr", f"127.0.0.1:{port}",
                          "--management-addr", f"127.0.0.1:{management}", *args])]
    wait_port(management)
    service = Service(name, procs, f"http://127.0.0.1:{port}", port, f"http://127.0.0.1:{management}")
    agents = [spawn(f"{name}-agent", [PYTHON, "-m", "paddler_sync", "agent", "--local-llamacpp-addr",
                                      f"127.0.0.1:{u.port}", "--management-addr", f"127.0.0.1:{management}",
                                      "--monitoring-interval", str(interval), "--name", u.name])
              for u in upstreams]
    wait_port(port)
    import requests

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if requests.get(service.management + "/health", timeout=2).json()["agents_ready"] == len(upstreams):
            break
        time.sleep(0.1)
    service.extra_procs = agents  # type: ignore[attr-defined]  # agents are not the balancer's CPU
    return service


def stop_paddler(service: Service) -> None:
    service.stop()
    for agent in getattr(service, "extra_procs", []):
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)


def naive(upstreams: list[Service]) -> Service:
    port = free_port()
    proc = spawn("naive", [str(BIN / "gunicorn"), "-k", "gevent", "-w", "1", "--worker-connections", "10000",
                           "-b", f"127.0.0.1:{port}", "--no-control-socket", "--chdir", str(ROOT),
                           "bench.naive_proxy:app"],
                 env={"UPSTREAMS": ",".join(f"127.0.0.1:{u.port}" for u in upstreams)})
    wait_port(port)
    return Service("naive", [proc], f"http://127.0.0.1:{port}", port)


def haproxy(upstreams: list[Service], maxconn: list[int] | None = None, balance: str = "leastconn",
            name: str = "haproxy") -> Service:
    port = free_port()
    servers = "\n".join(
        f"    server s{i} 127.0.0.1:{u.port}" + (f" maxconn {maxconn[i]}" if maxconn else "")
        for i, u in enumerate(upstreams))
    config = f"""global
    nbthread 1
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout queue 300s
    option http-no-delay
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance {balance}
    option http-no-delay
{servers}
"""
    path = OUT / f"{name}.cfg"
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(config)
    proc = spawn(name, [shutil.which("haproxy") or "haproxy", "-db", "-f", str(path)])
    wait_port(port)
    return Service(name, [proc], f"http://127.0.0.1:{port}", port)


def nginx(upstreams: list[Service]) -> Service:
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    servers = "\n".join(f"        server 127.0.0.1:{u.port};" for u in upstreams)
    config = f"""worker_processes 1;
daemon off;
master_process off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {workdir};
    proxy_temp_path {workdir};
    upstream llama {{
        least_conn;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(config)
    proc = spawn("nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(path), "-p", str(workdir)])
    wait_port(port)
    return Service("nginx", [proc], f"http://127.0.0.1:{port}", port)


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    try:
        yield service
    finally:
        if service.name.startswith("paddler"):
            stop_paddler(service)
        else:
            service.stop()
