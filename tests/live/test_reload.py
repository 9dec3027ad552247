"""A reload under streaming load drops nothing: SIGHUP to the balancer (gunicorn's master) starts new workers with
the settings read again, the old worker hands its waiting requests to them and finishes its streams, and no request
waits inside llama.cpp meanwhile; a settings mistake keeps the running worker. On both stores."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.helpers import (
    INTERVAL,
    Fleet,
    Proc,
    RedisServer,
    agents_ready,
    free_port,
    sim_stats,
    streaming_load,
    wait_until,
)

pytestmark = pytest.mark.both_stores


def loaded_fleet(fleet: Fleet, *balancer_args: str, speed: str = "60") -> tuple[Proc, list[Proc]]:
    balancer = fleet.balancer("--buffered-request-timeout", "30", *balancer_args)
    sims = [fleet.simulator("--parallel", "2", "--decode-tokens-per-second", speed) for _ in range(2)]
    for i, sim in enumerate(sims):
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", f"s{i}", interval=INTERVAL)
    agents_ready(balancer, 2)
    return balancer, sims


def workers_booted(balancer: Proc) -> int:
    return len(re.findall(r"Booting worker with pid", balancer.log()))


def test_a_reload_under_streaming_load_fails_no_request(fleet: Fleet) -> None:
    balancer, sims = loaded_fleet(fleet, speed="10")  # 3 s streams: the old worker still has waiters to hand over
    with streaming_load(balancer, 8) as outcomes:  # four slots: four stream, four wait in the buffer
        wait_until(lambda: len(outcomes) >= 4, timeout=20, message="the load running")
        balancer.signal(signal.SIGHUP)
        wait_until(lambda: workers_booted(balancer) == 2, message="the new worker")
        wait_until(lambda: "handed over to them" in balancer.log(), message="the old worker's hand-over")
        before = len(outcomes)
        wait_until(lambda: len(outcomes) >= before + 12, timeout=40, message="the new worker serving")
    assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    assert [sim_stats(s)["requests_deferred_total"] for s in sims] == [0, 0]  # nothing queued inside llama.cpp
    handed = int(re.search(r"replaced by new workers: (\d+) waiting request", balancer.log()).group(1))
    assert handed >= 1 and "Traceback" not in balancer.log() and balancer.alive()


def test_a_reload_with_a_settings_mistake_keeps_the_running_worker(fleet: Fleet) -> None:
    tenants = Path(fleet.workdir) / "tenants.toml"
    tenants.write_text('[tenants.a]\nkeys = ["sk-a"]\n')
    balancer, _ = loaded_fleet(fleet, "--tenants", str(tenants))
    tenants.write_text('[tenants.a]\nkeys = ["sk-a"]\nmax_slot = 1\n')
    balancer.signal(signal.SIGHUP)
    wait_until(lambda: "not reloaded, the settings have a mistake" in balancer.log(), message="the refusal")
    log = balancer.log()
    assert "line 3: tenant 'a': unknown field 'max_slot'; did you mean 'max_slots'?" in log
    assert "Hang up" not in log and workers_booted(balancer) == 1 and balancer.alive()  # gunicorn's reload never ran


class TcpBalancer:
    """A TCP load balancer in front of balancers, as operators run HAProxy: each connection to the next backend whose
    /health answers 200 (checked every 50 ms, ``option httpchk``), then bytes both ways."""

    def __init__(self, backends: list[int], health: list[str]) -> None:
        self.backends = backends
        self.health = health
        self.up = [True] * len(backends)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.turn = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._check, daemon=True).start()

    def _check(self) -> None:
        while not self.closed.wait(0.05):
            for i, url in enumerate(self.health):
                try:
                    self.up[i] = requests.get(url + "/health", timeout=0.5).status_code == 200
                except requests.RequestException:
                    self.up[i] = False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """The request read whole, then sent to a healthy backend; one that closes or resets before any byte of an
        answer is tried again elsewhere (HAProxy's ``retry-on conn-failure empty-response`` with redispatch)."""
        with client:
            request = _read_request(client)
            for _ in range(40 * len(self.backends)):
                self.turn += 1
                index = self.turn % len(self.backends)
                if not self.up[index]:
                    time.sleep(0.005)
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.backends[index]), 1)
                    upstream.sendall(request)
                    first = upstream.recv(65536)
                except OSError:
                    continue
                if first:
                    client.sendall(first)
                    _pipe(upstream, client)
                    return

    def close(self) -> None:
        self.closed.set()
        self.server.close()


def _read_request(client: socket.socket) -> bytes:
    """One HTTP request with a Content-Length body (what the clients here send)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) if b"ontent-" in head else 0
    while len(body) < length:
        body += client.recv(65536)
    return head + b"\r\n\r\n" + body


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def balancers_sharing_redis(fleet: Fleet, redis_url: str) -> tuple[list[Proc], list[tuple[int, int]], str]:
    """Two balancers on one Redis prefix, each on ports of its own (kept for their restarts): (balancers, their
    (proxy, management) ports, the prefix)."""
    fleet.redis_url = redis_url
    prefix = f"t{uuid.uuid4().hex[:12]}"
    ports = [(free_port(), free_port()) for _ in range(2)]
    balancers = [fleet.balancer("--buffered-request-timeout", "30", proxy_port=p, management_port=m, prefix=prefix)
                 for p, m in ports]
    return balancers, ports, prefix


def restart_in_turn(fleet: Fleet, balancers: list[Proc], ports: list[tuple[int, int]], prefix: str,
                    patience: float = 30) -> list[str]:
    """Six clients stream through a TCP load balancer in front of ``balancers`` while each in turn is stopped
    (SIGTERM) and started again on its ports; what each request came to."""
    front = TcpBalancer([p for p, _ in ports], [f"http://127.0.0.1:{m}" for _, m in ports])
    through_front = Proc("front", balancers[0].popen, balancers[0].log_path,
                         extra={"proxy": f"http://127.0.0.1:{front.port}"})
    try:
        with streaming_load(through_front, 6) as outcomes:
            for i, (proxy, management) in enumerate(ports):
                wait_until(lambda n=len(outcomes): len(outcomes) >= n + 6,  # noqa: B008 (the count now)
                           timeout=patience, message="the load running")
                balancers[i].signal(signal.SIGTERM)
                assert balancers[i].popen.wait(40) == 0
                balancers[i] = fleet.balancer("--buffered-request-timeout", "30", proxy_port=proxy,
                                              management_port=management, prefix=prefix)
            before = len(outcomes)
            wait_until(lambda: len(outcomes) >= before + 12, timeout=patience, message="both serving again")
    finally:
        front.close()
    return outcomes


@pytest.mark.ledger_agnostic
def test_a_rolling_restart_of_two_balancers_behind_a_tcp_balancer_fails_no_request(fleet: Fleet,
                                                                                    redis_server: RedisServer) -> None:
    """Two balancers sharing Redis behind a TCP load balancer that checks /health; each in turn stopped (SIGTERM)
    and started again on its ports while six clients stream through the front."""
    balancers, ports, prefix = balancers_sharing_redis(fleet, redis_server.url)
    sims = [fleet.simulator("--parallel", "2", "--decode-tokens-per-second", "60") for _ in range(2)]
    for i, sim in enumerate(sims):
        fleet.agent(sim.port, ports[i][1], "--name", f"s{i}", interval=INTERVAL)
    agents_ready(balancers[0], 2)
    outcomes = restart_in_turn(fleet, balancers, ports, prefix)
    assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    assert [sim_stats(s)["requests_deferred_total"] for s in sims] == [0, 0]
