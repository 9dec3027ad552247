"""Agents with real simulators and a real balancer: registration, load, error states, death, restarts, AWS."""

from __future__ import annotations

import signal
import time

import requests

from tests.helpers import Fleet, Proc, agent_named, agents, fake_http, free_port, run_cli, wait_until

INTERVAL = 0.2


def start_pair(fleet: Fleet, *sim_args: str) -> tuple[Proc, Proc]:
    balancer = fleet.balancer()
    sim = fleet.simulator(*sim_args)
    return balancer, sim


def test_agent_appears_with_the_right_slot_counts_within_two_intervals(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    small = fleet.simulator("--parallel", "2")
    large = fleet.simulator("--parallel", "4")
    started = time.monotonic()
    fleet.agent(small.port, balancer.extra["management_port"], "--name", "small", interval=0.5)
    fleet.agent(large.port, balancer.extra["management_port"], "--name", "large", interval=0.5)
    wait_until(lambda: len(agents(balancer)) == 2, timeout=10)
    # process start-up (a Python interpreter) comes on top of the two intervals
    assert time.monotonic() - started < 1.0 + 5
    small_row, large_row = agent_named(balancer, "small"), agent_named(balancer, "large")
    assert (small_row["slots_idle"], small_row["slots_processing"], small_row["total_slots"]) == (2, 0, 2)
    assert (large_row["slots_idle"], large_row["slots_processing"], large_row["total_slots"]) == (4, 0, 4)
    assert large_row["external_llamacpp_addr"] == f"127.0.0.1:{large.port}"
    assert large_row["is_authorized"] is True and large_row["is_slots_endpoint_enabled"] is True
    assert large_row["model"] == "models/simulated.gguf" and large_row["llamacpp_build"] == "b4748-c392e509"
    assert set(large_row) >= {"agent_id", "agent_name", "error", "external_llamacpp_addr", "is_authorized",
                              "is_slots_endpoint_enabled", "last_update", "quarantined_until", "slots_idle",
                              "slots_processing"}
    health = requests.get(balancer.extra["management"] + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["agents"] == 2 and health["slots_idle"] == 6


def test_counts_follow_load_on_the_server(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet, "--parallel", "3", "--decode-tokens-per-second", "20")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "a", interval=INTERVAL)
    wait_until(lambda: agent_named(balancer, "a"))
    streams = []
    for _ in range(2):  # load the llama.cpp server directly, as another client would
        streams.append(requests.post(sim.url + "/completion", json={"prompt": "x", "n_predict": 60, "stream": True},
                                     stream=True, timeout=10))
    wait_until(lambda: agent_named(balancer, "a")["slots_processing"] == 2, timeout=5)
    row = agent_named(balancer, "a")
    assert row["slots_idle"] == 1 and row["slots_external"] == 2 and row["slots_in_flight"] == 0
    for stream in streams:
        stream.close()
    wait_until(lambda: agent_named(balancer, "a")["slots_idle"] == 3, timeout=5)


def _wait_state(balancer: Proc, name: str, state: str) -> dict:
    return wait_until(lambda: (row := agent_named(balancer, name)) and row["state"] == state and row,
                      timeout=10, message=f"agent {name} in state {state}")


def test_unreachable_then_recovers(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    port = free_port()
    agent = fleet.agent(port, balancer.extra["management_port"], "--name", "x", interval=INTERVAL)
    row = _wait_state(balancer, "x", "unreachable")
    assert row["slots_idle"] == 0 and row["is_authorized"] is None and "refused" in row["error"]
    assert "--local-llamacpp-addr" in row["hint"]
    fleet.simulator("--parallel", "2", port=port)
    row = _wait_state(balancer, "x", "ready")
    assert row["slots_idle"] == 2 and row["error"] is None
    log = agent.log()
    assert log.count("is unreachable") == 1  # a state is logged once, not every interval
    assert "is ready: 2 slots" in log


def test_unauthorized_hint_then_fixed(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    sim = fleet.simulator("--api-key", "secret")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "nokey", interval=INTERVAL)
    fleet.agent(sim.port, free_port(), interval=INTERVAL)  # (an agent for another balancer: not ours)
    row = _wait_state(balancer, "nokey", "unauthorized")
    assert row["is_authorized"] is False and "--llamacpp-api-key" in row["hint"]
    sim.kill()
    fleet.simulator(port=sim.port)  # the operator restarts llama.cpp without a key
    _wait_state(balancer, "nokey", "ready")


def test_agent_with_the_key_is_authorized(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet, "--api-key", "secret", "--parallel", "2")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "k", "--llamacpp-api-key", "secret",
                interval=INTERVAL)
    assert _wait_state(balancer, "k", "ready")["slots_idle"] == 2


def test_slots_disabled_hint_then_fixed(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet, "--no-slots")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "s", interval=INTERVAL)
    row = _wait_state(balancer, "s", "slots_disabled")
    assert row["is_slots_endpoint_enabled"] is False and "--slots" in row["hint"]
    sim.kill()
    fleet.simulator(port=sim.port)
    _wait_state(balancer, "s", "ready")


