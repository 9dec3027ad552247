"""A guarded management plane, graceful shutdown, and hostile reports."""

from __future__ import annotations

import http.client
import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddler_sync.balancer import Balancer
from paddler_sync.settings import parse_settings
from tests.helpers import (
    PYTHON,
    ROOT,
    Fleet,
    agents,
    complete,
    free_port,
    good_report,
    health,
    port_open,
    start_fleet,
    wait_until,
)


def test_token_guards_reports_api_metrics_and_dashboard(fleet: Fleet) -> None:
    balancer = fleet.balancer("--management-token", "s3cret", "--management-read-token", "look",
                              "--management-dashboard-enable")
    management = balancer.extra["management"]
    sim = fleet.simulator()
    tokenless = fleet.agent(sim.port, balancer.extra["management_port"], "--name", "tokenless", interval=0.2)
    wait_until(lambda: "refused the report (HTTP 401)" in tokenless.log())
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "good", "--management-token", "s3cret",
                interval=0.2)
    read = {"Authorization": "Bearer look"}
    wait_until(lambda: len(requests.get(management + "/api/v1/agents", headers=read, timeout=5).json()["agents"]) == 1)

    assert requests.get(management + "/api/v1/agents", timeout=5).status_code == 401
    assert requests.get(management + "/api/v1/agents", headers={"Authorization": "Bearer nope"},
                        timeout=5).status_code == 401
    assert requests.get(management + "/metrics", timeout=5).status_code == 401
    assert requests.get(management + "/metrics", headers=read, timeout=5).status_code == 200
    assert requests.get(management + "/health", timeout=5).status_code == 200  # load balancers' health checks
    report = requests.post(management + "/api/v1/agents/x1/report", json=good_report(), headers=read, timeout=5)
    assert report.status_code == 401  # the read-only token cannot register a server
    assert report.json()["error"]["type"] == "authentication_error"
    assert requests.get(management + "/dashboard", timeout=5).status_code == 401
    page = requests.get(management + "/dashboard?token=look", timeout=5)
    assert page.status_code == 200 and "/dashboard/fleet?token=look" in page.text
    assert requests.get(management + "/dashboard/fleet?token=look", timeout=5).status_code == 200


def test_warns_when_the_management_address_is_open_without_a_token(fleet: Fleet) -> None:
    port = free_port()
    balancer = fleet.spawn("balancer", [PYTHON, "-m", "paddler_sync", "balancer", "--reverseproxy-addr",
                                        f"127.0.0.1:{free_port()}", "--management-addr", f"0.0.0.0:{port}"], port)
    wait_until(lambda: "has no --management-token" in balancer.log())
    quiet = fleet.balancer()
    requests.get(quiet.extra["proxy"] + "/v1/models", timeout=5)  # logged after every start-up line
    wait_until(lambda: '"GET /v1/models"' in quiet.log(), message="the start-up logged, and a request after it")
    assert "has no --management-token" not in quiet.log()


def test_reports_outside_the_allowed_networks_are_refused(fleet: Fleet) -> None:
    balancer = fleet.balancer("--agent-allowed-networks", "10.0.0.0/8")
    sim = fleet.simulator()
    agent = fleet.agent(sim.port, balancer.extra["management_port"], interval=0.2)
    wait_until(lambda: "HTTP 403" in agent.log() and "outside --agent-allowed-networks" in agent.log())
    assert agents(balancer) == []
    allowed = fleet.balancer("--agent-allowed-networks", "127.0.0.0/8,::1/128")
    fleet.agent(sim.port, allowed.extra["management_port"], interval=0.2)
    wait_until(lambda: len(agents(allowed)) == 1)


def _graceful_shutdown(fleet: Fleet, balancer) -> None:
    """One request streams, one waits; SIGTERM: the stream finishes, then the waiting one gets its slot."""
    sim = fleet.simulator("--parallel", "1", "--decode-tokens-per-second", "20")
    fleet.agent(sim.port, balancer.extra["management_port"], interval=0.2)
    wait_until(lambda: health(balancer)["agents_ready"] == 1)
    streamed: dict[str, Any] = {}

    def stream() -> None:
        with requests.post(balancer.extra["proxy"] + "/completion", stream=True, timeout=30,
                           json={"prompt": "x", "n_predict": 40, "stream": True}) as response:
            streamed["events"] = sum(1 for line in response.iter_lines() if line.startswith(b"data: "))

    running = threading.Thread(target=stream)
    running.start()
    wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
    waiting: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: waiting.update(response=complete(balancer, 1)))
    waiter.start()
    wait_until(lambda: health(balancer)["requests_buffered"] == 1)
    balancer.signal(signal.SIGTERM)
    waiter.join(20)
    assert waiting["response"].status_code == 200  # accepted before the stop: served, not refused
    running.join(20)
    assert streamed["events"] == 41  # 40 tokens and the final event: the stream was not cut
    assert balancer.popen.wait(20) == 0


def test_graceful_shutdown_with_paddler_sync_balancer(fleet: Fleet) -> None:
    _graceful_shutdown(fleet, fleet.balancer())


