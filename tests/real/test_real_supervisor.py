"""The supervisor against real llama-server builds (tests/llamacpp_servers.py finds them): an agent runs
llama-server itself, restarts it after kill -9, and two such servers swap their model (tiny <-> slow) one at a time
under continuous streaming load without a failed or deferred request. Skips, saying why, where the builds are absent.
(bench/swap.py measures the same with figures.)"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import requests

from tests.helpers import (
    Fleet,
    Proc,
    agent_named,
    agents,
    alive,
    fleet_progress,
    put_desired,
    real_builds,
    streaming_load,
    supervised_ready,
    wait_until,
)
from tests.llamacpp_servers import Build, DeferredSampler

pytestmark = [pytest.mark.real_llamacpp, pytest.mark.parametrize("build", real_builds())]


def llama_server(build: Build, model: Path) -> tuple[str, ...]:
    """The operator's command: no port (the agent picks one), no --slots (the agent adds it where needed)."""
    return (str(build.path), "-m", str(model), "-np", "2", "-c", "2048", "-t", "1", "--threads-http", "8")


def swaps(build: Build) -> tuple[str, ...]:
    """tiny -> slow on one build, slow -> tiny on the other (the suite's time is counted)."""
    return ("slow",) if build.modern else ("slow", "tiny")


def supervised(fleet: Fleet, balancer: Proc, build: Build, model: Path, name: str) -> dict:
    fleet.supervised(balancer.extra["management_port"], *llama_server(build, model), name=name)
    return wait_until(lambda: supervised_ready(balancer, name), timeout=60, message=f"{name}: llama-server ready")


def test_a_killed_llama_server_is_restarted_and_registered_again(fleet: Fleet, build: Build,
                                                                 llamacpp_models: dict[str, Path]) -> None:
    balancer = fleet.balancer()
    first = supervised(fleet, balancer, build, llamacpp_models["tiny"], "s0")
    command = first["supervisor"]["command"]
    assert ("--slots" in command) is not build.modern and "--metrics" in command  # b4748: /slots only with it
    pid = first["supervisor"]["pid"]
    os.kill(pid, signal.SIGKILL)
    again = wait_until(lambda: (a := supervised_ready(balancer, "s0")) and a["supervisor"]["pid"] != pid and a,
                       timeout=60, message="llama-server restarted and ready")
    assert again["agent_id"] == first["agent_id"] and again["external_llamacpp_addr"] == first["external_llamacpp_addr"]
    recovered = again["supervisor"]["recovered_in"]
    assert recovered is not None and 0 < recovered < 30
    assert requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "hi", "n_predict": 4},
                         timeout=30).status_code == 200
    assert not alive(pid)


def test_a_rolling_swap_under_streaming_load_fails_and_defers_nothing(fleet: Fleet, build: Build,
                                                                      llamacpp_models: dict[str, Path]) -> None:
    balancer = fleet.balancer("--buffered-request-timeout", "60")
    servers = [supervised(fleet, balancer, build, llamacpp_models["tiny"], f"s{i}") for i in range(2)]
    urls = ["http://" + s["external_llamacpp_addr"] for s in servers]
    with DeferredSampler(urls, tolerate_errors=True) as deferred, streaming_load(balancer, clients=2) as outcomes:
        wait_until(lambda: len(outcomes) >= 4, timeout=30, message="traffic flowing")
        for model in swaps(build):
            answer = put_desired(balancer, {"model": str(llamacpp_models[model])})
            assert answer.status_code == 202
            wait_until(lambda: fleet_progress(balancer)["counts"].get("applied") == 2, timeout=120,
                       message=f"both servers on {model}")
            assert all(a["model"] is not None and a["model"].endswith(f"{model}.gguf") for a in agents(balancer))
        before = len(outcomes)
        wait_until(lambda: len(outcomes) >= before + 2, timeout=30, message="traffic after the swaps")
    failed = [o for o in outcomes if o != "ok"]
    assert not failed, failed[:5]
    assert deferred.samples >= 2 and deferred.peak == 0  # restarting servers answer no sample; the rest say 0
    waits = [float(w) for w in re.findall(r"wait=([0-9.]+)ms", balancer.log())]
    assert waits and max(waits) < 60_000
    for name in ("s0", "s1"):
        assert agent_named(balancer, name)["supervisor"]["failed_id"] is None
