"""Model-aware routing through real processes: simulated llama.cpp servers serving different models (single-model
servers with aliases, and a router loading models on demand), their agents, and a balancer, on both stores."""

from __future__ import annotations

import re
import threading
import time

import pytest
import requests

from tests.helpers import Fleet, Proc, agents, health, serve_simulator, sim_stats, wait_until

pytestmark = pytest.mark.both_stores
CHAT = [{"role": "user", "content": "hi"}]


def wait_for_models(balancer: Proc, count: int) -> None:
    def ready() -> bool:
        listed = agents(balancer)
        return len(listed) == count and all(a["state"] == "ready" and a["models"] for a in listed)

    wait_until(ready, message=f"{count} agents reporting their models")


def chat(balancer: Proc, model: str | None, max_tokens: int = 4, timeout: float = 30, **extra: object) \
        -> requests.Response:
    body = {"messages": CHAT, "max_tokens": max_tokens, **extra}
    if model is not None:
        body["model"] = model
    return requests.post(balancer.extra["proxy"] + "/v1/chat/completions", json=body, timeout=timeout)


def test_each_request_lands_only_on_a_server_of_its_model(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0")
    modern = ("--dialect", "modern", "--parallel", "2", "--decode-tokens-per-second", "0")
    chats = [serve_simulator(fleet, balancer, f"chat{i}", *modern, "--alias", "chat,assistant") for i in range(2)]
    coder = serve_simulator(fleet, balancer, "coder", "--parallel", "2", "--decode-tokens-per-second", "0",
                  "--alias", "/srv/models/Coder-7B.gguf")
    wait_for_models(balancer, 3)
    for model in ["chat", "Assistant", " CHAT ", "coder-7b", "coder-7b.gguf", "/srv/models/Coder-7B.gguf"] * 2:
        assert chat(balancer, model).status_code == 200, model
    assert sum(sim_stats(s)["requests_total"] for s in chats) == 6 and sim_stats(coder)["requests_total"] == 6

    unknown = chat(balancer, "gpt-4")
    error = unknown.json()["error"]
    assert unknown.status_code == 404 and error["code"] == "model_not_found"
    assert "'gpt-4'" in error["message"] and "'assistant'" in error["message"] and "Coder-7B" in error["message"]
    assert error["models"] == ["/srv/models/Coder-7B.gguf", "assistant"]
    assert sum(sim_stats(s)["requests_total"] for s in [*chats, coder]) == 12  # nothing was sent anywhere

    listed = requests.get(balancer.extra["proxy"] + "/v1/models", timeout=5).json()
    by_id = {m["id"]: m for m in listed["data"]}
    assert listed["object"] == "list" and set(by_id) == {"assistant", "/srv/models/Coder-7B.gguf"}
    assert by_id["assistant"]["paddler"]["servers"] == 2 and by_id["assistant"]["paddler"]["slots_total"] == 4
    assert by_id["assistant"]["aliases"] == ["assistant", "chat"]  # as llama.cpp lists them: no file names added
    assert by_id["/srv/models/Coder-7B.gguf"]["aliases"] == [] and by_id["assistant"]["tags"] == []  # b4748: none
    assert requests.get(balancer.extra["proxy"] + "/models", timeout=5).json() == listed

    assert chat(balancer, None).status_code == 200  # naming none: any server
    assert requests.post(balancer.extra["proxy"] + "/v1/chat/completions", timeout=5,
                         json={"model": 7, "messages": CHAT}).status_code == 400
    log = balancer.log()
    assert re.search(r'"POST /v1/chat/completions" 404 upstream=- .* end=unknown_model', log)
    assert re.search(r'"GET /v1/models" 200 upstream=- .* end=done', log)


def test_a_saturated_model_never_delays_another_models_request(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0", "--buffered-request-timeout", "30")
    slow = serve_simulator(fleet, balancer, "slow", "--parallel", "1", "--alias", "slow",
                           "--decode-tokens-per-second", "50")
    serve_simulator(fleet, balancer, "fast", "--parallel", "1", "--alias", "fast", "--decode-tokens-per-second", "0")
    wait_for_models(balancer, 2)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(chat(balancer, "slow", max_tokens=60).status_code))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: requests.get(balancer.extra["management"] + "/health", timeout=5).json()
               ["requests_buffered"] == 3, message="three requests for 'slow' waiting")
    started = time.monotonic()
    fast = chat(balancer, "fast", max_tokens=8)
    fast_took = time.monotonic() - started
    models = {m["id"]: m for m in requests.get(balancer.extra["management"] + "/api/v1/models", timeout=5)
              .json()["models"]}
    assert fast.status_code == 200 and models["slow"]["requests_buffered"] >= 2
    assert fast_took < 1.0, f"the request for 'fast' waited {fast_took:.2f}s behind 'slow'"  # 'slow' takes ~5 s
    for thread in threads:
        thread.join(30)
    assert results == [200] * 4 and sim_stats(slow)["requests_total"] == 4


