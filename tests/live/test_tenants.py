"""Tenants through real processes (a simulator that demands its own API key, its agent, a balancer with --tenants),
on both stores: keys in and never out, the refusals clients see, usage where operators read it, reloads that
drop nothing, and the tenant rule deciding whose request gets the next slot."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.helpers import Fleet, Proc, run_cli, wait_until

pytestmark = pytest.mark.both_stores
UPSTREAM_KEY = "llama-own-key-7f3a"
CHAT_KEY = "sk-chat-0001-secret-tail"
BATCH_KEY = "sk-batch-0002-secret-tail"
TENANTS = f"""
[tenants.chat]
keys = ["{CHAT_KEY}"]
priority = 10
reserved_slots = 1

[tenants.batch]
keys = ["{BATCH_KEY}"]
max_slots = 2

[tenants.limited]
key_sha256 = ["{'0' * 64}"]
requests_per_minute = 2
models = ["other-*"]
"""
TOKEN = "mgmt-token"


def tenants_fleet(fleet: Fleet, text: str = TENANTS, *args: str, slots: int = 3,
                  sim_args: tuple[str, ...] = ()) -> tuple[Proc, Proc, Path]:
    path = fleet.workdir / "tenants.toml"
    path.write_text(text)
    balancer = fleet.balancer("--tenants", str(path), "--upstream-api-key", UPSTREAM_KEY, "--management-token",
                              TOKEN, *args)
    sim = fleet.simulator("--parallel", str(slots), "--api-key", UPSTREAM_KEY, *sim_args)
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "s0", "--llamacpp-api-key", UPSTREAM_KEY,
                "--management-token", TOKEN)
    wait_until(lambda: [a["state"] for a in agents_of(balancer)] == ["ready"], message="the agent ready")
    return balancer, sim, path


def agents_of(balancer: Proc) -> list[dict]:
    answer = requests.get(f"{balancer.extra['management']}/api/v1/agents", headers=auth(TOKEN), timeout=5)
    return answer.json()["agents"]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(balancer: Proc, headers: dict[str, str] | None = None, n_predict: int = 4, stream: bool = False,
        **body: object) -> requests.Response:
    return requests.post(balancer.extra["proxy"] + "/v1/chat/completions", headers=headers or {}, timeout=30,
                         json={"messages": [{"role": "user", "content": "hello there"}], "max_tokens": n_predict,
                               "stream": stream, **body})


def tenant_rows(balancer: Proc) -> dict[str, dict]:
    answer = requests.get(balancer.extra["management"] + "/api/v1/tenants", headers=auth(TOKEN), timeout=5)
    assert answer.status_code == 200, answer.text
    return {row["name"]: row for row in answer.json()["tenants"]}


def settled_rows(balancer: Proc, done: Callable[[dict[str, dict]], bool]) -> dict[str, dict]:
    """The tenants' figures once ``done`` holds: a request is counted just after its last byte went out."""
    return wait_until(lambda: rows if done(rows := tenant_rows(balancer)) else None, timeout=5,
                      message="the tenants' figures")


def test_keys_identify_tenants_and_never_reach_llamacpp(fleet: Fleet) -> None:
    balancer, _, _ = tenants_fleet(fleet)
    assert ask(balancer, auth(CHAT_KEY)).status_code == 200  # the simulator takes only its own key: ours replaced it
    assert ask(balancer, {"x-api-key": BATCH_KEY}).status_code == 200
    missing, unknown = ask(balancer), ask(balancer, auth("sk-nobody"))
    assert missing.status_code == unknown.status_code == 401
    assert missing.json() == unknown.json() and missing.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(balancer.extra["proxy"] + "/health", timeout=5).status_code == 200  # open, as in llama.cpp
    rows = settled_rows(balancer, lambda r: r["chat"]["requests"]["served"] == r["batch"]["requests"]["served"] == 1)
    assert rows["chat"]["key_prefixes"] == ["sk-chat-…"] and rows["limited"]["keys"] == 1
    metrics = requests.get(balancer.extra["management"] + "/metrics", headers=auth(TOKEN), timeout=5).text
    for text in (balancer.log(), metrics, str(rows)):
        assert CHAT_KEY not in text and BATCH_KEY not in text and "secret-tail" not in text
    assert re.search(r'"POST /v1/chat/completions" 200 .* tenant=chat', balancer.log())


