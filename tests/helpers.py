"""What the tests share: real processes on free loopback ports (simulators, agents, balancers, Redis), waiting,
and the few requests every scenario makes. Fixtures are in conftest.py; every test module imports from here.

Every process runs from a scratch working directory (so conf/*.conf of the checkout is not read),
logs to a file the test can read, and is killed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


PYTHON = sys.executable
PADDLER_SYNC = str(Path(PYTHON).parent / "paddler-sync")  # the console script pip installs beside python


PORT_RANGES = 4  # xdist workers each draw ports from their own slice of 20000-31999 (below the ephemeral ports)
_next_port = {"value": 0}


def free_port() -> int:
    """A port nothing listens on. Under pytest-xdist each worker takes ports from its own range, so two workers
    never pick the same one between choosing it and binding it; alone, the kernel chooses."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    size = 12000 // PORT_RANGES
    base = 20000 + (int(worker[2:]) % PORT_RANGES) * size
    for _ in range(size):
        port = base + _next_port["value"] % size
        _next_port["value"] += 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + size - 1}")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last error: {last_error!r})")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)

    def kill_group(self) -> None:
        """SIGKILL to the process and every child of its group (a balancer's gunicorn workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(5)

    def stop(self, timeout: float = 10) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class Fleet:
    """Starts and tracks processes for one test."""

    def __init__(self, workdir: Path, redis_url: str | None = None) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.redis_url = redis_url  # the shared ledger, when tested; each balancer gets its own prefix

    def state_flags(self, prefix: str | None) -> list[str]:
        if self.redis_url is None:
            return []
        return ["--state-backend", self.redis_url, "--state-prefix", prefix or f"t{uuid.uuid4().hex[:12]}"]

    def spawn(self, name: str, argv: list[str], port: int | None = None, env: dict[str, str] | None = None,
              wait_port: bool = True, timeout: float = 15.0, cwd: Path | None = None) -> Proc:
        log_path = self.workdir / f"{name}-{len(self.procs)}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLER_")}
        full_env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
        full_env.update(env or {})
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(argv, cwd=cwd or self.workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = Proc(name, popen, log_path, port)
        self.procs.append(proc)
        if port is not None and wait_port:
            wait_until(lambda: port_open(port) or not proc.alive(), timeout, message=f"{name} on port {port}")
            if not proc.alive():
                raise AssertionError(f"{name} exited early:\n{proc.log()}")
        return proc

    def simulator(self, *args: str, port: int | None = None, **kwargs: Any) -> Proc:
        port = port or free_port()
        return self.spawn("simulator", [PYTHON, "-m", "paddler_sync", "simulate", "--addr", f"127.0.0.1:{port}",
                                        *args], port, **kwargs)

    def agent(self, llamacpp_port: int, management_port: int, *args: str, interval: float = 0.2,
              **kwargs: Any) -> Proc:
        return self.spawn("agent", [PYTHON, "-m", "paddler_sync", "agent",
                                    "--local-llamacpp-addr", f"127.0.0.1:{llamacpp_port}",
                                    "--management-addr", f"127.0.0.1:{management_port}",
                                    "--monitoring-interval", str(interval), *args], None, **kwargs)

    def supervised(self, management_port: int, *command: str, name: str = "s0", interval: float = 0.2,
                   agent_args: tuple[str, ...] = (), **kwargs: Any) -> Proc:
        """An agent that runs its llama.cpp server itself (``--supervise -- COMMAND``); by default a simulator."""
        command = command or (PADDLER_SYNC, "simulate")
        return self.spawn("agent", [PYTHON, "-m", "paddler_sync", "agent",
                                    "--management-addr", f"127.0.0.1:{management_port}",
                                    "--monitoring-interval", str(interval), "--name", name, *agent_args,
                                    "--supervise", "--", *command], None, **kwargs)

    def balancer(self, *args: str, proxy_port: int | None = None, management_port: int | None = None,
                 prefix: str | None = None, **kwargs: Any) -> Proc:
        """A balancer; with the Redis backend, ``prefix`` names the fleet it shares (default: a new one)."""
        proxy_port = proxy_port or free_port()
        management_port = management_port or free_port()
        proc = self.spawn("balancer", [PYTHON, "-m", "paddler_sync", "balancer",
                                       "--reverseproxy-addr", f"127.0.0.1:{proxy_port}",
                                       "--management-addr", f"127.0.0.1:{management_port}",
                                       *self.state_flags(prefix), *args],
                          management_port, **kwargs)
        wait_until(lambda: port_open(proxy_port), message="the proxy port")
        proc.extra.update(proxy=f"http://127.0.0.1:{proxy_port}", management=f"http://127.0.0.1:{management_port}",
                          proxy_port=proxy_port, management_port=management_port)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(5)


class RedisServer:
    """A real redis-server on a free port, without persistence; stop/start keep its port."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: run scripts/system-packages.sh as root "
                        "(apt-get install redis-server)")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.popen = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: port_open(self.port), message="redis-server")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def agents(balancer: Proc) -> list[dict[str, Any]]:
    return requests.get(f"{balancer.extra['management']}/api/v1/agents", timeout=5).json()["agents"]