def test_a_router_loads_a_model_on_demand_and_the_default_model_fills_in(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0", "--default-model", "tiny")
    router = serve_simulator(fleet, balancer, "router", "--router-models", "tiny slow=big", "--load-time", "0.3",
                   "--parallel", "2", "--decode-tokens-per-second", "0")
    wait_for_models(balancer, 1)
    [agent] = agents(balancer)
    assert agent["router"] and {m["id"]: m["state"] for m in agent["models"]} == {"tiny": "unloaded",
                                                                                  "slow": "unloaded"}
    assert chat(balancer, None).status_code == 200  # --default-model: the router is told 'tiny'
    assert chat(balancer, "big").status_code == 200  # an alias of 'slow': loads it
    wait_until(lambda: {m["id"]: m["state"] for m in agents(balancer)[0]["models"]} == {"tiny": "loaded",
                                                                                         "slow": "loaded"})
    for _ in range(3):
        assert chat(balancer, "tiny").status_code == 200
    stats = sim_stats(router)
    assert stats["loads"] == 2 and stats["models"]["tiny"]["requests_total"] == 4
    metrics = requests.get(balancer.extra["management"] + "/metrics", timeout=5).text
    assert 'paddler_model_loads_total{model="tiny"} 1.0' in metrics
    assert 'paddler_model_loads_total{model="slow"} 1.0' in metrics
    assert 'paddler_model_slots_total{model="tiny"} 2.0' in metrics
    assert re.search(r'paddler_agent_model_slots_idle\{.*model="slow",state="loaded"\} 2.0', metrics)
    assert chat(balancer, "nope").status_code == 404


def test_prompt_and_limit_answers_a_request_too_long_for_its_model_400_with_the_numbers(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0", "--context-check", "prompt-and-limit")
    sim = serve_simulator(fleet, balancer, "small", "--parallel", "2", "--ctx-size", "1024", "--alias", "small",
                "--decode-tokens-per-second", "0")  # 512 tokens per slot
    wait_for_models(balancer, 1)
    proxy = balancer.extra["proxy"]

    def complete(prompt: str, n_predict: int) -> requests.Response:
        return requests.post(proxy + "/completion", json={"model": "small", "prompt": prompt, "n_predict": n_predict},
                             timeout=10)

    way_too_long = complete("x" * 40_000, 4)  # over even at 32 bytes a token: no count needed
    error = way_too_long.json()["error"]
    assert way_too_long.status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["n_ctx"] == 512 and error["counted"] is False and "512 tokens per slot" in error["message"]
    counted = complete("hello " * 600, 10)  # 3,600 bytes: too close to tell, so llama.cpp's tokenizer counts
    error = counted.json()["error"]
    assert counted.status_code == 400 and error["counted"] is True and error["n_prompt_tokens"] > 500
    assert error["max_tokens"] == 10
    assert complete("hello " * 200, 10).status_code == 200  # counted too, and it fits
    assert complete("hello", 10).status_code == 200
    assert sim_stats(sim)["requests_total"] == 2
    assert balancer.log().count("end=context_too_long") == 2


def test_a_model_not_reported_yet_waits_for_its_agent_while_the_balancer_starts(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "20")
    answers: list[requests.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(chat(balancer, "late")))
    waiting.start()
    wait_until(lambda: health(balancer)["requests_buffered"] == 1, message="the request waiting for its model")
    assert not answers
    serve_simulator(fleet, balancer, "late", "--alias", "late", "--decode-tokens-per-second", "0")
    waiting.join(20)
    assert answers and answers[0].status_code == 200


def test_buffer_unknown_models_lets_a_request_wait_for_servers_still_starting(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0", "--buffer-unknown-models",
                              "--buffered-request-timeout", "20")
    serve_simulator(fleet, balancer, "other", "--alias", "other", "--decode-tokens-per-second", "0")
    wait_for_models(balancer, 1)
    answers: list[requests.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(chat(balancer, "later")))
    waiting.start()
    wait_until(lambda: health(balancer)["requests_buffered"] == 1, message="the request waiting for its model")
    assert not answers  # it waits (no 404) while no server serves it
    serve_simulator(fleet, balancer, "later", "--alias", "later", "--decode-tokens-per-second", "0")
    waiting.join(20)
    assert answers and answers[0].status_code == 200


def test_by_default_llamacpp_judges_a_request_as_it_would_directly(fleet: Fleet) -> None:
    """llama.cpp's rule: a limit past the context is llama.cpp's to stop at; a prompt that fits no slot goes to the
    largest slots, whose llama.cpp answers (b4748, as simulated: truncates it and answers 200)."""
    balancer = fleet.balancer("--models-discovery-time", "0")
    small = serve_simulator(fleet, balancer, "small", "--parallel", "2", "--ctx-size", "1024", "--alias", "m",
                  "--decode-tokens-per-second", "0")
    large = serve_simulator(fleet, balancer, "large", "--parallel", "2", "--ctx-size", "4096", "--alias", "m",
                  "--decode-tokens-per-second", "0")
    wait_for_models(balancer, 2)
    proxy = balancer.extra["proxy"]
    asks_too_much = requests.post(proxy + "/completion", json={"model": "m", "prompt": "hi", "n_predict": 5000},
                                  timeout=30)
    assert asks_too_much.status_code == 200  # the prompt fits: llama.cpp generates until the context is full
    too_long = requests.post(proxy + "/completion", json={"model": "m", "prompt": "hello " * 5000}, timeout=10)
    assert too_long.status_code == 200 and too_long.json()["truncated"] is True
    fits_only_large = requests.post(proxy + "/completion", json={"model": "m", "prompt": "hello " * 800}, timeout=10)
    assert fits_only_large.status_code == 200
    assert sim_stats(large)["requests_total"] >= 2  # the too-long prompt and the one only its slots hold
    assert sim_stats(small)["requests_total"] + sim_stats(large)["requests_total"] == 3
    assert "end=context_too_long" not in balancer.log()


def test_a_name_llamacpp_would_ignore_is_ignored_where_every_server_that_could_take_it_would(fleet: Fleet) -> None:
    """A llama-server that is no router ignores 'model': so does a fleet of one model, or --default-model's servers.
    Where the name decides between models, or a router would refuse it, it keeps the 404."""
    balancer = fleet.balancer("--models-discovery-time", "0")
    one = serve_simulator(fleet, balancer, "one", "--dialect", "modern", "--alias", "tinyllama-2,fim",
                          "--tags", "chat,small", "--parallel", "2", "--decode-tokens-per-second", "0")
    wait_for_models(balancer, 1)
    for name in ("gpt-3.5-turbo", "text-embedding-3-small"):
        assert chat(balancer, name).status_code == 200, name
    assert sim_stats(one)["requests_total"] == 2
    listed = requests.get(balancer.extra["proxy"] + "/v1/models", timeout=5).json()["data"]
    assert [(m["id"], m["aliases"], m["tags"]) for m in listed] == [("fim", ["fim", "tinyllama-2"], ["chat", "small"])]

    serve_simulator(fleet, balancer, "two", "--alias", "other", "--decode-tokens-per-second", "0")
    wait_for_models(balancer, 2)
    assert chat(balancer, "gpt-3.5-turbo").status_code == 404  # two models: the name decides, and names neither
    assert sim_stats(one)["requests_total"] == 2

    defaulted = fleet.balancer("--models-discovery-time", "0", "--default-model", "other")
    serve_simulator(fleet, defaulted, "one", "--alias", "fim", "--decode-tokens-per-second", "0")
    other = serve_simulator(fleet, defaulted, "two", "--alias", "other", "--decode-tokens-per-second", "0")
    wait_for_models(defaulted, 2)
    assert chat(defaulted, "gpt-3.5-turbo").status_code == 200  # --default-model's servers take it
    assert sim_stats(other)["requests_total"] == 1


def test_a_router_refuses_a_model_it_does_not_know_so_the_fleet_answers_404(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0")
    router = serve_simulator(fleet, balancer, "router", "--router-models", "tiny", "--parallel", "2",
                   "--decode-tokens-per-second", "0")
    wait_for_models(balancer, 1)
    assert chat(balancer, "gpt-3.5-turbo").status_code == 404
    assert requests.get(balancer.extra["proxy"] + "/health", timeout=5).status_code == 200  # names none: the router
    assert sim_stats(router)["loads"] == 0
    routers_list = requests.get(balancer.extra["proxy"] + "/models", timeout=5).json()["data"]  # the router's API
    assert [(m["id"], m["status"]["value"]) for m in routers_list] == [("tiny", "unloaded")]
    assert "status" not in requests.get(balancer.extra["proxy"] + "/v1/models", timeout=5).json()["data"][0]
    # the router's own business names a model to act on, not to serve: the router answers, in its own words
    load = requests.post(balancer.extra["proxy"] + "/models/load", json={"model": "not-downloaded"}, timeout=5)
    assert "X-Paddler-Sync" not in load.headers and load.json()["error"]["code"] != "model_not_found"
    assert requests.post(balancer.extra["proxy"] + "/models/load", json={"model": "tiny"}, timeout=5).ok
    wait_until(lambda: sim_stats(router)["loads"] == 1)
