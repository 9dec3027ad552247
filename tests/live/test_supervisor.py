"""The supervisor with real processes: an agent runs a simulated llama.cpp server as its child (the same command
shape as llama-server's), restarts it, never leaves it orphaned, drains before it stops, and swaps its model on
the balancer's desired state without failing a request.
(Real llama-servers: tests/real/test_real_supervisor.py. Rules without processes: tests/live/test_rollout.py.)"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import (
    PADDLER_SYNC,
    Fleet,
    Proc,
    agent_named,
    agents,
    agents_ready,
    alive,
    fleet_progress,
    health,
    port_open,
    put_desired,
    reported_since,
    sim_stats,
    stream,
    streaming_load,
    supervised_ready,
    wait_until,
)

pytestmark = pytest.mark.both_stores


def models_dir(fleet: Fleet) -> Path:
    """The simulator, like llama-server, exits when its model file does not exist: empty files stand in."""
    for name in ("tiny.gguf", "slow.gguf"):
        (fleet.workdir / name).touch()
    return fleet.workdir


def simulate(*args: str) -> tuple[str, ...]:
    return (PADDLER_SYNC, "simulate", *args)


def supervisor_of(balancer: Proc, name: str) -> dict[str, Any]:
    agent = agent_named(balancer, name)
    assert agent is not None, f"agent {name} is not registered"
    return {**agent["supervisor"], "agent": agent}


def unavailable(balancer: Proc) -> int:
    """Servers that take no new requests now: draining, or not ready."""
    return sum(1 for a in agents(balancer) if a["state"] != "ready")


@pytest.mark.ledger_agnostic
def test_agent_runs_llama_server_restarts_it_and_never_leaves_it_orphaned(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    agent = fleet.supervised(balancer.extra["management_port"], *simulate("-np", "2"), name="s0",
                             agent_args=("--supervise-backoff", "0.2", "--supervise-unresponsive-timeout", "1",
                                         "--llamacpp-timeout", "0.3"))
    first = wait_until(lambda: supervised_ready(balancer, "s0"), timeout=20, message="the supervised server ready")
    supervisor = first["supervisor"]
    command = supervisor["command"]
    port = command[command.index("--port") + 1]
    assert first["external_llamacpp_addr"] == f"127.0.0.1:{port}"  # a port it picked, watched and reported
    assert requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "n_predict": 3},
                         timeout=10).status_code == 200

    killed = supervisor["pid"]
    os.kill(killed, signal.SIGKILL)
    states = set()

    def restarted() -> dict[str, Any] | None:
        now = supervisor_of(balancer, "s0")
        states.add(now["state"])
        return now if now["state"] == "ready" and now["pid"] != killed else None

    again = wait_until(restarted, timeout=20, interval=0.05, message="a new llama-server ready")
    assert again["restarts"] == 1 and again["recovered_in"] is not None and again["recovered_in"] < 10
    assert states & {"crashed", "backing_off", "restarting", "starting"}, states
    assert "was killed by SIGKILL" in agent.log()
    assert re.search(r"ready again, [0-9.]+s after it went down", agent.log())
    assert "[llama-server " in agent.log()  # its output, prefixed, in the agent's log

    os.kill(again["pid"], signal.SIGSTOP)  # alive, but answering nothing: killed and started again
    unstuck = wait_until(lambda: (now := supervisor_of(balancer, "s0"))["state"] == "ready"
                         and now["pid"] != again["pid"] and now, timeout=20, message="a hung server replaced")
    assert "killing llama-server" in agent.log() and "it has not answered for" in agent.log()
    assert not alive(again["pid"])

    agent.kill()  # kill -9 of the agent: the kernel kills llama-server too (parent-death signal)
    wait_until(lambda: not alive(unstuck["pid"]), timeout=5, message="llama-server gone with its agent")


@pytest.mark.ledger_agnostic
def test_a_command_that_keeps_failing_backs_off_gives_up_and_a_desired_state_revives_it(fleet: Fleet) -> None:
    workdir = models_dir(fleet)
    balancer = fleet.balancer()
    agent = fleet.supervised(balancer.extra["management_port"], *simulate("-m", str(workdir / "missing.gguf")),
                             name="s0", agent_args=("--supervise-backoff", "0.1", "--supervise-max-restarts", "3"))
    gave_up = wait_until(lambda: "gave up" in (supervisor_of(balancer, "s0")["hint"] or "")
                         and supervisor_of(balancer, "s0"), timeout=20, message="the agent giving up")
    assert gave_up["state"] == "crashed" and gave_up["pid"] is None
    assert "gave up after 4 failed starts" in gave_up["hint"] and "failed to load model" in gave_up["hint"]
    starts = [_seconds(line) for line in agent.log().splitlines() if "started llama-server" in line]
    assert len(starts) == 4  # the first start and three restarts: at once, then after 0.1 s, then 0.2 s
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[1] >= 0.1 and gaps[2] >= 0.2 and gaps[2] > gaps[0], gaps
    gave_up_at = time.time()
    wait_until(lambda: reported_since(balancer, "s0", gave_up_at + 0.5), message="reports past the next backoff")
    assert len([line for line in agent.log().splitlines() if "started llama-server" in line]) == 4  # given up

    answer = put_desired(balancer, {"model": str(workdir / "tiny.gguf")}, gave_up["agent"]["agent_id"])
    assert answer.status_code == 202
    revived = wait_until(lambda: supervised_ready(balancer, "s0"), timeout=20,
                         message="the server revived by a desired state")
    assert revived["model"].endswith("tiny.gguf")
    assert revived["supervisor"]["applied"]["id"] == answer.json()["desired"]["id"]


@pytest.mark.ledger_agnostic
def test_sigterm_drains_lets_the_stream_finish_then_stops_llama_server_and_deregisters(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    agent = fleet.supervised(balancer.extra["management_port"],
                             *simulate("-np", "1", "--decode-tokens-per-second", "50"), name="s0")
    pid = wait_until(lambda: supervised_ready(balancer, "s0"), timeout=20,
                     message="the supervised server")["supervisor"]["pid"]
    result: list[str] = []
    client = threading.Thread(target=lambda: result.append(stream(balancer, n_predict=100)))  # 2 s of tokens
    client.start()
    wait_until(lambda: supervisor_of(balancer, "s0")["agent"]["slots_in_flight"] == 1, message="the stream running")

    agent.signal(signal.SIGTERM)
    drained = wait_until(lambda: agent_named(balancer, "s0")["draining"] and agent_named(balancer, "s0"),
                         timeout=5, message="the server draining")
    assert drained["state"] == "draining" and health(balancer)["agents_draining"] == 1
    assert alive(pid)  # llama-server runs on while the stream finishes
    assert agent.popen.wait(20) == 0
    client.join(10)
    assert result == ["ok"]  # the stream in flight finished whole
    assert not alive(pid)
    assert agent_named(balancer, "s0") is None
    log = agent.log()
    assert log.index("draining first") < log.index(f"llama-server (pid {pid}) stopped") \
        < log.index("deregistered from the balancer")


def test_drain_and_undrain_by_hand(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    sims = [fleet.simulator("--parallel", "2") for _ in range(2)]
    for i, sim in enumerate(sims):
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", f"s{i}")
    agents_ready(balancer, 2)
    s0 = agent_named(balancer, "s0")
    assert s0 is not None
    management = balancer.extra["management"]
    answer = requests.post(f"{management}/api/v1/agents/{s0['agent_id']}/drain", timeout=5)
    assert answer.status_code == 200 and answer.json()["draining"] is True
    wait_until(lambda: agent_named(balancer, "s0")["state"] == "draining", message="s0 shown draining")
    drained_at = time.time()
    wait_until(lambda: reported_since(balancer, "s0", drained_at), message="s0's next report")  # it agrees
    before = [sim_stats(s)["requests_total"] for s in sims]
    for _ in range(8):
        assert requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "n_predict": 2},
                             timeout=10).status_code == 200
    after = [sim_stats(s)["requests_total"] for s in sims]
    assert after[0] == before[0] and after[1] - before[1] == 8
    text = requests.get(f"{management}/metrics", timeout=5).text
    assert re.search(r'paddler_agent_draining\{[^}]*agent_name="s0"[^}]*\} 1\.0', text)
    assert "paddler_agents_draining 1.0" in text

    assert requests.post(f"{management}/api/v1/agents/{s0['agent_id']}/undrain", timeout=5).json()["draining"] is False
    wait_until(lambda: agent_named(balancer, "s0")["state"] == "ready", message="s0 ready again")
    undrained_at = time.time()
    wait_until(lambda: reported_since(balancer, "s0", undrained_at), message="s0's next report")
    for _ in range(8):
        requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "n_predict": 2}, timeout=10)
    assert sim_stats(sims[0])["requests_total"] > after[0]
    assert requests.post(f"{management}/api/v1/agents/nobody/drain", timeout=5).status_code == 404


def test_rolling_swap_under_streaming_load_fails_no_request(fleet: Fleet) -> None:
    workdir = models_dir(fleet)
    balancer = fleet.balancer("--max-unavailable", "1")
    for i in range(2):
        fleet.supervised(balancer.extra["management_port"], *simulate("-m", str(workdir / "tiny.gguf"), "-np", "2",
                                                                      "--startup-time", "0.5"), name=f"s{i}")
    for i in range(2):
        wait_until(lambda i=i: supervised_ready(balancer, f"s{i}"), timeout=20, message=f"s{i} ready")
    most_down = 0
    with streaming_load(balancer, clients=3) as outcomes:
        wait_until(lambda: len(outcomes) >= 3, message="some traffic")
        answer = put_desired(balancer, {"model": str(workdir / "slow.gguf")})
        assert answer.status_code == 202 and len(answer.json()["agents"]) == 2
        wanted = answer.json()["desired"]["id"]

        def done() -> bool:
            nonlocal most_down
            most_down = max(most_down, unavailable(balancer))
            return fleet_progress(balancer)["counts"].get("applied") == 2

        wait_until(done, timeout=40, interval=0.05, message="both servers swapped")
        swapped = len(outcomes)
        wait_until(lambda: len(outcomes) >= swapped + 2, timeout=20, message="requests after the swap")
    assert outcomes and all(o == "ok" for o in outcomes), [o for o in outcomes if o != "ok"][:5]
    assert most_down == 1  # one at a time: the other server served meanwhile
    for i in range(2):
        agent = agent_named(balancer, f"s{i}")
        assert agent["model"].endswith("slow.gguf") and agent["supervisor"]["applied"]["id"] == wanted
    assert stream(balancer, "slow") == "ok"
    listed = requests.get(balancer.extra["proxy"] + "/v1/models", timeout=5).json()["data"]
    assert [m["id"] for m in listed] == [str(workdir / "slow.gguf")]  # routing follows the swap
    assert stream(balancer, "tiny") == "ok"  # one model left: a name it does not answer to is ignored, as llama.cpp


@pytest.mark.ledger_agnostic
def test_a_model_that_fails_to_load_is_rolled_back_and_the_rollout_halts(fleet: Fleet) -> None:
    workdir = models_dir(fleet)
    balancer = fleet.balancer()
    for i in range(2):
        fleet.supervised(balancer.extra["management_port"], *simulate("-m", str(workdir / "tiny.gguf"), "-np", "2"),
                         name=f"s{i}")
    for i in range(2):
        wait_until(lambda i=i: supervised_ready(balancer, f"s{i}"), timeout=20, message=f"s{i} ready")
    with streaming_load(balancer, clients=2) as outcomes:
        answer = put_desired(balancer, {"model": str(workdir / "nowhere.gguf")})
        assert answer.status_code == 202
        failed = wait_until(lambda: fleet_progress(balancer)["counts"].get("failed") == 1 and fleet_progress(balancer),
                            timeout=30, message="the failure reported")
        wait_until(lambda: all(supervised_ready(balancer, f"s{i}") for i in range(2)), timeout=20,
                   message="both back in service")
        back_at = time.time()
        wait_until(lambda: all(reported_since(balancer, f"s{i}", back_at + 0.5) for i in range(2)),
                   message="reports from both after the rollback")  # time enough for a rollout to go on
        progress = fleet_progress(balancer)
    assert progress["counts"] == {"failed": 1, "halted": 1}, progress["counts"]
    bad = next(a for a in failed["agents"] if a["status"] == "failed")
    assert "failed to load model" in bad["supervisor"]["failed_error"]
    assert bad["applied"] is None  # back on the command it was started with
    for i in range(2):
        assert agent_named(balancer, f"s{i}")["model"].endswith("tiny.gguf")
    assert outcomes and all(o == "ok" for o in outcomes), [o for o in outcomes if o != "ok"][:5]


@pytest.mark.ledger_agnostic
def test_a_swap_resumes_after_the_balancer_restarts(fleet: Fleet) -> None:
    workdir = models_dir(fleet)
    balancer = fleet.balancer()
    ports = {"proxy_port": balancer.extra["proxy_port"], "management_port": balancer.extra["management_port"]}
    for i in range(2):
        fleet.supervised(balancer.extra["management_port"], *simulate("-m", str(workdir / "tiny.gguf"),
                                                                      "--startup-time", "1"), name=f"s{i}")
    for i in range(2):
        wait_until(lambda i=i: supervised_ready(balancer, f"s{i}"), timeout=20, message=f"s{i} ready")
    wanted = put_desired(balancer, {"model": str(workdir / "slow.gguf")}).json()["desired"]["id"]
    wait_until(lambda: fleet_progress(balancer)["counts"].get("applying") == 1, message="the first swap under way")
    balancer.kill_group()  # the in-process controls are gone with it
    wait_until(lambda: not port_open(ports["management_port"]) and not port_open(ports["proxy_port"]),
               message="the balancer's ports free")
    restarted = fleet.balancer(**ports)
    wait_until(lambda: fleet_progress(restarted)["counts"].get("applied") == 2, timeout=40,
               message="the swap finished by the restarted balancer")
    progress = fleet_progress(restarted)
    assert progress["desired"]["id"] == wanted  # learned from the agents' reports


@pytest.mark.ledger_agnostic
def test_desired_state_requests_are_checked(fleet: Fleet) -> None:
    balancer = fleet.balancer("--management-token", "secret")
    sim = fleet.simulator()
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "plain", "--management-token", "secret")
    management = balancer.extra["management"]
    auth = {"Authorization": "Bearer secret"}
    wait_until(lambda: requests.get(f"{management}/api/v1/agents", headers=auth, timeout=5).json()["agents"])
    plain = requests.get(f"{management}/api/v1/agents", headers=auth, timeout=5).json()["agents"][0]
    url = f"{management}/api/v1/agents/{plain['agent_id']}/desired_state"
    assert requests.put(url, json={"model": "x.gguf"}, timeout=5).status_code == 401
    refused = requests.put(url, json={"model": "x.gguf"}, headers=auth, timeout=5)
    assert refused.status_code == 409 and "--supervise" in refused.json()["error"]["message"]
    for body, words in (({}, "'model'"), ({"args": "-np 4"}, "'args' must be a list"),
                        ({"model": "x", "colour": 1}, "unknown desired state fields: colour")):
        answer = requests.put(f"{management}/api/v1/desired_state", json=body, headers=auth, timeout=5)
        assert answer.status_code == 400 and words in answer.json()["error"]["message"], answer.text
    assert requests.put(f"{management}/api/v1/agents/nobody/desired_state", json={"model": "x"}, headers=auth,
                        timeout=5).status_code == 404


def _seconds(line: str) -> float:
    stamp = line.split()[0]  # 2026-11-29T14:45:47.975Z
    hours, minutes, seconds = stamp.split("T")[1].rstrip("Z").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@pytest.mark.ledger_agnostic
def test_past_the_drain_timeout_a_stream_is_cut_with_a_clear_error_and_the_swap_goes_on(fleet: Fleet) -> None:
    workdir = models_dir(fleet)
    balancer = fleet.balancer()
    supervising = fleet.supervised(balancer.extra["management_port"],
                                   *simulate("-m", str(workdir / "tiny.gguf"), "-np", "1",
                                             "--decode-tokens-per-second", "20"), name="s0")
    agent = wait_until(lambda: supervised_ready(balancer, "s0"), timeout=20, message="the supervised server")
    result: list[str] = []
    client = threading.Thread(target=lambda: result.append(stream(balancer, n_predict=400)))  # 20 s of tokens
    client.start()
    wait_until(lambda: agent_named(balancer, "s0")["slots_in_flight"] == 1, message="the stream running")
    answer = put_desired(balancer, {"model": str(workdir / "slow.gguf"), "drain_timeout": 0.5}, agent["agent_id"])
    assert answer.status_code == 202
    client.join(15)
    assert len(result) == 1 and result[0].startswith("cut:"), result
    assert "error: " in result[0] and "stopped while draining" in result[0]
    wait_until(lambda: (supervised_ready(balancer, "s0") or {}).get("model", "").endswith("slow.gguf"), timeout=20,
               message="the swap done")
    log = supervising.log()  # llama-server down on purpose: said so, without advice to go and start it
    assert "while its agent runs it" in log and "check that llama-server is running" not in log
