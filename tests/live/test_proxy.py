"""The reverse proxy with real gunicorn, agents and simulators: routing, buffering, streaming and faults."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import (
    INTERVAL,
    PYTHON,
    ROOT,
    Fleet,
    Proc,
    agent_named,
    agents,
    complete,
    fake_http,
    free_port,
    health,
    port_open,
    sim_stats,
    start_fleet,
    wait_until,
)

pytestmark = pytest.mark.both_stores  # every test with a fleet runs on both slot stores


def test_ten_long_requests_on_two_and_four_slots(fleet: Fleet) -> None:
    """No simulator ever queues internally: 6 run, 4 wait in the balancer, all 10 finish."""
    balancer, sims = start_fleet(fleet, [2, 4], "--buffered-request-timeout", "30",
                                 sim_args=("--decode-tokens-per-second", "40"))
    peak = {"buffered": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak["buffered"] = max(peak["buffered"], health(balancer)["requests_buffered"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: complete(balancer, 20), range(10)))
    stop.set()
    watcher.join()
    assert [r.status_code for r in results] == [200] * 10
    assert all(r.json()["tokens_predicted"] == 20 for r in results)
    assert peak["buffered"] == 4
    assert [sim_stats(s)["requests_deferred_total"] for s in sims] == [0, 0]
    assert sum(sim_stats(s)["requests_total"] for s in sims) == 10
    wait_until(lambda: health(balancer)["requests_in_flight"] == 0, timeout=3)


def test_requests_go_to_the_server_with_most_free_slots(fleet: Fleet) -> None:
    balancer, (small, large) = start_fleet(fleet, [1, 3], sim_args=("--decode-tokens-per-second", "20"))
    streams = [requests.post(balancer.extra["proxy"] + "/completion", stream=True, timeout=10,
                             json={"prompt": "x", "n_predict": 40, "stream": True}) for _ in range(3)]
    # 3 free on large, 1 on small: the first two go to large (3 > 1, then 2 > 1), the third ties 1-1 and
    # goes to the one with fewer in flight: small
    wait_until(lambda: sim_stats(large)["requests_processing"] == 2 and sim_stats(small)["requests_processing"] == 1,
               timeout=5)
    for stream in streams:
        stream.close()


def test_full_buffer_answers_429_with_retry_after(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [1], "--max-buffered-requests", "1",
                              sim_args=("--decode-tokens-per-second", "20"))
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(complete, balancer, 30)
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        waiting = pool.submit(complete, balancer, 1)
        wait_until(lambda: health(balancer)["requests_buffered"] == 1)
        refused = complete(balancer, 1)
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and "--max-buffered-requests" in error["message"]
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert re.search(r'"POST /completion" 429 upstream=- wait=0\.0ms .* end=queue_full', balancer.log())


def test_buffering_off_answers_429_at_once(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [1], "--max-buffered-requests", "0",
                              sim_args=("--decode-tokens-per-second", "20"))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, balancer, 20)
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        started = time.monotonic()
        assert complete(balancer, 1).status_code == 429
        assert time.monotonic() - started < 1
        assert running.result().status_code == 200


def test_waiting_too_long_answers_504(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [1], "--buffered-request-timeout", "0.5",
                              sim_args=("--decode-tokens-per-second", "10"))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, balancer, 25)
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        started = time.monotonic()
        timed_out = complete(balancer, 1)
        assert timed_out.status_code == 504 and 0.4 < time.monotonic() - started < 3
        assert "--buffered-request-timeout" in timed_out.json()["error"]["message"]
        # the timeout covers waiting only: the running 2.5 s generation is not cut
        assert running.result().status_code == 200


def test_a_request_sent_with_zero_agents_is_served_once_one_appears(fleet: Fleet) -> None:
    balancer = fleet.balancer("--buffered-request-timeout", "20")
    sim = fleet.simulator("--parallel", "1")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(complete, balancer, 3)
        wait_until(lambda: health(balancer)["requests_buffered"] == 1)
        fleet.agent(sim.port, balancer.extra["management_port"], interval=INTERVAL)
        response = pending.result(timeout=15)
    assert response.status_code == 200 and response.json()["tokens_predicted"] == 3


def test_requests_without_a_slot_never_wait_behind_generation(fleet: Fleet) -> None:
    balancer, (sim,) = start_fleet(fleet, [1], sim_args=("--decode-tokens-per-second", "10"))
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(complete, balancer, 20)
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        waiting = pool.submit(complete, balancer, 1)
        wait_until(lambda: health(balancer)["requests_buffered"] == 1)
        for path in ("/health", "/v1/models", "/props"):
            started = time.monotonic()
            assert requests.get(balancer.extra["proxy"] + path, timeout=5).status_code == 200
            assert time.monotonic() - started < 0.5
        assert requests.post(balancer.extra["proxy"] + "/tokenize", json={"content": "hi"}, timeout=5).ok
        running.result()
        waiting.result()
    assert sim_stats(sim)["requests_deferred_total"] == 0


def test_client_disconnect_mid_stream_frees_the_slot_everywhere_within_a_second(fleet: Fleet) -> None:
    balancer, (sim,) = start_fleet(fleet, [1], sim_args=("--decode-tokens-per-second", "50"))
    sock = socket.create_connection(("127.0.0.1", balancer.extra["proxy_port"]))
    body = json.dumps({"prompt": "x", "n_predict": 2000, "stream": True})
    sock.sendall(f"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    assert b"200 OK" in sock.recv(65536)
    wait_until(lambda: sim_stats(sim)["requests_processing"] == 1)
    closed = time.monotonic()
    sock.close()
    wait_until(lambda: health(balancer)["requests_in_flight"] == 0 and sim_stats(sim)["requests_processing"] == 0,
               timeout=2, interval=0.02)
    assert time.monotonic() - closed < 1.0


def test_a_slot_whose_client_left_mid_stream_is_not_given_to_a_waiter_before_llamacpp_frees_it(fleet: Fleet) -> None:
    """llama.cpp notices a closed stream only when it writes its next token (here 200 ms away): the slot stays
    counted busy until a report shows it free, so the request waiting for it never waits inside llama.cpp."""
    balancer, (sim,) = start_fleet(fleet, [1], sim_args=("--decode-tokens-per-second", "5"))
    sock = socket.create_connection(("127.0.0.1", balancer.extra["proxy_port"]))
    body = json.dumps({"prompt": "x", "n_predict": 200, "stream": True})
    sock.sendall(f"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    assert b"200 OK" in sock.recv(65536)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(complete, balancer, 2)
        wait_until(lambda: health(balancer)["requests_buffered"] == 1, message="a request waiting for the slot")
        sock.close()
        assert waiting.result(timeout=20).status_code == 200
    assert sim_stats(sim)["requests_deferred_total"] == 0


def test_a_client_that_leaves_while_waiting_takes_nothing(fleet: Fleet) -> None:
    balancer, (sim,) = start_fleet(fleet, [1], sim_args=("--decode-tokens-per-second", "20"))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, balancer, 30)
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        sock = socket.create_connection(("127.0.0.1", balancer.extra["proxy_port"]))
        body = json.dumps({"prompt": "x", "n_predict": 5})
        sock.sendall(f"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        wait_until(lambda: health(balancer)["requests_buffered"] == 1)
        time.sleep(0.2)
        sock.close()
        wait_until(lambda: health(balancer)["requests_buffered"] == 0, timeout=2)
        running.result()
    time.sleep(0.3)
    assert sim_stats(sim)["requests_total"] == 1  # the abandoned request never reached llama.cpp
    left = re.search(r'"POST /completion" 499 upstream=- wait=([\d.]+)ms .* end=client_gone', balancer.log())
    assert left and float(left.group(1)) >= 200  # its wait is recorded, as long as it was


@pytest.mark.ledger_agnostic
def test_sse_events_arrive_one_by_one_with_their_spacing(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [1], sim_args=("--decode-tokens-per-second", "20"))
    arrivals = []
    with requests.post(balancer.extra["proxy"] + "/completion", stream=True, timeout=10,
                       json={"prompt": "x", "n_predict": 10, "stream": True}) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["X-Accel-Buffering"] == "no"
        for chunk in response.raw.read_chunked():
            arrivals.append((time.monotonic(), chunk))
    events = [c for _, c in arrivals if c.startswith(b"data: ")]
    assert sum(c.count(b"data: ") for c in events) == 11
    # each event is passed on as soon as it arrives: only events that came in one read (the last token and
    # [DONE], written back to back) may share a chunk
    assert len(events) >= 10
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals[:9])]
    assert all(0.02 < gap < 0.2 for gap in gaps), gaps  # ~50 ms apart, as llama.cpp sent them


@pytest.mark.ledger_agnostic
def test_slots_endpoint_blocked_then_allowed(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [2])
    blocked = requests.get(balancer.extra["proxy"] + "/slots", timeout=5)
    assert blocked.status_code == 403 and "--slots-endpoint-enable" in blocked.json()["error"]["message"]
    assert requests.get(balancer.extra["proxy"] + "/slots/0?action=save", timeout=5).status_code == 403
    allowing, _ = start_fleet(fleet, [2], "--slots-endpoint-enable")
    allowed = requests.get(allowing.extra["proxy"] + "/slots", timeout=5)
    assert allowed.status_code == 200 and len(allowed.json()) == 2


def _echo_upstream() -> dict:
    slots = json.dumps([{"id": 0, "is_processing": False}])
    return {("GET", "/slots"): (200, slots), ("GET", "/props"): (200, "{}"),
            ("POST", "/completion"): (200, '{"content": "ok"}')}


@pytest.mark.ledger_agnostic
def test_headers_host_kept_or_rewritten_forwarded_for_and_hop_by_hop(fleet: Fleet) -> None:
    for rewrite in (False, True):
        balancer = fleet.balancer(*(["--rewrite-host-header"] if rewrite else []))
        with fake_http(_echo_upstream()) as (port, seen):
            fleet.agent(port, balancer.extra["management_port"], "--name", "echo", interval=INTERVAL)
            wait_until(lambda b=balancer: (a := agent_named(b, "echo")) and a["state"] == "ready")
            response = requests.post(balancer.extra["proxy"] + "/completion", data=b'{"prompt":"x"}',
                                     headers={"Host": "public.example", "Authorization": "Bearer user-key",
                                              "Connection": "close, X-Secret-Hop", "X-Secret-Hop": "1",
                                              "Content-Type": "application/json"}, timeout=5)
            assert response.status_code == 200 and response.json() == {"content": "ok"}
            headers = next(h for m, p, h in seen if p == "/completion")
        expected_host = f"127.0.0.1:{port}" if rewrite else "public.example"
        assert headers["Host"] == expected_host
        assert headers["Authorization"] == "Bearer user-key"
        assert headers["X-Forwarded-For"] == "127.0.0.1" and headers["X-Forwarded-Proto"] == "http"
        assert "X-Secret-Hop" not in headers and headers.get("Connection") != "close, X-Secret-Hop"


@pytest.mark.ledger_agnostic
def test_client_authorization_reaches_llamacpp_untouched(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    sim = fleet.simulator("--api-key", "secret")
    fleet.agent(sim.port, balancer.extra["management_port"], "--llamacpp-api-key", "secret", interval=INTERVAL)
    wait_until(lambda: agents(balancer) and agents(balancer)[0]["state"] == "ready")
    url = balancer.extra["proxy"] + "/completion"
    assert requests.post(url, json={"prompt": "x", "n_predict": 1}, timeout=5).status_code == 401
    ok = requests.post(url, json={"prompt": "x", "n_predict": 1}, headers={"Authorization": "Bearer secret"},
                       timeout=5)
    assert ok.status_code == 200


@pytest.mark.ledger_agnostic
def test_oversized_body_is_413(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [1], "--max-request-body", "1k")
    response = requests.post(balancer.extra["proxy"] + "/completion", data=b"x" * 5000, timeout=5)
    assert response.status_code == 413 and "--max-request-body" in response.json()["error"]["message"]
    chunked = requests.post(balancer.extra["proxy"] + "/completion", data=iter([b"x" * 800, b"y" * 800]), timeout=5)
    assert chunked.status_code == 413


def test_upstream_killed_mid_stream_ends_the_response_and_frees_the_slot(fleet: Fleet) -> None:
    balancer, (sim,) = start_fleet(fleet, [1], sim_args=("--decode-tokens-per-second", "20"))
    response = requests.post(balancer.extra["proxy"] + "/completion", stream=True, timeout=10,
                             json={"prompt": "x", "n_predict": 1000, "stream": True})
    lines = response.iter_lines()
    assert next(lines).startswith(b"data: ")
    sim.kill()
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in lines:
            pass
    assert time.monotonic() - started < 5
    wait_until(lambda: health(balancer)["requests_in_flight"] == 0, timeout=3)
    assert "broke off the response" in balancer.log()


def test_a_server_refusing_connections_is_quarantined_and_the_request_served_elsewhere(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    good = fleet.simulator("--parallel", "1")
    watched = fleet.simulator("--parallel", "4")
    dead_port = free_port()
    # the agent watches a live server but reports an address where nothing listens
    fleet.agent(watched.port, balancer.extra["management_port"], "--name", "dead",
                "--external-llamacpp-addr", f"127.0.0.1:{dead_port}", interval=5)
    fleet.agent(good.port, balancer.extra["management_port"], "--name", "good", interval=INTERVAL)
    wait_until(lambda: len(agents(balancer)) == 2)
    response = complete(balancer, 2)  # "dead" has the most free slots, so it is tried first
    assert response.status_code == 200
    assert sim_stats(good)["requests_total"] == 1
    dead = agent_named(balancer, "dead")
    assert dead["state"] == "quarantined" and dead["quarantined_until"] is not None and dead["slots_idle"] == 0
    assert f"quarantined llama.cpp at 127.0.0.1:{dead_port}" in balancer.log()


def _gunicorn(fleet: Fleet, args: list[str], env: dict[str, str], port: int | None, name: str = "gunicorn") -> Proc:
    gunicorn = str(Path(PYTHON).parent / "gunicorn")
    return fleet.spawn(name, [gunicorn, *args], port, env={**env, "PYTHONPATH": str(ROOT)}, wait_port=port is not None,
                       cwd=ROOT)  # as from the checkout: gunicorn reads its gunicorn.conf.py by itself


@pytest.mark.ledger_agnostic
def test_bare_gunicorn_command_serves_proxy_and_management(fleet: Fleet) -> None:
    proxy, management = free_port(), free_port()
    proc = fleet.spawn("gunicorn", [str(Path(PYTHON).parent / "gunicorn"), "-k", "gevent", "-b",
                                    f"127.0.0.1:{proxy}", "wsgi:balancer"],
                       management, env={"PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{management}",
                                        "PADDLER_REVERSEPROXY_ADDR": "127.0.0.1:1", "HOME": str(fleet.workdir),
                                        "XDG_RUNTIME_DIR": ""}, cwd=ROOT)  # as a user in the project's folder
    wait_until(lambda: port_open(proxy))
    sim = fleet.simulator("--parallel", "2")
    fleet.agent(sim.port, management, interval=INTERVAL)
    wait_until(lambda: requests.get(f"http://127.0.0.1:{management}/health", timeout=5).json()["slots_idle"] == 2)
    response = requests.post(f"http://127.0.0.1:{proxy}/completion", json={"prompt": "x", "n_predict": 2}, timeout=5)
    assert response.status_code == 200
    assert "the proxy serves on gunicorn's bind" in proc.log()  # -b and an explicit --reverseproxy-addr disagree
    # started in the project's folder, gunicorn reads its gunicorn.conf.py: our hooks, no control socket
    assert "Control socket" not in proc.log() and "without paddler_sync's gunicorn settings" not in proc.log()


@pytest.mark.ledger_agnostic
def test_gunicorn_without_our_settings_says_what_goes_unchecked(fleet: Fleet, tmp_path: Path) -> None:
    app_dir = tmp_path / "elsewhere"  # no gunicorn.conf.py here: gunicorn starts with its own defaults
    app_dir.mkdir()
    (app_dir / "wsgi.py").write_text((ROOT / "wsgi.py").read_text())
    proxy, management = free_port(), free_port()
    proc = fleet.spawn("gunicorn", [str(Path(PYTHON).parent / "gunicorn"), "-k", "gevent", "-b", f"127.0.0.1:{proxy}",
                                    "--chdir", str(app_dir), "wsgi:balancer"], management,
                       env={"PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{management}", "HOME": str(tmp_path),
                            "XDG_RUNTIME_DIR": ""}, cwd=app_dir)
    assert requests.get(f"http://127.0.0.1:{management}/health", timeout=5).json()["status"] == "ok"
    log = proc.log()
    assert "without paddler_sync's gunicorn settings" in log and "-c python:paddler_sync.gunicorn_conf" in log


@pytest.mark.ledger_agnostic
def test_gunicorn_with_the_config_file(fleet: Fleet) -> None:
    proxy, management = free_port(), free_port()
    env = {"PADDLER_REVERSEPROXY_ADDR": f"127.0.0.1:{proxy}", "PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{management}"}
    proc = _gunicorn(fleet, ["-c", str(ROOT / "conf" / "gunicorn.conf.py"), "--chdir", str(ROOT), "wsgi:balancer"],
                     env, management)
    wait_until(lambda: port_open(proxy))
    assert requests.get(f"http://127.0.0.1:{management}/health", timeout=5).json()["status"] == "ok"
    assert "gunicorn's bind" not in proc.log()


@pytest.mark.ledger_agnostic
def test_gunicorn_with_two_workers_refuses_to_start(fleet: Fleet) -> None:
    proxy, management = free_port(), free_port()
    proc = _gunicorn(fleet, ["-k", "gevent", "-w", "2", "-b", f"127.0.0.1:{proxy}", "--no-control-socket",
                             "--chdir", str(ROOT), "wsgi:balancer"],
                     {"PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{management}"}, None)
    proc.popen.wait(30)
    assert proc.popen.returncode != 0
    assert "refusing to start: gunicorn runs 2 workers" in proc.log()


@pytest.mark.ledger_agnostic
def test_gunicorn_refuses_a_bad_setting_without_respawning(fleet: Fleet) -> None:
    proc = _gunicorn(fleet, ["-k", "gevent", "-b", f"127.0.0.1:{free_port()}", "--no-control-socket",
                             "--chdir", str(ROOT), "wsgi:balancer"], {"PADDLER_MAX_BUFFERED_REQUESTS": "lots"}, None)
    proc.popen.wait(30)
    assert proc.popen.returncode != 0
    assert "PADDLER_MAX_BUFFERED_REQUESTS" in proc.log() and "'lots'" in proc.log()


@pytest.mark.ledger_agnostic
def test_procfile_web_command_starts_quietly_with_its_management_path(fleet: Fleet) -> None:
    """As a platform runs it: the line through a shell, from the app's root, with $PORT and the venv on PATH."""
    line = (ROOT / "Procfile").read_text().splitlines()[0]
    assert line.startswith("web: ")
    port, management = free_port(), free_port()
    proc = fleet.spawn("procfile", ["bash", "-c", line[len("web: "):]], port, cwd=ROOT,
                       env={"PORT": str(port), "PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{management}",
                            "PADDLER_MANAGEMENT_TOKEN": "s3cret",
                            "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}"})
    wait_until(lambda: port_open(management))
    public = f"http://127.0.0.1:{port}"
    response = requests.get(public + "/props", timeout=5)
    assert response.status_code == 503 and response.json()["error"]["type"] == "unavailable_error"
    assert requests.get(public + "/_paddler/health", timeout=5).json()["status"] == "ok"
    assert requests.get(public + "/_paddler/api/v1/agents", timeout=5).status_code == 401
    assert requests.get(public + "/_paddler/api/v1/agents", headers={"Authorization": "Bearer s3cret"},
                        timeout=5).json() == {"agents": []}
    log = proc.log()
    assert "WARNING" not in log and "Control socket" not in log, log  # the conf turns gunicorn's control socket off