def test_an_anonymous_tenant_takes_requests_without_a_key(fleet: Fleet) -> None:
    balancer, _, _ = tenants_fleet(fleet, TENANTS + "\n[tenants.anonymous]\nmax_slots = 1\n")
    assert ask(balancer).status_code == 200
    assert ask(balancer, auth("sk-nobody")).status_code == 401  # a wrong key is no missing key
    settled_rows(balancer, lambda rows: rows["anonymous"]["requests"]["served"] == 1)


def test_models_and_rates_are_refused_in_openai_shape(fleet: Fleet) -> None:
    balancer, _, _ = tenants_fleet(fleet, TENANTS.replace('"' + "0" * 64 + '"', '"' + _sha("sk-lim") + '"')
                                   .replace('models = ["other-*"]', 'models = ["*"]'))
    answers = [ask(balancer, auth("sk-lim")) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    limited = answers[2]
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["Retry-After"]) <= 120
    assert limited.headers["x-ratelimit-limit-requests"] == "2"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"(\d+m)?\d+s", limited.headers["x-ratelimit-reset-requests"])
    settled_rows(balancer, lambda rows: rows["limited"]["rejections"] == {"rate_limited": 1})


def test_a_model_outside_the_tenants_globs_gets_403(fleet: Fleet) -> None:
    text = TENANTS.replace('"' + "0" * 64 + '"', '"' + _sha("sk-lim") + '"')
    balancer, _, _ = tenants_fleet(fleet, text)
    refused = ask(balancer, auth("sk-lim"), model="simulated-model")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert "other-*" in refused.json()["error"]["message"]


def test_tokens_per_minute_count_llamacpps_own_figures(fleet: Fleet) -> None:
    text = '[tenants.tiny]\nkeys = ["sk-tiny"]\ntokens_per_minute = 20\n'
    balancer, _, _ = tenants_fleet(fleet, text)
    first = ask(balancer, auth("sk-tiny"), n_predict=30)
    assert first.status_code == 200
    generated = first.json()["usage"]["completion_tokens"]
    usage = settled_rows(balancer, lambda rows: rows["tiny"]["tokens"]["generated"] == generated)["tiny"]["tokens"]
    assert usage["prompt"] == first.json()["usage"]["prompt_tokens"] > 0
    second = ask(balancer, auth("sk-tiny"))
    assert second.status_code == 429 and second.headers["x-ratelimit-limit-tokens"] == "20"


def test_a_stream_counts_its_tokens_and_slot_seconds(fleet: Fleet) -> None:
    balancer, _, _ = tenants_fleet(fleet)
    answer = ask(balancer, auth(CHAT_KEY), n_predict=12, stream=True)
    assert answer.status_code == 200 and "[DONE]" in answer.text
    row = settled_rows(balancer, lambda rows: rows["chat"]["tokens"]["generated"] == 12)["chat"]
    assert row["slot_seconds"] > 0 and row["in_flight"] == 0
    metrics = requests.get(balancer.extra["management"] + "/metrics", headers=auth(TOKEN), timeout=5).text
    assert 'paddler_tenant_tokens_total{kind="generated",tenant="chat"} 12.0' in metrics
    assert 'paddler_tenant_requests_total{outcome="served",tenant="chat"} 1.0' in metrics
    assert 'paddler_tenant_in_flight{tenant="chat"} 0.0' in metrics


