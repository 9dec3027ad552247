"""StatsD (a real UDP listener), Prometheus /metrics, and the logs an operator reads."""

from __future__ import annotations

import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import Fleet, Proc, agents, complete, health, start_fleet, wait_until


class UdpListener:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []

    def drain(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.lines.extend(data.decode().splitlines())
        return self.lines


@pytest.fixture
def udp() -> UdpListener:
    listener = UdpListener()
    yield listener
    listener.sock.close()


def values(lines: list[str], name: str, kind: str) -> list[float]:
    return [float(m.group(1)) for line in lines if (m := re.fullmatch(rf"{re.escape(name)}:([-\d.]+)\|{kind}", line))]


def test_statsd_gauges_counters_and_timings(fleet: Fleet, udp: UdpListener) -> None:
    balancer, _ = start_fleet(fleet, [1, 2], "--statsd-addr", f"127.0.0.1:{udp.port}",
                              "--statsd-reporting-interval", "0.2", "--max-buffered-requests", "0",
                              sim_args=("--decode-tokens-per-second", "50"))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: complete(balancer, 10).status_code, range(4)))
    assert sorted(results) == [200, 200, 200, 429]  # 3 slots, no buffering
    lines = udp.drain(1.0)
    assert values(lines, "paddler.slots_idle", "g")[-1] == 3
    assert values(lines, "paddler.slots_processing", "g")[-1] == 0
    assert values(lines, "paddler.requests_buffered", "g")[-1] == 0
    assert values(lines, "paddler.models.models_simulated_gguf.slots_idle", "g")[-1] == 3  # per model, too
    assert values(lines, "paddler.models.models_simulated_gguf.slots_total", "g")[-1] == 3
    assert sum(values(lines, "paddler.requests_served", "c")) == 3
    assert sum(values(lines, "paddler.requests_rejected", "c")) == 1
    assert len(values(lines, "paddler.queue_wait", "ms")) == 4
    assert len(values(lines, "paddler.request_duration", "ms")) == 4
    ttfb = values(lines, "paddler.time_to_first_byte", "ms")
    assert len(ttfb) == 3 and all(v > 100 for v in ttfb)  # 10 tokens at 50/s come before the one JSON body


def test_statsd_gauges_follow_waiting_requests_and_prefix(fleet: Fleet, udp: UdpListener) -> None:
    balancer, _ = start_fleet(fleet, [1], "--statsd-addr", f"127.0.0.1:{udp.port}", "--statsd-prefix", "llm",
                              "--statsd-reporting-interval", "0.2", sim_args=("--decode-tokens-per-second", "10"))
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(complete, balancer, 10) for _ in range(3)]
        wait_until(lambda: health(balancer)["requests_buffered"] == 2)
        lines = udp.drain(0.6)
        assert 2 in values(lines, "llm.requests_buffered", "g")
        assert 1 in values(lines, "llm.slots_processing", "g")
        assert not [line for line in lines if line.startswith("paddler.")]
        assert [f.result().status_code for f in futures] == [200] * 3


def test_an_unresolvable_statsd_address_never_breaks_serving(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [1], "--statsd-addr", "statsd.invalid:8125", "--statsd-reporting-interval", "0.1")
    assert complete(balancer, 2).status_code == 200
    time.sleep(0.5)
    assert balancer.log().count("StatsD address statsd.invalid:8125 cannot be used") == 1