@pytest.mark.ledger_agnostic
def test_the_management_path_on_the_public_port_is_closed_without_a_token(fleet: Fleet) -> None:
    balancer = fleet.balancer("--management-path-prefix", "/_paddler")
    assert requests.get(balancer.extra["proxy"] + "/_paddler/health", timeout=5).json()["status"] == "ok"
    closed = requests.get(balancer.extra["proxy"] + "/_paddler/api/v1/agents", timeout=5)
    assert closed.status_code == 403 and "PADDLER_MANAGEMENT_TOKEN" in closed.json()["error"]["message"]
    assert "stays closed (403) until you set --management-token" in balancer.log()


@pytest.mark.ledger_agnostic
def test_a_taken_proxy_or_management_port_is_named_at_once(fleet: Fleet) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        started = time.monotonic()
        proxy = fleet.spawn("taken-proxy", [PYTHON, "-m", "paddler_sync", "balancer", "--reverseproxy-addr",
                                            f"127.0.0.1:{taken}", "--management-addr", f"127.0.0.1:{free_port()}"])
        assert proxy.popen.wait(20) != 0 and time.monotonic() - started < 4  # gunicorn alone retries for 5 s
        assert (f"cannot listen on 127.0.0.1:{taken} for the reverse proxy: Address already in use" in proxy.log()
                and "--reverseproxy-addr" in proxy.log())
        management = fleet.spawn("taken-management", [PYTHON, "-m", "paddler_sync", "balancer",
                                                      "--reverseproxy-addr", f"127.0.0.1:{free_port()}",
                                                      "--management-addr", f"127.0.0.1:{taken}"])
        assert management.popen.wait(20) != 0
    assert "choose another address with --management-addr" in management.log()
    assert "more than one worker" not in management.log()


