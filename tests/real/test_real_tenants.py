"""Tenants against real llama-server builds (b4748 and 2026): a llama-server that demands its own key gets it, never
the client's; each tenant's tokens are llama.cpp's own figures, streamed or not; the reserved slot and priority
decide whose request starts next, and nothing waits inside llama.cpp."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import Fleet, Proc, agent_named, real_builds, spawn_llama_server, wait_until
from tests.llamacpp_servers import Build, DeferredSampler

pytestmark = [pytest.mark.real_llamacpp, pytest.mark.parametrize("build", real_builds())]
UPSTREAM_KEY = "llama-real-key"
TENANTS = """
[tenants.chat]
keys = ["sk-real-chat"]
priority = 10
reserved_slots = 1

[tenants.batch]
keys = ["sk-real-batch"]
"""


def fleet_with_tenants(fleet: Fleet, build: Build, models: dict[str, Path], slots: int,
                       model: str = "tiny") -> tuple[Proc, Proc]:
    path = fleet.workdir / "tenants.toml"
    path.write_text(TENANTS)
    balancer = fleet.balancer("--tenants", str(path), "--upstream-api-key", UPSTREAM_KEY)
    server = spawn_llama_server(fleet, build, models[model], "-np", str(slots), "-c", str(1024 * slots),
                                "--api-key", UPSTREAM_KEY, *build.slots_flags())
    fleet.agent(server.port, balancer.extra["management_port"], "--name", "real", "--llamacpp-api-key", UPSTREAM_KEY,
                interval=0.2)
    wait_until(lambda: (agent_named(balancer, "real") or {}).get("state") == "ready", timeout=15,
               message="the agent ready")
    return balancer, server


def rows(balancer: Proc) -> dict[str, dict]:
    answer = requests.get(balancer.extra["management"] + "/api/v1/tenants", timeout=5).json()
    return {row["name"]: row for row in answer["tenants"]}


def test_keys_stay_at_the_balancer_and_tokens_are_llamacpps(fleet: Fleet, build: Build, llamacpp_models) -> None:
    balancer, server = fleet_with_tenants(fleet, build, llamacpp_models, 2)
    chat = {"Authorization": "Bearer sk-real-chat"}
    assert requests.post(server.url + "/completion", json={"prompt": "x", "n_predict": 1}, headers=chat,
                         timeout=10).status_code == 401  # llama.cpp would refuse the client's own key
    plain = requests.post(balancer.extra["proxy"] + "/completion", headers=chat, timeout=60,
                          json={"prompt": "Once upon a time", "n_predict": 9, "ignore_eos": True})
    assert plain.status_code == 200
    streamed = requests.post(balancer.extra["proxy"] + "/v1/chat/completions", headers=chat, timeout=60,
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
                                   "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    expected = plain.json()["tokens_predicted"] + 5
    row = wait_until(lambda: (r := rows(balancer)["chat"])["tokens"]["generated"] == expected and r, timeout=5,
                     message="the chat tenant's tokens")
    assert row["tokens"]["prompt"] >= plain.json()["tokens_evaluated"] and row["requests"]["served"] == 2
    assert requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "n_predict": 1},
                         timeout=10).json()["error"]["code"] == "invalid_api_key"


def test_the_reserved_slot_and_priority_decide_with_nothing_queued_inside(fleet: Fleet, build: Build,
                                                                           llamacpp_models) -> None:
    balancer, server = fleet_with_tenants(fleet, build, llamacpp_models, 2, model="slow")  # batches last seconds

    def batch() -> int:
        return requests.post(balancer.extra["proxy"] + "/completion", timeout=120,
                             headers={"Authorization": "Bearer sk-real-batch"},
                             json={"prompt": "Once upon a time", "n_predict": 200, "ignore_eos": True}).status_code

    with DeferredSampler([server.url], api_key=UPSTREAM_KEY) as sampler, ThreadPoolExecutor(3) as pool:
        batches = [pool.submit(batch) for _ in range(3)]
        wait_until(lambda: rows(balancer)["batch"]["waiting"] == 2, message="two batch requests waiting")
        assert rows(balancer)["batch"]["in_flight"] == 1  # the second slot is chat's
        asked = time.monotonic()
        answer = requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "hi", "n_predict": 2},
                               headers={"Authorization": "Bearer sk-real-chat"}, timeout=30)
        assert answer.status_code == 200 and time.monotonic() - asked < 5
        assert rows(balancer)["chat"]["wait_seconds"] < 0.05  # it waited behind no batch request: the slot was kept
        assert [b.result(120) for b in batches] == [200] * 3
    assert sampler.peak == 0 and sampler.samples >= 2