def test_graceful_shutdown_with_gunicorn(fleet: Fleet) -> None:
    proxy, management = free_port(), free_port()
    proc = fleet.spawn("gunicorn", [str(Path(PYTHON).parent / "gunicorn"), "-k", "gevent", "-b", f"127.0.0.1:{proxy}",
                                    "wsgi:balancer"], management,
                       env={"PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{management}"}, cwd=ROOT)  # reads gunicorn.conf.py
    wait_until(lambda: port_open(proxy))
    proc.extra.update(proxy=f"http://127.0.0.1:{proxy}", management=f"http://127.0.0.1:{management}",
                      management_port=management)
    _graceful_shutdown(fleet, proc)


def test_a_request_on_a_kept_alive_connection_after_shutdown_began_is_served(fleet: Fleet) -> None:
    """The listener closes at SIGTERM, so a new request can only come on a kept-alive connection: the balancer
    accepted it, so it serves it (and closes the connection after), while the request in flight finishes."""
    balancer, _ = start_fleet(fleet, [2], "--graceful-timeout", "5", sim_args=("--decode-tokens-per-second", "10"))
    kept = http.client.HTTPConnection("127.0.0.1", balancer.extra["proxy_port"], timeout=10)
    body = json.dumps({"prompt": "x", "n_predict": 1})
    kept.request("POST", "/completion", body, {"Content-Type": "application/json"})
    first = kept.getresponse()
    assert first.status == 200 and first.read()
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(complete, balancer, 30)
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        balancer.signal(signal.SIGTERM)
        wait_until(lambda: requests.get(balancer.extra["management"] + "/health", timeout=5).status_code == 503)
        kept.request("POST", "/completion", body, {"Content-Type": "application/json"})
        served = kept.getresponse()
        assert served.status == 200 and json.loads(served.read())["content"]
        assert served.getheader("Connection", "").lower() == "close"
        assert holder.result().status_code == 200


def test_requests_still_waiting_when_the_graceful_time_ends_get_503_before_the_stop(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [1], "--graceful-timeout", "3", sim_args=("--decode-tokens-per-second", "5"))
    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(complete, balancer, 25)  # 5 s: longer than the graceful time
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        waiter = pool.submit(complete, balancer, 1)
        wait_until(lambda: health(balancer)["requests_buffered"] == 1)
        stopped = time.monotonic()
        balancer.signal(signal.SIGTERM)
        refused = waiter.result(timeout=10)
        refused_at = time.monotonic()
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        with pytest.raises(requests.ConnectionError):  # past the graceful time, what still runs is cut
            holder.result(timeout=10)
        cut_at = time.monotonic()
    assert refused_at - stopped > 1.5  # it waited for a slot while the graceful time allowed
    assert refused_at < cut_at  # and got its 503 before gunicorn cut what still ran (a second before, unloaded)
    assert re.search(r'"POST /completion" 503 upstream=- .* end=shutting_down', balancer.log())


# --- hostile reports -------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=8)
FIELDS = list(good_report())


def fuzz_client():
    balancer = Balancer(parse_settings("balancer", args=[], config_files=[]))
    return balancer.management.test_client()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from([*FIELDS, "extra"]), JSON_VALUES, max_size=4),
       agent_id=st.text(min_size=1, max_size=80).filter(lambda s: "/" not in s and s not in (".", "..")))
def test_fuzzed_reports_never_crash_the_management_server(changes: dict[str, Any], agent_id: str) -> None:
    client = fuzz_client()
    response = client.post(f"/api/v1/agents/{requests.utils.quote(agent_id, safe='')}/report",
                           data=json.dumps(good_report(**changes), allow_nan=True), content_type="application/json")
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        assert response.get_json()["error"]["message"]


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=2048))
def test_random_bytes_are_a_clear_4xx(body: bytes) -> None:
    response = fuzz_client().post("/api/v1/agents/a/report", data=body, content_type="application/json")
    assert 400 <= response.status_code < 500 and response.get_json()["error"]["message"]


def test_a_body_that_is_not_json_gets_400_naming_where_it_broke_and_never_reaches_llamacpp(fleet: Fleet) -> None:
    """llama.cpp answers 500 server_error for a client's broken JSON; the balancer reads these bodies anyway."""
    balancer, [sim] = start_fleet(fleet, [1])
    proxy = balancer.extra["proxy"]
    cut = requests.post(proxy + "/v1/chat/completions", data=b'{"messages": [{"role": "user", "content": "hi"}],',
                        headers={"Content-Type": "application/json"}, timeout=5)
    error = cut.json()["error"]
    assert cut.status_code == 400 and error["type"] == "invalid_request_error"
    assert "not valid JSON" in error["message"] and "line 1, column 50" in error["message"]
    empty = requests.post(proxy + "/completion", data=b"", timeout=5)
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    form_typed = requests.post(proxy + "/completion", data=b'{"prompt": "hi", "n_predict": 2}', timeout=5,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})  # as curl -d sends
    assert form_typed.status_code == 200  # llama.cpp reads JSON whatever the type says
    tokenize = requests.post(proxy + "/tokenize", data=b'{"content": ', timeout=5)  # no slot: llama.cpp's own answer
    assert tokenize.status_code == 500
    assert requests.get(balancer.extra["proxy"] + "/health", timeout=5).status_code == 200
    stats = requests.get(sim.url + "/simulator/stats", timeout=5).json()
    assert stats["requests_total"] == 1  # only the well-formed completion
    assert balancer.log().count("end=bad_json") == 2
    assert health(balancer)["requests_in_flight"] == 0
