"""The balancer against real llama-server builds (tests/llamacpp_servers.py finds them): what it claims about
llama.cpp, proven.

Every test runs on each build found (b4748 from 2025 and a 2026 build) unless it names one; with none
found they skip and say why. Servers run the tiny random-weight model with one compute thread each.
Through the balancer, ``llamacpp:requests_deferred`` (requests queued inside llama.cpp) must stay 0.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import Fleet, Proc, agent_named, free_port, health, real_builds, spawn_llama_server, wait_until
from tests.llamacpp_servers import Build, DeferredSampler, busy_slots, metric

pytestmark = [pytest.mark.real_llamacpp, pytest.mark.parametrize("build", real_builds())]
INTERVAL = 0.2


def serve_llamacpp(fleet: Fleet, build: Build, models: dict[str, Path], balancer: Proc, slots: int, name: str,
          *server_args: str, model: str = "tiny", interval: float = INTERVAL, agent_args: tuple[str, ...] = ()) -> Proc:
    server = spawn_llama_server(fleet, build, models[model], "-np", str(slots), "-c", str(1024 * slots),
                                *build.slots_flags(), *server_args)
    fleet.agent(server.port, balancer.extra["management_port"], "--name", name, *agent_args, interval=interval)
    wait_until(lambda: (agent_named(balancer, name) or {}).get("state") == "ready", timeout=15,
               message=f"agent {name} ready")
    return server


def generate(base: str, n_predict: int, stream: bool = False, path: str = "/completion", timeout: float = 60,
             **extra: Any) -> requests.Response:
    body = {"prompt": "Once upon a time", "n_predict": n_predict, "ignore_eos": True, "stream": stream, **extra}
    return requests.post(base + path, json=body, timeout=timeout, stream=stream)


def read_all(response: requests.Response) -> bytes:
    return b"".join(response.iter_content(None))


def test_registers_balances_and_never_queues_inside_llamacpp(fleet: Fleet, build: Build, llamacpp_models) -> None:
    balancer = fleet.balancer()
    servers = [serve_llamacpp(fleet, build, llamacpp_models, balancer, 2, f"s{i}") for i in range(2)]
    row = agent_named(balancer, "s0")
    assert row["total_slots"] == 2 and row["slots_idle"] == 2 and row["is_slots_endpoint_enabled"] is True
    assert row["model"].endswith("tiny.gguf")
    with DeferredSampler([s.url for s in servers]) as sampler, ThreadPoolExecutor(12) as pool:
        bodies = list(pool.map(lambda i: generate(balancer.extra["proxy"], 160, stream=i % 2 == 0), range(12)))
        assert [b.status_code for b in bodies] == [200] * 12
        assert all(read_all(b) for b in bodies)
    assert sampler.samples >= 2 and sampler.peak == 0, f"requests queued inside llama.cpp: {sampler.peak}"
    served = [metric(s.url, "tokens_predicted_total") for s in servers]
    assert all(t > 0 for t in served), f"one server got nothing: {served}"


def test_agent_states_a_real_server_can_produce(fleet: Fleet, build: Build, llamacpp_models) -> None:
    balancer = fleet.balancer("--buffered-request-timeout", "1")
    keyed = spawn_llama_server(fleet, build, llamacpp_models["tiny"], "-np", "1", "--api-key", "secret",
                               *build.slots_flags())
    no_slots = spawn_llama_server(fleet, build, llamacpp_models["tiny"], "-np", "1",
                                  *(["--no-slots"] if build.modern else []))
    management = balancer.extra["management_port"]
    cases = [(keyed, (), "unauthorized", "--llamacpp-api-key"), (keyed, ("--llamacpp-api-key", "nope"),
             "unauthorized", "--llamacpp-api-key"), (no_slots, (), "slots_disabled", "--slots")]
    for i, (server, args, state, hint) in enumerate(cases):
        agent = fleet.agent(server.port, management, "--name", f"a{i}", *args, interval=INTERVAL)
        wait_until(lambda: (agent_named(balancer, f"a{i}") or {}).get("state") == state, timeout=15,  # noqa: B023
                   message=state)
        assert hint in agent_named(balancer, f"a{i}")["hint"]
        assert generate(balancer.extra["proxy"], 4).status_code == 504  # nothing is sent to it
        agent.stop()
        wait_until(lambda: agent_named(balancer, f"a{i}") is None)  # noqa: B023
    fleet.agent(keyed.port, management, "--name", "goodkey", "--llamacpp-api-key", "secret", interval=INTERVAL)
    wait_until(lambda: (agent_named(balancer, "goodkey") or {}).get("state") == "ready", timeout=15)
    assert requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "n_predict": 2},
                         headers={"Authorization": "Bearer secret"}, timeout=10).status_code == 200


def test_an_agent_sees_a_real_server_load_its_model(fleet: Fleet, build: Build, llamacpp_models) -> None:
    balancer = fleet.balancer()
    port = free_port()
    agent = fleet.agent(port, balancer.extra["management_port"], "--name", "late", interval=0.05)
    wait_until(lambda: (agent_named(balancer, "late") or {}).get("state") == "unreachable", timeout=15)
    spawn_llama_server(fleet, build, llamacpp_models["slow"], "-np", "1", "--no-mmap", *build.slots_flags(),
                       port=port, wait_healthy=False)
    wait_until(lambda: (agent_named(balancer, "late") or {}).get("state") == "ready", timeout=30)
    assert "is loading" in agent.log(), agent.log()  # the 503 'Loading model' phase was seen and named


def test_buffer_answers_504_and_429_in_front_of_a_busy_real_server(fleet: Fleet, build: Build,
                                                                     llamacpp_models) -> None:
    balancer = fleet.balancer("--max-buffered-requests", "1", "--buffered-request-timeout", "1")
    server = serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, "one", model="slow")
    with ThreadPoolExecutor(3) as pool:
        long = pool.submit(generate, balancer.extra["proxy"], 400, True)
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        waiting = pool.submit(generate, balancer.extra["proxy"], 4)
        wait_until(lambda: health(balancer)["requests_buffered"] == 1)
        refused = generate(balancer.extra["proxy"], 4)
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        assert waiting.result().status_code == 504
        long.result().close()
    assert metric(server.url, "requests_deferred") == 0


def test_a_client_leaving_frees_the_llamacpp_slot_streaming_or_not(fleet: Fleet, build: Build,
                                                                    llamacpp_models) -> None:
    """Directly, llama.cpp notices a gone client (at once when streaming, within ~1 s otherwise); through
    the balancer it must too. The agent polls every 1.5 s: llama.cpp only checks a non-streaming client
    when no other task (a /slots poll is one) woke it for a second."""
    balancer = fleet.balancer()
    server = serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, "one", model="slow", interval=1.5)
    for stream in (True, False):
        client = socket.create_connection(("127.0.0.1", balancer.extra["proxy_port"]))
        body = json.dumps({"prompt": "Once", "n_predict": 900, "ignore_eos": True, "stream": stream}).encode()
        client.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: busy_slots(server.url) == 1, timeout=10, message="generation started")
        time.sleep(0.5)
        client.close()
        time.sleep(2.0)  # no /slots poll meanwhile: each one would restart llama.cpp's one-second check
        assert busy_slots(server.url) == 0, f"the slot still generates 2 s after the client left (stream={stream})"
        wait_until(lambda: health(balancer)["requests_in_flight"] == 0, timeout=5)
        # the next request is served at once by the freed slot
        started = time.monotonic()
        assert generate(balancer.extra["proxy"], 4, timeout=10).status_code == 200
        assert time.monotonic() - started < 3
    gone = [line for line in balancer.log().splitlines() if "end=client_gone" in line]
    assert any(" 200 " in line for line in gone) and any(" 499 " in line for line in gone), gone  # stream, non-stream


def test_scale_from_zero_a_waiting_request_is_served_by_the_first_server(fleet: Fleet, build: Build,
                                                                           llamacpp_models) -> None:
    balancer = fleet.balancer("--buffered-request-timeout", "30")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(generate, balancer.extra["proxy"], 8)
        wait_until(lambda: health(balancer)["requests_buffered"] == 1)
        serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, "first")
        response = waiting.result()
    assert response.status_code == 200 and response.json()["tokens_predicted"] == 8


def test_a_server_killed_mid_stream_cuts_that_stream_only(fleet: Fleet, build: Build, llamacpp_models) -> None:
    balancer = fleet.balancer()
    doomed = serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, "doomed", model="slow")
    serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, "survivor")
    stream = generate(balancer.extra["proxy"], 900, stream=True)
    assert stream.status_code == 200
    chunks = stream.iter_content(None)
    next(chunks)
    if busy_slots(doomed.url) != 1:  # the stream went to the survivor: kill that one instead
        doomed = next(p for p in fleet.procs if p.name.startswith("llama") and p is not doomed)
    doomed.kill()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in chunks:
            pass
    wait_until(lambda: health(balancer)["requests_in_flight"] == 0, timeout=10)
    for _ in range(3):
        assert generate(balancer.extra["proxy"], 4, timeout=15).status_code == 200


def test_sigterm_lets_a_real_stream_finish(fleet: Fleet, build: Build, llamacpp_models) -> None:
    balancer = fleet.balancer("--graceful-timeout", "20")
    serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, "one", model="slow")
    stream = requests.post(balancer.extra["proxy"] + "/completion", stream=True, timeout=60,
                           headers={"Connection": "close"},  # no idle kept-alive connection for shutdown to wait on
                           json={"prompt": "Once", "n_predict": 150, "ignore_eos": True, "stream": True})
    assert stream.status_code == 200
    time.sleep(0.3)
    balancer.signal(signal.SIGTERM)
    events = [line for line in read_all(stream).split(b"\n\n") if line.startswith(b"data: ")]
    assert json.loads(events[-1][6:])["stop"] is True
    assert balancer.popen.wait(25) == 0


def test_requests_that_run_no_task_never_wait_and_tasks_never_queue(fleet: Fleet, build: Build,
                                                                     llamacpp_models) -> None:
    """The slot table (paddler_sync/proxy/upstream.py) read off the real server: with its only slot busy,
    a slot-free path answers at once and a task path waits inside llama.cpp (requests_deferred 1)."""
    from paddler_sync.proxy.upstream import uses_slot

    server = spawn_llama_server(fleet, build, llamacpp_models["slow"], "-np", "1", *build.slots_flags())
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    tasks = {"/completion": {"prompt": "hi", "n_predict": 2}, "/v1/completions": {"prompt": "hi", "max_tokens": 2},
             "/v1/chat/completions": chat, "/chat/completions": chat}
    free = {"/tokenize": {"content": "hi"}, "/detokenize": {"tokens": [1]}, "/apply-template": chat}
    if build.modern:
        tasks.update({"/v1/responses": {"input": "hi", "max_output_tokens": 2},
                      "/v1/messages": {"model": "m", "max_tokens": 2, **chat}})
        free.update({"/v1/messages/count_tokens": {"model": "m", **chat},
                     "/v1/chat/completions/input_tokens": chat, "/v1/responses/input_tokens": {"input": "hi"}})
    hog = generate(server.url, 4000, stream=True)
    wait_until(lambda: busy_slots(server.url) == 1)
    try:
        with ThreadPoolExecutor(1) as pool:
            for path, body in free.items():
                assert not uses_slot("POST", path), path
                answer = requests.post(server.url + path, json=body, timeout=2)
                assert answer.status_code == 200, (path, answer.text)
            for path, body in tasks.items():
                assert uses_slot("POST", path), path
                waiting = pool.submit(requests.post, server.url + path, json=body, timeout=60)
                wait_until(lambda: metric(server.url, "requests_deferred") == 1, timeout=20,
                           message=f"{path} queued behind the busy slot")
                assert not waiting.done()
                hog.close()  # the slot frees; the queued task runs
                assert waiting.result().status_code == 200, path
                hog = generate(server.url, 4000, stream=True)
                wait_until(lambda: busy_slots(server.url) == 1)
    finally:
        hog.close()


def test_2026_endpoints_take_slots_through_the_balancer(fleet: Fleet, build: Build, llamacpp_models) -> None:
    if not build.modern:
        pytest.skip("/v1/responses and /v1/messages exist from the 2026 builds on")
    balancer = fleet.balancer()
    servers = [serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, f"s{i}", model="slow") for i in range(2)]
    chat = [{"role": "user", "content": "hi"}]
    calls: list[Callable[[], requests.Response]] = [
        lambda: requests.post(balancer.extra["proxy"] + "/v1/responses", timeout=60, stream=True,
                              json={"input": "hi", "max_output_tokens": 24, "stream": True}),
        lambda: requests.post(balancer.extra["proxy"] + "/v1/messages", timeout=60, stream=True,
                              json={"model": "slow", "max_tokens": 24, "messages": chat, "stream": True}),
    ]
    with DeferredSampler([s.url for s in servers]) as sampler, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: calls[i % 2](), range(6)))
        texts = [read_all(a).decode() for a in answers]
    assert [a.status_code for a in answers] == [200] * 6
    assert all("event: " in t for t in texts), texts[0][:300]  # Responses and Anthropic event framing relayed
    assert sampler.peak == 0, f"requests queued inside llama.cpp: {sampler.peak}"


def test_no_502_when_llamacpp_closes_idle_connections(fleet: Fleet, build: Build, llamacpp_models) -> None:
    """llama.cpp closes a kept-alive connection after 5 s idle and (b4748) whenever a new connection waits for
    one of its few HTTP threads (-np 1: three). Requests with pauses around those moments, and an agent
    opening a connection every 50 ms, must all be answered: none may be written on a closed connection.
    (The 2026 build grows its thread pool instead; the 5 s idle close is the same, so one build suffices.)"""
    if build.modern:
        pytest.skip("b4748 shows both ways llama.cpp closes idle connections; the 2026 build only one")
    balancer = fleet.balancer("--upstream-idle-timeout", "30")  # keep idle connections past llama.cpp's 5 s
    server = serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, "one", interval=0.05)
    statuses: list[int] = []

    def client(pause: float) -> None:
        for _ in range(2):  # a new connection to the balancer each time: its own keep-alive (5 s) is not the subject
            statuses.append(requests.post(balancer.extra["proxy"] + "/completion",
                                          json={"prompt": "hi", "n_predict": 4}, timeout=30).status_code)
            requests.post(server.url + "/tokenize", json={"content": "x"}, timeout=5)  # another connection
            time.sleep(pause)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(client, [5.0, 5.02, 0.3, 1.0]))
    assert statuses == [200] * 8, statuses
    assert "failed before answering" not in balancer.log()


def test_a_sleeping_server_is_shown_and_used_only_when_awake_ones_are_full(fleet: Fleet, build: Build,
                                                                          llamacpp_models) -> None:
    """2026 builds unload the model after --sleep-idle-seconds; a /slots poll would wake them, /props does not."""
    if not build.modern:
        pytest.skip("--sleep-idle-seconds exists from the 2026 builds on")
    balancer = fleet.balancer()
    sleepy = serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, "sleepy", "--sleep-idle-seconds", "1",
                   agent_args=("--llamacpp-sleep-idle-seconds", "1"))
    serve_llamacpp(fleet, build, llamacpp_models, balancer, 1, "awake", model="slow")
    wait_until(lambda: agent_named(balancer, "sleepy")["is_sleeping"], timeout=10, message="the server asleep")
    assert "handle_sleep: server is entering sleeping state" in sleepy.log()
    assert health(balancer)["agents_sleeping"] == 1
    # one request: the awake server takes it, the sleeping one sleeps on
    assert generate(balancer.extra["proxy"], 4).status_code == 200
    assert agent_named(balancer, "sleepy")["is_sleeping"]
    # the awake server is busy: the sleeping one is woken for the next request, and serves it
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(generate, balancer.extra["proxy"], 300)
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        assert generate(balancer.extra["proxy"], 4).status_code == 200
        assert busy.result().status_code == 200
    assert "exiting sleeping state" in sleepy.log()
    wait_until(lambda: agent_named(balancer, "sleepy")["is_sleeping"], timeout=10, message="asleep again")


def test_two_balancers_sharing_the_ledger_in_redis_never_make_llamacpp_queue(fleet: Fleet, build: Build,
                                                                            llamacpp_models, redis_server) -> None:
    shared = ("--state-backend", redis_server.url, "--state-prefix", f"real-{build.name}-{time.monotonic_ns()}")
    first, second = fleet.balancer(*shared), fleet.balancer(*shared)
    servers = [serve_llamacpp(fleet, build, llamacpp_models, balancer, 2, f"s{i}")
               for i, balancer in enumerate((first, second))]
    wait_until(lambda: health(first)["slots_total"] == 4 and health(second)["slots_total"] == 4,
               message="both balancers see the whole fleet")
    with DeferredSampler([s.url for s in servers]) as sampler, ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: generate((first, second)[i % 2].extra["proxy"], 96, stream=True),
                                range(12)))
        assert all(read_all(a) for a in answers)
    assert [a.status_code for a in answers] == [200] * 12
    assert sampler.peak == 0, f"requests queued inside llama.cpp: {sampler.peak}"


def test_a_client_gets_what_llamacpp_itself_answers_for_limits_names_and_broken_json(
        fleet: Fleet, build: Build, llamacpp_models) -> None:
    """Invisible to clients: a generation limit past the context, a prompt that fits no slot and a model name the
    server ignores get llama.cpp's own answer through the balancer; a body that is not JSON gets 400 (llama.cpp
    answers 500 for the client's mistake: the one difference, on purpose)."""
    balancer = fleet.balancer("--models-discovery-time", "0")
    server = serve_llamacpp(fleet, build, llamacpp_models, balancer, 2, "ctx")  # -c 2048: 1024 tokens per slot
    proxy = balancer.extra["proxy"]
    asks = [("/completion", {"prompt": "Hello, my name is", "n_predict": 1500}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1500}),
            ("/v1/chat/completions", {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}],
                                      "max_tokens": 4}),
            ("/completion", {"prompt": "hello " * 3000, "n_predict": 4})]
    for path, body in asks:
        direct = requests.post(server.url + path, json=body, timeout=120)
        through = requests.post(proxy + path, json=body, timeout=120)
        assert (through.status_code, through.json().get("error", {}).get("type")) == \
               (direct.status_code, direct.json().get("error", {}).get("type")), (path, body, through.text[:300])
    assert requests.post(proxy + "/completion", json={"prompt": "hi", "n_predict": 1500},
                         timeout=120).status_code == 200
    broken = b'{"messages": [{"role": "user", "content": "hi"}],'
    assert requests.post(server.url + "/v1/chat/completions", data=broken, timeout=10).status_code == 500
    refused = requests.post(proxy + "/v1/chat/completions", data=broken, timeout=10)
    assert refused.status_code == 400 and "line 1, column 50" in refused.json()["error"]["message"]
    assert metric(server.url, "requests_deferred") == 0