def agent_named(balancer: Proc, name: str) -> dict[str, Any] | None:
    return next((a for a in agents(balancer) if a["agent_name"] == name), None)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLER_")}
    full_env.update({"PYTHONPATH": str(ROOT)})
    full_env.update(env or {})
    return subprocess.run([PYTHON, "-m", "paddler_sync", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd or ROOT, timeout=timeout)


def real_builds() -> list[Any]:
    """One pytest param per llama-server build found; a single skipped param when there is none."""
    from tests.llamacpp_servers import find_builds, missing_reason

    reason = missing_reason()
    if reason:
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-llama-server")]
    return [pytest.param(build, id=build.name) for build in find_builds()]


def spawn_llama_server(fleet: Fleet, build: Any, model: Path, *args: str, port: int | None = None,
                       wait_healthy: bool = True) -> Proc:
    """A real llama-server on a free loopback port, one compute thread (2-core machines), /metrics on."""
    port = port or free_port()
    proc = fleet.spawn(f"llama-{build.name}", [str(build.path), "-m", str(model), "--host", "127.0.0.1",
                                               "--port", str(port), "-t", "1", "--metrics", *args], port)
    if wait_healthy:
        wait_until(lambda: requests.get(f"{proc.url}/health", timeout=2).status_code == 200
                   or not proc.alive(), timeout=30, message=f"llama-server {build.name} healthy")
        if not proc.alive():
            raise AssertionError(f"llama-server exited:\n{proc.log()}")
    return proc


INTERVAL = 0.2


def start_fleet(fleet: Fleet, slots: list[int], *balancer_args: str, sim_args: tuple[str, ...] = ()) -> tuple:
    balancer = fleet.balancer(*balancer_args)
    sims = []
    for i, n in enumerate(slots):
        sim = fleet.simulator("--parallel", str(n), *sim_args)
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", f"s{i}", interval=INTERVAL)
        sims.append(sim)
    wait_until(lambda: len(agents(balancer)) == len(slots) and all(a["state"] == "ready" for a in agents(balancer)))
    return balancer, sims


def complete(balancer: Proc, n_predict: int, stream: bool = False, timeout: float = 30) -> requests.Response:
    return requests.post(balancer.extra["proxy"] + "/completion",
                         json={"prompt": "hello", "n_predict": n_predict, "stream": stream}, timeout=timeout)


def serve_simulator(fleet: Fleet, balancer: Proc, name: str, *sim_args: str) -> Proc:
    """A simulator with its agent, named ``name``, reporting to ``balancer``."""
    sim = fleet.simulator(*sim_args)
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", name)
    return sim


def agents_ready(balancer: Proc, count: int) -> None:
    """Wait until ``count`` agents report and every one is ready."""
    wait_until(lambda: len(agents(balancer)) == count and all(a["state"] == "ready" for a in agents(balancer)),
               message=f"{count} agents ready")


def reported_since(balancer: Proc, name: str, since: float) -> bool:
    """The agent ``name`` reported after ``since`` (the wall clock's seconds): what it says now is known."""
    agent = agent_named(balancer, name)
    stamp = (agent or {}).get("last_update") or {}
    return bool(stamp) and stamp["secs_since_epoch"] + stamp["nanos_since_epoch"] / 1e9 > since


def health(balancer: Proc) -> dict:
    return requests.get(balancer.extra["management"] + "/health", timeout=5).json()


def sim_stats(sim: Proc) -> dict:
    return requests.get(sim.url + "/simulator/stats", timeout=5).json()


class TrafficOutcomes(list):
    def __init__(self) -> None:
        super().__init__()
        self.retry_after: list[str | None] = []


@contextmanager
def repeated(threads: int, once: Callable[[], None], join: float = 30) -> Iterator[None]:
    """``once`` in a loop on each of ``threads`` threads, until the block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            once()

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(join)


@contextmanager
def background_traffic(balancer: Proc, threads: int, n_predict: int) -> Iterator[list[str]]:
    """Clients completing in a loop until the block ends; each outcome is a status, 'refused' or 'error ...'.
    Retry-After of every 503 lands in ``outcomes.retry_after``."""
    outcomes = TrafficOutcomes()

    def traffic() -> None:
        try:
            response = complete(balancer, n_predict, timeout=20)
        except requests.ConnectionError:
            outcomes.append("refused")
            time.sleep(0.1)
            return
        except requests.RequestException as exc:
            outcomes.append(f"error {type(exc).__name__}")
            return
        outcomes.append(str(response.status_code))
        if response.status_code == 503:
            outcomes.retry_after.append(response.headers.get("Retry-After"))
            time.sleep(0.05)

    with repeated(threads, traffic):
        yield outcomes


def internals(balancer: Proc) -> dict[str, float]:
    text = requests.get(balancer.extra["management"] + "/metrics", timeout=5).text
    found = {name: float(value) for name, value in re.findall(
        r"^(paddler_greenlets|process_open_fds|paddler_shared_ledger_connections) (\S+)$", text, re.M)}
    # Redis connections are a bounded pool that grows with concurrency, not a leak: count the rest
    found["process_open_fds"] -= found.pop("paddler_shared_ledger_connections", 0)
    found["in_flight"] = health(balancer)["requests_in_flight"]
    found["buffered"] = health(balancer)["requests_buffered"]
    return found


def settled(balancer: Proc, baseline: dict[str, float]) -> dict[str, float]:
    """Wait until nothing is in flight or waiting and greenlets and descriptors are back to the baseline."""
    def ok() -> dict[str, float] | None:
        now = internals(balancer)
        clean = (now["in_flight"] == 0 and now["buffered"] == 0
                 and now["paddler_greenlets"] <= baseline["paddler_greenlets"] + 1
                 and now["process_open_fds"] <= baseline["process_open_fds"] + 4)  # + idle pooled upstream sockets
        return now if clean else None

    try:
        return wait_until(ok, timeout=15, interval=0.2, message=f"no leaks (baseline {baseline})")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; now {internals(balancer)}") from None


def good_report(**changes: Any) -> dict[str, Any]:
    report = {"external_llamacpp_addr": "127.0.0.1:9001", "monitoring_interval": 1.0, "state": "ready",
              "slots_idle": 3, "slots_processing": 1, "agent_name": "a", "error": None, "is_authorized": True,
              "is_slots_endpoint_enabled": True, "total_slots": 4, "model": "m", "llamacpp_build": "b1"}
    report.update(changes)
    return report


@contextmanager
def fake_http(routes: dict[tuple[str, str], tuple[int, str]]) -> Iterator[tuple[int, list]]:
    """A tiny loopback server for what cannot run here (EC2 metadata) or must misbehave (garbage /slots)."""
    seen: list = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append((self.command, self.path, dict(self.headers)))
            status, body = routes.get((self.command, self.path), (404, "not found"))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()


# --- supervised servers (tests/live/test_supervisor.py, tests/real/test_real_supervisor.py) --------------------


def supervised_ready(balancer: Proc, name: str) -> dict[str, Any] | None:
    """The agent ``name`` and the llama-server it runs both ready (its record), else None."""
    agent = agent_named(balancer, name)
    if agent and agent["state"] == "ready" and agent["supervisor"]["state"] == "ready":
        return agent
    return None


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def stream(balancer: Proc, model: str | None = None, n_predict: int = 30) -> str:
    """One streamed completion; 'ok' only when every event and the final one arrived."""
    body: dict[str, Any] = {"prompt": "hello", "n_predict": n_predict, "stream": True}
    if model:
        body["model"] = model
    received = b""
    try:
        response = requests.post(balancer.extra["proxy"] + "/completion", json=body, stream=True, timeout=30)
        for chunk in response.iter_content(None):
            received += chunk
    except requests.RequestException as exc:
        return f"error {type(exc).__name__}" if not received else f"cut: {received.decode()[-400:]}"
    text = received.decode()
    if response.status_code != 200:
        return f"{response.status_code} {text[:200]}"
    if '"stop":true' not in text.replace(" ", ""):
        return f"cut: {text[-200:]}"
    return "ok"


@contextmanager
def streaming_load(balancer: Proc, clients: int, model: str | None = None) -> Iterator[list[str]]:
    """Clients streaming in a loop until the block ends; each outcome 'ok' or what went wrong."""
    outcomes: list[str] = []
    with repeated(clients, lambda: outcomes.append(stream(balancer, model)), join=40):
        yield outcomes


def put_desired(balancer: Proc, body: dict[str, Any], agent_id: str | None = None) -> requests.Response:
    path = f"/api/v1/agents/{agent_id}/desired_state" if agent_id else "/api/v1/desired_state"
    return requests.put(balancer.extra["management"] + path, json=body, timeout=5)


def fleet_progress(balancer: Proc) -> dict[str, Any]:
    return requests.get(balancer.extra["management"] + "/api/v1/desired_state", timeout=5).json()


def fleet_behind(fleet: Fleet, bad_port: int, *balancer_args: str) -> Proc:
    """A balancer whose only server is reported at bad_port (the agent watches a healthy simulator)."""
    balancer = fleet.balancer(*balancer_args)
    sim = fleet.simulator("--parallel", "2")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "bad", "--external-llamacpp-addr",
                f"127.0.0.1:{bad_port}", interval=INTERVAL)
    wait_until(lambda: (a := agent_named(balancer, "bad")) and a["state"] == "ready")
    return balancer
