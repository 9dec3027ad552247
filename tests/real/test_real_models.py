"""Model routing against real llama-server builds (tests/llamacpp_servers.py finds them): single-model servers
with their own --alias on each build, and the 2026 build's router mode. Skips, saying why, where the builds are
absent."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import Fleet, Proc, agent_named, free_port, real_builds, spawn_llama_server, wait_until
from tests.llamacpp_servers import Build, metric

pytestmark = [pytest.mark.real_llamacpp, pytest.mark.parametrize("build", real_builds())]
INTERVAL = 0.2
CHAT = [{"role": "user", "content": "hi"}]


def registered(fleet: Fleet, balancer: Proc, server: Proc, name: str) -> None:
    fleet.agent(server.port, balancer.extra["management_port"], "--name", name, interval=INTERVAL)
    wait_until(lambda: (agent_named(balancer, name) or {}).get("models"), timeout=15, message=f"{name}'s models")


def chat(balancer: Proc, model: str | None, max_tokens: int = 4, **extra: object) -> requests.Response:
    body: dict[str, object] = {"messages": CHAT, "max_tokens": max_tokens, **extra}
    if model is not None:
        body["model"] = model
    return requests.post(balancer.extra["proxy"] + "/v1/chat/completions", json=body, timeout=60)


def upstreams(balancer: Proc) -> list[str]:
    return re.findall(r'"POST /v1/chat/completions" 200 upstream=(\S+)', balancer.log())


def test_each_model_goes_only_to_its_servers_and_a_busy_one_delays_no_other(fleet: Fleet, build: Build,
                                                                             llamacpp_models: dict[str, Path]) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0", "--buffered-request-timeout", "60")
    chat_server = spawn_llama_server(fleet, build, llamacpp_models["tiny"], "-np", "2", "-c", "2048",
                                     "--alias", "chat", *build.slots_flags())
    writer = spawn_llama_server(fleet, build, llamacpp_models["slow"], "-np", "1", "-c", "1024",
                                "--alias", "writer", *build.slots_flags())
    registered(fleet, balancer, chat_server, "chat")
    registered(fleet, balancer, writer, "writer")
    [reported] = agent_named(balancer, "chat")["models"]
    assert reported["id"] == "chat" and reported["n_ctx"] == 1024 and "tiny" in reported["names"]
    assert reported["modalities"] == (["text"] if build.modern else [])  # b4748's /props does not say
    for model in ["chat", "writer", "Chat", "tiny", "slow.gguf"]:
        assert chat(balancer, model).status_code == 200, model
    logged = wait_until(lambda: len(found := upstreams(balancer)) >= 5 and found)  # each written as its answer ends
    assert logged == [f"127.0.0.1:{p}" for p in (chat_server.port, writer.port, chat_server.port,
                                                 chat_server.port, writer.port)]

    unknown = chat(balancer, "gpt-4o")
    assert unknown.status_code == 404 and unknown.json()["error"]["models"] == ["chat", "writer"]
    listed = requests.get(balancer.extra["proxy"] + "/v1/models", timeout=5).json()
    assert [m["id"] for m in listed["data"]] == ["chat", "writer"]
    assert [m["paddler"]["slots_total"] for m in listed["data"]] == [2, 1]

    answers: list[int] = []
    long_ones = [threading.Thread(target=lambda: answers.append(chat(balancer, "writer", 300,
                                                                     ignore_eos=True).status_code))
                 for _ in range(3)]
    for thread in long_ones:
        thread.start()
    wait_until(lambda: requests.get(balancer.extra["management"] + "/health", timeout=5).json()
               ["requests_buffered"] == 2, timeout=15, message="two requests for 'writer' waiting")
    started = time.monotonic()
    assert chat(balancer, "chat", 16).status_code == 200
    took = time.monotonic() - started
    assert took < 2.0, f"a request for 'chat' waited {took:.1f}s behind 'writer'"  # each 'writer' takes ~2.5 s
    for thread in long_ones:
        thread.join(60)
    assert answers == [200] * 3
    assert metric(writer.url, "requests_deferred") == 0 and metric(chat_server.url, "requests_deferred") == 0


def spawn_router(fleet: Fleet, build: Build, models: dict[str, Path]) -> Proc:
    folder = fleet.workdir / "router-models"
    folder.mkdir(exist_ok=True)
    for name in ("tiny", "slow"):
        (folder / f"{name}.gguf").symlink_to(models[name])
    port = free_port()
    proc = fleet.spawn("llama-router", [str(build.path), "--models-dir", str(folder), "--host", "127.0.0.1",
                                        "--port", str(port), "-t", "1", "-np", "2", "-c", "2048", "--metrics"], port)
    wait_until(lambda: requests.get(f"{proc.url}/health", timeout=2).status_code == 200, timeout=30,
               message="the router healthy")
    return proc


def test_a_router_loads_a_model_on_demand_and_serves_each_by_name(fleet: Fleet, build: Build,
                                                                   llamacpp_models: dict[str, Path]) -> None:
    if not build.modern:
        pytest.skip(f"llama-server {build.name} has no router mode (the 2026 build has)")
    balancer = fleet.balancer("--models-discovery-time", "0")
    router = spawn_router(fleet, build, llamacpp_models)
    registered(fleet, balancer, router, "router")
    agent = agent_named(balancer, "router")
    assert agent is not None and agent["router"]
    assert {m["id"]: m["state"] for m in agent["models"]} == {"tiny": "unloaded", "slow": "unloaded"}

    assert chat(balancer, "tiny").status_code == 200  # loads it first
    wait_until(lambda: {m["id"]: m["state"] for m in agent_named(balancer, "router")["models"]}
               == {"tiny": "loaded", "slow": "unloaded"}, timeout=15, message="tiny loaded, slow left alone")
    for _ in range(3):
        assert chat(balancer, "tiny").status_code == 200
    metrics = requests.get(balancer.extra["management"] + "/metrics", timeout=5).text
    assert 'paddler_model_loads_total{model="tiny"} 1.0' in metrics
    assert 'paddler_model_slots_total{model="tiny"} 2.0' in metrics

    missing = chat(balancer, None)  # every server is a router: a request must name its model
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "model_required"
    assert chat(balancer, "nope").status_code == 404
    listed = requests.get(balancer.extra["proxy"] + "/v1/models", timeout=5).json()
    assert sorted(m["id"] for m in listed["data"]) == ["slow", "tiny"]
    too_long = chat(balancer, "tiny", 2000)  # 1,024 tokens per slot in the router's child: llama.cpp stops there
    assert too_long.status_code == 200 and too_long.json()["choices"][0]["finish_reason"] == "length"
    assert metric(f"{router.url}", "requests_deferred", "?model=tiny") == 0