def test_sighup_and_put_reload_without_dropping_a_request(fleet: Fleet) -> None:
    balancer, _, path = tenants_fleet(fleet, sim_args=("--decode-tokens-per-second", "20"))
    results: list[int] = []
    running = threading.Thread(target=lambda: results.append(ask(balancer, auth(CHAT_KEY), n_predict=40,
                                                                 stream=True).status_code))
    running.start()
    wait_until(lambda: tenant_rows(balancer)["chat"]["in_flight"] == 1, message="the stream running")
    path.write_text(TENANTS.replace(CHAT_KEY, "sk-chat-rotated"))
    balancer.signal(signal.SIGHUP)
    wait_until(lambda: ask(balancer, auth("sk-chat-rotated")).status_code == 200, message="the new key in force")
    wait_until(lambda: "Worker exiting" in balancer.log(), timeout=20, message="the old worker gone (its stream done)")
    assert ask(balancer, auth(CHAT_KEY)).status_code == 401  # (until then the old worker may still accept one)
    mistaken = TENANTS + "\n[tenants.typo]\nkeys = [\"k\"]\nwieght = 2\n"  # the running tenants stay
    path.write_text(mistaken)
    balancer.signal(signal.SIGHUP)
    line = mistaken.splitlines().index("wieght = 2") + 1
    wait_until(lambda: f"line {line}: tenant 'typo': unknown field 'wieght'; did you mean 'weight'?" in balancer.log(),
               message="the mistake named")
    assert ask(balancer, auth("sk-chat-rotated")).status_code == 200
    put = requests.put(balancer.extra["management"] + "/api/v1/tenants", data=TENANTS, headers=auth(TOKEN), timeout=5)
    assert put.status_code == 200 and put.json()["tenants"] == ["chat", "batch", "limited"]
    assert ask(balancer, auth(CHAT_KEY)).status_code == 200 and path.read_text() == TENANTS
    bad = requests.put(balancer.extra["management"] + "/api/v1/tenants", data="[tenants.x]\nkeys = 3\n",
                       headers=auth(TOKEN), timeout=5)
    assert bad.status_code == 400 and "line 2" in bad.json()["error"]["message"]
    assert requests.put(balancer.extra["management"] + "/api/v1/tenants", data=TENANTS, timeout=5).status_code == 401
    running.join(30)
    assert results == [200]


def test_a_wrong_tenants_file_stops_the_start_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.chat]\nkeys = ["a"]\nreserved_slots = -1\n')
    result = run_cli("balancer", "--tenants", str(path))
    assert result.returncode != 0
    assert f"{path}, line 3: tenant 'chat': reserved_slots must be a whole number of 0 or more" in result.stderr


def test_the_reserved_slot_waits_for_its_tenant_and_priority_goes_first(fleet: Fleet) -> None:
    """Two slots; batch floods: it gets one slot only, the other stays chat's reservation; a chat request that must
    wait starts before every batch request that waited longer."""
    text = TENANTS.replace("max_slots = 2", "max_slots = 0")
    balancer, _, _ = tenants_fleet(fleet, text, slots=2, sim_args=("--decode-tokens-per-second", "40"))
    started: dict[str, float] = {}

    def client(key: str, name: str, n_predict: int) -> None:
        with requests.post(balancer.extra["proxy"] + "/completion", headers=auth(key), stream=True, timeout=60,
                           json={"prompt": "hello", "n_predict": n_predict, "stream": True}) as answer:
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line.startswith(b"data: "):
                    started.setdefault(name, time.monotonic())

    batch = [threading.Thread(target=client, args=(BATCH_KEY, f"batch{i}", 40)) for i in range(4)]
    for thread in batch:
        thread.start()
    wait_until(lambda: tenant_rows(balancer)["batch"]["waiting"] == 3, message="three batch requests waiting")
    assert tenant_rows(balancer)["batch"]["in_flight"] == 1  # the other slot is chat's reservation
    asked = time.monotonic()
    client(CHAT_KEY, "chat1", 2)
    assert started["chat1"] - asked < 0.5  # straight into the reserved slot
    chats = [threading.Thread(target=client, args=(CHAT_KEY, name, 40)) for name in ("chat2", "chat3")]
    for thread in chats:
        thread.start()
    wait_until(lambda: tenant_rows(balancer)["chat"]["waiting"] == 1, message="a chat request waiting")
    for thread in [*batch, *chats]:
        thread.join(60)
    first_batch = min(started[f"batch{i}"] for i in range(4))
    waited_batch = sorted(started[f"batch{i}"] for i in range(4) if started[f"batch{i}"] != first_batch)
    assert len(started) == 7 and max(started["chat2"], started["chat3"]) < waited_batch[0], started


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()