def test_loading_then_ready(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet, "--startup-time", "2")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "l", interval=INTERVAL)
    assert "loading" in _wait_state(balancer, "l", "loading")["hint"]
    _wait_state(balancer, "l", "ready")


def test_malformed_and_unexpected_answers(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    with fake_http({("GET", "/slots"): (200, "<html>not json</html>")}) as (port, _):
        fleet.agent(port, balancer.extra["management_port"], "--name", "m", interval=INTERVAL)
        assert "malformed" in _wait_state(balancer, "m", "malformed")["error"]
    with fake_http({("GET", "/slots"): (418, "teapot")}) as (port, _):
        fleet.agent(port, balancer.extra["management_port"], "--name", "u", interval=INTERVAL)
        assert "418" in _wait_state(balancer, "u", "unexpected_status")["error"]


def test_an_agent_pointed_at_a_balancer_says_so_and_what_to_give_it(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    other = fleet.balancer()  # the mistake: another balancer's ports given as the llama.cpp address
    for which, port in (("proxy", other.extra["proxy_port"]), ("management", other.extra["management_port"])):
        fleet.agent(port, balancer.extra["management_port"], "--name", which, interval=INTERVAL)
        agent = _wait_state(balancer, which, "balancer_port")
        assert f"this address is a paddler-sync balancer's {which} port, not llama.cpp" in agent["error"]
        assert "--local-llamacpp-addr" in agent["hint"]


def test_state_dialect_is_read(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet, "--dialect", "state", "--parallel", "3")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "old", interval=INTERVAL)
    assert _wait_state(balancer, "old", "ready")["slots_idle"] == 3


def test_agent_killed_hard_disappears_after_the_staleness_limit(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet)
    agent = fleet.agent(sim.port, balancer.extra["management_port"], "--name", "k9", interval=0.3)
    wait_until(lambda: agent_named(balancer, "k9"))
    agent.kill()  # SIGKILL: no deregistration
    killed = time.monotonic()
    wait_until(lambda: agent_named(balancer, "k9") is None, timeout=5, interval=0.02)
    gone_after = time.monotonic() - killed
    assert 0.45 < gone_after < 3 * 0.3 + 1.0  # one missed report is not enough; three are
    assert "no report for" in balancer.log()


def test_sigterm_deregisters_at_once(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet)
    agent = fleet.agent(sim.port, balancer.extra["management_port"], "--name", "t", interval=5)
    wait_until(lambda: agent_named(balancer, "t"))
    assert agent.stop() == 0
    assert agent_named(balancer, "t") is None  # long before 3 intervals of 5 s
    assert "deregistered" in agent.log()


def test_balancer_restart_brings_agents_back(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet, "--parallel", "2")
    agent = fleet.agent(sim.port, balancer.extra["management_port"], "--name", "back", interval=INTERVAL)
    first_id = wait_until(lambda: agent_named(balancer, "back"))["agent_id"]
    balancer.stop()
    wait_until(lambda: "cannot reach the balancer" in agent.log(), message="the agent missing its balancer")
    again = fleet.balancer(proxy_port=balancer.extra["proxy_port"],
                           management_port=balancer.extra["management_port"])
    row = wait_until(lambda: agent_named(again, "back"), timeout=10)
    assert row["agent_id"] == first_id and row["slots_idle"] == 2
    log = agent.log()
    assert "cannot reach the balancer" in log and log.count("reporting to the balancer") == 2


def test_aws_local_ipv4_from_a_fake_metadata_service(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet)
    routes = {("PUT", "/latest/api/token"): (200, "TOKEN123"),
              ("GET", "/latest/meta-data/local-ipv4"): (200, "127.0.0.1")}
    with fake_http(routes) as (port, seen):
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", "ec2",
                    "--external-llamacpp-addr", "aws:metadata:local-ipv4",
                    "--aws-metadata-endpoint", f"http://127.0.0.1:{port}", interval=INTERVAL)
        row = _wait_state(balancer, "ec2", "ready")
    assert row["external_llamacpp_addr"] == f"127.0.0.1:{sim.port}"
    token_put = next(s for s in seen if s[0] == "PUT")
    value_get = next(s for s in seen if s[0] == "GET")
    assert "X-aws-ec2-metadata-token-ttl-seconds" in token_put[2]
    assert value_get[2].get("X-aws-ec2-metadata-token") == "TOKEN123"  # IMDSv2: the token, then the value


def test_aws_without_a_metadata_service_is_a_clear_error(tmp_path) -> None:
    result = run_cli("agent", "--external-llamacpp-addr", "aws:metadata:local-ipv4:8080",
                     "--aws-metadata-endpoint", f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert result.returncode == 2
    assert "metadata service" in result.stderr and "Traceback" not in result.stderr


def test_agent_survives_sigint(fleet: Fleet) -> None:
    balancer, sim = start_pair(fleet)
    agent = fleet.agent(sim.port, balancer.extra["management_port"], "--name", "i", interval=INTERVAL)
    wait_until(lambda: agent_named(balancer, "i"))
    agent.signal(signal.SIGINT)
    agent.popen.wait(10)
    assert agent.popen.returncode == 0 and agent_named(balancer, "i") is None
