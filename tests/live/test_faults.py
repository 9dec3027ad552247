"""Faults with real processes; after each one the ledger is back to zero in flight and nothing has leaked.

Leaks are counted from the outside: the worker's live greenlets and open file descriptors (sockets
included) come from its Prometheus metrics, and must return to where they were before the fault.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import requests

from tests.helpers import (
    INTERVAL,
    Fleet,
    Proc,
    agent_named,
    agents,
    agents_ready,
    background_traffic,
    complete,
    fleet_behind,
    health,
    internals,
    settled,
    sim_stats,
    start_fleet,
    wait_until,
)

pytestmark = pytest.mark.both_stores  # every test with a fleet runs on both slot stores


@contextmanager
def misbehaving_upstream(mode: str) -> Iterator[int]:
    """A TCP server that accepts and then: 'silent' says nothing, 'garbage' sends junk, 'close' hangs up,
    'headers_then_close' starts an answer and hangs up before its body, 'answer_once' answers the first
    request of each connection (keep-alive) and hangs up on the next one unanswered, as llama.cpp does when
    it closes an idle connection just as a request is written on it."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if mode == "garbage":
                conn.recv(65536)
                conn.sendall(b"this is not HTTP at all\r\n\r\n")
                conn.close()
            elif mode == "close":
                conn.close()
            elif mode == "sse_with_comments":
                threading.Thread(target=sse_with_comments, args=(conn,), daemon=True).start()
            elif mode == "answer_once":
                threading.Thread(target=answer_once, args=(conn,), daemon=True).start()
            elif mode == "headers_then_close":
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                conn.close()
            else:
                held.append(conn)

    def sse_with_comments(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for event in SSE_WITH_COMMENTS:
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                time.sleep(0.05)
            conn.sendall(b"0\r\n\r\n")

    def answer_once(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            body = b'{"content":"ok"}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nKeep-Alive: timeout=5, max=100\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            conn.recv(65536)  # the next request: hung up on unanswered

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        for conn in held:
            conn.close()


def test_upstream_that_accepts_and_never_answers(fleet: Fleet) -> None:
    with misbehaving_upstream("silent") as port:
        balancer = fleet_behind(fleet, port, "--upstream-read-timeout", "1")
        baseline = internals(balancer)
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: complete(balancer, 1, timeout=20).status_code, range(4)))
        assert statuses == [504] * 4
        settled(balancer, baseline)


def test_upstream_that_answers_garbage_or_hangs_up(fleet: Fleet) -> None:
    for mode in ("garbage", "close", "headers_then_close"):
        with misbehaving_upstream(mode) as port:
            balancer = fleet_behind(fleet, port)
            baseline = internals(balancer)
            for _ in range(5):
                response = complete(balancer, 1, timeout=10)
                assert response.status_code == 502 and response.json()["error"]["type"] == "server_error"
            settled(balancer, baseline)