def scrape(balancer: Proc) -> str:
    response = requests.get(balancer.extra["management"] + "/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return response.text


def test_prometheus_metrics(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [2], "--buffered-request-timeout", "0.3",
                              sim_args=("--decode-tokens-per-second", "20"))
    agent_id = agents(balancer)[0]["agent_id"]
    with ThreadPoolExecutor(3) as pool:
        codes = sorted(pool.map(lambda _: complete(balancer, 20).status_code, range(3)))
    assert codes == [200, 200, 504]
    text = scrape(balancer)
    assert 'paddler_requests_total{outcome="served"} 2.0' in text
    assert 'paddler_requests_total{outcome="timed_out"} 1.0' in text
    assert re.search(r"^paddler_queue_wait_seconds_count 3\.0$", text, re.M)
    # the timed-out request waited longest of all, and is counted so: not as a request that never waited
    assert re.search(r'^paddler_queue_wait_seconds_bucket\{le="0\.25"\} 2\.0$', text, re.M)
    assert re.search(r'^paddler_queue_wait_seconds_bucket\{le="0\.5"\} 3\.0$', text, re.M)
    timed_out = re.search(r'"POST /completion" 504 upstream=- wait=([\d.]+)ms ttfb=- duration=[\d.]+ms '
                          r'bytes=(\d+) end=timed_out', balancer.log())
    assert timed_out and float(timed_out.group(1)) >= 290 and int(timed_out.group(2)) > 50
    # the dashboards' figures: tokens from llama.cpp's own counts, errors by kind, the long wait
    chat = requests.post(balancer.extra["proxy"] + "/v1/chat/completions", timeout=10, stream=True,
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "stream": True})
    assert chat.status_code == 200 and b"[DONE]" in chat.content
    traffic = wait_until(lambda: (t := requests.get(balancer.extra["management"] + "/api/v1/traffic",
                                                    timeout=5).json())["fleet"]["requests"] == 4 and t)
    fleet_figures = traffic["fleet"]
    assert fleet_figures["tokens"] == 2 * 20 + 7 and fleet_figures["errors"] == {"timed_out": 1}
    assert fleet_figures["queue_wait_p95_seconds"] >= 0.3
    assert fleet_figures["ttft_p50_seconds"] is not None  # the one streamed answer (non-streamed ones have none)
    (server,) = traffic["servers"]
    assert server["agent_name"] == "s0" and server["requests"] == 3 and server["errors"] == {}
    assert traffic["time_zone"] == "UTC" and len(traffic["series"]) == 300
    assert requests.get(balancer.extra["management"] + "/api/v1/traffic?range=1h", timeout=5).json()[
        "step_seconds"] == 12
    bad = requests.get(balancer.extra["management"] + "/api/v1/traffic?range=1d", timeout=5)
    assert bad.status_code == 400 and "5m, 1h" in bad.json()["error"]["message"]
    assert re.search(r"^paddler_time_to_first_byte_seconds_count 2\.0$", text, re.M)
    assert "paddler_request_duration_seconds_bucket" in text
    assert re.search(rf'^paddler_agent_slots_idle{{addr="[^"]+",agent_id="{agent_id}",agent_name="s0"}} 2\.0$',
                     text, re.M)
    assert re.search(r"^paddler_slots_idle 2\.0$", text, re.M)
    assert re.search(r"^paddler_requests_buffered 0\.0$", text, re.M)


def test_access_lines_and_log_level(fleet: Fleet) -> None:
    balancer, sims = start_fleet(fleet, [1])
    assert complete(balancer, 2).status_code == 200
    line = wait_until(lambda: re.search(r'paddler_sync\.access: 127\.0\.0\.1 "POST /completion" 200 upstream=\S+ '
                                        r"wait=[\d.]+ms ttfb=[\d.]+ms duration=[\d.]+ms bytes=\d+ end=done",
                                        balancer.log()))
    assert f"upstream=127.0.0.1:{sims[0].port}" in line.group(0)
    assert "HTTP/1.1\" 200" not in balancer.log()  # one access line per request: ours, never gunicorn's too
    assert balancer.log().count("registered agent") == 1
    quiet = fleet.balancer("--log-level", "warning")
    sim = fleet.simulator()
    fleet.agent(sim.port, quiet.extra["management_port"], interval=0.2)
    wait_until(lambda: agents(quiet))
    assert complete(quiet, 1).status_code == 200
    time.sleep(0.2)
    assert "paddler_sync.access" not in quiet.log() and "registered agent" not in quiet.log()


def test_dashboard_is_off_unless_enabled(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    response = requests.get(balancer.extra["management"] + "/dashboard", timeout=5)
    assert response.status_code == 404 and "--management-dashboard-enable" in response.json()["error"]["message"]


def test_dashboard_fragment_escapes_agent_names(fleet: Fleet) -> None:
    balancer = fleet.balancer("--management-dashboard-enable")
    sim = fleet.simulator()
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "<script>alert(1)</script>", interval=0.2)
    wait_until(lambda: agents(balancer))
    fragment = requests.get(balancer.extra["management"] + "/dashboard/fleet", timeout=5).text
    assert "<script>alert(1)</script>" not in fragment and "&lt;script&gt;alert(1)&lt;/script&gt;" in fragment



def test_statsd_says_what_each_tenant_holds_and_used(fleet: Fleet, udp: UdpListener) -> None:
    tenants = fleet.workdir / "tenants.toml"
    tenants.write_text('[tenants.chat]\nkeys = ["sk-statsd-chat"]\n\n[tenants.batch]\nkeys = ["sk-statsd-batch"]\n')
    balancer, _ = start_fleet(fleet, [2], "--statsd-addr", f"127.0.0.1:{udp.port}", "--statsd-reporting-interval",
                              "0.2", "--tenants", str(tenants))
    answers = [requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "hi", "n_predict": 6},
                             headers={"Authorization": f"Bearer {key}"}, timeout=10) for key in
               ("sk-statsd-chat", "sk-statsd-chat", "sk-wrong")]
    assert [a.status_code for a in answers] == [200, 200, 401]
    lines = udp.drain(1.0)
    assert sum(values(lines, "paddler.tenants.chat.requests.served", "c")) == 2
    assert sum(values(lines, "paddler.tenants.chat.tokens.generated", "c")) == 12
    assert sum(values(lines, "paddler.tenants.chat.slot_seconds", "c")) > 0
    assert values(lines, "paddler.tenants.chat.in_flight", "g")[-1] == 0
    assert values(lines, "paddler.tenants.batch.waiting", "g")[-1] == 0
    assert not any("sk-statsd" in line for line in lines)