@pytest.mark.ledger_agnostic
def test_management_api_under_a_prefix_of_the_proxy_port(fleet: Fleet) -> None:
    balancer = fleet.balancer("--management-path-prefix", "/_paddler", "--management-token", "s3cret")
    sim = fleet.simulator("--parallel", "2")
    fleet.spawn("agent", [PYTHON, "-m", "paddler_sync", "agent", "--local-llamacpp-addr", f"127.0.0.1:{sim.port}",
                          "--management-addr", f"127.0.0.1:{balancer.extra['proxy_port']}",
                          "--management-path-prefix", "/_paddler", "--monitoring-interval", "0.2"],
                env={"PADDLER_MANAGEMENT_TOKEN": "s3cret"})
    via_proxy = balancer.extra["proxy"] + "/_paddler/api/v1/agents"
    assert requests.get(via_proxy, timeout=5).status_code == 401
    wait_until(lambda: len(requests.get(via_proxy, headers={"Authorization": "Bearer s3cret"},
                                        timeout=5).json()["agents"]) == 1)
    assert requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "n_predict": 1},
                         timeout=5).status_code == 200


@pytest.mark.ledger_agnostic
def test_balancer_stops_cleanly_on_sigterm(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    balancer.signal(signal.SIGTERM)
    assert balancer.popen.wait(15) == 0


@pytest.mark.ledger_agnostic
def test_an_upstream_that_stalls_mid_stream_is_cut_after_the_read_timeout(fleet: Fleet) -> None:
    balancer, (sim,) = start_fleet(fleet, [1], "--upstream-read-timeout", "1",
                                   sim_args=("--decode-tokens-per-second", "20"))
    response = requests.post(balancer.extra["proxy"] + "/completion", stream=True, timeout=10,
                             json={"prompt": "x", "n_predict": 1000, "stream": True})
    lines = response.iter_lines()
    assert next(lines).startswith(b"data: ")
    sim.signal(signal.SIGSTOP)  # the server hangs, its connection stays open
    try:
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in lines:
                pass
        assert 0.8 < time.monotonic() - started < 5
        assert health(balancer)["requests_in_flight"] == 0
    finally:
        sim.signal(signal.SIGCONT)