SSE_WITH_COMMENTS = [b": ping\n\n", b"event: response.created\ndata: {\"type\":\"response.created\"}\n\n",
                     b": ping\n\n", b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"]


@pytest.mark.ledger_agnostic
def test_sse_comments_and_named_events_are_relayed_as_they_come(fleet: Fleet) -> None:
    """The 2026 builds' keep-alive comments (': ping') and the Responses / Anthropic 'event:' framing."""
    with misbehaving_upstream("sse_with_comments") as port:
        balancer = fleet_behind(fleet, port)
        response = requests.post(balancer.extra["proxy"] + "/v1/responses", json={"input": "x", "stream": True},
                                 stream=True, timeout=10)
        assert response.status_code == 200
        assert b"".join(response.iter_content(None)) == b"".join(SSE_WITH_COMMENTS)


@pytest.mark.ledger_agnostic
def test_a_request_on_a_connection_llamacpp_just_closed_is_sent_again_on_a_fresh_one(fleet: Fleet) -> None:
    """No 502 for a request llama.cpp never saw: every reused connection here is closed under it."""
    with misbehaving_upstream("answer_once") as port:
        balancer = fleet_behind(fleet, port)
        with requests.Session() as session:
            statuses = [session.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x"}, timeout=10)
                        .status_code for _ in range(12)]
        with ThreadPoolExecutor(4) as pool:
            statuses += [r.status_code for r in pool.map(lambda _: complete(balancer, 1, timeout=10), range(12))]
    assert statuses == [200] * 24, statuses
    assert "failed before answering" not in balancer.log()


def test_clients_leaving_while_waiting_and_mid_stream_leak_nothing(fleet: Fleet) -> None:
    balancer, (sim,) = start_fleet(fleet, [2], sim_args=("--decode-tokens-per-second", "50"))
    complete(balancer, 1)  # warm the upstream pool
    baseline = internals(balancer)
    body = b'{"prompt":"x","n_predict":500,"stream":true}'
    sockets = []
    for _ in range(6):  # 2 stream, 4 wait
        sock = socket.create_connection(("127.0.0.1", balancer.extra["proxy_port"]))
        sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        sockets.append(sock)
    wait_until(lambda: health(balancer)["requests_buffered"] == 4)
    for sock in sockets:
        sock.close()
    settled(balancer, baseline)
    wait_until(lambda: requests.get(sim.url + "/simulator/stats", timeout=5).json()["requests_processing"] == 0)


def test_llamacpp_restarting_under_its_agent(fleet: Fleet) -> None:
    balancer, (sim,) = start_fleet(fleet, [2], "--buffered-request-timeout", "30", "--quarantine-duration", "1",
                                   sim_args=("--decode-tokens-per-second", "100"))
    baseline = internals(balancer)
    results: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                results.append(complete(balancer, 5, timeout=30).status_code)
            except requests.RequestException as exc:
                results.append(-1)
                errors.append(repr(exc))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    sim.kill()
    time.sleep(1.0)
    fleet.simulator("--parallel", "2", "--decode-tokens-per-second", "100", port=sim.port)
    wait_until(lambda: agents(balancer)[0]["state"] == "ready")
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join(30)
    assert results.count(200) > 5
    assert -1 not in results, errors  # every request got an answer: served, or a clear 502 while the server was down
    assert set(results) <= {200, 502}
    settled(balancer, baseline)


def test_agents_flapping(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    sim = fleet.simulator("--parallel", "3")
    baseline = internals(balancer)
    for _ in range(4):
        agent = fleet.agent(sim.port, balancer.extra["management_port"], "--name", "flap", interval=0.1)
        wait_until(lambda: agent_named(balancer, "flap"))
        agent.stop()
        assert agent_named(balancer, "flap") is None
    assert health(balancer)["slots_total"] == 0
    settled(balancer, baseline)


def test_slow_clients_on_both_ports_do_not_stall_others(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [2])
    slow = []
    for port in (balancer.extra["proxy_port"], balancer.extra["management_port"]):
        for _ in range(20):  # slowloris: half a request line, then nothing
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Le")
            slow.append(sock)
    started = time.monotonic()
    assert complete(balancer, 2).status_code == 200
    assert requests.get(balancer.extra["management"] + "/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 2
    for sock in slow:
        sock.close()


def test_balancer_restarted_under_load(fleet: Fleet) -> None:
    """Clients get answers or a clean refusal while the balancer is down; nothing hangs; agents come back."""
    balancer, _ = start_fleet(fleet, [2], "--graceful-timeout", "5", sim_args=("--decode-tokens-per-second", "100"))
    with background_traffic(balancer, 4, 10) as outcomes:
        time.sleep(1)
        assert balancer.stop(timeout=20) == 0
        again = fleet.balancer(proxy_port=balancer.extra["proxy_port"],
                               management_port=balancer.extra["management_port"])
        wait_until(lambda: health(again)["agents_ready"] == 1, timeout=10)
        time.sleep(1)
    assert not any(o.startswith("error") for o in outcomes), outcomes  # no hang, no half answer
    assert set(outcomes) <= {"200", "503", "refused"}
    assert outcomes.count("200") > 4
    assert outcomes[-1] == "200"  # served again after the restart
    settled(again, internals(again))


def stream_outcome(balancer: Proc, n_predict: int, started: list[bool] | None = None) -> str:
    """'done' when the stream reached its last event, 'cut' when it ended early, 'error N' otherwise;
    appends to ``started`` at its first token."""
    try:
        with requests.post(balancer.extra["proxy"] + "/completion", stream=True, timeout=30,
                           json={"prompt": "x", "n_predict": n_predict, "stream": True}) as response:
            if response.status_code != 200:
                return f"error {response.status_code}"
            last = b""
            for line in response.iter_lines():
                if line and not last and started is not None:
                    started.append(True)
                last = line or last
            return "done" if b'"stop":true' in last else "cut"
    except requests.exceptions.ChunkedEncodingError:
        return "cut"


def test_processes_paused_and_resumed_like_a_partition(fleet: Fleet) -> None:
    """SIGSTOP a llama.cpp mid-stream, then an agent: streams are cut by the read timeout, the silent
    ones leave the fleet, traffic goes to the rest, and after SIGCONT both come back."""
    balancer = fleet.balancer("--upstream-read-timeout", "1.5", "--buffered-request-timeout", "20")
    sims = [fleet.simulator("--parallel", "2", "--decode-tokens-per-second", "50") for _ in range(2)]
    agent_procs = [fleet.agent(sim.port, balancer.extra["management_port"], "--name", f"p{i}",
                               "--llamacpp-timeout", "0.5", interval=INTERVAL) for i, sim in enumerate(sims)]
    wait_until(lambda: [a["state"] for a in agents(balancer)] == ["ready", "ready"])
    baseline = internals(balancer)

    with ThreadPoolExecutor(4) as pool:
        started: list[bool] = []
        streams = [pool.submit(stream_outcome, balancer, 150, started) for _ in range(4)]  # 3 s, all 4 slots
        wait_until(lambda: len(started) == 4)
        sims[0].signal(signal.SIGSTOP)
        wait_until(lambda: agent_named(balancer, "p0")["state"] != "ready", timeout=5)
        outcomes = sorted(f.result(timeout=30) for f in streams)
    assert outcomes == ["cut", "cut", "done", "done"], outcomes
    assert all(complete(balancer, 2).status_code == 200 for _ in range(4))  # served by p1 alone

    sims[0].signal(signal.SIGCONT)
    wait_until(lambda: agent_named(balancer, "p0")["state"] == "ready")
    agent_procs[1].signal(signal.SIGSTOP)
    wait_until(lambda: agent_named(balancer, "p1") is None, timeout=5)  # silent for 3 intervals: dropped
    assert all(complete(balancer, 2).status_code == 200 for _ in range(4))
    agent_procs[1].signal(signal.SIGCONT)
    wait_until(lambda: (a := agent_named(balancer, "p1")) and a["state"] == "ready")
    assert health(balancer)["slots_total"] == 4
    settled(balancer, baseline)


def two_servers(fleet: Fleet, *sim_args: str) -> tuple[Proc, list[Proc]]:
    balancer = fleet.balancer()
    sims = [fleet.simulator("--parallel", "1", *sim_args) for _ in range(2)]
    for i, sim in enumerate(sims):
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", f"s{i}", interval=INTERVAL)
    agents_ready(balancer, 2)
    return balancer, sims


def kill_the_busy_one(sims: list[Proc], after: float = 0.0) -> Proc:
    """SIGKILL the simulator that runs the request, ``after`` seconds after it began: it never answers."""
    busy = wait_until(lambda: next((s for s in sims if sim_stats(s)["requests_processing"]), None),
                      message="the request running")
    time.sleep(after)
    busy.kill()
    return busy


def retried(balancer: Proc) -> float:
    metrics = requests.get(balancer.extra["management"] + "/metrics", timeout=5).text
    return float(re.search(r"^paddler_requests_retried_total (\S+)$", metrics, re.M).group(1))


def test_a_request_llamacpp_never_answered_goes_to_another_server(fleet: Fleet) -> None:
    balancer, sims = two_servers(fleet, "--decode-tokens-per-second", "20")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(complete, balancer, 40)
        killed = kill_the_busy_one(sims, 0.3)
        result = answer.result(timeout=30)
    assert result.status_code == 200 and result.json()["tokens_predicted"] == 40
    survivor = next(s for s in sims if s is not killed)
    assert sim_stats(survivor)["requests_total"] == 1 and retried(balancer) == 1
    wait_until(lambda: "retried=1" in balancer.log(), message="the access line")
    assert re.search(r"failed before answering \(\w+\): quarantined for 10s, sending the request again", balancer.log())


@pytest.mark.parametrize("kill_after", [0.1, 1.0], ids=["before-the-head", "head-out-no-event"])
def test_a_stream_with_no_event_relayed_is_sent_again_invisibly(fleet: Fleet, kill_after: float) -> None:
    """Killed during prefill: before the balancer sent the head (0.5 s), or after it but before any event: the
    client gets one whole stream, from the other server."""
    balancer, sims = two_servers(fleet, "--prefill-ms-per-token", "1500", "--decode-tokens-per-second", "50")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(complete, balancer, 8, True)
        kill_the_busy_one(sims, kill_after)
        result = answer.result(timeout=30)
    assert result.status_code == 200
    events = [line for line in result.text.splitlines() if line.startswith("data: ")]
    assert len(events) == 9 and '"stop":true' in events[-1].replace(" ", "")  # 8 tokens and the final event
    assert retried(balancer) == 1


def test_a_stream_already_relaying_is_cut_visibly_not_sent_again(fleet: Fleet) -> None:
    balancer, sims = two_servers(fleet, "--decode-tokens-per-second", "10")
    with requests.post(balancer.extra["proxy"] + "/completion", stream=True, timeout=30,
                       json={"prompt": "hello", "n_predict": 40, "stream": True}) as answer:
        lines = answer.iter_lines()
        assert next(line for line in lines if line.startswith(b"data: "))
        kill_the_busy_one(sims)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in lines:
                pass
    assert retried(balancer) == 0


def test_a_request_is_sent_again_once_and_only_to_another_server(fleet: Fleet) -> None:
    with misbehaving_upstream("close") as first, misbehaving_upstream("close") as second:
        lone = fleet_behind(fleet, first)
        assert complete(lone, 1, timeout=10).status_code == 502
        assert retried(lone) == 0  # no other server: the failure is the answer
        balancer = fleet.balancer()
        sim = fleet.simulator("--parallel", "2")
        for name, port in (("bad1", first), ("bad2", second)):
            fleet.agent(sim.port, balancer.extra["management_port"], "--name", name, "--external-llamacpp-addr",
                        f"127.0.0.1:{port}", interval=INTERVAL)
        wait_until(lambda: [a["state"] for a in agents(balancer)] == ["ready", "ready"])
        assert complete(balancer, 1, timeout=10).status_code == 502
        assert retried(balancer) == 1  # the second server's hang-up is answered: no third try
